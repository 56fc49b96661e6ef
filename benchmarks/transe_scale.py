"""TransE at FB2M scale on Ray Train: one epoch over the partitioned entity table.

    flock /tmp/bigmem.lock .venv/bin/python benchmarks/transe_scale.py \\
        [--kb /tmp/bench/fb2m/kb.txt] [--work /tmp/bench/transe_scale] [--workers 2] \\
        [--partitions 8] [--threads 1] [--epochs 1] [--set embed.field=value ...]

The grouped-fact file (FB2M format; ``python -m hmn.synthetic`` writes an FB2M-sized one) goes
through the project's ingest stage (Ray Data) into ``<work>/ingest`` (reused when present), then
``pipeline.stages.embed.train_transe_on_ray`` trains TransE for ``--epochs`` epochs with
``--workers`` Ray Train workers over ``--partitions`` entity partitions (PyTorch-BigGraph
buckets; see ARCHITECTURE.md). The EmbedConfig is the pipeline's default for real data
(configs/fb2m-synthetic.yaml's ``embed:`` section) unless overridden by ``--set``.

Peak memory is sampled every 0.2 s over this process and its descendants (the local Ray
cluster, its workers included): ``peak_rss_gb`` is the largest sum of PSS (shared pages such as
the object store and memory-mapped partition files split between the processes mapping them),
``peak_rss_sum_gb`` the largest plain RSS sum.

Last printed line: one JSON object with ``epoch_seconds``, ``triples_per_s``, ``peak_rss_gb``,
the configuration, the load average and details.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402,F401  (before ray: see pipeline/run.py)

from benchmarks.ingest import TreeMemorySampler  # noqa: E402

logger = logging.getLogger("transe_scale")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kb", type=Path, default=Path("/tmp/bench/fb2m/kb.txt"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench/transe_scale"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-failures", type=int, default=2,
                        help="worker-group restarts (e.g. after Ray's memory monitor kills a "
                             "worker on a shared machine); the epoch restarts from its checkpoint")
    parser.add_argument("--set", action="append", default=[], help="embed.field=value")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    import numpy as np
    import ray

    from hmn.config import load_config
    from hmn.transe import head_corruption_probs
    from pipeline.artifacts import KnowledgeBase
    from pipeline.stages.embed import train_transe_on_ray
    from pipeline.stages.ingest import IngestSources, run_ingest

    sampler = TreeMemorySampler()
    sampler.start()
    load_start = os.getloadavg()
    ray.init(num_cpus=max(4, args.workers * args.threads + 2), include_dashboard=False,
             log_to_driver=False)
    ingest_dir = args.work / "ingest"
    ingest_s = 0.0
    if not (ingest_dir / "kb" / "facts.parquet").exists():
        shutil.rmtree(ingest_dir, ignore_errors=True)
        started = time.perf_counter()
        run_ingest(IngestSources(facts=[str(args.kb)], facts_format="grouped"), str(ingest_dir))
        ingest_s = time.perf_counter() - started
    overrides = [s if s.startswith("embed.") else f"embed.{s}" for s in args.set]
    cfg = load_config(ROOT / "configs/fb2m-synthetic.yaml", overrides).embed
    cfg = dataclasses.replace(cfg, epochs=args.epochs, num_workers=args.workers,
                              num_partitions=args.partitions, num_cpus=args.threads,
                              max_failures=args.max_failures)
    cfg.validate()

    kb = KnowledgeBase.load(ingest_dir)
    E, R = len(kb.entity_keys), len(kb.relation_keys)
    triples = kb.triples()
    p_head = head_corruption_probs(triples, R, cfg.negatives)
    T = len(triples)
    del triples, kb
    logger.info("E=%d R=%d T=%d %s", E, R, T, cfg)
    root = args.work / "embed"
    shutil.rmtree(root, ignore_errors=True)
    started = time.perf_counter()
    ent, rel, history = train_transe_on_ray(cfg, ingest_dir, E, R, p_head, root)
    total_s = time.perf_counter() - started
    sampler.stop()
    ray.shutdown()
    epoch_s = float(np.mean([h["seconds"] for h in history]))
    out = {
        "epoch_seconds": round(epoch_s, 1),
        "triples_per_s": round(T / epoch_s),
        "peak_rss_gb": round(sampler.peak_pss / 1e9, 2),
        "peak_rss_sum_gb": round(sampler.peak_rss / 1e9, 2),
        "entities": E, "relations": R, "triples": T, "dim": cfg.dim,
        "table_gb": round(E * cfg.dim * 4 / 1e9, 2),
        "workers": args.workers, "partitions": args.partitions, "threads_per_worker": args.threads,
        "history": history,
        "train_total_s": round(total_s, 1), "ingest_s": round(ingest_s, 1),
        "embed_config": dataclasses.asdict(cfg),
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "finite": bool(np.isfinite(ent).all() and np.isfinite(rel).all()),
    }
    shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
