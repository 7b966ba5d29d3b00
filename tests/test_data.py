"""Data: location, download check, seeded label-skewed partition, site splits."""

import hashlib

import numpy as np
import pytest
import torch

from common.config import SourceConfig
from common.data import holdout_split, label_skewed_partition, load_site, locate
from common.data.medmnist import DataError, download, load_splits
from common.data.sites import site_indices

LABELS = np.array([0] * 300 + [1] * 700)


def test_partition_is_disjoint_and_complete():
    parts = label_skewed_partition(LABELS, [0.5, 0.3, 0.2], alpha=2.0, seed=1, min_per_class=5)
    joined = np.concatenate(parts)
    assert len(joined) == len(set(joined)) == len(LABELS)


def test_partition_is_seeded():
    a = label_skewed_partition(LABELS, [0.5, 0.3, 0.2], alpha=2.0, seed=1)
    b = label_skewed_partition(LABELS, [0.5, 0.3, 0.2], alpha=2.0, seed=1)
    c = label_skewed_partition(LABELS, [0.5, 0.3, 0.2], alpha=2.0, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_partition_sizes_and_label_mix_differ():
    parts = label_skewed_partition(LABELS, [0.5, 0.3, 0.2], alpha=1.0, seed=3, min_per_class=5)
    sizes = [len(p) for p in parts]
    prevalence = [LABELS[p].mean() for p in parts]
    assert len(set(sizes)) == 3
    assert max(prevalence) - min(prevalence) > 0.05
    assert all(np.bincount(LABELS[p], minlength=2).min() >= 5 for p in parts)


def test_impossible_minimum_is_a_clear_error():
    with pytest.raises(ValueError, match="min_per_class"):
        label_skewed_partition(LABELS, [1, 1, 1], alpha=1.0, seed=0, min_per_class=200)


def test_holdout_split_is_disjoint_seeded_and_stratified():
    tr, ho = holdout_split(1000, 0.3, seed=5, labels=LABELS)
    assert not set(tr) & set(ho) and len(tr) + len(ho) == 1000
    assert abs(len(ho) - 300) <= 2
    assert abs(LABELS[ho].mean() - 0.7) < 0.01
    tr2, ho2 = holdout_split(1000, 0.3, seed=5, labels=LABELS)
    assert np.array_equal(ho, ho2)


def test_sites_are_disjoint_and_external_is_the_test_split(demo_run):
    from common.data.sites import partitioned_sites

    # The hospitals and the declared public archive divide the pool; none shares an image.
    parts = partitioned_sites(demo_run)
    assert [s.name for s in parts] == [*(s.name for s in demo_run.training_sites), "public_archive"]
    seen = set()
    for site in parts:
        _, _, idx = site_indices(demo_run, site)
        assert not seen & set(idx.tolist())
        seen |= set(idx.tolist())
    assert len(seen) == 4708 + 524 - 26  # official train + val, all used, less 26 exact duplicates
    ext = demo_run.external_sites[0]
    _, y, idx = site_indices(demo_run, ext)
    assert len(idx) == 624 - 3 and np.bincount(y).tolist() == [234, 387]  # the test split holds 3 exact duplicates


def test_site_data_is_model_ready_and_deterministic(demo_run):
    site = demo_run.training_sites[0]
    a, b = load_site(demo_run, site), load_site(demo_run, site)
    assert a.train_x.shape[1:] == (1, 32, 32) and a.train_x.dtype == torch.float32
    assert 0 <= float(a.train_x.min()) and float(a.train_x.max()) <= 1
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.holdout_y, b.holdout_y)
    frac = len(a.holdout_x) / (len(a.train_x) + len(a.holdout_x))
    assert abs(frac - site.holdout_fraction) < 0.01


def test_locate_uses_env_then_fails_clearly(shared_data, monkeypatch, tmp_path):
    assert locate(SourceConfig()).name == "pneumoniamnist.npz"
    monkeypatch.setenv("FEDSYNTH_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match="pneumoniamnist.npz not found"):
        locate(SourceConfig(cache_dir=str(tmp_path / "cache")))
    with pytest.raises(DataError, match="source.path"):
        locate(SourceConfig(path=str(tmp_path / "missing.npz")))


def test_download_checks_md5_and_keeps_nothing_on_mismatch(shared_data, tmp_path):
    src = shared_data / "medmnist" / "pneumoniamnist.npz"
    md5 = hashlib.md5(src.read_bytes()).hexdigest()
    dest = download(src.as_uri(), tmp_path / "ok.npz", md5)
    x, y = load_splits(dest, ["test"])
    assert x.shape == (624, 28, 28)
    with pytest.raises(DataError, match="MD5 mismatch"):
        download(src.as_uri(), tmp_path / "bad.npz", "0" * 32)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.npz"]


def test_offline_download_fails_with_a_hint(tmp_path):
    with pytest.raises(DataError, match="FEDSYNTH_DATA_DIR"):
        download((tmp_path / "absent.npz").as_uri(), tmp_path / "x.npz", None)


def test_corrupt_npz_is_named(tmp_path):
    bad = tmp_path / "corrupt.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="corrupt.npz"):
        load_splits(bad, ["train"])
