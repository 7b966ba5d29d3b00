"""Metric functions on cases with known answers."""

import pytest
import torch

from common.config import FUPWeights
from common.metrics.attacks import attack_metrics, nearest_neighbour_report, nn_distances
from common.metrics.fidelity import RandomConvNetFeatures, extract, fid_kid, msssim_diversity
from common.metrics.fup import fidelity_score, fup_score, privacy_score, utility_score
from common.metrics.utility import score_classifier

G = torch.Generator().manual_seed(0)


def test_fid_of_gaussians_matches_closed_form():
    # FID between N(0, I) and N(mu, I) is |mu|^2.
    a = torch.randn(4000, 4, generator=G).double()
    b = torch.randn(4000, 4, generator=G).double() + torch.tensor([1.0, 0, 0, 1.0]).double()
    out = fid_kid(a, b)
    assert out["fid"] == pytest.approx(2.0, abs=0.15)
    assert fid_kid(a, a)["fid"] == pytest.approx(0.0, abs=1e-6)
    assert out["kid"] > 10 * abs(fid_kid(a[:2000], a[2000:])["kid"])


def test_random_convnet_features_are_fixed_and_separate_noise_from_images():
    f1, f2 = RandomConvNetFeatures(seed=0), RandomConvNetFeatures(seed=0)
    x = torch.rand(8, 1, 32, 32, generator=G)
    assert torch.equal(f1(x), f2(x)) and f1(x).shape == (8, f1.num_features)
    smooth = torch.linspace(0, 1, 32).expand(200, 1, 32, 32) * torch.rand(200, 1, 1, 1, generator=G)
    smooth2 = torch.linspace(0, 1, 32).expand(200, 1, 32, 32) * torch.rand(200, 1, 1, 1, generator=G)
    noise = torch.rand(200, 1, 32, 32, generator=G)
    same = fid_kid(extract(f1, smooth), extract(f1, smooth2))["fid"]
    other = fid_kid(extract(f1, smooth), extract(f1, noise))["fid"]
    assert other > 5 * same


def test_msssim_diversity_is_one_for_copies_and_lower_for_distinct_images():
    img = torch.rand(1, 1, 32, 32, generator=G)
    copies = img.repeat(20, 1, 1, 1)
    labels = torch.zeros(20, dtype=torch.long)
    assert msssim_diversity(copies, labels, 30, seed=0) == pytest.approx(1.0, abs=1e-4)
    assert msssim_diversity(torch.rand(20, 1, 32, 32, generator=G), labels, 30, seed=0) < 0.5


def test_attack_metrics_known_answers():
    perfect = attack_metrics(torch.tensor([2.0, 3.0, 4.0]), torch.tensor([-1.0, 0.0, 1.0]))
    assert perfect["auc"] == 1.0 and perfect["tpr_at_1pct_fpr"] == 1.0
    same = torch.randn(5000, generator=G)
    chance = attack_metrics(same[:2500], same[2500:])
    assert chance["auc"] == pytest.approx(0.5, abs=0.03) and chance["tpr_at_1pct_fpr"] < 0.05


def test_nn_distance_and_reid_of_a_copying_generator():
    train = torch.rand(50, 1, 4, 4, generator=G)
    holdout = torch.rand(50, 1, 4, 4, generator=G)
    assert torch.allclose(nn_distances(train[:5], train), torch.zeros(5), atol=1e-3)
    copies = nearest_neighbour_report(train.clone(), train, holdout, quantile=0.01, seed=0)
    assert copies["reid_rate"] == 1.0 and copies["nn_distance_ratio"] < 0.01
    fresh = nearest_neighbour_report(torch.rand(200, 1, 4, 4, generator=G), train, holdout, 0.05, seed=0)
    assert fresh["reid_rate"] < 0.2 and fresh["nn_distance_ratio"] == pytest.approx(1.0, abs=0.15)


class _FixedLogits(torch.nn.Module):
    def __init__(self, p1):
        super().__init__()
        self.p1 = p1

    def forward(self, x):
        p = self.p1[: len(x)]
        return torch.stack([torch.log1p(-p), torch.log(p)], 1)


def test_classifier_scores_known_answers():
    y = torch.tensor([0, 0, 1, 1])
    model = _FixedLogits(torch.tensor([0.1, 0.6, 0.4, 0.9]))
    s = score_classifier(model, torch.zeros(4, 1, 2, 2), y, torch.device("cpu"))
    assert s["auc"] == pytest.approx(0.75)
    assert s["accuracy"] == 0.5 and s["sensitivity"] == 0.5 and s["specificity"] == 0.5


def test_fup_pillars_known_answers():
    assert fidelity_score(1.0, 1.0, 10.0) == pytest.approx(100)
    assert fidelity_score(10.0, 1.0, 10.0) == pytest.approx(0)
    assert fidelity_score(10 ** 0.5, 1.0, 10.0) == pytest.approx(50)
    assert utility_score([0.75, 0.5], [1.0, 1.0]) == pytest.approx(25)
    assert privacy_score(0.5, 0.01, 0.01) == pytest.approx(100)
    assert privacy_score(1.0, 0.0, 0.01) == pytest.approx(0)
    assert privacy_score(0.55, 0.5, 0.0) == pytest.approx(50)
    assert fup_score(90, 60, 30, FUPWeights()) == pytest.approx(60)
    assert fup_score(90, 60, 30, FUPWeights(fidelity=0, utility=0, privacy=2)) == pytest.approx(30)


class _FakeInception(torch.nn.Module):
    """Same call signature as inception-2015-12-05.pt: uint8 NCHW in, 2048-d features out."""

    def forward(self, x: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        return x.float().mean(dim=(1, 2, 3), keepdim=False)[:, None].repeat(1, 2048)


def test_inception_extractor_loads_torchscript_from_a_local_path(tmp_path):
    from common.config import FidelityConfig
    from common.metrics.fidelity import build_extractor

    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(_FakeInception()).save(str(path))
    net, info = build_extractor(FidelityConfig(extractor="inception", inception_path=str(path)))
    feats = extract(net, torch.full((3, 1, 32, 32), 0.5))
    assert feats.shape == (3, 2048) and info["dims"] == 2048
    assert torch.allclose(feats, torch.full_like(feats, 128.0))


def test_inception_extractor_missing_weights_is_a_clear_error(tmp_path):
    from common.config import FidelityConfig
    from common.metrics.fidelity import build_extractor

    with pytest.raises(FileNotFoundError, match="inception_path"):
        build_extractor(FidelityConfig(extractor="inception", inception_path=str(tmp_path / "none.pt")))
