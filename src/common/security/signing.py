"""Ed25519-signed synthetic releases.

The coordinator signs the release manifest, which lists the SHA-256 of every
release file. ``fedsynth verify`` checks the signature against a key the verifier
already trusts (the deployment's published ``release_signing.pub``), then that the
manifest lists every file in the folder and each file matches. No public key travels
inside a release: a key shipped with the data proves only that someone signed it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..runtime import sha256_file

MANIFEST, SIGNATURE = "manifest.json", "manifest.sig"
SIGNING_KEY_ENV = "FEDSYNTH_SIGNING_KEY"


class VerificationError(ValueError):
    """A release's signature or one of its files does not check out."""


class Unauthenticated(VerificationError):
    """No trusted public key was given: the files may be intact, but nobody is proven to have signed them."""


def write_private_key(path: Path, key) -> None:
    """PEM, owner-only (0600), never overwritten."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)


def load_or_create_signing_key(path: Path) -> Ed25519PrivateKey:
    path = Path(path)
    if path.exists():
        if path.stat().st_mode & 0o077:
            raise ValueError(f"{path}: the release-signing key is readable by others; chmod 600 it (or make a new one)")
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path}: not an Ed25519 private key")
        return key
    key = Ed25519PrivateKey.generate()
    write_private_key(path, key)
    path.with_suffix(".pub").write_bytes(public_pem(key))  # what the coordinator publishes
    return key


def public_pem(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def release_files(release_dir: Path) -> list[str]:
    """Every file in the release folder (relative, '/'-separated) but the manifest and its signature."""
    out = []
    for p in sorted(Path(release_dir).rglob("*")):
        if p.is_symlink():
            raise VerificationError(f"{p}: a symbolic link inside a release")
        if p.is_file() and p.relative_to(release_dir).as_posix() not in (MANIFEST, SIGNATURE):
            out.append(p.relative_to(release_dir).as_posix())
    return out


def sign_release(release_dir: Path, key: Ed25519PrivateKey) -> Path:
    """Sign ``manifest.json`` as it is on disk (it must list every file); write the signature beside it."""
    release_dir = Path(release_dir)
    check_files(release_dir)  # never sign a manifest that would not verify
    sig = release_dir / SIGNATURE
    sig.write_bytes(key.sign((release_dir / MANIFEST).read_bytes()))
    return sig


def check_files(release_dir: Path) -> list[str]:
    """The manifest lists every file in the folder, and only safe names; each file matches its SHA-256."""
    release_dir = Path(release_dir)
    try:
        files = json.loads((release_dir / MANIFEST).read_text()).get("files")
    except (OSError, ValueError, AttributeError) as exc:
        raise VerificationError(f"{release_dir / MANIFEST}: unreadable ({type(exc).__name__})") from None
    if not isinstance(files, dict) or not files:
        raise VerificationError(f"{release_dir / MANIFEST}: lists no files; a release must list every file it holds")
    for name in files:
        if not isinstance(name, str) or Path(name).is_absolute() or ".." in Path(name).parts or name in (MANIFEST, SIGNATURE):
            raise VerificationError(f"{release_dir / MANIFEST}: file name {name!r} is not a plain name inside the release")
    if (unlisted := sorted(set(release_files(release_dir)) - set(files))):
        raise VerificationError(f"{release_dir}: {', '.join(unlisted)} not listed in the signed manifest (added after signing?)")
    for name, digest in files.items():
        path = release_dir / name
        if not path.is_file():
            raise VerificationError(f"{path}: listed in the manifest but missing")
        if sha256_file(path) != digest:
            raise VerificationError(f"{path}: SHA-256 differs from the signed manifest (file changed)")
    return sorted(files)


def verify_release(release_dir: Path, public_key: Path | None) -> list[str]:
    """Check the signature with ``public_key`` (a key the verifier trusts), then every file.

    Without a trusted key the files are still checked, then :class:`Unauthenticated` is raised:
    integrity without authenticity is not a verified release. Returns the files checked.
    """
    release_dir = Path(release_dir)
    manifest, sig = release_dir / MANIFEST, release_dir / SIGNATURE
    for p in (manifest, sig):
        if not p.is_file():
            raise VerificationError(f"{p}: missing")
    if public_key is None:
        files = check_files(release_dir)
        raise Unauthenticated(f"{len(files)} file(s) match the manifest, but no trusted public key was given, so "
                              "nothing shows who signed it; pass --public-key with the deployment's published release_signing.pub")
    try:
        key = serialization.load_pem_public_key(Path(public_key).read_bytes())
    except (OSError, ValueError) as exc:
        raise VerificationError(f"{public_key}: not a readable public key ({type(exc).__name__})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise VerificationError(f"{public_key}: not an Ed25519 public key")
    try:
        key.verify(sig.read_bytes(), manifest.read_bytes())
    except InvalidSignature:
        raise VerificationError(f"{manifest}: signature does not match (manifest changed, or signed by another key)") from None
    return check_files(release_dir)
