"""Hierarchical index of an FB2M-sized factorised memory on one small machine: time and peak RSS.

    .venv/bin/python benchmarks/index_scale.py [--facts 1000000] [--branching 128 64] [--iters 5]
                                               [--ray]

Builds a random factorised memory with FB2M's proportions (entities = 0.2 x facts, i.e. 2.15M at
10.8M facts; 6.7k relations; d = 200; 1 + Poisson(0.3) objects per fact, ~1.3 on average), then
the hierarchical index through the factorised DataAccess (rows gathered chunk by chunk, the
(N, 600) matrix never exists), in this process or with ``--ray`` over 2 factorised shard actors
(sharing the entity table through the object store).  Level 1 is the batched (grouped) k-means.
Prints one JSON line: facts, seconds per phase, peak RSS (driver; and actors with --ray).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hmn.index import FactorisedDataFactory, IndexSpec, build_index  # noqa: E402
from hmn.memory import FactorisedMemory  # noqa: E402


def random_memory(facts: int, relations: int = 6700, d: int = 200, seed: int = 0):
    rng = np.random.default_rng(seed)
    ne = max(2, int(0.2 * facts))
    ent = rng.standard_normal((ne, d), dtype=np.float32)
    ent /= np.linalg.norm(ent, axis=1, keepdims=True)  # TransE entities have unit norm
    rel = (rng.standard_normal((relations, d), dtype=np.float32) * 0.07).astype(np.float32)
    lengths = 1 + rng.poisson(0.3, facts)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return FactorisedMemory(ent, rel, rng.integers(0, ne, facts), rng.integers(0, relations, facts),
                            offsets, rng.integers(0, ne, int(offsets[-1])))


def rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--facts", type=int, default=1_000_000)
    ap.add_argument("--branching", type=int, nargs="+", default=[128, 64])
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=32768)
    ap.add_argument("--ray", action="store_true", help="2 factorised shard actors")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    out: dict = {"facts": args.facts, "branching": args.branching, "iters": args.iters,
                 "mode": "ray-2-factorised-actors" if args.ray else "in-process factorised"}
    t0 = time.perf_counter()
    mem = random_memory(args.facts)
    out["memory_seconds"] = time.perf_counter() - t0
    out["memory_table_gb"] = mem.nbytes() / 2**30
    out["dense_equivalent_gb"] = mem.n * mem.d * 4 / 2**30
    log(f"memory {mem} in {out['memory_seconds']:.1f}s, tables {out['memory_table_gb']:.2f} GB "
        f"(dense would be {out['dense_equivalent_gb']:.1f} GB); rss {rss_gb():.2f} GB")
    loads = [os.getloadavg()]

    def progress(s: dict) -> None:
        if s.get("iteration", 0) == 0 or s.get("level", 0) > 0:
            log(f"  level {s['level']} parent {s['parent']} iter {s['iteration']}: "
                f"{s['seconds']:.1f}s obj {s['objective']:.1f} (load {os.getloadavg()[0]:.1f})")

    spec = IndexSpec(branching=tuple(args.branching), iters=args.iters)
    t0 = time.perf_counter()
    if args.ray:
        import ray

        from pipeline.kmeans_ray import build_index_on_ray

        os.environ.pop("RAY_ADDRESS", None)
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False)
        try:
            index = build_index_on_ray(mem, spec, num_shards=2, progress=progress)
        finally:
            ray.shutdown()
    else:
        index = build_index(FactorisedDataFactory(mem, chunk=args.chunk), spec, progress)
    out["index_seconds"] = time.perf_counter() - t0
    loads.append(os.getloadavg())
    out["level_seconds"] = [lv["seconds"] for lv in index.stats["levels"]]
    out["leaves"] = index.num_leaves
    out["leaf_sizes"] = index.stats["leaf_sizes"]
    out["peak_rss_gb_driver"] = rss_gb()
    out["peak_rss_gb_children"] = (
        resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    )
    out["load_avg_1_5_15"] = loads
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
