"""Preemption with loader workers (issue 16, item 1): Pretrain.py under the launcher that run.sh uses (engine.launch,
torchrun with the exit status fixed), 2 gloo ranks with 2 loader workers each, stopped by SIGTERM to the launcher or
to every process of the job (as SLURM signals a job step), must finish the step, write the resumable checkpoint, shut
its workers down and exit 0; --resume auto must then end with exactly the weights of an uninterrupted run.

Also the loader's own rule in one process: workers outlive a SIGTERM/SIGINT from anyone but their main process, and
still stop when the loader shuts them down or the main process dies.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from benchmarks.common import child_pids
from dataset.loader import create_loader, shutdown_workers
from engine import checkpoint as ckpt
from tests.test_engine_dist import free_port

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 40  # 7 steps per epoch (56 samples, 2 ranks x batch 4): the run crosses epochs and restarts workers' work
SIGNAL_AFTER_STEP = 3  # the signal goes out once rank 0 has logged this step


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def pretrain_flags(data: Path, out: Path, *flags: str) -> list[str]:
    """Pretrain.py's flags: the demo config shrunk to MAX_STEPS steps of batch 4 per rank, 2 loader workers."""
    return ["--config", str(REPO / "configs" / "demo" / "Pretrain.yaml"), "--output_dir", str(out), "--device", "cpu",
            *flags, "--opts", f"data.train_file=[{data / 'pretrain.json'}]", "data.eval_file=",
            f"model.tokenizer={data / 'vocab.txt'}", "data.batch_size=4", "data.num_workers=2", "model.queue_size=32",
            "scheduler.warmup_steps=2", "train.epochs=100", f"train.max_steps={MAX_STEPS}", "train.log_every_steps=1"]


def launch(data: Path, out: Path, *flags: str) -> subprocess.Popen:
    """Pretrain.py through `python -m engine.launch` (what run.sh runs), in a session of its own."""
    cmd = [sys.executable, "-m", "engine.launch", "--nproc_per_node=2", f"--master_port={free_port()}",
           str(REPO / "Pretrain.py"), *pretrain_flags(data, out, *flags)]
    return subprocess.Popen(cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 150) -> tuple[int, str]:
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"the run did not end within {timeout} s:\n{stderr[-4000:]}")
    return proc.returncode, stdout + stderr


children = child_pids  # the processes whose parent is pid


def job_processes(root: int) -> list[int]:
    """root and every process below it (the launcher, its ranks, their loader workers)."""
    pids, frontier = [root], [root]
    while frontier:
        frontier = [child for pid in frontier for child in children(pid)]
        pids += frontier
    return pids


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 120) -> None:
    log, deadline = out / "log.txt", time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.is_file() and f"step {step}/{MAX_STEPS} " in log.read_text():
            return
        if proc.poll() is not None:
            pytest.fail(f"the run ended before step {step}:\n{proc.communicate()[1][-4000:]}")
        time.sleep(0.05)
    pytest.fail(f"step {step} not reached within {timeout} s")


@pytest.fixture(scope="module")
def uninterrupted(synthetic_dir, tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("uninterrupted")
    rc, output = finish(launch(synthetic_dir, out))
    assert rc == 0, output[-4000:]
    state = ckpt.load_checkpoint_file(out / "checkpoint_last.pth")
    assert state["step"] == MAX_STEPS
    return state["model"]


def interrupt_resume_and_compare(data: Path, out: Path, reference: dict[str, torch.Tensor], everyone: bool) -> None:
    proc = launch(data, out)
    wait_for_step(proc, out, SIGNAL_AFTER_STEP)
    pids = job_processes(proc.pid)
    workers = [pid for pid in pids if comm(pid) == "pt_data_worker"]
    assert len(workers) == 4, f"expected 2 ranks x 2 loader workers, found {[(p, comm(p)) for p in pids]}"
    for pid in pids if everyone else [proc.pid]:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:  # a short-lived helper process of torch, gone since it was listed
            pass
    rc, output = finish(proc, timeout=120)
    assert rc == 0, output[-4000:]
    assert "killed by signal" not in output and "PeerFailure" not in output, output[-4000:]
    # torchrun itself raised on the signal (it exits 1 by design); the launcher saw every rank stop cleanly.
    assert "[engine.launch] torchrun got SIGTERM" in output, output[-4000:]
    assert "stopped by SIGTERM: resumable checkpoint written" in output
    stopped = ckpt.load_checkpoint_file(out / "checkpoint_last.pth")
    assert SIGNAL_AFTER_STEP <= stopped["step"] < MAX_STEPS, f"stopped at step {stopped['step']}"
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in pids if alive(pid)], "processes of the job outlived it"

    rc, output = finish(launch(data, out, "--resume", "auto"))
    assert rc == 0, output[-4000:]
    assert f"resumed from {out / ckpt.rolling_name(stopped['step'])}" in output
    final = ckpt.load_checkpoint_file(out / "checkpoint_last.pth")
    assert final["step"] == MAX_STEPS
    differ = [key for key, value in reference.items() if not torch.equal(final["model"][key], value)]
    assert not differ, f"{len(differ)} of {len(reference)} tensors differ from the uninterrupted run: {differ[:5]}"


