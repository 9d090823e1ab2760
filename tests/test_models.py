"""Behaviour of the ALBEF models: official key set, losses, momentum, queues, hard negatives, and the fast paths
(shared image key/values, one batched ITM pass, masked-only MLM) equal to the straightforward computations."""

from __future__ import annotations

import copy
import json
import re
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import create_model, load_checkpoint
from models.albef import SpecialTokens, momentum_update, sample_hard_negatives, soft_contrastive_loss
from models.xbert import BertConfig

REPO = Path(__file__).resolve().parents[1]
SPECIAL = SpecialTokens(pad=0, cls=2, sep=3, mask=4, vocab_size=60)


def tiny_cfg(tmp_path: Path, **changes) -> dict:
    bert = {"hidden_size": 32, "num_hidden_layers": 3, "fusion_layer": 1, "num_attention_heads": 2,
            "intermediate_size": 64, "encoder_width": 32, "vocab_size": 60, "max_position_embeddings": 64}
    path = tmp_path / "bert.json"
    path.write_text(json.dumps(bert))
    cfg = {"bert_config": str(path), "text_encoder": "", "tokenizer": "", "image_res": 32, "embed_dim": 16,
           "queue_size": 16, "vit": {"patch_size": 16, "width": 32, "depth": 1, "heads": 2}}
    cfg.update(changes)
    return cfg


def tiny_batch(batch: int = 4, length: int = 7, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    image = torch.randn(batch, 3, 32, 32, generator=gen)
    ids = torch.randint(5, 60, (batch, length), generator=gen)
    ids[:, 0] = SPECIAL.cls
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, -2:] = 0
    ids[1, -2:] = SPECIAL.pad
    return image, ids, mask


def official_pretrain_keys() -> dict[str, tuple[int, ...]]:
    """The key names and shapes of ALBEF.pth (ViT-B/16 at 256 px, BERT-base with fusion from layer 6, embed 256,
    queue 65536), written out from the published architecture."""
    keys: dict[str, tuple[int, ...]] = {"temp": (), "image_queue": (256, 65536), "text_queue": (256, 65536),
                                        "queue_ptr": (1,)}
    for m in ("", "_m"):
        vit = f"visual_encoder{m}."
        keys.update({vit + "cls_token": (1, 1, 768), vit + "pos_embed": (1, 257, 768),
                     vit + "patch_embed.proj.weight": (768, 3, 16, 16), vit + "patch_embed.proj.bias": (768,),
                     vit + "norm.weight": (768,), vit + "norm.bias": (768,)})
        for b in range(12):
            blk = f"{vit}blocks.{b}."
            keys.update({blk + "norm1.weight": (768,), blk + "norm1.bias": (768,),
                         blk + "attn.qkv.weight": (2304, 768), blk + "attn.qkv.bias": (2304,),
                         blk + "attn.proj.weight": (768, 768), blk + "attn.proj.bias": (768,),
                         blk + "norm2.weight": (768,), blk + "norm2.bias": (768,),
                         blk + "mlp.fc1.weight": (3072, 768), blk + "mlp.fc1.bias": (3072,),
                         blk + "mlp.fc2.weight": (768, 3072), blk + "mlp.fc2.bias": (768,)})
        bert = f"text_encoder{m}.bert."
        keys.update({bert + "embeddings.position_ids": (1, 512),
                     bert + "embeddings.word_embeddings.weight": (30522, 768),
                     bert + "embeddings.position_embeddings.weight": (512, 768),
                     bert + "embeddings.token_type_embeddings.weight": (2, 768),
                     bert + "embeddings.LayerNorm.weight": (768,), bert + "embeddings.LayerNorm.bias": (768,)})
        for layer in range(12):
            blocks = ["attention"] + (["crossattention"] if layer >= 6 else [])
            pre = f"{bert}encoder.layer.{layer}."
            for block in blocks:
                for lin in ("self.query", "self.key", "self.value", "output.dense"):
                    keys[f"{pre}{block}.{lin}.weight"] = (768, 768)
                    keys[f"{pre}{block}.{lin}.bias"] = (768,)
                keys[f"{pre}{block}.output.LayerNorm.weight"] = (768,)
                keys[f"{pre}{block}.output.LayerNorm.bias"] = (768,)
            keys.update({pre + "intermediate.dense.weight": (3072, 768), pre + "intermediate.dense.bias": (3072,),
                         pre + "output.dense.weight": (768, 3072), pre + "output.dense.bias": (768,),
                         pre + "output.LayerNorm.weight": (768,), pre + "output.LayerNorm.bias": (768,)})
        cls = f"text_encoder{m}.cls.predictions."
        keys.update({cls + "bias": (30522,), cls + "transform.dense.weight": (768, 768),
                     cls + "transform.dense.bias": (768,), cls + "transform.LayerNorm.weight": (768,),
                     cls + "transform.LayerNorm.bias": (768,), cls + "decoder.weight": (30522, 768),
                     cls + "decoder.bias": (30522,)})
        for proj, width in (("vision_proj", 768), ("text_proj", 768)):
            keys[f"{proj}{m}.weight"] = (256, width)
            keys[f"{proj}{m}.bias"] = (256,)
    keys.update({"itm_head.weight": (2, 768), "itm_head.bias": (2,)})
    return keys


