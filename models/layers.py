"""Layers whose backward keeps or allocates less than autograd's: written here because torch has no switch for it.

- ``linear_gelu_linear``: a transformer MLP (fc1 -> exact GELU -> fc2) that keeps fc1's output for backward and
  recomputes the GELU there; autograd would keep the GELU's output too (fc2's input, 4 x width per token: ~150 MB for
  ViT-B at batch 4 and 256 px, ~50 MB for the text and fusion layers of a base pretraining step). Used by the ViT
  blocks (``models.vit.GeluMlp``) and the BERT layers (``models.xbert.BertLayer``).
- ``layer_norm_linear`` and ``linear_gelu_linear(norm=...)``: a pre-norm block's LayerNorm fused into the linear
  that reads it, recomputed in backward from the block's residual stream, which is kept anyway: the norm's output
  is not kept (2 x width per token per ViT block: 77 MB for ViT-B at batch 4 and 256 px). Used by
  ``models.vit.LeanBlock``.
- ``tied_linear``: ``F.linear`` whose weight gradient is a (out, in) tensor of its own. Autograd's is a transposed
  view of an (in, out) product, and autograd adds two gradients of one tensor in place only when neither is a view.
  The MLM decoder's weight is the word embedding, which also gets the embedding lookup's gradient: autograd
  allocated a third vocabulary-sized table there (94 MB for BERT-base), at the end of backward, the step's peak.
- ``defer_gradient``: an identity whose backward runs after every node recorded after it. Pretraining passes the
  decoder's weight through it and lets the embedding lookup hand autograd sparse rows (``BertEmbeddings``
  ``sparse_word_grad``): the rows reach the weight's gradient buffer first and the decoder's dense table second, and
  autograd adds sparse into dense in place only in that order (dense + sparse the other way round is a new table).
  So the lookup allocates no vocabulary-sized table at all.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _LinearGeluLinear(torch.autograd.Function):
    """fc2(gelu(fc1(x))) that saves x and fc1's output, and recomputes the GELU in backward (autograd would also
    keep the GELU's output, as fc2's input: 4 x width per token). With ``normed``, fc1 reads layer_norm(x): x is
    saved instead of the norm's output, which backward recomputes (a pre-norm block's residual stream is x)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, normed: bool = False,
                norm_w: Tensor | None = None, norm_b: Tensor | None = None, eps: float = 0.0) -> Tensor:
        inp = F.layer_norm(x, x.shape[-1:], norm_w, norm_b, eps) if normed else x
        hidden = F.linear(inp, w1, b1)  # under autocast these run in its dtype, as nn.Linear would
        out = F.linear(F.gelu(hidden), w2, b2)
        ctx.save_for_backward(x, hidden, w1, w2, norm_w, norm_b)
        ctx.normed, ctx.eps = normed, eps
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, hidden, w1, w2, norm_w, norm_b = ctx.saved_tensors
        dtype = hidden.dtype  # the compute dtype of forward (bf16 under autocast)
        act = F.gelu(hidden)
        grad_act, grad_w2, grad_b2 = _linear_grads(grad_out, act, w2, dtype)
        del act
        grad_hidden = torch.ops.aten.gelu_backward(grad_act, hidden)
        if not ctx.normed:
            grad_x, grad_w1, grad_b1 = _linear_grads(grad_hidden, x, w1, dtype)
            return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, None, None, None, None
        grad_x, grad_nw, grad_nb, grad_w1, grad_b1 = _norm_linear_grads(grad_hidden, x, norm_w, norm_b, ctx.eps, w1,
                                                                       dtype)
        return grad_x, grad_w1, grad_b1, grad_w2, grad_b2, None, grad_nw, grad_nb, None


