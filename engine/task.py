"""The Task interface: what an entry script provides to the engine (model, data, losses, evaluation)."""

from __future__ import annotations

import abc
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader

from engine.checkpoint import CheckpointFit, check_fit, load_checkpoint_file
from engine.config import Config

log = logging.getLogger("alignfuse")


def output_path(output_dir: str | Path, name: str) -> Path:
    """``output_dir / name``, refusing a name that would write outside output_dir (with a ValueError naming it).

    Checked on the resolved path (symlinks followed, ``..`` collapsed), so ``../x``, ``/etc/x``, ``a/../../x`` and a
    link inside output_dir that points elsewhere are all refused; sub-folders such as ``results/x.json`` are fine.
    """
    if not isinstance(name, str) or not name or "\x00" in name:
        raise ValueError(f"result file name {name!r}: expected a non-empty relative path inside output_dir")
    root = Path(output_dir).resolve()
    path = (root / name).resolve()
    if Path(name).is_absolute() or path == root or not path.is_relative_to(root):
        raise ValueError(f"result file name {name!r} would write outside output_dir {root} (resolved to {path}): "
                         "result names must be relative paths inside the run's output folder")
    return path


RESULT_NUMBER = "{n}"  # the place of the file's number in a result name ("caption_val_eval{n}.json")


def numbered_result_name(name: str, number: int) -> str:
    """``name`` with its number: ``{n}`` replaced by it, or, in a name without ``{n}``, ``_<number>`` before the
    suffix from 2 on (number 1 is the name itself: "captions_folder.json", "captions_folder_2.json", ...)."""
    if RESULT_NUMBER in name:
        return name.replace(RESULT_NUMBER, str(number))
    if number == 1:
        return name
    stem, dot, suffix = name.rpartition(".") if "." in Path(name).name else (name, "", "")
    return f"{stem}_{number}{dot}{suffix}"


def next_result_number(folder: Path, name: str) -> int:
    """1 + the largest number of an existing result file of that name pattern in ``folder`` (1 when there is none):
    numbers keep counting across runs into the same folder, in the order the files were written."""
    pattern = re.escape(Path(name).name)
    if RESULT_NUMBER in name:
        pattern = pattern.replace(re.escape(RESULT_NUMBER), r"(\d+)")
    else:
        stem, dot, suffix = pattern.rpartition(r"\.") if "." in Path(name).name else (pattern, "", "")
        pattern = f"{stem}(?:_(\\d+))?{dot}{suffix}"
    numbers = [int(match.group(1) or 1) for match in map(re.compile(pattern).fullmatch, os.listdir(folder)) if match]
    return max(numbers, default=0) + 1


@dataclass
class Progress:
    """Where training stands when train_step is called."""

    epoch: int  # current epoch (0-based)
    iter_in_epoch: int  # micro-batch index within the epoch (0-based)
    iters_per_epoch: int  # micro-batches per epoch on this rank
    global_step: int  # optimizer steps done so far
    total_steps: int  # optimizer steps the run will do


