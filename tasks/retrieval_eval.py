"""Two-stage image-text retrieval evaluation (ALBEF's protocol), batched and split across ranks.

1. ITC: every image and every text is encoded once; similarities are the dot products of the normalised
   projections (no temperature, as ALBEF ranks them).
2. ITM: the top ``k_test`` candidates of every query are re-scored by the fusion encoder's match logit,
   image->text and text->image; the rest of the matrix holds -100.

The ITM score of a pair is one function of (image, text), whichever direction asked for it, so the re-ranking scores
the union of both directions' pairs once each, grouped so that nothing is computed twice:
- the image tokens' key/value projections (most of a fusion pass: an image has far more tokens than a caption) are
  computed once per image, in blocks of images bounded by ``kv_cache_bytes``, and read in place (no per-pair copies:
  the pairs of one image attend to its keys/values in one attention call);
- the first fusion layer's self-attention depends on the text alone: once per text and pass;
- the ITM head reads the [CLS] token only, so the last fusion layer runs for [CLS] alone (its self-attention still
  reads every token's key/value);
- pairs are sorted by caption length and a pass holds captions of one length, cut to it (masked keys contribute
  exactly zero, so dropping padding leaves the scores unchanged); the text encoder likewise encodes batches of one
  caption length.
Image features are computed on each rank's share of the images and gathered in memory; with several ranks each one
scores the pairs of its share of the images (balanced by pair count) and the scores are gathered in memory.
Used by Retrieval.py, Grounding.py and the pretraining demo (zero-shot).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from dataset.datasets import RetrievalEvalDataset
from dataset.tokenizer import tokenize
from dataset.transforms import normalize
from engine import dist
from metrics.retrieval import recall_at_k
from tasks.base import AlbefTask, gather_in_dataset_order, unwrap

ImageKV = list[tuple[Tensor, Tensor]]


def text_lengths(attention_mask: Tensor) -> Tensor:
    """(T,) number of real tokens of each right-padded (T, L) mask; ValueError if a mask has a hole or pads left
    (trimming the padding would then cut real tokens)."""
    lengths = attention_mask.sum(dim=1)  # (T,)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    if not torch.equal(attention_mask.bool(), positions[None, :] < lengths[:, None]):
        bad = (attention_mask.bool() != (positions[None, :] < lengths[:, None])).any(dim=1).nonzero()[0, 0]
        raise ValueError(f"text attention mask {int(bad)} is not right-padded (ones, then zeros): "
                         f"{attention_mask[bad].tolist()}")
    return lengths


@torch.no_grad()
def encode_text_ids(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, batch_size: int = 256
                    ) -> tuple[Tensor, Tensor]:
    """(text_embeds (T, L, D), text_feats (T, E)) of right-padded token ids (T, L).

    Texts are encoded in batches of one caption length, cut to it; ``text_embeds`` holds zeros beyond each
    caption (padding positions are masked wherever they are read). At the real tokens, the same numbers as encoding
    the padded (T, L) ids, to float rounding."""
    if input_ids.shape[0] == 0:
        raise ValueError("encode_text_ids needs at least one text")
    lengths = text_lengths(attention_mask)
    order = torch.argsort(lengths, descending=True, stable=True)  # (T,) longest first
    # Batches never mix caption lengths (no padding at all): each run of one length is cut into near-equal batches
    # of at most batch_size texts.
    run_lengths, run_sizes = torch.unique_consecutive(lengths[order], return_counts=True)
    embeds: Tensor | None = None
    for length, run in zip(run_lengths.tolist(), torch.split(order, run_sizes.tolist()), strict=True):
        for rows in torch.tensor_split(run, -(-run.shape[0] // batch_size)):  # (b,) each
            batch_embeds = model.encode_text(input_ids[rows, :length], attention_mask[rows, :length])  # (b, l, D)
            if embeds is None:
                embeds = batch_embeds.new_zeros(input_ids.shape + batch_embeds.shape[2:])  # (T, L, D)
            embeds[rows, :length] = batch_embeds
    assert embeds is not None, "at least one batch was encoded"
    return embeds, model.text_feat(embeds)


@torch.no_grad()
def encode_texts(model: nn.Module, tokenizer: Any, texts: list[str], device: torch.device, max_tokens: int,
                 batch_size: int = 256) -> tuple[Tensor, Tensor, Tensor]:
    """(text_embeds (T, L, D), text_masks (T, L), text_feats (T, E)): tokenised and padded to ``max_tokens`` like
    ALBEF's eval, encoded by ``encode_text_ids`` (length-sorted batches without their padding)."""
    if not texts:
        raise ValueError("encode_texts needs at least one text")
    ids, mask = tokenize(tokenizer, texts, max_tokens, padding="max_length")
    ids, mask = ids.to(device), mask.to(device)
    text_embeds, text_feats = encode_text_ids(model, ids, mask, batch_size)
    return text_embeds, mask, text_feats


