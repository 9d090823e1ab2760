"""The command line of every entry script: the run-level flags, the config they build, and `main_for(XTask)`.

`python Retrieval.py --config ... --opts a.b=c` -> `build_trainer` (flags -> config from the task's schema -> a
Trainer) -> `Trainer.fit()`; a stop signal ends the process with status 0 after its resumable checkpoint.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from engine import errors
from engine.config import build_schema, load_config, peek_value
from engine.launch import report_clean_stop
from engine.task import Task
from engine.trainer import Trainer


def build_arg_parser(description: str = "") -> argparse.ArgumentParser:
    """The run-level flags every entry script shares."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", type=str, default=None, help="YAML config file (may include base: files)")
    parser.add_argument("--output_dir", type=str, default=None, help="where logs and checkpoints go")
    parser.add_argument("--checkpoint", type=str, default=None, help="pretrained weights for the task's model")
    parser.add_argument("--allow_partial_checkpoint", action="store_true",
                        help="accept a --checkpoint that fills under half of the model's weights (or, with --evaluate,"
                             " not every weight); the missing ones stay at their initialisation")
    parser.add_argument("--resume", type=str, default=None, help="a checkpoint to resume from, or 'auto'")
    parser.add_argument("--evaluate", action="store_true", help="evaluate only, no training")
    parser.add_argument("--seed", type=int, default=None, help="overrides the config's seed")
    parser.add_argument("--device", type=str, default=None, choices=["auto", "cpu", "cuda"], help="overrides config")
    parser.add_argument("--opts", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. train.epochs=3 optimizer.lr=1e-4")
    parser.add_argument(errors.DEBUG_FLAG, action="store_true",
                        help=f"show the traceback of a user error (wrong file, key, value...); or {errors.DEBUG_ENV}=1")
    return parser


def build_trainer(task_cls: type[Task], argv: Sequence[str] | None = None) -> Trainer:
    """Parse the run-level flags, build the config from the task's schema and set up the run (not started)."""
    parser = build_arg_parser(f"{task_cls.name}: AlignFuse task")
    args = parser.parse_args(argv)
    overrides = list(args.opts)
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if args.device is not None:
        overrides.append(f"device={args.device}")
    schema = build_schema(task_cls.config_defaults)
    cfg = load_config(args.config, overrides, schema, task_cls.open_config_keys)
    return Trainer(task_cls, cfg, args)


def run(task_cls: type[Task], argv: Sequence[str] | None = None) -> dict[str, float]:
    """Train (or evaluate with --evaluate) `task_cls` as the flags in `argv` say; returns the final metrics.

    After a SIGTERM/SIGINT the run writes a resumable checkpoint, cleans up and exits with status 0.
    """
    trainer = build_trainer(task_cls, argv)
    try:
        metrics = trainer.fit()
        signalled = trainer.stop_signal.requested
        if signalled:
            trainer.log.info("stopped by %s: resumable checkpoint written to %s; continue with --resume auto",
                             signalled, trainer.output_dir)
    finally:
        trainer.close()
    if signalled:
        report_clean_stop(trainer.step)  # lets engine.launch exit 0 although torchrun raises on the signal
        sys.exit(0)
    return metrics


def main_for(task_cls: type[Task]) -> Any:
    """`main = engine.main_for(XTask)` - a main(argv=None) for an entry script.

    main() reads the command line and ends a user mistake (engine.errors) with one message and exit status 2
    (--debug: the traceback); main([...]) from Python lets every error propagate."""

    def main(argv: Sequence[str] | None = None) -> dict[str, float]:
        if argv is not None:
            return run(task_cls, argv)
        with errors.exit_on_user_error():
            return run(task_cls, None)

    return main


def main_for_families(key: str, families: dict[str, type[Task] | str], default: str) -> Any:
    """`main = engine.main_for_families("model.arch", {"a": "tasks.x:ATask", ...}, "a")` - main_for() of the task class
    that the config's ``key`` names (read from --config and --opts before the schema, which is the class's own, is
    built). Classes are imported when chosen, so one family's dependencies never load for another."""

    def pick(argv: Sequence[str] | None) -> type[Task]:
        parser = argparse.ArgumentParser(add_help=False)
        parser.add_argument("--config", type=str, default=None)
        parser.add_argument("--opts", nargs="*", action="extend", default=[])
        known, _ = parser.parse_known_args(argv)
        family = peek_value(known.config, known.opts, key, default)
        if family not in families:
            raise ValueError(f"{key}: {family!r} is not one of {sorted(families)}")
        chosen = families[family]
        if not isinstance(chosen, str):
            return chosen
        module, _, name = chosen.partition(":")
        return getattr(importlib.import_module(module), name)

    def main(argv: Sequence[str] | None = None) -> dict[str, float]:
        if argv is not None:
            return run(pick(argv), argv)
        with errors.exit_on_user_error():
            return run(pick(None), None)

    return main
