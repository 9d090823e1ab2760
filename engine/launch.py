"""`python -m engine.launch ARGS` is torchrun (same flags, same behaviour) except for its exit status after a stop
signal; `run.sh <Task>` launches through it.

torchrun forwards a SIGTERM/SIGINT/SIGHUP it receives to every rank's process group, waits up to
TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (default 30; then SIGKILL) and then re-raises the signal as
``SignalException: Process N got signal: 15``: it exits 1 even when every rank saved its checkpoint and exited 0.
Schedulers, `timeout` and shell scripts would read that as a failure. Here each rank that stopped cleanly on a signal
(resumable checkpoint written, loaders and process group shut down) appends one line to a report file before its exit
0 (`report_clean_stop`, called by the engine); when every local rank has reported, the launcher exits 0 too, else
torchrun's error stands.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Sequence

STOP_REPORT_ENV = "ALIGNFUSE_STOP_REPORT"  # the report file's path, set by the launcher for the ranks it starts


def report_clean_stop(step: int) -> None:
    """Record that this rank stopped on a signal after the run's resumable checkpoint (step `step`) was written; a
    no-op unless launched by this module."""
    path = os.environ.get(STOP_REPORT_ENV)
    if not path:
        return
    line = f"{os.environ.get('LOCAL_RANK', '0')} {os.environ.get('LOCAL_WORLD_SIZE', '1')} {step}\n"
    with open(path, "a", encoding="utf-8") as report:  # one short append per rank: O_APPEND keeps lines whole
        report.write(line)


def clean_stop_steps(report_path: str) -> set[int] | None:
    """The steps at which the local ranks stopped, when every local rank (0..LOCAL_WORLD_SIZE-1) reported; else None."""
    try:
        with open(report_path, encoding="utf-8") as report:
            rows = [line.split() for line in report if line.strip()]
    except OSError:
        return None
    if not rows:
        return None
    local_world = int(rows[0][1])
    if {int(row[0]) for row in rows} != set(range(local_world)):
        return None
    return {int(row[2]) for row in rows}


def main(argv: Sequence[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.run import main as torchrun_main

    fd, report = tempfile.mkstemp(prefix="alignfuse_stop_", suffix=".txt")
    os.close(fd)
    os.environ[STOP_REPORT_ENV] = report
    try:
        torchrun_main(list(argv) if argv is not None else None)
    except SignalException as err:
        steps = clean_stop_steps(report)
        if steps is None:
            raise  # some rank did not stop cleanly (killed, failed, or never started training): torchrun's error
        name = getattr(err.sigval, "name", str(err.sigval))
        print(f"[engine.launch] torchrun got {name} and exits 1 by design; every rank on this node stopped cleanly "
              f"after writing the resumable checkpoint (step {', '.join(map(str, sorted(steps)))}): exit 0. "
              "Continue with --resume auto.", file=sys.stderr, flush=True)
        return 0
    finally:
        os.unlink(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
