"""The reader study's file: stratified, blinded, and keyed only by token hashes."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest

from common.config import ReaderStudyConfig
from common.evaluation.reader_study import Pools, Study, StudyError, create_study


def pools(n: int = 40) -> Pools:
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 2
    return Pools(rng.integers(0, 255, (n, 8, 8), dtype=np.uint8), labels, rng.integers(0, 255, (n, 8, 8), dtype=np.uint8), labels,
                 np.array(["hospital_a"] * (n // 2) + ["hospital_b"] * (n // 2)))


def test_a_study_is_stratified_by_class_and_kind_and_keeps_no_token(tmp_path):
    cfg = ReaderStudyConfig(images=20, synthetic_fraction=0.5, consenting_sites=["hospital_a", "hospital_b"], readers=["a", "b"])
    tokens = create_study(tmp_path / "s.sqlite", pools(), cfg, {"run": "x"})
    with sqlite3.connect(tmp_path / "s.sqlite") as con:
        counts = dict(((t, c), n) for t, c, n in con.execute("SELECT truth, label, COUNT(*) FROM items GROUP BY truth, label"))
        orders = [json.loads(o) for (o,) in con.execute("SELECT item_order FROM readers")]
        dump = "\n".join(con.iterdump())
    assert counts == {("real", 0): 5, ("real", 1): 5, ("synthetic", 0): 5, ("synthetic", 1): 5}
    assert sorted(orders[0]) == sorted(orders[1]) and orders[0] != orders[1]  # each reader their own order
    assert all(token not in dump for token in tokens.values())


def test_an_answer_counts_once_and_a_token_opens_only_its_reader(tmp_path):
    cfg = ReaderStudyConfig(images=4, consenting_sites=["hospital_a", "hospital_b"], readers=["a", "b"])
    tokens = create_study(tmp_path / "s.sqlite", pools(), cfg, {})
    study = Study(tmp_path / "s.sqlite")
    a = study.reader(tokens["a"])
    assert study.reader("guess") is None and study.reader(tokens["b"]).name == "b"
    _, item = study.next_item(a)
    assert study.answer(a, item, 4, "real") is True
    assert study.answer(a, item, 1, "synthetic") is False  # a double submit: the first answer stands
    assert [tuple(r) for r in study.db.execute("SELECT rating, guess FROM answers")] == [(4, "real")]
    with pytest.raises(StudyError):
        study.answer(a, item, 6, "real")
    with pytest.raises(StudyError):
        study.answer(a, "not-an-item", 3, "real")
    study.close()


def test_a_study_larger_than_its_pools_is_refused_and_leaves_no_file(tmp_path):
    with pytest.raises(StudyError, match="class 0 needs 50 synthetic images, the pool has 20"):
        create_study(tmp_path / "s.sqlite", pools(), ReaderStudyConfig(images=200, consenting_sites=["hospital_a", "hospital_b"]), {})
    assert not (tmp_path / "s.sqlite").exists()  # nothing half-made left behind


def test_real_images_from_a_site_that_did_not_agree_are_refused(tmp_path):
    with pytest.raises(StudyError, match=r"real images from \['hospital_b'\], which did not agree"):
        create_study(tmp_path / "s.sqlite", pools(), ReaderStudyConfig(images=8, consenting_sites=["hospital_a"]), {})


def test_every_image_is_the_same_number_of_bytes_whatever_its_content(tmp_path):
    """A compressed PNG's size would tell a smooth synthetic image from a real one."""
    smooth = pools()
    smooth.synthetic[:] = 128  # flat grey compresses to almost nothing; noise does not compress at all
    create_study(tmp_path / "s.sqlite", smooth, ReaderStudyConfig(images=20, consenting_sites=["hospital_a", "hospital_b"]), {})
    with sqlite3.connect(tmp_path / "s.sqlite") as con:
        sizes = {n for (n,) in con.execute("SELECT length(png) FROM items")}
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert len(sizes) == 1
