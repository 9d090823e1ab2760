"""Image-text retrieval (MSCOCO / Flickr30k): fine-tune ALBEF with ITC (momentum distillation, every caption of an
image a positive) + ITM (hard negatives), evaluate with ITC ranking and ITM re-ranking of the top k_test.

    torchrun --nproc_per_node=8 Retrieval.py --config configs/Retrieval_coco.yaml --checkpoint ALBEF.pth \
        --output_dir output/retrieval_coco
    torchrun --nproc_per_node=8 Retrieval.py --config configs/Retrieval_coco.yaml --checkpoint mscoco.pth --evaluate
Reports txt_r1/5/10 (image->text), img_r1/5/10 (text->image), their means and r_mean per split; the best checkpoint
is kept by val r_mean. ``--evaluate`` with a pretraining checkpoint gives zero-shot numbers.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.utils.data import DataLoader

from dataset.datasets import RetrievalEvalDataset, RetrievalTrainDataset
from dataset.shards import SHARD_DEFAULTS
from engine import main_for
from tasks.base import task_defaults
from tasks.itc_itm import ItcItmTask
from tasks.retrieval_eval import evaluate_retrieval_file, retrieval_eval_dataset


class RetrievalTask(ItcItmTask):
    name = "retrieval"
    model_task = "retrieval"
    config_defaults = task_defaults(
        data={
            "train_file": [],  # [{image, caption, image_id}] files, one entry per caption
            "val_file": "",  # [{image, caption: [..]}]; picks the best checkpoint ("" = none)
            "test_file": "",  # [{image, caption: [..]}] ("" = none)
            **SHARD_DEFAULTS,  # train_shards (instead of train_file), samples_per_epoch, shuffle_buffer
        },
        eval={
            "k_test": 256,  # candidates per query re-scored by ITM (ALBEF: 256 for COCO and Flickr30k)
        },
    )
    best_metric = "r_mean"

    def build_train_loader(self) -> DataLoader:
        return self.train_loader_for(RetrievalTrainDataset, "train",
                                     "retrieval training ([{image, caption, image_id}])")

    def build_eval_dataset(self, split: str, **options: Any) -> RetrievalEvalDataset:
        return retrieval_eval_dataset(self, self.config.data[f"{split}_file"], self.image_root(), **options)

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        return evaluate_retrieval_file(self, model, split, int(self.config.eval.k_test))


main = main_for(RetrievalTask)

if __name__ == "__main__":
    main()
