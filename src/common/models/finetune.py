"""Which parameters DP-SGD trains: all of them, or a few on top of a public prior.

DP-SGD adds Gaussian noise of norm about σ·C·√d / B to the averaged gradient of the
d trained parameters, against a clipped signal of at most C. Fine-tuning few
parameters of a publicly pretrained model cuts √d: normalisation layers and
embeddings (as in DP fine-tuning of large models, e.g. Li et al. 2022, "Large
language models can be strong differentially private learners"), or low-rank
adapters (LoRA, Hu et al. 2022, Eq. 3: W x + B A x with B initialised to zero, so the
adapted model starts as the prior).

Named groups for ``training.trainable`` (any mix; a module-name prefix such as
``up_blocks.2`` or ``out`` selects that block):

* ``all``: every parameter (adapters included when the model has them);
* ``norms``: GroupNorm scales and shifts;
* ``embeddings``: the time and class embeddings and each block's time projection;
* ``biases``: every bias;
* ``adapters``: the low-rank adapters (``model.adapter_rank`` > 0).
"""

from __future__ import annotations

from torch import nn

GROUPS = ("all", "norms", "embeddings", "biases", "adapters")


class LowRankConv2d(nn.Module):
    """A frozen-able convolution plus a rank-r update: ``base(x) + up(down(x))`` (LoRA, Hu et al. 2022, Eq. 3).

    ``down`` has the base's kernel (3x3), ``up`` is 1x1 and starts at zero: the module computes
    exactly ``base(x)`` until the adapter is trained. Both are plain Conv2d layers, so Opacus
    computes their per-sample gradients with its own hooks."""

    def __init__(self, base: nn.Conv2d, rank: int):
        super().__init__()
        self.base = base
        self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False)
        self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        nn.init.zeros_(self.up.weight)

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


def add_adapters(unet: nn.Module, rank: int) -> int:
    """Wrap every 3x3 convolution inside the UNet's residual blocks with a rank-``rank`` adapter;
    returns how many were added."""
    added = 0
    for name, module in list(unet.named_modules()):
        if name.endswith(("conv1", "conv2")) and isinstance(getattr(module, "conv", None), nn.Conv2d):
            module.conv = LowRankConv2d(module.conv, rank)
            added += 1
    return added


def _in_group(name: str, module: nn.Module, group: str) -> bool:
    if group == "norms":
        return isinstance(module, nn.GroupNorm)
    if group == "embeddings":
        return isinstance(module, nn.Embedding) or name.startswith("time_embed") or name.endswith("time_emb_proj")
    if group == "adapters":
        return isinstance(module, LowRankConv2d)  # its down and up projections; base stays frozen
    return name == group or name.startswith(group + ".")  # a module-name prefix


def select_trainable(module: nn.Module, groups: list[str]) -> int:
    """Set ``requires_grad`` on the parameters of ``groups`` only; returns how many scalars train.

    Frozen parameters never see private data, so they leave the site unchanged (the prior).
    Raises ValueError naming a group that selects nothing."""
    if "all" in groups:
        module.requires_grad_(True)
        return sum(p.numel() for p in module.parameters())
    module.requires_grad_(False)
    for group in groups:
        hits = 0
        for name, sub in module.named_modules():
            if group == "biases":
                params = [p for n, p in sub.named_parameters(recurse=False) if n == "bias"]
            elif group == "adapters" and _in_group(name, sub, group):
                params = [*sub.down.parameters(), *sub.up.parameters()]
            elif _in_group(name, sub, group):
                params = list(sub.parameters())
            else:
                continue
            for p in params:
                p.requires_grad_(True)
                hits += 1
        if not hits:
            raise ValueError(f"training.trainable: {group!r} selects no parameter of this model "
                             f"(groups: {', '.join(GROUPS)}, or a module-name prefix)")
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
