"""metrics.retrieval: recall@K equal to a straightforward re-implementation of ALBEF's itm_eval (np.argsort(score)
[::-1], ties included), also on top-k re-ranked matrices (-100 elsewhere) with k_test below 10."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metrics import albef_ranks, recall_at_k


def _brute_force(scores_i2t: np.ndarray, scores_t2i: np.ndarray, img2txt, txt2img, ks=(1, 5, 10)) -> dict:
    """ALBEF's itm_eval, written out the long way: numpy's argsort reversed, recall = 100.0 * count / n."""
    image_ranks = []
    for image, row in enumerate(scores_i2t):
        order = np.argsort(row)[::-1]
        image_ranks.append(min(int(np.where(order == text)[0][0]) for text in img2txt[image]))
    text_ranks = []
    for text, row in enumerate(scores_t2i):
        order = np.argsort(row)[::-1]
        text_ranks.append(int(np.where(order == txt2img[text])[0][0]))
    result = {}
    for prefix, ranks in (("txt", np.array(image_ranks)), ("img", np.array(text_ranks))):
        values = [100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in ks]
        result.update({f"{prefix}_r{k}": value for k, value in zip(ks, values, strict=True)})
        result[f"{prefix}_r_mean"] = sum(values) / len(values)
    result["r_mean"] = (result["txt_r_mean"] + result["img_r_mean"]) / 2
    return result


def _brute_force_stable(scores_i2t, scores_t2i, img2txt, txt2img, ks) -> dict:
    """Recall@K with ties ranked lowest index first (this module's old rule): differs from ALBEF's on ties."""
    image_ranks = [
        min(int(np.where(np.argsort(-row, kind="stable") == t)[0][0]) for t in img2txt[i])
        for i, row in enumerate(scores_i2t)
    ]
    text_ranks = [
        int(np.where(np.argsort(-row, kind="stable") == txt2img[t])[0][0]) for t, row in enumerate(scores_t2i)
    ]
    result = {}
    for prefix, ranks in (("txt", np.array(image_ranks)), ("img", np.array(text_ranks))):
        result.update({f"{prefix}_r{k}": 100.0 * len(np.where(ranks < k)[0]) / len(ranks) for k in ks})
    return result


def _annotations(num_images: int, rng: np.random.Generator) -> tuple[list[list[int]], list[int]]:
    """Between 1 and 5 captions per image, numbered consecutively as in ALBEF's eval datasets."""
    img2txt, txt2img = [], []
    for image in range(num_images):
        count = int(rng.integers(1, 6))
        img2txt.append(list(range(len(txt2img), len(txt2img) + count)))
        txt2img.extend([image] * count)
    return img2txt, txt2img


def _top_k_reranked(sims: torch.Tensor, dense: torch.Tensor, k: int) -> torch.Tensor:
    """ALBEF's re-ranked matrix: the dense score on each row's top k by ``sims``, -100 elsewhere."""
    expected = torch.full_like(dense, -100.0)
    for query in range(sims.shape[0]):
        top = torch.argsort(sims[query], descending=True)[:k]
        expected[query, top] = dense[query, top]
    return expected


@pytest.mark.parametrize(("num_images", "ties"), [(23, False), (23, True), (61, True)])
def test_recall_equals_albef(num_images: int, ties: bool) -> None:
    rng = np.random.default_rng(3 + ties + num_images)
    img2txt, txt2img = _annotations(num_images, rng)
    num_texts = len(txt2img)
    if ties:  # few distinct values: the tie order decides ranks (rows of 23 to ~190 candidates)
        scores_i2t = rng.integers(0, 4, size=(num_images, num_texts)).astype(np.float32)
        scores_t2i = rng.integers(0, 4, size=(num_texts, num_images)).astype(np.float32)
    else:
        scores_i2t = rng.normal(size=(num_images, num_texts)).astype(np.float32)
        scores_t2i = rng.normal(size=(num_texts, num_images)).astype(np.float32)
    # Make some ground truth pairs score high so that the recalls are not all near chance.
    for image, texts in enumerate(img2txt):
        scores_i2t[image, texts[-1]] += 2.0 * (image % 2)
    expected = _brute_force(scores_i2t, scores_t2i, img2txt, txt2img)
    assert 0 < expected["txt_r1"] < 100 and 0 < expected["img_r10"] < 100
    assert recall_at_k(scores_i2t, scores_t2i, img2txt, txt2img) == expected  # exactly, not approximately
    from_tensors = recall_at_k(torch.from_numpy(scores_i2t), torch.from_numpy(scores_t2i), img2txt, txt2img)
    assert from_tensors == expected
    other_ks = recall_at_k(scores_i2t, scores_t2i, img2txt, txt2img, ks=(2, 3))
    assert other_ks == _brute_force(scores_i2t, scores_t2i, img2txt, txt2img, ks=(2, 3))
    if ties:  # the case can tell the tie orders apart
        assert _brute_force_stable(scores_i2t, scores_t2i, img2txt, txt2img, (1, 5, 10)) != {
            key: value for key, value in expected.items() if "mean" not in key
        }


def test_issue_example_two_texts_two_images() -> None:
    # Text 0 scores both images 0.5: ALBEF's argsort(...)[::-1] puts image 1 first, so text 0 misses at R@1.
    scores_t2i = np.array([[0.5, 0.5], [0.1, 0.9]], dtype=np.float32)
    scores_i2t = np.array([[0.9, 0.1], [0.2, 0.8]], dtype=np.float32)
    result = recall_at_k(scores_i2t, scores_t2i, [[0], [1]], [0, 1])
    assert result["img_r1"] == 50.0 and result["txt_r1"] == 100.0
    assert result == _brute_force(scores_i2t, scores_t2i, [[0], [1]], [0, 1])


def test_recall_hand_computed_with_ties() -> None:
    # 2 images, texts 0,1 -> image 0 and text 2 -> image 1.
    scores_i2t = np.array([[0.1, 0.5, 0.9], [0.3, 0.3, 0.3]])
    scores_t2i = np.array([[0.2, 0.2], [0.9, 0.1], [0.5, 0.4]])
    result = recall_at_k(scores_i2t, scores_t2i, [[0, 1], [2]], [0, 0, 1], ks=(1, 2))
    # Image 0: its best text (1) ranks 1; image 1: all tied, ALBEF's reversed argsort puts text 2 first (rank 0).
    # Texts: text 0 ties, image 1 first -> rank 1; text 1 rank 0; text 2 rank 1.
    assert result["txt_r1"] == 50.0 and result["txt_r2"] == 100.0
    assert result["img_r1"] == 100.0 / 3 and result["img_r2"] == 100.0
    assert result["r_mean"] == (75.0 + (100.0 / 3 + 100.0) / 2) / 2


@pytest.mark.parametrize("k_test", [3, 8])
def test_recall_of_a_reranked_matrix_with_k_test_below_10(k_test: int) -> None:
    # Every candidate outside a query's top k_test scores -100, so R@10 depends on how those ties are ranked.
    torch.manual_seed(k_test)
    rng = np.random.default_rng(k_test)
    img2txt, txt2img = _annotations(40, rng)
    num_images, num_texts = len(img2txt), len(txt2img)
    sims = torch.randn(num_images, num_texts)
    dense = torch.randn(num_images, num_texts)
    for image, texts in enumerate(img2txt):  # half the images find a caption in their top k, others not
        sims[image, texts[0]] += 3.0 * (image % 2)
    # Duplicate captions (as in COCO): text 1 repeats text 0 and gets the same scores.
    sims[:, 1], dense[:, 1] = sims[:, 0], dense[:, 0]
    score_i2t = _top_k_reranked(sims, dense, k_test)
    score_t2i = _top_k_reranked(sims.t().contiguous(), dense.t().contiguous(), k_test)
    expected = _brute_force(score_i2t.numpy(), score_t2i.numpy(), img2txt, txt2img)
    assert recall_at_k(score_i2t, score_t2i, img2txt, txt2img) == expected
    stable = _brute_force_stable(score_i2t.numpy(), score_t2i.numpy(), img2txt, txt2img, (1, 5, 10))
    assert stable["txt_r10"] != expected["txt_r10"] or stable["img_r10"] != expected["img_r10"]


def test_albef_ranks_are_exact_below_max_rank() -> None:
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 3, size=(50, 40)).astype(np.float32)
    targets = [[int(t) for t in rng.choice(40, size=int(rng.integers(1, 4)), replace=False)] for _ in range(50)]
    ranks = albef_ranks(scores, targets, max_rank=10).tolist()
    for query, row in enumerate(scores):
        order = np.argsort(row)[::-1]
        exact = min(int(np.where(order == target)[0][0]) for target in targets[query])
        if exact < 10:
            assert ranks[query] == exact
        else:
            assert ranks[query] >= 10


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
