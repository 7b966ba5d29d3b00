"""Config: YAML validated into typed dataclasses; errors name the file and the field."""

from pathlib import Path

import pytest

from common.config import ConfigError, load_run, load_site

from .conftest import DEMO, REPO


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_demo_config_loads_every_site():
    run = load_run(DEMO)
    assert [s.name for s in run.training_sites] == ["hospital_a", "hospital_b", "hospital_c"]
    assert [s.name for s in run.external_sites] == ["external_d"]
    assert all(s.privacy.epsilon > 0 for s in run.training_sites)


def test_full_profile_overrides_only_what_it_names():
    quick, full = load_run(DEMO), load_run(DEMO, "full")
    assert full.training.rounds > quick.training.rounds
    assert full.training.lr == quick.training.lr
    assert full.profile == "full"


def test_unknown_profile_is_named():
    with pytest.raises(ConfigError, match="no profile named 'fast'"):
        load_run(DEMO, "fast")


def test_bad_field_error_names_file_and_field(tmp_path):
    p = write(tmp_path, "site.yaml", "name: x\nrole: train\nprivacy: {epsilon: -1}\n")
    with pytest.raises(ConfigError) as err:
        load_site(p)
    assert str(p) in str(err.value) and "privacy.epsilon" in str(err.value)


def test_unknown_key_is_rejected(tmp_path):
    p = write(tmp_path, "site.yaml", "name: x\nrole: external\nshare_size: 3\n")
    with pytest.raises(ConfigError, match="share_size"):
        load_site(p)


def test_training_site_needs_a_budget(tmp_path):
    p = write(tmp_path, "site.yaml", "name: x\nrole: train\n")
    with pytest.raises(ConfigError, match="privacy"):
        load_site(p)


def test_missing_site_file_is_named(tmp_path):
    p = write(tmp_path, "run.yaml", "name: r\nsites: [nowhere.yaml]\n")
    with pytest.raises(ConfigError, match="nowhere.yaml: file not found"):
        load_run(p)


def test_every_site_yaml_in_repo_is_valid():
    for path in sorted((REPO / "sites").glob("*.yaml")):
        load_site(path)
