"""DP-SGD's per-sample clipping is exact, whatever computes the per-sample gradients.

For each private module (DDPM UNet, VAE, GAN discriminator) in float64, with every random draw
fixed: the per-sample gradients Opacus computes (hooks, with our ConvTranspose2d and PReLU
samplers, and functorch) match a loop of single-example backward passes, and with sigma = 0 the
DP optimizer's update is exactly the mean of the clipped per-example gradients.
"""

import copy

import pytest
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from common.config import ModelConfig
from common.models.generators import build_generator

B = 6


@pytest.fixture(autouse=True)
def float64():
    """Models and inputs in float64, so that 'exact' can mean a relative error of 1e-6."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(saved)


def ddpm_case():
    gen = build_generator(ModelConfig(name="ddpm", image_size=16, channels=[8, 16, 16], norm_num_groups=4))
    unet = gen.modules["unet"]
    g = torch.Generator().manual_seed(0)
    x, eps = torch.rand(B, 1, 16, 16, generator=g), torch.randn(B, 1, 16, 16, generator=g)
    t, y = torch.randint(0, 1000, (B,), generator=g), torch.randint(0, 2, (B,), generator=g)

    def losses(module, i):
        return (module(x[i], t[i], class_labels=y[i]) - eps[i]).pow(2).flatten(1).mean(1)
    return unet, losses


def vae_case():
    gen = build_generator(ModelConfig(name="vae", image_size=16, channels=[8, 16], latent_size=8))
    vae = gen.modules["vae"]
    g = torch.Generator().manual_seed(1)
    x, y, eps = torch.rand(B, 1, 16, 16, generator=g), torch.randint(0, 2, (B,), generator=g), torch.randn(B, 8, generator=g)
    return vae, lambda module, i: module(x[i], y[i], eps[i])


def gan_case():
    gen = build_generator(ModelConfig(name="gan", image_size=16, channels=[8, 16], latent_size=8))
    disc = gen.modules["discriminator"]
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(B, 1, 16, 16, generator=g), torch.randint(0, 2, (B,), generator=g)
    target = (torch.arange(B) % 2).to(torch.get_default_dtype())

    def losses(module, i):
        return nn.functional.binary_cross_entropy_with_logits(module(x[i], y[i]).flatten(), target[i], reduction="none")
    return disc, losses


CASES = {"ddpm": ddpm_case, "vae": vae_case, "gan": gan_case}


def loop_gradients(module, losses) -> list[torch.Tensor]:
    """Per-example gradients by brute force: one backward per example, flattened."""
    out = []
    for i in range(B):
        module.zero_grad()
        losses(module, torch.tensor([i])).sum().backward()
        out.append(torch.cat([p.grad.flatten() for p in module.parameters() if p.requires_grad]))
    return out


def clipped_mean(per: torch.Tensor, clip: float) -> torch.Tensor:
    """Opacus' update with no noise: mean over rows of g_i min(1, C / (||g_i|| + 1e-6))."""
    return (per * torch.clamp(clip / (per.norm(dim=1) + 1e-6), max=1.0)[:, None]).sum(0) / B


def bookkeeping_step(module, losses, clip: float, bf16: bool = False):
    """One noise-free bookkeeping step (SGD, lr 1) on a copy of ``module``: (update, per-sample norms, params)."""
    from common.privacy.bookkeeping import BookkeepingDPOptimizer, BookkeepingModule

    wrapped = BookkeepingModule(copy.deepcopy(module))
    params = [p for p in wrapped.parameters() if p.requires_grad]
    before = torch.cat([p.detach().flatten() for p in params])
    opt = BookkeepingDPOptimizer(torch.optim.SGD(params, lr=1.0), wrapped, noise_multiplier=0.0, max_grad_norm=clip,
                                 expected_batch_size=B, loss_reduction="mean")
    opt.zero_grad()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=bf16):
        losses(wrapped, torch.arange(B)).mean().backward()
        norms = wrapped.per_sample_gradient_norms
        opt.step()
    return before - torch.cat([p.detach().flatten() for p in params]), norms, params