@torch.no_grad()
def encode_images(model: nn.Module, loader: DataLoader, device: torch.device, num_images: int
                  ) -> tuple[Tensor, Tensor]:
    """(image_embeds (N, 1+P, D), image_feats (N, E)) of every image of an evaluation loader, whose items carry
    ``index``; each rank encodes its share and the shares are gathered, ordered by index, padding dropped."""
    embeds, feats, indices = [], [], []
    for batch in loader:
        image_embeds = model.encode_image(normalize(batch["image"].to(device, non_blocking=True)))
        embeds.append(image_embeds)
        feats.append(model.image_feat(image_embeds))
        indices.append(batch["index"].to(device))
    image_embeds, image_feats = gather_in_dataset_order(torch.cat(indices), num_images, torch.cat(embeds),
                                                        torch.cat(feats))
    return image_embeds, image_feats


GATHERED_KV_BYTES = 1024**3  # on a GPU: at most this many bytes of per-row key/value copies in one attention call


def gathers_kv(device: torch.device) -> bool:
    """Whether cross-attention copies each row's image keys/values and attends in a few large calls (GPU: launches
    are what costs, measured 77 s -> see benchmarks/README.md for 1000 x 5000 images x texts at k 128 on an H200)
    rather than one call per image over its rows, reading the keys/values in place (CPU: memory traffic is what
    costs). Same maths either way (tests/test_task_retrieval.py)."""
    return device.type == "cuda"


def _match_pass(model: nn.Module, image_kv: ImageKV, images: Tensor, texts: Tensor, text_embeds: Tensor,
                text_masks: Tensor, lengths: Tensor) -> Tensor:
    """ITM match logits (B,) of the pairs (images[b] (index into image_kv), texts[b]): one ``fuse_pairs`` pass over
    the distinct texts cut to the pass's longest caption. Equals model.itm_head(model.fuse(...)[:, 0])[:, 1] to float
    rounding."""
    unique_texts, inverse = torch.unique(texts, return_inverse=True)  # (U,), (B,)
    length = int(lengths[unique_texts].max())
    fused_cls = model.text_bert.fuse_pairs(text_embeds[unique_texts, :length], text_masks[unique_texts, :length],
                                           inverse, image_kv, images,
                                           GATHERED_KV_BYTES if gathers_kv(images.device) else None)  # (B, D)
    return model.itm_head(fused_cls)[:, 1]


def _balance_images(pair_counts: Tensor, world_size: int) -> Tensor:
    """(N,) rank owning each image: images by descending pair count, each to the least loaded rank so far
    (deterministic, so every rank derives the same split)."""
    owner = torch.zeros(pair_counts.shape[0], dtype=torch.long)
    load = [0] * world_size
    counts = pair_counts.cpu()
    for image in torch.argsort(counts, descending=True, stable=True).tolist():
        rank = min(range(world_size), key=load.__getitem__)
        owner[image] = rank
        load[rank] += int(counts[image])
    return owner


def _image_kv_bytes_each(model: nn.Module, image_embeds: Tensor) -> int:
    """Bytes of one image's key/value projections over all fusion layers."""
    text_bert = model.text_bert
    layers = len(text_bert.fusion_layers())
    return image_embeds.shape[1] * text_bert.config.hidden_size * 2 * layers * image_embeds.element_size()


