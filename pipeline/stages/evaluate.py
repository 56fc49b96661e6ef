"""Evaluate stage: score every question split with every configured reader; write the report."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from hmn.config import EvalConfig, ReaderConfig
from hmn.text import Vocabulary
from pipeline.artifacts import KnowledgeBase, read_questions
from pipeline.scoring import metrics, score

log = logging.getLogger(__name__)


def run_evaluate(cfg: EvalConfig, reader_cfg: ReaderConfig, run_dir: Path, out: Path) -> dict:
    kb = KnowledgeBase.load(run_dir / "ingest")
    vocab = Vocabulary.load(run_dir / "train" / "vocab.json")
    k = max(reader_cfg.k, cfg.recall_k)
    results: dict[str, dict] = {}
    (out / "predictions").mkdir()
    for split in cfg.splits:
        q = read_questions(run_dir / "ingest", split)
        if q is None or q.num_rows == 0:
            log.info("split %s: no questions, skipped", split)
            continue
        total = q.num_rows
        if 0 < cfg.max_questions < total:  # a seeded sample, the same for every reader
            keep = np.sort(np.random.default_rng([0, 0xE7A1]).choice(total, cfg.max_questions, replace=False))
            q = q.take(keep)
            log.info("split %s: scoring a sample of %d of %d questions", split, q.num_rows, total)
        tokens, unknown = vocab.encode_many(q["question"].to_pylist())
        gold = q["fact_id"].to_numpy()
        pred = score(run_dir, tokens, cfg.readers, reader_cfg, k=k, batch_size=cfg.batch_size,
                     num_actors=cfg.num_actors)
        pq.write_table(pred.drop_columns([c for c in pred.column_names if c.startswith("cands_")])
                       .append_column("gold", q["fact_id"]), out / "predictions" / f"{split}.parquet")
        m = metrics(pred, gold, cfg.readers, kb.fact_subject, kb.fact_relation, cfg.recall_k)
        results[split] = {"questions": int(q.num_rows), "questions_in_split": int(total),
                          "questions_without_known_words": int(sum(len(t) == 0 for t in tokens)),
                          "unknown_tokens": int(unknown.sum()), "readers": m}
        for name, r in m.items():
            log.info("%s %s: %s", split, name, {a: round(b, 4) for a, b in r.items()})
    report = {"splits": results, "memory_facts": kb.num_facts}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


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
        lines += ["", f"Training: loss={train_stats.get('loss')} reader={train_stats.get('reader')}, "
                      f"{train_stats.get('epochs')} epochs, best dev accuracy "
                      f"{train_stats.get('best_dev_accuracy', float('nan')):.4f} at epoch "
                      f"{train_stats.get('best_epoch')}, mean softmax size "
                      f"{train_stats.get('mean_softmax_size', 0):.0f}, "
                      f"{train_stats.get('mean_epoch_seconds', 0):.1f} s/epoch"]
    peaks = stage_peaks or {}

    def gb(s: str) -> str:
        v = peaks.get(s)
        return "" if v is None else f"{v:.2f}"

    lines += ["", "| stage | seconds | peak memory (GB, PSS of the process tree) |", "|---|---|---|"]
    lines += [f"| {s} | {t:.1f} | {gb(s)} |" for s, t in stage_times.items()]
    known = [v for v in peaks.values() if v is not None]
    lines.append(f"| total | {float(np.sum(list(stage_times.values()))):.1f} | "
                 f"{max(known):.2f} (max) |" if known else
                 f"| total | {float(np.sum(list(stage_times.values()))):.1f} | |")
    return "\n".join(lines)
