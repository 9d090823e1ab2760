"""NLVR2: is a sentence true of a pair of images? The text attends to the two images in two consecutive blocks of
every fusion layer; a binary head on the fused [CLS]; optional momentum distillation.

    torchrun --nproc_per_node=8 NLVR.py --config configs/NLVR.yaml --checkpoint pretrain_model_nlvr.pth \
        --output_dir output/nlvr
The checkpoint is the output of Pretrain_nlvr.py (or ALBEF's pretrain_model_nlvr.pth); a plain pretraining
checkpoint (ALBEF.pth) also loads, each fusion layer copied into its pair. Reports val/acc (NLVR2 dev) and test/acc
(%); the best checkpoint is kept by val accuracy.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from dataset.datasets import NLVRDataset
from engine import main_for
from tasks.classification import ClassificationTask


class NLVRTask(ClassificationTask):
    name = "nlvr"
    model_task = "nlvr"
    dataset_cls = NLVRDataset

    def images(self, batch: dict[str, Any]) -> Tensor:
        return torch.cat([batch["image0"], batch["image1"]])  # (2B, 3, H, W): the B first images, then the B second


main = main_for(NLVRTask)

if __name__ == "__main__":
    main()
