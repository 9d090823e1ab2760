"""metrics.retrieval: recall@K against a brute-force loop, also on a top-k re-ranked matrix (-100 elsewhere)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metrics import recall_at_k


def _brute_force(scores_i2t: np.ndarray, scores_t2i: np.ndarray, img2txt, txt2img, ks=(1, 5, 10)) -> dict:
    """ALBEF's loops, with a stable descending sort."""
    image_ranks = []
    for image, row in enumerate(scores_i2t):
        order = np.argsort(-row, kind="stable")
        image_ranks.append(min(int(np.where(order == text)[0][0]) for text in img2txt[image]))
    text_ranks = []
    for text, row in enumerate(scores_t2i):
        order = np.argsort(-row, kind="stable")
        text_ranks.append(int(np.where(order == txt2img[text])[0][0]))
    result = {}
    for prefix, ranks in (("txt", np.array(image_ranks)), ("img", np.array(text_ranks))):
        for k in ks:
            result[f"{prefix}_r{k}"] = 100.0 * float(np.mean(ranks < k))
        result[f"{prefix}_r_mean"] = float(np.mean([result[f"{prefix}_r{k}"] for k in ks]))
    result["r_mean"] = (result["txt_r_mean"] + result["img_r_mean"]) / 2
    return result


def _annotations(num_images: int, rng: np.random.Generator) -> tuple[list[list[int]], list[int]]:
    """Between 1 and 5 captions per image, numbered consecutively as in ALBEF's eval datasets."""
    img2txt, txt2img = [], []
    for image in range(num_images):
        count = int(rng.integers(1, 6))
        img2txt.append(list(range(len(txt2img), len(txt2img) + count)))
        txt2img.extend([image] * count)
    return img2txt, txt2img


@pytest.mark.parametrize("ties", [False, True])
def test_recall_matches_brute_force(ties: bool) -> None:
    rng = np.random.default_rng(3 + ties)
    img2txt, txt2img = _annotations(23, rng)
    num_texts = len(txt2img)
    if ties:  # few distinct values: the tie order decides ranks
        scores_i2t = rng.integers(0, 4, size=(23, num_texts)).astype(np.float32)
        scores_t2i = rng.integers(0, 4, size=(num_texts, 23)).astype(np.float32)
    else:
        scores_i2t = rng.normal(size=(23, num_texts)).astype(np.float32)
        scores_t2i = rng.normal(size=(num_texts, 23)).astype(np.float32)
    # Make some ground truth pairs score high so that the recalls are not all near chance.
    for image, texts in enumerate(img2txt):
        scores_i2t[image, texts[-1]] += 2.0 * (image % 2)
    expected = _brute_force(scores_i2t, scores_t2i, img2txt, txt2img)
    assert 0 < expected["txt_r1"] < 100 and 0 < expected["img_r10"] < 100
    assert recall_at_k(scores_i2t, scores_t2i, img2txt, txt2img) == pytest.approx(expected)
    from_tensors = recall_at_k(torch.from_numpy(scores_i2t), torch.from_numpy(scores_t2i), img2txt, txt2img)
    assert from_tensors == pytest.approx(expected)
    other_ks = recall_at_k(scores_i2t, scores_t2i, img2txt, txt2img, ks=(2, 3))
    assert other_ks == pytest.approx(_brute_force(scores_i2t, scores_t2i, img2txt, txt2img, ks=(2, 3)))


def test_recall_hand_computed_with_ties() -> None:
    # 2 images, texts 0,1 -> image 0 and text 2 -> image 1.
    scores_i2t = np.array([[0.1, 0.5, 0.9], [0.3, 0.3, 0.3]])
    scores_t2i = np.array([[0.2, 0.2], [0.9, 0.1], [0.5, 0.4]])
    result = recall_at_k(scores_i2t, scores_t2i, [[0, 1], [2]], [0, 0, 1], ks=(1, 2))
    # Image 0: its best text (1) ranks 1; image 1: all tied, text 2 ranks 2 (stable order). Texts: image ranks 0
    # (tie, index order), 0, 1.
    assert result["txt_r1"] == 0.0 and result["txt_r2"] == 50.0
    assert result["img_r1"] == pytest.approx(200 / 3) and result["img_r2"] == 100.0
    assert result["r_mean"] == pytest.approx((25.0 + (200 / 3 + 100) / 2) / 2)


def test_recall_input_errors() -> None:
    scores = np.zeros((2, 3))
    with pytest.raises(ValueError, match="img2txt\\[1\\] is empty"):
        recall_at_k(scores, scores.T, [[0, 1], []], [0, 0, 1])
    with pytest.raises(ValueError, match="scores_t2i must be"):
        recall_at_k(scores, scores, [[0, 1], [2]], [0, 0, 1])
    with pytest.raises(ValueError, match="outside"):
        recall_at_k(scores, scores.T, [[0, 1], [3]], [0, 0, 1])
    with pytest.raises(ValueError, match="NaN"):
        recall_at_k(np.full((2, 3), np.nan), scores.T, [[0, 1], [2]], [0, 0, 1])


def _top_k_reranked(sims: torch.Tensor, dense: torch.Tensor, k: int) -> torch.Tensor:
    """ALBEF's re-ranked matrix: the dense score on each row's top k by ``sims``, -100 elsewhere."""
    expected = torch.full_like(dense, -100.0)
    for query in range(sims.shape[0]):
        top = torch.argsort(sims[query], descending=True)[:k]
        expected[query, top] = dense[query, top]
    return expected


def test_recall_of_a_top_k_reranked_matrix_counts_a_missed_caption_as_a_miss() -> None:
    torch.manual_seed(0)
    num_images, num_texts, k = 7, 11, 3
    sims = torch.randn(num_images, num_texts)
    dense = torch.randn(num_images, num_texts)  # what the expensive reranker would give for every pair
    # Image 0's true caption (text 0) has the lowest similarity, so the rerank never sees it.
    sims[0, 0] = -10.0
    dense[0, 0] = 50.0
    matrix = _top_k_reranked(sims, dense, k)
    assert matrix[0, 0] == -100.0 and (matrix != -100.0).sum(1).tolist() == [k] * num_images
    # The missed caption counts as a miss in recall@K although its dense score is the highest of its row.
    img2txt = [[image] for image in range(num_images)]
    txt2img = list(range(num_images)) + [1, 2, 3, 4]  # texts 7..10 are second captions of images 1..4
    for text in range(num_images, num_texts):
        img2txt[txt2img[text]].append(text)
    assert int(np.where(np.argsort(-matrix[0].numpy(), kind="stable") == 0)[0][0]) >= k
    recall = recall_at_k(matrix, matrix.T.contiguous(), img2txt, txt2img, ks=(1, k))
    assert recall == pytest.approx(_brute_force(matrix.numpy(), matrix.T.numpy(), img2txt, txt2img, ks=(1, k)))
    assert recall[f"txt_r{k}"] <= 100.0 * (num_images - 1) / num_images
