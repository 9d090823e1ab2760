"""Grad-CAM for ALBEF models: which image patches a text's match score comes from. Used by Grounding.py (heat map
per referring expression) and Predict.py / the demo (heat map per word); there is no second copy.

``itm`` mode (ALBEF's grounding default): the cross-attention of one BERT layer (``block_num``, an index into all the
text encoder's layers; ALBEF uses 8, the third fusion layer of BERT-base with fusion_layer 6) is computed explicitly
(``BertSelfAttention.save_attention``), the ITM 'match' logit is differentiated w.r.t. that attention map, and

    cam[b, t] = mean over heads of  attention[b, :, t, 1:] * grad[b, :, t, 1:].clamp(min=0)

is the map of text token t over the patch grid (the image [CLS] column is dropped). The whole-text map is the mean
over the words: every token except [CLS] and padding.

``itc`` mode: the same formula on the image encoder's self-attention of one block (the last by default), for the
[CLS] query row, differentiating the image-text similarity ``image_feat . text_feat / temp``. timm computes that
attention fused (no probabilities exist), so the block's ``fused_attn`` is switched off for the call and a forward
hook on its ``attn_drop`` (which receives the softmax probabilities) captures them.

``caption`` (a captioning model, models.model_caption): the decoder's cross-attention to the image in one layer
(default: the same layer index as itm's, whose cross-attention the decoder took over from the text encoder). For
each scored token t of a caption (teacher-forced: [CLS] prompt caption), the log-probability log p(x_t | x_<t, image)
is differentiated w.r.t. that layer's attention map, and its map is the formula above summed over the query rows
(causal: only the rows before t get a gradient). The T tokens are T copies of the sequence in one batch, each
differentiating its own token, so that one backward pass gives every token's map.

``vqa`` (a VQA model, models.model_vqa): the answer decoder reads the question states, not the image, so the image
enters through the question encoder's fusion layers: the answer's log-likelihood (the summed log-probabilities of its
tokens, as VQA.py ranks answers) is differentiated w.r.t. the cross-attention of one fusion layer of the question
encoder (default: the third, as itm). Each question token's row gives a map (which regions that word read for this
answer), and the answer's map is their sum over the question's tokens, [CLS] included: the Grad-CAM of the whole map.

Gradients are taken with ``torch.autograd.grad`` w.r.t. the attention map only: no parameter ``.grad`` is touched
(safe inside DDP and between training steps), only the layers after the map are back-propagated, and it works
inside the engine's ``torch.no_grad()`` evaluation and with frozen parameters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.xbert import decoder_nll

GRADCAM_MODES = ("itm", "itc")  # the modes of an ITM model (compute_gradcam)
GRADCAM_HEADS = ("itm", "itc", "caption", "vqa")  # every head that has a Grad-CAM


@dataclass
class GradCamMaps:
    """Grad-CAM of a batch of (image, text) pairs over the (h, w) patch grid."""

    text_map: Tensor  # (B, h, w) the whole text
    token_maps: Tensor | None  # (B, L, h, w) one map per text token (itm mode; zeros at padding), None in itc mode
    score: Tensor  # (B,) the differentiated score: ITM 'match' logit (itm) or image-text similarity / temp (itc)
    match_prob: Tensor | None  # (B,) softmax probability of 'match' from the ITM head (itm mode), else None


def third_fusion_layer(num_hidden_layers: int, fusion_layer: int) -> int:
    """ALBEF's default Grad-CAM layer: the third fusion layer (8 for BERT-base with fusion_layer 6). A smaller fusion
    encoder gets its last-but-one layer: in the last layer only the [CLS] row reaches the ITM head, so the word rows
    would get no gradient at all."""
    return min(fusion_layer + 2, max(fusion_layer, num_hidden_layers - 2))


def resolve_block_num(model: nn.Module, block_num: int | None) -> int:
    """``block_num`` checked against the model's text encoder (None = the third fusion layer)."""
    config = model.text_bert.config
    if block_num is None:
        return third_fusion_layer(config.num_hidden_layers, config.fusion_layer)
    if not config.fusion_layer <= block_num < config.num_hidden_layers:
        raise ValueError(f"gradcam block_num {block_num} is not a fusion layer: the text encoder's cross-attention "
                         f"layers are {config.fusion_layer}..{config.num_hidden_layers - 1}")
    return block_num


