"""Keyed pseudonyms for patient identifiers, and keyed names for local files.

``pseudonym = HMAC-SHA256(site key, patient id)``, truncated to 16 hex digits.
The 256-bit key is created on first use in the site's state folder with
owner-only permissions (0600, in a 0700 folder) and is never sent anywhere:
without it a pseudonym cannot be linked back to, or recomputed from, a patient
ID. The same key names scan files in local manifests (:meth:`Pseudonymiser.path_key`),
so a file name such as ``Smith_John_MRN12345.dcm`` is never written down, while
the operator, who holds the key, can still compute the name of any file.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.hazmat.primitives import hashes, hmac

from ..config import ConfigError

# The privacy unit of a scan whose patient is not known: "scan-" + the pseudonym of its path.
UNKNOWN_PATIENT = "scan-"


class KeyPermissionError(ConfigError, PermissionError):
    """The pseudonym key can be read by others (a one-line error that says how to fix it)."""


class Pseudonymiser:
    def __init__(self, key_path: str | os.PathLike):
        self.key_path = Path(key_path)
        self._key = self._load_or_create()

    def _load_or_create(self) -> bytes:
        if self.key_path.exists():
            mode = stat.S_IMODE(self.key_path.stat().st_mode)
            if mode & 0o077:
                raise KeyPermissionError(f"{self.key_path}: pseudonym key is readable by others (mode {mode:o}); "
                                         f"run: chmod 600 {self.key_path}")
            key = self.key_path.read_bytes()
            if len(key) != 32:
                raise ConfigError(f"{self.key_path}: pseudonym key must be 32 bytes, found {len(key)}; restore it from "
                                  "backup (a new key changes every pseudonym)")
            return key
        self.key_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = os.urandom(32)
        fd = os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key)
        return key

    def _mac(self, data: bytes) -> str:
        mac = hmac.HMAC(self._key, hashes.SHA256())
        mac.update(data)
        return mac.finalize().hex()

    def __call__(self, patient_id: str) -> str:
        return "p" + self._mac(patient_id.strip().encode("utf-8"))[:16]

    def path_key(self, relative_path: str) -> str:
        """The name of a scan file (path relative to ``source.root``) in local manifests.
        Domain-separated from patient pseudonyms: a file key never equals a pseudonym."""
        return "f" + self._mac(b"path\0" + relative_path.encode("utf-8"))[:32]
