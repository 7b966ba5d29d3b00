"""Signed releases: any change to the manifest or a file fails verification."""

import json
import os
import stat

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.runtime import sha256_file, write_json
from common.security.signing import VerificationError, load_or_create_signing_key, public_pem, sign_release, verify_release
from simulations.cli import main as cli


@pytest.fixture
def release(tmp_path):
    d = tmp_path / "synthetic"
    d.mkdir()
    np.savez(d / "synthetic.npz", images=np.arange(12, dtype=np.uint8).reshape(3, 1, 2, 2))
    write_json(d / "manifest.json", {"files": {"synthetic.npz": sha256_file(d / "synthetic.npz")}, "num_images": 3})
    key = load_or_create_signing_key(tmp_path / "keys" / "signing.pem")
    sign_release(d, key)
    return d, key


@pytest.fixture
def trusted(tmp_path):
    return tmp_path / "keys" / "signing.pub"  # published beside the key when it was made


def test_untouched_release_verifies_and_key_is_private(release, tmp_path, trusted):
    d, _ = release
    assert verify_release(d, trusted) == ["synthetic.npz"]
    assert stat.S_IMODE(os.stat(tmp_path / "keys" / "signing.pem").st_mode) == 0o600
    assert cli(["verify", str(d), "--public-key", str(trusted)]) == 0


def test_changed_file_fails(release, trusted):
    d, _ = release
    with open(d / "synthetic.npz", "ab") as f:
        f.write(b"x")
    with pytest.raises(VerificationError, match="synthetic.npz: SHA-256 differs"):
        verify_release(d, trusted)
    with pytest.raises(SystemExit):
        cli(["verify", str(d), "--public-key", str(trusted)])


def test_changed_manifest_fails(release, trusted):
    d, _ = release
    m = json.loads((d / "manifest.json").read_text())
    m["num_images"] = 4
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(VerificationError, match="signature does not match"):
        verify_release(d, trusted)


def test_resigned_by_another_key_fails_against_the_published_key(release, tmp_path):
    d, key = release
    published = tmp_path / "coordinator.pub"
    published.write_bytes(public_pem(key))
    sign_release(d, Ed25519PrivateKey.generate())  # an attacker re-signs
    with pytest.raises(VerificationError, match="signature does not match"):
        verify_release(d, published)  # not signed by the coordinator


def test_certs_chain_to_the_ca_are_idempotent_and_need_force_to_change(tmp_path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from common.security.certs import keygen, make_certs

    out = tmp_path / "certs"
    first = make_certs(out, ["superlink.example.org"])
    assert "ca.key" in first["created"] and not first["kept"]
    ca = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    server = x509.load_pem_x509_certificate((out / "superlink.crt").read_bytes())
    ca.public_key().verify(server.signature, server.tbs_certificate_bytes, ec.ECDSA(server.signature_hash_algorithm))
    for key in ("ca.key", "superlink.key", "release_signing.pem"):
        assert stat.S_IMODE(os.stat(out / key).st_mode) == 0o600, key
    priv, pub = keygen("hospital_a", tmp_path / "hospital_a")
    assert stat.S_IMODE(os.stat(priv).st_mode) == 0o600
    serialization.load_ssh_public_key(pub.read_bytes())

    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    again = make_certs(out, ["superlink.example.org"])
    assert again["created"] == []
    assert all(p.read_bytes() == b for p, b in before.items())
    make_certs(out, ["superlink.example.org"], force=True)
    assert (out / "ca.key").read_bytes() != before[out / "ca.key"]
