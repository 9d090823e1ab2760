"""YAML configs with a schema: defaults, `base:` includes, `--opts a.b=c` overrides, unknown-key errors.

The schema is a nested dict of defaults. Every key a config may hold has a default somewhere in it; a key that is not
in the schema is an error naming the nearest valid keys, so a typo never silently falls back to a default. The engine's
own keys live in `ENGINE_DEFAULTS` below (their one home); `optim.OPTIMIZER_DEFAULTS`, `scheduler.SCHEDULER_DEFAULTS`
and each Task's `config_defaults` complete the schema (see `build_schema`).
"""

from __future__ import annotations

import copy
import difflib
import io
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from common.config_file import _load_layers, _safe_load, _yaml, deep_update

# Engine keys: the one home of their defaults. Units are in the names.
ENGINE_DEFAULTS: dict[str, Any] = {
    "seed": 42,  # base random seed; each rank uses seed + rank
    "device": "auto",  # auto (cuda when available, else cpu) | cpu | cuda
    "train": {
        "epochs": 1,  # passes over the training loader
        "max_steps": 0,  # stop after this many optimizer steps (0 = no limit besides epochs)
        "grad_accum_steps": 1,  # micro-batches per optimizer step; losses are divided by it
        "clip_grad_norm": 0.0,  # max global L2 grad norm (0 = no clipping)
        "amp": "auto",  # auto (bf16 on a CUDA GPU that supports it, none on CPU) | none | bf16 | fp16 (GradScaler)
        "compile": False,  # wrap the training model in torch.compile (texts then padded to data.max_tokens)
        "compile_backend": "inductor",  # torch.compile backend: inductor | aot_eager | eager | cudagraphs ...
        "compile_mode": "default",  # inductor mode: default | reduce-overhead | max-autotune ...
        "ema_decay": 0.0,  # EMA of the weights with this decay, evaluated instead of the raw weights (0 = off)
        "eval_every_epochs": 1,  # evaluate at the end of every N-th epoch (0 = never at epoch ends)
        "epoch_chunks": 1,  # evaluate this many times per evaluated epoch, at equal fractions of it
        "eval_every_steps": 0,  # also evaluate every N optimizer steps (0 = off)
        "eval_before_training": False,  # evaluate once before the first step (fresh runs only)
        "early_stop_patience": 0,  # stop after this many evaluations without improvement (0 = off)
        "best_metric": None,  # evaluate() key that picks checkpoint_best.pth ("val/r_mean" or "r_mean"); null = task's
        "best_mode": None,  # max | min; null = the task's best_mode
        "log_every_steps": 10,  # reduce and log the losses every N optimizer steps
        "count_flops": True,  # count the first micro-batch's FLOPs (FlopCounterMode) to log train/mfu
        "data_wait_warn_share": 0.2,  # warn (once an epoch) when a log window waited this share of it on data
        "ckpt_every_steps": 0,  # also write a resumable checkpoint every N optimizer steps (0 = epoch ends only)
        "keep_last_ckpts": 2,  # rolling checkpoint_<step>.pth files kept (best/last are kept apart)
        "nonfinite_max_consecutive": 5,  # consecutive skipped (non-finite) steps before the run stops
        "loss_weights": {},  # open: loss name -> weight in the summed loss (default 1)
        "find_unused_parameters": False,  # DDP option, for models with branches unused in some steps
        "static_graph": False,  # DDP option, for a graph that is the same every step
        "dist_timeout_s": 1800,  # how long a rank waits at start-up or in a collective before failing (dead/hung peer)
    },
    "deepspeed": {
        "enabled": False,  # train through deepspeed.initialize instead of DDP
        "zero_stage": 2,  # ZeRO stage 0, 1 or 2 (3 is refused: momentum models read every weight whole)
    },
}

# Dotted keys whose dict value accepts any sub-keys (name -> value maps rather than fixed records).
# Tasks add theirs through `Task.open_config_keys`.
OPEN_KEYS: frozenset[str] = frozenset({"train.loss_weights", "optimizer.lr_mult", "optimizer.freeze"})


class Config(dict):
    """A dict with attribute access, recursively (`cfg.train.epochs` == `cfg['train']['epochs']`)."""

    def __init__(self, data: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        for key, value in (data or {}).items():
            self[key] = value

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, _wrap(value))

    def __getattr__(self, key: str) -> Any:
        try:
            return self[key]
        except KeyError:
            near = difflib.get_close_matches(key, [str(k) for k in self.keys()], n=3)
            raise AttributeError(f"config has no key {key!r}; nearest: {near}") from None

    def __setattr__(self, key: str, value: Any) -> None:
        self[key] = value

    def __delattr__(self, key: str) -> None:
        del self[key]

    def __deepcopy__(self, memo: dict) -> Config:
        return Config(copy.deepcopy(self.to_dict(), memo))

    def __reduce__(self):
        return (Config, (self.to_dict(),))

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dicts/lists (for YAML dumps and weights_only checkpoints)."""
        return _unwrap(self)


def _wrap(value: Any) -> Any:
    if isinstance(value, Config):
        return value
    if isinstance(value, Mapping):
        return Config(value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


def _unwrap(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _unwrap(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_unwrap(v) for v in value]
    return value


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_value(key: str, value: Any, default: Any, source: str) -> Any:
    """Return `value` if it fits `default`'s type (int is accepted for float), else raise ValueError."""
    if default is None:  # null default: any value
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok:
            value = float(value)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, (list, tuple)):
        ok = isinstance(value, (list, tuple))
    elif isinstance(default, Mapping):
        ok = isinstance(value, Mapping)
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ValueError(
            f"{source}: config key {key!r} expects {_type_name(default)} (default {default!r}), "
            f"got {_type_name(value)} {value!r}"
        )
    return value


