"""The project's own sources, parsed, for tests that read the tree (imports, Lua scripts)."""

from __future__ import annotations

import ast
import gc
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _parse_quietly(text: str, filename: str) -> ast.Module:
    # CPython 3.11.7's AST builder checks that its recursion count is the same after as
    # before, and raises SystemError ("recursion depth mismatch") when Python code ran in
    # between: a garbage collection calling a finalizer (an earlier test's leftover
    # coroutine), or a count skewed by an earlier RecursionError in the thread. So: a thread
    # of its own, and no collection while it parses.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return ast.parse(text, filename)
    finally:
        if enabled:
            gc.enable()


def parse(path: Path) -> ast.Module:
    """Return the module at `path`, parsed."""
    with ThreadPoolExecutor(max_workers=1) as fresh:
        return fresh.submit(_parse_quietly, path.read_text(), str(path)).result(timeout=60)


def python_files(folder: Path) -> Iterator[Path]:
    """Yield every Python file under `folder`, in a stable order."""
    yield from sorted(folder.rglob("*.py"))
