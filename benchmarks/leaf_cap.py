"""Capped leaves at FB2M scale: recall@10 against facts read, k-means' leaves vs split ones.

    python benchmarks/leaf_cap.py --run-dir runs/fb2m-synthetic [--max-leaf-size 1000 500]
        [--leaves 8 16 32 64] [--queries 512] [--out benchmarks/out/leaf_cap.json]

One process, a finished run's factorised memory, hierarchical index and trained encoder; the
queries are that encoder's dev questions. The exact top-10 of every query is computed once
(factorised exact reader). Then, for the run's index as built (k-means' leaves) and for each cap
(``hmn.index.split_leaves`` over the same index, in this process: every leaf of more facts than
the cap cut by a k-means of its facts), the clustered reader at each number of leaves read per
question: recall@10 against exact, facts read per question (mean and 90th percentile) and
seconds per batch of 128 questions. Same queries, same memory, same leaf-selection code; only the
leaves differ, so the curves compare at equal facts read.

The last line is one JSON object: per index (``base``, ``cap_<N>``) its leaf statistics, split
time, and per number of leaves ``recall10``, ``facts_read_mean``, ``facts_read_p90``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hmn.index import (  # noqa: E402
    ClusterIndex,
    FactorisedDataFactory,
    IndexSpec,
    InMemoryDataFactory,
    split_leaves,
)
from hmn.kmeans import imbalance_factor  # noqa: E402
from hmn.memory import FactorisedMemory  # noqa: E402
from hmn.readers import make_reader, recall_at_k  # noqa: E402
from hmn.training import iterate_batches  # noqa: E402

log = logging.getLogger("leaf_cap")


def curve(memory, index: ClusterIndex, queries: torch.Tensor, exact: list, leaves: list[int],
          batch: int, k: int) -> dict:  # fmt: skip
    out = {}
    for top in leaves:
        reader = make_reader("clustered", memory, index, top_clusters=top)
        recalls, touched, seconds = [], [], []
        for j, s in enumerate(range(0, queries.shape[0], batch)):
            qb = queries[s : s + batch]
            t = time.perf_counter()
            c = reader.search(qb, k)
            seconds.append(time.perf_counter() - t)
            recalls.append(recall_at_k(c, exact[j], k) * qb.shape[0])
            touched.append(c.touched.numpy())
        touched = np.concatenate(touched)
        out[str(top)] = {
            "recall10": sum(recalls) / queries.shape[0],
            "facts_read_mean": float(touched.mean()),
            "facts_read_p90": float(np.percentile(touched, 90)),
            "seconds_per_batch": float(np.median(seconds)),
        }
        log.info("%d leaves: %s", top, out[str(top)])
    return out


def load_run(run_dir: Path, max_questions: int):
    """A finished run's memory, index and trained encoder, with its first ``max_questions`` dev
    questions (token lists) and their gold fact ids."""
    from pipeline.artifacts import load_index, load_memory, load_model, read_questions

    if not (run_dir / "train" / "model.pt").exists():
        raise SystemExit(f"{run_dir}: needs a finished train stage (the trained encoder)")
    memory = load_memory(run_dir / "memory")
    index = load_index(run_dir / "memory")
    model, vocab, _ = load_model(run_dir / "train")
    q = read_questions(run_dir / "ingest", "dev")
    tokens, _ = vocab.encode_many(q["question"].to_pylist()[:max_questions])
    gold = q["fact_id"].to_numpy()[:max_questions]
    return memory, index, model, tokens, gold


def leaf_stats(index: ClusterIndex) -> dict:
    sizes = index.leaf_sizes()
    n = sizes.sum()
    return {
        "leaves": int(index.num_leaves),
        "mean": float(sizes.mean()),
        "max": int(sizes.max()),
        # the size of the leaf a random fact sits in (what a query landing near it pays)
        "fact_weighted_mean": float((sizes.astype(np.float64) ** 2).sum() / n),
        "imbalance": imbalance_factor(sizes),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--max-leaf-size", type=int, nargs="+", default=[1000, 500])
    p.add_argument("--leaves", type=int, nargs="+", default=[8, 16, 32, 64])
    p.add_argument("--queries", type=int, default=512)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--iters", type=int, default=10, help="k-means iterations of each split round")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    memory, index, model, tokens, gold = load_run(args.run_dir, args.queries)
    with torch.no_grad():
        qt, qo = next(iter(iterate_batches(tokens, gold, len(tokens), shuffle=False)))[:2]
        queries = model(qt, qo)  # (Q, D)
    log.info("%d queries, memory of %d facts, %d leaves", queries.shape[0], memory.n,
             index.num_leaves)  # fmt: skip
    t = time.perf_counter()
    exact_reader = make_reader("exact", memory)
    with torch.no_grad():
        exact = [exact_reader.search(queries[s : s + args.batch], args.k)
                 for s in range(0, queries.shape[0], args.batch)]  # fmt: skip
    exact_seconds = time.perf_counter() - t
    log.info("exact top-%d of %d queries: %.1f s", args.k, queries.shape[0], exact_seconds)

    result: dict = {"run": str(args.run_dir), "queries": int(queries.shape[0]),
                    "query_source": "trained encoder on dev questions", "k": args.k,
                    "exact_seconds": exact_seconds, "threads": args.threads}  # fmt: skip
    with torch.no_grad():
        result["base"] = {"leaf_sizes": leaf_stats(index),
                          "curve": curve(memory, index, queries, exact, args.leaves, args.batch,
                                         args.k)}  # fmt: skip
        if isinstance(memory, FactorisedMemory):
            factory = FactorisedDataFactory(memory)
        else:
            factory = InMemoryDataFactory(memory.vectors)
        for cap in args.max_leaf_size:
            t = time.perf_counter()
            spec = IndexSpec(branching=tuple(index.stats["branching"]), iters=args.iters, seed=0,
                             max_leaf_size=cap)
            capped = split_leaves(index, factory, spec)
            seconds = time.perf_counter() - t
            split = capped.stats["levels"][-1]
            log.info("cap %d: %d -> %d leaves in %.1f s", cap, index.num_leaves,
                     capped.num_leaves, seconds)  # fmt: skip
            result[f"cap_{cap}"] = {
                "max_leaf_size": cap, "split_seconds": seconds,
                "split_rounds": split["rounds"], "leaf_sizes": leaf_stats(capped),
                "curve": curve(memory, capped, queries, exact, args.leaves, args.batch, args.k),
            }  # fmt: skip
    result["seconds"] = time.perf_counter() - t_start
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
