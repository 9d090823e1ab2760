"""The ALBEF/BLIP-style captioner (``model.arch: albef_decoder``, Caption.py's default family): an image-grounded text
decoder on the ALBEF backbone, fine-tuned after a prompt and evaluated with COCO metrics (Caption.py describes the
files, result names and commands). The LSTM family (tasks/caption_sat.py) reuses its data and evaluation."""

from __future__ import annotations

import logging
from typing import Any

from dataset.datasets import CaptionTrainDataset
from engine import dist
from metrics.caption import ConstantCaption
from models.generation import GENERATION_DEFAULTS, GenerationSettings
from tasks.base import AlbefTask, task_defaults
from tasks.captioning import CaptionScoring, ImageFolderDataset, PromptCaptionCollator, generate_captions, prompt_ids

log = logging.getLogger("alignfuse")


class CaptionTask(CaptionScoring, AlbefTask):
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

    def evaluate(self, model, split: str) -> dict[str, float]:
        if split == "folder":
            return self.caption_folder(model)
        dataset = self.eval_dataset(split)
        loader = self.loader(dataset, train=False, collate_fn=dataset.make_collator(self.tokenizer))
        results = generate_captions(model, self.tokenizer, loader, self.device, self.config.caption.prompt,
                                    self.settings, id_key="image_id", seed=int(self.config.seed))
        metrics = self.score_split(split, dataset, results) if dist.is_main() else None
        return dist.broadcast_object(metrics)

    def caption_folder(self, model) -> dict[str, float]:
        data = self.config.data
        dataset = ImageFolderDataset(data.image_folder, self.transform("test"), int(data.max_image_pixels))
        loader = self.loader(dataset, train=False, collate_fn=ImageFolderDataset.collate)
        results = generate_captions(model, self.tokenizer, loader, self.device, self.config.caption.prompt,
                                    self.settings, id_key="index", seed=int(self.config.seed))
        if dist.is_main():
            self.write_folder_captions(dataset, results)
        return {"num_images": float(len(results))}