def patch_grid(model: nn.Module) -> tuple[int, int]:
    """(h, w) patches of the model's image encoder."""
    grid = model.visual_encoder.patch_embed.grid_size
    return int(grid[0]), int(grid[1])


def attention_gradcam(attention: Tensor, grad: Tensor, grid: tuple[int, int]) -> Tensor:
    """Grad-CAM of an attention map: (B, nh, Lq, 1 + N) attention and its gradient -> (B, Lq, h, w) maps.

    Positive gradients times attention, averaged over heads; the first key (the image [CLS] token) is dropped and
    the N = h * w patch columns are laid out on the grid."""
    if attention.shape != grad.shape or attention.dim() != 4:
        raise ValueError(f"attention and grad must both be (B, nh, Lq, 1 + N), got {tuple(attention.shape)} and "
                         f"{tuple(grad.shape)}")
    height, width = grid
    if attention.shape[-1] != 1 + height * width:
        raise ValueError(f"attention has {attention.shape[-1]} keys, expected [CLS] + {height} x {width} patches")
    cam = (attention.float() * grad.float().clamp(min=0)).mean(dim=1)  # (B, Lq, 1 + N)
    return cam[..., 1:].reshape(cam.shape[0], cam.shape[1], height, width)


def text_gradcam(token_maps: Tensor, attention_mask: Tensor) -> Tensor:
    """Whole-text map: the mean of (B, L, h, w) token maps over the words (tokens 1.. where attention_mask is set,
    i.e. without [CLS] and padding) -> (B, h, w)."""
    weights = attention_mask.to(token_maps.dtype).clone()  # (B, L)
    weights[:, 0] = 0.0  # [CLS]
    return torch.einsum("blhw,bl->bhw", token_maps, weights) / weights.sum(dim=1).clamp(min=1.0)[:, None, None]


@contextlib.contextmanager
def _saving_attention(attention_module: nn.Module) -> Iterator[None]:
    previous = attention_module.save_attention
    attention_module.save_attention = True
    try:
        yield
    finally:
        attention_module.save_attention = previous
        attention_module.attention_map = None  # drop the graph it holds
        attention_module.attention_grad = None


def itm_gradcam(model: nn.Module, image_embeds: Tensor, input_ids: Tensor, attention_mask: Tensor,
                block_num: int | None = None) -> GradCamMaps:
    """Grad-CAM of the ITM match logit w.r.t. the cross-attention of layer ``block_num`` (None = third fusion layer).

    image_embeds (B, 1 + N, D_v) from ``model.encode_image`` (no gradient needed), input_ids / attention_mask (B, L).
    """
    block_num = resolve_block_num(model, block_num)
    cross = model.text_bert.encoder.layer[block_num].crossattention.self
    with torch.no_grad():
        text_embeds = model.encode_text(input_ids, attention_mask)  # (B, L, D_t)
    with torch.enable_grad(), _saving_attention(cross):
        # A leaf that requires grad makes the attention map differentiable even with frozen parameters.
        text_embeds = text_embeds.detach().requires_grad_(True)
        fused = model.fuse(text_embeds, attention_mask, image_embeds.detach())
        logits = model.itm_head(fused[:, 0, :]).float()  # (B, 2)
        attention = cross.attention_map  # (B, nh, L, 1 + N)
        (grad,) = torch.autograd.grad(logits[:, 1].sum(), attention)
    mask = attention_mask[:, :, None, None].float()
    token_maps = attention_gradcam(attention.detach(), grad, patch_grid(model)) * mask  # (B, L, h, w)
    return GradCamMaps(text_map=text_gradcam(token_maps, attention_mask), token_maps=token_maps,
                       score=logits[:, 1].detach(), match_prob=logits.detach().softmax(dim=-1)[:, 1])


