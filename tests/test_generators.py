"""Every generator behind one interface, trained federated-style with or without Opacus DP."""

import dataclasses

import pytest
import torch

from client.trainer import train_round
from common.config import ModelConfig
from common.data import SiteData
from common.models.generators import REGISTRY, build_generator


def _site() -> SiteData:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(48, 1, 32, 32, generator=g)
    y = torch.arange(48) % 2
    return SiteData("hospital_a", x, y, x[:8], y[:8])


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_interface_round_trips_state_and_samples(name):
    cfg = ModelConfig(name=name, channels=[8, 16, 16], norm_num_groups=4, latent_size=8)
    a, b = build_generator(cfg), build_generator(cfg)
    b.load_state_dict(a.state_dict())
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    labels = torch.tensor([0, 1, 1])
    x = a.sample(labels, seed=1, steps=2, batch_size=2, device="cpu", progress=False)
    assert x.shape == (3, 1, 32, 32) and 0 <= x.min() and x.max() <= 1
    assert torch.equal(x, b.sample(labels, seed=1, steps=2, batch_size=2, device="cpu", progress=False))
    scores = a.membership_scores(x, labels, seed=0, device="cpu")
    assert scores.shape == (3,) and torch.isfinite(scores).all()


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_each_generator_trains_under_opacus_and_spends_budget(name, tiny_run, tmp_path):
    run = dataclasses.replace(tiny_run, model=dataclasses.replace(tiny_run.model, name=name, latent_size=8),
                              training=dataclasses.replace(tiny_run.training, trainable=["all"]))
    site = run.training_sites[0]
    gen = build_generator(run.model)
    before = gen.state_dict()
    res = train_round(run, site, _site(), before, 1, tmp_path, torch.device("cpu"))
    assert 0 < res.metrics["epsilon"] <= site.privacy.epsilon
    changed = [k for k in before if before[k].is_floating_point() and not torch.equal(before[k], res.weights[k])]
    private = gen.private
    assert any(k.startswith(private + ".") for k in changed)  # the DP-trained module moved
    if name == "gan":
        assert any(k.startswith("generator.") for k in changed)  # learned from the DP discriminator


@pytest.mark.parametrize("choice", [{"noise_multiplicity": 3}, {"batch_size": 32, "max_physical_batch_size": 8}])
def test_dp_training_choices_keep_the_accounting(choice, tiny_run, tmp_path):
    """Noise multiplicity and virtual steps change the gradient, never the privacy accounting."""
    run = dataclasses.replace(tiny_run, training=dataclasses.replace(tiny_run.training, **choice))
    site = run.training_sites[0]
    weights = build_generator(run.model).state_dict()
    res = train_round(run, site, _site(), weights, 1, tmp_path / "a", torch.device("cpu"))
    plain = dataclasses.replace(tiny_run, training=dataclasses.replace(tiny_run.training, batch_size=run.training.batch_size))
    ref = train_round(plain, site, _site(), weights, 1, tmp_path / "b", torch.device("cpu"))
    assert res.metrics["epsilon"] == pytest.approx(ref.metrics["epsilon"])
    assert res.local["steps"] == run.training.local_steps
    assert any(not torch.equal(weights[k], res.weights[k]) for k in weights if weights[k].is_floating_point())


def test_classifier_free_guidance_trains_a_null_class_and_changes_samples():
    cfg = ModelConfig(channels=[8, 16, 16], norm_num_groups=4, label_dropout=0.2)
    gen = build_generator(cfg)
    opts = gen.optimizers(1e-2)
    x, y = torch.rand(16, 1, 32, 32), torch.arange(16) % 2
    for _ in range(10):  # past MONAI's zero-initialised output layer
        gen.train_step(gen.modules["unet"], opts, x, y)
    guided = build_generator(dataclasses.replace(cfg, guidance_scale=2.0))
    guided.load_state_dict(gen.state_dict())
    labels = torch.tensor([0, 1])
    plain = gen.sample(labels, seed=0, steps=3, batch_size=2, device="cpu", progress=False)
    assert not torch.allclose(plain, guided.sample(labels, seed=0, steps=3, batch_size=2, device="cpu", progress=False))
