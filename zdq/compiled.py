"""zdq's optional compiled modules (``setup.py``), loaded by name.

Each is built at install where a C compiler and Python's headers are found; elsewhere the install
goes on without it and its caller does the same work in Python. Loaded by name: readers of the
import graph find no source for a compiled module, and would take its import for one of the
package itself."""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["compiled"]


def compiled(name: str) -> Any:
    """The compiled module ``zdq.<name>``, or None where it was not built."""
    try:
        return importlib.import_module(f"zdq.{name}")
    except ImportError:  # pragma: no cover - a build without a compiler
        return None
