"""The ε a site is told is the ε it gets: one test per defect found in review (issue 9).

Each test replays the defect: the public-seed noise, images counted as people,
GDP's under-reporting, the DP-GAN's doubled sensitivity, private statistics sent
outside the accountant, and a ledger that could be raced, edited or bypassed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from opacus import PrivacyEngine
from torch.utils.data import DataLoader, TensorDataset

from client.client_app import SENT_METRICS, make_client_app
from client.trainer import UnitDataset, train_round
from common.config import ConfigError, load_run
from common.data import SiteData, load_site
from common.data.sites import site_indices
from common.models.generators import build_generator
from common.privacy import AccountantError, BudgetExceeded, LedgerError, PrivacyLedger, calibrate, epsilon_for, reseal
from server.ledger import ServerLedger

from .conftest import TINY

CPU = torch.device("cpu")


def _site_data(n: int = 40, units: list[str] | None = None) -> SiteData:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 1, 32, 32, generator=g)
    y = torch.arange(n) % 2
    return SiteData("hospital_a", x, y, x[:8], y[:8], train_units=units)


def _tiny_yaml() -> str:
    """tests/configs/tiny.yaml with absolute site paths, to edit into a temporary file."""
    return TINY.read_text().replace("../../sites", str(TINY.parents[2] / "sites"))


# ----------------------------------------------------------------- item 1
def test_dp_noise_cannot_be_rederived_from_the_public_seed(tiny_run, tmp_path):
    """Same run seed (the one in config.json and the signed manifest), data and weights: different updates."""
    site, data = tiny_run.training_sites[0], _site_data()
    weights = build_generator(tiny_run.model).state_dict()
    a = train_round(tiny_run, site, data, weights, 1, tmp_path / "a", CPU).weights
    b = train_round(tiny_run, site, data, weights, 1, tmp_path / "b", CPU).weights
    diff = max(float((a[k] - b[k]).abs().max()) for k in a if a[k].is_floating_point())
    assert diff > 1e-4, "the DP noise or sampling was reproduced from the public seed"


# ----------------------------------------------------------------- item 2
def test_the_patient_is_the_unit_of_privacy_not_the_image(tiny_run, tmp_path):
    """A patient with many slices is one row to Poisson sampling and one clipped contribution per step."""
    units = [f"p{i // 10}" for i in range(40)]  # 4 patients x 10 slices
    res = train_round(tiny_run, tiny_run.training_sites[0], _site_data(40, units), build_generator(tiny_run.model).state_dict(),
                      1, tmp_path, CPU)
    assert res.local["privacy_units"] == 4
    assert res.local["sample_rate"] == pytest.approx(min(1.0, tiny_run.training.batch_size / 4))
    data = _site_data(40, units)
    assert data.privacy_unit == "patient" and data.max_records_per_unit == 10
    # A scan whose patient is unknown is its own unit, and the report says "scan", not "patient".
    assert _site_data(40, [*units[:30], *(f"scan-{i}" for i in range(10))]).privacy_unit == "scan"
    dataset = UnitDataset([data.train_x, data.train_y], data.unit_groups())
    assert len(dataset) == 4
    x, _ = dataset[2]
    assert any(torch.equal(x, data.train_x[j]) for j in range(20, 30))  # one of patient 2's own slices
    assert _site_data().privacy_unit == "image"  # no patient ids: each image is its own unit


def test_exact_duplicate_images_are_removed_before_any_split(demo_run):
    digests = []
    for site in demo_run.sites:  # no image twice, within a site or across sites (external included)
        x, _, idx = site_indices(demo_run, site)
        digests += [hashlib.sha256(x[i].tobytes()).hexdigest() for i in idx]
    assert len(set(digests)) == len(digests)
    data = load_site(demo_run, demo_run.training_sites[1])  # hospital_b had 4 held-out copies of its training images
    train = {hashlib.sha256(v.numpy().tobytes()).hexdigest() for v in data.train_x}
    assert not any(hashlib.sha256(v.numpy().tobytes()).hexdigest() in train for v in data.holdout_x)


# ----------------------------------------------------------------- item 3
def test_gdp_cannot_calibrate_or_enforce_a_budget(tmp_path):
    with pytest.raises(AccountantError, match="does not upper-bound"):
        calibrate(8.0, 1e-5, 1300, 64, 25, 4, accountant="gdp")
    with pytest.raises(LedgerError, match="does not upper-bound"):
        PrivacyLedger(tmp_path / "l.json", 8.0, 1e-5, "gdp")
    cfg = tmp_path / "gdp.yaml"
    cfg.write_text(_tiny_yaml().replace("training: {", "training: {accountant: gdp, "))
    with pytest.raises(ConfigError, match="accountant"):
        load_run(cfg)


def test_calibration_with_an_upper_bound_accountant_keeps_every_bound_within_budget():
    """The demo setting where GDP's σ = 0.603 gave PRV ε = 10.2: RDP's σ keeps RDP and PRV ≤ 8."""
    plan = calibrate(8.0, 1e-5, 1300, 64, 25, 4, accountant="rdp")
    history = [(plan.noise_multiplier, plan.sample_rate, 100)]
    assert epsilon_for(history, 1e-5, "rdp") <= 8.0
    assert epsilon_for(history, 1e-5, "prv") <= 8.0


# ----------------------------------------------------------------- item 4
def _discriminator_gradient(run, x, y, noise_seed: int) -> torch.Tensor:
    """The discriminator's summed clipped gradient (noise off), times the expected batch size."""
    torch.manual_seed(noise_seed)  # the same initial networks and the same fake draws on both sides
    gen = build_generator(run.model)
    gen.batch_size = 8
    optimizers = gen.optimizers(1e-3)
    private = gen.private_module()
    loader = DataLoader(TensorDataset(x, y), batch_size=8)
    private, optimizers["discriminator"], _ = PrivacyEngine().make_private(
        module=private, optimizer=optimizers["discriminator"], data_loader=loader, noise_multiplier=0.0, max_grad_norm=1.0,
        poisson_sampling=False, grad_sample_mode="hooks")
    captured = {}
    optimizers["discriminator"].attach_step_hook(
        lambda opt: captured.update(g=torch.cat([p.grad.flatten() for p in opt.params]) * opt.expected_batch_size))
    gen.train_step(private, optimizers, x, y)
    return captured["g"]


