"""Acquisition profiles: deterministic, and every site looks different."""

import torch

from common.config import AcquisitionConfig
from common.data import apply_profile

IMAGES = torch.linspace(0.05, 0.95, 2 * 32 * 32).reshape(2, 1, 32, 32)


def test_identity_profile_changes_nothing():
    assert torch.allclose(apply_profile(IMAGES, AcquisitionConfig()), IMAGES)


def test_profile_is_deterministic():
    p = AcquisitionConfig(gamma=0.8, blur_sigma=1.0, noise_std=0.05, seed=3)
    assert torch.equal(apply_profile(IMAGES, p), apply_profile(IMAGES, p))


def test_gamma_below_one_brightens_and_offset_shifts():
    assert apply_profile(IMAGES, AcquisitionConfig(gamma=0.7)).mean() > IMAGES.mean()
    shifted = apply_profile(IMAGES, AcquisitionConfig(offset=0.02))
    assert torch.allclose(shifted, (IMAGES + 0.02).clamp(0, 1))


def test_blur_removes_high_frequencies():
    checker = ((torch.arange(32)[:, None] + torch.arange(32)[None]) % 2).float().expand(1, 1, 32, 32)
    blurred = apply_profile(checker, AcquisitionConfig(blur_sigma=1.0))
    assert blurred[..., 8:24, 8:24].std() < 0.1 * checker.std()


def test_output_stays_in_unit_range():
    out = apply_profile(IMAGES, AcquisitionConfig(contrast=3.0, noise_std=0.5, offset=0.3))
    assert out.min() >= 0 and out.max() <= 1


def test_external_site_profile_differs_from_every_training_site(demo_run):
    ext = demo_run.external_sites[0].acquisition
    outs = {s.name: apply_profile(IMAGES, s.acquisition) for s in demo_run.training_sites}
    ext_out = apply_profile(IMAGES, ext)
    for name, out in outs.items():
        assert (out - ext_out).abs().mean() > 0.01, name
    assert all(s.acquisition != ext for s in demo_run.training_sites)
