"""Keyed pseudonyms for patient identifiers.

``pseudonym = HMAC-SHA256(site key, patient id)``, truncated to 16 hex digits.
The 256-bit key is created on first use in the site's state folder with
owner-only permissions (0600) and is never sent anywhere: without it a
pseudonym cannot be linked back to, or recomputed from, a patient ID.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import hashes, hmac

# The privacy unit of a scan whose patient is not known: "scan-" + the pseudonym of its path.
UNKNOWN_PATIENT = "scan-"


class Pseudonymiser:
    def __init__(self, key_path: str | os.PathLike):
        self.key_path = Path(key_path)
        self._key = self._load_or_create()

    def _load_or_create(self) -> bytes:
        if self.key_path.exists():
            mode = stat.S_IMODE(self.key_path.stat().st_mode)
            if mode & 0o077:
                raise PermissionError(f"{self.key_path}: pseudonym key is readable by others (mode {mode:o}); chmod 600 it")
            key = self.key_path.read_bytes()
            if len(key) != 32:
                raise ValueError(f"{self.key_path}: pseudonym key must be 32 bytes, found {len(key)}")
            return key
        self.key_path.parent.mkdir(parents=True, exist_ok=True)
        key = os.urandom(32)
        fd = os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        return key

    def __call__(self, patient_id: str) -> str:
        mac = hmac.HMAC(self._key, hashes.SHA256())
        mac.update(patient_id.strip().encode("utf-8"))
        return "p" + mac.finalize().hex()[:16]