def test_dp_gan_discriminator_moves_at_most_C_per_private_record(tiny_run):
    """Removing one private record changes the clipped discriminator gradient by at most C = 1."""
    run = dataclasses.replace(tiny_run, model=dataclasses.replace(tiny_run.model, name="gan", latent_size=8))
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(8, 1, 32, 32, generator=g), torch.tensor([0, 1, 1, 0, 1, 1, 0, 1])
    full = _discriminator_gradient(run, x, y, noise_seed=5)
    for drop in range(3):
        keep = [i for i in range(8) if i != drop]
        without = _discriminator_gradient(run, x[keep], y[keep], noise_seed=5)
        assert float((full - without).norm()) <= 1.0 + 1e-4


def test_dp_gan_fake_rows_never_read_the_private_labels(tiny_run):
    run = dataclasses.replace(tiny_run, model=dataclasses.replace(tiny_run.model, name="gan", latent_size=8))
    gen = build_generator(run.model)
    gen.batch_size = 16
    seen = []
    original = gen.modules["generator"].forward
    gen.modules["generator"].forward = lambda z, y: seen.append(y.clone()) or original(z, y)
    optimizers = gen.optimizers(1e-3)
    for labels in (torch.zeros(5, dtype=torch.long), torch.ones(11, dtype=torch.long)):
        x = torch.rand(len(labels), 1, 32, 32)
        torch.manual_seed(0)
        gen.train_step(gen.private_module(), optimizers, x, labels)
    assert len(seen[0]) == len(seen[1]) == 16 and torch.equal(seen[0], seen[1])


# ----------------------------------------------------------------- item 5
def _message(run, run_dir, kind: str) -> Message:
    content = RecordDict({"arrays": ArrayRecord(build_generator(run.model).state_dict()),
                          "config": ConfigRecord({"server-round": 1, "run-dir": str(run_dir)})})
    return Message(content=content, dst_node_id=1, message_type=kind)


def _sent(app, run, run_dir, kind) -> dict:
    ctx = Context(run_id=1, node_id=1, node_config={"partition-id": 1, "num-partitions": 2}, state=RecordDict(), run_config={})
    out = app(_message(run, run_dir, kind), ctx)
    assert not out.has_error(), out.error
    return {"metrics": dict(out.content["metrics"]), "site": dict(out.content["site"]),
            "arrays": set(out.content["arrays"].keys()) if "arrays" in out.content else set()}


