"""Image-text retrieval metrics: recall@K exactly as ALBEF's ``itm_eval`` computes it, and its chance level.

ALBEF ranks each query's candidates with ``np.argsort(scores)[::-1]`` (numpy's default sort, which is not stable):
among equal scores the order is whatever that sort leaves, reversed. For short rows that puts the higher index
first; for longer ones it depends on numpy's sorting algorithm (its version and the CPU's SIMD support). Ties are
common: a top-k re-ranked matrix gives every candidate outside a query's top ``k_test`` the same fill score (-100),
and datasets hold duplicate captions. To give ALBEF's numbers on any matrix, ties included, ranks are counted on
the whole batch (how many candidates score higher) and every query whose target is tied with another candidate
within the largest K is ranked again with that very numpy call. Recall is ``100.0 * count / n`` in Python floats,
as ALBEF writes it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# Rows compared at once when counting ranks: bounds the (rows, candidates) temporary for COCO-size matrices.
RANK_CHUNK_ROWS = 1024


def _as_tensor(scores: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    matrix = torch.as_tensor(scores).detach()
    if matrix.ndim != 2:
        raise ValueError(f"{name} must be a 2-D score matrix, got shape {tuple(matrix.shape)}")
    if matrix.is_floating_point() and torch.isnan(matrix).any():
        raise ValueError(f"{name} contains NaN scores")
    return matrix


def albef_rank(row: np.ndarray, targets: Sequence[int]) -> int:
    """ALBEF's rank of a query: the best 0-based position of any target in ``np.argsort(row)[::-1]``."""
    order = np.argsort(row)[::-1]
    return int(min(np.where(order == target)[0][0] for target in targets))


