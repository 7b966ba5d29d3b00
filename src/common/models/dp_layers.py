"""Per-sample gradients for the layers Opacus has no sampler for, so DP-SGD's hooks cover
every layer of the VAE and GAN (Opacus would otherwise vmap each such layer with functorch).

Importing this module registers them (``common.models`` does). Each is checked against a loop
of single-example backward passes in tests/test_dp_exactness.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from opacus.grad_sample import register_grad_sampler
from torch import nn


@register_grad_sampler(nn.ConvTranspose2d)
def conv_transpose2d_grad_sample(layer: nn.ConvTranspose2d, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    """Per-sample weight gradient of y = conv_transpose2d(x, W).

    conv_transpose2d is the adjoint of conv2d with the same weight: <conv_transpose2d(x, W), g>
    = <x, conv2d(g, W)>. So dL/dW is conv2d's weight gradient with input g and output gradient
    x: unfold g with the layer's kernel, stride, padding and dilation, and contract it with x
    position by position, one example at a time (one einsum).
    """
    x = activations[0].to(backprops.dtype)
    n = x.shape[0]
    out = {}
    if layer.weight.requires_grad:
        if layer.groups != 1:
            raise NotImplementedError("grouped ConvTranspose2d")
        cols = F.unfold(backprops, layer.kernel_size, dilation=layer.dilation, padding=layer.padding, stride=layer.stride)
        positions = cols.shape[-1]
        x = x.reshape(n, x.shape[1], -1)
        if x.shape[-1] != positions:  # output_padding rows/columns that no input position reached
            raise ValueError(f"ConvTranspose2d per-sample gradient: {x.shape[-1]} input positions, {positions} unfolded")
        grad = torch.einsum("nil,njl->nij", x, cols)  # (n, C_in, C_out * kH * kW)
        out[layer.weight] = grad.reshape(n, *layer.weight.shape)
    if layer.bias is not None and layer.bias.requires_grad:
        out[layer.bias] = backprops.sum(dim=(2, 3))
    return out


@register_grad_sampler(nn.PReLU)
def prelu_grad_sample(layer: nn.PReLU, activations: list[torch.Tensor], backprops: torch.Tensor) -> dict:
    """PReLU(x) = max(0, x) + a min(0, x): d/da = min(0, x) summed over each example's elements
    that share a slope (all of them, or one channel each)."""
    if not layer.weight.requires_grad:
        return {}
    contrib = torch.clamp(activations[0].to(backprops.dtype), max=0).mul_(backprops)  # in place: clamp made a new tensor
    if layer.num_parameters == 1:
        return {layer.weight: contrib.flatten(1).sum(1, keepdim=True)}
    return {layer.weight: contrib.transpose(0, 1).flatten(2).sum(2).transpose(0, 1)}