def test_a_declared_unit_count_sets_q_so_epsilon_reveals_no_count(tiny_run, tmp_path):
    site = tiny_run.training_sites[0]
    declared = dataclasses.replace(site, privacy=dataclasses.replace(site.privacy, units=1000))
    weights = build_generator(tiny_run.model).state_dict()
    small = train_round(tiny_run, declared, _site_data(40), weights, 1, tmp_path / "a", CPU)
    large = train_round(tiny_run, declared, _site_data(60), weights, 1, tmp_path / "b", CPU)
    assert small.local["sample_rate"] == large.local["sample_rate"] == tiny_run.training.batch_size / 1000
    assert small.metrics == large.metrics  # everything sent besides the weights is the same


def test_a_site_sends_nothing_computed_from_its_images_outside_the_accountant(tiny_run, tmp_path, monkeypatch, task_identity):
    """Every key a client sends is listed with its reason; changing the site's images (same count)
    changes no value it sends except the DP-SGD weights."""
    app = make_client_app(lambda _ctx: tiny_run)
    sent = {kind: _sent(app, tiny_run, tmp_path / "a", kind) for kind in (MessageType.TRAIN, MessageType.EVALUATE)}
    for kind, out in sent.items():
        assert set(out["metrics"]) <= set(SENT_METRICS), (kind, set(out["metrics"]) - set(SENT_METRICS))
        assert set(out["site"]) <= {"site", "reason", "privacy-unit"}
    assert sent[MessageType.TRAIN]["arrays"] == set(build_generator(tiny_run.model).state_dict())
    assert not any(k.startswith("label") or "loss" in k or "examples" in k for out in sent.values() for k in out["metrics"])

    import client.client_app as client_app

    real_loader = client_app.load_site_data

    def other_images(run, site):  # the same number of images, other pixels and labels
        data = real_loader(run, site)
        return dataclasses.replace(data, train_x=data.train_x.flip(-1), holdout_x=data.holdout_x.flip(-2),
                                   train_y=1 - data.train_y, holdout_y=1 - data.holdout_y)

    monkeypatch.setattr(client_app, "load_site_data", other_images)
    again = {kind: _sent(app, tiny_run, tmp_path / "b", kind) for kind in (MessageType.TRAIN, MessageType.EVALUATE)}
    for kind in sent:
        assert again[kind]["metrics"] == sent[kind]["metrics"] and again[kind]["site"] == sent[kind]["site"]


# ----------------------------------------------------------------- item 6
def _spend_until_refused(path: str, out: multiprocessing.Queue) -> None:
    ledger = PrivacyLedger(path, 1.5, 1e-5)
    trained = 0
    while True:
        try:
            with ledger.session():
                ledger.reserve(trained + 1, 3.0, 0.1, 20)
                trained += 1
                ledger.commit(trained)
        except BudgetExceeded:
            break
    out.put(trained)


