"""A run directory's stage records: each finished stage's seconds and peak memory (the manifest),
TransE's epoch records and the memory stage's index figures, as one JSON object.

    .venv/bin/python benchmarks/stage_records.py --run-dir runs/sq-scaling/experiments/scaling/10m \
        [--command "the command that made the run"] [--out benchmarks/out/scaling_10m_stages.json]

The figures are the pipeline's own (`pipeline.memwatch`: PSS of the driver's process tree,
sampled); this script only reads them. Last printed line: the JSON object, with its arguments.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

STAGE_KEYS = ("seconds", "peak_pss_gb", "peak_rss_gb", "status")
INDEX_KEYS = ("facts", "layout", "leaves", "leaf_size_mean", "leaf_size_max", "fact_norm_max")


def records(run_dir: Path) -> dict:
    manifest = json.loads((run_dir / "manifest.json").read_text())
    stages = {name: {k: entry[k] for k in STAGE_KEYS if k in entry}
              for name, entry in manifest["stages"].items()}
    out: dict = {"stages": stages}
    embed = run_dir / "embed" / "stats.json"
    if embed.exists():
        stats = json.loads(embed.read_text())
        out["embed"] = {k: v for k, v in stats.items() if k != "history"}
        out["embed"]["epochs"] = stats.get("history", [])
    memory = manifest["stages"].get("memory", {}).get("stats")
    if memory:
        out["memory"] = {k: memory[k] for k in INDEX_KEYS if k in memory}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--command", default="", help="the command that made the run (recorded)")
    parser.add_argument("--note", default="", help="what the reader should know (recorded)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    result = {**records(args.run_dir), "loadavg": [round(x, 2) for x in os.getloadavg()],
              "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    line = json.dumps(result)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