def test_base_pretrain_model_has_exactly_the_official_keys_and_shapes():
    cfg = {"bert_config": str(REPO / "configs" / "config_bert.json"), "text_encoder": "", "image_res": 256,
           "embed_dim": 256, "queue_size": 65536}
    with torch.device("meta"):
        model = create_model("pretrain", cfg, special=SpecialTokens())
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = official_pretrain_keys()
    assert sorted(set(ours) ^ set(expected)) == []
    assert ours == expected


def test_config_bert_json_is_albefs():
    config = BertConfig.from_json_file(REPO / "configs" / "config_bert.json")
    assert (config.fusion_layer, config.encoder_width, config.num_hidden_layers) == (6, 768, 12)


def test_each_pretraining_loss_is_finite_and_decreases_on_a_repeated_batch(tmp_path):
    torch.manual_seed(0)
    model = create_model("pretrain", tiny_cfg(tmp_path), special=SPECIAL)
    image, ids, mask = tiny_batch()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    history = []
    for _ in range(25):
        torch.manual_seed(1)  # same masks and negatives every step: a repeated batch
        losses = model(image, ids, mask, alpha=0.4)
        assert all(torch.isfinite(v) for v in losses.values())
        history.append({k: v.item() for k, v in losses.items()})
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    for name in ("loss_ita", "loss_itm", "loss_mlm"):
        assert history[-1][name] < 0.8 * history[0][name], (name, history[0][name], history[-1][name])


def test_momentum_update_equals_its_formula():
    online = [torch.randn(3, 4), torch.randn(5)]
    momentum = [torch.randn(3, 4), torch.randn(5)]
    expected = [0.9 * m + 0.1 * p for p, m in zip(online, momentum, strict=True)]
    momentum_update(online, momentum, 0.9)
    for got, want in zip(momentum, expected, strict=True):
        torch.testing.assert_close(got, want)


def test_model_momentum_update_moves_every_momentum_parameter(tmp_path):
    model = create_model("pretrain", tiny_cfg(tmp_path, momentum=0.5), special=SPECIAL)
    with torch.no_grad():
        for p in model.visual_encoder.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.visual_encoder_m.parameters()]
    model.momentum_update()
    for b, p_m, p in zip(before, model.visual_encoder_m.parameters(), model.visual_encoder.parameters(), strict=True):
        torch.testing.assert_close(p_m, 0.5 * b + 0.5 * p)
        assert not p_m.requires_grad


def test_queue_pointer_wraps_and_features_land_in_order(tmp_path):
    model = create_model("pretrain", tiny_cfg(tmp_path, queue_size=6), special=SPECIAL)
    feats = [F.normalize(torch.randn(4, 16), dim=1) for _ in range(2)]
    model.dequeue_and_enqueue(feats[0], feats[0])
    assert model.queue_ptr.item() == 4
    model.dequeue_and_enqueue(feats[1], feats[1])
    assert model.queue_ptr.item() == 2  # (4 + 4) % 6
    torch.testing.assert_close(model.image_queue[:, 4:6], feats[1][:2].T)
    torch.testing.assert_close(model.image_queue[:, 0:2], feats[1][2:].T)
    torch.testing.assert_close(model.text_queue[:, 2:4], feats[0][2:].T)


def test_hard_negatives_never_pick_a_positive():
    torch.manual_seed(0)
    idx = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4])
    positive = idx[:, None] == idx[None, :]
    sim = torch.randn(8, 8) * 5 + 20 * positive.float()  # positives are by far the most similar
    for _ in range(50):
        picks = sample_hard_negatives(sim, positive, eps=1e-4)
        assert not positive[torch.arange(8), picks].any()
    diag = torch.eye(8, dtype=torch.bool)
    for _ in range(50):
        picks = sample_hard_negatives(sim, diag, eps=0.0)
        assert (picks != torch.arange(8)).all()


