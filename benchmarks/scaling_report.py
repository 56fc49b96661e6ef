"""One scaling report from the reports of several runs of ``--experiment scaling``.

A converged variant takes from minutes (29k) to hours (1m), so the sizes are run in different
run directories, and a run directory may not outlive the machine it ran on. Each run writes
``<run>/eval/scaling.json``; this merges them (a variant's row from the last input that has it:
`pipeline.experiments.merge_scaling`) into ``--out``: ``scaling.json``, ``scaling.md`` and the
plots (validation curves, accuracy against facts touched, accuracy against memory size). Every
row keeps the figures its run measured; nothing is recomputed.

    python benchmarks/scaling_report.py benchmarks/out/scaling.json runs/sq-scaling/eval/scaling.json

The last line is a JSON object: the arguments, the variants merged and from which input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.experiments import merge_scaling, write_scaling_report  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", help="scaling.json files, later ones win per variant")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    args = p.parse_args(argv)
    results, source = [], {}
    for path in args.inputs:
        try:
            result = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"{path}: cannot read a scaling report: {e}") from None
        results.append(result)
        source.update({r["variant"]: path for r in result.get("rows", [])})
    merged = merge_scaling(results)
    out = Path(args.out)
    write_scaling_report(merged, out, out)
    summary = {"benchmark": "scaling_report", "args": vars(args),
               "variants": {r["variant"]: source[r["variant"]] for r in merged["rows"]},
               "not_run": merged["not_run"]}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
