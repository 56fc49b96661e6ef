"""Build the scaling memories (``python -m hmn.scaling``) and record time, peak RSS and realism.

    python benchmarks/scaling_memories.py [--sizes 29k 131k 1m] [--data ../shared/data]
        [--work /tmp/scaling] [--seed 0] [--out benchmarks/out/scaling_memories.json]

Each size is built by the CLI in a subprocess under ``/usr/bin/time -v`` into ``--work/<size>``
(one at a time, so each peak RSS is that build's own). The last line is one JSON object: the
arguments, and per size the wall seconds, the peak RSS (GB), the output bytes and the figures of
its ``realism.json``; ``--out`` also writes it to a file.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(size: str, data: str, work: Path, seed: int) -> dict:
    out = work / size
    t0 = time.perf_counter()
    proc = subprocess.run(
        ["/usr/bin/time", "-v", sys.executable, "-m", "hmn.scaling", "--size", size,
         "--data", data, "--out", str(out), "--seed", str(seed)],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"size {size} failed:\n{proc.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    realism = json.loads((out / "realism.json").read_text())
    realism.pop("spec")
    return {
        "seconds": round(wall, 1),
        "peak_rss_gb": round(rss_kb / 2**20, 3),
        "kb_bytes": (out / "kb.txt").stat().st_size,
        "names_bytes": (out / "names.tsv").stat().st_size,
        **realism,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=["29k", "131k", "1m"])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data"))
    parser.add_argument("--work", default="/tmp/scaling")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/out/scaling_memories.json"))
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    result = {"args": vars(args), "sizes": {}}
    for size in args.sizes:
        result["sizes"][size] = build(size, args.data, work, args.seed)
        print(json.dumps({size: result["sizes"][size]}), flush=True)
    line = json.dumps(result)
    if args.out:
        Path(args.out).write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
