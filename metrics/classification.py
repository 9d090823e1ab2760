"""Classification metrics: accuracy in percent and confusion counts, from logits or predicted labels."""

from __future__ import annotations

import numpy as np
import torch


def _predictions(
    logits_or_preds: torch.Tensor | np.ndarray, targets: torch.Tensor | np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted labels, targets) as LongTensors of the same shape; logits have one more (last) dim."""
    outputs = torch.as_tensor(logits_or_preds).detach()
    labels = torch.as_tensor(targets).detach().to(outputs.device).long()
    if outputs.ndim == labels.ndim + 1:
        outputs = outputs.argmax(-1)  # logits (..., num_classes) -> labels (...)
    if outputs.shape != labels.shape:
        raise ValueError(
            f"predictions of shape {tuple(outputs.shape)} do not match targets of shape {tuple(labels.shape)} "
            "(expected logits (..., num_classes) or labels of the targets' shape)"
        )
    if labels.numel() == 0:
        raise ValueError("accuracy of an empty set of targets is undefined")
    return outputs.long(), labels


def accuracy(logits_or_preds: torch.Tensor | np.ndarray, targets: torch.Tensor | np.ndarray) -> float:
    """Percentage of predictions equal to the targets."""
    preds, labels = _predictions(logits_or_preds, targets)
    return 100.0 * (preds == labels).double().mean().item()


def confusion_counts(
    logits_or_preds: torch.Tensor | np.ndarray, targets: torch.Tensor | np.ndarray, num_classes: int
) -> torch.Tensor:
    """LongTensor (num_classes, num_classes): entry [true, predicted] counts the samples of that pair."""
    preds, labels = _predictions(logits_or_preds, targets)
    for name, values in (("targets", labels), ("predictions", preds)):
        if values.min() < 0 or values.max() >= num_classes:
            low, high = values.min().item(), values.max().item()
            raise ValueError(f"{name} hold labels outside [0, {num_classes}): min {low}, max {high}")
    pair_ids = labels.flatten() * num_classes + preds.flatten()  # (N,)
    return torch.bincount(pair_ids, minlength=num_classes * num_classes).view(num_classes, num_classes).cpu()
