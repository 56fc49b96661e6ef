"""The evaluate stage: score every question split with every configured reader; write the report.

Scoring runs on Ray Data: `map_batches` runs `Scorer`, a callable class on an actor pool; each
actor loads the model, the memory and the index once, then scores batches of encoded questions
with every requested reader (`score`, also used by ``python -m pipeline.evaluate``). The driver
turns the per-question predictions into the metrics (`metrics`): accuracy (the predicted fact has
the gold subject and relation), mean facts scored per question, and recall@k of each approximate
reader's candidates against the exact reader's.

Resources (`ScoringPlacement`, from the ``eval`` section): each actor asks Ray for
``eval.cpus_per_actor`` CPUs and runs torch with that many threads (rounded up); with
``eval.use_gpu`` it also asks for ``eval.gpus_per_actor`` GPUs and holds the model, the memory and
the index on its GPU, where ``eval.exact_precision=bfloat16`` gives the exact reader a bfloat16
scan (`hmn.exact_bf16`).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hmn.config import EvalConfig, ReaderConfig
from hmn.text import Vocabulary
from pipeline.artifacts import KnowledgeBase, read_questions
from pipeline.progress import Progress, on_terminal

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
                     num_actors=cfg.num_actors, placement=ScoringPlacement.from_config(cfg),
                     what=f"evaluate {split}")
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


@dataclass(frozen=True)
class ScoringPlacement:
    """What each scoring actor asks Ray for and where it computes (the ``eval`` section's
    cpus_per_actor, use_gpu, gpus_per_actor, exact_precision)."""

    cpus: float = 1.0
    use_gpu: bool = False
    gpus: float = 1.0
    exact_precision: str = "float32"

    @classmethod
    def from_config(cls, cfg: EvalConfig) -> ScoringPlacement:
        return cls(cfg.cpus_per_actor, cfg.use_gpu, cfg.gpus_per_actor, cfg.exact_precision)

    @property
    def threads(self) -> int:
        """torch threads of an actor: its CPUs, rounded up."""
        return max(1, math.ceil(self.cpus))

    @property
    def device(self) -> str:
        return "cuda" if self.use_gpu else "cpu"

    def ray_args(self) -> dict[str, float]:
        """``map_batches`` resource arguments. Ray Data reserves 1 CPU for an actor that names
        none, GPU or not, and warns when a GPU actor names both: 1 CPU is left implicit."""
        args: dict[str, float] = {"num_gpus": self.gpus} if self.use_gpu else {}
        if self.cpus != 1.0 or not self.use_gpu:
            args["num_cpus"] = self.cpus
        return args


class Scorer:
    """Ray Data actor: loads the run's model, memory and index once; scores question batches.

    ``threads``: torch intra-op threads (the actor's CPUs); ``device``: where the model, memory,
    index and readers live (``"cuda"``: the GPU Ray gave the actor); ``exact_precision``: the
    exact reader's scan (bfloat16 on CUDA only, `hmn.exact_bf16.with_exact_precision`)."""

    def __init__(self, run_dir: str, readers: tuple[str, ...], reader_cfg: ReaderConfig, k: int,
                 threads: int = 1, device: str = "cpu", exact_precision: str = "float32"):
        import torch

        from hmn.devices import resolve_device
        from hmn.exact_bf16 import with_exact_precision
        from hmn.readers import make_reader
        from pipeline.artifacts import load_index, load_memory, load_model

        torch.set_num_threads(threads)
        self.device = resolve_device(device, setting="eval.use_gpu (scoring actor)")
        root = Path(run_dir)
        self.model, _, _ = load_model(root / "train", self.device)
        memory = load_memory(root / "memory", self.device)
        index = load_index(root / "memory") if "clustered" in readers else None
        self.readers = {}
        for name in readers:
            reader = make_reader(name, memory, index, **reader_cfg.params(name, training=False))
            self.readers[name] = with_exact_precision(reader, exact_precision,
                                                      "eval.exact_precision")
        self.k = k

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from hmn.training import predict

        tokens = [np.asarray(t, dtype=np.int64) for t in batch["tokens"]]
        out = {"row": batch["row"]}
        for name, reader in self.readers.items():
            p = predict(self.model, reader, tokens, k=self.k, batch_size=max(1, len(tokens)),
                        device=self.device)
            out[f"pred_{name}"] = p.fact_ids
            out[f"touched_{name}"] = p.touched
            out[f"cands_{name}"] = p.candidates
        return out


def score(run_dir: Path, tokens: list[np.ndarray], readers: tuple[str, ...],
          reader_cfg: ReaderConfig, *, k: int, batch_size: int, num_actors: int,
          placement: ScoringPlacement | None = None, what: str = "scoring") -> pa.Table:
    """Predictions of every reader for each question, in input order. Needs a running Ray.
    ``placement``: the actors' resources and device (default: 1 CPU, 1 thread, no GPU).
    Progress (questions scored, rate, ETA) is logged as blocks arrive, under ``what``; on a
    terminal Ray Data draws its own bar instead."""
    import ray.data

    placement = placement or ScoringPlacement()
    table = pa.table({"row": pa.array(np.arange(len(tokens), dtype=np.int64)),
                      "tokens": pa.array([t.tolist() for t in tokens], pa.list_(pa.int64()))})
    ds = ray.data.from_arrow(table).map_batches(
        Scorer,
        fn_constructor_kwargs={"run_dir": str(run_dir), "readers": tuple(readers),
                               "reader_cfg": reader_cfg, "k": k, "threads": placement.threads,
                               "device": placement.device,
                               "exact_precision": placement.exact_precision},
        batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_actors), **placement.ray_args(),
    )
    progress = None
    if not (on_terminal() and ray.data.DataContext.get_current().enable_progress_bars):
        progress = Progress(what, len(tokens), unit="questions", log=log, bar=False)
    parts = []
    for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):  # blocks as scored
        parts.append(block)
        if progress is not None:
            progress.update(block.num_rows)
    if progress is not None:
        progress.close()
    result = pa.concat_tables(parts) if parts else table.select(["row"])
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