def test_random_negative_share_mixes_uniform_draws_into_hard_ones():
    """model.itm_random_negatives: row 0's similarities make column 1 the only hard negative. With share 0 it is
    always drawn; with share s the other non-positive columns (2..7) get s * 6/7 of the draws between them."""
    sim = torch.full((8, 8), -50.0)
    sim[0, 1] = 50.0
    diag = torch.eye(8, dtype=torch.bool)
    torch.manual_seed(0)
    hard = torch.stack([sample_hard_negatives(sim, diag, eps=0.0) for _ in range(200)])
    assert (hard[:, 0] == 1).all()
    torch.manual_seed(0)
    mixed = torch.stack([sample_hard_negatives(sim, diag, eps=0.0, random_share=0.5) for _ in range(4000)])
    others = float((mixed[:, 0] >= 2).double().mean())
    assert abs(others - 0.5 * 6 / 7) < 0.03, others  # ~4 standard errors
    assert (mixed != torch.arange(8)).all()  # never a positive
    uniform = torch.stack([sample_hard_negatives(sim, diag, eps=0.0, random_share=1.0) for _ in range(4000)])
    counts = torch.bincount(uniform[:, 0], minlength=8)
    assert counts[0] == 0 and (counts[1:] - 4000 / 7).abs().max() < 120, counts


def test_random_negative_share_is_checked(tmp_path):
    with pytest.raises(ValueError, match="itm_random_negatives"):
        create_model("pretrain", tiny_cfg(tmp_path, itm_random_negatives=1.5), special=SPECIAL)


def test_batched_itm_with_shared_image_kv_equals_looped_per_pair_passes(tmp_path):
    """The fast ITM (one fusion pass of 3B pairs over precomputed image key/values) equals fusing each pair on its
    own from the image tokens, with the same negative draws."""
    torch.manual_seed(0)
    model = create_model("pretrain", tiny_cfg(tmp_path), special=SPECIAL).eval()
    image, ids, mask = tiny_batch()
    neg_image = torch.tensor([1, 2, 3, 0])
    neg_text = torch.tensor([3, 0, 1, 2])
    with torch.no_grad():
        image_embeds = model.encode_image(image)
        text_embeds = model.encode_text(ids, mask)
        fast = model.matching_loss(image_embeds, text_embeds, mask, neg_image_for_text=neg_image,
                                   neg_text_for_image=neg_text)
        logits, labels = [], []
        for b in range(4):
            pairs = [(b, b, 1), (b, int(neg_image[b]), 0)]
            for t, i, label in pairs:
                fused = model.fuse(text_embeds[t:t + 1], mask[t:t + 1], image_embeds[i:i + 1])
                logits.append(model.itm_head(fused[:, 0, :]))
                labels.append(label)
        for b in range(4):
            t = int(neg_text[b])
            fused = model.fuse(text_embeds[t:t + 1], mask[t:t + 1], image_embeds[b:b + 1])
            logits.append(model.itm_head(fused[:, 0, :]))
            labels.append(0)
        slow = F.cross_entropy(torch.cat(logits), torch.tensor(labels))
    torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)



def test_mlm_sharing_the_itm_passes_equals_a_separate_mlm_pass(tmp_path):
    """Pretraining runs the masked texts through the same text and fusion passes as ITC/ITM; losses and every
    gradient equal a separate MLM pass over the shared image key/values (dropout off, same negatives and masks)."""
    from models.albef import mask_tokens

    torch.manual_seed(0)
    merged = create_model("pretrain", tiny_cfg(tmp_path), special=SPECIAL).eval()
    separate = copy.deepcopy(merged)
    image, ids, mask = tiny_batch()
    negatives = {"neg_image_for_text": torch.tensor([1, 2, 3, 0]), "neg_text_for_image": torch.tensor([3, 0, 1, 2])}
    mlm_ids, mlm_labels = mask_tokens(ids, SPECIAL, 0.5, generator=torch.Generator().manual_seed(0))
    assert (mlm_labels != -100).any()

    losses = merged(image, ids, mask, alpha=0.4, mlm_input_ids=mlm_ids, mlm_labels=mlm_labels, **negatives)
    out = separate.itc_itm(image, ids, mask, 0.4, **negatives)
    reference = {"loss_ita": out["loss_ita"], "loss_itm": out["loss_itm"],
                 "loss_mlm": separate.mlm_loss(mlm_ids, mlm_labels, mask, out["image_embeds"], out["image_embeds_m"],
                                               0.4, image_kv=out["image_kv"])}
    for name, value in reference.items():
        torch.testing.assert_close(losses[name], value, atol=1e-5, rtol=1e-5, msg=name)
    sum(losses.values()).backward()
    sum(reference.values()).backward()
    grads = {name: p.grad for name, p in separate.named_parameters() if p.grad is not None}
    assert len(grads) > 50
    for name, p in merged.named_parameters():
        if name in grads:
            torch.testing.assert_close(p.grad, grads[name], atol=1e-5, rtol=1e-4, msg=name)
        else:
            assert p.grad is None, name

