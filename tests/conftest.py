"""Shared pytest fixtures: a small synthetic dataset and the ALBEF reference fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _few_threads():
    """Two cores shared by the suite: keep torch from oversubscribing them."""
    torch.set_num_threads(1)
    yield


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory) -> Path:
    """A small synthetic dataset in every annotation format (generated once per test session)."""
    from dataset.synthetic import generate

    out = tmp_path_factory.mktemp("synthetic")
    generate(out, num_images=80, image_size=64, seed=0)
    return out


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The folder of the ALBEF reference outputs; tests that need it skip (saying why) when it is not configured."""
    value = os.environ.get("ALBEF_REFERENCE_DIR")
    if not value:
        pytest.skip("ALBEF_REFERENCE_DIR is not set: parity tests against ALBEF's reference outputs need it")
    path = Path(value)
    if not path.is_dir():
        pytest.fail(f"ALBEF_REFERENCE_DIR={value} is not a directory")
    return path


_NOT_FLATTENED = {"state_dict", "config", "bert_config", "size", "env"}


def load_reference(reference_dir: Path, name: str) -> dict:
    """Load one reference file (e.g. 'pretrain_micro.pt') safely. Nested groups are also reachable by the dotted
    names the fixture README uses ('outputs.image_embeds', 'losses_eval_injected.grads', ...)."""
    data = torch.load(reference_dir / name, map_location="cpu", weights_only=True)
    flat = dict(data)
    for key, value in data.items():
        if isinstance(value, dict) and key not in _NOT_FLATTENED:
            flat.update({f"{key}.{sub}": item for sub, item in value.items()})
    return flat
