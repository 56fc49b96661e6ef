"""The memory stage of a finished run, built again from its own upstream stages: time and peak
memory (PSS of the process tree, as the run's manifest records it), and whether the outputs equal
the original run's.

    .venv/bin/python benchmarks/memory_stage.py --run-dir runs/sq-scaling/experiments/scaling/1m

The run's generate, ingest and embed folders and manifest entries are copied into ``--work``
(hard links where the file system allows), and ``python -m pipeline.run --config
<run>/config.resolved.yaml --run-dir <work> --stages memory`` builds the memory stage there with
the code of this tree. Compared with the run: ``facts.npy`` byte for byte, the index arrays
(``index/arrays.npz``) array by array, and ``index.json`` without its timings and embedding
fingerprint. Last line printed: the JSON written to ``--out`` (default
``benchmarks/out/memory_stage_<run name>.json``), the original run's stage figures beside.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from chaos import without_keys  # noqa: E402

UPSTREAM = ("generate", "ingest", "embed")


def _copy_tree(src: Path, dst: Path) -> None:
    try:
        shutil.copytree(src, dst, copy_function=os.link)
    except OSError:  # another file system: copy
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)


def prepare(run: Path, work: Path) -> None:
    """``work`` as ``run`` was before its memory stage: upstream folders, manifest entries and
    the resolved config."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    manifest = json.loads((run / "manifest.json").read_text())
    for stage in UPSTREAM:
        if manifest["stages"].get(stage, {}).get("status") != "done":
            raise SystemExit(f"{run}: stage {stage} is not done in its manifest.json")
        _copy_tree(run / stage, work / stage)
    manifest["stages"] = {k: v for k, v in manifest["stages"].items() if k in UPSTREAM}
    (work / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    shutil.copy(run / "config.resolved.yaml", work / "config.resolved.yaml")


def _index_json(path: Path) -> dict:
    return without_keys(json.loads(path.read_text()), {"seconds", "embeddings_fingerprint"})


def same_outputs(a: Path, b: Path) -> dict:
    """Which of the memory stage's outputs of runs ``a`` and ``b`` are equal."""
    out = {}
    fa, fb = a / "memory" / "facts.npy", b / "memory" / "facts.npy"
    if fa.exists() or fb.exists():
        out["facts_npy"] = (fa.exists() and fb.exists() and fa.stat().st_size == fb.stat().st_size
                            and np.array_equal(np.load(fa, mmap_mode="r"),
                                               np.load(fb, mmap_mode="r")))
    with np.load(a / "memory" / "index" / "arrays.npz") as za, \
            np.load(b / "memory" / "index" / "arrays.npz") as zb:
        out["index_arrays"] = (sorted(za.files) == sorted(zb.files)
                               and all(np.array_equal(za[k], zb[k]) for k in za.files))
    out["index_json"] = (_index_json(a / "memory" / "index" / "index.json")
                         == _index_json(b / "memory" / "index" / "index.json"))
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", required=True, type=Path, help="a run whose memory stage is done")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "memory_stage")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    run, work = args.run_dir.resolve(), args.work.resolve()
    original = json.loads((run / "manifest.json").read_text())["stages"]["memory"]
    prepare(run, work)
    cmd = [sys.executable, "-m", "pipeline.run", "--config", str(run / "config.resolved.yaml"),
           "--run-dir", str(work), "--stages", "memory"]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    wall = time.perf_counter() - t0
    entry = json.loads((work / "manifest.json").read_text())["stages"]["memory"]
    result = {
        "benchmark": "memory_stage",
        "args": {"run_dir": str(args.run_dir), "work": str(args.work), "out": str(args.out or "")},
        "facts": json.loads((run / "memory" / "stats.json").read_text()).get("facts"),
        "seconds": entry.get("seconds"), "peak_pss_gb": entry.get("peak_pss_gb"),
        "command_wall_seconds": round(wall, 1),
        "original": {"seconds": original.get("seconds"),
                     "peak_pss_gb": original.get("peak_pss_gb")},
        "same_as_original": same_outputs(run, work),
    }
    name = run.name if run.name != "run" else run.parent.name
    out = args.out or ROOT / "benchmarks" / "out" / f"memory_stage_{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
