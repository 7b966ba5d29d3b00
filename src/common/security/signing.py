"""Ed25519-signed synthetic releases.

The coordinator signs the release manifest, which lists the SHA-256 of every
release file; ``fedsynth verify`` checks the signature, then every file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..runtime import sha256_file

MANIFEST, SIGNATURE, PUBLIC_KEY = "manifest.json", "manifest.sig", "release_signing.pub"


class VerificationError(ValueError):
    """A release's signature or one of its files does not check out."""


def write_private_key(path: Path, key) -> None:
    """PEM, owner-only (0600), never overwritten."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    if path.exists():
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path}: not an Ed25519 private key")
        return key
    key = Ed25519PrivateKey.generate()
    write_private_key(path, key)
    return key


def public_pem(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def sign_release(release_dir: Path, key: Ed25519PrivateKey) -> Path:
    """Sign ``manifest.json`` as it is on disk; write the signature and the public key beside it."""
    sig = release_dir / SIGNATURE
    sig.write_bytes(key.sign((release_dir / MANIFEST).read_bytes()))
    (release_dir / PUBLIC_KEY).write_bytes(public_pem(key))
    return sig


def verify_release(release_dir: Path, public_key: Path | None = None) -> list[str]:
    """Check the signature, then every file the manifest lists. Returns the files checked."""
    release_dir = Path(release_dir)
    manifest, sig = release_dir / MANIFEST, release_dir / SIGNATURE
    for p in (manifest, sig):
        if not p.is_file():
            raise VerificationError(f"{p}: missing")
    key_path = public_key or release_dir / PUBLIC_KEY
    try:
        key = serialization.load_pem_public_key(Path(key_path).read_bytes())
    except (OSError, ValueError) as exc:
        raise VerificationError(f"{key_path}: not a readable public key ({exc})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise VerificationError(f"{key_path}: not an Ed25519 public key")
    data = manifest.read_bytes()
    try:
        key.verify(sig.read_bytes(), data)
    except InvalidSignature:
        raise VerificationError(f"{manifest}: signature does not match (manifest changed, or signed by another key)") from None
    files = json.loads(data).get("files", {})
    for name, digest in files.items():
        path = release_dir / name
        if not path.is_file():
            raise VerificationError(f"{path}: listed in the manifest but missing")
        if sha256_file(path) != digest:
            raise VerificationError(f"{path}: SHA-256 differs from the signed manifest (file changed)")
    return sorted(files)
