"""The run report: evaluation results, training summary, per-stage times and peak memory.

`write_report` turns a finished run directory into ``evaluate/report.md`` (the table printed by
``python -m pipeline.run``) and ``report.json`` at the run's root.
"""

from __future__ import annotations

import json

import numpy as np

from pipeline.driver import STAGES
from pipeline.rundir import RunDir, StageResult


def write_report(run: RunDir, results: dict[str, StageResult]) -> str:
    """Write the report of a run whose evaluate stage is done; returns its Markdown table."""
    run.fetch("train", "evaluate")  # a run directory on a store: its files in the cache
    report = json.loads((run.stage_dir("evaluate") / "report.json").read_text())
    train_stats = json.loads((run.stage_dir("train") / "stats.json").read_text())
    manifest = run.manifest()["stages"]
    times = {s: float(manifest.get(s, {}).get("seconds", 0.0)) for s in STAGES if s in manifest}
    peaks = {s: manifest[s].get("peak_pss_gb") for s in STAGES if s in manifest}
    table = results_table(report, train_stats, times, peaks)
    name = run.location.rstrip("/").rsplit("/", 1)[-1]
    text = f"# HMN run report: {name}\n\nRun directory: `{run.location}`\n\n{table}\n"
    run.write_text("evaluate/report.md", text)
    full = {"report": report, "stage_seconds": times, "stage_peak_pss_gb": peaks,
            "skipped": [n for n, r in results.items() if r.skipped],
            "train": {k: v for k, v in train_stats.items() if k != "history"}}
    run.write_text("report.json", json.dumps(full, indent=2, default=str))
    return table


def results_table(report: dict, train_stats: dict | None, stage_times: dict[str, float],
                  stage_peaks: dict[str, float | None] | None = None) -> str:
    """Markdown: one row per split and reader, then the per-stage times and peak memory."""
    lines = ["| split | reader | accuracy | facts scored / question | recall@10 vs exact |",
             "|---|---|---|---|---|"]
    for split, r in report["splits"].items():
        for name, m in r["readers"].items():
            rec = next((v for key, v in m.items() if key.startswith("recall")), None)
            lines.append(f"| {split} ({r['questions']} q) | {name} | {m['accuracy']:.4f} | "
                         f"{m['facts_per_query']:.1f} | {'' if rec is None else f'{rec:.4f}'} |")
    if train_stats:
        lines += ["", f"Training: loss={train_stats.get('loss')} "
                      f"reader={train_stats.get('reader')}, "
                      f"{train_stats.get('epochs')} epochs, best dev accuracy "
                      f"{train_stats.get('best_dev_accuracy', float('nan')):.4f} at epoch "
                      f"{train_stats.get('best_epoch')}, mean softmax size "
                      f"{train_stats.get('mean_softmax_size', 0):.0f}, "
                      f"{train_stats.get('mean_epoch_seconds', 0):.1f} s/epoch"]
    peaks = stage_peaks or {}

    def gb(s: str) -> str:
        v = peaks.get(s)
        return "" if v is None else f"{v:.2f}"

    lines += ["", "| stage | seconds | peak memory (GB, PSS of the process tree) |",
              "|---|---|---|"]
    lines += [f"| {s} | {t:.1f} | {gb(s)} |" for s, t in stage_times.items()]
    known = [v for v in peaks.values() if v is not None]
    lines.append(f"| total | {float(np.sum(list(stage_times.values()))):.1f} | "
                 f"{max(known):.2f} (max) |" if known else
                 f"| total | {float(np.sum(list(stage_times.values()))):.1f} | |")
    return "\n".join(lines)
