"""Metric functions on cases with known answers."""

import pytest
import torch

from common.config import FUPWeights
from common.metrics.attacks import attack_metrics, nn_distances, release_privacy
from common.metrics.fidelity import RandomConvNetFeatures, extract, fid_kid, msssim_diversity
from common.metrics.fup import attack_scores, fidelity_score, fup_score, membership_advantage_bound, privacy_score, utility_score
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


def test_attack_metrics_bootstrap_interval_covers_the_auc_and_reports_its_sample():
    m, n = torch.randn(400, generator=G) + 0.5, torch.randn(300, generator=G)
    out = attack_metrics(m, n, resamples=300)
    lo, hi = out["auc_ci95"]
    assert lo < out["auc"] < hi and hi - lo < 0.15
    assert (out["members"], out["nonmembers"], out["false_positives_at_1pct_fpr"]) == (400, 300, 3)


def test_dcr_reid_and_duplicates_catch_a_copying_generator_but_not_fresh_images():
    train = torch.rand(300, 1, 4, 4, generator=G)
    holdout = torch.rand(300, 1, 4, 4, generator=G)
    assert torch.allclose(nn_distances(train[:5], train), torch.zeros(5), atol=1e-3)
    copies = release_privacy(train[:200].clone(), train, holdout, quantile=0.01, seed=0, permutations=100)
    assert copies["reid_rate"] == 1.0 and copies["exact_duplicates"] == 200 and copies["near_duplicate_share"] == 1.0
    assert copies["dcr_share_full"] == 1.0 and copies["dcr_p_value"] < 0.02 and copies["dcr_excess"] > 0.7
    fresh = release_privacy(torch.rand(200, 1, 4, 4, generator=G), train, holdout, 0.05, seed=0, permutations=100)
    assert fresh["reid_rate"] < 0.2 and fresh["exact_duplicates"] == 0 and fresh["dcr_excess"] < 0.05
    assert fresh["dcr_share_closer_to_train"] == pytest.approx(0.5, abs=0.1) and fresh["dcr_p_value"] > 0.01


def test_dcr_permutation_test_is_not_fooled_by_a_hub_image():
    # One flat grey image is every noise query's nearest neighbour: the binomial test then
    # "sees" all 200 queries closer to training; the permutation test does not.
    train = torch.rand(100, 1, 8, 8, generator=G).round()
    holdout = torch.rand(100, 1, 8, 8, generator=G).round()
    train[0] = 0.5
    noise = 0.5 + 0.05 * torch.randn(200, 1, 8, 8, generator=G)
    out = release_privacy(noise, train, holdout, 0.01, seed=0, permutations=200)
    assert out["dcr_share_closer_to_train"] == 1.0 and out["dcr_binomial_p"] < 1e-10 and out["dcr_share_full"] == 1.0
    assert out["dcr_p_value"] > 0.05 and out["dcr_excess"] == 0.0


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


def test_three_class_scores_are_macro_one_vs_rest():
    from sklearn.metrics import balanced_accuracy_score, roc_auc_score

    y = torch.randint(0, 3, (300,), generator=G)
    logits = torch.randn(300, 3, generator=G) + 1.5 * torch.nn.functional.one_hot(y, 3)
    probs = torch.softmax(logits, 1)

    class Fixed(torch.nn.Module):
        def forward(self, x):
            return logits[: len(x)]

    s = score_classifier(Fixed(), torch.zeros(300, 1, 2, 2), y, torch.device("cpu"))
    # Independently: scikit-learn's macro one-vs-rest AUC and balanced accuracy.
    assert s["auc"] == pytest.approx(roc_auc_score(y.numpy(), probs.numpy(), multi_class="ovr", average="macro"), abs=1e-4)
    assert s["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y.numpy(), probs.argmax(1).numpy()), abs=1e-4)


def test_a_three_class_classifier_trains_and_beats_chance():
    from common.config import ClassifierConfig
    from common.metrics.utility import train_classifier

    y = torch.arange(3).repeat(100)
    x = torch.rand(300, 1, 16, 16, generator=G) * 0.3
    for c in range(3):  # each class a bright band in a different place
        x[y == c, :, 5 * c : 5 * c + 5, :] += 0.6
    model = train_classifier(ClassifierConfig(epochs=3, batch_size=32, channels=[8, 16]), x, y, 16, 3, 0, torch.device("cpu"))
    assert score_classifier(model, x, y, torch.device("cpu"))["auc"] > 0.9


def test_fup_pillars_known_answers():
    assert fidelity_score(1.0, 1.0, 10.0) == pytest.approx(100)
    assert fidelity_score(10.0, 1.0, 10.0) == pytest.approx(0)
    assert fidelity_score(10 ** 0.5, 1.0, 10.0) == pytest.approx(50)
    assert utility_score([0.75, 0.5], [1.0, 1.0]) == pytest.approx(25)
    # P: half the weakest attack's score, half the (eps, delta) guarantee.
    clean = attack_scores(dcr_excess=0.0, reid_rate=0.01, reid_quantile=0.01, domias_auc=0.5)
    assert clean == {"dcr": 100, "reid": 100, "domias": 100}
    assert attack_scores(1.0, 0.01, 0.01, 0.5)["dcr"] == 0 and attack_scores(0.0, 1.0, 0.01, 0.5)["reid"] == 0
    assert privacy_score(clean, epsilon=0.0, delta=0.0)["privacy"] == pytest.approx(100)
    assert privacy_score(clean, epsilon=None, delta=None)["privacy"] == pytest.approx(50)  # no DP: no guarantee
    # A strong epsilon cannot lift P above what the attacks show (copies claiming eps = 0.1).
    assert privacy_score({**clean, "dcr": 0.0}, epsilon=0.1, delta=1e-5)["privacy"] == 0
    assert privacy_score({**clean, "domias": 40.0}, epsilon=None, delta=None)["attack"] == 40
    # The hypothesis-testing bound: eps = 1 allows an advantage of (e - 1) / (e + 1) = 0.462.
    assert membership_advantage_bound(1.0, 0.0) == pytest.approx(0.4621, abs=1e-4)
    assert membership_advantage_bound(8.0, 1e-5) > 0.999 and membership_advantage_bound(float("inf"), 0) == 1.0
    p1, p8 = (privacy_score(clean, e, 1e-5)["privacy"] for e in (1.0, 8.0))
    assert p1 > p8  # epsilon is an input of P
    # FUP: geometric mean; a failed pillar cannot be bought back.
    assert fup_score(90, 60, 30, FUPWeights()) == pytest.approx((90 * 60 * 30) ** (1 / 3))
    assert fup_score(100, 100, 0, FUPWeights()) == 0
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
