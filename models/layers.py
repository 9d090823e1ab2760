"""Memory-efficient variants of the model's layers, and the one switch that selects them (timm keeps its
``activations_me.py`` the same way). Every ``torch.autograd.Function`` of the models lives here.

The model files (models/xbert.py, models/vit.py, models/albef.py) hold the plain maths: timm's ``Block``/``Mlp``,
BERT layers that call their submodules, SDPA attention, ``nn.Embedding`` and ``nn.Linear``. ``apply_memory_efficient``
runs once, when ``create_model`` builds a model, and swaps modules for the variants below: same parameters, same
state_dict keys, same values to float rounding (each has an equality test against the plain path in
tests/test_models.py), a smaller autograd footprint.

The switch is ``model.memory_efficient`` (``resolve_memory_efficient``):
- null or ``auto`` (default): on where no CUDA device is present (training then runs on the CPU in fp32,
  ``train.amp: auto``), off where one is. On an H200 the base pretraining step is host-bound (4,290 kernel launches
  a step, GPU busy 38%, benchmarks/README.md) and has memory to spare at batch 64; these variants add kernels in
  backward (recomputed GELUs and norms, a separate weight-gradient matmul), so they cost time there and are off;
- ``true`` / ``false``: force it.

What each variant saves (base pretraining step, batch 4, CPU fp32; benchmarks/README.md):
- ``GeluMlp`` / ``MemoryEfficientBertLayer``: fc1 -> exact GELU -> fc2 keeping fc1's output and recomputing the GELU
  in backward; autograd would also keep the GELU's output (4 x width per token: ~150 MB for ViT-B at batch 4 and
  256 px, ~50 MB for the text and fusion layers).
- ``LeanBlock``: a timm pre-norm ViT block whose two LayerNorms run inside the linears that read them and are
  recomputed in backward from the residual stream, which is kept anyway (77 MB for ViT-B at batch 4, 256 px).
- ``MemoryEfficientSelfAttention``: attention dropout in training keeps the probabilities and a boolean keep-mask
  (SDPA's CPU maths fallback keeps a copy of the keys, a float mask and the dropped probabilities), and gathers the
  rows of shared image key/values (``select_image_kv``) inside, not keeping a copy per pair.
- ``TiedDecoder``: the MLM decoder (weight tied to the word embeddings) forms its weight gradient as a tensor of its
  own; autograd's is a transposed view, which it cannot add in place, so it allocated a third vocabulary-sized table
  (94 MB for BERT-base) at the end of backward, the step's peak.
- ``tie_sparse_word_gradient`` (pretraining, whose every loss reads the MLM decoder): the word lookup's gradient is
  sparse rows, and the decoder's dense gradient reaches the shared weight after them through ``defer_gradient``;
  autograd adds sparse into dense in place only in that order, so the lookup allocates no vocabulary-sized table.

Always used, whatever the switch: ``soft_contrastive_loss`` (the ITC loss forms its gradient in forward, so the
queue, overwritten right after the loss, is not copied for backward: 134 MB at ALBEF's size, on every device; it adds
no kernel).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import Tensor, nn

from models.xbert import BertLayer, BertLMHeadModel, BertSelfAttention, gather_rows

MEMORY_EFFICIENT_CHOICES = ("auto", "true", "false")


def resolve_memory_efficient(setting: bool | str | None) -> bool:
    """``model.memory_efficient`` (null or auto | true | false) -> whether the variants are used (module docstring)."""
    if isinstance(setting, bool):
        return setting
    if setting is None:
        setting = "auto"
    if str(setting).lower() not in MEMORY_EFFICIENT_CHOICES:
        raise ValueError(f"model.memory_efficient must be one of {MEMORY_EFFICIENT_CHOICES}, got {setting!r}")
    if str(setting).lower() == "auto":
        return not torch.cuda.is_available()  # a model built beside a GPU trains on it (bf16, host-bound)
    return str(setting).lower() == "true"


def apply_memory_efficient(model: nn.Module) -> nn.Module:
    """Swap ``model``'s plain layers for their memory-efficient variants, in place (module docstring); returns it.
    Parameters, buffers and state_dict keys are unchanged, so it may run before or after loading weights."""
    for module in list(model.modules()):
        if isinstance(module, VisionTransformer):
            for index, block in enumerate(module.blocks):
                if type(block) is Block:
                    block.mlp = GeluMlp.from_timm(block.mlp)
                    module.blocks[index] = LeanBlock.from_timm(block)
        elif type(module) is BertSelfAttention:
            module.__class__ = MemoryEfficientSelfAttention  # same state, only the attention maths differ
        elif type(module) is BertLayer and module.intermediate.act is F.gelu:
            module.__class__ = MemoryEfficientBertLayer
        elif type(module) is BertLMHeadModel:
            decoder = module.cls.predictions.decoder
            if decoder.weight is module.bert.embeddings.word_embeddings.weight:
                decoder.__class__ = TiedDecoder
    if getattr(model, "loss_reads_mlm_decoder", False):
        tie_sparse_word_gradient(model, model.text_encoder)
    return model


# ---- fc1 -> GELU -> fc2 with the GELU recomputed; pre-norm block with its norms recomputed ---------------------------
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


class GeluMlp(nn.Module):
    """timm's ``Mlp`` (fc1 -> GELU -> fc2, no dropout or inner norm) with the GELU recomputed in backward; same
    parameter names (``fc1``, ``fc2``), so checkpoints load unchanged."""

    def __init__(self, fc1: nn.Linear, fc2: nn.Linear) -> None:
        super().__init__()
        self.fc1, self.fc2 = fc1, fc2

    @classmethod
    def from_timm(cls, mlp: nn.Module) -> nn.Module:
        """``GeluMlp`` sharing ``mlp``'s layers when it is a plain timm Mlp with exact GELU; ``mlp`` otherwise."""
        plain = (type(mlp) is Mlp and isinstance(mlp.act, nn.GELU) and mlp.act.approximate == "none"
                 and isinstance(mlp.norm, nn.Identity) and mlp.drop1.p == 0 and mlp.drop2.p == 0
                 and mlp.fc1.bias is not None and mlp.fc2.bias is not None)
        return cls(mlp.fc1, mlp.fc2) if plain else mlp

    def forward(self, x: Tensor) -> Tensor:
        return linear_gelu_linear(x, self.fc1, self.fc2)


