"""A public prior, then DP fine-tuning of few parameters, then synthetic data used two ways."""

import dataclasses

import numpy as np
import pytest
import torch

from common.config import ConfigError, load_run

from .conftest import TINY

PRIOR = {"public_prior": {"data": "../../sites/public_archive.yaml", "steps": 3, "batch_size": 16}}


@pytest.fixture(scope="module")
def prior_run(shared_data):
    return load_run(TINY, overrides=PRIOR)


def test_the_public_prior_holds_no_image_of_any_site_or_evaluation_set(prior_run):
    from common.data import load_public
    from common.data.partition import content_hashes
    from common.data.sites import site_indices

    public = load_public(prior_run)
    assert len(public.y) > 100 and public.removed_overlap >= 0
    _, _, pub_idx = site_indices(prior_run, prior_run.public_prior.data)
    for site in prior_run.sites:
        x, _, idx = site_indices(prior_run, site)
        if site.role == "train":  # the same pool: disjoint shares of the partition
            assert not set(idx.tolist()) & set(pub_idx.tolist()), site.name
        assert not set(content_hashes(x[idx])) & set(public.hashes), site.name  # not one pixel-identical image


def test_site_data_never_enters_pretraining(prior_run, tmp_path, monkeypatch):
    import server.public_prior as prior_module
    from common.data import load_site
    from common.data.partition import content_hashes
    from server.public_prior import public_prior

    seen = []
    real_pretrain = prior_module.pretrain
    monkeypatch.setattr(prior_module, "pretrain", lambda run, data, *a, **k: seen.append(data) or real_pretrain(run, data, *a, **k))
    weights, card = public_prior(prior_run, tmp_path)
    (data,) = seen  # exactly what the non-private steps draw from
    assert card["name"] == "public_archive" and card["data_sha256"] == data.sha256 and card["images"] == len(data.y)
    # Not one pretraining image equals any image a site trains on or holds out (after its own profile).
    pretrain_images = set(content_hashes(data.x.numpy()))
    for site in prior_run.sites:
        d = load_site(prior_run, site)
        site_images = set(content_hashes(torch.cat([d.train_x, d.holdout_x]).numpy()))
        assert not pretrain_images & site_images, site.name
    again, card2 = public_prior(prior_run, tmp_path)  # read from the cache, same model, no new pretraining
    assert len(seen) == 1 and card2["model_sha256"] == card["model_sha256"]
    assert all(torch.equal(weights[k], again[k]) for k in weights)


def test_a_public_prior_that_overlaps_the_sites_pool_is_refused(shared_data, tmp_path):
    from common.data import DataError, load_public

    for splits in ("[val]", "[val, train]"):  # a subset, or the same images in another order
        bad = tmp_path / "public.yaml"
        bad.write_text(f"name: leaky\nrole: public\nsource: {{kind: medmnist, splits: {splits}}}\n")
        run = load_run(TINY, overrides={"public_prior": {"data": str(bad)}})
        with pytest.raises(DataError, match=r"public\.yaml: source\.splits .* overlap the sites' pool"):
            load_public(run)
    hospital = load_run(TINY).sites[0]
    with pytest.raises(ConfigError, match="must be a site with role 'public'"):
        load_run(TINY, overrides={"public_prior": {"data": hospital.origin}})
    with pytest.raises(ConfigError, match="must be a site with role 'public'"):  # inline, not from a file
        load_run(TINY, overrides={"public_prior": {"data": {"name": "x", "role": "train", "privacy": {"epsilon": 1.0}}}})


def _changed(before: dict, after: dict) -> set[str]:
    return {k for k in before if not torch.equal(before[k], after[k])}


def test_dp_fine_tuning_moves_only_the_chosen_parameters(prior_run, tmp_path):
    from client.trainer import train_round
    from common.data import load_site
    from common.models.generators import build_generator

    site = prior_run.training_sites[0]
    data = load_site(prior_run, site)
    run = dataclasses.replace(prior_run, training=dataclasses.replace(prior_run.training, trainable=["norms"], local_steps=2))
    start = build_generator(run.model).state_dict()
    res = train_round(run, site, data, start, 1, tmp_path, torch.device("cpu"))
    changed = _changed(start, res.weights)
    assert changed and all(".norm" in k or k.startswith("unet.out.0") for k in changed), sorted(changed)
    assert res.local["trained_parameters"] < 0.02 * sum(v.numel() for v in start.values())


