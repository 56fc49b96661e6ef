"""The evaluate stage: score every question split with every configured reader; write the report.

Scoring runs on Ray Data: `map_batches` runs `Scorer`, a callable class on an actor pool; each
actor loads the model, the memory and the index once, then scores batches of encoded questions
with every requested reader (`score`, also used by ``python -m pipeline.evaluate``). The driver
turns the per-question predictions into the metrics (`metrics`): accuracy (the predicted fact has
the gold subject and relation), mean facts scored per question, and recall@k of each approximate
reader's candidates against the exact reader's.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hmn.config import EvalConfig, ReaderConfig
from hmn.text import Vocabulary
from pipeline.artifacts import KnowledgeBase, read_questions

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
            rng = np.random.default_rng([0, 0xE7A1])
            keep = np.sort(rng.choice(total, cfg.max_questions, replace=False))
            q = q.take(keep)
            log.info("split %s: scoring a sample of %d of %d questions", split, q.num_rows, total)
        tokens, unknown = vocab.encode_many(q["question"].to_pylist())
        gold = q["fact_id"].to_numpy()
        pred = score(run_dir, tokens, cfg.readers, reader_cfg, k=k, batch_size=cfg.batch_size,
                     num_actors=cfg.num_actors)
        pq.write_table(pred.drop_columns([c for c in pred.column_names if c.startswith("cands_")])
                       .append_column("gold", q["fact_id"]),
                       out / "predictions" / f"{split}.parquet")
        m = metrics(pred, gold, cfg.readers, kb.fact_subject, kb.fact_relation, cfg.recall_k)
        results[split] = {"questions": int(q.num_rows), "questions_in_split": int(total),
                          "questions_without_known_words": int(sum(len(t) == 0 for t in tokens)),
                          "unknown_tokens": int(unknown.sum()), "readers": m}
        for name, r in m.items():
            log.info("%s %s: %s", split, name, {a: round(b, 4) for a, b in r.items()})
    report = {"splits": results, "memory_facts": kb.num_facts}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    return report


class Scorer:
    """Ray Data actor: loads the run's model, memory and index once; scores question batches."""

    def __init__(self, run_dir: str, readers: tuple[str, ...], reader_cfg: ReaderConfig, k: int,
                 threads: int = 1):
        import torch

        from hmn.readers import make_reader
        from pipeline.artifacts import load_index, load_memory, load_model

        torch.set_num_threads(threads)
        root = Path(run_dir)
        self.model, _, _ = load_model(root / "train")
        memory = load_memory(root / "memory")
        index = load_index(root / "memory") if "clustered" in readers else None
        self.readers = {name: make_reader(name, memory, index,
                                          **reader_cfg.params(name, training=False))
                        for name in readers}
        self.k = k

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from hmn.training import predict

        tokens = [np.asarray(t, dtype=np.int64) for t in batch["tokens"]]
        out = {"row": batch["row"]}
        for name, reader in self.readers.items():
            p = predict(self.model, reader, tokens, k=self.k, batch_size=max(1, len(tokens)))
            out[f"pred_{name}"] = p.fact_ids
            out[f"touched_{name}"] = p.touched
            out[f"cands_{name}"] = p.candidates
        return out


def score(run_dir: Path, tokens: list[np.ndarray], readers: tuple[str, ...],
          reader_cfg: ReaderConfig, *, k: int, batch_size: int, num_actors: int) -> pa.Table:
    """Predictions of every reader for each question, in input order. Needs a running Ray."""
    import ray.data

    table = pa.table({"row": pa.array(np.arange(len(tokens), dtype=np.int64)),
                      "tokens": pa.array([t.tolist() for t in tokens], pa.list_(pa.int64()))})
    ds = ray.data.from_arrow(table).map_batches(
        Scorer,
        fn_constructor_kwargs={"run_dir": str(run_dir), "readers": tuple(readers),
                               "reader_cfg": reader_cfg, "k": k},
        batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_actors),
    )
    out = ds.to_arrow_refs()
    result = pa.concat_tables(ray.get(out)) if out else table.select(["row"])
    return result.sort_by("row")


def column_2d(col: pa.ChunkedArray, width: int) -> np.ndarray:
    """A (rows, width) column written by map_batches (Ray's tensor extension type) as ndarray."""
    parts = [np.asarray(c.to_numpy(zero_copy_only=False)) for c in col.chunks if len(c)]
    if not parts:
        return np.zeros((0, width), np.int64)
    return np.concatenate([p if p.ndim == 2 else np.stack(p) for p in parts])


def metrics(pred: pa.Table, gold: np.ndarray, readers: tuple[str, ...], fact_subject: np.ndarray,
            fact_relation: np.ndarray, recall_k: int) -> dict[str, dict]:
    """Per reader: accuracy, facts scored per question, recall@k against exact (if scored)."""
    from hmn.training import Predictions, accuracy, candidate_recall

    def preds(name: str) -> Predictions:
        return Predictions(pred[f"pred_{name}"].to_numpy(), pred[f"touched_{name}"].to_numpy(),
                           column_2d(pred[f"cands_{name}"], recall_k))

    out: dict[str, dict] = {}
    exact = preds("exact") if "exact" in readers else None
    for name in readers:
        p = preds(name)
        m = {
            "accuracy": accuracy(p.fact_ids, gold, fact_subject, fact_relation),
            "facts_per_query": float(p.touched.mean()) if len(p.touched) else 0.0,
        }
        if exact is not None and name != "exact" and len(gold):
            m[f"recall{recall_k}_vs_exact"] = candidate_recall(p, exact, recall_k)
        out[name] = m
    return out