@pytest.mark.parametrize("targets_sum_to_one", [True, False])
def test_contrastive_loss_with_gradient_formed_in_forward_equals_autograd(targets_sum_to_one):
    """The ITC loss that forms its gradient in forward (so the feature bank is not kept for backward) gives the loss
    and the gradients in feat and temp of the plain autograd formula, and the bank may change before backward."""
    gen = torch.Generator().manual_seed(0)
    feat = F.normalize(torch.randn(4, 8, generator=gen, dtype=torch.float64), dim=1).requires_grad_()
    temp = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
    bank = F.normalize(torch.randn(8, 20, generator=gen, dtype=torch.float64), dim=0)
    targets = F.softmax(torch.randn(4, 20, generator=gen, dtype=torch.float64), dim=1)
    if not targets_sum_to_one:
        targets = targets * torch.rand(4, 1, generator=gen, dtype=torch.float64)
    weights = torch.randn((), generator=gen, dtype=torch.float64)  # a loss scale, as a sum with other losses gives

    plain = -(F.log_softmax(feat @ bank / temp, dim=1) * targets).sum(dim=1).mean()
    grads_plain = torch.autograd.grad(plain * weights, (feat, temp))
    fast = soft_contrastive_loss(feat, temp, bank, targets)
    bank.add_(1.0)  # the queue is overwritten in place before backward: the gradient must not depend on it
    grads_fast = torch.autograd.grad(fast * weights, (feat, temp))
    torch.testing.assert_close(fast, plain, rtol=0, atol=0)  # same ops in forward: bit-equal
    for got, want in zip(grads_fast, grads_plain, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def _saved_numel(fn):
    """fn()'s output and the elements autograd saved for its backward."""
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(saved)


def _plain_and_lean(plain, lean, x, grad, amp=False, args=()):
    """For each module called as module(x, *args): [output, input gradient, *parameter gradients] and the elements
    saved for backward."""
    results = []
    for module in (plain, lean):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out, saved = _saved_numel(lambda module=module, xi=xi: module(xi, *args))
        out.backward(grad.to(out.dtype))
        results.append(([out, xi.grad, *(p.grad for p in module.parameters())], saved))
    return results


@pytest.mark.parametrize("amp", [False, True])
def test_vit_mlp_recomputing_gelu_equals_timms_mlp(amp):
    """GeluMlp (GELU recomputed in backward) gives timm Mlp's output and gradients, in fp32 and under bf16
    autocast (parameter gradients stay fp32), and keeps fc1's output but not the GELU's for backward."""
    from timm.layers import Mlp

    from models.layers import GeluMlp

    torch.manual_seed(0)
    plain = Mlp(16, 64)
    lean = GeluMlp.from_timm(Mlp(16, 64))
    assert isinstance(lean, GeluMlp)
    lean.load_state_dict(plain.state_dict())
    (want, saved_plain), (got, saved_lean) = _plain_and_lean(plain, lean, torch.randn(2, 5, 16),
                                                             torch.randn(2, 5, 16), amp)
    tol = {"rtol": 2e-2, "atol": 2e-2} if amp else {"rtol": 1e-5, "atol": 1e-6}
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, **tol)
    hidden = 2 * 5 * 64
    assert saved_lean <= saved_plain - hidden  # the GELU's output (2 x 5 x 64) is not kept
    assert not isinstance(GeluMlp.from_timm(Mlp(16, 64, drop=0.1)), GeluMlp)  # other variants stay timm's