def test_low_rank_adapters_start_as_the_prior_and_train_alone(prior_run, tmp_path):
    from client.trainer import train_round
    from common.data import load_site
    from common.models.generators import build_generator

    model = dataclasses.replace(prior_run.model, adapter_rank=2)
    run = dataclasses.replace(prior_run, model=model, training=dataclasses.replace(prior_run.training, trainable=["adapters"], local_steps=2))
    plain, adapted = build_generator(prior_run.model), build_generator(model)
    state = plain.state_dict()
    # The same prior in both: each wrapped convolution's base takes the plain model's weights.
    adapted.load_state_dict({k: state[k.replace(".conv.base.", ".conv.")] if ".conv.base." in k else v for k, v in adapted.state_dict().items()})
    x, t, y = torch.rand(4, 1, 32, 32), torch.tensor([1, 50, 300, 900]), torch.tensor([0, 1, 0, 1])
    with torch.no_grad():
        assert torch.allclose(plain.modules["unet"](x, t, class_labels=y), adapted.modules["unet"](x, t, class_labels=y), atol=1e-6)
    site = run.training_sites[0]
    start = adapted.state_dict()
    res = train_round(run, site, load_site(run, site), start, 1, tmp_path, torch.device("cpu"))
    changed = _changed(start, res.weights)
    assert changed and all(k.endswith((".down.weight", ".up.weight")) for k in changed), sorted(changed)


def test_an_unknown_trainable_group_names_the_field(prior_run):
    from common.models.finetune import select_trainable
    from common.models.generators import build_generator

    with pytest.raises(ValueError, match="training.trainable: 'attention_heads' selects no parameter"):
        select_trainable(build_generator(prior_run.model).modules["unet"], ["attention_heads"])
    # Refused when the config is read, naming the file, not by every site at its first round.
    with pytest.raises(ConfigError, match=r"tiny\.yaml: training\.trainable: 'norms' selects no parameter .*\(vae\)"):
        load_run(TINY, overrides={"model": {"name": "vae"}, "training": {"trainable": ["norms", "class_embedding"]}})


def test_every_downstream_mode_takes_the_real_only_number_of_real_steps(monkeypatch):
    import common.metrics.utility as utility
    from common.config import ClassifierConfig

    calls = []
    real = utility.train_classifier
    monkeypatch.setattr(utility, "train_classifier", lambda cfg, x, y, *a, **k: calls.append((len(x), a[4] if len(a) > 4 else k.get("steps"))) or real(cfg, x, y, *a, **k))
    cfg = ClassifierConfig(epochs=2, batch_size=16, channels=[4, 8])
    rx, ry = torch.rand(40, 1, 16, 16), torch.arange(40) % 2
    sx, sy = torch.rand(100, 1, 16, 16), torch.arange(100) % 2
    steps = utility.real_steps(cfg, 40)
    assert steps == 6
    _, n = utility.train_with_synthetic("mix", 0.5, cfg, (rx, ry), (sx, sy), 16, 2, 0, torch.device("cpu"))
    assert n == 20 and calls[-1] == (60, steps)  # 40 real + 20 synthetic images, real-only's steps
    utility.train_with_synthetic("pretrain_finetune", 2.0, cfg, (rx, ry), (sx, sy), 16, 2, 0, torch.device("cpu"))
    assert calls[-2] == (80, utility.real_steps(cfg, 80)) and calls[-1] == (40, steps)  # synthetic first, then real


def test_the_demo_declares_its_public_prior_and_fine_tunes_few_parameters(demo_run):
    assert demo_run.public_prior is not None and demo_run.public_prior.data.role == "public"
    assert "same source" in demo_run.public_prior.data.description
    assert "all" not in demo_run.training.trainable
    assert np.all([s.privacy.epsilon <= 8 for s in demo_run.training_sites])