def test_two_runs_sharing_a_ledger_never_train_past_its_budget(tmp_path):
    path = str(tmp_path / "privacy_ledger.json")
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    workers = [ctx.Process(target=_spend_until_refused, args=(path, out)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    trained = out.get(timeout=5) + out.get(timeout=5)
    ledger = PrivacyLedger(path, 1.5, 1e-5)
    # Four such rounds fit a budget of 1.5 (epsilon 1.36), a fifth would not (1.53): together, the
    # two runs trained exactly four, and the ledger holds every one of them.
    assert trained == len(ledger.history) == 4
    assert ledger.spent <= 1.5


def _open_and_spend_once(path: str, out: multiprocessing.Queue) -> None:
    try:
        ledger = PrivacyLedger(path, 1.5, 1e-5)
        with ledger.session():
            ledger.reserve(1, 3.0, 0.1, 20)
            ledger.commit(1)
        out.put("ok")
    except Exception as exc:  # noqa: BLE001 - the test reports what a run would have seen
        out.put(repr(exc))


def test_runs_opening_a_fresh_ledger_together_never_mistake_the_first_write_for_a_deletion(tmp_path):
    """The first write creates the key just before the ledger; a run opening the ledger in between
    must wait for the writer instead of refusing with 'the ledger was deleted'."""
    ctx = multiprocessing.get_context("fork")
    seen = []
    for attempt in range(15):
        out = ctx.Queue()
        path = str(tmp_path / str(attempt) / "privacy_ledger.json")
        (tmp_path / str(attempt)).mkdir()
        workers = [ctx.Process(target=_open_and_spend_once, args=(path, out)) for _ in range(4)]  # four rounds fit the budget
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=60)
        seen += [out.get(timeout=5) for _ in workers]
    assert seen == ["ok"] * len(seen), sorted(set(seen))


def test_an_edited_or_deleted_ledger_is_detected_and_the_site_refuses(tiny_run, tmp_path):
    site, data = tiny_run.training_sites[0], _site_data()
    weights = build_generator(tiny_run.model).state_dict()
    train_round(tiny_run, site, data, weights, 1, tmp_path, CPU)
    path = tmp_path / "privacy_ledger.json"
    honest = path.read_text()

    doc = json.loads(honest)
    doc["history"][0][0] *= 10  # pretend far more noise was added: ε would drop
    path.write_text(json.dumps(doc))
    with pytest.raises(LedgerError, match="integrity check") as refused:
        train_round(tiny_run, site, data, weights, 2, tmp_path, CPU)
    assert "\n" not in str(refused.value)

    path.unlink()  # deleting it must not reset the budget
    with pytest.raises(LedgerError, match="deleted"):
        train_round(tiny_run, site, data, weights, 2, tmp_path, CPU)

    path.write_text("{not json")
    with pytest.raises(LedgerError, match="unreadable"):
        train_round(tiny_run, site, data, weights, 2, tmp_path, CPU)

    path.write_text(honest)  # the operator restores the backup: training goes on
    assert train_round(tiny_run, site, data, weights, 2, tmp_path, CPU).metrics["epsilon"] <= site.privacy.epsilon
    doc = json.loads(path.read_text())
    doc["epsilon_budget"] = 100.0
    path.write_text(json.dumps(doc))
    with pytest.raises(LedgerError):
        PrivacyLedger(path, site.privacy.epsilon, site.privacy.delta)
    event = reseal(path, "reviewed by the privacy officer", epsilon_budget=site.privacy.epsilon)  # explicit, recorded
    assert event["reason"] == "reviewed by the privacy officer"
    assert json.loads(path.read_text())["events"][-1]["event"] == "operator_reseal"
    PrivacyLedger(path, site.privacy.epsilon, site.privacy.delta)  # verifies again
    # A budget or delta changed in the site's YAML does not apply itself: only a recorded reseal can.
    for budget, delta in ((2 * site.privacy.epsilon, site.privacy.delta), (site.privacy.epsilon, 1e-3)):
        with pytest.raises(LedgerError, match="reseal"):
            PrivacyLedger(path, budget, delta)
    # Deleting the ledger *and* its key does not reset the budget while the site's log shows DP rounds.
    path.unlink()
    path.with_suffix(".key").unlink()
    with pytest.raises(LedgerError, match="local log shows DP rounds"):
        train_round(tiny_run, site, data, weights, 1, tmp_path, CPU)


def test_a_round_is_counted_before_its_first_step(tiny_run, tmp_path, monkeypatch):
    """A crash mid-round leaves the round's steps in the ledger: what ran is never forgotten."""
    from common.models.generators.ddpm import DDPM

    def crash(*_args, **_kwargs):
        raise RuntimeError("power cut")

    monkeypatch.setattr(DDPM, "train_step", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        train_round(tiny_run, tiny_run.training_sites[0], _site_data(), build_generator(tiny_run.model).state_dict(), 1, tmp_path, CPU)
    ledger = PrivacyLedger(tmp_path / "privacy_ledger.json", 8.0, 1e-5)
    assert ledger.spent > 0 and ledger.rounds[0]["status"] == "reserved"


def test_a_new_run_calibrates_against_the_budget_that_remains(tiny_run, tmp_path):
    site = tiny_run.training_sites[0]
    earlier = PrivacyLedger(tmp_path / "privacy_ledger.json", site.privacy.epsilon, site.privacy.delta)
    with earlier.session():
        earlier.reserve(1, 2.0, 0.5, 10)  # an earlier run spent part of the budget
    already = earlier.spent
    assert 1.0 < already < site.privacy.epsilon
    weights = build_generator(tiny_run.model).state_dict()
    for r in range(1, tiny_run.training.rounds + 1):  # both planned rounds still train
        res = train_round(tiny_run, site, _site_data(), weights, r, tmp_path, CPU)
        weights = res.weights
    assert already < res.metrics["epsilon"] <= site.privacy.epsilon


@pytest.mark.parametrize("field, value, message", [
    ("privacy", "{epsilon: .inf}", "privacy.epsilon"),
    ("privacy", "{epsilon: 8.0, delta: .nan}", "privacy.delta"),
    ("privacy", "{epsilon: 1000}", "privacy.epsilon"),
])
def test_budgets_must_be_finite_and_bounded(tmp_path, field, value, message):
    from common.config import load_site

    path = tmp_path / "site.yaml"
    path.write_text(f"name: s\nrole: train\n{field}: {value}\n")
    with pytest.raises(ConfigError, match=message):
        load_site(path)


def test_run_length_must_be_bounded(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(_tiny_yaml().replace("training: {rounds: 2,", "training: {rounds: 1000000000,"))
    with pytest.raises(ConfigError, match="training.rounds"):
        load_run(path)


def test_the_server_withholds_the_release_when_a_sites_reports_do_not_add_up(tmp_path):
    ledger = ServerLedger(tmp_path / "l.json")
    base = {"epsilon-budget": 8.0, "delta": 1e-5}
    ledger.record("a", 1, {"epsilon": 3.0, **base})
    ledger.record("a", 2, {"epsilon": 5.0, **base})
    assert ledger.anomalies() == {}
    ledger.record("b", 1, {"epsilon": 3.0, **base})
    ledger.record("b", 2, {"epsilon": 1.0, **base})  # ε went down
    ledger.record("a", 3, {"epsilon": 5.5, "epsilon-budget": 80.0, "delta": 1e-5})  # budget changed
    ledger.record("c", 1, {"epsilon": 3.0, **base}, privacy_unit="patient")
    ledger.record("c", 2, {"declined": 1}, "ledger unreadable", privacy_unit="image")  # ε gone, unit changed
    found = ledger.anomalies()
    assert "epsilon went down" in found["b"][0] and "epsilon_budget changed" in found["a"][0]
    assert "stopped reporting" in found["c"][0] and "privacy unit changed" in found["c"][0]
    assert ServerLedger(tmp_path / "l.json").anomalies() == found  # survives a restart


def test_a_site_refuses_rounds_past_the_run_plan_and_says_why_in_one_line(tiny_run, tmp_path):
    with pytest.raises(BudgetExceeded) as refused:
        train_round(tiny_run, tiny_run.training_sites[0], _site_data(), build_generator(tiny_run.model).state_dict(), 3, tmp_path, CPU)
    assert "\n" not in str(refused.value) and not (tmp_path / "privacy_ledger.json").exists()


def test_ledger_files_are_private_to_the_site(tiny_run, tmp_path):
    train_round(tiny_run, tiny_run.training_sites[0], _site_data(), build_generator(tiny_run.model).state_dict(), 1, tmp_path, CPU)
    for name in ("privacy_ledger.json", "privacy_ledger.key"):
        assert os.stat(tmp_path / name).st_mode & 0o077 == 0, name
    assert np.isfinite(PrivacyLedger(tmp_path / "privacy_ledger.json", 8.0, 1e-5).spent)


@pytest.mark.parametrize("virtual", [False, True])
def test_an_empty_poisson_batch_still_adds_noise_and_counts_as_a_step(tiny_run, tmp_path, virtual):
    """A step that samples nobody must look like any other step: noise, an update, one accounted step."""
    training = dataclasses.replace(tiny_run.training, max_physical_batch_size=8 if virtual else None)
    run = dataclasses.replace(tiny_run, training=training)
    site = dataclasses.replace(tiny_run.training_sites[0],
                               privacy=dataclasses.replace(tiny_run.training_sites[0].privacy, units=10**9))  # q ~ 3e-8
    weights = build_generator(run.model).state_dict()
    res = train_round(run, site, _site_data(), weights, 1, tmp_path, CPU)
    moved = [k for k in weights if weights[k].is_floating_point() and not torch.equal(weights[k], res.weights[k])]
    assert moved and res.local["train_loss"] == 0.0  # no image was drawn, yet the weights carry noise
    assert PrivacyLedger(tmp_path / "privacy_ledger.json", 8.0, 1e-5).history[0][2] == run.training.local_steps
