"""`fedsynth study`: folds, statistics with known answers, and a real two-cell study that resumes."""

import json
import math

import numpy as np
import pytest
from scipy import stats

from common.data import holdout_split
from common.evaluation.study import describe, paired

from .conftest import TINY


def test_folds_are_disjoint_stratified_and_cover_every_unit():
    labels = np.array([0] * 40 + [1] * 20)
    held = [holdout_split(60, 0.3, seed=3, labels=labels, folds=3, fold=f)[1] for f in range(3)]
    assert sorted(np.concatenate(held).tolist()) == list(range(60))  # each unit held out exactly once
    for f, h in enumerate(held):
        assert abs(np.mean(labels[h]) - 1 / 3) < 0.06  # stratified
        train = holdout_split(60, 0.3, seed=3, labels=labels, folds=3, fold=f)[0]
        assert not set(train) & set(h)


def test_interval_and_paired_tests_match_their_textbook_values():
    d = describe([1.0, 2.0, 3.0, 4.0])
    half = stats.t.ppf(0.975, 3) * np.std([1, 2, 3, 4], ddof=1) / 2
    assert d["mean"] == 2.5 and d["ci"] == pytest.approx([2.5 - half, 2.5 + half])
    a = [0.80, 0.82, 0.78, 0.85, 0.81, 0.79]
    b = [0.83, 0.84, 0.80, 0.88, 0.82, 0.83]
    t = paired(a, b)
    diffs = np.subtract(b, a)
    assert t["diff"]["mean"] == pytest.approx(diffs.mean())
    assert t["cohens_d"] == pytest.approx(diffs.mean() / diffs.std(ddof=1))
    assert t["t_p"] == pytest.approx(stats.ttest_rel(b, a).pvalue) and t["t_p"] < 0.01
    assert t["wilcoxon_p"] == pytest.approx(stats.wilcoxon(b, a).pvalue)
    assert paired([1.0], [2.0])["t_p"] is None  # one pair: no test, said so


@pytest.fixture(scope="module")
def study(shared_data, tmp_path_factory):
    from common.evaluation.study import run_study

    out = tmp_path_factory.mktemp("study")
    return run_study(str(TINY), output_dir=str(out)), out


def test_a_study_writes_tables_tests_effect_sizes_and_the_ratio_plot(study):
    study_dir, _ = study
    result = json.loads((study_dir / "study.json").read_text())
    assert result["protocol"]["seeds"] == [7] and result["protocol"]["folds"] == 2
    assert set(result["cells"]["ddpm"]) == {"seed7-fold0", "seed7-fold1"}
    a = result["analysis"]
    fup = a["conditions"]["ddpm"]["fup"]
    assert fup["n"] == 2 and fup["ci"][0] <= fup["mean"] <= fup["ci"][1]
    tests = a["real_vs_hybrid"]["ddpm"]
    assert set(tests) == {f"{m}_{w}" for m in ("mix", "pretrain_finetune") for w in ("internal", "external")}
    t = tests["mix_internal"]
    assert t["n"] == 4  # 2 cells x 2 training sites, paired
    assert math.isfinite(t["t_p"]) and math.isfinite(t["wilcoxon_p"]) and math.isfinite(t["cohens_d"])
    assert set(a["ratio_ablation"]["ddpm"]["mix"]["internal"]) == {"0.5", "1.0"}
    html = (study_dir / "study.html").read_text(encoding="utf-8")
    assert "Cohen" in html and "Wilcoxon" in html and html.count("data:image/png;base64,") >= 1
    # The two folds held out different images, so the cells differ.
    c0, c1 = (result["cells"]["ddpm"][k]["sites"]["hospital_a"]["real_only"]["internal"] for k in ("seed7-fold0", "seed7-fold1"))
    assert c0 != c1


def test_a_resumed_study_keeps_finished_cells_and_redoes_only_the_missing_one(study):
    from common.evaluation.study import run_study

    study_dir, out = study
    kept = study_dir / "cells" / "ddpm" / "seed7-fold0" / "cell.json"
    redo = study_dir / "cells" / "ddpm" / "seed7-fold1" / "cell.json"
    before = kept.stat().st_mtime_ns
    old = json.loads(redo.read_text())
    redo.unlink()  # as if the study had been killed during this cell's evaluation
    run_study(str(TINY), output_dir=str(out), resume=str(study_dir))
    assert kept.stat().st_mtime_ns == before
    new = json.loads(redo.read_text())
    # The federation had finished: only the evaluation ran again, on the same release.
    assert new["release"]["fid"] == pytest.approx(old["release"]["fid"])
