"""Image captioning (BLIP-style decoder on the ALBEF backbone): fine-tune, evaluate with COCO metrics, caption a folder.

    torchrun --nproc_per_node=8 Caption.py --config configs/Caption_coco.yaml --checkpoint ALBEF_4M.pth \
        --output_dir output/caption_coco
    python Caption.py --config configs/Caption_coco.yaml --checkpoint output/caption_coco/checkpoint_best.pth \
        --evaluate --output_dir output/captions --opts data.image_folder=photos/

Training files: ``[{image, caption, image_id}]`` (COCO Karpathy train, or any dataset in that format); evaluation
files: ``[{image, caption: [..]}]``, scored against ``data.{val,test}_gt_file`` (COCO-format ground truth) or, when
that is empty, against the captions of the evaluation file itself. Every evaluation writes
``caption_<split>_eval<N>.json`` (``[{image_id, caption}]``, plus ``captions`` with ``generation.num_return_sequences``
> 1) to the output folder and reports BLEU-1..4, METEOR (needs Java), ROUGE-L, CIDEr and SPICE (when its jars are
installed) plus ``score``, the mean of ``eval.score_metrics``, which picks the best checkpoint and drives early
stopping (``train.early_stop_patience``). Result files are never overwritten: N counts on from the largest number
already in the folder, so a second ``--evaluate`` into it writes ``..._eval2.json``.

With ``data.image_folder`` set, evaluation captions every image in that folder instead (``captions_folder.json``, then
``captions_folder_2.json``, ...: ``[{image, caption}]``); use it with ``--evaluate`` and a captioning checkpoint.
"""

from __future__ import annotations

import logging
from typing import Any

from dataset.annotations import load_json_annotations
from dataset.datasets import CaptionEvalDataset, CaptionTrainDataset
from engine import dist, main_for_families
from metrics.caption import ConstantCaption, best_constant_caption, caption_metrics, load_coco_references
from models.generation import GENERATION_DEFAULTS, GenerationSettings
from tasks.base import AlbefTask, task_defaults
from tasks.captioning import ImageFolderDataset, PromptCaptionCollator, generate_captions, prompt_ids

log = logging.getLogger("alignfuse")