def itc_gradcam(model: nn.Module, image: Tensor, input_ids: Tensor, attention_mask: Tensor,
                vit_block: int = -1) -> GradCamMaps:
    """Grad-CAM of the image-text similarity w.r.t. the [CLS] row of the image encoder's attention in block
    ``vit_block`` (python index; -1 = the last block). image: normalised (B, 3, H, W)."""
    vit = model.visual_encoder
    num_blocks = len(vit.blocks)
    if not -num_blocks <= vit_block < num_blocks:
        raise ValueError(f"gradcam vit_block {vit_block} is out of range for an image encoder of {num_blocks} blocks")
    attn = vit.blocks[vit_block].attn
    captured: list[Tensor] = []
    handle = attn.attn_drop.register_forward_hook(lambda module, inputs, output: captured.append(output))
    fused, checkpointing = attn.fused_attn, vit.grad_checkpointing
    attn.fused_attn = False  # the probabilities exist only on the unfused path
    vit.grad_checkpointing = False  # a recomputed forward would call the hook again
    try:
        with torch.no_grad():
            text_feat = model.text_feat(model.encode_text(input_ids, attention_mask))  # (B, E)
        with torch.enable_grad():
            image_embeds = model.encode_image(image.detach().requires_grad_(True))
            similarity = (model.image_feat(image_embeds).float() * text_feat.float()).sum(-1) / model.temp.float()
            (grad,) = torch.autograd.grad(similarity.sum(), captured[-1])
    finally:
        handle.remove()
        attn.fused_attn, vit.grad_checkpointing = fused, checkpointing
    cls_maps = attention_gradcam(captured[-1].detach()[:, :, :1], grad[:, :, :1], patch_grid(model))  # (B, 1, h, w)
    return GradCamMaps(text_map=cls_maps[:, 0], token_maps=None, score=similarity.detach(), match_prob=None)


def compute_gradcam(model: nn.Module, image: Tensor, input_ids: Tensor, attention_mask: Tensor, mode: str = "itm",
                    block_num: int | None = None, vit_block: int = -1) -> GradCamMaps:
    """Grad-CAM of normalised images (B, 3, H, W) and their texts in ``mode`` 'itm' or 'itc' (see the module)."""
    if mode == "itm":
        with torch.no_grad():
            image_embeds = model.encode_image(image)
        return itm_gradcam(model, image_embeds, input_ids, attention_mask, block_num)
    if mode == "itc":
        return itc_gradcam(model, image, input_ids, attention_mask, vit_block)
    raise ValueError(f"gradcam mode must be one of {GRADCAM_MODES}, got {mode!r}")


@dataclass
class CaptionGradCam:
    """Grad-CAM of the tokens of one caption over the (h, w) patch grid."""

    positions: list[int]  # the scored positions t of the sequence (after the prompt, up to the last real token)
    token_ids: list[int]  # the token x_t at each position
    token_maps: Tensor  # (T, h, w) one map per scored token
    log_probs: Tensor  # (T,) log p(x_t | x_<t, image)


def _decoder_block(num_layers: int, fusion_layer: int, block_num: int | None, what: str) -> int:
    if block_num is None:
        return third_fusion_layer(num_layers, fusion_layer)
    if not 0 <= block_num < num_layers:
        raise ValueError(f"gradcam block_num {block_num} is out of range for {what} of {num_layers} layers "
                         f"(0..{num_layers - 1})")
    return block_num


