"""``fedsynth certs`` (coordinator) and ``fedsynth keygen`` (each hospital).

``certs`` makes, under its output folder::

    ca.crt, ca.key                      the federation's certificate authority (keep ca.key offline)
    superlink.crt, superlink.key        TLS for the SuperLink (SAN: localhost, 127.0.0.1, ::1 and the given hosts)
    release_signing.pem / .pub          the deployment's one Ed25519 release-signing key (publish the .pub)

``keygen`` makes a hospital's SuperNode authentication key pair (OpenSSH, ECDSA P-384) in the
hospital's own state folder; only the ``.pub`` goes to the coordinator, who never holds a
hospital's private key.

Files that exist are kept (the commands are idempotent); ``force=True`` regenerates them. A CA
that is missing while certificates it signed remain is refused without ``force``: silently
making a new CA would orphan them. Private keys are written with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .signing import load_or_create_signing_key, public_pem

VALID_DAYS = 825  # the longest TLS certificate lifetime browsers and many clients accept


def _write(path: Path, data: bytes, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _pem_key(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedsynth federation"), x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject: str, key, issuer_cert, issuer_key, ca: bool, hosts: list[str] = ()) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer_cert.subject if issuer_cert is not None else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS * (4 if ca else 1)))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
    else:
        sans = [x509.IPAddress(ipaddress.ip_address(h)) if _is_ip(h) else x509.DNSName(h) for h in hosts]
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return builder.sign(issuer_key if issuer_key is not None else key, hashes.SHA256())


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


# The SuperLink's own SuperExec and `flwr run` on the coordinator's machine connect over loopback.
LOOPBACK_HOSTS = ["localhost", "127.0.0.1", "::1"]


class CertsError(ValueError):
    """``fedsynth certs`` would destroy keys or certificates without ``--force``."""


def make_certs(out: Path, hosts: list[str] = (), force: bool = False, release_key: bool = True) -> dict[str, list[str]]:
    """Create what is missing (everything with ``force``); returns {'created': [...], 'kept': [...]}.
    ``release_key=False``: TLS only (a throwaway local federation signs with the deployment's key)."""
    out = Path(out)
    done: dict[str, list[str]] = {"created": [], "kept": []}
    hosts = list(dict.fromkeys([*LOOPBACK_HOSTS, *hosts]))
    explicit = force
    ca_crt, ca_key = out / "ca.crt", out / "ca.key"
    signed = [p for p in (out / "superlink.crt", out / "superlink.key") if p.exists()]
    if not force and not (ca_crt.exists() and ca_key.exists()) and signed:
        missing = ", ".join(p.name for p in (ca_crt, ca_key) if not p.exists())
        raise CertsError(f"{out}: {missing} missing but {', '.join(p.name for p in signed)} exist; restore the CA from "
                         "backup, or rerun with --force to regenerate everything (every node must then reconnect)")

    def need(*paths: Path) -> bool:
        if not force and all(p.exists() for p in paths):
            done["kept"] += [str(p.relative_to(out)) for p in paths]
            return False
        done["created"] += [str(p.relative_to(out)) for p in paths]
        return True

    if need(ca_crt, ca_key):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _cert("fedsynth CA", key, None, None, ca=True)
        _write(ca_key, _pem_key(key), private=True)
        _write(ca_crt, cert.public_bytes(serialization.Encoding.PEM), private=False)
        force = True  # everything below must chain to the new CA
    ca_cert = x509.load_pem_x509_certificate(ca_crt.read_bytes())
    ca_private = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)

    crt, key_path = out / "superlink.crt", out / "superlink.key"
    if need(crt, key_path):
        key = ec.generate_private_key(ec.SECP256R1())
        _write(key_path, _pem_key(key), private=True)
        _write(crt, _cert("fedsynth SuperLink", key, ca_cert, ca_private, ca=False, hosts=hosts).public_bytes(serialization.Encoding.PEM), private=False)

    if not release_key:
        return done
    sign_key = out / "release_signing.pem"  # it signs releases, not certificates: a new CA leaves it be
    force = explicit
    if not force and not sign_key.exists() and (out / "release_signing.pub").exists():
        raise CertsError(f"{out}: release_signing.pem is missing but its published .pub exists; restore the key from "
                         "backup, or --force to make a new one (then publish the new .pub: old releases keep the old one)")
    if need(sign_key) and sign_key.exists():
        sign_key.unlink()
    key = load_or_create_signing_key(sign_key)
    _write(out / "release_signing.pub", public_pem(key), private=False)
    return done


def keygen(site: str, out: Path, force: bool = False) -> tuple[Path, Path]:
    """A hospital's SuperNode key pair ``out/<site>.key`` (0600) and ``.pub``; kept if it exists."""
    priv, pub = Path(out) / f"{site}.key", Path(out) / f"{site}.pub"
    if priv.exists() and not pub.exists() and not force:  # rebuild the public half; never replace a registered key
        key = serialization.load_ssh_private_key(priv.read_bytes(), password=None)
        _write(pub, key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n", private=False)
    if force or not (priv.exists() and pub.exists()):
        key = ec.generate_private_key(ec.SECP384R1())
        _write(priv, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()), private=True)
        _write(pub, key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH) + b"\n", private=False)
    return priv, pub