class CaptionTask(AlbefTask):
    name = "caption"
    model_task = "caption"
    config_defaults = task_defaults(
        model={"arch": "albef_decoder"},  # the captioner family: albef_decoder | prefix_lm | show_attend_tell
        data={
            "train_file": [],  # [{image, caption, image_id}] files
            "val_file": "",  # [{image, caption: [..]}]; "" = no validation
            "test_file": "",  # [{image, caption: [..]}]; "" = no test evaluation
            "val_gt_file": "",  # COCO-format ground truth of val_file ("" = the captions of val_file)
            "test_gt_file": "",  # COCO-format ground truth of test_file ("" = the captions of test_file)
            "image_folder": "",  # caption every image in this folder instead of evaluating (with --evaluate)
        },
        caption={
            "prompt": "a picture of ",  # decoder context before every caption; never scored, not in the output
            "label_smoothing": 0.1,  # of the language-modelling loss
        },
        generation=dict(GENERATION_DEFAULTS),
        eval={
            "score_metrics": ["CIDEr"],  # 'score' = mean of these metrics (best checkpoint, early stopping)
            "meteor": True,  # METEOR (needs Java; reported as unavailable without it)
            "spice": False,  # SPICE (slow; needs Java and the Stanford CoreNLP jars already installed)
            # > 0: also score the best constant caption (one caption for every image, the best by CIDEr among this
            # many most frequent training captions) as <split>/constant_CIDEr, once per split and run: the floor a
            # captioner that ignores the image reaches (40 CIDEr runs over the split: minutes on COCO's 5,000 images)
            "constant_caption_candidates": 0,
        },
    )
    best_metric = "score"

    def __init__(self, config, device) -> None:
        super().__init__(config, device)
        self.settings = GenerationSettings.from_config(config.generation)
        self.prompt_length = len(prompt_ids(self.tokenizer, config.caption.prompt))  # [CLS] + prompt word pieces
        self.constant_captions: dict[str, ConstantCaption] = {}  # split -> its best constant caption (computed once)

    def build_train_loader(self):
        data = self.config.data
        if not data.train_file:
            raise ValueError("data.train_file is empty: give the captioning training files [{image, caption, "
                             "image_id}]")
        dataset = CaptionTrainDataset(list(data.train_file), self.transform("train"), self.image_root(),
                                      max_words=int(data.max_words), **self.dataset_options())
        collator = PromptCaptionCollator(self.tokenizer, int(data.max_tokens), self.config.caption.prompt,
                                         padding=self.text_padding(train=True))
        return self.loader(dataset, train=True, collate_fn=collator)

    def train_step(self, model, batch: dict[str, Any], progress) -> dict[str, Any]:
        batch = self.to_device(batch)
        return model(batch["image"], batch["text_ids"], batch["text_mask"], prompt_length=self.prompt_length,
                     label_smoothing=float(self.config.caption.label_smoothing))

    def eval_splits(self) -> list[str]:
        data = self.config.data
        if data.image_folder:
            return ["folder"]
        return [split for split in ("val", "test") if data[f"{split}_file"]]

    def build_eval_dataset(self, split: str, **options: Any) -> CaptionEvalDataset | None:
        data = self.config.data
        if split == "folder":
            return None  # data.image_folder: captions of the images in a folder, no annotation file
        return CaptionEvalDataset(data[f"{split}_file"], self.transform("test"), self.image_root(),
                                  max_words=int(data.max_words), **options)

    def evaluate(self, model, split: str) -> dict[str, float]:
        if split == "folder":
            return self.caption_folder(model)
        data = self.config.data
        dataset = self.eval_dataset(split)
        loader = self.loader(dataset, train=False, collate_fn=dataset.make_collator(self.tokenizer))
        results = generate_captions(model, self.tokenizer, loader, self.device, self.config.caption.prompt,
                                    self.settings, id_key="image_id", seed=int(self.config.seed))
        metrics = None
        if dist.is_main():
            path = self.write_result(f"caption_{split}_eval{{n}}.json", results)
            log.info("%s captions -> %s", split, path)
            gt_file = data[f"{split}_gt_file"]
            references = (load_coco_references(gt_file) if gt_file else
                          {image_id: entry["caption"] for image_id, entry in zip(dataset.image_ids, dataset.entries,
                                                                                 strict=True)})
            metrics = self.scores(caption_metrics(references, results, meteor=bool(self.config.eval.meteor),
                                                  spice=bool(self.config.eval.spice)))
            constant = self.constant_caption(split, {item["image_id"]: references[item["image_id"]]
                                                     for item in results})
            if constant is not None:
                metrics["constant_CIDEr"] = constant.cider
                log.info("%s CIDEr %.4f = %.2fx the best constant caption's %.4f (%r, the best of the %d most "
                         "frequent training captions, for every image)", split, metrics["CIDEr"],
                         metrics["CIDEr"] / max(constant.cider, 1e-12), constant.cider, constant.caption,
                         constant.num_candidates)
        return dist.broadcast_object(metrics)

    def constant_caption(self, split: str, references: dict) -> ConstantCaption | None:
        """The best constant caption of ``split`` (eval.constant_caption_candidates > 0 and training files given),
        scored on the images of ``references``; computed at the first evaluation of the split, then reused."""
        top_n = int(self.config.eval.constant_caption_candidates)
        if top_n <= 0 or not self.config.data.train_file:
            return None
        if split not in self.constant_captions:
            entries = load_json_annotations(list(self.config.data.train_file), "caption_train")
            self.constant_captions[split] = best_constant_caption((entry["caption"] for entry in entries),
                                                                  references, top_n=top_n)
        return self.constant_captions[split]

    def scores(self, raw: dict[str, float | str]) -> dict[str, float]:
        """Numeric metrics plus 'score'; a metric that could not be computed is logged with its reason, not made up."""
        metrics = {key: float(value) for key, value in raw.items() if not isinstance(value, str)}
        for key, reason in raw.items():
            if isinstance(reason, str) and not reason.endswith("not requested"):
                log.warning("caption metric %s: %s", key.removesuffix("_unavailable"), reason)
        wanted = list(self.config.eval.score_metrics)
        missing = [name for name in wanted if name not in metrics]
        if not wanted or missing:
            raise ValueError(f"eval.score_metrics {wanted}: {missing or 'empty'} not among the computed metrics "
                             f"{sorted(metrics)}")
        metrics["score"] = sum(metrics[name] for name in wanted) / len(wanted)
        return metrics

    def caption_folder(self, model) -> dict[str, float]:
        data = self.config.data
        dataset = ImageFolderDataset(data.image_folder, self.transform("test"), int(data.max_image_pixels))
        loader = self.loader(dataset, train=False, collate_fn=ImageFolderDataset.collate)
        results = generate_captions(model, self.tokenizer, loader, self.device, self.config.caption.prompt,
                                    self.settings, id_key="index", seed=int(self.config.seed))
        if dist.is_main():
            named = [{"image": dataset.files[item["index"]], **{k: v for k, v in item.items() if k != "index"}}
                     for item in results]
            path = self.write_result("captions_folder.json", named)
            log.info("captioned %d of %d images of %s -> %s", len(named), len(dataset), data.image_folder, path)
        return {"num_images": float(len(results))}

# The captioner family, by model.arch: this file's ALBEF/BLIP-style decoder, ViECap-style text-only prefix captioning
# into GPT-2 (tasks/caption_prefix.py), or the ResNet + LSTM soft-attention captioner (tasks/caption_sat.py).
CAPTION_FAMILIES: dict = {
    "albef_decoder": CaptionTask,
    "prefix_lm": "tasks.caption_prefix:PrefixCaptionTask",
    "show_attend_tell": "tasks.caption_sat:ShowAttendTellTask",
}
main = main_for_families("model.arch", CAPTION_FAMILIES, default="albef_decoder")

if __name__ == "__main__":
    main()
