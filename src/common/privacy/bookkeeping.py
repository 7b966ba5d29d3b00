"""Per-sample clipping in one backward pass ("book-keeping", Bu et al. 2023, ICML, Alg. 1).

Opacus' hooks mode writes every layer's per-sample gradients into a zero-filled buffer, clips
them in the optimizer with one einsum per parameter, and its ghost mode runs a second backward.
Here one backward does it all, layer by layer. A hook on each trainable layer's output
records d loss / d output; the layer's weights are kept off autograd's graph during its
forward (when its input carries a gradient), so the backward never builds the unclipped
weight gradient that would be thrown away. Then:

* a ``Linear`` layer on (batch, features) inputs never builds per-sample gradients: its
  per-sample norm is ``||a_i|| ||g_i||`` (the "ghost norm", Goodfellow 2015; Li et al. 2022,
  eq. 4) and its clipped sum is one matrix product ``(c * g)^T a``;
* a ``Conv2d`` layer takes the ghost norm too where it is cheaper (low resolution, many
  channels: :func:`conv_ghost_is_cheaper`), and its clipped sum is one weight gradient with
  each row's backprop scaled by its clip factor;
* every other layer gets its per-sample gradients from Opacus' own grad samplers (and ours,
  :mod:`common.models.dp_layers`), or functorch for a layer with none (as Opacus' hooks mode
  does), written once and summed with the clip factors; a ``Conv2d`` by Opacus' unfold or by
  one backward-weight convolution per example, whichever :func:`conv_way` times faster.

Refused, because the clip would be wrong: a layer used twice in a step, a parameter shared by
two layers or also used outside its layer (seen where the layer's input carries a gradient),
a layer input changed in place before the backward,
a layer that returns more than one tensor, and (in the optimizer) any unclipped gradient.

The clip factor is Opacus' ``c_i = min(1, C / (||g_i|| + 1e-6))`` over all layers at once; the
clipped sum goes to ``p.grad`` and :class:`BookkeepingDPOptimizer` (Opacus'
``DPOptimizerFastGradientClipping``) adds the Gaussian noise, scales by the expected batch size
and handles virtual steps. tests/test_dp_exactness.py checks the norms and the update against a
loop of single-example backward passes.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from opacus.grad_sample import GradSampleModule
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient, prepare_layer
from opacus.optimizers import DPOptimizerFastGradientClipping
from torch import nn


def conv_ghost_is_cheaper(layer: nn.Conv2d | nn.ConvTranspose2d, positions_of: torch.Tensor) -> bool:
    """Per layer, the cheaper way to a per-sample norm (Bu et al. 2022, "mixed ghost clipping",
    counted in multiply-adds rather than memory). With T positions (a conv's outputs, a transposed
    conv's inputs), p inputs per position (C_in k^2; a transposed conv's C_out k^2) and o outputs,
    the ghost norm's two Gram matrices cost T^2 (p + o) per example and building the gradient
    costs T p o. Low-resolution, wide layers take the ghost norm; high-resolution ones build."""
    positions = positions_of.shape[-1] * positions_of.shape[-2]
    k = layer.kernel_size[0] * layer.kernel_size[1]
    p, o = (layer.in_channels * k, layer.out_channels) if isinstance(layer, nn.Conv2d) else (layer.out_channels * k, layer.in_channels)
    return positions * (p + o) < p * o


# A convolution's per-example weight gradients two ways, both exact: Opacus' (unfold the input,
# one batched einsum) and one backward-weight convolution per example. Which is faster depends
# on the layer and the machine (measured on 2 cores: per example 2.5x faster for a 32x32,
# 32-channel stride-1 layer, Opacus' 1.8x faster at 8x8 with 128 channels), so each layer
# geometry is timed once per process and the faster kept, as cuDNN's benchmark mode does.
_CONV_WAY: dict[tuple, str] = {}


def _conv_per_example(layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return torch.stack([torch.nn.grad.conv2d_weight(a[i : i + 1], layer.weight.shape, g[i : i + 1], layer.stride, layer.padding,
                                                    layer.dilation) for i in range(a.shape[0])])


def _conv_unfold(layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return GradSampleModule.GRAD_SAMPLERS[nn.Conv2d](layer, [a], g)[layer.weight]


CONV_WAYS = {"unfold": _conv_unfold, "per_example": _conv_per_example}


def conv_way(layer: nn.Conv2d, a: torch.Tensor, g: torch.Tensor) -> str:
    """The faster of :data:`CONV_WAYS` for this layer's geometry, timed on its first batch."""
    key = (layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
           tuple(a.shape[1:]), a.dtype, a.device.type)
    if key not in _CONV_WAY:
        timings = {}
        for name, way in CONV_WAYS.items():
            way(layer, a, g)  # the first call pays for allocations
            start = time.perf_counter()
            way(layer, a, g)
            timings[name] = time.perf_counter() - start
        _CONV_WAY[key] = min(timings, key=timings.get)
    return _CONV_WAY[key]


