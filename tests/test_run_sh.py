"""run.sh's allocator choice (ALIGNFUSE_MALLOC) for demo and task launches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def resolve(value: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ALIGNFUSE_MALLOC": value}
    return subprocess.run(["bash", str(REPO / "run.sh"), "malloc"], env=env, capture_output=True, text=True,
                          timeout=60)


def test_glibc_preloads_nothing_and_unknown_names_are_refused():
    glibc = resolve("glibc")
    assert glibc.returncode == 0 and glibc.stdout == ""
    unknown = resolve("tcmaloc")
    assert unknown.returncode == 2 and "must be auto, tcmalloc, jemalloc or glibc" in unknown.stderr


def test_named_allocators_resolve_to_a_library_the_process_then_uses_or_fail_with_an_install_hint():
    for name, package in (("tcmalloc", "libtcmalloc-minimal4"), ("jemalloc", "libjemalloc2")):
        result = resolve(name)
        if result.returncode != 0:  # not installed on this machine: a clear error, never a silent fallback
            assert result.returncode == 2 and package in result.stderr, result.stderr
            continue
        lib = result.stdout.strip()
        assert Path(lib).is_file() and name in Path(lib).name
        probe = subprocess.run(
            [sys.executable, "-c", "from benchmarks.common import malloc_name; print(malloc_name())"],
            env={**os.environ, "LD_PRELOAD": lib, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
            timeout=120)
        assert probe.returncode == 0 and probe.stdout.strip() == name, probe.stderr


def test_auto_prefers_tcmalloc_and_otherwise_keeps_glibc():
    auto = resolve("auto")
    assert auto.returncode == 0
    tcmalloc = resolve("tcmalloc")
    assert auto.stdout == (tcmalloc.stdout if tcmalloc.returncode == 0 else "")
