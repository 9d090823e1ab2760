"""Freeze all but the last N blocks of a sub-module (e.g. ``visual_encoder: 2`` trains the last two ViT blocks), once
(``optimizer.freeze``) or as a progressive-unfreezing schedule (``optimizer.unfreeze``, see UnfreezeSchedule)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

# Where the block list lives inside a module, tried in order: timm ViT keeps it in ``blocks`` (an nn.Sequential),
# BERT in ``encoder.layer`` (``bert.encoder.layer`` in a BertForMaskedLM, ``layer`` when the prefix points at the
# encoder).
BLOCK_LIST_PATHS: tuple[str, ...] = ("blocks", "encoder.layer", "bert.encoder.layer", "layer")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's model behind DDP (``.module``) or torch.compile (``._orig_mod``) wrappers; parameters are shared."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def find_submodule(model: nn.Module, prefix: str, what: str) -> nn.Module:
    """``model.get_submodule(prefix)`` with an error naming the nearest module names when there is none."""
    try:
        return model.get_submodule(prefix)
    except AttributeError:
        names = [name for name, _ in model.named_modules() if name]
        nearest = difflib.get_close_matches(prefix, names, n=3, cutoff=0.4)
        if not nearest:
            nearest = [name for name, _ in model.named_children()]
        raise ValueError(
            f"{what} names module '{prefix}', which the model does not have; nearest module names: "
            f"{', '.join(nearest) or '(none)'}"
        ) from None


def _block_list(module: nn.Module) -> tuple[str, nn.ModuleList | nn.Sequential] | None:
    """The (path, list of blocks) of the module's repeated blocks, or None when it has none."""
    for path in BLOCK_LIST_PATHS:
        try:
            candidate = module.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(candidate, (nn.ModuleList, nn.Sequential)):
            return path, candidate
    return None


def _is_parameter(model: nn.Module, name: str) -> bool:
    try:
        model.get_parameter(name)
    except AttributeError:
        return False
    return True


def _modules_after(module: nn.Module, path: str) -> list[nn.Module]:
    """Children registered after each step of ``path`` (e.g. ViT's final ``norm`` and ``head`` after ``blocks``,
    BERT's ``pooler`` after ``encoder``): they run after the blocks, so they stay trainable with them."""
    after: list[nn.Module] = []
    parent = module
    for part in path.split("."):
        names = [name for name, _ in parent.named_children()]
        after.extend(getattr(parent, name) for name in names[names.index(part) + 1 :])
        parent = getattr(parent, part)
    return after


def apply_freeze(model: nn.Module, freeze_cfg: Mapping[str, int] | None) -> None:
    """For each ``prefix: n`` set requires_grad=False on the prefix's parameters except its last n blocks and the
    modules after them; n=0 freezes the whole sub-module (or the parameter of that name). Parameters already frozen
    stay frozen."""
    model = unwrap_model(model)
    frozen = frozen_parameter_ids(model, freeze_cfg)
    for param in model.parameters():
        if id(param) in frozen:
            param.requires_grad_(False)


def frozen_parameter_ids(model: nn.Module, freeze_cfg: Mapping[str, int] | None) -> set[int]:
    """ids of the parameters ``apply_freeze(model, freeze_cfg)`` freezes (errors for a bad config as it gives)."""
    model = unwrap_model(model)
    frozen: set[int] = set()
    for prefix, num_trainable in (freeze_cfg or {}).items():
        if isinstance(num_trainable, bool) or not isinstance(num_trainable, int) or num_trainable < 0:
            raise ValueError(
                f"optimizer.freeze.{prefix} must be the number of last blocks left trainable (int >= 0), "
                f"got {num_trainable!r}"
            )
        if num_trainable == 0 and _is_parameter(model, prefix):
            frozen.add(id(model.get_parameter(prefix)))  # e.g. ``temp: 0`` fixes the temperature
            continue
        module = find_submodule(model, prefix, f"optimizer.freeze.{prefix}")
        keep: set[int] = set()
        if num_trainable > 0:
            found = _block_list(module)
            if found is None:
                raise ValueError(
                    f"optimizer.freeze.{prefix}={num_trainable}: module '{prefix}' has no block list at "
                    f"{' / '.join(BLOCK_LIST_PATHS)}; use 0 to freeze it entirely"
                )
            path, blocks = found
            if num_trainable > len(blocks):
                raise ValueError(
                    f"optimizer.freeze.{prefix}={num_trainable}, but '{prefix}.{path}' has only {len(blocks)} blocks"
                )
            for kept_module in [*blocks[len(blocks) - num_trainable :], *_modules_after(module, path)]:
                keep.update(id(param) for param in kept_module.parameters())
        frozen.update(id(param) for param in module.parameters() if id(param) not in keep)
    return frozen