@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("gathered", [False, True])
def test_lean_dropout_attention_equals_explicit_attention_with_the_same_dropout_draws(with_mask, gathered):
    """dropout_attention (probabilities and a boolean keep-mask kept, the rest recomputed in backward) gives the
    output and gradients of softmax + dropout + matmul done by autograd with the same keep-mask; with ``rows`` (query
    b reads key/value row rows[b], gathered inside and not kept), those of index_select then attention."""
    from models.layers import dropout_attention, dropout_keep_mask
    from models.xbert import additive_mask

    gen = torch.Generator().manual_seed(0)
    rows = torch.tensor([2, 0, 2, 1, 2]) if gathered else None
    batch, images = (5, 3) if gathered else (2, 2)
    q = torch.randn(batch, 3, 5, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(images, 3, 7, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    k = k.transpose(1, 2).contiguous().transpose(1, 2)  # a strided view, as the heads of a projection are
    lengths = [7, 4, 7, 7, 5][:batch]
    mask = additive_mask(torch.tensor([[1] * n + [0] * (7 - n) for n in lengths]), torch.float64) if with_mask else None
    grad = torch.randn(batch, 3, 5, 8, generator=gen, dtype=torch.float64)
    p = 0.3
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(7)
    out = dropout_attention(*inputs, mask, p, rows)
    out.backward(grad)
    ref_inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    torch.manual_seed(7)
    keep = dropout_keep_mask(torch.Size([batch, 3, 5, 7]), p, q.device)
    ref_k, ref_v = ref_inputs[1:] if rows is None else (t.index_select(0, rows) for t in ref_inputs[1:])
    scores = ref_inputs[0] @ ref_k.transpose(-1, -2) / 8 ** 0.5 + (0 if mask is None else mask)
    ref = (scores.softmax(-1) * keep / (1 - p)) @ ref_v
    ref.backward(grad)
    assert 0.5 < keep.float().mean() < 0.9  # the mask really drops entries
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(inputs, ref_inputs, strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-12)


def test_fusion_over_gathered_image_rows_equals_fusion_over_copied_rows_in_training(tmp_path):
    """A training-mode fusion pass over select_image_kv rows (gathered inside attention, CPU lean path) gives the
    output and every gradient of the same pass over materialised copies of those rows, with the same dropout draws."""
    from models.xbert import select_image_kv

    torch.manual_seed(0)
    model = create_model("pretrain", tiny_cfg(tmp_path), special=SPECIAL).train()
    image, ids, mask = tiny_batch()
    rows = torch.tensor([0, 1, 2, 3, 1, 2, 3, 0, 0, 1, 2, 3])
    texts = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 3, 0, 1, 2])
    results = []
    for gathered in (True, False):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # the same dropout draws in both passes
        text_embeds = model.encode_text(ids, mask)
        image_kv = model.text_bert.precompute_image_kv(model.encode_image(image))
        kv = (select_image_kv(image_kv, rows) if gathered
              else [(key.index_select(0, rows), value.index_select(0, rows)) for key, value in image_kv])
        fused = model.fuse(text_embeds[texts], mask[texts], None, image_kv=kv)
        (fused ** 2).mean().backward()
        results.append((fused.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (fast, fast_grads), (slow, slow_grads) = results
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-5)
    assert fast_grads.keys() == slow_grads.keys() and any("crossattention.self.key" in n for n in fast_grads)
    for name, grad in fast_grads.items():  # relative to each gradient's scale: key gradients are ~1e-12 at init
        want = slow_grads[name]
        torch.testing.assert_close(grad, want, atol=1e-5 * want.abs().max().item(), rtol=1e-4, msg=name)


@pytest.mark.parametrize("amp", [False, True])
def test_vit_block_with_norms_recomputed_equals_timms_block(amp):
    """LeanBlock (LayerNorms run inside qkv and fc1, recomputed in backward) gives timm Block's output and every
    gradient, in fp32 and under bf16 autocast, and keeps neither norm's output for backward."""
    from timm.models.vision_transformer import Block

    from models.layers import GeluMlp, LeanBlock

    torch.manual_seed(0)
    width, tokens = 32, 7
    plain = Block(width, num_heads=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))
    with torch.no_grad():  # norms that are not the identity, so their gradients are tested too
        for norm in (plain.norm1, plain.norm2):
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.uniform_(-0.5, 0.5)
    block = copy.deepcopy(plain)
    block.mlp = GeluMlp.from_timm(block.mlp)
    lean = LeanBlock.from_timm(block)
    assert isinstance(lean, LeanBlock) and lean.state_dict().keys() == plain.state_dict().keys()
    assert LeanBlock.from_timm(plain) is plain  # a timm Mlp inside: not the lean form
    x = torch.randn(3, tokens, width)
    (want, saved_plain), (got, saved_lean) = _plain_and_lean(plain, lean, x, torch.randn(3, tokens, width), amp)
    lean.attn.fused_attn = False  # the explicit-probabilities path (Grad-CAM) is timm's own
    torch.testing.assert_close(lean(x), plain(x), rtol=1e-5, atol=1e-5)
    tol = {"rtol": 2e-2, "atol": 3e-2} if amp else {"rtol": 1e-5, "atol": 1e-5}
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype
        torch.testing.assert_close(g, w, **tol)
    assert saved_lean <= saved_plain - 2 * 3 * tokens * width  # the two norms' outputs are not kept


