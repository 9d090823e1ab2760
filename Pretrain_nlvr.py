"""NLVR2 text-assignment pretraining (ALBEF): for a text and a pair of images, predict whether the text describes
the first image (0), the second (1) or neither (2). Starts from a pretraining checkpoint, whose fusion layers are
copied into the image-pair layout; its output is the checkpoint NLVR.py fine-tunes.

    torchrun --nproc_per_node=8 Pretrain_nlvr.py --config configs/Pretrain_nlvr.yaml --checkpoint ALBEF.pth \
        --output_dir output/pretrain_nlvr
Training pairs are drawn from each batch of pretraining data. With ``data.eval_file`` (pretraining format, held-out
images) it reports the accuracy on a fixed set of (text, image pair) questions built from that file (chance 33.3%).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from dataset.datasets import PretrainDataset
from engine import Progress, main_for
from tasks.base import AlbefTask, task_defaults, unwrap
from tasks.classification import TextAssignmentEvalDataset, evaluate_accuracy


class PretrainNLVRTask(AlbefTask):
    name = "pretrain_nlvr"
    model_task = "nlvr_pretrain"
    config_defaults = task_defaults(
        data={
            "train_file": [],  # pretraining JSON files [{image, caption (str or list)}]
            "eval_file": "",  # optional held-out pretraining-format file for the text-assignment accuracy
        },
    )
    best_metric = "acc"

    def build_train_loader(self) -> DataLoader:
        return self.train_loader_for(PretrainDataset, "pretrain", "pretraining")

    def train_step(self, model: nn.Module, batch: dict[str, Any], progress: Progress) -> dict[str, Tensor]:
        batch = self.to_device(batch)
        return model(batch["image"], batch["text_ids"], batch["text_mask"])

    def eval_splits(self) -> list[str]:
        return ["val"] if self.config.data.eval_file else []

    def build_eval_dataset(self, split: str, **options: Any) -> TextAssignmentEvalDataset:
        data = self.config.data
        return TextAssignmentEvalDataset(data.eval_file, self.transform("test"), self.image_root(),
                                         max_words=int(data.max_words), **options)

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        dataset = self.eval_dataset(split)
        inner = unwrap(model)

        def predict(batch: dict[str, Any]) -> Tensor:
            images = torch.cat([batch["image0"], batch["image1"]])  # (2B, 3, H, W)
            return inner.ta_head(inner.pair_logits(images, batch["text_ids"], batch["text_mask"]))  # (B, 3)

        return evaluate_accuracy(self.loader(dataset, train=False), self.to_device, predict)


main = main_for(PretrainNLVRTask)

if __name__ == "__main__":
    main()
