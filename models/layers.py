"""Layers whose backward keeps less than autograd's: written here because torch has no switch for it.

``linear_gelu_linear`` is a transformer MLP (fc1 -> exact GELU -> fc2) that keeps fc1's output for backward and
recomputes the GELU there; autograd would keep the GELU's output too (fc2's input, 4 x width per token: ~150 MB for
ViT-B at batch 4 and 256 px, ~50 MB for the text and fusion layers of a base pretraining step). Used by the ViT
blocks (``models.vit.GeluMlp``) and the BERT layers (``models.xbert.BertLayer``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _LinearGeluLinear(torch.autograd.Function):
    """fc2(gelu(fc1(x))) that saves x and fc1's output, and recomputes the GELU in backward (autograd would also
    keep the GELU's output, as fc2's input: 4 x width per token)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> Tensor:
        hidden = F.linear(x, w1, b1)  # under autocast these run in its dtype, as nn.Linear would
        out = F.linear(F.gelu(hidden), w2, b2)
        ctx.save_for_backward(x, hidden, w1, w2)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, ...]:
        x, hidden, w1, w2 = ctx.saved_tensors
        dtype = hidden.dtype  # the compute dtype of forward (bf16 under autocast)
        grad_out = grad_out.to(dtype)
        act = F.gelu(hidden)
        grad_w2 = grad_out.flatten(0, -2).t() @ act.flatten(0, -2)
        grad_b2 = grad_out.flatten(0, -2).sum(0)
        grad_hidden = torch.ops.aten.gelu_backward(grad_out @ w2.to(dtype), hidden)
        del act
        flat_hidden = grad_hidden.flatten(0, -2)
        grad_w1 = flat_hidden.t() @ x.to(dtype).flatten(0, -2)
        grad_b1 = flat_hidden.sum(0)
        grad_x = (grad_hidden @ w1.to(dtype)).to(x.dtype)
        # nn.Linear keeps its bias in its weight's dtype.
        return (grad_x, grad_w1.to(w1.dtype), grad_b1.to(w1.dtype), grad_w2.to(w2.dtype), grad_b2.to(w2.dtype))


def linear_gelu_linear(x: Tensor, fc1: nn.Linear, fc2: nn.Linear) -> Tensor:
    """``fc2(gelu(fc1(x)))``; when gradients are recorded, without keeping the GELU's output for backward."""
    if not torch.is_grad_enabled():
        return fc2(F.gelu(fc1(x)))
    return _LinearGeluLinear.apply(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
