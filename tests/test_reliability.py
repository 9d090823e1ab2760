"""Issue 8 faults not covered by the engine and data tests: a dead or hung rank, a disk that fills up at a save, a
process killed while writing a checkpoint, hostile YAML configs and result names that escape output_dir.

Each test injects the fault and checks the outcome: exit status and message within a bounded time, previous
checkpoint intact and resumable, nothing executed, nothing written outside output_dir.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import engine
from engine import checkpoint as ckpt
from engine.task import output_path
from tests.test_engine_dist import free_port
from tests.test_engine_trainer import BASE_OPTS, toy_run
from tests.toy_task import ToyTask

REPO = Path(__file__).resolve().parents[1]
TOY = str(REPO / "tests" / "toy_task.py")
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
# 2 ranks x 8 micro-batches of 2 per epoch; a checkpoint every 2 steps so that a failure at step 5 has one to resume.
DIST_OPTS = ["toy.batch_size=2", "train.epochs=2", "train.ckpt_every_steps=2", "train.keep_last_ckpts=10"]


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------- distributed
@pytest.mark.slow
@pytest.mark.dist
def test_dead_rank_stops_the_job_with_a_clear_error(tmp_path):
    out = tmp_path / "run"
    cmd = [TORCHRUN, "--nproc_per_node=2", f"--master_port={free_port()}", "--max_restarts=0", TOY,
           "--output_dir", str(out), "--device", "cpu", "--opts", *BASE_OPTS, *DIST_OPTS,
           "toy.fail_rank=1", "toy.fail_at_step=5", "toy.fail_mode=exit"]
    start = time.monotonic()
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert elapsed < 60, f"the job took {elapsed:.0f} s to notice a dead rank"
    # Rank 0 does not hang in its collective: it raises PeerFailure naming the step, the timeout and the way back.
    assert "engine.dist.PeerFailure: rank 0 of 2: a collective operation failed at step 5" in proc.stderr, proc.stderr
    assert "another rank has most likely died" in proc.stderr and "--resume auto" in proc.stderr
    assert ckpt.find_resume_checkpoint(out)[1]["step"] == 4  # the last checkpoint before the failure is usable


@pytest.mark.slow
@pytest.mark.dist
def test_hung_rank_times_out_after_dist_timeout(tmp_path):
    """Ranks launched without torchrun (as srun does): nothing kills the survivors but the process-group timeout."""
    out = tmp_path / "run"
    port = free_port()
    argv = [sys.executable, TOY, "--output_dir", str(out), "--device", "cpu", "--opts", *BASE_OPTS, *DIST_OPTS,
            "toy.fail_rank=1", "toy.fail_at_step=3", "toy.fail_mode=hang", "train.dist_timeout_s=4"]
    procs = []
    try:
        start = time.monotonic()
        for rank in range(2):
            env = {**child_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        _, stderr = procs[0].communicate(timeout=90)  # the default timeout (1800 s) would blow this limit
        elapsed = time.monotonic() - start
        assert procs[1].poll() is None  # the hung rank is still there: rank 0 gave up on its own
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert procs[0].returncode != 0
    assert elapsed < 60, f"rank 0 took {elapsed:.0f} s to give up on a hung rank"
    assert "PeerFailure: rank 0 of 2: a collective operation failed at step 3" in stderr, stderr
    assert "train.dist_timeout_s=4 s" in stderr and "Timed out" in stderr


@pytest.mark.slow
@pytest.mark.dist
def test_torchrun_restart_with_resume_auto_finishes_the_run(tmp_path):
    """A rank dies at step 5; torchrun restarts the job once and --resume auto continues from the step-4 checkpoint."""
    out = tmp_path / "run"
    cmd = [TORCHRUN, "--nproc_per_node=2", f"--master_port={free_port()}", "--max_restarts=1", TOY,
           "--output_dir", str(out), "--device", "cpu", "--resume", "auto", "--opts", *BASE_OPTS, *DIST_OPTS,
           "toy.fail_rank=1", "toy.fail_at_step=5", "toy.fail_mode=exit"]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PeerFailure" in proc.stderr  # the first attempt did fail
    assert f"resumed from {out / ckpt.rolling_name(4)}" in proc.stdout
    state = ckpt.load_checkpoint_file(out / "checkpoint_last.pth")
    assert state["step"] == 16
    # 2 ranks x batch 2 == one process with batch 4 (test_engine_dist): the interruption changed nothing.
    single = toy_run(tmp_path / "single", "toy.batch_size=4", "train.epochs=2")
    for key, value in single.model.state_dict().items():
        torch.testing.assert_close(state["model"][key], value, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- disk full
class FillsUp(io.RawIOBase):
    """A file whose device fills up after `capacity` bytes: write() then raises OSError(ENOSPC)."""

    def __init__(self, file: io.BufferedWriter, capacity: int) -> None:
        self.file, self.capacity, self.written = file, capacity, 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes) -> int:
        if self.written + len(data) > self.capacity:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.written += len(data)
        return self.file.write(data)


def test_disk_full_at_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    toy_run(tmp_path, "train.epochs=1")
    last = tmp_path / "checkpoint_last.pth"
    before = sha256(last)
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: real_save(obj, FillsUp(f, capacity=1000)))
    with pytest.raises(OSError, match="could not write checkpoint .*checkpoint_00000010.pth: No space left") as err:
        toy_run(tmp_path, "train.epochs=2", "train.ckpt_every_steps=2", flags=("--resume", "auto"))
    assert err.value.errno == errno.ENOSPC and "earlier checkpoints" in str(err.value)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert "checkpoint_00000010.pth" not in names and not [n for n in names if n.endswith(".tmp")], names
    assert sha256(last) == before and ckpt.load_checkpoint_file(last)["step"] == 8
    monkeypatch.undo()  # space freed: the same command resumes from the last good checkpoint
    resumed = toy_run(tmp_path, "train.epochs=2", "train.ckpt_every_steps=2", flags=("--resume", "auto"))
    assert resumed.task.calls == 8 and resumed.step == 16


def test_killed_while_writing_leaves_previous_checkpoint_usable(tmp_path):
    toy_run(tmp_path, "train.epochs=1")
    before = sha256(tmp_path / "checkpoint_last.pth")
    # A child process starts writing the step-12 checkpoint and is SIGKILLed half-way (after 2 kB reached the disk).
    child = textwrap.dedent(f"""
        import os, signal, torch
        from engine import checkpoint as ckpt

        class Dies:
            def __init__(self, f):
                self.f, self.n = f, 0
            def write(self, data):
                self.f.write(data)
                self.n += len(data)
                if self.n > 2048:
                    self.f.flush()
                    os.kill(os.getpid(), signal.SIGKILL)
                return len(data)
            def flush(self):
                self.f.flush()

        real_save = torch.save
        torch.save = lambda obj, f: real_save(obj, Dies(f))
        state = ckpt.load_checkpoint_file({str(tmp_path / "checkpoint_last.pth")!r})
        ckpt.save_checkpoint({str(tmp_path / ckpt.rolling_name(12))!r}, dict(state, step=12))
    """)
    proc = subprocess.run([sys.executable, "-c", child], env=child_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    temps = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(temps) == 1 and temps[0].stat().st_size > 2048  # the partial file never got the final name
    assert not (tmp_path / ckpt.rolling_name(12)).exists() and sha256(tmp_path / "checkpoint_last.pth") == before
    assert ckpt.find_resume_checkpoint(tmp_path)[1]["step"] == 8
    resumed = toy_run(tmp_path, "train.epochs=2", flags=("--resume", "auto"))
    assert resumed.task.calls == 8 and resumed.step == 16
    assert not temps[0].exists()  # the training run cleared the leftover


# ------------------------------------------------------------------------------------------------ hostile input
@pytest.mark.parametrize("tag", ["!!python/object/apply:os.system", "!!python/object/new:subprocess.Popen"])
def test_yaml_config_with_python_tag_is_refused_not_run(tmp_path, tag):
    marker = tmp_path / "executed"
    config = tmp_path / "evil.yaml"
    config.write_text(f"seed: 3\ntrain:\n  epochs: {tag} [[touch, {marker}]]\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"evil.yaml: line 3, column 11: .*python/object.*refused, not executed"):
        engine.build_trainer(ToyTask, ["--config", str(config), "--output_dir", str(tmp_path / "out")])
    override = f"seed={tag} [[touch, {marker}]]"
    with pytest.raises(ValueError, match=r"--opts seed=.*python/object.*refused"):
        engine.build_trainer(ToyTask, ["--output_dir", str(tmp_path / "out"), "--opts", override])
    assert not marker.exists()
    assert not (tmp_path / "out").exists()  # refused before the run was set up


def test_invalid_yaml_names_the_file(tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("train:\n  epochs: [1, 2\n", encoding="utf-8")
    with pytest.raises(ValueError, match="broken.yaml: not valid YAML"):
        engine.build_trainer(ToyTask, ["--config", str(config), "--output_dir", str(tmp_path / "out")])


@pytest.mark.parametrize("name", ["../escape.json", "a/../../escape.json", "/tmp/escape.json", "", "."])
def test_result_names_outside_output_dir_are_refused(tmp_path, name):
    cfg = engine.load_config(None, [], engine.build_schema(ToyTask.config_defaults))
    task = ToyTask(cfg, torch.device("cpu"))
    task.output_dir = tmp_path / "out"
    task.output_dir.mkdir()
    with pytest.raises(ValueError, match=f"result file name {name!r}"):
        task.write_result(name, {"x": 1})
    assert not (tmp_path / "escape.json").exists()


def test_result_names_inside_output_dir_and_symlinks(tmp_path):
    out = tmp_path / "out"
    (out / "elsewhere").parent.mkdir()
    (out / "elsewhere").symlink_to(tmp_path, target_is_directory=True)  # a link inside out that points out
    with pytest.raises(ValueError, match="'elsewhere/x.json' would write outside output_dir"):
        output_path(out, "elsewhere/x.json")
    cfg = engine.load_config(None, [], engine.build_schema(ToyTask.config_defaults))
    task = ToyTask(cfg, torch.device("cpu"))
    task.output_dir = out
    path = task.write_result("results/val_eval1.json", [{"id": 1}])
    assert path == (out / "results" / "val_eval1.json").resolve() and path.read_text() == '[{"id": 1}]'