@pytest.mark.parametrize("mode", ["hooks", "functorch"])
@pytest.mark.parametrize("name", list(CASES))
def test_per_sample_gradients_match_a_per_example_loop(name, mode):
    module, losses = CASES[name]()
    module = module.double()
    expected = loop_gradients(module, losses)
    wrapped = GradSampleModule(copy.deepcopy(module), batch_first=True, loss_reduction="sum", force_functorch=mode == "functorch")
    losses(wrapped, torch.arange(B)).sum().backward()
    got = torch.cat([p.grad_sample.flatten(1) for p in wrapped.parameters() if p.requires_grad], dim=1)
    for i in range(B):
        assert torch.allclose(got[i], expected[i], rtol=1e-6, atol=1e-10), f"{name} example {i}"
    assert torch.allclose(got.norm(dim=1), torch.stack(expected).norm(dim=1), rtol=1e-6)


@pytest.mark.parametrize("name", list(CASES))
def test_with_no_noise_the_update_is_the_mean_of_clipped_per_example_gradients(name):
    module, losses = CASES[name]()
    module = module.double()
    per = torch.stack(loop_gradients(module, losses))
    clip = float(per.norm(dim=1).median())  # half the examples are clipped
    expected = clipped_mean(per, clip)
    wrapped = GradSampleModule(copy.deepcopy(module), batch_first=True, loss_reduction="mean")
    params = [p for p in wrapped.parameters() if p.requires_grad]
    before = torch.cat([p.detach().flatten() for p in params])
    opt = DPOptimizer(torch.optim.SGD(params, lr=1.0), noise_multiplier=0.0, max_grad_norm=clip, expected_batch_size=B)
    opt.zero_grad()
    losses(wrapped, torch.arange(B)).mean().backward()
    opt.step()
    update = before - torch.cat([p.detach().flatten() for p in params])
    assert torch.allclose(update, expected, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("conv_norm", ["by cost", "ghost", "unfold", "per_example"])
@pytest.mark.parametrize("name", list(CASES))
def test_bookkeeping_clips_exactly_in_one_backward(name, conv_norm, monkeypatch):
    """Every way to a convolution's per-sample norm, forced on every layer, and the measured choice."""
    import common.privacy.bookkeeping as bookkeeping

    if conv_norm != "by cost":
        monkeypatch.setattr(bookkeeping, "conv_ghost_is_cheaper", lambda *_: conv_norm == "ghost")
        monkeypatch.setattr(bookkeeping, "conv_way", lambda *_: conv_norm)
    module, losses = CASES[name]()
    per = torch.stack(loop_gradients(module, losses))
    clip = float(per.norm(dim=1).median())
    update, norms, _ = bookkeeping_step(module, losses, clip)
    assert torch.allclose(norms, per.norm(dim=1), rtol=1e-6)
    assert torch.allclose(update, clipped_mean(per, clip), rtol=1e-6, atol=1e-12)


def test_bookkeeping_refuses_to_step_on_a_gradient_it_did_not_clip():
    from common.privacy.bookkeeping import BookkeepingDPOptimizer, BookkeepingModule

    module, losses = CASES["vae"]()
    wrapped = BookkeepingModule(copy.deepcopy(module))
    opt = BookkeepingDPOptimizer(torch.optim.SGD(wrapped.parameters(), lr=1.0), wrapped, noise_multiplier=0.0, max_grad_norm=1.0,
                                 expected_batch_size=B, loss_reduction="mean")
    opt.zero_grad()
    wrapped.disable_hooks()  # a backward the hooks did not see: autograd's plain, unclipped sum
    losses(wrapped, torch.arange(B)).mean().backward()
    with pytest.raises(RuntimeError, match="not clipped per sample"):
        opt.step()


class Unregistered(nn.Module):
    """A layer with its own parameter and a forward no grad sampler knows (like the audit's probe)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.linspace(-1.0, 1.0, 16))

    def forward(self, x):
        return (x * self.w).sum(1) + (x * self.w).pow(2).sum(1)


def test_bookkeeping_covers_a_layer_without_a_grad_sampler_through_functorch():
    x = torch.rand(B, 16)
    losses = lambda module, i: module(x[i])  # noqa: E731
    per = torch.stack(loop_gradients(Unregistered(), losses))
    clip = float(per.norm(dim=1).median())
    update, norms, _ = bookkeeping_step(Unregistered(), losses, clip)
    assert torch.allclose(norms, per.norm(dim=1), rtol=1e-6)
    assert torch.allclose(update, clipped_mean(per, clip), rtol=1e-6)


def test_bookkeeping_refuses_a_layer_used_twice_in_one_step():
    """Two uses of one layer add their per-sample gradients before the norm; summing two norms would under-clip."""
    from common.privacy.bookkeeping import BookkeepingModule

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(torch.tanh(self.lin(x))).sum(1)

    wrapped = BookkeepingModule(Twice())
    with pytest.raises(RuntimeError, match="used twice"):
        wrapped(torch.rand(B, 4)).mean().backward()


class TwoLinear(nn.Module):
    def __init__(self, second=nn.Linear):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), second(4, 4)


class InPlaceAfter(TwoLinear):
    """A layer's input changed in place after its forward (a residual written as ``h += ...``)."""

    def forward(self, x):
        h = self.a(x)
        y = self.b(h)
        h.mul_(0.1)
        return (y + h).sum(1)


class Tied(TwoLinear):
    def __init__(self):
        super().__init__()
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.b(torch.tanh(self.a(x))).sum(1)


class UsedOutside(TwoLinear):
    def forward(self, x):
        h = self.a(x)
        return (self.b(h) + nn.functional.linear(h, self.b.weight)).sum(1)


def test_bookkeeping_refuses_what_it_would_clip_wrongly():
    """Each of these under-clipped, or clipped a different gradient, without a word."""
    from common.privacy.bookkeeping import BookkeepingModule

    wrapped = BookkeepingModule(InPlaceAfter())
    with pytest.raises(RuntimeError, match="modified in place"):
        wrapped(torch.rand(B, 4)).mean().backward()
    with pytest.raises(ValueError, match="shared by Linear and Linear"):
        BookkeepingModule(Tied())
    wrapped = BookkeepingModule(UsedOutside())
    wrapped(torch.rand(B, 4)).mean().backward()
    with pytest.raises(RuntimeError, match="used outside its layer"):
        wrapped.clip_into_grad(1.0)


def test_a_layer_that_raised_and_is_called_again_gets_its_weights_back():
    from common.privacy.bookkeeping import BookkeepingModule

    class Raises(nn.Linear):
        fail = True

        def forward(self, x):
            if Raises.fail:
                Raises.fail = False
                raise RuntimeError("transient")
            return super().forward(x)

    class Retry(TwoLinear):
        def forward(self, x):
            h = self.a(x)
            try:
                return self.b(h).sum(1)
            except RuntimeError:
                return self.b(h).sum(1)

    wrapped = BookkeepingModule(Retry(second=Raises))
    wrapped(torch.rand(B, 4)).mean().backward()
    assert all(p.requires_grad for p in wrapped.parameters())


@pytest.mark.parametrize("name", ["vae", "gan"])
def test_under_bf16_autocast_bookkeeping_clips_in_fp32(name):
    """Mixed precision (training.mixed_precision): the step runs in bf16, but the norms that set each row's
    clip factor, the clipped sum and the noise are fp32; the update stays within bf16 rounding of the fp32 one."""
    torch.set_default_dtype(torch.float32)
    module, losses = CASES[name]()
    (exact, n32, _), (mixed, n16, params) = (bookkeeping_step(module, losses, 0.5, bf16) for bf16 in (False, True))
    assert n16.dtype == torch.float32 and all(p.grad.dtype == torch.float32 for p in params)
    assert torch.allclose(n16, n32, rtol=5e-2)
    assert (mixed - exact).norm() < 5e-2 * exact.norm()


def test_mixed_precision_is_refused_where_it_would_clip_bf16_gradients(shared_data):
    from client.trainer import use_bf16
    from common.config import ConfigError, load_run

    from .conftest import TINY

    with pytest.raises(ConfigError, match="mixed_precision"):
        load_run(TINY, overrides={"training": {"mixed_precision": "bf16", "grad_sample_mode": "hooks"}})
    run = load_run(TINY, overrides={"training": {"mixed_precision": "bf16"}})  # bookkeeping: its norms stay fp32
    assert use_bf16(run.training, torch.device("cpu"))
    auto = load_run(TINY)
    assert auto.training.mixed_precision == "auto" and not use_bf16(auto.training, torch.device("cpu"))  # auto: CUDA only
