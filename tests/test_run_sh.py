"""run.sh's allocator choice (ALIGNFUSE_MALLOC) for demo and task launches; concurrent setups install once."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def setup_stamp() -> str:
    """What run.sh setup writes into the venv's stamp once it has installed (a hash of pyproject.toml + run.sh)."""
    return hashlib.sha256((REPO / "pyproject.toml").read_bytes() + (REPO / "run.sh").read_bytes()).hexdigest()


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


def test_concurrent_setups_install_once(tmp_path):
    """Three `run.sh setup` at once (as every node of a SLURM job starts it) into a fresh venv: one installs, the
    others wait for its lock and then find the stamp. The venv's python is a stand-in that logs each call."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    calls = tmp_path / "calls.log"
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\necho "$$ start $*" >> {calls}\nsleep 0.2\necho "$$ end" >> {calls}\n')
    python.chmod(0o755)
    env = {**os.environ, "ALIGNFUSE_VENV": str(venv)}
    procs = [subprocess.Popen(["bash", str(REPO / "run.sh"), "setup"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outputs = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0], outputs
    lines = calls.read_text().splitlines()
    assert sum("start -m pip install -q -e .[test]" in line for line in lines) == 1, lines
    assert sum("[run.sh] installing into" in out for out, _ in outputs) == 1, outputs
    # The stand-in's calls never overlap: each "start" is followed by its own "end".
    for start, end in zip(lines[::2], lines[1::2], strict=True):
        assert start.split()[0] == end.split()[0] and end.endswith(" end"), lines
    assert (venv / ".alignfuse-installed").read_text().strip() == setup_stamp()
    again = subprocess.run(["bash", str(REPO / "run.sh"), "setup"], env=env, capture_output=True, text=True,
                           timeout=60)
    assert again.returncode == 0 and again.stdout == "" and len(calls.read_text().splitlines()) == len(lines)
