"""The fine-tuning step shared by Retrieval.py and Grounding.py: the retrieval model (ITC with every caption of the
same image a positive, ITM with hard negatives) on batches that carry ``image_idx``, evaluated on val/test files."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from engine import Progress
from tasks.base import AlbefTask


class ItcItmTask(AlbefTask):
    """Subclasses set the data files (``data.val_file`` / ``data.test_file``), the train loader and ``evaluate``."""

    def train_step(self, model: nn.Module, batch: dict[str, Any], progress: Progress) -> dict[str, Tensor]:
        batch = self.to_device(batch)
        return model(batch["image"], batch["text_ids"], batch["text_mask"], idx=batch["image_idx"],
                     alpha=self.alpha(progress))

    def eval_splits(self) -> list[str]:
        data = self.config.data
        return [split for split, path in (("val", data.val_file), ("test", data.test_file)) if path]
