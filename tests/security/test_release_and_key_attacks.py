"""Issue 12, items 2 and 3: signed releases that only the deployment's key can make verify, and
certificates that neither break the SuperLink nor get silently replaced."""

import json
import os
import stat

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.config import load_run
from common.runtime import sha256_file, write_json
from common.security.signing import MANIFEST, load_or_create_signing_key, public_pem, sign_release
from server.synthesis import signing_key_path
from simulations.cli import main as cli

from ..conftest import TINY


def staged_release(run_dir):
    d = run_dir / "synthetic"
    d.mkdir(parents=True)
    np.savez(d / "synthetic.npz", images=np.arange(12, dtype=np.uint8).reshape(3, 1, 2, 2), labels=np.zeros(3))
    (d / "DATASHEET.md").write_text("# datasheet\n")
    write_json(d / MANIFEST, {"files": {p.name: sha256_file(p) for p in sorted(d.iterdir())}, "num_images": 3})
    return d


@pytest.fixture
def deployment(tmp_path, monkeypatch, shared_data):
    """A coordinator's working directory after `fedsynth certs`, with the run's default settings."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FEDSYNTH_SIGNING_KEY", raising=False)
    assert cli(["certs"]) == 0
    run = load_run(TINY)
    run_dir = tmp_path / "runs" / "r1"
    release = staged_release(run_dir)
    sign_release(release, load_or_create_signing_key(signing_key_path(run, run_dir)))  # what export does
    return tmp_path, run, run_dir, release


def verify(*args) -> int:
    try:
        return cli(["verify", *map(str, args)])
    except SystemExit as exc:
        return int(exc.code)


def test_the_server_signs_with_the_key_certs_made_so_the_documented_check_passes(deployment, capsys):
    home, run, run_dir, _ = deployment
    assert signing_key_path(run, run_dir) == home / "certs" / "release_signing.pem"
    assert verify(run_dir, "--public-key", "certs/release_signing.pub") == 0
    assert "OK: signed by the key in certs/release_signing.pub" in capsys.readouterr().out


def test_a_signing_key_inside_the_run_folders_is_refused(deployment):
    _, run, run_dir, _ = deployment
    run.synthesis.signing_key = str(run_dir.parent / ".keys" / "release_signing.pem")
    with pytest.raises(ValueError, match="inside the run folders"):
        signing_key_path(run, run_dir)


def test_without_a_trusted_key_verify_says_unauthenticated_and_fails(deployment, capsys):
    *_, release = deployment
    assert verify(release) == 4
    assert "UNAUTHENTICATED" in capsys.readouterr().err
    assert not (release / "release_signing.pub").exists()  # no key travels with the data


def test_replaced_data_resigned_with_a_swapped_key_is_refused(deployment, capsys):
    *_, release = deployment
    np.savez(release / "synthetic.npz", images=np.ones((3, 1, 2, 2), dtype=np.uint8), labels=np.zeros(3))
    manifest = json.loads((release / MANIFEST).read_text())
    manifest["files"]["synthetic.npz"] = sha256_file(release / "synthetic.npz")
    write_json(release / MANIFEST, manifest)
    attacker = Ed25519PrivateKey.generate()
    sign_release(release, attacker)
    (release / "release_signing.pub").write_bytes(public_pem(attacker))  # the attacker's key, shipped along
    assert verify(release) == 1  # never "OK": the shipped key is a file the manifest does not list
    assert "release_signing.pub not listed in the signed manifest" in capsys.readouterr().err
    (release / "release_signing.pub").unlink()
    assert verify(release) == 4  # consistent with itself, but nothing says who signed it
    assert verify(release, "--public-key", "certs/release_signing.pub") == 1
    assert "signature does not match" in capsys.readouterr().err


def test_a_manifest_listing_no_files_fails_even_when_genuinely_signed(deployment, capsys):
    home, _, _, release = deployment
    write_json(release / MANIFEST, {"files": {}, "num_images": 3})
    with pytest.raises(Exception, match="lists no files"):
        sign_release(release, load_or_create_signing_key(home / "certs" / "release_signing.pem"))  # not even signed
    key = load_or_create_signing_key(home / "certs" / "release_signing.pem")
    (release / "manifest.sig").write_bytes(key.sign((release / MANIFEST).read_bytes()))  # signed by hand
    assert verify(release, "--public-key", "certs/release_signing.pub") == 1
    assert "lists no files" in capsys.readouterr().err


@pytest.mark.parametrize("added", ["extra.npz", "sub/extra.npz"])
def test_a_file_added_after_signing_fails_verification(deployment, capsys, added):
    *_, release = deployment
    (release / added).parent.mkdir(exist_ok=True)
    (release / added).write_bytes(b"not in the manifest")
    assert verify(release, "--public-key", "certs/release_signing.pub") == 1
    assert "not listed in the signed manifest" in capsys.readouterr().err


def test_a_manifest_naming_a_file_outside_the_release_fails(deployment, capsys):
    home, _, run_dir, release = deployment
    (run_dir / "secret.txt").write_text("outside")
    manifest = json.loads((release / MANIFEST).read_text())
    manifest["files"]["../secret.txt"] = sha256_file(run_dir / "secret.txt")
    write_json(release / MANIFEST, manifest)
    key = load_or_create_signing_key(home / "certs" / "release_signing.pem")
    (release / "manifest.sig").write_bytes(key.sign((release / MANIFEST).read_bytes()))
    assert verify(release, "--public-key", "certs/release_signing.pub") == 1
    assert "not a plain name inside the release" in capsys.readouterr().err


# ------------------------------------------------------------------ item 3
def test_certs_for_a_public_host_keep_the_loopback_names_the_superlink_needs(tmp_path):
    assert cli(["certs", "--out", str(tmp_path), "--host", "superlink.example.org"]) == 0
    cert = x509.load_pem_x509_certificate((tmp_path / "superlink.crt").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"localhost", "superlink.example.org"}
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1"}


def test_rerunning_certs_with_the_ca_missing_is_refused_and_changes_nothing(tmp_path, capsys):
    assert cli(["certs", "--out", str(tmp_path)]) == 0
    (tmp_path / "ca.crt").unlink()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert cli(["certs", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "ca.crt missing" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert cli(["certs", "--out", str(tmp_path), "--force"]) == 0
    assert (tmp_path / "ca.crt").exists() and (tmp_path / "superlink.key").read_bytes() != before["superlink.key"]


def test_a_hospital_makes_its_own_node_key_and_the_coordinator_holds_none(tmp_path, shared_data):
    assert cli(["certs", "--out", str(tmp_path / "certs")]) == 0
    assert not list((tmp_path / "certs").rglob("*hospital*"))  # no site key at the coordinator
    site = tmp_path / "hospital_a.yaml"
    site.write_text("name: hospital_a\nstate_dir: state\nprivacy: {epsilon: 8, delta: 1.0e-5}\n")
    assert cli(["keygen", "--site", str(site)]) == 0
    key, pub = tmp_path / "state" / "hospital_a.key", tmp_path / "state" / "hospital_a.pub"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600 and pub.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert stat.S_IMODE(os.stat(tmp_path / "state").st_mode) == 0o700


def test_a_missing_release_key_whose_public_half_was_published_is_not_silently_replaced(tmp_path, capsys):
    assert cli(["certs", "--out", str(tmp_path)]) == 0
    published = (tmp_path / "release_signing.pub").read_bytes()
    (tmp_path / "release_signing.pem").unlink()
    assert cli(["certs", "--out", str(tmp_path)]) == 2
    assert "release_signing.pem is missing but its published .pub exists" in capsys.readouterr().err
    assert (tmp_path / "release_signing.pub").read_bytes() == published


def test_keygen_rebuilds_a_lost_public_half_and_never_replaces_the_private_key(tmp_path):
    from common.security.certs import keygen

    priv, pub = keygen("hospital_a", tmp_path)
    key, public = priv.read_bytes(), pub.read_bytes()
    pub.unlink()
    keygen("hospital_a", tmp_path)
    assert priv.read_bytes() == key and pub.read_bytes() == public
