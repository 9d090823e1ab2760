"""Reading config YAML files: the safe loader, `base:` includes, clear errors for a missing or invalid file.

A leaf (no training code): engine.config builds the schema-checked run config on top of it, and the inference layer
(models.inference, tasks.gradcam_view) reads a checkpoint's task YAML with `read_config_file`.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.constructor import ConstructorError
from ruamel.yaml.error import YAMLError


def _yaml() -> YAML:
    """The safe loader: plain data only. Tags that construct objects (!!python/object...) are errors, never run."""
    return YAML(typ="safe")


def _safe_load(stream: Any, source: str) -> Any:
    """YAML data from `stream`, with a ValueError naming `source` and the line for invalid or unsafe YAML."""
    try:
        return _yaml().load(stream)
    except ConstructorError as err:
        mark = err.problem_mark
        where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark is not None else ""
        raise ValueError(
            f"{source}:{where} {err.problem}. Configs hold plain data only (mappings, lists, strings, numbers, "
            "booleans, null): they are read with a safe YAML loader and tags that build Python objects are refused, "
            "not executed"
        ) from None
    except YAMLError as err:
        raise ValueError(f"{source}: not valid YAML: {err}") from None


CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"  # the repository's configs (suggested for a wrong name)


def _shown(path: Path) -> str:
    """`path` relative to the current folder when it lies below it (as a user would type it), else absolute."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path.resolve())


def nearest_config_files(path: str | Path, n: int = 3) -> list[str]:
    """Up to `n` existing YAML files whose names are closest to `path` (a config file that does not exist): those of
    the repository's configs/ (demo/ included) and those beside `path`, compared by name and by path."""
    path = Path(path)
    candidates = set(CONFIG_DIR.rglob("*.yaml")) if CONFIG_DIR.is_dir() else set()
    if path.parent.is_dir():
        candidates |= {p for p in path.parent.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file()}
    wanted_path, wanted_name = _shown(path.with_suffix("")).lower(), path.stem.lower()

    def score(candidate: Path) -> float:  # without the suffix, which every candidate shares
        return max(difflib.SequenceMatcher(None, wanted_path, _shown(candidate.with_suffix("")).lower()).ratio(),
                   difflib.SequenceMatcher(None, wanted_name, candidate.stem.lower()).ratio())

    folder = path.parent.resolve()
    ranked = sorted((-score(c), c.parent.resolve() != folder, _shown(c)) for c in candidates)  # ties: same folder
    best = -ranked[0][0] if ranked else 0.0
    return [shown for value, _, shown in ranked[:n] if -value >= max(0.5, best - 0.15)]  # the clear runners-up only


def _read_yaml(path: Path, shown: str | None = None) -> dict[str, Any]:
    if not path.is_file():
        near = nearest_config_files(path)
        hint = f"; nearest config files: {', '.join(near)}" if near else f"; the configs are in {_shown(CONFIG_DIR)}/"
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"config file {shown or path} {what}{hint}")
    with open(path, encoding="utf-8") as f:
        data = _safe_load(f, f"config file {path}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _load_layers(path: Path, stack: tuple[Path, ...] = ()) -> list[tuple[dict[str, Any], str]]:
    """The file's `base:` files (recursively, in order) then the file itself, as (dict, source name) layers."""
    shown = f"{path} (the base: of {stack[-1]})" if stack else str(path)
    path = path.resolve()
    if path in stack:
        chain = " -> ".join(str(p) for p in (*stack, path))
        raise ValueError(f"config base include cycle: {chain}")
    data = _read_yaml(path, shown)
    bases = data.pop("base", None)
    if bases is None:
        bases = []
    elif isinstance(bases, str):
        bases = [bases]
    elif not (isinstance(bases, list) and all(isinstance(b, str) for b in bases)):
        raise ValueError(f"config file {path}: 'base' must be a path or a list of paths, got {bases!r}")
    layers: list[tuple[dict[str, Any], str]] = []
    for base in bases:
        layers += _load_layers(path.parent / base, (*stack, path))
    layers.append((data, str(path)))
    return layers


def deep_update(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict update (no checks); returns `base`."""
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            deep_update(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A config YAML with its ``base:`` files merged underneath (no schema check)."""
    merged: dict[str, Any] = {}
    for layer, _source in _load_layers(Path(path)):
        deep_update(merged, layer)
    return merged