def caption_gradcam(model: nn.Module, image: Tensor, input_ids: Tensor, attention_mask: Tensor, prompt_length: int,
                    block_num: int | None = None) -> CaptionGradCam:
    """Grad-CAM of every caption token of one sequence (see the module, ``caption``).

    image: normalised (1, 3, H, W); input_ids / attention_mask (1, L): [CLS] prompt caption (an end token may follow:
    it is scored too); ``prompt_length``: the tokens that are context ([CLS] + prompt). ``block_num``: the decoder
    layer (None = the text encoder's third fusion layer index, clamped to the decoder)."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1 or image.shape[0] != 1:
        raise ValueError(f"caption_gradcam explains one caption of one image: got image {tuple(image.shape)} and "
                         f"input_ids {tuple(input_ids.shape)}")
    decoder = model.text_decoder.bert
    block_num = _decoder_block(decoder.config.num_hidden_layers, model.bert_config.fusion_layer, block_num,
                               "the caption decoder")
    length = int(attention_mask[0].sum())
    positions = list(range(max(prompt_length, 1), length))
    if not positions:
        raise ValueError(f"nothing to explain: the sequence has {length} tokens and a prompt of {prompt_length}")
    count = len(positions)
    cross = decoder.encoder.layer[block_num].crossattention.self
    with torch.no_grad():
        image_embeds = model.encode_image(image)  # (1, 1 + N, D_v)
    rows = torch.arange(count, device=input_ids.device)
    targets = torch.tensor(positions, device=input_ids.device)  # (T,)
    with torch.enable_grad(), _saving_attention(cross):
        # The T copies share the image; a leaf that requires grad makes the attention differentiable.
        states = image_embeds.detach().expand(count, -1, -1).clone().requires_grad_(True)
        hidden = decoder(input_ids.expand(count, -1), attention_mask.expand(count, -1),
                         encoder_hidden_states=states)  # (T, L, D)
        logits = model.text_decoder.cls(hidden[rows, targets - 1]).float()  # (T, V): the prediction of x_t
        log_probs = logits.log_softmax(dim=-1)[rows, input_ids[0, targets]]  # (T,)
        attention = cross.attention_map  # (T, nh, L, 1 + N)
        (grad,) = torch.autograd.grad(log_probs.sum(), attention)
    maps = attention_gradcam(attention.detach(), grad, patch_grid(model))  # (T, L, h, w)
    return CaptionGradCam(positions=positions, token_ids=input_ids[0, targets].tolist(), token_maps=maps.sum(dim=1),
                          log_probs=log_probs.detach())


def vqa_gradcam(model: nn.Module, image: Tensor, input_ids: Tensor, attention_mask: Tensor, answer_ids: Tensor,
                answer_mask: Tensor, block_num: int | None = None) -> GradCamMaps:
    """Grad-CAM of the answers' log-likelihood (see the module, ``vqa``).

    image: normalised (B, 3, H, W); input_ids / attention_mask (B, Lq): the questions; answer_ids / answer_mask
    (B, La): one answer per question, [CLS] answer [SEP] (as VQA.py tokenizes the answer list). Returns the answer's
    map as ``text_map`` (B, h, w), the map of each question token (B, Lq, h, w; zeros at padding) and the
    log-likelihood as ``score`` (B,)."""
    encoder = model.text_encoder
    config = encoder.config
    if block_num is None:
        block_num = third_fusion_layer(config.num_hidden_layers, config.fusion_layer)
    elif not config.fusion_layer <= block_num < config.num_hidden_layers:
        raise ValueError(f"gradcam block_num {block_num} is not a fusion layer: the question encoder's "
                         f"cross-attention layers are {config.fusion_layer}..{config.num_hidden_layers - 1}")
    cross = encoder.encoder.layer[block_num].crossattention.self
    with torch.no_grad():
        image_embeds = model.encode_image(image)
    labels = answer_ids.masked_fill(answer_mask == 0, -100)
    with torch.enable_grad(), _saving_attention(cross):
        states = encoder(input_ids, attention_mask, encoder_hidden_states=image_embeds.detach().requires_grad_(True))
        logits = model.text_decoder(answer_ids, answer_mask, encoder_hidden_states=states,
                                    encoder_attention_mask=attention_mask)
        log_likelihood = -decoder_nll(logits.float(), labels)  # (B,)
        attention = cross.attention_map  # (B, nh, Lq, 1 + N)
        (grad,) = torch.autograd.grad(log_likelihood.sum(), attention)
    token_maps = attention_gradcam(attention.detach(), grad, patch_grid(model))
    token_maps = token_maps * attention_mask[:, :, None, None].to(token_maps.dtype)
    return GradCamMaps(text_map=token_maps.sum(dim=1), token_maps=token_maps, score=log_likelihood.detach(),
                       match_prob=None)
