"""Merge one config block (``optimizer:`` / ``scheduler:``) over its defaults, rejecting unknown keys.

The engine merges the defaults into the full config schema; this helper lets the factories also be called directly
(tests, benchmarks, notebooks) with a partial dict, with the same error for a misspelt key.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Mapping
from typing import Any


def merge_block(defaults: Mapping[str, Any], cfg: Mapping[str, Any] | None, block: str) -> dict[str, Any]:
    """Return ``defaults`` updated with ``cfg`` (nested blocks merged key by key); unknown key -> ValueError."""
    merged = copy.deepcopy(dict(defaults))
    for key in cfg or {}:
        if key not in defaults:
            nearest = difflib.get_close_matches(str(key), list(defaults), n=3, cutoff=0.5) or sorted(defaults)
            raise ValueError(f"unknown key '{block}.{key}'; nearest valid keys: {', '.join(nearest)}")
        value = cfg[key]
        default = defaults[key]
        # Only closed nested blocks (non-empty defaults, e.g. scheduler.plateau) are merged key by key; open dicts
        # such as optimizer.lr_mult (empty default, any module name) are taken as given.
        if isinstance(default, Mapping) and default and isinstance(value, Mapping):
            merged[key] = merge_block(default, value, f"{block}.{key}")
        elif isinstance(value, Mapping):
            merged[key] = dict(value)
        else:
            merged[key] = value
    return merged
