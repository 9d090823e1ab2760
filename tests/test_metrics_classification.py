"""metrics.classification: accuracy and confusion counts against brute-force loops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metrics import accuracy, confusion_counts


def test_accuracy_from_logits_and_labels() -> None:
    torch.manual_seed(0)
    logits = torch.randn(50, 3)
    targets = torch.randint(0, 3, (50,))
    expected = 100.0 * sum(int(logits[i].argmax() == targets[i]) for i in range(50)) / 50
    assert 0 < expected < 100
    assert accuracy(logits, targets) == pytest.approx(expected)
    assert accuracy(logits.argmax(1), targets) == pytest.approx(expected)
    assert accuracy(np.array([1, 0, 2, 2]), np.array([1, 1, 2, 0])) == 50.0


def test_confusion_counts_match_a_loop() -> None:
    torch.manual_seed(1)
    preds = torch.randint(0, 4, (40,))
    targets = torch.randint(0, 4, (40,))
    expected = torch.zeros(4, 4, dtype=torch.long)
    for pred, target in zip(preds.tolist(), targets.tolist(), strict=True):
        expected[target, pred] += 1
    assert torch.equal(confusion_counts(preds, targets, 4), expected)
    assert torch.equal(confusion_counts(torch.nn.functional.one_hot(preds, 4).float(), targets, 4), expected)


def test_classification_errors() -> None:
    with pytest.raises(ValueError, match="do not match targets"):
        accuracy(torch.zeros(4, 3, 2), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        accuracy(torch.zeros(0), torch.zeros(0))
    with pytest.raises(ValueError, match="targets hold labels outside \\[0, 2\\)"):
        confusion_counts(torch.tensor([0, 1]), torch.tensor([0, 2]), 2)
