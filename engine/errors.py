"""User mistakes end a command with one message; programming errors keep their traceback.

What counts as a user mistake: a ``ValueError`` or an ``OSError`` (``FileNotFoundError``, ``PermissionError``, ...)
raised by a ``raise`` statement in AlignFuse's own code. That is the project's convention for errors that name what
the user gave (STYLE.md: "errors for users, asserts for invariants") - a config file or key, a value, an annotation
file and its entry, a checkpoint, the device, the output folder - so the validation code needs no special type.
Everything else keeps its traceback: a ValueError that Python or a library raises (``int("x")``, a failed unpack,
numpy or torch), and every other exception type (TypeError, KeyError, RuntimeError, AssertionError, ...).

A command-line run (``python Retrieval.py ...``, ``Predict.py``) prints ``<script>: error: <message>`` on stderr and
exits with ``USER_ERROR_EXIT``; ``--debug`` or ``ALIGNFUSE_DEBUG=1`` shows the full traceback instead. Called from
Python (``main([...])``, ``engine.run``) every error propagates as it is.
"""

from __future__ import annotations

import contextlib
import dis
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

REPO = Path(__file__).resolve().parents[1]
DEBUG_ENV = "ALIGNFUSE_DEBUG"  # 1 / true / yes: tracebacks for user errors too
DEBUG_FLAG = "--debug"
USER_ERROR_EXIT = 2  # like argparse's usage errors; a crash exits with Python's 1


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    """True when the command line holds --debug or ALIGNFUSE_DEBUG is set to 1/true/yes."""
    argv = sys.argv[1:] if argv is None else argv
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes")


def _innermost(tb: TracebackType) -> TracebackType:
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb


# Where AlignFuse's own code lives below REPO (also when REPO is a site-packages folder, beside other libraries).
OWN_PACKAGES = frozenset({"common", "engine", "models", "dataset", "optim", "scheduler", "metrics", "tasks", "refTools",
                          "vqaTools", "tools", "benchmarks", "tests"})


def _own_file(filename: str) -> bool:
    """A source file of AlignFuse: in one of its packages or an entry script at the top of the repository."""
    try:
        parts = Path(filename).resolve().relative_to(REPO).parts
    except (ValueError, OSError):
        return False
    if len(parts) == 1:  # an entry script (Retrieval.py ...): only in a source checkout, not among installed modules
        return parts[0].endswith(".py") and (REPO / "pyproject.toml").is_file()
    return len(parts) > 1 and parts[0] in OWN_PACKAGES


def _raised_by_statement(tb: TracebackType) -> bool:
    """The frame stopped on a ``raise`` statement (not inside a builtin call such as int() or an unpack)."""
    for instruction in dis.get_instructions(tb.tb_frame.f_code):
        if instruction.offset == tb.tb_lasti:
            return instruction.opname in ("RAISE_VARARGS", "RERAISE")
    return False


def is_user_error(err: BaseException) -> bool:
    """See the module docstring: a ValueError / OSError that AlignFuse's own code raised on purpose."""
    if not isinstance(err, (ValueError, OSError)) or err.__traceback__ is None:
        return False
    tb = _innermost(err.__traceback__)
    return _own_file(tb.tb_frame.f_code.co_filename) and _raised_by_statement(tb)


def user_message(err: BaseException) -> str:
    """The error's own text; an OSError built as OSError(errno, text) gives its text without the errno tuple."""
    if isinstance(err, OSError) and err.strerror and not err.filename:
        return err.strerror
    return str(err) or type(err).__name__


def _rank_prefix() -> str:
    """'[rank R] ' under a launcher with several processes (each rank reports its own error), else ''."""
    world = os.environ.get("WORLD_SIZE", "1")
    return f"[rank {os.environ.get('RANK', '?')}] " if world.isdigit() and int(world) > 1 else ""


@contextlib.contextmanager
def exit_on_user_error(prog: str | None = None, debug: bool | None = None) -> Iterator[None]:
    """Around a command's main: a user error prints ``<prog>: error: <message>`` on stderr and exits with
    USER_ERROR_EXIT; with ``debug`` (default: --debug in sys.argv or ALIGNFUSE_DEBUG) it propagates with its traceback,
    as every other exception always does."""
    try:
        yield
    except (ValueError, OSError) as err:
        if (debug_requested() if debug is None else debug) or not is_user_error(err):
            raise
        prog = prog or Path(sys.argv[0]).name
        sys.stdout.flush()
        print(f"{_rank_prefix()}{prog}: error: {user_message(err)} ({DEBUG_FLAG} or {DEBUG_ENV}=1 shows the "
              "traceback)", file=sys.stderr, flush=True)
        raise SystemExit(USER_ERROR_EXIT) from None