def _higher_and_equal(scores: torch.Tensor, target_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row q of ``scores`` (Q, C): how many columns score higher than ``target_scores[q]`` and how many score
    the same (the target itself included). Each (Q,)."""
    higher, equal = [], []
    for start in range(0, scores.shape[0], RANK_CHUNK_ROWS):
        rows = scores[start : start + RANK_CHUNK_ROWS]  # (n, C)
        target = target_scores[start : start + RANK_CHUNK_ROWS, None]  # (n, 1)
        higher.append((rows > target).sum(1))
        equal.append((rows == target).sum(1))
    if not higher:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat(higher), torch.cat(equal)


def albef_ranks(scores: torch.Tensor | np.ndarray, targets: Sequence[Sequence[int]], max_rank: int) -> torch.Tensor:
    """Each query's rank as ALBEF's ``itm_eval`` finds it, wherever it is below ``max_rank`` (LongTensor (Q,)).

    ``scores`` (Q, C); ``targets[q]``: the candidate indices that count as a hit for query q (its rank is the best of
    theirs). A rank of ``max_rank`` or more is only known to be that large (recall@K for K <= max_rank is exact).
    The best-ranked target is one with the query's highest target score; it sits right after the candidates that
    score higher unless another candidate has the same score. Those counts are taken for the whole matrix at once;
    a query with such a tie within the first ``max_rank`` places is ranked by ``albef_rank`` (numpy, as ALBEF does).
    """
    matrix = _as_tensor(scores, "scores")
    num_queries, num_candidates = matrix.shape
    if len(targets) != num_queries:
        raise ValueError(f"{len(targets)} target lists for {num_queries} queries")
    for query, hits in enumerate(targets):
        if len(hits) == 0:
            raise ValueError(f"query {query} has no target: every query needs at least one")
    device = matrix.device
    pair_query = torch.tensor([q for q, hits in enumerate(targets) for _ in hits], dtype=torch.long, device=device)
    pair_target = torch.tensor([target for hits in targets for target in hits], dtype=torch.long, device=device)
    if pair_target.numel() and (pair_target.min() < 0 or pair_target.max() >= num_candidates):
        raise ValueError(f"target indices outside [0, {num_candidates})")
    best = torch.full((num_queries,), float("-inf"), dtype=matrix.dtype, device=device)
    best = best.scatter_reduce(0, pair_query, matrix[pair_query, pair_target], reduce="amax")  # (Q,)
    ranks, equal = _higher_and_equal(matrix, best)  # (Q,) each
    # Tied at max_rank or later, the target stays at max_rank or later whatever the order: recall@K cannot tell.
    undecided = ((equal > 1) & (ranks < max_rank)).nonzero().flatten().tolist()
    if undecided:
        rows = matrix[undecided].cpu()
        rows = (rows.float() if rows.dtype == torch.bfloat16 else rows).numpy()  # ALBEF sorts float32 rows
        exact = [albef_rank(row, targets[query]) for query, row in zip(undecided, rows, strict=True)]
        ranks[torch.tensor(undecided, device=device)] = torch.tensor(exact, dtype=torch.long, device=device)
    return ranks


def recall_at_k(
    scores_i2t: torch.Tensor | np.ndarray,
    scores_t2i: torch.Tensor | np.ndarray,
    img2txt: Sequence[Sequence[int]],
    txt2img: Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@K in percent for image->text (``txt_r*``) and text->image (``img_r*``) retrieval: ALBEF's ``itm_eval``.

    scores_i2t: (N_img, N_txt); scores_t2i: (N_txt, N_img); img2txt[i]: the ground-truth text indices of image i;
    txt2img[t]: the one image of text t. An image's rank is the best rank among its ground-truth texts; recall@K is
    the percentage of queries whose rank is below K, ties ranked as ALBEF ranks them (module docstring).
    Returns txt_r{k}, txt_r_mean, img_r{k}, img_r_mean and r_mean.
    """
    i2t = _as_tensor(scores_i2t, "scores_i2t")
    t2i = _as_tensor(scores_t2i, "scores_t2i")
    num_images, num_texts = i2t.shape
    if t2i.shape != (num_texts, num_images):
        raise ValueError(f"scores_t2i must be (texts, images) = {(num_texts, num_images)}, got {tuple(t2i.shape)}")
    if len(img2txt) != num_images or len(txt2img) != num_texts:
        raise ValueError(
            f"img2txt has {len(img2txt)} entries and txt2img {len(txt2img)}, expected {num_images} images and "
            f"{num_texts} texts as in scores_i2t"
        )
    for image, texts in enumerate(img2txt):
        if len(texts) == 0:
            raise ValueError(f"img2txt[{image}] is empty: every image needs at least one ground-truth text")
    if any(not 0 <= text < num_texts for texts in img2txt for text in texts):
        raise ValueError(f"img2txt holds text indices outside [0, {num_texts})")
    if any(not 0 <= image < num_images for image in txt2img):
        raise ValueError(f"txt2img holds image indices outside [0, {num_images})")
    max_rank = max(ks)
    image_ranks = albef_ranks(i2t, img2txt, max_rank).tolist()
    text_ranks = albef_ranks(t2i, [[image] for image in txt2img], max_rank).tolist()

    result: dict[str, float] = {}
    for prefix, ranks in (("txt", image_ranks), ("img", text_ranks)):
        recalls = [100.0 * sum(rank < k for rank in ranks) / len(ranks) for k in ks]
        result.update({f"{prefix}_r{k}": recall for k, recall in zip(ks, recalls, strict=True)})
        result[f"{prefix}_r_mean"] = sum(recalls) / len(recalls)
    result["r_mean"] = (result["txt_r_mean"] + result["img_r_mean"]) / 2
    return result


def chance_recall(img2txt: list[list[int]], num_texts: int, k: int) -> tuple[float, float]:
    """Expected R@k of a random ranking: image->text (any of an image's captions in the top k) and text->image."""
    num_images = len(img2txt)
    txt = 0.0
    for captions in img2txt:  # P(at least one of c relevant texts among k random picks of T)
        miss = 1.0
        for j in range(min(k, num_texts)):
            miss *= max(0.0, (num_texts - len(captions) - j) / (num_texts - j))
        txt += 1.0 - miss
    return 100.0 * txt / num_images, 100.0 * min(k, num_images) / num_images