@torch.no_grad()
def score_pairs(model: nn.Module, image_embeds: Tensor, text_embeds: Tensor, text_masks: Tensor, pair_images: Tensor,
                pair_texts: Tensor, pass_pairs: int = 256, split_across_ranks: bool = True,
                kv_cache_bytes: int = 2 * 1024**3) -> Tensor:
    """ITM match logits (P,) float32 of the (image, text) pairs (pair_images[p], pair_texts[p]).

    Images are taken in blocks whose key/value projections fit ``kv_cache_bytes`` (each image projected once);
    within a block the pairs are sorted by caption length (then text, then image) and scored in passes of one
    caption length and at most ``pass_pairs`` pairs. With split_across_ranks each rank scores the pairs of its
    share of the images and the scores are gathered in memory; every rank returns all of them."""
    model = unwrap(model)
    if pass_pairs < 1:
        raise ValueError(f"pass_pairs must be >= 1, got {pass_pairs}")
    num_images = image_embeds.shape[0]
    lengths = text_lengths(text_masks)  # (T,)
    world_size = dist.get_world_size() if split_across_ranks else 1
    rank = dist.get_rank() if split_across_ranks else 0
    owner = _balance_images(torch.bincount(pair_images.cpu(), minlength=num_images), world_size)  # (N,)
    mine = (owner.to(pair_images.device)[pair_images] == rank).nonzero().flatten()  # (p,) this rank's pairs
    scores = torch.zeros(mine.shape[0], dtype=torch.float32, device=pair_images.device)

    my_images = torch.unique(pair_images[mine])  # (n,) sorted
    block = max(1, kv_cache_bytes // _image_kv_bytes_each(model, image_embeds))
    local_index = torch.full((num_images,), -1, dtype=torch.long, device=pair_images.device)
    # Sort key: caption length, then text (its pairs share a pass, so its text-only work is done once), then image.
    sort_key = (lengths[pair_texts[mine]] * text_embeds.shape[0] + pair_texts[mine]) * num_images + pair_images[mine]
    for start in range(0, my_images.shape[0], block):
        block_images = my_images[start:start + block]  # (b,)
        image_kv = model.text_bert.precompute_image_kv(image_embeds[block_images])  # layers x 2 x (b, nh, S, hd)
        local_index[block_images] = torch.arange(block_images.shape[0], device=local_index.device)
        in_block = (local_index[pair_images[mine]] >= 0).nonzero().flatten()  # positions into ``mine``
        in_block = in_block[torch.argsort(sort_key[in_block], stable=True)]
        # Passes never mix caption lengths (no padding at all): each run of one length is cut into near-equal
        # passes of at most pass_pairs pairs.
        _, run_sizes = torch.unique_consecutive(lengths[pair_texts[mine[in_block]]], return_counts=True)
        for run in torch.split(in_block, run_sizes.tolist()):
            for rows in torch.tensor_split(run, -(-run.shape[0] // pass_pairs)):  # (B,) each
                pairs = mine[rows]
                scores[rows] = _match_pass(model, image_kv, local_index[pair_images[pairs]], pair_texts[pairs],
                                           text_embeds, text_masks, lengths).float()
        local_index[block_images] = -1
    if world_size == 1:
        return scores
    shares = dist.all_gather_object((mine.cpu(), scores.cpu()))  # one (pair positions, scores) share per rank
    every = torch.full((pair_images.shape[0],), float("nan"))
    for positions, values in shares:
        every[positions] = values
    assert not torch.isnan(every).any(), "every pair is owned by exactly one rank"
    return every.to(pair_images.device)


@torch.no_grad()
def two_stage_scores(model: nn.Module, image_embeds: Tensor, image_feats: Tensor, text_embeds: Tensor,
                     text_masks: Tensor, text_feats: Tensor, k_test: int, query_batch: int = 16,
                     split_across_ranks: bool = True, kv_cache_bytes: int = 2 * 1024**3) -> tuple[Tensor, Tensor]:
    """ITM-re-ranked score matrices (image->text (N, T), text->image (T, N)), float32, -100 outside each query's
    top k by ITC similarity (ALBEF's score_matrix_i2t / score_matrix_t2i).

    ``text_masks`` must be right-padded. A fusion pass scores up to ``query_batch * k_test`` pairs (the
    candidates of query_batch queries); see ``score_pairs`` for ``kv_cache_bytes`` and ``split_across_ranks``."""
    if k_test < 1:
        raise ValueError(f"k_test must be >= 1, got {k_test}")
    if query_batch < 1:
        raise ValueError(f"query_batch must be >= 1, got {query_batch}")
    sims = image_feats @ text_feats.t()  # (N, T)
    num_images, num_texts = sims.shape
    top_i2t = sims.topk(min(k_test, num_texts), dim=1).indices  # (N, k)
    top_t2i = sims.t().contiguous().topk(min(k_test, num_images), dim=1).indices  # (T, k)
    # Pair key image * T + text: the union of both directions' pairs, each scored once.
    i2t_keys = torch.arange(num_images, device=sims.device)[:, None] * num_texts + top_i2t  # (N, k)
    t2i_keys = top_t2i * num_texts + torch.arange(num_texts, device=sims.device)[:, None]  # (T, k)
    keys = torch.unique(torch.cat([i2t_keys.flatten(), t2i_keys.flatten()]))  # (P,) sorted
    pass_pairs = query_batch * max(top_i2t.shape[1], top_t2i.shape[1])
    pair_scores = score_pairs(model, image_embeds, text_embeds, text_masks, keys // num_texts, keys % num_texts,
                              pass_pairs, split_across_ranks, kv_cache_bytes)  # (P,)
    score_i2t = torch.full((num_images, num_texts), -100.0, device=sims.device)
    score_i2t.scatter_(1, top_i2t, pair_scores[torch.searchsorted(keys, i2t_keys)])
    score_t2i = torch.full((num_texts, num_images), -100.0, device=sims.device)
    score_t2i.scatter_(1, top_t2i, pair_scores[torch.searchsorted(keys, t2i_keys)])
    return score_i2t, score_t2i


@torch.no_grad()
def evaluate_retrieval(model: nn.Module, tokenizer: Any, loader: DataLoader, device: torch.device, k_test: int,
                       max_tokens: int) -> dict[str, float]:
    """Recall@1/5/10 both ways and their mean on a RetrievalEvalDataset loader (ALBEF's itm_eval numbers), plus the
    same for the ITC ranking alone (``itc_*``)."""
    dataset = loader.dataset
    inner = unwrap(model)
    text_embeds, text_masks, text_feats = encode_texts(inner, tokenizer, dataset.texts, device, max_tokens)
    image_embeds, image_feats = encode_images(inner, loader, device, len(dataset))
    score_i2t, score_t2i = two_stage_scores(inner, image_embeds, image_feats, text_embeds, text_masks, text_feats,
                                            k_test)
    metrics = recall_at_k(score_i2t.cpu(), score_t2i.cpu(), dataset.img2txt, dataset.txt2img)
    # The first stage alone (ITC ranking), reported next to ALBEF's ITM-re-ranked numbers as itc_*.
    sims = (image_feats @ text_feats.t()).float().cpu()
    itc = recall_at_k(sims, sims.t(), dataset.img2txt, dataset.txt2img)
    return {**metrics, **{f"itc_{key}": value for key, value in itc.items()}}


def retrieval_eval_dataset(task: AlbefTask, ann_file: str, image_root: str | None, **options: Any
                           ) -> RetrievalEvalDataset:
    """A retrieval evaluation file ``[{image, caption: [..]}]`` with the task's test transform and max_words
    (``options``: AlbefTask.dataset_options() and exclude_entries; see AlbefTask.build_eval_dataset)."""
    return RetrievalEvalDataset(ann_file, task.transform("test"), image_root, max_words=int(task.config.data.max_words),
                                **options)


def evaluate_retrieval_file(task: AlbefTask, model: nn.Module, split: str, k_test: int) -> dict[str, float]:
    """evaluate_retrieval on the task's evaluation dataset of ``split`` (AlbefTask.eval_dataset: a retrieval file,
    see retrieval_eval_dataset) with the task's data settings (max_tokens, eval batch size, workers)."""
    data = task.config.data
    dataset = task.eval_dataset(split)
    return evaluate_retrieval(model, task.tokenizer, task.loader(dataset, train=False), task.device, k_test,
                              int(data.max_tokens))
