"""Checkpoint files: atomic writes, safe loads (weights_only), rolling names, `--resume auto` discovery, RNG state.

Layout in output_dir:
  checkpoint_{step:08d}.pth   resumable states, rolling (train.keep_last_ckpts kept)
  checkpoint_last.pth         the newest resumable state (a hard link to the newest rolling file where possible)
  checkpoint_best.pth         the state with the best evaluation metric
A checkpoint is a dict of model, optimizer, scheduler, scaler, ema, epoch, step, iter_in_epoch, rng, config,
best_metric_value, evals_without_improvement - only tensors, numbers, strings, lists and dicts, so
torch.load(weights_only=True) reads it without executing anything.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common import dist
from common.checkpoint_file import load_checkpoint_file  # re-exported: the engine's callers read files through it

log = logging.getLogger("alignfuse")

_ROLLING = re.compile(r"^checkpoint_(\d+)\.pth$")
TEMP_SUFFIX = ".tmp"
_TEMP = re.compile(r"^\.checkpoint_.*\.tmp$")  # save_checkpoint's and link_or_copy's temp files


def rolling_name(step: int) -> str:
    return f"checkpoint_{step:08d}.pth"


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some platforms/filesystems cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _os_error_behind(err: BaseException) -> OSError | None:
    """The OSError behind `err`: torch.save reports a failed write (ENOSPC) as a RuntimeError whose context it is."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _write_error(path: Path, err: BaseException) -> OSError:
    """A clear error for a checkpoint that could not be written, keeping the errno (ENOSPC, EACCES...) when known."""
    cause = _os_error_behind(err)
    reason = (cause.strerror or str(cause)) if cause is not None else (str(err).strip().splitlines() or ["?"])[0]
    try:
        free = f"; {shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free on that filesystem"
    except OSError:
        free = ""
    message = (
        f"could not write checkpoint {path}: {reason}{free}. Nothing was written under that name and the earlier "
        f"checkpoints in {path.parent} are intact: free space or fix permissions, then restart with --resume auto"
    )
    return OSError(cause.errno if cause is not None and cause.errno else errno.EIO, message)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """Write `state` to `path` atomically (temp file in the same dir, fsync, rename). Only rank 0 writes.

    A failed write (disk full, no permission) removes the temp file and raises OSError naming `path`; whatever was
    under `path` before is untouched. A process killed mid-write leaves only a `.<name>.*.tmp` file, which
    `list_rolling` ignores and `remove_temp_files` deletes.
    """
    if not dist.is_main():
        return
    path = Path(path)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch.save turns a failed write into RuntimeError('unexpected pos')
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise _write_error(path, err) from err
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_on_main(write: Callable[[], None]) -> None:
    """Run rank 0's checkpoint writes, then share the outcome with every rank (this is also their barrier).

    A failed write (disk full, permissions) raises the OSError on rank 0 and an OSError quoting it on the other
    ranks, so the whole job stops at the failing save instead of the others waiting in their next collective.
    """
    error: OSError | None = None
    try:
        write()
    except OSError as err:
        error = err
    message = dist.broadcast_object(str(error) if error is not None else None)
    if error is not None:
        raise error
    if message is not None:
        raise OSError(f"rank 0 failed to write a checkpoint: {message}")


def link_or_copy(src: Path, dst: Path) -> None:
    """Make `dst` the same content as `src` atomically: a hard link when the filesystem allows, else a copy."""
    if not dist.is_main():
        return
    tmp = dst.with_name(f".{dst.name}.link{TEMP_SUFFIX}")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise _write_error(dst, err) from err


