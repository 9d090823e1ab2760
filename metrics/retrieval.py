"""Image-text retrieval metrics: recall@K in ALBEF's definition, and its chance level."""

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


def ranks_of_targets(scores: torch.Tensor, target_scores: torch.Tensor, target_indices: torch.Tensor) -> torch.Tensor:
    """0-based rank of a target column in each row of ``scores`` (Q, C) under a stable descending sort.

    The target of row q has score ``target_scores[q]`` at column ``target_indices[q]``; its rank is the number of
    columns scoring higher plus the number of equal-scoring columns before it (a stable sort keeps index order).
    Returns a LongTensor (Q,).
    """
    ranks = []
    for start in range(0, scores.shape[0], RANK_CHUNK_ROWS):
        rows = scores[start : start + RANK_CHUNK_ROWS]  # (n, C)
        target = target_scores[start : start + RANK_CHUNK_ROWS, None]  # (n, 1)
        columns = torch.arange(scores.shape[1], device=scores.device)  # (C,)
        before = columns[None, :] < target_indices[start : start + RANK_CHUNK_ROWS, None]  # (n, C)
        ranks.append((rows > target).sum(1) + ((rows == target) & before).sum(1))
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)


def recall_at_k(
    scores_i2t: torch.Tensor | np.ndarray,
    scores_t2i: torch.Tensor | np.ndarray,
    img2txt: Sequence[Sequence[int]],
    txt2img: Sequence[int],
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@K in percent for image->text (``txt_r*``) and text->image (``img_r*``) retrieval, ALBEF's definition.

    scores_i2t: (N_img, N_txt); scores_t2i: (N_txt, N_img); img2txt[i]: the ground-truth text indices of image i;
    txt2img[t]: the one image of text t. An image's rank is the best rank among its ground-truth texts; recall@K is
    the percentage of queries whose rank is below K. Ties rank in index order (stable descending sort).
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
    device = i2t.device

    # Image -> text: the best-ranked ground-truth text is the one with the highest score, the lowest index on ties.
    pair_image = torch.tensor([image for image, texts in enumerate(img2txt) for _ in texts], device=device)
    pair_text = torch.tensor([text for texts in img2txt for text in texts], device=device)
    if pair_text.min() < 0 or pair_text.max() >= num_texts:
        raise ValueError(f"img2txt holds text indices outside [0, {num_texts})")
    pair_score = i2t[pair_image, pair_text]  # (P,)
    best_score = torch.full((num_images,), float("-inf"), dtype=pair_score.dtype, device=device)
    best_score = best_score.scatter_reduce(0, pair_image, pair_score, reduce="amax")  # (N_img,)
    is_best = pair_score == best_score[pair_image]
    best_text = torch.full((num_images,), num_texts, dtype=torch.long, device=device)
    best_text = best_text.scatter_reduce(0, pair_image[is_best], pair_text[is_best], reduce="amin")  # (N_img,)
    image_ranks = ranks_of_targets(i2t, best_score, best_text)  # (N_img,)

    # Text -> image: the rank of the text's one image.
    target_image = torch.as_tensor(list(txt2img), dtype=torch.long, device=device)  # (N_txt,)
    if target_image.min() < 0 or target_image.max() >= num_images:
        raise ValueError(f"txt2img holds image indices outside [0, {num_images})")
    target_score = t2i[torch.arange(num_texts, device=device), target_image]
    text_ranks = ranks_of_targets(t2i, target_score, target_image)  # (N_txt,)

    result: dict[str, float] = {}
    for prefix, ranks in (("txt", image_ranks), ("img", text_ranks)):
        recalls = [100.0 * (ranks < k).double().mean().item() for k in ks]
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
