"""Load pickles of plain data without executing anything they reference.

The REFER ``refs(<split_by>).p`` files are pickles: a plain ``pickle.load`` on a file from the internet can run any
callable it names (``os.system`` through a ``__reduce__``). Lists, dicts, tuples, strings, bytes, numbers, booleans
and None are built by pickle opcodes alone; only classes and functions go through ``Unpickler.find_class``. So the
loader refuses every ``find_class`` request: whatever a pickle would import is reported, never imported or called.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any


class UnsafePickleError(ValueError):
    """A pickle asked for a global (class, function) that a plain-data pickle never needs."""


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickler that builds containers and scalars and refuses every global."""

    def __init__(self, handle, source: Path) -> None:
        # Python 2 ``str`` objects (the released REFER pickles) are decoded as UTF-8 text.
        super().__init__(handle, encoding="utf-8")
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        raise UnsafePickleError(
            f"{self.source}: the pickle references the global {module}.{name}; only plain data (lists, dicts, "
            "strings, numbers) is accepted, so it was not loaded"
        )


def load(path: str | Path) -> Any:
    """Unpickle ``path`` if it holds only plain data; raise :class:`UnsafePickleError` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pickle file not found: {path}")
    with open(path, "rb") as handle:
        try:
            return _PlainDataUnpickler(handle, path).load()
        except UnsafePickleError:
            raise
        except (pickle.UnpicklingError, EOFError, UnicodeDecodeError, ValueError, IndexError, KeyError) as err:
            raise ValueError(f"{path}: not a readable plain-data pickle ({type(err).__name__}: {err})") from err