class LeanBlock(nn.Module):
    """timm's pre-norm ``Block`` (x + attn(norm1(x)), then x + mlp(norm2(x))) whose norms run inside the linears
    that read them: backward recomputes them from x, which it keeps anyway. Same submodules and parameter names as
    the block it is built from, so checkpoints load unchanged."""

    def __init__(self, block: Block) -> None:
        super().__init__()
        self.norm1, self.attn, self.norm2, self.mlp = block.norm1, block.attn, block.norm2, block.mlp

    @classmethod
    def from_timm(cls, block: nn.Module) -> nn.Module:
        """A ``LeanBlock`` sharing ``block``'s modules when it is a plain timm Block (no layer scale, drop path,
        attention dropout, q/k norm or gate; affine LayerNorms; a ``GeluMlp``); ``block`` otherwise."""
        attn = getattr(block, "attn", None)
        plain = (type(block) is Block and type(attn) is Attention and isinstance(block.mlp, GeluMlp)
                 and all(isinstance(getattr(block, n), nn.Identity) for n in ("ls1", "ls2", "drop_path1", "drop_path2"))
                 and all(isinstance(getattr(attn, n, nn.Identity()), nn.Identity) for n in ("q_norm", "k_norm", "norm"))
                 and getattr(attn, "gate", None) is None and attn.attn_drop.p == 0 and attn.proj_drop.p == 0
                 and attn.qkv.bias is not None and attn.num_heads * attn.head_dim == attn.qkv.in_features
                 and all(type(n) is nn.LayerNorm and n.weight is not None and n.bias is not None
                         for n in (block.norm1, block.norm2)))
        return cls(block) if plain else block

    def forward(self, x: Tensor) -> Tensor:  # (B, N, C) -> (B, N, C)
        attn = self.attn
        if not attn.fused_attn:  # timm's explicit-probabilities path, which Grad-CAM switches on (models.gradcam)
            x = x + attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))
        batch, tokens, width = x.shape
        qkv = layer_norm_linear(x, self.norm1, attn.qkv)
        q, k, v = qkv.reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        x = x + attn.proj(out.transpose(1, 2).reshape(batch, tokens, width))
        return x + linear_gelu_linear(x, self.mlp.fc1, self.mlp.fc2, norm=self.norm2)


class MemoryEfficientBertLayer(BertLayer):
    """``BertLayer`` (exact GELU) whose MLP keeps fc1's output, not the GELU's (``linear_gelu_linear``)."""

    def feed_forward(self, hidden_states: Tensor) -> Tensor:
        mlp = linear_gelu_linear(hidden_states, self.intermediate.dense, self.output.dense)
        return self.output.add_norm(mlp, hidden_states)


