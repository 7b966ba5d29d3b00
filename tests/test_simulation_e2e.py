"""End to end: a real Flower simulation (2 sites, 2 rounds, a few DP steps) to both reports."""

import json
import math

import pytest


from .conftest import TINY


def _numbers(obj, path=""):
    if isinstance(obj, bool):
        return
    if isinstance(obj, (int, float)):
        yield path, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{path}[{i}]")


@pytest.fixture(scope="module")
def finished_run(tiny_finished_run):
    return tiny_finished_run, json.loads((tiny_finished_run / "report.json").read_text())


def test_every_report_figure_exists_and_is_finite(finished_run):
    _, report = finished_run
    h = report["headline"]
    for key in ("fid", "coverage", "auc_gain_internal", "auc_gain_external", "mi_auc_max", "reid_rate", "dcr_share_closer_to_train",
                "dcr_p_value", "domias_auc", "fidelity_F", "utility_U", "privacy_P", "fup"):
        assert math.isfinite(h[key]), key
    for block in ("fidelity", "utility", "privacy", "fup", "headline"):
        for path, value in _numbers(report[block], block):
            assert math.isfinite(value), path
    sites = report["privacy"]["sites"]
    assert set(sites) == {"hospital_a", "hospital_c"}
    for s in sites.values():
        for key in ("mi_auc", "mi_auc_ci95", "mi_tpr_at_1pct_fpr"):
            assert key in s
        assert s["mi_members"] == 60 and s["mi_nonmembers"] <= 60  # attack.max_images in tiny.yaml
    rel = report["privacy"]["release"]  # the release against the pooled training set
    assert rel["dcr_images"] == 120 and rel["dcr_permutations"] == 500 and "exact_duplicates" in rel
    assert report["fidelity"]["extractor"]["name"].startswith("domain") and report["fidelity"]["extractor"]["trained_on"]["images"] > 0
    u = report["utility"]
    for way in ("synthetic_only", "pooled_real"):
        assert set(u[way]["external"]) == {"external_d"}
    for s in u["sites"].values():
        for way in ("real_only", "hybrid"):
            assert set(s[way]["internal"]) == {"auc", "accuracy", "sensitivity", "specificity"}
    assert 0 <= report["fup"]["fup"] <= 100


def test_no_site_exceeds_its_budget(finished_run):
    _, report = finished_run
    budgets = {"hospital_a": 8.0, "hospital_c": 5.0}
    for name, s in report["privacy"]["sites"].items():
        assert 0 < s["epsilon"] <= budgets[name]
        assert s["rounds_trained"] == 2


def test_release_has_manifest_config_versions_and_html(finished_run):
    run_dir, report = finished_run
    manifest = json.loads((run_dir / "synthetic" / "manifest.json").read_text())
    assert manifest["num_images"] == 120 and sum(manifest["class_counts"]) == 120
    assert set(manifest["sites"]) == {"hospital_a", "hospital_c"} and manifest["rounds"] == 2
    assert len(manifest["model_sha256"]) == 64 and "torch" in manifest["versions"]
    assert report["run"]["config"]["seed"] == 7 and "flwr" in report["run"]["versions"]
    html = (run_dir / "report.html").read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") >= 6  # 2 classes x (real, synthetic) + 2 plots
    assert (run_dir / "checkpoints" / "round_0002.pt").exists()
    # The round-0 model's public data is named with its hash, in the manifest and the report.
    card = manifest["public_prior"]
    assert card["name"] == "public_archive" and len(card["data_sha256"]) == 64 and card["steps"] == 4
    assert report["public_prior"]["data_sha256"] == card["data_sha256"] and card["data_sha256"] in html
    assert manifest["trainable"] == ["norms", "embeddings"]
    assert (run_dir / "samples.png").stat().st_size > 1000  # real beside synthetic, per class
    for s in report["utility"]["sites"].values():  # both downstream modes, each with its gain
        assert {"mix", "pretrain_finetune", "mix_gain_internal", "pretrain_finetune_gain_external"} <= set(s)


