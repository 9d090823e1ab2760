"""AlignFuse's engine: the one training loop, configs, checkpoints and the distributed helpers.

Entry scripts subclass `engine.Task` and call `engine.run(XTask, argv)`.
"""

from engine import dist
from engine.config import ENGINE_DEFAULTS, OPEN_KEYS, Config, build_schema, load_config, save_config
from engine.task import Progress, Task
from engine.trainer import Trainer, build_arg_parser, build_trainer, main_for, run

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
    "run",
    "save_config",
]
