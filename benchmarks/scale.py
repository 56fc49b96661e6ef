"""Training-step cost at FB2M scale: full softmax vs exact 10-MIPS vs the clustered reader (issue 7).

One run, one process, the same memory, model and batches for every method:

* **full**: softmax over all N facts (factorised: the closed-form gradient of hmn.model, never the
  dense (N, 600) matrix, which would be 26 GB at FB2M);
* **exact-k10**: exact top-10 by factorised MIPS, K-softmax over the batch union plus gold;
* **clustered**: the hierarchical index's Top-K leaves, K-softmax over the batch union plus gold.

A step is encode -> reader -> loss -> backward -> Adam, batch 128 (the paper's). Reported: the
median seconds per step of each method, the clustered reader's facts touched per question, and its
recall@10 against exact top-10 on the same queries.

Memory and queries, in order of preference:

* ``--run-dir RUN``: a finished ``configs/fb2m-synthetic.yaml`` run (factorised memory, index,
  trained encoder): batches are its dev questions, encoded by its trained model;
* otherwise a synthetic factorised memory with FB2M's sizes (``--facts``, entities and objects in
  proportion) and random unit-scale TransE-like tables, an index built here with the preset's
  hierarchical branching fitted on a sample, and queries that are held-out noisy fact vectors
  (the encoder is random, so its batches only time the steps).

    python benchmarks/scale.py --run-dir runs/fb2m-synthetic
    python benchmarks/scale.py --facts 10800000            # no run: synthetic memory and index

The last line is one JSON object with ``speedup_clustered_vs_full``, ``recall10`` and
``facts_touched_per_query`` (targets: >= 50x and >= 0.9).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hmn.index import build_index_from_vectors  # noqa: E402
from hmn.memory import FactorisedMemory  # noqa: E402
from hmn.model import BowEncoder, make_optimizer  # noqa: E402
from hmn.readers import make_reader, recall_at_k  # noqa: E402
from hmn.training import iterate_batches, train_epoch  # noqa: E402

log = logging.getLogger("scale")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # kB on Linux


def synthetic_memory(facts: int, seed: int = 0, dim: int = 200) -> FactorisedMemory:
    """FB2M proportions: 0.2 entities and 6.2e-4 relations per grouped fact, 1.3 objects a fact."""
    rng = np.random.default_rng(seed)
    ne, nr = max(10, round(facts * 2_150_000 / 10_800_000)), max(2, round(facts * 6_700 / 10_800_000))
    ent = rng.standard_normal((ne, dim), dtype=np.float32) / np.sqrt(dim)
    rel = rng.standard_normal((nr, dim), dtype=np.float32) / np.sqrt(dim)
    counts = np.minimum(rng.geometric(1 - 0.23, size=facts), 20)  # mean ~1.3
    offsets = np.concatenate([[0], np.cumsum(counts)])
    subj = rng.zipf(1.6, size=facts) % ne  # popular subjects, like Freebase
    return FactorisedMemory(ent, rel, subj, rng.integers(0, nr, facts), offsets,
                            rng.integers(0, ne, int(offsets[-1])))


def load_run(run_dir: Path, max_questions: int):
    """Memory and index of a finished memory stage; the trained encoder and dev questions when the
    train stage has finished too (else None: batches are then random, recall queries noisy facts)."""
    from pipeline.artifacts import load_index, load_memory, load_model, read_questions

    memory = load_memory(run_dir / "memory")
    index = load_index(run_dir / "memory")
    if not (run_dir / "train" / "model.pt").exists():
        return memory, index, None, None, None
    model, vocab, _ = load_model(run_dir / "train")
    q = read_questions(run_dir / "ingest", "dev")
    tokens, _ = vocab.encode_many(q["question"].to_pylist()[:max_questions])
    gold = q["fact_id"].to_numpy()[:max_questions]
    return memory, index, model, tokens, gold


def timed_steps(name: str, model: torch.nn.Module, memory, reader, tokens, gold, steps: int,
                batch: int, k: int, optimizer: str) -> dict:
    """Run ``steps`` training steps; seconds of each step (the first is a warm-up, reported apart)."""
    stamps = [time.perf_counter()]
    opt = make_optimizer(model, optimizer, 1e-3)
    batches = iterate_batches(tokens, gold, batch, shuffle=False)
    stats = train_epoch(model, batches, memory, reader, opt, loss="full" if name == "full" else "ksoftmax",
                        k=k, max_steps=steps, generator=torch.Generator().manual_seed(0),
                        on_step=lambda i, loss: stamps.append(time.perf_counter()))
    per_step = np.diff(stamps).tolist()
    timed = per_step[1:] if len(per_step) > 1 else per_step
    out = {"steps": stats.steps, "step_seconds": per_step,
           "median_step_seconds": statistics.median(timed), "softmax_size": stats.softmax_size,
           "facts_touched_per_query": stats.facts_touched, "loss": stats.loss}
    log.info("%s: %d steps, median %.3f s/step (all: %s), softmax %.0f, touched %.0f", name, stats.steps,
             out["median_step_seconds"], [round(s, 3) for s in per_step], stats.softmax_size,
             stats.facts_touched)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, default=None, help="a finished fb2m-synthetic run")
    p.add_argument("--facts", type=int, default=10_800_000, help="synthetic memory size (no --run-dir)")
    p.add_argument("--branching", default="256,128", help="synthetic index branching (no --run-dir)")
    p.add_argument("--fit-sample", type=int, default=400_000)
    p.add_argument("--iters", type=int, default=8)
    p.add_argument("--top-clusters", type=int, default=16)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--full-steps", type=int, default=3)
    p.add_argument("--exact-steps", type=int, default=3)
    p.add_argument("--clustered-steps", type=int, default=20)
    p.add_argument("--recall-queries", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--optimizer", default="sparse_adam", choices=["adam", "sparse_adam"],
                   help="the same for every method; sparse_adam (default) keeps the dense Adam update "
                        "of the whole word table, a per-step constant unrelated to the memory, out of "
                        "the comparison")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    load = [os.getloadavg()]

    steps_needed = max(args.full_steps, args.exact_steps, args.clustered_steps)
    trained = None
    build_seconds = None
    if args.run_dir is not None:
        memory, index, trained, tokens, gold = load_run(args.run_dir, steps_needed * args.batch)
        source = f"run {args.run_dir}" + ("" if trained is not None else " (memory and index; no trained encoder)")
    else:
        t0 = time.perf_counter()
        memory = synthetic_memory(args.facts)
        log.info("synthetic %s in %.1f s", memory, time.perf_counter() - t0)
        t0 = time.perf_counter()
        index = build_index_from_vectors(
            memory, branching=[int(b) for b in args.branching.split(",")], U=0.9, iters=args.iters,
            fit_sample=args.fit_sample,
            progress=lambda s: log.info("k-means level %s iter %s objective %.4f", s.get("level"),
                                        s.get("iteration"), s.get("objective", float("nan"))))
        build_seconds = time.perf_counter() - t0
        log.info("index: %d leaves in %.1f s, sizes %s", index.num_leaves, build_seconds,
                 index.stats["leaf_sizes"])
        source = "synthetic"
    if trained is not None:
        vocab, query_model = trained.words.weight.shape[0], trained
    else:
        vocab, query_model = 50_000, None
        rng = np.random.default_rng(1)
        tokens = [rng.integers(0, vocab, size=rng.integers(4, 10)) for _ in range(steps_needed * args.batch)]
        gold = rng.integers(0, memory.n, size=len(tokens))
    log.info("memory %s (%.2f GB of tables; dense would be %.1f GB), %d leaves, source %s",
             memory, memory.nbytes() / 1e9, memory.n * memory.d * 4 / 1e9, index.num_leaves, source)

    exact = make_reader("exact", memory)
    clustered = make_reader("clustered", memory, index, top_clusters=args.top_clusters)
    results = {}
    for name, reader, steps in (("clustered", clustered, args.clustered_steps),
                                ("exact-k10", exact, args.exact_steps),
                                ("full", None, args.full_steps)):
        torch.manual_seed(0)
        model = BowEncoder(vocab, memory.d, init_std=0.01, sparse=args.optimizer == "sparse_adam")
        if query_model is not None:
            model.load_state_dict(query_model.state_dict())
        results[name] = timed_steps(name, model, memory, reader, tokens, gold, steps, args.batch, args.k,
                                    args.optimizer)
        load.append(os.getloadavg())

    # recall@10 of the clustered reader against exact top-10, on the same queries
    with torch.no_grad():
        if query_model is not None:
            qt, qo = next(iter(iterate_batches(tokens[:args.recall_queries], gold[:args.recall_queries],
                                               args.recall_queries, shuffle=False)))[:2]
            queries = query_model(qt, qo)
            qsource = "trained encoder on dev questions"
        else:
            rng = np.random.default_rng(2)
            ids = torch.from_numpy(rng.choice(memory.n, size=args.recall_queries, replace=False))
            rows = memory.gather(ids)
            queries = rows + 0.5 * rows.norm(dim=1, keepdim=True) / np.sqrt(memory.d) * torch.randn(
                rows.shape, generator=torch.Generator().manual_seed(3))
            qsource = "noisy fact vectors (noise norm = 0.5 x fact norm)"
        recalls, touched = [], []
        for s in range(0, queries.shape[0], args.batch):
            qb = queries[s:s + args.batch]
            e = exact.search(qb, args.k)
            c = clustered.search(qb, args.k)
            recalls.append(recall_at_k(c, e, args.k) * qb.shape[0])
            touched.append(c.touched.double().sum().item())
        recall = sum(recalls) / queries.shape[0]
        touched_q = sum(touched) / queries.shape[0]
    load.append(os.getloadavg())

    full_s = results["full"]["median_step_seconds"]
    out = {
        "memory_facts": memory.n, "entities": int(memory.entity_emb.shape[0]),
        "relations": int(memory.relation_emb.shape[0]), "source": source, "leaves": index.num_leaves,
        "index_build_seconds": build_seconds, "top_clusters": args.top_clusters, "batch": args.batch,
        "threads": args.threads, "optimizer": args.optimizer, "vocabulary": vocab,
        "step_seconds": {n: r["median_step_seconds"] for n, r in results.items()},
        "softmax_size": {n: r["softmax_size"] for n, r in results.items()},
        "details": results, "recall_queries": int(queries.shape[0]), "recall_query_source": qsource,
        "speedup_exact_vs_full": full_s / results["exact-k10"]["median_step_seconds"],
        "speedup_clustered_vs_full": full_s / results["clustered"]["median_step_seconds"],
        "recall10": recall,
        "facts_touched_per_query": touched_q,
        "facts_touched_fraction": touched_q / memory.n,
        "peak_rss_gb": peak_rss_gb(), "loadavg": load, "seconds": time.perf_counter() - t_start,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