def remove_temp_files(output_dir: str | Path) -> list[Path]:
    """Delete the temp files of checkpoint writes that never finished (a process killed mid-save); returns them."""
    output_dir = Path(output_dir)
    if not dist.is_main() or not output_dir.is_dir():
        return []
    stale = [p for p in output_dir.iterdir() if _TEMP.match(p.name) and p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log.warning("removed %d unfinished checkpoint temp file(s) of an interrupted save: %s", len(stale),
                    ", ".join(p.name for p in stale))
    return stale


MIN_FILLED_SHARE = 0.5  # a --checkpoint must fill at least this share of the model's parameters (elements)


@dataclass
class CheckpointFit:
    """How a --checkpoint filled a model, after the model's key surgery: what `check_fit` judges and logs."""

    path: str
    model_name: str
    sizes: dict[str, int]  # every weight the checkpoint should fill (state_dict key -> elements)
    loaded: set[str]  # the keys it did fill (model keys outside `sizes` are allowed to be absent)
    num_tensors: int  # tensors in the file's state_dict
    unused: list[str] = field(default_factory=list)  # its keys the model has no place for
    surgery: list[str] = field(default_factory=list)  # the key surgery applied, in words
    absent_ok: list[str] = field(default_factory=list)  # keys allowed to be absent that were (queues, momentum)

    @property
    def missing(self) -> list[str]:
        return [key for key in self.sizes if key not in self.loaded]

    @property
    def filled_share(self) -> float:
        total = sum(self.sizes.values())
        return sum(n for key, n in self.sizes.items() if key in self.loaded) / total if total else 1.0

    def summary(self) -> str:
        """One line: the file, how many tensors went where, which surgery, and what the model keeps of its own."""
        filled = len(self.sizes) - len(self.missing)
        surgery = "; ".join(self.surgery) if self.surgery else "none (the model's own key names)"
        parts = [f"loaded {self.path} into {self.model_name}: {filled} of {len(self.sizes)} weight tensors "
                 f"({self.filled_share:.1%} of the parameters) from its {self.num_tensors} tensors",
                 f"key surgery: {surgery}"]
        if self.missing:
            parts.append(f"not in it, initialised: {_by_module(self.missing)}")
        if self.absent_ok:
            parts.append(f"{len(self.absent_ok)} absent as allowed (e.g. {_by_module(self.absent_ok, limit=2)})")
        if self.unused:
            parts.append(f"unused: {_by_module(self.unused)}")
        return "; ".join(parts)


def _by_module(keys: list[str], limit: int = 4) -> str:
    """'text_decoder.bert.* (130), cls_head.* (4)': keys counted by module (two names deep), largest first."""
    counts: dict[str, int] = {}
    for key in keys:
        parts = key.split(".")
        if len(parts) == 1:
            name = key
        elif len(parts) > 2 and not parts[1].isdigit():
            name = f"{parts[0]}.{parts[1]}.*"
        else:
            name = f"{parts[0]}.*"
        counts[name] = counts.get(name, 0) + 1
    ranked = sorted(counts.items(), key=lambda item: -item[1])
    shown = ", ".join(f"{name} ({count})" for name, count in ranked[:limit])
    return shown + (f" and {len(ranked) - limit} more modules" if len(ranked) > limit else "")


def check_fit(fit: CheckpointFit, evaluate: bool, allow_partial: bool) -> None:
    """Refuse (ValueError) a --checkpoint that fills under MIN_FILLED_SHARE of the model's parameters or, under
    --evaluate, leaves any weight unfilled (the evaluation would score random weights); `allow_partial`
    (--allow_partial_checkpoint) accepts both with a warning. Logs `fit.summary()` once on rank 0."""
    missing = fit.missing
    advice = ("is it a checkpoint of this task's model, built with the same model config? Add "
              "--allow_partial_checkpoint to start from it anyway")
    if fit.filled_share < MIN_FILLED_SHARE and not allow_partial:
        raise ValueError(
            f"checkpoint {fit.path} does not fit {fit.model_name}: after the key surgery "
            f"({'; '.join(fit.surgery) or 'none'}) it fills only {len(fit.sizes) - len(missing)} of its "
            f"{len(fit.sizes)} weight tensors ({fit.filled_share:.1%} of the parameters, at least "
            f"{MIN_FILLED_SHARE:.0%} needed); unfilled: {_by_module(missing)}; {len(fit.unused)} of the file's "
            f"{fit.num_tensors} tensors have no place in the model (e.g. {fit.unused[:3]}); {advice}")
    if evaluate and missing and not allow_partial:
        raise ValueError(
            f"--evaluate with checkpoint {fit.path}: {len(missing)} weight tensors of {fit.model_name} that the "
            f"evaluation uses are not in it ({_by_module(missing)}; e.g. {missing[:3]}), so it would score randomly "
            "initialised weights; give a checkpoint trained for this task (or add --allow_partial_checkpoint to "
            "evaluate anyway)")
    if dist.is_main():
        log.info("%s", fit.summary())
        if missing and (evaluate or fit.filled_share < MIN_FILLED_SHARE):
            log.warning("--allow_partial_checkpoint: %d weight tensors (%.1f%% of the parameters) keep their "
                        "initialisation: %s", len(missing), 100 * (1 - fit.filled_share), _by_module(missing))


def list_rolling(output_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of checkpoint_<step>.pth files in output_dir, newest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for p in output_dir.iterdir():
        match = _ROLLING.match(p.name)
        if match:
            found.append((int(match.group(1)), p))
    return sorted(found, reverse=True)


def find_resume_checkpoint(output_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """Newest checkpoint_<step>.pth in output_dir that loads, with its state; corrupt files are skipped with a warning.

    Returns None when there is nothing to resume from (a fresh run).
    """
    for _, path in list_rolling(output_dir):
        try:
            return path, load_checkpoint_file(path)
        except ValueError as err:
            log.warning("resume auto: skipping %s: %s", path, err)
    return None


def resume_source(resume: str | None, output_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint --resume names (a path, or 'auto': the newest in output_dir) with its state; None for a fresh
    run. Collective under 'auto': rank 0 picks, every rank loads the same file."""
    if not resume:
        return None
    if resume != "auto":
        return Path(resume), load_checkpoint_file(resume)
    found = find_resume_checkpoint(output_dir) if dist.is_main() else None
    path = dist.broadcast_object(str(found[0]) if found else None)
    if path is None:
        log.info("resume auto: no checkpoint in %s, starting fresh", output_dir)
        return None
    return Path(path), found[1] if found else load_checkpoint_file(path)


def prune_rolling(output_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` rolling checkpoints (rank 0 only)."""
    if not dist.is_main() or keep <= 0:
        return
    for _, path in list_rolling(output_dir)[keep:]:
        path.unlink(missing_ok=True)


def prune_deepspeed_tags(ds_dir: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` DeepSpeed checkpoint folders (tags start with the zero-padded step)."""
    ds_dir = Path(ds_dir)
    if not dist.is_main() or keep <= 0 or not ds_dir.is_dir():
        return
    tags = sorted(p for p in ds_dir.iterdir() if p.is_dir() and p.name.startswith("step"))
    for path in tags[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def capture_rng() -> dict[str, Any]:
    """This process's torch (cpu, cuda), numpy and python RNG states, as weights_only-loadable values."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss_next": py_gauss},
    }


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of capture_rng."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    npst = state["numpy"]
    np.random.set_state(
        (npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["cached_gaussian"])
    )
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss_next"]))
