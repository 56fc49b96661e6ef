"""hmn.alloc: the single-arena re-exec and the memory-reuse block."""

import os
import platform
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from hmn import alloc

ROOT = Path(__file__).resolve().parents[2]
GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"

PROBE = """
import os, subprocess, sys
sys.path.insert(0, sys.argv[1])
print("start", flush=True)  # printed once per interpreter start
from hmn.alloc import single_arena_exec, tuned
single_arena_exec()
with open("/proc/self/environ", "rb") as f:
    at_exec = [v.decode() for v in f.read().split(b"\\0") if v.startswith(b"MALLOC_ARENA_MAX=")]
child = subprocess.run([sys.executable, "-c", "import os; print(os.environ.get('MALLOC_ARENA_MAX'))"],
                       capture_output=True, text=True).stdout.strip()
print(tuned(), at_exec, os.environ.get("MALLOC_ARENA_MAX"), child, sys.argv[2:])
"""


def _probe(env_extra: dict) -> list[str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MALLOC_ARENA_MAX", "HMN_ALLOCATOR", "_HMN_SINGLE_ARENA")}  # fmt: skip
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", PROBE, str(ROOT), "a", "b c"], env=env,
                         capture_output=True, text=True, check=True)  # fmt: skip
    return out.stdout.strip().splitlines()


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_single_arena_exec_restarts_once_with_one_arena_and_children_get_defaults():
    lines = _probe({})
    assert lines.count("start") == 2  # the original interpreter, then the re-executed one
    # started with MALLOC_ARENA_MAX=1, arguments kept; the variable is gone from os.environ
    # afterwards, so a subprocess starts with glibc's default arenas
    assert lines[-1] == "True ['MALLOC_ARENA_MAX=1'] None None ['a', 'b c']"


@pytest.mark.skipif(not GLIBC, reason="glibc only")
def test_single_arena_exec_leaves_a_users_setting_and_the_opt_out_alone():
    lines = _probe({"MALLOC_ARENA_MAX": "4"})
    assert lines.count("start") == 1
    assert lines[-1] == "False ['MALLOC_ARENA_MAX=4'] 4 4 ['a', 'b c']"
    lines = _probe({"HMN_ALLOCATOR": "default"})
    assert lines.count("start") == 1
    assert lines[-1] == "False [] None None ['a', 'b c']"


def test_reuse_memory_switches_the_arrow_pool_and_restores_it(monkeypatch):
    before = pa.default_memory_pool().backend_name
    with alloc.reuse_memory() as on:
        assert on is GLIBC
        inside = pa.default_memory_pool().backend_name
        if on:
            assert inside == "system"
            # arrays made inside keep working after the block
            arr = pa.array(range(100_000))
    assert pa.default_memory_pool().backend_name == before
    if GLIBC:
        assert arr.sum().as_py() == 99_999 * 100_000 // 2
    monkeypatch.setenv("HMN_ALLOCATOR", "default")
    with alloc.reuse_memory() as on:
        assert on is False
        assert pa.default_memory_pool().backend_name == before


def test_reuse_memory_restores_the_pool_when_the_block_raises():
    before = pa.default_memory_pool().backend_name
    with pytest.raises(RuntimeError, match="boom"), alloc.reuse_memory():
        raise RuntimeError("boom")
    assert pa.default_memory_pool().backend_name == before