# ---- attention dropout keeping a boolean mask -----------------------------------------------------------------------
def dropout_keep_mask(shape: torch.Size, p: float, device: torch.device) -> Tensor:
    """The boolean keep-mask of attention dropout (each entry kept with probability 1 - p)."""
    return torch.empty(shape, dtype=torch.bool, device=device).bernoulli_(1.0 - p)


class _DropoutAttention(torch.autograd.Function):
    """softmax(q k^T / sqrt(d) + mask), dropout(p), times v; keeps q, k, v (views, no copies), the probabilities and
    a boolean keep-mask for backward, where the dropped probabilities are recomputed.

    With ``rows`` (B,), query b attends to key/value row ``rows[b]``: the gathered keys and values are formed in
    forward and again in backward, never kept, so fusion passes over the same images several times (the ITM pairs
    and the MLM texts of a pretraining step) keep one copy of the image key/values, not one per pair."""

    @staticmethod
    def forward(ctx: Any, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, p: float,
                rows: Tensor | None) -> Tensor:
        scale = 1.0 / math.sqrt(query.shape[-1])
        pair_key, pair_value = gather_rows(key, rows), gather_rows(value, rows)
        scores = query @ pair_key.transpose(-1, -2) * scale  # (B, nh, L, S)
        del pair_key
        if mask is not None:
            scores = scores + mask
        probs = scores.softmax(dim=-1)
        del scores
        keep = dropout_keep_mask(probs.shape, p, probs.device)
        context = (probs * keep * (1.0 / (1.0 - p))) @ pair_value
        ctx.save_for_backward(query, key, value, probs, keep, rows)
        ctx.scale, ctx.p = scale, p
        return context

    @staticmethod
    def backward(ctx: Any, grad_context: Tensor) -> tuple[Tensor | None, ...]:
        query, key, value, probs, keep, rows = ctx.saved_tensors
        rescale = 1.0 / (1.0 - ctx.p)
        grad_value = (probs * keep * rescale).transpose(-1, -2) @ grad_context
        grad_probs = (grad_context @ gather_rows(value, rows).transpose(-1, -2)) * keep * rescale
        grad_scores = probs * (grad_probs - (grad_probs * probs).sum(dim=-1, keepdim=True)) * ctx.scale
        del grad_probs
        grad_query = grad_scores @ gather_rows(key, rows)
        grad_key = grad_scores.transpose(-1, -2) @ query
        if rows is not None:  # the gradient of a gather: each pair's rows summed into its image's row
            grad_key = key.new_zeros(key.shape).index_add_(0, rows, grad_key)
            grad_value = value.new_zeros(value.shape).index_add_(0, rows, grad_value)
        return grad_query, grad_key, grad_value, None, None, None


def dropout_attention(query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, p: float,
                      rows: Tensor | None = None) -> Tensor:
    """Attention with dropout ``p`` on the probabilities (training), lean in memory; heads (B, nh, L|S, hd), or
    with ``rows`` key/value (K, nh, S, hd) of which query b reads row ``rows[b]``."""
    return _DropoutAttention.apply(query, key, value, mask, p, rows)


class MemoryEfficientSelfAttention(BertSelfAttention):
    """``BertSelfAttention`` whose training-time attention with dropout runs through ``dropout_attention``.
    Elsewhere (evaluation, no gradient, Grad-CAM's saved maps, autocast, whose mixed dtypes the Function does not
    handle) it is the plain attention."""

    def attend(self, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None, rows: Tensor | None) -> Tensor:
        if (self.training and self.dropout_p > 0 and torch.is_grad_enabled() and not self.save_attention
                and not torch.is_autocast_enabled(query.device.type)):
            return dropout_attention(query, key, value, mask, self.dropout_p, rows)
        return super().attend(query, key, value, mask, rows)


# ---- the tied MLM decoder and the word lookup ------------------------------------------------------------------------
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


def tied_linear(x: Tensor, linear: nn.Linear, weight: Tensor | None = None) -> Tensor:
    """``linear(x)``; when gradients are recorded, with a weight gradient that is not a view (module docstring).
    ``weight``: linear's weight as another autograd node has it (``defer_gradient``); the values are the same."""
    if not (torch.is_grad_enabled() and linear.weight.requires_grad):
        return F.linear(x, linear.weight, linear.bias)
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


