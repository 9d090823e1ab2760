"""scripts/slurm_pretrain.sbatch without SLURM (issue 16, item 2): stand-ins for srun, scancel and scontrol on PATH
start two local "nodes" (one rank each, 2 loader workers per rank) through run.sh, and the time-limit warning arrives
as SLURM sends it with --signal=B:USR1@180, to the batch shell alone. The signal must reach the training processes,
which save and exit 0; the job requeues itself; the requeued run continues with --resume auto to the end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from engine import checkpoint as ckpt
from tests.test_engine_dist import free_port
from tests.test_preemption import (
    MAX_STEPS,
    SIGNAL_AFTER_STEP,
    finish,
    job_processes,
    pretrain_flags,
    wait_for_step,
    wait_gone,
)
from tests.test_run_sh import setup_stamp

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "scripts" / "slurm_pretrain.sbatch"
JOB_ID = "4242"

# What the stand-ins share: they find each other's state (the step's task pids, the requeue log) in FAKE_SLURM_DIR.
SRUN = '''
"""srun: the command once per node of the job (SLURM_NNODES local processes) with each task's SLURM variables; exits
with the highest status; --kill-on-bad-exit=1 kills the other tasks when one fails."""
import os, signal, subprocess, sys, time

args = sys.argv[1:]
kill_on_bad_exit = False
while args and args[0].startswith("-"):
    kill_on_bad_exit |= args.pop(0) == "--kill-on-bad-exit=1"
nodes = int(os.environ["SLURM_NNODES"])
tasks = [subprocess.Popen(args, env={**os.environ, "SLURM_NODEID": str(node), "SLURM_PROCID": str(node),
                                    "SLURM_LOCALID": "0", "SLURM_NTASKS": str(nodes), "SLURM_STEP_ID": "0"})
         for node in range(nodes)]
with open(os.path.join(os.environ["FAKE_SLURM_DIR"], "step_pids"), "w") as f:
    f.write(" ".join(str(task.pid) for task in tasks))
while any(task.poll() is None for task in tasks):
    if kill_on_bad_exit and any(task.poll() not in (None, 0) for task in tasks):
        for task in tasks:
            task.kill()
    time.sleep(0.1)
codes = [task.returncode if task.returncode >= 0 else 128 - task.returncode for task in tasks]
print(f"srun: tasks exited {codes}", file=sys.stderr)
sys.exit(max(codes))
'''

SCANCEL = '''
"""scancel --signal=SIG JOBID: SIG to every process of the job's steps (the tasks and all their descendants, as the
cgroup of a step holds them), not to the batch shell."""
import os, signal, sys
from pathlib import Path

name = next(arg.split("=", 1)[1] for arg in sys.argv[1:] if arg.startswith("--signal="))
sig = getattr(signal, "SIG" + name)

def children(pid):
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                found.append(int(entry.name))
    return found

state = Path(os.environ["FAKE_SLURM_DIR"])
pids = frontier = [int(pid) for pid in (state / "step_pids").read_text().split()]
while frontier:
    frontier = [child for pid in frontier for child in children(pid)]
    pids = pids + frontier
for pid in pids:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
with open(state / "scancel.log", "a") as log:
    log.write(f"{name} {len(pids)}\\n")
'''

SCONTROL = '''
"""scontrol show hostnames LIST (every node is this machine) | scontrol requeue JOBID (logged)."""
import os, sys

if sys.argv[1:3] == ["show", "hostnames"]:
    print("\\n".join(["localhost"] * int(os.environ["SLURM_NNODES"])))
elif sys.argv[1] == "requeue":
    with open(os.path.join(os.environ["FAKE_SLURM_DIR"], "requeued"), "a") as log:
        log.write(sys.argv[2] + "\\n")
else:
    sys.exit(f"scontrol stand-in: unsupported {sys.argv[1:]}")
'''


def slurm_env(tmp_path: Path) -> dict[str, str]:
    """PATH with the stand-ins first, a two-node job's variables, and a venv whose stamp is current (run.sh setup has
    nothing to do) and whose python is this one."""
    bin_dir, state, venv = tmp_path / "bin", tmp_path / "slurm", tmp_path / "venv"
    for folder in (bin_dir, state, venv / "bin"):
        folder.mkdir(parents=True)
    for name, source in (("srun", SRUN), ("scancel", SCANCEL), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(f"#!{sys.executable}\n{textwrap.dedent(source)}")
        (bin_dir / name).chmod(0o755)
    (venv / "bin" / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    (venv / "bin" / "python").chmod(0o755)
    (venv / ".alignfuse-installed").write_text(setup_stamp() + "\n")
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "ALIGNFUSE_VENV": str(venv),
            "ALIGNFUSE_MALLOC": "glibc", "FAKE_SLURM_DIR": str(state), "SLURM_JOB_ID": JOB_ID, "SLURM_NNODES": "2",
            "SLURM_JOB_NODELIST": "node[1-2]", "NPROC_PER_NODE": "1", "MASTER_PORT": str(free_port()),
            "OMP_NUM_THREADS": "1"}


def sbatch(env: dict[str, str], *flags: str) -> subprocess.Popen:
    """The batch script as SLURM runs it: bash, in the submit directory, in a session of its own."""
    return subprocess.Popen(["bash", str(SBATCH), *flags], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.mark.slow
@pytest.mark.dist
def test_sbatch_time_limit_signal_reaches_training_saves_requeues_and_resumes(synthetic_dir, tmp_path):
    env = slurm_env(tmp_path)
    out = tmp_path / "run"
    job = sbatch(env, *pretrain_flags(synthetic_dir, out))
    wait_for_step(job, out, SIGNAL_AFTER_STEP)
    pids = job_processes(job.pid)
    os.kill(job.pid, signal.SIGUSR1)  # --signal=B:USR1@180: the batch shell only
    rc, output = finish(job, timeout=120)
    assert rc == 0, output[-4000:]
    assert "[slurm_pretrain] USR1: SIGTERM to every process of the training step" in output
    assert "srun: tasks exited [0, 0]" in output, output[-4000:]
    assert output.count("[engine.launch] torchrun got SIGTERM") == 2, output[-4000:]  # both nodes exit 0
    assert "stopped by SIGTERM: resumable checkpoint written" in output
    assert "killed by signal" not in output and "PeerFailure" not in output
    state = tmp_path / "slurm"
    assert (state / "requeued").read_text() == f"{JOB_ID}\n"
    stopped = ckpt.load_checkpoint_file(out / "checkpoint_last.pth")
    assert SIGNAL_AFTER_STEP <= stopped["step"] < MAX_STEPS, f"stopped at step {stopped['step']}"
    assert not wait_gone(pids, 10), "processes of the job outlived it"

    # SLURM starts the requeued job with the same script: --resume auto continues to the end, no further requeue.
    rc, output = finish(sbatch({**env, "SLURM_RESTART_COUNT": "1", "MASTER_PORT": str(free_port())},
                               *pretrain_flags(synthetic_dir, out)))
    assert rc == 0, output[-4000:]
    assert f"resumed from {out / ckpt.rolling_name(stopped['step'])}" in output, output[-4000:]
    assert ckpt.load_checkpoint_file(out / "checkpoint_last.pth")["step"] == MAX_STEPS
    assert (state / "requeued").read_text() == f"{JOB_ID}\n"