@pytest.mark.slow
@pytest.mark.dist
def test_sigterm_to_the_launcher_with_loader_workers_saves_and_resumes_exactly(synthetic_dir, tmp_path, uninterrupted):
    interrupt_resume_and_compare(synthetic_dir, tmp_path / "run", uninterrupted, everyone=False)


@pytest.mark.slow
@pytest.mark.dist
def test_sigterm_to_every_process_of_the_job_saves_and_resumes_exactly(synthetic_dir, tmp_path, uninterrupted):
    """SLURM signals every process of a job step, `timeout` every process of its group: the loader workers get the
    signal straight from outside, and the ranks get it twice (directly and forwarded by torchrun)."""
    interrupt_resume_and_compare(synthetic_dir, tmp_path / "run", uninterrupted, everyone=True)


# ---------------------------------------------------------------------------------------------- the loader alone
class Keys(Dataset):
    """Returns the sample index of each (index, epoch) key a training sampler hands out; or, with `hang`, never
    returns (a worker stuck in I/O), which leaves only signals to end the worker."""

    def __init__(self, hang: bool = False) -> None:
        self.hang = hang

    def __len__(self) -> int:
        return 64

    def __getitem__(self, key: tuple[int, int]) -> int:
        while self.hang:
            time.sleep(1)
        return key[0]


def loader_workers(pid: int, count: int, timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        workers = [child for child in children(pid) if comm(child) == "pt_data_worker"]
        if len(workers) == count:
            return workers
        time.sleep(0.05)
    pytest.fail(f"{count} loader workers did not start")


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return [pid for pid in pids if alive(pid)]


def test_loader_workers_ignore_outside_stop_signals_but_stop_on_shutdown():
    loader = create_loader(Keys(), batch_size=4, train=True, num_workers=2, collate_fn=torch.tensor, seed=0)
    loader.sampler.set_epoch(0)
    iterator = iter(loader)
    first = next(iterator)
    workers = loader_workers(os.getpid(), 2)
    # Sent by another process (as torchrun, SLURM and a terminal's Ctrl-C do): the workers carry on.
    subprocess.run(["kill", "-TERM", *map(str, workers)], check=True)
    subprocess.run(["kill", "-INT", *map(str, workers)], check=True)
    time.sleep(0.5)
    assert all(alive(pid) for pid in workers)
    seen = torch.cat([first, *iterator])
    assert sorted(seen.tolist()) == list(range(64))
    shutdown_workers(loader)  # the loader's own shutdown still ends them
    assert not wait_gone(workers, 5)
    loader.sampler.set_epoch(1)
    assert len(list(loader)) == 16  # and the next epoch starts new ones
    shutdown_workers(loader)


@pytest.mark.slow
def test_a_stuck_loader_worker_still_ends_on_shutdown():
    """A worker that does not answer the shutdown request gets torch's fallback, a SIGTERM from its main process:
    that one is obeyed."""
    loader = create_loader(Keys(hang=True), batch_size=4, train=True, num_workers=1, collate_fn=torch.tensor, seed=0)
    loader.sampler.set_epoch(0)
    iter(loader)
    workers = loader_workers(os.getpid(), 1)
    time.sleep(0.5)  # let it get stuck in __getitem__
    shutdown_workers(loader)  # waits 5 s (torch's MP_STATUS_CHECK_INTERVAL), then terminate()
    assert not wait_gone(workers, 5), "a stuck worker survived the loader's shutdown"


def test_stuck_loader_workers_obey_a_sigterm_once_their_main_process_is_gone():
    """torch's watchdog ends an idle worker whose main process died; a stuck one can only be signalled, and must then
    obey whoever sends it."""
    script = textwrap.dedent("""
        import time, torch
        from dataset.loader import create_loader
        from tests.test_preemption import Keys

        loader = create_loader(Keys(hang=True), batch_size=4, train=True, num_workers=2, collate_fn=torch.tensor,
                               seed=0)
        loader.sampler.set_epoch(0)
        iterator = iter(loader)
        print("started", flush=True)
        time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], env=child_env(), stdout=subprocess.PIPE, text=True)
    workers: list[int] = []
    try:
        assert proc.stdout.readline().strip() == "started"
        workers = loader_workers(proc.pid, 2)
        time.sleep(0.5)
        proc.kill()  # SIGKILL: no shutdown of the loader
        proc.wait()
        subprocess.run(["kill", "-TERM", *map(str, workers)], check=False)
        assert not wait_gone(workers, 5), "stuck loader workers ignored a SIGTERM after their main process died"
    finally:
        proc.kill()
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
