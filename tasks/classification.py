"""What the classification tasks share: the accuracy evaluation loop (batched, split across ranks), the base task of
SNLI-VE and NLVR2 (train / val / test annotation files, best checkpoint by val accuracy), and the held-out set of
the NLVR2 text-assignment pretraining.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from dataset.datasets import ImageTextDataset, PretrainDataset
from engine import Progress
from metrics.classification import accuracy
from tasks.base import AlbefTask, gather_in_dataset_order, task_defaults, unwrap


@torch.no_grad()
def evaluate_accuracy(loader: DataLoader, to_device: Callable[[dict[str, Any]], dict[str, Any]],
                      predict: Callable[[dict[str, Any]], Tensor]) -> dict[str, float]:
    """Accuracy (%) of ``predict(batch) -> logits (B, C)`` against the items' ``label`` over a whole evaluation set.

    Each rank predicts its share; predictions are gathered in memory and de-duplicated by the items' ``index``, so
    the number is the same for any number of ranks. Returns {"acc": ...}.
    """
    preds, labels, indices = [], [], []
    for batch in loader:
        batch = to_device(batch)
        preds.append(predict(batch).argmax(dim=1))  # (B,)
        labels.append(batch["label"])
        indices.append(batch["index"])
    num_items = len(loader.dataset)
    preds_all, labels_all = gather_in_dataset_order(torch.cat(indices), num_items, torch.cat(preds), torch.cat(labels))
    return {"acc": accuracy(preds_all, labels_all)}


class ClassificationTask(AlbefTask):
    """Fine-tuning of an ALBEF classifier (models.model_ve.AlbefClassifier) on labelled annotation files.

    Subclasses set ``model_task`` and ``dataset_cls`` (whose items carry text, label, index and images) and say
    which image tensor the model reads (``images``).
    """

    dataset_cls: ClassVar[type[ImageTextDataset]]
    config_defaults = task_defaults(
        data={
            "train_file": [],  # training annotation files
            "val_file": "",  # validation file (NLVR2 / SNLI-VE dev); picks the best checkpoint ("" = none)
            "test_file": "",  # test file ("" = none)
        },
    )
    best_metric = "acc"

    @abc.abstractmethod
    def images(self, batch: dict[str, Any]) -> Tensor:
        """The image tensor the model takes for a batch already on the device."""

    def build_train_loader(self) -> DataLoader:
        data = self.config.data
        if not data.train_file:
            raise ValueError(f"data.train_file is empty: give the {self.name} training annotation files")
        dataset = self.dataset_cls(list(data.train_file), self.transform("train"), self.image_root(),
                                   max_words=int(data.max_words), train=True, **self.dataset_options())
        return self.loader(dataset, train=True)

    def train_step(self, model: nn.Module, batch: dict[str, Any], progress: Progress) -> dict[str, Tensor]:
        batch = self.to_device(batch)
        return model(self.images(batch), batch["text_ids"], batch["text_mask"], targets=batch["label"],
                     alpha=self.alpha(progress))

    def eval_splits(self) -> list[str]:
        data = self.config.data
        return [split for split, path in (("val", data.val_file), ("test", data.test_file)) if path]

    def build_eval_dataset(self, split: str, **options: Any) -> ImageTextDataset:
        data = self.config.data
        return self.dataset_cls(data[f"{split}_file"], self.transform("test"), self.image_root(),
                                max_words=int(data.max_words), train=False, **options)

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        inner = unwrap(model)
        return evaluate_accuracy(self.loader(self.eval_dataset(split), train=False), self.to_device,
                                 lambda batch: inner.logits(self.images(batch), batch["text_ids"], batch["text_mask"]))


class TextAssignmentEvalDataset(PretrainDataset):
    """A fixed held-out set for the NLVR2 text-assignment pretraining, from a pretraining-format file.

    Item i pairs text i with two images: its own image at position ``label`` (0 or 1) or at neither (label 2), the
    other positions filled with images of other entries. Label and partners are drawn from (seed, i), so the set is
    the same in every evaluation and for any number of ranks. Items: image0, image1, text, label, index.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        images = [entry["image"] for entry in self.entries]
        if len(set(images)) < 3:
            raise ValueError(f"{self.ann_files}: the text-assignment evaluation needs at least 3 different images, "
                             f"found {len(set(images))}")
        self.image_files = images

    def _partners(self, index: int) -> tuple[int, list[int]]:
        """(label, two entry indices whose image differs from entry index's), drawn from (seed, index)."""
        rng = np.random.default_rng((self.seed, 7, index))
        label = int(rng.integers(3))
        partners: list[int] = []
        while len(partners) < 2:
            other = int(rng.integers(len(self.entries)))
            if self.image_files[other] != self.image_files[index] and other not in partners:
                partners.append(other)
        return label, partners

    def _make_item(self, index, rng):
        own = super()._make_item(index, rng)
        label, partners = self._partners(index)
        pair = [own["image"] if label == position else
                self._load_image(self.image_path(self.image_files[partners[position]]), rng)
                for position in (0, 1)]
        return {"image0": pair[0], "image1": pair[1], "text": own["text"], "label": label, "index": index}
