"""Weakly-supervised visual grounding on RefCOCO+ (ALBEF's protocol): fine-tune ITC + ITM on the referring
expressions, then locate the referred object through Grad-CAM.

    python Grounding.py --config configs/Grounding.yaml --output_dir output/grounding --checkpoint ALBEF.pth
    torchrun --nproc_per_node=8 Grounding.py --config configs/Grounding.yaml --checkpoint refcoco.pth --evaluate

Evaluation: for every expression the Grad-CAM heat map (``gradcam.mode`` itm: the ITM match logit w.r.t. the
cross-attention of fusion block ``gradcam.block_num``; itc: the image-text similarity w.r.t. the image encoder's
last attention) scores each detector proposal of the image by its heat / area ** ``gradcam.box_alpha``; the best
proposal counts as correct at IoU >= 0.5 with the ground truth (refTools). Accuracy per REFER split: val/acc_val from
data.val_file, test/acc_testA and test/acc_testB from data.test_file. Batches are split across ranks and the
predictions gathered in memory. The official refcoco.pth loads with its key names (the retrieval model's layout).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dataset.datasets import GroundingDataset
from engine import dist, main_for
from models.gradcam import compute_gradcam
from refTools import REFER, grounding_accuracy, load_dets, predict_boxes
from tasks.base import task_defaults, unwrap
from tasks.itc_itm import ItcItmTask


class GroundingTask(ItcItmTask):
    """ITC + ITM fine-tuning on referring expressions; Grad-CAM evaluation."""

    name = "grounding"
    model_task = "grounding"
    config_defaults = task_defaults(
        data={
            "train_file": [],  # grounding JSON files [{image, text, ref_id}] to fine-tune on
            "val_file": "",  # expressions of the REFER val split ("" = no val evaluation)
            "test_file": "",  # expressions of testA + testB ("" = no test evaluation)
            "refer_root": "",  # REFER data root: <refer_root>/<refer_dataset>/refs(<split_by>).p + instances.json
            "refer_dataset": "refcoco+",
            "split_by": "unc",
            "dets_file": "",  # detector proposals JSON {image_id: [[x, y, w, h], ...]}
        },
        gradcam={
            "mode": "itm",  # itm (cross-attention of a fusion block) | itc (image encoder's attention)
            "block_num": None,  # itm: BERT layer index of the cross-attention used; null = the third fusion layer
            "vit_block": -1,  # itc: image encoder block (python index; -1 = the last)
            "box_alpha": 0.5,  # proposals score heat / area ** box_alpha
        },
    )
    best_metric = "acc_val"

    def __init__(self, config, device: torch.device) -> None:
        super().__init__(config, device)
        self._refer: REFER | None = None
        self._dets: dict[int, torch.Tensor] | None = None

    def build_train_loader(self):
        return self.train_loader_for(GroundingDataset, "grounding_train", "grounding ([{image, text, ref_id}])",
                                     train=True)

    # ---- evaluation ------------------------------------------------------------------------------------------------
    def refer_and_dets(self) -> tuple[REFER, dict[int, torch.Tensor]]:
        """The REFER index and the proposals, read once per run."""
        data = self.config.data
        if self._refer is None:
            if not data.refer_root or not data.dets_file:
                raise ValueError("grounding evaluation needs data.refer_root (REFER files) and data.dets_file")
            self._refer = REFER(data.refer_root, data.refer_dataset, data.split_by)
            self._dets = load_dets(data.dets_file)
        return self._refer, self._dets

    def build_eval_dataset(self, split: str, **options: Any) -> GroundingDataset:
        data = self.config.data
        return GroundingDataset(data.val_file if split == "val" else data.test_file, self.transform("test"),
                                self.image_root(), max_words=int(data.max_words), train=False, **options)

    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        cam_cfg = self.config.gradcam
        refer, dets = self.refer_and_dets()
        dataset = self.eval_dataset(split)
        net = unwrap(model)  # Grad-CAM differentiates w.r.t. activations only: no DDP machinery involved
        local: list[tuple[int, dict]] = []
        for batch in self.loader(dataset, train=False):
            batch = self.to_device(batch)
            maps = compute_gradcam(net, batch["image"], batch["text_ids"], batch["text_mask"], cam_cfg.mode,
                                   cam_cfg.block_num, int(cam_cfg.vit_block)).text_map  # (B, h, w)
            ref_ids = batch["ref_id"].tolist()
            predictions = predict_boxes(list(zip(ref_ids, maps, strict=True)), dets, refer, float(cam_cfg.box_alpha))
            local += zip(batch["index"].tolist(), predictions, strict=True)
        # The sampler pads the last share with repeats: keep one prediction per entry.
        unique = {index: prediction for share in dist.all_gather_object(local) for index, prediction in share}
        if len(unique) != len(dataset):
            raise RuntimeError(f"grounding evaluation: {len(unique)} of {len(dataset)} expressions were evaluated")
        results = [unique[index] for index in sorted(unique)]
        return {f"acc_{name}": value for name, value in grounding_accuracy(results, refer).items()}


main = main_for(GroundingTask)

if __name__ == "__main__":
    main()
