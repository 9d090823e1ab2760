"""AlignFuse's engine: the one training loop, configs, checkpoints and the distributed helpers.

Entry scripts subclass `engine.Task` and call `engine.run(XTask, argv)`.

The names below are loaded on first use (PEP 562), so `from engine import dist` or `from engine.config import ...`
does not import the trainer (argparse, signal handling, the optimizer and scheduler factories) with it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {  # name -> the module that defines it
    "ENGINE_DEFAULTS": "engine.config",
    "OPEN_KEYS": "engine.config",
    "Config": "engine.config",
    "build_schema": "engine.config",
    "load_config": "engine.config",
    "save_config": "engine.config",
    "Progress": "engine.task",
    "Task": "engine.task",
    "Trainer": "engine.trainer",
    "build_arg_parser": "engine.cli",
    "build_trainer": "engine.cli",
    "main_for": "engine.cli",
    "main_for_families": "engine.cli",
    "run": "engine.cli",
}
_SUBMODULES = {"backend", "backend_deepspeed", "backend_torch", "batches", "checkpoint", "cli", "config", "dist",
               "errors", "launch", "logger", "runtime", "state", "task", "throughput", "trainer"}

__all__ = [
    "ENGINE_DEFAULTS",
    "OPEN_KEYS",
    "Config",
    "Progress",
    "Task",
    "Trainer",
    "build_arg_parser",
    "build_schema",
    "build_trainer",
    "dist",
    "load_config",
    "main_for",
    "main_for_families",
    "run",
    "save_config",
]

if TYPE_CHECKING:  # what static tools see; at run time __getattr__ imports on demand
    from engine import dist
    from engine.cli import build_arg_parser, build_trainer, main_for, main_for_families, run
    from engine.config import ENGINE_DEFAULTS, OPEN_KEYS, Config, build_schema, load_config, save_config
    from engine.task import Progress, Task
    from engine.trainer import Trainer


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"engine.{name}")
    else:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*__all__, *_SUBMODULES})
