"""SNLI-VE visual entailment: 3-way classification (contradiction 0, neutral 1, entailment 2) of an image and a
hypothesis sentence from the fused [CLS], with optional momentum distillation.

    torchrun --nproc_per_node=8 VE.py --config configs/VE.yaml --checkpoint ALBEF.pth --output_dir output/ve
Reports val/acc and test/acc (%); the best checkpoint is kept by val accuracy.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from dataset.datasets import VEDataset
from engine import main_for
from tasks.classification import ClassificationTask


class VETask(ClassificationTask):
    name = "ve"
    model_task = "ve"
    dataset_cls = VEDataset

    def images(self, batch: dict[str, Any]) -> Tensor:
        return batch["image"]  # (B, 3, H, W)


main = main_for(VETask)

if __name__ == "__main__":
    main()
