"""ALBEF pretraining: ITC + ITM + MLM with momentum distillation on image-caption pairs.

    python Pretrain.py --config configs/Pretrain.yaml --output_dir output/pretrain
    torchrun --nproc_per_node=8 Pretrain.py --config configs/Pretrain.yaml --output_dir output/pretrain
With ``data.eval_file`` (a retrieval evaluation file) it reports zero-shot retrieval (ITC ranking, ITM re-ranking).
"""

from __future__ import annotations

from typing import Any

from dataset.datasets import PretrainDataset
from dataset.shards import SHARD_DEFAULTS
from engine import main_for
from tasks.base import AlbefTask, task_defaults
from tasks.retrieval_eval import evaluate_retrieval_file, retrieval_eval_dataset


class PretrainTask(AlbefTask):
    name = "pretrain"
    model_task = "pretrain"
    config_defaults = task_defaults(
        data={
            "train_file": [],  # pretraining JSON files [{image, caption (str or list)}]
            "eval_file": "",  # optional retrieval-format file [{image, caption: [..]}] for zero-shot retrieval
            "eval_image_root": "",  # image folder of eval_file ("" = data.image_root)
            **SHARD_DEFAULTS,  # train_shards (instead of train_file), samples_per_epoch, shuffle_buffer
        },
        eval={"k_test": 128},  # candidates re-ranked by ITM per query in retrieval evaluation
    )
    best_metric = "r_mean"

    def build_train_loader(self):
        return self.train_loader_for(PretrainDataset, "pretrain", "pretraining")

    def train_step(self, model, batch: dict[str, Any], progress) -> dict[str, Any]:
        batch = self.to_device(batch)
        return model(batch["image"], batch["text_ids"], batch["text_mask"], alpha=self.alpha(progress))

    def eval_splits(self) -> list[str]:
        return ["val"] if self.config.data.eval_file else []

    def build_eval_dataset(self, split: str, **options: Any):
        data = self.config.data
        return retrieval_eval_dataset(self, data.eval_file, data.eval_image_root or self.image_root(), **options)

    def evaluate(self, model, split: str) -> dict[str, float]:
        return evaluate_retrieval_file(self, model, split, int(self.config.eval.k_test))


main = main_for(PretrainTask)

if __name__ == "__main__":
    main()
