"""What every ALBEF-family entry script shares: the data config keys, the tokenizer, loaders, putting a batch on the
device (normalising images there), distillation-alpha warm-up and loading official / AlignFuse checkpoints.

Entry scripts subclass ``AlbefTask`` and add their datasets, their train_step and their evaluation.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dataset.datasets import ImageTextDataset, find_broken_images
from dataset.loader import create_loader
from dataset.randaugment import ALBEF_MAGNITUDE, ALBEF_NUM_OPS
from dataset.tokenizer import build_tokenizer
from dataset.transforms import DEFAULT_MAX_PIXELS, build_transform, normalize
from engine import Progress, Task, dist
from engine.checkpoint import CheckpointFit, check_fit
from models import MODEL_DEFAULTS, create_model, load_checkpoint_detailed, optional_checkpoint_keys
from models.albef import ramp_alpha

log = logging.getLogger("alignfuse")

# The `data:` block every task shares (its one home); tasks add their annotation files next to these.
DATA_DEFAULTS: dict[str, Any] = {
    "image_root": "",  # folder the annotation files' relative image paths start from ("" = as written)
    "batch_size": 32,  # training batch per process
    "eval_batch_size": 64,  # evaluation batch per process
    "num_workers": 4,  # DataLoader worker processes per process (0 = load in the main process)
    "max_words": 30,  # captions are cut to this many words before tokenising
    "max_tokens": 30,  # token limit of a text, [CLS] included
    "max_image_pixels": DEFAULT_MAX_PIXELS,  # larger images are refused (skipped) instead of exhausting memory
    # Training: unreadable images are skipped (each replaced by another sample) and counted; the run stops with an
    # error once the failures are evidence that more than this fraction of the images are unreadable (a wrong
    # image_root, a damaged copy: see dataset.datasets.bad_image_rate_exceeds), not at the first unlucky stretch.
    "max_bad_image_fraction": 0.01,
    # Evaluation never scores a stand-in image: false = an unreadable evaluation image is an error naming it; true =
    # such samples are left out of the metrics (found by decoding each evaluation image once per run) and their
    # number is reported beside the metrics as <split>/skipped_images.
    "eval_skip_broken_images": False,
    # Replaces the task's training transform ("" = ALBEF's: pretrain / train / grounding_train); e.g. "test" (resize
    # only) for synthetic scenes whose small objects a random crop would cut away from their captions.
    "train_transform": "",
    # RandAugment of the training transforms: N operations per image (0 = none) at magnitude M out of 10 (ALBEF: 2, 7).
    "randaugment_num_ops": ALBEF_NUM_OPS,
    "randaugment_magnitude": ALBEF_MAGNITUDE,
}


def task_defaults(data: dict[str, Any], model: dict[str, Any] | None = None, **blocks: Any) -> dict[str, Any]:
    """A task's config_defaults: the shared model and data blocks updated with the task's own keys."""
    model_block = copy.deepcopy(MODEL_DEFAULTS)
    model_block.update(model or {})
    return {"model": model_block, "data": {**copy.deepcopy(DATA_DEFAULTS), **data}, **blocks}


class AlbefTask(Task):
    """Base of the ALBEF-family tasks. Subclasses set ``model_task`` (the models registry name)."""

    model_task: ClassVar[str] = ""
    open_config_keys: ClassVar[tuple[str, ...]] = ("model.bert_overrides",)

    def __init__(self, config, device: torch.device) -> None:
        super().__init__(config, device)
        self.tokenizer = self.build_tokenizer()
        self.skipped_eval_images: dict[str, int] = {}  # split -> samples left out of its last evaluation
        self._broken_eval_entries: dict[tuple, dict[int, str]] = {}  # (split, files) -> entry -> why, once per run

    def build_tokenizer(self) -> Any:
        """The text tokenizer (model.tokenizer's BERT WordPiece); a task with another vocabulary overrides it."""
        return build_tokenizer(self.config.model.tokenizer)

    # ---- model -----------------------------------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        return create_model(self.model_task, self.config.model, tokenizer=self.tokenizer)

    def load_pretrained(self, model: nn.Module, path: str | Path, evaluate: bool = False,
                        allow_partial: bool = False) -> None:
        load_task_checkpoint(model, path, evaluate, allow_partial)

    # ---- data ------------------------------------------------------------------------------------------------------
    def dataset_options(self) -> dict[str, Any]:
        data = self.config.data
        return {"seed": int(self.config.seed), "max_pixels": int(data.max_image_pixels),
                "max_bad_image_fraction": float(data.max_bad_image_fraction)}

    def transform(self, kind: str):
        """The image transform of that kind at model.image_res; data.train_transform replaces the training kinds."""
        data = self.config.data
        if kind != "test" and data.train_transform:
            kind = data.train_transform
        return build_transform(kind, int(self.config.model.image_res), data.randaugment_num_ops,
                               data.randaugment_magnitude)

    def image_root(self) -> str | None:
        return self.config.data.image_root or None

    def train_loader_for(self, dataset_cls: type, transform_kind: str, what: str, **options: Any) -> DataLoader:
        """The training loader over ``data.train_file`` read as ``dataset_cls`` (``what`` names the expected files in
        the error when none are given), or, for tasks with the shard keys (dataset.shards.SHARD_DEFAULTS) and
        ``data.train_shards`` set, over those webdataset shards with items of the same kind."""
        data = self.config.data
        if data.get("train_shards"):
            if data.train_file:
                raise ValueError("data.train_file and data.train_shards are both set: train from one of them")
            from dataset.shards import ShardStream  # here: only the tasks with the shard keys need it

            if options:
                raise ValueError(f"{type(self).__name__}: training from data.train_shards does not take the dataset "
                                 f"options {sorted(options)}: use data.train_file")
            stream = ShardStream(data.train_shards, self.transform(transform_kind), dataset_cls.kind,
                                 int(data.max_words), samples_per_epoch=int(data.samples_per_epoch),
                                 shuffle_buffer=int(data.shuffle_buffer), **self.dataset_options())
            loader = self.loader(stream, train=True)
            log.info("%s", stream.describe())
            return loader
        if not data.train_file:
            raise ValueError(f"data.train_file is empty: give the {what} annotation files")
        dataset = dataset_cls(list(data.train_file), self.transform(transform_kind), self.image_root(),
                              max_words=int(data.max_words), **options, **self.dataset_options())
        return self.loader(dataset, train=True)

    def text_padding(self, train: bool) -> str:
        """How a batch's texts are padded: to its longest text, or, for training under ``train.compile``, to
        ``data.max_tokens``. A compiled graph is specialised to its input shapes; one text length for every step keeps
        the graph of the first step (a new length per batch would recompile it, or trace the text length as a
        symbol). The padded positions are masked wherever they are read, so the losses are those of 'longest'."""
        return "max_length" if train and self.config.train.compile else "longest"

    def build_eval_dataset(self, split: str, **options: Any) -> ImageTextDataset | None:
        """The evaluation dataset of ``split``, built with ``options`` (dataset_options(), plus exclude_entries when
        samples are left out); None for a split that reads no annotation images. Tasks with eval splits override it
        and get it in evaluate() through eval_dataset()."""
        return None

    def eval_dataset(self, split: str) -> ImageTextDataset:
        """build_eval_dataset(split) with its image folders checked. With data.eval_skip_broken_images, the entries
        whose image does not decode are left out (found once per run, each rank decoding its share) and their count
        is kept for the metrics (<split>/skipped_images); otherwise such an image stops the evaluation with an error
        naming it (dataset.datasets.EvalImageError)."""
        options = self.dataset_options()
        dataset = self.build_eval_dataset(split, **options)
        if dataset is None:
            raise ValueError(f"{type(self).__name__} has no evaluation dataset for split {split!r}")
        dataset.check_images_exist()
        if not self.config.data.eval_skip_broken_images:
            return dataset
        key = (split, tuple(dataset.ann_files))
        if key not in self._broken_eval_entries:
            rank, world = dist.get_rank(), dist.get_world_size()
            broken: dict[int, str] = {}
            for share in dist.all_gather_object(find_broken_images(dataset, range(rank, len(dataset), world))):
                broken.update(share)
            for index in sorted(broken):
                log.warning("%s: entry %d left out of the evaluation (data.eval_skip_broken_images): %s", split, index,
                            broken[index])
            self._broken_eval_entries[key] = broken
        broken = self._broken_eval_entries[key]
        self.skipped_eval_images[split] = len(broken)
        if not broken:
            return dataset
        if len(broken) == len(dataset):
            raise ValueError(f"{split}: all {len(dataset)} evaluation samples of {dataset.ann_files} have an "
                             f"unreadable image (e.g. {broken[min(broken)]}): check data.image_root")
        return self.build_eval_dataset(split, **options, exclude_entries=sorted(broken))

    def check_data(self) -> None:
        """Before training or evaluation: the image folders of every evaluation split (the training data's are
        checked when its loader is built), so that a wrong folder fails at start-up, not after an epoch."""
        for split in self.eval_splits():
            dataset = self.build_eval_dataset(split, **self.dataset_options())
            if dataset is not None:
                dataset.check_images_exist()

    def loader(self, dataset: Dataset, train: bool, collate_fn: Any = None) -> DataLoader:
        data = self.config.data
        if train and isinstance(dataset, ImageTextDataset):
            dataset.check_images_exist()  # before the workers start: one clear error for a wrong image_root
        collate_fn = collate_fn or dataset.make_collator(self.tokenizer, int(data.max_tokens),
                                                         padding=self.text_padding(train))
        batch_size = int(data.batch_size if train else data.eval_batch_size)
        if batch_size < 1:  # checked here: torch's own error would arrive as a traceback (engine.errors)
            key = "data.batch_size" if train else "data.eval_batch_size"
            raise ValueError(f"config key {key!r} must be at least 1, got {batch_size}")
        if int(data.num_workers) < 0:
            raise ValueError(f"config key 'data.num_workers' must be 0 or more, got {data.num_workers}")
        return create_loader(dataset, batch_size, train=train, num_workers=int(data.num_workers),
                             collate_fn=collate_fn, seed=int(self.config.seed))

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Tensors to the device; uint8 images normalised there (cheaper to ship 1 byte per pixel)."""
        out = {}
        for key, value in batch.items():
            if isinstance(value, torch.Tensor):
                value = value.to(self.device, non_blocking=True)
                if key.startswith("image") and value.dtype == torch.uint8:
                    value = normalize(value)
            out[key] = value
        return out

    def alpha(self, progress: Progress) -> float | torch.Tensor:
        """This step's distillation weight (ALBEF's warm-up ramp). Under train.compile a 0-d tensor on the device
        (torch.full: a fill kernel, no copy from the host): a Python float would be a constant of the compiled step,
        which each new value of the ramp would recompile (models.albef.distilling)."""
        model_cfg = self.config.model
        if not model_cfg.distill:
            return 0.0
        value = ramp_alpha(float(model_cfg.alpha), bool(model_cfg.warm_up), progress.epoch, progress.iter_in_epoch,
                           progress.iters_per_epoch)
        return torch.full((), value, device=self.device) if self.config.train.compile else value


def load_task_checkpoint(model: nn.Module, path: str | Path, evaluate: bool = False,
                         allow_partial: bool = False) -> None:
    """--checkpoint: official ALBEF or AlignFuse weights through the model's documented key surgery, then one line
    saying what was loaded. Refused (ValueError) when they fill under half of the model's parameters or, with
    ``evaluate``, not every weight, unless ``allow_partial`` (engine.checkpoint.check_fit). Queues, fixed buffers and
    momentum copies may be absent (the copies then start from the loaded weights)."""
    done = load_checkpoint_detailed(model, path)
    optional = optional_checkpoint_keys(model)
    sizes = {key: value.numel() for key, value in model.state_dict().items() if key not in optional}
    fit = CheckpointFit(str(path), type(model).__name__, sizes, set(done.loaded), done.num_tensors,
                        unused=done.unexpected, surgery=done.surgery,
                        absent_ok=[key for key in done.missing if key in optional])
    check_fit(fit, evaluate, allow_partial)
    if hasattr(model, "copy_params_to_momentum") and any("_m." in key for key in done.missing):
        model.copy_params_to_momentum()  # a checkpoint without momentum copies: start them from the weights


def unwrap(model: nn.Module) -> nn.Module:
    """The task model inside DDP / torch.compile wrappers (for its non-forward methods)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


@torch.no_grad()
def gather_in_dataset_order(index: torch.Tensor, num_items: int, *values: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's evaluation rows, gathered and put in dataset order.

    ``index`` (n,) holds the dataset index of each local row of ``values`` (n, ...). The evaluation sampler pads the
    last share with repeats, so the first occurrence of each index is kept; returns each value as (num_items, ...).
    """
    index = dist.all_gather_tensor(index)
    gathered = [dist.all_gather_tensor(value) for value in values]
    first = torch.full((num_items,), -1, dtype=torch.long, device=index.device)
    positions = torch.arange(index.shape[0], device=index.device)
    first.scatter_reduce_(0, index, positions, reduce="amin", include_self=False)
    if (first < 0).any():
        missing = (first < 0).nonzero().flatten()[:10].tolist()
        raise RuntimeError(f"evaluation: items {missing} were not evaluated by any rank")
    return [value[first] for value in gathered]
