"""models.gradcam: the Grad-CAM formula on crafted attention / gradients, the whole-text mean, the ITM, ITC, caption
and VQA heads on tiny models against the plain backward() computation, and heat -> box choice."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models import create_model
from models.gradcam import (
    attention_gradcam,
    caption_gradcam,
    compute_gradcam,
    itc_gradcam,
    itm_gradcam,
    resolve_block_num,
    text_gradcam,
    third_fusion_layer,
    vqa_gradcam,
)
from refTools import pick_box
from tests.test_models import SPECIAL, tiny_cfg


def tiny_model(tmp_path: Path) -> torch.nn.Module:
    """BERT of 4 layers with fusion from layer 2; ViT of 2 blocks on a 4 x 4 patch grid (32 px, patch 8)."""
    cfg = tiny_cfg(tmp_path, bert_overrides={"num_hidden_layers": 4, "fusion_layer": 2},
                   vit={"patch_size": 8, "width": 32, "depth": 2, "heads": 2})
    torch.manual_seed(0)
    return create_model("grounding", cfg, special=SPECIAL).eval()


def tiny_inputs(batch: int = 3, length: int = 6):
    gen = torch.Generator().manual_seed(1)
    image = torch.randn(batch, 3, 32, 32, generator=gen)
    ids = torch.randint(5, 60, (batch, length), generator=gen)
    ids[:, 0] = SPECIAL.cls
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, -2:] = 0  # two padding tokens in the second text
    ids[1, -2:] = SPECIAL.pad
    return image, ids, mask


def test_attention_gradcam_equals_the_formula() -> None:
    generator = torch.Generator().manual_seed(0)
    attention = torch.rand(2, 3, 4, 1 + 6, generator=generator)  # (B, nh, L, [CLS] + 2 x 3 patches)
    grad = torch.randn(2, 3, 4, 1 + 6, generator=generator)
    cams = attention_gradcam(attention, grad, (2, 3))
    assert cams.shape == (2, 4, 2, 3)
    for b in range(2):
        for t in range(4):
            for patch in range(6):
                expected = sum(attention[b, h, t, 1 + patch] * max(float(grad[b, h, t, 1 + patch]), 0.0)
                               for h in range(3)) / 3
                assert float(cams[b, t, patch // 3, patch % 3]) == pytest.approx(float(expected), abs=1e-6)
    # Negative gradients count as zero; the [CLS] key column never shows.
    assert attention_gradcam(attention, -grad.abs(), (2, 3)).abs().max() == 0
    with pytest.raises(ValueError, match=r"expected \[CLS\] \+ 3 x 3 patches"):
        attention_gradcam(attention, grad, (3, 3))


def test_text_gradcam_averages_the_words_only() -> None:
    token_maps = torch.zeros(2, 4, 1, 2)
    token_maps[:, 0] = 100.0  # [CLS]: left out
    token_maps[0, 1] = torch.tensor([[1.0, 0.0]])
    token_maps[0, 2] = torch.tensor([[3.0, 2.0]])
    token_maps[0, 3] = torch.tensor([[50.0, 50.0]])  # padding in text 0: left out
    token_maps[1, 1:] = torch.tensor([[2.0, 4.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    text_map = text_gradcam(token_maps, mask)
    assert text_map.tolist() == [[[2.0, 1.0]], [[2.0, 4.0]]]


def test_default_block_is_the_third_fusion_layer(tmp_path: Path) -> None:
    assert third_fusion_layer(12, 6) == 8  # ALBEF's block_num for BERT-base
    assert third_fusion_layer(4, 2) == 2  # never the last layer, where only [CLS] reaches the ITM head
    assert third_fusion_layer(2, 1) == 1
    model = tiny_model(tmp_path)
    assert resolve_block_num(model, None) == 2
    assert resolve_block_num(model, 3) == 3
    with pytest.raises(ValueError, match="block_num 1 is not a fusion layer.*2..3"):
        resolve_block_num(model, 1)


def test_itm_gradcam_equals_backward_through_saved_attention(tmp_path: Path) -> None:
    """The maps equal the formula on the attention map and the gradient that a plain backward() stores through
    BertSelfAttention.save_attention; no parameter gradient is left behind and the flag is restored."""
    model = tiny_model(tmp_path)
    image, ids, mask = tiny_inputs()
    with torch.no_grad():
        image_embeds = model.encode_image(image)
    maps = itm_gradcam(model, image_embeds, ids, mask, block_num=2)
    cross = model.text_encoder.encoder.layer[2].crossattention.self
    assert not cross.save_attention and cross.attention_map is None
    assert all(param.grad is None for param in model.parameters())

    cross.save_attention = True
    fused = model.fuse(model.encode_text(ids, mask), mask, image_embeds)
    logits = model.itm_head(fused[:, 0, :])
    logits[:, 1].sum().backward()
    attention, grad = cross.attention_map.detach(), cross.attention_grad  # (B, nh, L, 1 + 16)
    cross.save_attention = False
    expected = (attention * grad.clamp(min=0)).mean(1)[..., 1:].reshape(3, 6, 4, 4) * mask[:, :, None, None]
    torch.testing.assert_close(maps.token_maps, expected)
    words = mask.clone()
    words[:, 0] = 0
    expected_text = (expected * words[:, :, None, None]).sum(1) / words.sum(1)[:, None, None]
    torch.testing.assert_close(maps.text_map, expected_text)
    torch.testing.assert_close(maps.score, logits[:, 1].detach())
    torch.testing.assert_close(maps.match_prob, logits.detach().softmax(-1)[:, 1])
    assert maps.token_maps[1, -2:].abs().max() == 0  # padding
    assert maps.text_map.abs().sum() > 0


def test_itc_gradcam_equals_backward_through_retained_attention(tmp_path: Path) -> None:
    model = tiny_model(tmp_path)
    image, ids, mask = tiny_inputs()
    model.requires_grad_(False)  # works with frozen weights too
    attn = model.visual_encoder.blocks[-1].attn
    fused_before = attn.fused_attn
    maps = itc_gradcam(model, image, ids, mask)
    assert attn.fused_attn == fused_before and not attn.attn_drop._forward_hooks
    kept = []

    def keep(module, inputs, output):
        output.retain_grad()
        kept.append(output)

    model.requires_grad_(True)
    handle = attn.attn_drop.register_forward_hook(keep)
    fused = attn.fused_attn
    attn.fused_attn = False
    image_feat = model.image_feat(model.encode_image(image))
    text_feat = model.text_feat(model.encode_text(ids, mask))
    ((image_feat * text_feat).sum(-1) / model.temp).sum().backward()
    handle.remove()
    attn.fused_attn = fused
    attention, grad = kept[0].detach(), kept[0].grad  # (B, nh, 17, 17)
    expected = (attention[:, :, 0, 1:] * grad[:, :, 0, 1:].clamp(min=0)).mean(1).reshape(3, 4, 4)
    torch.testing.assert_close(maps.text_map, expected)
    assert maps.token_maps is None and maps.text_map.abs().sum() > 0


def test_gradcam_keeps_model_state_and_runs_under_no_grad(tmp_path: Path) -> None:
    model = tiny_model(tmp_path)
    image, ids, mask = tiny_inputs()
    fused_before = [block.attn.fused_attn for block in model.visual_encoder.blocks]
    with torch.no_grad():  # the engine evaluates under no_grad
        itm = compute_gradcam(model, image, ids, mask, "itm")
        itc = compute_gradcam(model, image, ids, mask, "itc", vit_block=0)
    assert itm.text_map.shape == itc.text_map.shape == (3, 4, 4)
    assert [block.attn.fused_attn for block in model.visual_encoder.blocks] == fused_before
    with pytest.raises(ValueError, match="mode must be one of"):
        compute_gradcam(model, image, ids, mask, "gradient")
    with pytest.raises(ValueError, match="vit_block 5 is out of range"):
        compute_gradcam(model, image, ids, mask, "itc", vit_block=5)


def test_box_scoring_picks_the_box_under_the_heat() -> None:
    """A text map hot on one patch of a 4 x 4 grid, upsampled to a 64 x 64 image, selects the proposal there."""
    token_maps = torch.zeros(1, 3, 4, 4)
    token_maps[0, 1, 2, 3] = 1.0  # word 1: patch row 2, column 3 = pixels y 32..48, x 48..64
    token_maps[0, 2, 2, 3] = 0.5
    token_maps[0, 2, 0, 0] = 0.2
    heat = torch.nn.functional.interpolate(text_gradcam(token_maps, torch.ones(1, 3))[None], size=(64, 64),
                                           mode="bicubic")[0, 0]
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0], [48.0, 32.0, 16.0, 16.0], [20.0, 20.0, 20.0, 20.0],
                          [0.0, 0.0, 64.0, 64.0]])
    assert pick_box(heat, boxes).tolist() == [48.0, 32.0, 16.0, 16.0]


def _tiny_head(tmp_path: Path, task: str) -> torch.nn.Module:
    cfg = tiny_cfg(tmp_path, bert_overrides={"num_hidden_layers": 4, "fusion_layer": 2},
                   vit={"patch_size": 8, "width": 32, "depth": 2, "heads": 2})
    torch.manual_seed(0)
    return create_model(task, cfg, special=SPECIAL).eval()


def test_caption_gradcam_equals_one_backward_per_token(tmp_path: Path) -> None:
    """Each caption token's map is the formula summed over the query rows, on the decoder's cross-attention and the
    gradient of that token's log-probability alone (a plain backward() per token); the maps differ between tokens,
    a token's map does not depend on the tokens after it (causal), nothing is left on the model."""
    model = _tiny_head(tmp_path, "caption")
    image = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    ids = torch.tensor([[SPECIAL.cls, 10, 11, 20, 21, 22, SPECIAL.sep]])  # [CLS] prompt(2) caption(3) [SEP]
    mask = torch.ones_like(ids)
    result = caption_gradcam(model, image, ids, mask, prompt_length=3, block_num=2)
    assert result.positions == [3, 4, 5, 6] and result.token_ids == [20, 21, 22, SPECIAL.sep]
    assert result.token_maps.shape == (4, 4, 4)
    cross = model.text_decoder.bert.encoder.layer[2].crossattention.self
    assert not cross.save_attention and all(param.grad is None for param in model.parameters())
    for index, position in enumerate(result.positions):
        cross.save_attention = True
        states = model.encode_image(image).detach().requires_grad_(True)
        logits = model.text_decoder(ids, mask, encoder_hidden_states=states)
        log_prob = logits[0, position - 1].log_softmax(-1)[ids[0, position]]
        log_prob.backward()
        attention, grad = cross.attention_map.detach(), cross.attention_grad
        cross.save_attention = False
        expected = (attention * grad.clamp(min=0)).mean(1)[0, :, 1:].sum(0).reshape(4, 4)
        torch.testing.assert_close(result.token_maps[index], expected)
        torch.testing.assert_close(result.log_probs[index], log_prob.detach())
        assert grad[0, :, position:].abs().max() == 0  # rows from t on do not predict x_t
    for first, second in zip(result.token_maps[:-1], result.token_maps[1:], strict=True):
        assert not torch.allclose(first / first.max(), second / second.max())
    changed = ids.clone()
    changed[0, 5] = 30
    again = caption_gradcam(model, image, changed, mask, prompt_length=3, block_num=2)
    torch.testing.assert_close(again.token_maps[:2], result.token_maps[:2])  # x_3, x_4 do not see x_5
    assert not torch.allclose(again.token_maps[2], result.token_maps[2])
    with pytest.raises(ValueError, match="out of range for the caption decoder"):
        caption_gradcam(model, image, ids, mask, prompt_length=3, block_num=4)


