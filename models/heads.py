"""Small heads shared by the task models.

Official key layouts: ``itm_head`` a Linear, ``cls_head`` Linear-ReLU-Linear."""

from __future__ import annotations

from torch import nn


def itm_head(width: int) -> nn.Linear:
    """Image-text matching logits (column 1 = match)."""
    return nn.Linear(width, 2)


def mlp_head(width: int, num_classes: int) -> nn.Sequential:
    """Classifier on the fused [CLS] (keys cls_head.0 and cls_head.2, as ALBEF's VE and NLVR2 heads)."""
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, num_classes))