class Task(abc.ABC):
    """Base class of every entry script's task. Only the engine calls backward() and optimizer.step().

    Subclasses set `name`, `config_defaults` (their own config keys with defaults, joined to the schema) and
    `best_metric`, and implement build_model, build_train_loader, train_step and evaluate.
    """

    name: ClassVar[str] = "task"
    config_defaults: ClassVar[dict[str, Any]] = {}
    open_config_keys: ClassVar[tuple[str, ...]] = ()  # dotted keys of dicts that accept any sub-keys
    best_metric: ClassVar[str | None] = None  # evaluate() key picking the best checkpoint; train.best_metric overrides
    best_mode: ClassVar[str] = "max"  # max | min
    output_dir: Path | None = None  # the run's output folder, set by the engine (tasks write result files there)

    def __init__(self, config: Config, device: torch.device) -> None:
        self.config = config
        self.device = device

    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """The task's model (on CPU or the device; the engine moves it to the device)."""

    @abc.abstractmethod
    def build_train_loader(self) -> DataLoader:
        """The training loader; its sampler must be a dataset.sampler.ResumableDistributedSampler (for resume)."""

    @abc.abstractmethod
    def train_step(self, model: nn.Module, batch: Any, progress: Progress) -> dict[str, torch.Tensor]:
        """Named scalar losses for one micro-batch; the engine weights (train.loss_weights) and sums them."""

    @abc.abstractmethod
    def evaluate(self, model: nn.Module, split: str) -> dict[str, float]:
        """Metrics of `split`; called on every rank, must return the same dict on every rank."""

    def eval_splits(self) -> list[str]:
        return ["val"]

    def load_pretrained(self, model: nn.Module, path: str | Path, evaluate: bool = False,
                        allow_partial: bool = False) -> None:
        """Load weights for --checkpoint: the 'model' entry if present, by key. Refused (ValueError) when a tensor
        has another shape, when the file fills under half of the model or, with ``evaluate``, not every weight,
        unless ``allow_partial`` (--allow_partial_checkpoint); see engine.checkpoint.check_fit."""
        state = load_checkpoint_file(path)
        weights = state["model"] if isinstance(state.get("model"), dict) else state
        own = model.state_dict()
        mismatched = [key for key, value in weights.items()
                      if key in own and tuple(getattr(value, "shape", ())) != tuple(own[key].shape)]
        if mismatched:
            raise ValueError(f"checkpoint {path} does not fit {type(model).__name__}: {len(mismatched)} tensors have "
                             f"another shape than the model's (e.g. {mismatched[:3]}); build the model with the "
                             "config the checkpoint was trained with")
        fit = CheckpointFit(str(path), type(model).__name__, {key: value.numel() for key, value in own.items()},
                            {key for key in weights if key in own}, len(weights),
                            unused=[key for key in weights if key not in own])
        check_fit(fit, evaluate, allow_partial)
        model.load_state_dict(weights, strict=False)

    def write_result(self, name: str, data: Any) -> Path:
        """Write ``data`` as JSON to ``name`` in the run's output folder (call it on the main rank only); returns the
        path written.

        Never overwrites: ``{n}`` in ``name`` becomes 1 + the largest number already there (a second ``--evaluate``
        into the same folder writes ``caption_val_eval2.json`` beside ``..._eval1.json``); a name without ``{n}``
        that exists gets ``_2``, ``_3``, ... before its suffix. The file appears complete or not at all.

        ``name`` may come from a config or an annotation file, so it must stay inside the output folder: an absolute
        path, ``..`` or a symlink that leads out is refused with a ValueError (see `output_path`).
        """
        if self.output_dir is None:
            raise RuntimeError(f"{type(self).__name__}.output_dir is not set: result files need a run's output folder")
        folder = output_path(self.output_dir, numbered_result_name(name, 1)).parent
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=folder, prefix=".result_", suffix=".tmp", delete=False,
                                         encoding="utf-8") as tmp:
            json.dump(data, tmp)
        try:
            number = next_result_number(folder, name)
            while True:
                path = output_path(self.output_dir, numbered_result_name(name, number))
                try:
                    try:
                        os.link(tmp.name, path)  # fails instead of replacing an existing file (another run's)
                    except FileExistsError:
                        raise
                    except OSError:  # a file system without hard links: exclusive creation, then the content
                        with open(path, "x", encoding="utf-8") as file:
                            json.dump(data, file)
                    return path
                except FileExistsError:
                    number += 1
        finally:
            os.unlink(tmp.name)

    def check_data(self) -> None:  # noqa: B027 - an optional hook, deliberately empty by default
        """Called once before training or evaluation starts: raise a clear error for data that cannot work (e.g. a
        wrong image folder), before any time is spent."""

    def on_epoch_end(self, epoch: int) -> None:  # noqa: B027 - an optional hook, deliberately empty by default
        """Hook after each training epoch (before its evaluation)."""


# The engine's side of the contract: what it checks of a task's loader and losses, and how it runs its evaluation.


def check_train_loader(task: Task, loader: DataLoader) -> None:
    """A ValueError unless `loader` can resume mid-epoch: a ResumableDistributedSampler and a fixed batch_size."""
    sampler = loader.sampler
    if not hasattr(sampler, "set_start_batch") or not hasattr(sampler, "set_epoch"):
        raise ValueError(
            f"{type(task).__name__}.build_train_loader must use dataset.sampler.ResumableDistributedSampler "
            f"(got {type(sampler).__name__}): resuming mid-epoch needs set_epoch/set_start_batch"
        )
    if loader.batch_size is None:
        raise ValueError("the training loader must have a batch_size (no custom batch_sampler): resume needs it")


def weighted_loss_sum(task: Task, losses: Any, weights: dict[str, float], total_name: str) -> torch.Tensor:
    """The sum of train_step's named scalar `losses`, each times its weight (train.loss_weights, default 1), in
    float32; a ValueError naming the task for anything else than a non-empty dict of scalar tensors."""
    if not isinstance(losses, dict) or not losses or total_name in losses:
        raise ValueError(f"{type(task).__name__}.train_step must return a non-empty dict of named scalar losses (not "
                         f"named {total_name!r}), got {type(losses).__name__} "
                         f"{list(losses) if isinstance(losses, dict) else ''}")
    total = None
    for name, loss in losses.items():
        if not torch.is_tensor(loss) or loss.ndim != 0:
            raise ValueError(f"train_step loss {name!r} must be a scalar tensor, got "
                             f"{getattr(loss, 'shape', type(loss).__name__)}")
        weighted = loss.float() * float(weights.get(name, 1.0))
        total = weighted if total is None else total + weighted
    return total


def evaluate_splits(task: Task, model: nn.Module) -> dict[str, float]:
    """'<split>/<metric>' for every eval split of `task` on `model` (as it is: the caller sets eval mode, no_grad and
    autocast), with '<split>/skipped_images' where unreadable images were left out (data.eval_skip_broken_images)."""
    from dataset.datasets import EvalImageError  # here, not at the top: the engine alone stays light to import

    metrics: dict[str, float] = {}
    for split in task.eval_splits():
        try:
            split_metrics = task.evaluate(model, split)
        except EvalImageError as err:  # from a loader worker it arrives through torch's re-raise: one line
            raise EvalImageError(str(err)) from None
        for key, value in split_metrics.items():
            metrics[f"{split}/{key}"] = float(value)
        skipped = getattr(task, "skipped_eval_images", {}).get(split)
        if skipped is not None:
            metrics[f"{split}/skipped_images"] = float(skipped)
    return metrics