class TiedWordGradient:
    """The link between a word-embedding table and the MLM decoder tied to it (``tie_sparse_word_gradient``).

    Armed by a forward pre-hook of the model whose every loss reads the decoder (pretraining): ``weight`` is then the
    table through ``defer_gradient``, recorded before the lookup, which the lookup answers with sparse rows and the
    decoder reads as its weight; disarmed by a forward hook, also on error. ``enabled`` (tests) turns the pair back
    into dense lookups."""

    def __init__(self, table: nn.Parameter) -> None:
        self.table = table
        self.enabled = True
        self.weight: Tensor | None = None

    # Hooks run eagerly, not as frames of their own under torch.compile; compiled graphs ignore the link (they keep
    # dense gradients).
    @torch.compiler.disable
    def arm(self, module: nn.Module, args: Any) -> None:
        if self.enabled and torch.is_grad_enabled() and self.table.requires_grad:
            self.weight = defer_gradient(self.table)

    @torch.compiler.disable
    def disarm(self, module: nn.Module, args: Any, output: Any) -> None:
        self.weight = None


class SparseGradEmbedding(nn.Embedding):
    """``nn.Embedding`` whose lookup gradient is sparse rows while its ``TiedWordGradient`` is armed."""

    tied: TiedWordGradient

    def forward(self, input_ids: Tensor) -> Tensor:
        if torch.compiler.is_compiling() or self.tied.weight is None:
            return super().forward(input_ids)
        return F.embedding(input_ids, self.weight, self.padding_idx, sparse=True)


class TiedDecoder(nn.Linear):
    """The MLM decoder whose weight is the word embedding: its weight gradient is not a view, so autograd adds it
    and the lookup's in place (``tied_linear``); while a ``TiedWordGradient`` is armed it reads the deferred table."""

    tied: TiedWordGradient | None = None

    def forward(self, x: Tensor) -> Tensor:
        deferred = None if torch.compiler.is_compiling() or self.tied is None else self.tied.weight
        return tied_linear(x, self, deferred)


def tie_sparse_word_gradient(model: nn.Module, lm_model: BertLMHeadModel) -> None:
    """Make ``lm_model``'s word lookup answer with sparse gradient rows during ``model``'s forward, whose loss must
    always read ``lm_model``'s (tied) decoder: there the rows are added into the decoder's dense gradient in place
    (module docstring). Without the decoder's part in the loss the weight's .grad would be left sparse."""
    table = lm_model.bert.embeddings.word_embeddings
    decoder = lm_model.cls.predictions.decoder
    assert decoder.weight is table.weight, "the decoder must be tied to the word embeddings"
    link = TiedWordGradient(table.weight)
    table.__class__ = SparseGradEmbedding
    decoder.__class__ = TiedDecoder
    table.tied = decoder.tied = link
    model.word_gradient = link
    model.register_forward_pre_hook(link.arm)
    model.register_forward_hook(link.disarm, always_call=True)


# ---- ITC against the queue -------------------------------------------------------------------------------------------
class _BankContrastive(torch.autograd.Function):
    """Cross-entropy of the logits ``feat @ bank / temp`` (B, C) against target distributions (B, C), averaged over
    rows, with its gradient formed in forward.

    The bank (E, C) holds this batch's momentum features and the whole queue (67 MB per modality at ALBEF's size).
    Autograd would keep it for the backward of the matmul, where the queue itself can no longer be used (it is
    overwritten in place right after the loss), so a copy would live until backward, at the step's memory peak.
    Forming d loss / d feat and d loss / d temp here keeps two small results instead: same maths, 134 MB less."""

    @staticmethod
    def forward(ctx: Any, feat: Tensor, temp: Tensor, bank: Tensor, targets: Tensor) -> Tensor:
        sim = feat @ bank / temp  # (B, C)
        log_p = F.log_softmax(sim, dim=1)
        loss = -(log_p * targets).sum(dim=1).mean()
        # d loss / d sim of the row-averaged soft cross-entropy; then sim = feat @ bank / temp gives the rest.
        grad_sim = (log_p.exp() * targets.sum(dim=1, keepdim=True) - targets) / feat.shape[0]
        ctx.save_for_backward((grad_sim @ bank.t() / temp).to(feat.dtype),
                              (-(grad_sim * sim).sum() / temp).to(temp.dtype))
        return loss

    @staticmethod
    def backward(ctx: Any, grad_loss: Tensor) -> tuple[Tensor, Tensor, None, None]:
        grad_feat, grad_temp = ctx.saved_tensors
        return grad_loss * grad_feat, grad_loss * grad_temp, None, None


def soft_contrastive_loss(feat: Tensor, temp: Tensor, bank: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy of the similarity logits ``feat @ bank / temp`` (B, C) against target distributions (B, C)
    (rows summing to 1 or not), averaged over rows; differentiable in ``feat`` and ``temp``, not in ``bank``."""
    return _BankContrastive.apply(feat, temp, bank, targets)
