"""Two-stage image-text retrieval evaluation (ALBEF's protocol), batched and split across ranks.

1. ITC: every image and every text is encoded once; similarities are the dot products of the normalised
   projections (no temperature, as ALBEF ranks them).
2. ITM: the top ``k_test`` candidates of every query are re-scored by the fusion encoder's match logit, many queries
   and candidates per forward pass; image->text and text->image; the rest of the matrix holds -100.
Image features are computed on each rank's share of the images and gathered in memory; re-scoring rows are split
across ranks (metrics.topk_rerank_matrix). Used by Retrieval.py, Grounding.py and the pretraining demo (zero-shot).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from dataset.datasets import RetrievalEvalDataset
from dataset.tokenizer import tokenize
from dataset.transforms import normalize
from metrics.retrieval import recall_at_k, topk_rerank_matrix
from models.xbert import select_image_kv
from tasks.base import AlbefTask, gather_in_dataset_order, unwrap


@torch.no_grad()
def encode_texts(model: nn.Module, tokenizer: Any, texts: list[str], device: torch.device, max_tokens: int,
                 batch_size: int = 256) -> tuple[Tensor, Tensor, Tensor]:
    """(text_embeds (T, L, D), text_masks (T, L), text_feats (T, E)); padded to ``max_tokens`` like ALBEF's eval."""
    embeds, masks, feats = [], [], []
    for start in range(0, len(texts), batch_size):
        ids, mask = tokenize(tokenizer, texts[start:start + batch_size], max_tokens, padding="max_length")
        ids, mask = ids.to(device), mask.to(device)
        text_embeds = model.encode_text(ids, mask)
        embeds.append(text_embeds)
        masks.append(mask)
        feats.append(model.text_feat(text_embeds))
    return torch.cat(embeds), torch.cat(masks), torch.cat(feats)


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


def _image_kv_bytes(model: nn.Module, image_embeds: Tensor) -> int:
    layers = len(model.text_bert.fusion_layers())
    hidden = model.text_bert.config.hidden_size
    return image_embeds.shape[0] * image_embeds.shape[1] * hidden * 2 * layers * image_embeds.element_size()


@torch.no_grad()
def two_stage_scores(model: nn.Module, image_embeds: Tensor, image_feats: Tensor, text_embeds: Tensor,
                     text_masks: Tensor, text_feats: Tensor, k_test: int, query_batch: int = 16,
                     split_across_ranks: bool = True, kv_cache_bytes: int = 2 * 1024**3) -> tuple[Tensor, Tensor]:
    """ITM-re-ranked score matrices (image->text (N, T), text->image (T, N)), -100 outside each query's top k.

    The image tokens' key/value projections (most of a fusion pass: an image has far more tokens than a caption) are
    computed once per image for the whole evaluation when they fit in ``kv_cache_bytes``, else once per query image
    (image->text) / per candidate (text->image). Text padding beyond the longest caption of a pass is dropped (masked
    keys contribute exactly zero, so the scores do not change)."""
    model = unwrap(model)
    sims = image_feats @ text_feats.t()  # (N, T)
    text_bert = model.text_bert
    cached = _image_kv_bytes(model, image_embeds) <= kv_cache_bytes
    all_kv = text_bert.precompute_image_kv(image_embeds) if cached else None

    def image_kv(rows: Tensor) -> list[tuple[Tensor, Tensor]]:
        if all_kv is not None:
            return select_image_kv(all_kv, rows)
        return text_bert.precompute_image_kv(image_embeds[rows])

    def fuse_match(text_rows: Tensor, kv: list[tuple[Tensor, Tensor]]) -> Tensor:
        masks = text_masks[text_rows]
        length = int(masks.sum(dim=1).max())  # one host sync per pass (evaluation only)
        fused = model.fuse(text_embeds[text_rows, :length], masks[:, :length], None, image_kv=kv)
        return model.itm_head(fused[:, 0, :])[:, 1]

    def image_to_text(queries: Tensor, candidates: Tensor) -> Tensor:  # (n,), (n, k) -> (n, k)
        k = candidates.shape[1]
        kv = [(key.repeat_interleave(k, 0), value.repeat_interleave(k, 0)) for key, value in image_kv(queries)]
        return fuse_match(candidates.reshape(-1), kv).view(candidates.shape)

    def text_to_image(queries: Tensor, candidates: Tensor) -> Tensor:
        k = candidates.shape[1]
        return fuse_match(queries.repeat_interleave(k, 0), image_kv(candidates.reshape(-1))).view(candidates.shape)

    k_i2t = min(k_test, sims.shape[1])
    k_t2i = min(k_test, sims.shape[0])
    score_i2t = topk_rerank_matrix(sims, k_i2t, image_to_text, batch_size=query_batch,
                                   split_across_ranks=split_across_ranks)
    score_t2i = topk_rerank_matrix(sims.t().contiguous(), k_t2i, text_to_image, batch_size=query_batch,
                                   split_across_ranks=split_across_ranks)
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


def evaluate_retrieval_file(task: AlbefTask, model: nn.Module, ann_file: str, image_root: str | None,
                            k_test: int) -> dict[str, float]:
    """evaluate_retrieval on a retrieval evaluation file ``[{image, caption: [..]}]`` with the task's data settings
    (test transform, max_words, max_tokens, eval batch size, workers)."""
    data = task.config.data
    dataset = RetrievalEvalDataset(ann_file, task.transform("test"), image_root, max_words=int(data.max_words),
                                   **task.dataset_options())
    return evaluate_retrieval(model, task.tokenizer, task.loader(dataset, train=False), task.device, k_test,
                              int(data.max_tokens))