def conv2d_grad_sample(layer: nn.Conv2d, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    """Per-example gradients of a Conv2d's weight and bias, by the way measured fastest for its geometry."""
    a, g = activations[0].to(backprops.dtype), backprops
    out = {}
    if layer.weight.requires_grad:
        out[layer.weight] = CONV_WAYS[conv_way(layer, a, g)](layer, a, g)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = g.sum(dim=(2, 3))
    return out


def _plain_conv2d(layer: nn.Module) -> bool:
    """A Conv2d that both the ghost norm and :func:`conv2d_grad_sample` handle."""
    return type(layer) is nn.Conv2d and layer.groups == 1 and layer.padding_mode == "zeros" and not isinstance(layer.padding, str)


def _trainable(layer: nn.Module) -> list[nn.Parameter]:
    return [p for p in layer.parameters(recurse=False) if p.requires_grad]


class BookkeepingModule(nn.Module):
    """Wraps the private module: records what each trainable layer needs to clip per example.

    ``loss_reduction="mean"``: the loss is a mean over the batch's rows, as every generator's is;
    each row is one privacy unit (a Poisson-sampled patient, or a public fake row of the GAN)."""

    def __init__(self, module: nn.Module, loss_reduction: str = "mean"):
        super().__init__()
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction: {loss_reduction!r}")
        self._module = module
        self.loss_reduction = loss_reduction
        self.hooks_enabled = True
        self._handles = []
        self._activations: dict[nn.Module, list[torch.Tensor]] = {}
        self._off_graph: dict[nn.Module, list[nn.Parameter]] = {}
        self._records: list[tuple[nn.Module, str, object]] = []
        self._sq_norms: torch.Tensor | None = None
        self._off_this_step: list[nn.Parameter] = []
        owner: dict[int, nn.Module] = {}
        for layer in module.modules():
            if not _trainable(layer):
                continue
            for p in _trainable(layer):
                if id(p) in owner:  # tied weights: two layers' per-sample gradients add before the norm
                    raise ValueError(f"grad_sample_mode bookkeeping: a parameter is shared by {type(owner[id(p)]).__name__} and "
                                     f"{type(layer).__name__}; use hooks")
                owner[id(p)] = layer
            if type(layer) is not nn.Linear and type(layer) not in GradSampleModule.GRAD_SAMPLERS:
                prepare_layer(layer, batch_first=True)  # as Opacus' hooks mode: functorch for this layer alone
            self._handles.append(layer.register_forward_pre_hook(self._before_layer))
            self._handles.append(layer.register_forward_hook(self._after_layer))

    @staticmethod
    def _ghost_weight(layer: nn.Module, a: torch.Tensor, g: torch.Tensor):
        """(per-sample squared norms of the weight's gradient, clipped-sum function of the scaled
        backprops) for a layer that takes the ghost norm; None for one that builds its gradients."""
        n = g.shape[0]
        zero = torch.zeros(n, dtype=g.dtype, device=g.device)
        if type(layer) is nn.Linear and a.dim() == 2:
            a = a.to(g.dtype)
            sq = (a * a).sum(1) * (g * g).sum(1) if layer.weight.requires_grad else zero
            return sq, lambda cg: cg.t() @ a
        if _plain_conv2d(layer) and conv_ghost_is_cheaper(layer, g):
            # ||sum_t g_t a_t^T||^2 = <A A^T, G G^T> over positions t (Li et al. 2022, eq. 6)
            cols, gt = F.unfold(a.to(g.dtype), layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride), g.flatten(2)
            sq = (torch.bmm(cols.transpose(1, 2), cols) * torch.bmm(gt.transpose(1, 2), gt)).sum((1, 2)) if layer.weight.requires_grad else zero
            return sq, lambda cg: torch.nn.grad.conv2d_weight(a.to(g.dtype), layer.weight.shape, cg, layer.stride, layer.padding,
                                                              layer.dilation, layer.groups)
        if type(layer) is nn.ConvTranspose2d and layer.groups == 1 and conv_ghost_is_cheaper(layer, a):
            # The adjoint of conv2d: positions are the input's, the "inputs" of a position are the
            # unfolded backprops (common.models.dp_layers.conv_transpose2d_grad_sample).
            cols, at = F.unfold(g, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride), a.to(g.dtype).flatten(2)
            sq = (torch.bmm(at.transpose(1, 2), at) * torch.bmm(cols.transpose(1, 2), cols)).sum((1, 2)) if layer.weight.requires_grad else zero
            return sq, lambda cg: torch.nn.grad.conv2d_weight(cg, layer.weight.shape, a.to(g.dtype), layer.stride, layer.padding,
                                                              layer.dilation, 1)
        return None

    def forward(self, *args, **kwargs):
        try:
            return self._module(*args, **kwargs)
        finally:  # a layer that raised mid-forward must not leave its weights frozen
            for params in self._off_graph.values():
                for p in params:
                    p.requires_grad_(True)
            self._off_graph.clear()

    def disable_hooks(self) -> None:
        self.hooks_enabled = False

    def enable_hooks(self) -> None:
        self.hooks_enabled = True

    def _active(self, layer: nn.Module) -> bool:
        return self.hooks_enabled and layer.training and torch.is_grad_enabled()

    def _before_layer(self, layer, inputs) -> None:
        if self._active(layer) and any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs):
            # The layer's output gradient is all the clip needs, and clip_into_grad writes the
            # weights' clipped sum: keep autograd from also building their unclipped sum (a second
            # weight gradient per layer). The output still needs a gradient through the input.
            params = _trainable(layer)
            for p in params:
                p.requires_grad_(False)
            # extend, not replace: a layer that raised and is called again must get every weight back
            self._off_graph.setdefault(layer, []).extend(params)
            self._off_this_step.extend(params)

    def _after_layer(self, layer, inputs, output) -> None:
        for p in self._off_graph.pop(layer, ()):
            p.requires_grad_(True)
        if not self._active(layer):
            return
        if not isinstance(output, torch.Tensor):
            raise RuntimeError(f"grad_sample_mode bookkeeping: {type(layer).__name__} returns {type(output).__name__}, not one tensor; use hooks")
        # With the weights off the graph autograd no longer keeps the input for them, so nothing
        # else would notice an in-place change to it before the backward: remember its version.
        self._activations.setdefault(layer, []).append([(t.detach(), t._version) if isinstance(t, torch.Tensor) else (t, None)
                                                        for t in inputs])
        # A hook on the output tensor (not a module backward hook, which wraps every input and
        # output in an extra autograd node): it sees d loss / d output, and returns nothing.
        output.register_hook(lambda grad: self._capture_backprops(layer, grad))

    def _capture_backprops(self, layer, grad: torch.Tensor) -> None:
        if not self.hooks_enabled or not self._activations.get(layer):
            return
        with torch.autocast(device_type=grad.device.type, enabled=False):  # fp32 even inside a bf16 step
            self._record(layer, (grad,))

    def _record(self, layer, grad_output) -> None:
        if any(recorded is layer for recorded, _, _ in self._records):
            # Two uses of one layer: their per-sample gradients add before the norm (a cross term).
            raise RuntimeError(f"grad_sample_mode bookkeeping: {type(layer).__name__} is used twice in one step; use hooks")
        # In fp32 whatever the step's precision (bf16 autocast): the norms that decide each row's
        # clip factor, the clipped sums and (in the optimizer) the noise.
        saved = self._activations[layer].pop()
        if any(version is not None and t._version != version for t, version in saved):
            raise RuntimeError(f"grad_sample_mode bookkeeping: the input of a {type(layer).__name__} was modified in place after "
                               "its forward, so its per-sample gradients would be wrong; remove the in-place operation")
        inputs = [t.float() if t.is_floating_point() and t.dtype != torch.float64 else t for t, _ in saved]
        g = grad_output[0].detach()
        g = g if g.dtype == torch.float64 else g.float()
        a = inputs[0]
        n = g.shape[0]
        ghost = self._ghost_weight(layer, a, g)
        if ghost is not None:  # the weight's per-sample squared norms, and its clipped sum from scaled backprops
            sq, weight_grad = ghost
            if layer.bias is not None and layer.bias.requires_grad:  # the bias: each row's backprop summed over positions
                sq = sq + g.reshape(n, g.shape[1], -1).sum(2).pow(2).sum(1)
            self._records.append((layer, "ghost", (g, weight_grad)))
        else:
            # Opacus' sampler for the type (a Linear on (batch, tokens, features) too), else functorch.
            sampler = GradSampleModule.GRAD_SAMPLERS.get(type(layer), ft_compute_per_sample_gradient)
            if _plain_conv2d(layer):
                sampler = conv2d_grad_sample
            per = {p: gs for p, gs in sampler(layer, inputs, g).items() if p.requires_grad}
            sq = sum(torch.linalg.vector_norm(gs.reshape(n, -1), dim=1) ** 2 for gs in per.values())
            self._records.append((layer, "instantiated", per))
        self._sq_norms = sq if self._sq_norms is None else self._sq_norms + sq

    @property
    def _row_scale(self) -> int:
        # Under a mean loss each row's own gradient is n x its share of the backprops: n is
        # applied to the norms and to the clip factors, never to a whole backprop tensor.
        return self._sq_norms.shape[0] if self.loss_reduction == "mean" else 1

    @property
    def per_sample_gradient_norms(self) -> torch.Tensor | None:
        """Each row's gradient norm over every trainable parameter (before clipping)."""
        return None if self._sq_norms is None else self._sq_norms.sqrt() * self._row_scale

    def clip_into_grad(self, max_grad_norm: float) -> set[int]:
        """``p.grad`` = the sum over rows of each row's gradient clipped to ``max_grad_norm``.
        Returns the ids of the parameters written (none when no batch went through)."""
        written: set[int] = set()
        if self._sq_norms is None:
            return written
        # Opacus' clip factor on each row's own gradient, times the row scale that makes the
        # recorded backprops (a share of a mean loss) into that gradient.
        coef = torch.clamp(max_grad_norm / (self.per_sample_gradient_norms + 1e-6), max=1.0) * self._row_scale
        for p in self._off_this_step:
            if p.grad is not None and p.grad.any():
                # Off the graph in its own layer, yet autograd built a gradient: the weight is also
                # used outside that layer, and that use would escape the clip.
                raise RuntimeError("grad_sample_mode bookkeeping: a weight is also used outside its layer; use hooks")
        for layer, kind, data in self._records:
            if kind == "ghost":
                g, weight_grad = data
                cg = g * coef.to(g.dtype).view(-1, *[1] * (g.dim() - 1))
                if layer.weight.requires_grad:
                    layer.weight.grad = weight_grad(cg).to(layer.weight.dtype)
                    written.add(id(layer.weight))
                if layer.bias is not None and layer.bias.requires_grad:
                    layer.bias.grad = cg.transpose(0, 1).flatten(1).sum(1).to(layer.bias.dtype)
                    written.add(id(layer.bias))
            else:
                for p, gs in data.items():
                    p.grad = torch.einsum("n,n...->...", coef.to(gs.dtype), gs).to(p.dtype)
                    written.add(id(p))
        self.forget()
        return written

    def forget(self) -> None:
        """Drop everything recorded (the next batch starts clean)."""
        self._records, self._sq_norms, self._off_this_step = [], None, []
        self._activations.clear()

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class BookkeepingDPOptimizer(DPOptimizerFastGradientClipping):
    """Opacus' optimizer for pre-clipped gradients (noise, scaling, virtual steps), fed by
    :meth:`BookkeepingModule.clip_into_grad` just before each step."""

    def __init__(self, optimizer: torch.optim.Optimizer, module: BookkeepingModule, **kwargs):
        super().__init__(optimizer, **kwargs)
        self.bookkeeping = module

    def pre_step(self, closure=None):
        written = self.bookkeeping.clip_into_grad(self.max_grad_norm)
        for p in self.params:
            if id(p) in written:
                continue
            if p.grad is not None and p.grad.any():  # autograd's unclipped sum must never reach the noise
                raise RuntimeError("a trainable parameter got a gradient that was not clipped per sample; refusing to step")
            p.grad = torch.zeros_like(p)  # no row reached it (or an empty Poisson batch): zero, then noise
        return super().pre_step(closure)