def _all_keys(schema: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for k, v in schema.items():
        full = f"{prefix}{k}"
        keys.append(full)
        if isinstance(v, Mapping):
            keys += _all_keys(v, full + ".")
    return keys


def _unknown_key(key: str, schema_root: Mapping[str, Any], source: str) -> ValueError:
    candidates = _all_keys(schema_root)
    near = difflib.get_close_matches(key, candidates, n=3, cutoff=0.5)
    if not near:  # a typo in the last part only: compare leaf names too
        leaf = key.rsplit(".", 1)[-1]
        near = [c for c in candidates if difflib.get_close_matches(leaf, [c.rsplit(".", 1)[-1]], n=1, cutoff=0.7)][:3]
    return ValueError(f"{source}: unknown config key {key!r}; nearest valid keys: {near or 'none'}")


def _merge(
    target: dict[str, Any],
    layer: Mapping[str, Any],
    schema: Mapping[str, Any],
    schema_root: Mapping[str, Any],
    open_keys: frozenset[str],
    source: str,
    prefix: str = "",
) -> None:
    """Deep-merge `layer` into `target` in place, checking keys and types against `schema`."""
    for key, value in layer.items():
        full = f"{prefix}{key}"
        if full in open_keys:
            if not isinstance(value, Mapping):
                raise ValueError(f"{source}: config key {full!r} expects a mapping, got {_type_name(value)} {value!r}")
            target.setdefault(key, {})
            target[key] = {**target[key], **copy.deepcopy(dict(value))}
            continue
        if key not in schema:
            while isinstance(value, Mapping) and len(value) == 1:  # name the full dotted key (trian.epochs)
                sub, value = next(iter(value.items()))
                full = f"{full}.{sub}"
            raise _unknown_key(full, schema_root, source)
        default = schema[key]
        if isinstance(default, Mapping) and isinstance(value, Mapping):
            _merge(target[key], value, default, schema_root, open_keys, source, full + ".")
        else:
            target[key] = copy.deepcopy(_check_value(full, value, default, source))


def parse_override(item: str) -> tuple[str, Any]:
    """'a.b=c' -> ('a.b', c parsed as a YAML scalar or list)."""
    if "=" not in item:
        raise ValueError(f"--opts: expected key.sub=value, got {item!r}")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ValueError(f"--opts: empty key in {item!r}")
    value = _safe_load(io.StringIO(raw), f"--opts {item}") if raw.strip() else ""
    return key, value


def _nest(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    return out


def _nest_override(key: str, value: Any, open_keys: frozenset[str]) -> dict[str, Any]:
    """Nest a dotted override, keeping the sub-key of an open dict whole (`optimizer.lr_mult.visual.blocks=0.1`)."""
    parts = key.split(".")
    for i in range(1, len(parts)):
        if ".".join(parts[:i]) in open_keys:
            return _nest(".".join(parts[:i]), {".".join(parts[i:]): value})
    return _nest(key, value)


def build_schema(task_defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """ENGINE_DEFAULTS + optimizer + scheduler blocks + the task's own defaults (task keys may refine engine ones)."""
    from optim import OPTIMIZER_DEFAULTS  # lazy: optim imports torch/timm, config tools should not need them
    from scheduler import SCHEDULER_DEFAULTS

    schema = copy.deepcopy(ENGINE_DEFAULTS)
    schema["optimizer"] = copy.deepcopy(OPTIMIZER_DEFAULTS)
    schema["scheduler"] = copy.deepcopy(SCHEDULER_DEFAULTS)
    deep_update(schema, task_defaults or {})
    return schema


def load_config(
    path: str | Path | None,
    overrides: Iterable[str] = (),
    schema: Mapping[str, Any] | None = None,
    open_keys: Iterable[str] = (),
) -> Config:
    """Defaults from `schema`, then `path` (with its `base:` files underneath), then `overrides` ('a.b=c').

    Every key is checked against the schema: unknown key -> ValueError naming the nearest keys and the source file;
    a value of the wrong type -> ValueError. `open_keys` adds to OPEN_KEYS (dicts that accept any sub-keys).
    """
    schema = copy.deepcopy(dict(schema if schema is not None else ENGINE_DEFAULTS))
    opened = OPEN_KEYS | frozenset(open_keys)
    cfg = copy.deepcopy(schema)
    layers = _load_layers(Path(path)) if path else []
    for layer, source in layers:
        _merge(cfg, layer, schema, schema, opened, source)
    for item in overrides:
        key, value = parse_override(item)
        _merge(cfg, _nest_override(key, value, opened), schema, schema, opened, f"--opts {item}")
    return Config(cfg)


def peek_value(path: str | Path | None, overrides: Iterable[str], key: str, default: Any) -> Any:
    """The value of dotted ``key`` that `path` (with its `base:` files) and `overrides` give, else ``default``; no
    schema check. For choices made before the schema is known (which task class a family-switching script runs)."""
    value = default
    layers = [layer for layer, _ in _load_layers(Path(path))] if path else []
    for layer in layers:
        node: Any = layer
        for part in key.split("."):
            node = node.get(part, _MISSING) if isinstance(node, Mapping) else _MISSING
        if node is not _MISSING:
            value = node
    for item in overrides:
        name, raw = parse_override(item)
        if name == key:
            value = raw
    return value


_MISSING = object()


def save_config(cfg: Mapping[str, Any], output_dir: str | Path) -> Path:
    """Write the resolved config to output_dir/config.yaml and return its path."""
    path = Path(output_dir) / "config.yaml"
    yaml = _yaml()
    yaml.default_flow_style = False
    with open(path, "w", encoding="utf-8") as f:
        yaml.dump(_unwrap(cfg), f)
    return path