def test_pretraining_with_a_sparse_word_lookup_gradient_equals_the_dense_lookup(tmp_path):
    """AlbefPretrain's sparse lookup gradient + deferred decoder gradient: same losses (same draws) and the same
    gradients as nn.Embedding's dense lookup, and the word embedding's .grad is a dense tensor."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = create_model("pretrain", tiny_cfg(tmp_path), special=SPECIAL).train()
    assert model.word_gradient.enabled and model.word_gradient.weight is None  # armed in forward only
    image, ids, mask = tiny_batch()
    results = []
    for sparse in (True, False):
        model.word_gradient.enabled = sparse
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)  # same masks, negatives and dropout draws
        with torch.no_grad():  # the same queues before each step
            state = {k: v.clone() for k, v in model.state_dict().items()}
        losses = model(image, ids, mask, alpha=0.4)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            sum(losses.values()).backward()
        lookups = {e.name for e in prof.events() if e.name.startswith("aten::embedding_") and "backward" in e.name}
        assert "aten::embedding_sparse_backward" in lookups if sparse else "aten::embedding_dense_backward" in lookups
        model.load_state_dict(state)
        results.append(({k: v.detach() for k, v in losses.items()},
                         {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (sparse_losses, sparse_grads), (dense_losses, dense_grads) = results
    assert all(torch.equal(sparse_losses[k], dense_losses[k]) for k in dense_losses)
    word = "text_encoder.bert.embeddings.word_embeddings.weight"
    assert sparse_grads[word].layout == torch.strided and sparse_grads.keys() == dense_grads.keys()
    for name, grad in sparse_grads.items():
        want = dense_grads[name]
        torch.testing.assert_close(grad, want, atol=1e-6 * want.abs().max().item(), rtol=1e-5, msg=name)


def test_bert_layer_mlp_recomputing_gelu_equals_the_plain_layer():
    """A BERT layer with exact GELU runs its MLP through linear_gelu_linear: same output and gradients as the
    intermediate -> output modules run by autograd, without keeping the GELU's output."""
    from models.layers import apply_memory_efficient
    from models.xbert import BertLayer

    config = BertConfig.from_dict({"hidden_size": 16, "num_attention_heads": 2, "intermediate_size": 64,
                                   "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})
    torch.manual_seed(0)
    lean = BertLayer(config, has_cross_attention=False)
    plain = copy.deepcopy(lean)
    plain.intermediate.act = lambda x: F.gelu(x)  # same function, not recognised: the plain path
    apply_memory_efficient(lean)
    (want, saved_plain), (got, saved_lean) = _plain_and_lean(plain, lean, torch.randn(3, 5, 16),
                                                             torch.randn(3, 5, 16), args=(None,))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)
    assert saved_lean <= saved_plain - 3 * 5 * 64  # the GELU's output (3 x 5 x 64) is not kept


@pytest.mark.parametrize("sparse_lookup", [False, True])
def test_tied_decoder_gradient_equals_linears_and_accumulates_into_the_embedding_gradient_in_place(sparse_lookup):
    """The MLM decoder (weight tied to the word embeddings) gives nn.Linear's gradients, formed so that autograd
    adds the decoder's and the embedding lookup's gradients in place: two vocabulary-sized allocations in backward,
    not three. With a sparse lookup gradient and the decoder's weight through defer_gradient (pretraining), one:
    the lookup's rows are added into the decoder's table, and the weight's .grad is a dense tensor all the same."""
    from torch.profiler import ProfilerActivity, profile

    from models.layers import apply_memory_efficient, tie_sparse_word_gradient
    from models.xbert import BertLMHeadModel

    vocab, width = 997, 24
    config = BertConfig.from_dict({"hidden_size": width, "num_hidden_layers": 1, "num_attention_heads": 2,
                                   "intermediate_size": 48, "vocab_size": vocab, "hidden_dropout_prob": 0.0,
                                   "attention_probs_dropout_prob": 0.0, "fusion_layer": 1})
    torch.manual_seed(0)
    model = apply_memory_efficient(BertLMHeadModel(config))
    if sparse_lookup:  # armed by hand below: here the decoder is not called inside model's own forward
        tie_sparse_word_gradient(model, model)
    link = getattr(model, "word_gradient", None)
    head, embeddings = model.cls.predictions, model.bert.embeddings
    assert head.decoder.weight is embeddings.word_embeddings.weight
    ids = torch.randint(0, vocab, (2, 6))
    ids[0, -2:] = config.pad_token_id  # the padding row gets no gradient from the lookup, either way

    def loss():
        if link is not None:
            link.arm(model, ())
        hidden = model.bert(ids, mode="text")
        value = (model.cls(hidden[:, :3]) ** 2).mean()
        if link is not None:
            link.disarm(model, (), value)
        return value

    model.zero_grad(set_to_none=True)
    # nn.Linear's and nn.Embedding's own autograd (the link is not armed: a dense lookup)
    (F.linear(head.transform(model.bert(ids, mode="text")[:, :3]), head.decoder.weight, head.decoder.bias) ** 2
     ).mean().backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    loss().backward()
    assert embeddings.word_embeddings.weight.grad.layout == torch.strided
    for p, expected in zip(model.parameters(), want, strict=True):
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-7)

    model.zero_grad(set_to_none=True)
    value = loss()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        value.backward()
    table_bytes = vocab * width * 4
    allocations = [e for e in prof.profiler.kineto_results.events()
                   if e.name() == "[memory]" and e.nbytes() == table_bytes]
    assert len(allocations) == (1 if sparse_lookup else 2)