def test_release_is_signed_and_verifies(finished_run, signing_key):
    from common.security.signing import verify_release

    run_dir, _ = finished_run
    assert verify_release(run_dir / "synthetic", signing_key.with_suffix(".pub")) == ["DATASHEET.md", "data_card.json", "synthetic.npz"]
    manifest = json.loads((run_dir / "synthetic" / "manifest.json").read_text())
    assert manifest["memorisation_gate"]["passed"] and "override" not in manifest["memorisation_gate"]
    card = json.loads((run_dir / "synthetic" / "data_card.json").read_text())
    assert set(card["sources_by_site"]) == {"hospital_a", "hospital_c"} and card["intended_uses"] and card["out_of_scope_uses"]
    assert not (run_dir / "staging").exists()


def test_library_output_goes_to_the_run_log_and_the_status_says_finished(finished_run):
    run_dir, _ = finished_run
    log = (run_dir / "run.log").read_text(encoding="utf-8", errors="replace")
    assert "[ROUND 2/2]" in log and "nodes sampled to train" in log  # Flower's and the strategy's INFO lines, not on the terminal
    assert json.loads((run_dir / "run_status.json").read_text())["state"] == "finished"


def test_a_paused_or_restarted_run_resumes_from_its_checkpoint(shared_data, tmp_path):
    from common.config import load_run
    from simulations.simulate import new_run_dir, resume, simulate_run

    run = load_run(TINY, overrides={"output_dir": str(tmp_path), "federation": {"stop_after_round": 1}})
    run_dir = new_run_dir(run)
    assert simulate_run(run, run_dir) == {}  # paused after round 1: no release yet
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["round_0001.pt"]
    assert not (run_dir / "synthetic").exists()
    assert json.loads((run_dir / "run_status.json").read_text())["state"] == "paused"

    resume(run_dir)  # a restarted coordinator: continues with round 2, not round 1 again
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["round_0001.pt", "round_0002.pt"]
    history = json.loads((run_dir / "history.json").read_text())
    assert sorted((e["round"], e["site"]) for e in history["train"]) == [
        (1, "hospital_a"), (1, "hospital_c"), (2, "hospital_a"), (2, "hospital_c")]
    client = json.loads((run_dir / "clients" / "hospital_a" / "privacy_ledger.json").read_text())
    assert [r["round"] for r in client["rounds"]] == [1, 2] and client["epsilon_spent"] <= 8.0
    report = json.loads((run_dir / "report.json").read_text())
    assert report["privacy"]["sites"]["hospital_a"]["rounds_trained"] == 2
    assert json.loads((run_dir / "run_status.json").read_text())["state"] == "finished"


def test_report_states_each_sites_guarantee_unit_and_audit(finished_run):
    run_dir, report = finished_run
    for name, s in report["privacy"]["sites"].items():
        assert s["accountant"] == "rdp" and s["delta"] == 1e-5
        assert s["privacy_unit"] == "image" and "no patient ids" in s["privacy_unit_note"]  # MedMNIST
        assert s["max_records_per_unit"] == 1
        assert 0 <= s["epsilon_lower"] <= s["audit"]["epsilon_accounted"] <= s["epsilon_budget"]
        assert s["audit"]["violation"] is False
        assert s["released"][0].startswith("model weights") and any(r.startswith("epsilon:") for r in s["released"])
    manifest = json.loads((run_dir / "synthetic" / "manifest.json").read_text())
    assert {s["privacy_unit"] for s in manifest["sites"].values()} == {"image"}
    assert manifest["class_mix"] == "uniform (public)"
    html = (run_dir / "report.html").read_text(encoding="utf-8")
    assert "epsilon_lower" in html and "privacy_unit" in html
    # What stayed at the sites: losses are in their local logs, never in what the server kept.
    assert "loss" not in (run_dir / "history.json").read_text()
    assert "train_loss" in (run_dir / "clients" / "hospital_a" / "local_log.json").read_text()