def test_vqa_gradcam_equals_backward_of_the_answer_likelihood(tmp_path: Path) -> None:
    """The answer's map: the formula on the question encoder's cross-attention and the gradient of the answer's
    log-likelihood, summed over the question's tokens; padding rows are zero."""
    model = _tiny_head(tmp_path, "vqa")
    image, ids, mask = tiny_inputs(batch=2, length=6)
    answer = torch.tensor([[SPECIAL.cls, 40, SPECIAL.sep], [SPECIAL.cls, 41, SPECIAL.sep]])
    answer_mask = torch.ones_like(answer)
    maps = vqa_gradcam(model, image, ids, mask, answer, answer_mask)
    block = third_fusion_layer(4, 2)
    cross = model.text_encoder.encoder.layer[block].crossattention.self
    cross.save_attention = True
    states = model.text_encoder(ids, mask, encoder_hidden_states=model.encode_image(image).detach().requires_grad_())
    logits = model.text_decoder(answer, answer_mask, encoder_hidden_states=states, encoder_attention_mask=mask)
    log_likelihood = logits[:, :-1].log_softmax(-1).gather(2, answer[:, 1:, None])[..., 0].sum(1)  # (B,)
    log_likelihood.sum().backward()
    attention, grad = cross.attention_map.detach(), cross.attention_grad
    cross.save_attention = False
    expected = (attention * grad.clamp(min=0)).mean(1)[..., 1:].reshape(2, 6, 4, 4) * mask[:, :, None, None]
    torch.testing.assert_close(maps.token_maps, expected)
    torch.testing.assert_close(maps.text_map, expected.sum(1))
    torch.testing.assert_close(maps.score, log_likelihood.detach())
    assert maps.token_maps[1, -2:].abs().max() == 0 and maps.text_map.abs().min() >= 0
    with pytest.raises(ValueError, match="not a fusion layer"):
        vqa_gradcam(model, image, ids, mask, answer, answer_mask, block_num=1)