def test_vectorised_negative_sampling_matches_a_per_row_loop_with_the_same_draws():
    """One multinomial over the (B, B) weights draws, row by row, from the same distributions as ALBEF's loop."""
    torch.manual_seed(0)
    sim = torch.randn(5, 5)
    diag = torch.eye(5, dtype=torch.bool)
    weights = F.softmax(sim, dim=1) + 1e-4
    weights = weights.masked_fill(diag, 0.0)
    torch.manual_seed(3)
    fast = sample_hard_negatives(sim, diag, eps=1e-4)
    torch.manual_seed(3)
    looped = torch.multinomial(weights, 1).squeeze(1)  # the same draws, the straightforward way
    assert torch.equal(fast, looped)
    counts = torch.zeros(5, 5)
    for _ in range(4000):
        counts[torch.arange(5), sample_hard_negatives(sim, diag, eps=1e-4)] += 1
    torch.testing.assert_close(counts / 4000, weights / weights.sum(1, keepdim=True), atol=0.03, rtol=0)


def test_text_encoder_initialises_from_transformers_bert_weights(tmp_path):
    """Real runs start the text encoder from bert-base-uncased; here a tiny BERT saved locally stands in for it."""
    from transformers import BertConfig as HFConfig
    from transformers import BertForMaskedLM

    hf = BertForMaskedLM(HFConfig(vocab_size=60, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=64))
    hf.save_pretrained(tmp_path / "tiny-bert")
    model = create_model("pretrain", tiny_cfg(tmp_path, text_encoder=str(tmp_path / "tiny-bert")), special=SPECIAL)
    hf_state = hf.state_dict()
    ours = model.text_encoder.state_dict()
    for key in ("bert.encoder.layer.2.attention.self.query.weight", "bert.embeddings.word_embeddings.weight",
                "cls.predictions.transform.dense.weight"):
        torch.testing.assert_close(ours[key], hf_state[key])
    # the momentum copy starts equal to the loaded weights
    torch.testing.assert_close(model.text_encoder_m.state_dict()[key], hf_state[key])


def test_load_checkpoint_resamples_pos_embed_for_another_image_res(tmp_path):
    small = create_model("pretrain", tiny_cfg(tmp_path, image_res=32), special=SPECIAL)
    large = create_model("pretrain", tiny_cfg(tmp_path, image_res=64), special=SPECIAL)
    missing, unexpected = load_checkpoint(large, small.state_dict(), strict=True)
    assert (missing, unexpected) == ([], [])
    assert large.visual_encoder.pos_embed.shape == (1, 17, 32)
    torch.testing.assert_close(large.visual_encoder.cls_token, small.visual_encoder.cls_token)


