"""The release scores rank known failures, and a bad release cannot game FUP or the gate.

All on the demo federation's real pooled chest X-rays, scored by the same
ReleaseScorer a run uses, with the domain feature extractor trained on the public
partition only. "Releases" here are built from real images by known degradations.
"""

import dataclasses
import json

import numpy as np
import pytest
import torch

from common.config import load_run
from common.data import load_site
from common.evaluation.degradations import CLAIMS, adversarial_releases, degraded_releases
from common.evaluation.gate import ReleaseRefused
from common.evaluation.release import Pool, ReleaseScorer
from common.metrics.fidelity import build_extractor, extract, fidelity_suite
from common.security.signing import verify_release

from .conftest import REPO

G = torch.Generator().manual_seed(1)
EPS, DELTA = 8.0, 1e-5  # the demo's worst site: every adversarial release claims it too


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("scoring")
    run = load_run(REPO / "simulations" / "demo.yaml", overrides={"output_dir": str(out)})
    sites = {s.name: load_site(run, s) for s in run.training_sites + run.external_sites}
    train = [s.name for s in run.training_sites]
    full = Pool.from_sites(sites, train, [s.name for s in run.external_sites])
    # Half the held-out patients stay unseen by the scorer: a release of them is what a
    # perfect private generator would emit (new patients from the same hospitals).
    perm = torch.randperm(len(full.hold_x), generator=G)
    ref, fresh = perm[: len(perm) // 2], perm[len(perm) // 2 :]
    pool = dataclasses.replace(full, hold_x=full.hold_x[ref], hold_y=full.hold_y[ref])
    scorer = ReleaseScorer(run, pool, torch.device("cpu"))
    return run, scorer, (full.hold_x[fresh], full.hold_y[fresh]), out


@pytest.fixture(scope="module")
def degraded(demo):
    _, scorer, _, _ = demo
    p = scorer.pool
    n = len(p.hold_x)
    idx = torch.randperm(len(p.train_x), generator=G)[:n]
    out = {name: scorer.fidelity(x, y) for name, (x, y) in degraded_releases(p.train_x[idx], p.train_y[idx], seed=1).items()}
    # The noise floor: real training images against the held-out images at four draws.
    idx = [torch.randperm(len(scorer.pool.train_x), generator=G)[:n] for _ in range(4)]
    out["real"] = [scorer.fidelity(scorer.pool.train_x[i], scorer.pool.train_y[i]) for i in idx]
    return out


def test_the_extractor_is_the_domain_one_trained_on_public_data_only(demo):
    _, scorer, _, _ = demo
    ex = scorer.extractor
    assert ex["name"].startswith("domain") and not ex["fallback"]
    assert ex["trained_on"]["name"] == "public_archive" and len(ex["weights_sha256"]) == 64
    assert ex["recipe"]["steps"] > 0


def test_every_fidelity_figure_ranks_the_failures_it_claims_well_beyond_the_real_floor(degraded):
    real = degraded["real"]
    for metric, failures in CLAIMS.items():
        floor = np.array([r[metric] for r in real])
        for name in failures:
            value = degraded[name][metric]
            if metric in ("fid", "kid"):  # lower is better: 3x the floor and 4 SDs above it
                assert value > max(3 * abs(floor.mean()), floor.mean() + 4 * floor.std(ddof=1)), (metric, name, value, floor)
            else:  # precision/recall/density/coverage (shares) and the F score (0-100): a clear drop
                margin = max(20 if metric == "score" else 0.1, 4 * floor.std(ddof=1))
                assert value < floor.min() - margin, (metric, name, value, floor)


def test_severity_is_ordered_within_each_family(degraded):
    for metric in ("fid", "kid"):
        assert degraded["blur_1"][metric] < degraded["blur_2"][metric]
        assert degraded["noise_0.05"][metric] < degraded["noise_0.2"][metric]
    assert degraded["noise_0.2"]["precision"] < degraded["noise_0.05"]["precision"]
    assert degraded["blur_2"]["recall"] < degraded["blur_1"]["recall"]
    assert degraded["noise_0.2"]["score"] < degraded["noise_0.05"]["score"]
    assert degraded["blur_2"]["score"] <= degraded["blur_1"]["score"]


def test_the_headline_fidelity_score_is_high_for_real_data_and_a_missing_class_costs_half_its_fid_part(degraded):
    assert min(r["score"] for r in degraded["real"]) > 80  # 100 minus its noise floor
    assert degraded["class_dropped"]["score_parts"]["fid"] <= 50  # the missing class scores 0 of its half
    assert None in degraded["class_dropped"]["per_class"].values()
    assert degraded["uniform_noise"]["score"] < 10
    # Fidelity does not see verbatim copies (they are as good as real): privacy must.
    assert degraded["copies"]["fid"] < 1.5 * max(r["fid"] for r in degraded["real"])


def test_the_random_weight_fallback_cannot_rank_a_dropped_class_which_is_why_it_is_not_the_default(demo):
    run, scorer, _, _ = demo
    fallback = dataclasses.replace(run.evaluation.fidelity, extractor="random-convnet")
    net, info = build_extractor(fallback, run)
    assert info["name"].startswith("random-convnet")
    p = scorer.pool
    n = len(p.hold_x)
    real_idx = torch.randperm(len(p.train_x), generator=G)[:n]
    keep = p.train_y != int(torch.bincount(p.train_y).argmin())
    drop_idx = torch.nonzero(keep).flatten()[torch.randperm(int(keep.sum()), generator=G)[:n]]
    f_hold = extract(net, p.hold_x)
    real = fidelity_suite(f_hold, p.hold_y, extract(net, p.train_x[real_idx]), p.train_y[real_idx], 0)["fid"]
    dropped = fidelity_suite(f_hold, p.hold_y, extract(net, p.train_x[drop_idx]), p.train_y[drop_idx], 0)["fid"]
    assert dropped < 3 * real  # under the margin the domain extractor clears


@pytest.fixture(scope="module")
def scored(demo):
    _, scorer, fresh, _ = demo
    p = scorer.pool
    n = min(1000, len(fresh[0]))
    idx = torch.randperm(len(p.train_x), generator=G)[:n]
    x, y = p.train_x[idx], p.train_y[idx]
    releases = adversarial_releases((x, y), (fresh[0][:n], fresh[1][:n]), seed=1)
    return {name: scorer.score(rx, ry, EPS, DELTA) for name, (rx, ry) in releases.items()}


def test_adversarial_releases_score_below_30_and_below_a_good_release(scored):
    fup = {name: s["fup"]["fup"] for name, s in scored.items()}
    good = fup.pop("good (new patients)")
    for name, value in fup.items():
        assert value < 30, (name, scored[name]["fup"])
        assert value < good, (name, value, good)
    assert good > 50, scored["good (new patients)"]["fup"]


def test_privacy_depends_on_epsilon_and_catches_copies_whatever_epsilon_is_claimed(demo, scored):
    _, scorer, fresh, _ = demo
    for name in ("verbatim copies", "copies with light noise"):
        assert scored[name]["fup"]["privacy_attack"] < 10, scored[name]["release_privacy"]
        assert scored[name]["release_privacy"]["dcr_p_value"] < 0.01
    assert scored["verbatim copies"]["release_privacy"]["exact_duplicates"] > 0.9 * len(fresh[0][:1000])
    # Pure noise leaks nothing: every attack reads chance (its nearest neighbours are hub images).
    assert scored["pure noise"]["fup"]["privacy_attack"] > 90, scored["pure noise"]["release_privacy"]
    good = scored["good (new patients)"]
    assert good["fup"]["privacy_attack"] > 80 and good["release_privacy"]["dcr_p_value"] > 0.01
    # Copies claiming a strong epsilon still score below 30: the guarantee cannot outvote the attacks.
    from common.metrics.fup import fup_score, privacy_score

    c = scored["verbatim copies"]["fup"]
    assert (c["fidelity"] + c["utility"] + c["privacy"]) / 3 > 30  # an arithmetic mean (the old FUP) would pass copies
    for eps in (0.1, 1.0):
        p = privacy_score(c["privacy_attacks"], eps, DELTA)["privacy"]
        assert fup_score(c["fidelity"], c["utility"], p, demo[0].evaluation.fup_weights) < 30
    strict = scorer.score(fresh[0][:300], fresh[1][:300], 1.0, DELTA)["fup"]
    assert strict["privacy_guarantee"] > 50 > good["fup"]["privacy_guarantee"]


def _stage(run_dir, images, labels):
    staging = run_dir / "staging"
    staging.mkdir(parents=True)
    np.savez_compressed(staging / "synthetic.npz", images=(images.numpy() * 255).round().astype(np.uint8), labels=labels.numpy())
    (staging / "manifest.json").write_text(json.dumps({"num_images": len(labels), "model_sha256": "0" * 64}))


def _report(s, run_dir):
    from common.runtime import sha256_file

    release = {**s["release_privacy"], "release_sha256": sha256_file(run_dir / "staging" / "synthetic.npz")}
    return {"headline": {"fup": s["fup"]["fup"]}, "fup": s["fup"], "privacy": {"release": release, "sites": {}, "epsilon_max": EPS}}


def test_the_gate_refuses_copies_names_the_test_and_records_an_override_in_the_signed_manifest(demo, scored, tmp_path, signing_key):
    from server.export import export_release

    run, scorer, fresh, out = demo
    run = dataclasses.replace(run, output_dir=str(tmp_path))
    copies = tmp_path / "copies-run"
    x = scorer.pool.train_x[:50]
    _stage(copies, x, scorer.pool.train_y[:50])
    copies_report = _report(scored["verbatim copies"], copies)
    with pytest.raises(ReleaseRefused, match=r"dcr \(share_closer_to_train=.*exact_duplicates \(count="):
        export_release(run, copies, copies_report)
    assert not (copies / "synthetic").exists() and not (copies / "staging" / "manifest.sig").exists()
    assert json.loads((copies / "gate.json").read_text())["failed"] == ["dcr", "exact_duplicates", "near_duplicates", "reidentification"]
    # The operator overrides, with a reason: signed, and the manifest and data card say so.
    export_release(run, copies, copies_report, override="teaching set, consented patients")
    files = verify_release(copies / "synthetic", signing_key.with_suffix(".pub"))
    assert set(files) == {"synthetic.npz", "data_card.json", "DATASHEET.md"}
    manifest = json.loads((copies / "synthetic" / "manifest.json").read_text())
    assert manifest["memorisation_gate"]["override"]["reason"] == "teaching set, consented patients"
    assert manifest["memorisation_gate"]["passed"] is False
    card = json.loads((copies / "synthetic" / "data_card.json").read_text())
    assert card["memorisation_gate"]["override"] and card["out_of_scope_uses"] and "sources_by_site" in card
    # A good release passes without any flag.
    good = tmp_path / "good-run"
    _stage(good, fresh[0][:50], fresh[1][:50])
    # A report of another release is refused: the gate's figures must be of the file it signs.
    with pytest.raises(ValueError, match="another release"):
        export_release(run, good, copies_report)
    assert export_release(run, good, _report(scored["good (new patients)"], good))["passed"]
    assert "OVERRIDDEN" not in (good / "synthetic" / "DATASHEET.md").read_text()