# The ``optimizer.unfreeze`` block (its one home; OPTIMIZER_DEFAULTS in optim.factory embeds it).
UNFREEZE_DEFAULTS: dict[str, Any] = {
    # Progressive unfreezing: the next stage after every this many finished epochs (0 = not by epochs) ...
    "every_epochs": 0,
    # ... or after every this many evaluations during training (0 = not by evaluations); at most one of the two.
    "every_evals": 0,
    # Blocks each scheduled module gains per stage; a module whose blocks are all trainable then unfreezes the rest
    # (its embeddings) as one last stage.
    "blocks_per_stage": 1,
    # Prefixes of optimizer.freeze unfrozen step by step; [] = every module prefix there (a frozen parameter such as
    # ``temp: 0`` stays fixed unless named here).
    "modules": [],
}

ALL = -1  # level of a module with nothing frozen left


class UnfreezeSchedule:
    """Progressive unfreezing (ULMFiT / BLIP-style fine-tuning): ``optimizer.freeze`` is stage 0; every
    ``every_epochs`` epochs (or ``every_evals`` evaluations) the next stage trains ``blocks_per_stage`` more of the
    last blocks of each scheduled module, and once all its blocks train, the whole module. A module without a block
    list (or a parameter) goes from frozen to trainable in one stage.

    The optimizer is built over every parameter the schedule will ever train (``apply(model, last_stage)`` before
    ``build_param_groups``); a parameter that is not unfrozen yet has requires_grad False, hence no gradient, and
    torch's optimizers skip it (no update, no weight decay, no state until it trains). So the groups, the
    scheduler's per-group lrs and a checkpoint's optimizer state keep their layout through every stage. The engine
    counts the events (``record``), applies the stage, re-wraps DDP (which reduces the gradients of the parameters
    trainable when it was built) and logs ``describe``; ``state_dict`` (the events so far) makes resume exact.
    """

    def __init__(self, model: nn.Module, freeze_cfg: Mapping[str, int], options: Mapping[str, Any]) -> None:
        model = unwrap_model(model)
        every_epochs, every_evals = options["every_epochs"], options["every_evals"]
        for key in ("every_epochs", "every_evals", "blocks_per_stage"):
            value = options[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"optimizer.unfreeze.{key} must be an integer >= 0, got {value!r}")
        if every_epochs and every_evals:
            raise ValueError("optimizer.unfreeze: set every_epochs or every_evals, not both")
        if options["blocks_per_stage"] < 1:
            raise ValueError(f"optimizer.unfreeze.blocks_per_stage must be >= 1, got {options['blocks_per_stage']}")
        self.unit = "epochs" if every_epochs else "evals"
        self.every = int(every_epochs or every_evals)
        freeze_cfg = dict(freeze_cfg)
        names = [str(name) for name in options["modules"]] or [
            prefix for prefix in freeze_cfg if not _is_parameter(model, prefix)
        ]
        unknown = [name for name in names if name not in freeze_cfg]
        if unknown:
            raise ValueError(
                f"optimizer.unfreeze.modules names {unknown}, which optimizer.freeze does not freeze; "
                f"frozen: {sorted(freeze_cfg) or '(nothing)'}"
            )
        if not names:
            raise ValueError(
                "optimizer.unfreeze is on but there is nothing to unfreeze: optimizer.freeze names no "
                "module (e.g. optimizer.freeze.visual_encoder=0)"
            )
        frozen_at_start = frozen_parameter_ids(model, {name: freeze_cfg[name] for name in names})  # checks the cfg
        self.levels: dict[str, list[int]] = {}
        self.num_blocks: dict[str, int | None] = {}
        self.owned: dict[str, list[nn.Parameter]] = {}
        step = int(options["blocks_per_stage"])
        for name in names:
            start = freeze_cfg[name]
            if _is_parameter(model, name):
                params, count = [model.get_parameter(name)], None
            else:
                module = find_submodule(model, name, f"optimizer.unfreeze.modules {name}")
                found = _block_list(module)
                params, count = list(module.parameters()), (len(found[1]) if found else None)
            self.num_blocks[name] = count
            # Trainable last blocks per stage, e.g. start 2, 12 blocks, step 4: 2, 6, 10, 12, then everything.
            self.levels[name] = [*range(start, count, step), count, ALL] if count else [start, ALL]
            # Only what the model itself trains (momentum copies, already-frozen weights stay as they are).
            self.owned[name] = [param for param in params if param.requires_grad or id(param) in frozen_at_start]
        self.num_stages = max(len(levels) for levels in self.levels.values())
        self.events = 0

    @classmethod
    def from_config(
        cls, model: nn.Module, freeze_cfg: Mapping[str, int] | None, options: Mapping[str, Any]
    ) -> UnfreezeSchedule | None:
        """The schedule the config asks for, or None when ``every_epochs`` and ``every_evals`` are both 0."""
        if not options["every_epochs"] and not options["every_evals"]:
            return None
        return cls(model, freeze_cfg or {}, options)

    @property
    def prefixes(self) -> list[str]:
        """The scheduled prefixes of optimizer.freeze."""
        return list(self.levels)

    @property
    def last_stage(self) -> int:
        return self.num_stages - 1

    @property
    def stage(self) -> int:
        return min(self.events // self.every, self.last_stage)

    def freeze_config(self, stage: int) -> dict[str, int]:
        """optimizer.freeze of the scheduled modules at ``stage`` (a fully trainable module is left out)."""
        out = {}
        for name, levels in self.levels.items():
            level = levels[min(stage, len(levels) - 1)]
            if level != ALL:
                out[name] = level
        return out

    def apply(self, model: nn.Module, stage: int | None = None) -> None:
        """Set requires_grad of the scheduled parameters for ``stage`` (default: the current one)."""
        stage = self.stage if stage is None else stage
        frozen = frozen_parameter_ids(unwrap_model(model), self.freeze_config(stage))
        for params in self.owned.values():
            for param in params:
                param.requires_grad_(id(param) not in frozen)

    def record(self, unit: str) -> bool:
        """Count one event (``"epochs"``: an epoch finished, ``"evals"``: an evaluation during training); True when
        it starts a new stage."""
        if unit != self.unit:
            return False
        before = self.stage
        self.events += 1
        return self.stage != before

    def state_dict(self) -> dict[str, int]:
        return {"events": self.events}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self.events = int(state["events"])

    def describe(self, model: nn.Module, optimizer: Any = None) -> str:
        """One log line: the stage and, per scheduled module and in total, how many parameters train now; with the
        optimizer, how many of its parameters it updates (those with requires_grad)."""
        stage = self.stage
        parts = []
        for name, params in self.owned.items():
            level = self.levels[name][min(stage, len(self.levels[name]) - 1)]
            blocks = self.num_blocks[name]
            what = "all" if level == ALL else "frozen" if level == 0 else f"last {level} of {blocks} blocks"
            parts.append(f"{name} {what} ({_count(params, True):,} of {_count(params, False):,})")
        model_params = list(unwrap_model(model).parameters())
        line = (
            f"unfreeze stage {stage}/{self.last_stage} after {self.events} {self.unit}: "
            + ", ".join(parts)
            + f"; model {_count(model_params, True):,} of {_count(model_params, False):,} parameters trainable"
        )
        if optimizer is not None:
            grouped = [param for group in optimizer.param_groups for param in group["params"]]
            line += f"; optimizer updates {_count(grouped, True):,} of the {_count(grouped, False):,} in its groups"
        return line


def _count(params: Iterable[nn.Parameter], trainable_only: bool) -> int:
    return sum(param.numel() for param in params if param.requires_grad or not trainable_only)