def test_pretrain_checkpoint_feeds_every_task_model(tmp_path):
    """Fine-tuning starts from a pretraining checkpoint: the documented key surgery leaves only the task's new
    heads missing."""
    pretrain = create_model("pretrain", tiny_cfg(tmp_path), special=SPECIAL).state_dict()
    expected_missing = {"retrieval": {"idx_queue"}, "ve": {"cls_head", "cls_head_m"},
                        "nlvr": {"cls_head", "cls_head_m"}, "vqa": set()}
    for task, new_heads in expected_missing.items():
        model = create_model(task, tiny_cfg(tmp_path), special=SPECIAL)
        missing, _ = load_checkpoint(model, pretrain)
        assert {re.sub(r"\..*", "", k) for k in missing} == new_heads, (task, missing[:5])


def test_checkpoint_with_another_queue_size_loads_with_fresh_queues(tmp_path):
    pretrain = create_model("pretrain", tiny_cfg(tmp_path, queue_size=16), special=SPECIAL).state_dict()
    model = create_model("retrieval", tiny_cfg(tmp_path, queue_size=32), special=SPECIAL)
    missing, _ = load_checkpoint(model, pretrain)
    assert model.image_queue.shape == (16, 32) and int(model.queue_ptr) == 0
    assert {"image_queue", "text_queue", "queue_ptr", "idx_queue"} <= set(missing)
    torch.testing.assert_close(model.visual_encoder.cls_token, pretrain["visual_encoder.cls_token"])


def test_memory_efficient_switch_picks_the_layers_at_construction_with_the_same_keys_and_losses(tmp_path):
    """model.memory_efficient swaps layers when the model is built (auto: on without a CUDA device), never in forward:
    the same state_dict keys, and the same losses and gradients as the plain model (dropout off, fixed draws)."""
    from models.layers import (
        LeanBlock,
        MemoryEfficientBertLayer,
        MemoryEfficientSelfAttention,
        SparseGradEmbedding,
        TiedDecoder,
        resolve_memory_efficient,
    )

    variants = {LeanBlock, MemoryEfficientBertLayer, MemoryEfficientSelfAttention, SparseGradEmbedding, TiedDecoder}
    no_dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    torch.manual_seed(0)
    plain = create_model("pretrain", tiny_cfg(tmp_path, memory_efficient=False, bert_overrides=no_dropout),
                         special=SPECIAL).train()
    lean = create_model("pretrain", tiny_cfg(tmp_path, memory_efficient=True, bert_overrides=no_dropout),
                        special=SPECIAL).train()
    assert not {type(m) for m in plain.modules()} & variants
    assert variants <= {type(m) for m in lean.modules()}
    assert plain.state_dict().keys() == lean.state_dict().keys()
    lean.load_state_dict(plain.state_dict())
    assert resolve_memory_efficient(None) == resolve_memory_efficient("auto") == (not torch.cuda.is_available())
    with pytest.raises(ValueError, match="memory_efficient"):
        resolve_memory_efficient("sometimes")
    image, ids, mask = tiny_batch()
    results = []
    for model in (plain, lean):
        torch.manual_seed(1)  # same masks and negatives
        losses = model(image, ids, mask, alpha=0.4)
        sum(losses.values()).backward()
        results.append((losses, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (plain_losses, plain_grads), (lean_losses, lean_grads) = results
    for name, value in plain_losses.items():
        torch.testing.assert_close(lean_losses[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert plain_grads.keys() == lean_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(lean_grads[name], grad, atol=1e-5 * grad.abs().max().item(), rtol=1e-4, msg=name)


def test_model_config_defaults_have_one_home():
    """MODEL_DEFAULTS is derived from the typed AlbefCfg / VisionCfg; unknown ViT keys are errors."""
    from dataclasses import asdict

    from models.albef import MODEL_DEFAULTS, AlbefCfg
    from models.vit import VisionCfg

    assert MODEL_DEFAULTS == asdict(AlbefCfg()) and MODEL_DEFAULTS["vit"] == asdict(VisionCfg())
    config = AlbefCfg.from_dict({"vit": {"depth": 2}, "answer_list": "a task's own key"})
    assert config.vit == VisionCfg(depth=2) and config.embed_dim == AlbefCfg().embed_dim
    with pytest.raises(ValueError, match="model.vit"):
        VisionCfg.from_dict({"dept": 2})
    with pytest.raises(ValueError, match="itm_random_negatives"):
        AlbefCfg.from_dict({"itm_random_negatives": 2.0})
