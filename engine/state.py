"""What a run saves and restores.

- `RunState`: where the run is and what its evaluations found (epoch, step, position in the epoch, best metric...);
- `RunCheckpoints`: the run's checkpoint files - checkpoint_<step>.pth (rolling) and checkpoint_last.pth (resumable),
  checkpoint_best.pth - holding the model, EMA weights, the run state, every rank's RNG, the config, the unfreezing
  stage and the backend's state (optimizer, scheduler, grad scaler; DeepSpeed's own files beside them).
The keys are the ones the engine has always written (engine.checkpoint describes them), so older checkpoints resume.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from engine import checkpoint as ckpt
from engine import dist
from engine.config import Config
from engine.runtime import seed_everything

if TYPE_CHECKING:
    from torch.optim.swa_utils import AveragedModel

    from engine.backend import Backend

log = logging.getLogger("alignfuse")  # the run's log (engine.logger.RunLogger's sinks)

REQUIRED_KEYS = ("model", "epoch", "step", "iter_in_epoch")  # what makes a file a resumable checkpoint of this engine


@dataclass
class RunState:
    epoch: int = 0  # epochs finished
    step: int = 0  # optimizer steps taken (skipped steps do not count)
    iter_in_epoch: int = 0  # micro-batches of the current epoch consumed
    best_value: float | None = None  # the best value of the best metric so far (key best_metric_value)
    evals_without_improvement: int = 0  # evaluations since the best one (early stopping)
    last_eval_step: int = -1  # the step of the last evaluation (-1: none yet)
    last_metrics: dict[str, float] = field(default_factory=dict)  # the last evaluation's '<split>/<metric>' values

    @property
    def position(self) -> tuple[int, int, int, int]:
        """What tells two checkpoints of a run apart: a state at the same position is not saved twice."""
        return self.step, self.epoch, self.iter_in_epoch, self.last_eval_step

    def to_checkpoint(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "step": self.step,
            "iter_in_epoch": self.iter_in_epoch,
            "best_metric_value": self.best_value,
            "evals_without_improvement": self.evals_without_improvement,
            "last_eval_step": self.last_eval_step,
            "last_metrics": dict(self.last_metrics),
        }

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any], path: str | Path) -> RunState:
        """The run state of checkpoint `state` (read from `path`); a ValueError when it is not a resumable one."""
        for key in REQUIRED_KEYS:
            if key not in state:
                raise ValueError(f"checkpoint {path} has no {key!r} entry: not a resumable checkpoint of this engine")
        return cls(
            epoch=int(state["epoch"]),
            step=int(state["step"]),
            iter_in_epoch=int(state["iter_in_epoch"]),
            best_value=state.get("best_metric_value"),
            evals_without_improvement=int(state.get("evals_without_improvement", 0)),
            last_eval_step=int(state.get("last_eval_step", -1)),
            last_metrics=dict(state.get("last_metrics") or {}),
        )

    def record_eval(self, value: float, mode: str) -> bool:
        """Count an evaluation whose best-metric value is `value` ('max' or 'min' is better); True when it is the
        best so far."""
        improved = self.best_value is None or (value > self.best_value if mode == "max" else value < self.best_value)
        if improved:
            self.best_value = value
            self.evals_without_improvement = 0
        else:
            self.evals_without_improvement += 1
        return improved


class RunCheckpoints:
    """A training run's checkpoints: what they hold, writing them (rank 0, atomically) and reading one back."""

    def __init__(self, output_dir: Path, cfg: Config, model: nn.Module, backend: Backend, ema: AveragedModel | None,
                 unfreeze: Any) -> None:
        self.output_dir = output_dir
        self.cfg = cfg
        self.model = model
        self.backend = backend
        self.ema = ema
        self.unfreeze = unfreeze  # optim.UnfreezeSchedule or None
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.keep = int(cfg.train.keep_last_ckpts)
        self._last_saved: tuple[int, int, int, int] | None = None  # the position of the last resumable checkpoint

    def state_dict(self, run: RunState, full: bool = True) -> dict[str, Any]:
        """The checkpoint as weights_only-loadable values; `full` adds the backend's optimizer, scheduler and scaler
        state. Collective (RNG of every rank): call on all ranks."""
        state: dict[str, Any] = {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            **run.to_checkpoint(),
            "rng": dist.all_gather_object(ckpt.capture_rng()),
            "world_size": self.world,
            "config": self.cfg.to_dict(),
            "unfreeze": self.unfreeze.state_dict() if self.unfreeze is not None else None,
        }
        if full:
            state.update(self.backend.state_dict())
        return state

    def load(self, path: Path, state: dict[str, Any]) -> RunState:
        """Restore everything from checkpoint `state` (read from `path`), before the backend's prepare(); returns the
        run state to continue from."""
        run = RunState.from_checkpoint(state, path)
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            if state.get("ema") is None:
                raise ValueError(f"checkpoint {path} has no EMA weights but train.ema_decay > 0")
            self.ema.load_state_dict(state["ema"])
        self.backend.load_state_dict(state, path)
        if self.unfreeze is not None:
            if state.get("unfreeze") is not None:
                self.unfreeze.load_state_dict(state["unfreeze"])
            else:  # a checkpoint from before optimizer.unfreeze was set: count its finished epochs
                self.unfreeze.events = run.epoch if self.unfreeze.unit == "epochs" else 0
                log.warning("checkpoint %s has no unfreezing state: starting the schedule at %d %s", path,
                                 self.unfreeze.events, self.unfreeze.unit)
        self._last_saved = run.position
        rng = state.get("rng")
        if isinstance(rng, list) and len(rng) == self.world:
            ckpt.restore_rng(rng[self.rank])
        else:
            # Another world size: no per-rank state to restore, so derive a fresh one from the position instead.
            log.warning("checkpoint %s holds RNG states for another world size: reseeding", path)
            seed_everything(int(self.cfg.seed) + self.rank + 1000003 * run.step)
        log.info("resumed from %s: epoch %d, step %d, iter_in_epoch %d", path, run.epoch, run.step,
                      run.iter_in_epoch)
        return run

    def save_resumable(self, run: RunState) -> None:
        """checkpoint_<step>.pth (rolling) + checkpoint_last.pth; once per position. Call on all ranks."""
        if run.position == self._last_saved:
            return
        state = self.state_dict(run)
        state.update(self.backend.save(self.output_dir, run))  # collective
        path = self.output_dir / ckpt.rolling_name(run.step)

        def write() -> None:
            ckpt.save_checkpoint(path, state)
            ckpt.link_or_copy(path, self.output_dir / "checkpoint_last.pth")
            ckpt.prune_rolling(self.output_dir, self.keep)
            self.backend.prune(self.output_dir, self.keep)

        ckpt.write_on_main(write)
        self._last_saved = run.position

    def save_best(self, run: RunState) -> None:
        """checkpoint_best.pth: the weights and run state, without optimizer state. Call on all ranks."""
        state = self.state_dict(run, full=False)
        ckpt.write_on_main(lambda: ckpt.save_checkpoint(self.output_dir / "checkpoint_best.pth", state))
