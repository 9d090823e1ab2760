"""The fast retrieval re-ranking (tasks.retrieval_eval) computes what ALBEF's straightforward evaluation computes:
length-sorted text encoding without padding, pairs of both directions scored once, image key/values projected once
per image (in blocks), the first fusion layer's text-only work once per text, the last layer for [CLS] only, passes
of one caption length; and it does fewer FLOPs than the one-query-at-a-time loop."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.retrieval_eval import one_query_at_a_time
from models import create_model
from tasks.retrieval_eval import _balance_images, encode_text_ids, text_lengths, two_stage_scores
from tests.test_models import SPECIAL


def model_with_fusion_from(tmp_path: Path, fusion_layer: int) -> torch.nn.Module:
    """Tiny retrieval model with 3 BERT layers, fusion from ``fusion_layer`` (1: two fusion layers, 2: one)."""
    bert = {"hidden_size": 32, "num_hidden_layers": 3, "fusion_layer": fusion_layer, "num_attention_heads": 2,
            "intermediate_size": 64, "encoder_width": 32, "vocab_size": 60, "max_position_embeddings": 64}
    path = tmp_path / "bert.json"
    path.write_text(json.dumps(bert))
    cfg = {"bert_config": str(path), "text_encoder": "", "tokenizer": "", "image_res": 32, "embed_dim": 16,
           "queue_size": 16, "vit": {"patch_size": 16, "width": 32, "depth": 1, "heads": 2}}
    torch.manual_seed(0)
    return create_model("retrieval", cfg, special=SPECIAL).eval()


def captions(count: int, max_tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded random captions of 2..max_tokens tokens: (ids, mask) (count, max_tokens)."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, max_tokens + 1, (count,), generator=gen)
    mask = (torch.arange(max_tokens)[None, :] < lengths[:, None]).long()
    ids = torch.randint(5, 60, (count, max_tokens), generator=gen)
    ids[:, 0] = SPECIAL.cls
    return ids * mask, mask


def top_k(sims: torch.Tensor, k: int) -> list[np.ndarray]:
    return [np.argsort(-row.numpy(), kind="stable")[:k] for row in sims]


@pytest.mark.parametrize("gathered", [False, True], ids=["per_image_kv", "gathered_kv"])
@pytest.mark.parametrize("fusion_layer", [1, 2], ids=["two_fusion_layers", "one_fusion_layer"])
def test_two_stage_scores_equal_one_pair_at_a_time(tmp_path: Path, fusion_layer: int, gathered: bool,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import tasks.retrieval_eval as retrieval_eval

    # The GPU's way (each row's image keys/values copied, attention over many rows in a few calls), here on the CPU,
    # with a chunk of 3 rows so that several chunks are joined.
    monkeypatch.setattr(retrieval_eval, "gathers_kv", lambda device: gathered)
    monkeypatch.setattr(retrieval_eval, "GATHERED_KV_BYTES", 3 * 2 * (2 * 5 * 16) * 4)  # K+V of (2 heads, 5 tokens, 16)
    model = model_with_fusion_from(tmp_path, fusion_layer)
    num_images, num_texts, k = 5, 12, 3
    images = torch.randn(num_images, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids, mask = captions(num_texts, 9, seed=2)
    with torch.no_grad():
        image_embeds = model.encode_image(images)  # (N, 1+P, D)
        padded_embeds = model.encode_text(ids, mask)  # (T, L, D), ALBEF's way: every text at the full length
        text_embeds, text_feats = encode_text_ids(model, ids, mask, batch_size=5)
        image_feats = model.image_feat(image_embeds)
        # One ITM pass per (image, text) pair at the full padded length, image tokens projected per pair.
        dense = torch.stack([model.itm_scores(image_embeds[i].expand(num_texts, -1, -1), padded_embeds, mask)
                             for i in range(num_images)])  # (N, T)
    real = mask.bool()[:, :, None]
    torch.testing.assert_close(text_embeds * real, padded_embeds * real, rtol=1e-5, atol=1e-5)
    assert torch.equal(text_embeds * ~real, torch.zeros_like(text_embeds))  # nothing computed for the padding
    torch.testing.assert_close(text_feats, model.text_feat(padded_embeds), rtol=1e-5, atol=1e-6)

    sims = image_feats @ text_feats.t()  # (N, T)
    top_i2t, top_t2i = top_k(sims, k), top_k(sims.t(), k)
    both_ways = {(i, int(t)) for i in range(num_images) for t in top_i2t[i]}
    both_ways &= {(int(i), t) for t in range(num_texts) for i in top_t2i[t]}
    assert both_ways, "some pairs are asked for in both directions (scored once)"
    assert len({int(mask[t].sum()) for t in range(num_texts)}) > 3, "captions of several lengths"
    expected_i2t = torch.full((num_images, num_texts), -100.0)
    expected_t2i = torch.full((num_texts, num_images), -100.0)
    for image in range(num_images):
        expected_i2t[image, top_i2t[image]] = dense[image, top_i2t[image]]
    for text in range(num_texts):
        expected_t2i[text, top_t2i[text]] = dense[top_t2i[text], text]

    # Default settings; one image per key/value block and one query's worth of pairs per pass.
    for options in ({}, {"query_batch": 1, "kv_cache_bytes": 1}):
        score_i2t, score_t2i = two_stage_scores(model, image_embeds, image_feats, text_embeds, mask, text_feats, k,
                                                split_across_ranks=False, **options)
        torch.testing.assert_close(score_i2t, expected_i2t, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(score_t2i, expected_t2i, rtol=1e-4, atol=1e-5)


def test_rerank_does_fewer_flops_than_the_one_query_loop(tmp_path: Path) -> None:
    """Same scores as the ALBEF-style loop (padded to the full length, image key/values per pair) for under a
    third of its FLOPs on captions averaging about half the padded length."""
    model = model_with_fusion_from(tmp_path, 1)
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    ids, mask = captions(20, 16, seed=4)
    with torch.no_grad():
        image_embeds = model.encode_image(images)
        image_feats = model.image_feat(image_embeds)
        text_embeds, text_feats = encode_text_ids(model, ids, mask)
        counts = []
        for run in (lambda: two_stage_scores(model, image_embeds, image_feats, text_embeds, mask, text_feats, 4,
                                             split_across_ranks=False),
                    lambda: one_query_at_a_time(model, image_embeds, image_feats, model.encode_text(ids, mask), mask,
                                                text_feats, 4)):
            counter = FlopCounterMode(display=False)
            with counter:
                scores = run()
            counts.append((counter.get_total_flops(), scores))
    (fast_flops, fast), (loop_flops, loop) = counts
    for ours, theirs in zip(fast, loop, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert fast_flops < loop_flops / 3, (fast_flops, loop_flops)


def test_text_lengths_refuses_masks_that_are_not_right_padded() -> None:
    assert text_lengths(torch.tensor([[1, 1, 0], [1, 1, 1]])).tolist() == [2, 3]
    with pytest.raises(ValueError, match=r"text attention mask 1 is not right-padded"):
        text_lengths(torch.tensor([[1, 1, 0], [0, 1, 1]]))
    with pytest.raises(ValueError, match=r"text attention mask 0 is not right-padded"):
        text_lengths(torch.tensor([[1, 0, 1]]))


def test_images_are_balanced_across_ranks_by_pair_count() -> None:
    counts = torch.tensor([50, 1, 1, 30, 20, 5, 5, 40])
    owner = _balance_images(counts, world_size=3)
    assert owner.shape == counts.shape and set(owner.tolist()) == {0, 1, 2}
    loads = torch.zeros(3, dtype=torch.long).index_add_(0, owner, counts)
    assert loads.max() - loads.min() <= counts.max()  # greedy bound: no rank ahead by more than one image
    assert torch.equal(owner, _balance_images(counts, world_size=3))  # every rank derives the same split
    assert torch.equal(_balance_images(counts, world_size=1), torch.zeros(8, dtype=torch.long))
