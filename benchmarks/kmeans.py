"""Spherical k-means: hmn (in-process torch, and over Ray shard actors) versus faiss.Kmeans.

    .venv/bin/python benchmarks/kmeans.py [--n 1000000] [--k 1000] [--iters 5] [--sq-k 256]
                                          [--sq-iters 20] [--run-dir runs/sq32k]

Two data sets, each clustered by all three with the same number of iterations and 2 threads
(faiss: omp 2 threads; torch: 2 threads; Ray: 2 shard actors of 1 CPU each, 1 thread each):

* synthetic: n x 600 float32, a mixture of 2k Gaussian blobs (so the objective has structure);
* sq32k: the SQ-32k fact memory after the eq. 6-7 transform, unit-normalised (the rows the
  index build clusters).

faiss is given ``max_points_per_centroid`` large enough to train on every row (its default would
subsample 256 k rows) and the rows pre-normalised; hmn starts from k-means++ on a sample, faiss
from random rows.  Seconds per iteration exclude initialisation; the objective is
sum_i max_j cos(x_i, c_j) of the final centroids, computed the same way for all.
Last line printed: JSON with time_ratio_vs_faiss (ray / faiss seconds per iteration) and
objective_gap ((faiss - ray) / faiss) per data set.
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from hmn.kmeans import InMemoryData, spherical_kmeans  # noqa: E402
from hmn.mips import fit_transform  # noqa: E402


def objective(x: np.ndarray, c: np.ndarray) -> float:
    return float(InMemoryData(torch.from_numpy(x)).partial_stats(torch.from_numpy(c))[2])


def run_faiss(x: np.ndarray, k: int, iters: int, seed: int) -> dict:
    import faiss

    faiss.omp_set_num_threads(2)
    km = faiss.Kmeans(x.shape[1], k, niter=iters, spherical=True, seed=seed,
                      max_points_per_centroid=max(256, -(-x.shape[0] // k)), verbose=False)
    t0 = time.perf_counter()
    km.train(x)
    total = time.perf_counter() - t0
    st = km.iteration_stats
    per_iter = float(np.mean([s["time"] for s in st])) if st and "time" in st[0] else total / iters
    return {"seconds_total": total, "seconds_per_iter": total / iters,
            "faiss_reported_time_per_iter": per_iter,
            "objective": objective(x, km.centroids), "iterations": iters}


def run_torch(x: np.ndarray, k: int, iters: int, seed: int) -> dict:
    torch.set_num_threads(2)
    t0 = time.perf_counter()
    res = spherical_kmeans(InMemoryData(torch.from_numpy(x)), k, iters=iters, tol=0.0, seed=seed)
    total = time.perf_counter() - t0
    per = float(np.mean([s["seconds"] for s in res.stats]))
    return {"seconds_total": total, "seconds_per_iter": per, "iterations": len(res.stats),
            "objective": objective(x, res.centroids.numpy())}


def run_ray(x: np.ndarray, k: int, iters: int, seed: int) -> dict:
    import ray

    from pipeline.kmeans_ray import RayShardedDataFactory, ShardActor

    remote = ray.remote(ShardActor).options(num_cpus=1)
    bounds = np.linspace(0, x.shape[0], 3).astype(int)
    actors = [remote.remote(ray.put(x[bounds[s] : bounds[s + 1]]), int(bounds[s]))
              for s in range(2)]
    ray.get([a.num_rows.remote() for a in actors])
    try:
        factory = RayShardedDataFactory(actors, bounds[:-1], x.shape[0], x.shape[1])
        data = factory(None, None)  # rows as given, unit-normalised by the actors
        t0 = time.perf_counter()
        res = spherical_kmeans(data, k, iters=iters, tol=0.0, seed=seed)
        total = time.perf_counter() - t0
        data.close()
    finally:
        for a in actors:
            ray.kill(a)
    per = float(np.mean([s["seconds"] for s in res.stats]))
    return {"seconds_total": total, "seconds_per_iter": per, "iterations": len(res.stats),
            "objective": objective(x, res.centroids.numpy())}


def synthetic(n: int, d: int = 600, blobs: int = 2000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((blobs, d)).astype(np.float32)
    x = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 100_000):
        e = min(s + 100_000, n)
        lab = rng.integers(0, blobs, e - s)
        x[s:e] = centres[lab] + 1.5 * rng.standard_normal((e - s, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def sq32k_rows(run_dir: str | None) -> np.ndarray:
    from readers import sq32k_memory

    m, _ = sq32k_memory(run_dir, log=lambda *a: print(*a, file=sys.stderr))
    xt = torch.from_numpy(np.ascontiguousarray(m, dtype=np.float32))
    t = fit_transform(float(xt.norm(dim=1).max()))
    return torch.nn.functional.normalize(t.facts(xt), dim=1).numpy()


def compare(name: str, x: np.ndarray, k: int, iters: int, seed: int) -> dict:
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731
    out = {"n": int(x.shape[0]), "d": int(x.shape[1]), "k": k, "iters": iters}
    for who, fn in [("faiss", run_faiss), ("hmn_ray_2actors", run_ray), ("hmn_torch", run_torch)]:
        out[who] = fn(x, k, iters, seed)
        log(f"{name} {who}: {out[who]}  (load {os.getloadavg()})")
    f, r = out["faiss"], out["hmn_ray_2actors"]
    out["time_ratio_vs_faiss"] = r["seconds_per_iter"] / f["seconds_per_iter"]
    out["objective_gap"] = (f["objective"] - r["objective"]) / abs(f["objective"])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--sq-k", type=int, default=256)
    ap.add_argument("--sq-iters", type=int, default=20)
    ap.add_argument("--run-dir", default="runs/sq32k")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/out/kmeans.json")
    args = ap.parse_args(argv)
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    loads = [os.getloadavg()]
    results = {}
    try:
        results["sq32k"] = compare("sq32k", sq32k_rows(args.run_dir), args.sq_k, args.sq_iters,
                                   args.seed)
        loads.append(os.getloadavg())
        key = "synthetic_1m" if args.n == 1_000_000 else f"synthetic_{args.n}"
        results[key] = compare(key, synthetic(args.n), args.k, args.iters, args.seed)
        loads.append(os.getloadavg())
    finally:
        ray.shutdown()
    results["load_avg_1_5_15"] = loads
    results["peak_rss_gb_driver"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps({k: {"time_ratio_vs_faiss": v["time_ratio_vs_faiss"],
                          "objective_gap": v["objective_gap"]}
                      for k, v in results.items() if isinstance(v, dict)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