class _LayerNormLinear(torch.autograd.Function):
    """linear(layer_norm(x)) that saves x, not the norm's output, and recomputes the norm in backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, norm_w: Tensor, norm_b: Tensor, eps: float, w: Tensor, b: Tensor) -> Tensor:
        out = F.linear(F.layer_norm(x, x.shape[-1:], norm_w, norm_b, eps), w, b)  # autocast: norm fp32, linear bf16
        ctx.save_for_backward(x, norm_w, norm_b, w)
        ctx.eps, ctx.dtype = eps, out.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        x, norm_w, norm_b, w = ctx.saved_tensors
        grad_x, grad_nw, grad_nb, grad_w, grad_b = _norm_linear_grads(grad_out, x, norm_w, norm_b, ctx.eps, w,
                                                                     ctx.dtype)
        return grad_x, grad_nw, grad_nb, None, grad_w, grad_b


def _norm_linear_grads(grad_out: Tensor, x: Tensor, norm_w: Tensor, norm_b: Tensor, eps: float, weight: Tensor,
                       dtype: torch.dtype) -> tuple[Tensor, ...]:
    """Gradients of ``F.linear(F.layer_norm(x), weight, bias)`` with the norm recomputed from x: (x, norm weight,
    norm bias, weight, bias); the linear's in ``dtype`` as ``_linear_grads``, the norm's by torch's own kernel."""
    inp, mean, rstd = torch.native_layer_norm(x, x.shape[-1:], norm_w, norm_b, eps)
    grad_inp, grad_w, grad_b = _linear_grads(grad_out, inp, weight, dtype)
    del inp
    grad_x, grad_nw, grad_nb = torch.ops.aten.native_layer_norm_backward(
        grad_inp.to(x.dtype), x, x.shape[-1:], mean, rstd, norm_w, norm_b, [True, True, True])
    return grad_x, grad_nw, grad_nb, grad_w, grad_b


class _TiedLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` with its weight gradient formed as a tensor of its own (module docstring)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        out = F.linear(x, weight, bias)  # under autocast in its dtype, as nn.Linear
        ctx.save_for_backward(x, weight)
        ctx.dtype = out.dtype
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, ...]:
        x, weight = ctx.saved_tensors
        return _linear_grads(grad_out, x, weight, ctx.dtype)


def _linear_grads(grad_out: Tensor, x: Tensor, weight: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``F.linear(x, weight, bias)`` computed in ``dtype`` (forward's, bf16 under autocast): input in
    x's dtype; weight, as an (out, in) tensor of its own, and bias in the weight's dtype, as nn.Linear keeps them."""
    grad_out = grad_out.to(dtype)
    flat_grad = grad_out.flatten(0, -2)
    grad_weight = flat_grad.t() @ x.to(dtype).flatten(0, -2)
    grad_x = (grad_out @ weight.to(dtype)).to(x.dtype)
    return grad_x, grad_weight.to(weight.dtype), flat_grad.sum(0).to(weight.dtype)


def linear_gelu_linear(x: Tensor, fc1: nn.Linear, fc2: nn.Linear, norm: nn.LayerNorm | None = None) -> Tensor:
    """``fc2(gelu(fc1(x)))``, or ``fc2(gelu(fc1(norm(x))))``; when gradients are recorded, without keeping the
    GELU's output, nor the norm's, for backward."""
    if not torch.is_grad_enabled():
        return fc2(F.gelu(fc1(x if norm is None else norm(x))))
    if norm is None:
        return _LinearGeluLinear.apply(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias)
    return _LinearGeluLinear.apply(x, fc1.weight, fc1.bias, fc2.weight, fc2.bias, True, norm.weight, norm.bias,
                                   norm.eps)


def layer_norm_linear(x: Tensor, norm: nn.LayerNorm, linear: nn.Linear) -> Tensor:
    """``linear(norm(x))``; when gradients are recorded, without keeping the norm's output for backward."""
    if not torch.is_grad_enabled():
        return linear(norm(x))
    return _LayerNormLinear.apply(x, norm.weight, norm.bias, norm.eps, linear.weight, linear.bias)


def tied_linear(x: Tensor, linear: nn.Linear, weight: Tensor | None = None) -> Tensor:
    """``linear(x)``; when gradients are recorded, with a weight gradient that is not a view (module docstring).
    ``weight``: linear's weight as another autograd node has it (``defer_gradient``); the values are the same."""
    if not (torch.is_grad_enabled() and linear.weight.requires_grad):
        return linear(x)
    return _TiedLinear.apply(x, linear.weight if weight is None else weight, linear.bias)


class _Deferred(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return grad


def defer_gradient(tensor: Tensor) -> Tensor:
    """``tensor`` itself, through an autograd node recorded now. The engine runs the ready node recorded last first,
    so this one passes its gradient on only after every node recorded after it has run (module docstring). Only
    when the gradients reach a tensor changes, not their values."""
    return _Deferred.apply(tensor)
