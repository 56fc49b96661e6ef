"""Peak memory of putting an embed stage's entity table into the memory stage's factorised
``entity_emb.npy``: the whole Parquet table read and converted to numpy (how the stage did it)
against `pipeline.artifacts.read_vectors` streaming it batch by batch into a map of the new file
(how it does now). Each way runs in a fresh process (peak RSS: ``ru_maxrss``), alternated.

    .venv/bin/python benchmarks/vectors_load.py --vectors runs/sq-scaling/experiments/scaling/10m/embed/entities.parquet \
        [--repeats 1] [--out benchmarks/out/vectors_load_10m.json]

Last printed line: one JSON object with each run's seconds and peak RSS, and the arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one(way: str, vectors: str) -> dict:
    sys.path.insert(0, str(ROOT))
    import numpy as np
    import pyarrow.parquet as pq

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=Path(vectors).parent) as tmp:
        target = Path(tmp) / "entity_emb.npy"
        if way == "whole":
            col = pq.read_table(vectors)["vector"].combine_chunks()
            rows = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, col.type.list_size)
            np.save(target, np.ascontiguousarray(rows, dtype=np.float32))
        else:
            from pipeline.artifacts import read_vectors

            meta = pq.ParquetFile(vectors)
            d = meta.schema_arrow.field("vector").type.list_size
            out = np.lib.format.open_memmap(target, mode="w+", dtype=np.float32,
                                            shape=(meta.metadata.num_rows, d))
            read_vectors(Path(vectors), out=out)
            out.flush()
        size = target.stat().st_size
    return {"way": way, "seconds": round(time.perf_counter() - started, 1), "bytes": size,
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vectors", required=True, help="an embed stage's entities.parquet")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", choices=("whole", "streamed"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one(args.child, args.vectors)))
        return
    runs = []
    for _ in range(args.repeats):
        for way in ("whole", "streamed"):
            out = subprocess.run([sys.executable, __file__, "--vectors", args.vectors, "--child", way],
                                 check=True, capture_output=True, text=True).stdout
            runs.append(json.loads(out.strip().splitlines()[-1]))
            print(runs[-1], flush=True)
    result = {"runs": runs, "loadavg": [round(x, 2) for x in os.getloadavg()],
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                       if k != "child"}}
    line = json.dumps(result)
    if args.out is not None:
        args.out.write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
