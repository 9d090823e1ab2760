"""Layers point one way (STYLE.md habit 12): models and datasets never import the training engine, and the shared
helpers they need (common/) import no other AlignFuse package. Each check imports in a fresh interpreter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROJECT = {"common", "engine", "models", "dataset", "tasks", "optim", "scheduler", "metrics", "refTools", "vqaTools"}


def modules_loaded_by(code: str) -> list[str]:
    """The sys.modules names a fresh interpreter holds after running ``code``."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def project_modules(loaded: list[str], packages: set[str]) -> list[str]:
    return [name for name in loaded if name.split(".")[0] in packages]


def test_models_and_datasets_do_not_import_the_engine():
    # Every module of both packages, not only their __init__: a model file importing engine would show here.
    loaded = modules_loaded_by(
        "import importlib, pkgutil, models, dataset\n"
        "for package in (models, dataset):\n"
        "    for info in pkgutil.iter_modules(package.__path__):\n"
        "        importlib.import_module(f'{package.__name__}.{info.name}')"
    )
    assert "models.model_pretrain" in loaded and "dataset.datasets" in loaded  # the import did reach them
    assert "engine.trainer" not in loaded
    assert project_modules(loaded, {"engine", "tasks"}) == []


def test_common_is_a_leaf():
    loaded = modules_loaded_by("import common.dist, common.checkpoint_file, common.config_file")
    assert project_modules(loaded, PROJECT) == ["common", "common.checkpoint_file", "common.config_file",
                                                "common.dist"]


def test_engine_helpers_do_not_load_the_trainer():
    # engine/__init__ resolves its names on first use: the distributed helpers, config and the Task base class come
    # without the training loop, argparse's flags or the signal handling.
    loaded = modules_loaded_by("from engine import dist, Task, Progress, load_config\nimport engine.checkpoint")
    assert "engine.trainer" not in loaded
    loaded = modules_loaded_by("import engine\nengine.run")
    assert "engine.trainer" in loaded  # ... and load it when asked for
