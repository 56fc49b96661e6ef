"""Memory reuse for allocation-heavy array passes (the ingest), on Linux with glibc.

The ingest's passes allocate and free arrays of tens to hundreds of MB many times over. With
the allocators' defaults every such array is fresh memory from the kernel: glibc serves large
blocks with ``mmap`` and returns them on ``free`` (and each thread's arena deletes a heap as soon
as it empties), Arrow's mimalloc purges freed pages, and numpy asks for transparent huge pages,
so the kernel zeroes 2 MiB pages again and again. Measured on the 2-core machine (FB2M-format
file, 10.8M lines, ingest without Ray, 3-4 runs each): 3.4-6.1 CPU s of the ingest's ~12 were
system time, 37% of all samples in the kernel's ``clear_page`` (``perf``); with the recipe below
system time falls to 1.3-1.9 s and the wall time from 6.2-8.0 s to 5.5-6.1 s.

The recipe, in two parts:

* :func:`single_arena_exec` (a process's entry point, before it starts threads): re-executes
  the interpreter once with ``MALLOC_ARENA_MAX=1``, so that every thread allocates from glibc's
  main heap, which grows and stays (glibc reads the variable at start; ``mallopt`` later does not
  move threads that already picked an arena). The variable is then taken out of ``os.environ``,
  so that subprocesses (Ray's raylet and workers) start with glibc's defaults.
* :func:`reuse_memory` (around the allocation-heavy work): no ``mmap`` for large blocks and no
  trimming of the heap (``mallopt``), Arrow's default pool switched to the system allocator
  (the same heap); on exit the defaults come back and ``malloc_trim`` returns the free memory
  to the system, so the process keeps only what it still uses.

Both are no-ops where they do not apply (not Linux, not glibc, or ``HMN_ALLOCATOR=default`` in
the environment).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import sys
from collections.abc import Iterator

__all__ = ["single_arena_exec", "reuse_memory", "tuned"]

# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_DEFAULT_TRIM_THRESHOLD = 128 * 1024
_DEFAULT_MMAP_MAX = 65536
_MARK = "_HMN_SINGLE_ARENA"  # set by single_arena_exec in the re-executed process


def _glibc() -> ctypes.CDLL | None:
    if sys.platform != "linux" or os.environ.get("HMN_ALLOCATOR") == "default":
        return None
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def tuned() -> bool:
    """True when this process was started (or re-executed) with a single malloc arena."""
    return os.environ.get(_MARK) == "1" or os.environ.get("MALLOC_ARENA_MAX") == "1"


def single_arena_exec() -> None:
    """Re-execute this interpreter, same arguments, with ``MALLOC_ARENA_MAX=1`` (once); in the
    re-executed process remove the variable from ``os.environ``. Call it first thing in a
    ``__main__`` (re-executing costs an interpreter start, ~50 ms, before any import)."""
    if os.environ.get(_MARK) == "1":
        if os.environ.get("MALLOC_ARENA_MAX") == "1":
            del os.environ["MALLOC_ARENA_MAX"]  # children start with glibc's defaults
        return
    if _glibc() is None or "MALLOC_ARENA_MAX" in os.environ:
        return  # not glibc, opted out, or the user chose the arenas
    argv = list(getattr(sys, "orig_argv", []))
    if not argv or not sys.executable:
        return
    env = dict(os.environ, MALLOC_ARENA_MAX="1", **{_MARK: "1"})
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv[1:]], env)


@contextlib.contextmanager
def reuse_memory() -> Iterator[bool]:
    """Keep freed memory in the process for reuse while the block runs (see the module
    docstring); yields True when the allocators were tuned. Not re-entrant across threads: it
    changes process-wide settings, for a block that owns the process's allocation-heavy work."""
    libc = _glibc()
    if libc is None:
        yield False
        return
    import pyarrow as pa

    previous_pool = pa.default_memory_pool()
    libc.mallopt(_M_MMAP_MAX, 0)
    libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)  # an int: the largest
    pa.set_memory_pool(pa.system_memory_pool())
    try:
        yield True
    finally:
        pa.set_memory_pool(previous_pool)
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)
