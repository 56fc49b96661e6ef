"""Spherical k-means: hmn against ``faiss.Kmeans(spherical=True)``, like for like.

    .venv/bin/python benchmarks/kmeans.py            # full size: SQ-32k (k=256) and 1M x 600 (k=1000)
    .venv/bin/python benchmarks/kmeans.py --smoke    # a small version (seconds): not a figure

What both methods share, per data set:

* the rows: unit rows, float32, in this process;
* the initial centroids C0: hmn's k-means++ (``hmn.kmeans.INITS["kmeans++"]`` on the sample
  ``spherical_kmeans`` draws, seeded by ``--seed``).  Ours computes it inside
  ``spherical_kmeans``; faiss gets it through ``faiss.Kmeans.train(x, init_centroids=C0)``, from
  the same function run in faiss's round.  That ours started from C0 too is checked on every
  round (``init_check``: ours' first objective equals J(C0), to ~1e-8 where ours' passes are
  pruned: they sum c_j . (the sum of its rows), ``final_objective`` the cosines);
* the iterations (``tol=0``, so ours never stops early; faiss ``niter``) and the threads
  (``torch.set_num_threads`` and ``faiss.omp_set_num_threads``);
* the outputs: the centroids and the assignment of every row under them.  Ours returns both
  (``spherical_kmeans`` ends with an assignment pass); faiss's index holds the final centroids
  after ``train``, and ``km.index.search(x, 1)`` assigns the rows;
* faiss trains on every row (``max_points_per_centroid`` >= n / k: no subsampling).

Ours (``--ours``): ``torch`` (default) is ``InMemoryData``'s pruned passes (``bounds=True``: a
row whose bounds prove that its centroid has not changed skips the matmul, and only rows that
change centroid move the sums; every pass's fraction of skipped rows is in the round's
``skipped_fraction``, the first iteration's is 0), ``torch-plain``
the unpruned passes (``bounds=False``: one matmul over all rows per pass), ``ray-AxT[-bf16]`` the
memory stage's shard actors (pruned in float32).

Total time: ours = ``spherical_kmeans`` (k-means++ init + iterations + final assignment);
faiss = the k-means++ init (timed in faiss's round) + ``train`` + ``index.search``.  faiss's
``train`` alone is reported too (``train_seconds``).

Objective: J = sum_i max_j cos(x_i, c_j) of each method's *final* centroids, computed by one
function for both (``final_objective``: float32 cosines, float64 sum);
``objective_gap = (J_faiss - J_ours) / J_faiss`` (negative: ours is higher).

Rounds are interleaved (ours, faiss, ours, faiss, ... ``--repeats`` of each), because the
machine may be shared: ``total_time_ratio_vs_faiss_*`` is the median over rounds of
ours' total / faiss's total of the same round; ``..._min`` the fastest round of each;
``cpu_time_ratio_vs_faiss`` the same median of CPU seconds (ours in-process only).  Every
round's times, CPU seconds and load averages are in the JSON, with the arguments.

Data: ``sq32k`` are the SQ-32k facts of a pipeline run (``<run-dir>/memory/facts.npy``, first of
``--run-dir`` that exists) after the run's eq. 6-7 transform (its ``memory.U`` and ``memory.m``),
unit-normalised: the rows the index build clusters.  Without such a run it builds one
(``pipeline.run --config configs/sq32k.yaml --stages ingest,embed,memory``; the embed stage's
TransE takes a while).  ``1m`` is n x 600 synthetic rows (2000 Gaussian blobs, unit rows).

Last line printed: the JSON written to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hmn.kmeans import INITS, InMemoryData, spherical_kmeans  # noqa: E402
from hmn.mips import fit_transform  # noqa: E402

logger = logging.getLogger("bench.kmeans")

DEFAULT_RUN_DIRS = ("runs/sq32k", "runs/sq-scaling/experiments/scaling/29k")
SMOKE = {"n": 20_000, "k": 100, "iters": 3, "sq_iters": 5, "repeats": 2}


def init_sample(k: int) -> int:
    """Rows ``spherical_kmeans`` samples for k-means++ by default."""
    return max(16 * int(k), 1024)


def initial_centroids(x: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, float]:
    """(C, d) float32 k-means++ centroids exactly as ``spherical_kmeans(seed=seed)`` starts from
    them, and the seconds they took."""
    t0 = time.perf_counter()
    c0 = INITS["kmeans++"](InMemoryData(torch.from_numpy(x)), int(k),
                           np.random.default_rng(seed), init_sample(k))
    return np.ascontiguousarray(c0.numpy(), dtype=np.float32), time.perf_counter() - t0


def final_objective(x: np.ndarray, c: np.ndarray) -> float:
    """J = sum_i max_j cos(x_i, c_j) for unit rows x: float32 cosines, float64 sum (an unpruned
    pass; a pruned one sums c_j . (sum of its rows), within ~1e-8 of it)."""
    c = np.ascontiguousarray(c, dtype=np.float32)
    data = InMemoryData(torch.from_numpy(x), bounds=False)
    return float(data.partial_stats(torch.from_numpy(c))[2])


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    return time.perf_counter() - start[0], time.process_time() - start[1]


def run_ours(x: np.ndarray, k: int, iters: int, seed: int, threads: int,
             bounds: bool = True) -> dict:
    """hmn's ``spherical_kmeans`` in this process: init + ``iters`` iterations + assignment,
    with pruned passes (``bounds``) or without."""
    torch.set_num_threads(threads)
    data = InMemoryData(torch.from_numpy(x), bounds=bounds)
    start = _clock()
    res = spherical_kmeans(data, k, iters=iters, tol=0.0, seed=seed)
    wall, cpu = _since(start)
    return {"total_seconds": wall, "cpu_seconds": cpu, "threads": torch.get_num_threads(),
            "bounds": bounds,
            # per pass (iterations, then the final assignment), fractions of the rows: those
            # that skipped the matmul, those whose bounds proved their centroid (a chunk where
            # most rows need it runs its whole matmul), those that changed centroid
            "skipped_fraction": [p["skipped_fraction"] for p in data.pass_stats],
            "proved_fraction": [p["proved_rows"] / p["rows"] for p in data.pass_stats],
            "moved_fraction": [p["moved_rows"] / p["rows"] for p in data.pass_stats],
            "iteration_seconds": [s["seconds"] for s in res.stats],
            "objective_trace": [s["objective"] for s in res.stats],
            "iterations": len(res.stats), "centroids": res.centroids.numpy(),
            "assignments": res.assignments}


def run_ours_ray(x: np.ndarray, k: int, iters: int, seed: int, actors: int, cpus: int,
                 precision: str = "float32") -> dict:
    """hmn's loop over ``actors`` Ray shard actors of ``cpus`` CPUs each (the memory stage's
    adapter); the actors are started before the clock (``actor_setup_seconds``)."""
    import ray

    from pipeline.kmeans_ray import RayShardedDataFactory, ShardActor

    remote = ray.remote(ShardActor).options(num_cpus=cpus)
    bounds = np.linspace(0, x.shape[0], actors + 1).astype(int)
    t_setup = time.perf_counter()
    handles = [remote.remote(ray.put(x[bounds[s]:bounds[s + 1]]), int(bounds[s]), threads=cpus)
               for s in range(actors)]
    ray.get([a.num_threads.remote() for a in handles])
    setup = time.perf_counter() - t_setup
    try:
        factory = RayShardedDataFactory(handles, bounds[:-1], x.shape[0], x.shape[1])
        data = factory(None, None, precision=precision)  # rows as given (already unit)
        start = _clock()
        res = spherical_kmeans(data, k, iters=iters, tol=0.0, seed=seed)
        wall, cpu = _since(start)
        data.close()
    finally:
        for a in handles:
            ray.kill(a)
    return {"total_seconds": wall, "cpu_seconds_driver": cpu, "actor_setup_seconds": setup,
            "actors": actors, "cpus_per_actor": cpus, "precision": precision,
            "iteration_seconds": [s["seconds"] for s in res.stats],
            "objective_trace": [s["objective"] for s in res.stats],
            "iterations": len(res.stats), "centroids": res.centroids.numpy(),
            "assignments": res.assignments}


def faiss_kmeans(d: int, k: int, iters: int, seed: int, n: int):
    """``faiss.Kmeans(spherical=True)`` set to train on all n rows."""
    try:
        import faiss
    except ImportError as err:  # faiss-cpu is the project's `cpu` extra
        raise SystemExit("benchmarks/kmeans.py needs faiss: pip install -e '.[cpu]'") from err
    return faiss.Kmeans(d, k, niter=iters, spherical=True, seed=seed, verbose=False,
                        max_points_per_centroid=max(256, -(-n // k)))


def run_faiss(x: np.ndarray, k: int, iters: int, seed: int, threads: int) -> dict:
    """hmn's k-means++ init (timed) + ``faiss.Kmeans.train(x, init_centroids=C0)`` +
    ``index.search(x, 1)`` (the assignment under the final centroids)."""
    import faiss

    torch.set_num_threads(threads)  # the init runs in torch, as in ours
    faiss.omp_set_num_threads(threads)
    start = _clock()
    c0, init_seconds = initial_centroids(x, k, seed)
    km = faiss_kmeans(x.shape[1], k, iters, seed, x.shape[0])
    t_train = time.perf_counter()
    km.train(x, init_centroids=c0)
    train_seconds = time.perf_counter() - t_train
    t_assign = time.perf_counter()
    _, assign = km.index.search(x, 1)  # the index holds the final centroids after train
    assign_seconds = time.perf_counter() - t_assign
    wall, cpu = _since(start)
    cum = [float(s["time"]) for s in km.iteration_stats]  # cumulative seconds per iteration
    return {"total_seconds": wall, "cpu_seconds": cpu, "threads": faiss.omp_get_max_threads(),
            "init_seconds": init_seconds, "train_seconds": train_seconds,
            "assign_seconds": assign_seconds,
            "iteration_seconds": np.diff([0.0, *cum]).tolist(),
            "objective_trace": [float(s["obj"]) for s in km.iteration_stats],
            "iterations": len(km.iteration_stats), "centroids": np.asarray(km.centroids),
            "assignments": assign.ravel(), "c0": c0}


def _summary(name: str, r: dict, x: np.ndarray, j0: float | None) -> dict:
    """A round's record for the JSON: times and objectives, no arrays."""
    out = {k: v for k, v in r.items() if k not in ("centroids", "assignments", "c0")}
    out["final_objective"] = final_objective(x, r["centroids"])
    if j0 is not None and r["objective_trace"]:  # J(C0) = the first iteration's objective
        out["init_check"] = {"j_c0": j0, "first_objective": r["objective_trace"][0],
                             "rel_diff": abs(r["objective_trace"][0] - j0) / abs(j0)}
    out["load_avg"] = list(os.getloadavg())
    logger.info("%s: total %.2fs, final objective %.2f", name, out["total_seconds"],
                out["final_objective"])
    return out


def compare(x: np.ndarray, k: int, iters: int, seed: int, threads: int, repeats: int,
            ours: str) -> dict:
    """Interleaved rounds of ``ours`` (``torch``, ``torch-plain`` or ``ray-AxT[-bf16]``) and
    faiss on ``x``."""
    c0, _ = initial_centroids(x, k, seed)
    j0 = final_objective(x, c0)
    rounds: dict[str, list[dict]] = {"ours": [], "faiss": []}
    for _ in range(repeats):
        if ours in ("torch", "torch-plain"):
            r = run_ours(x, k, iters, seed, threads, ours == "torch")
        else:
            spec, _, prec = ours.removeprefix("ray-").partition("-")
            a, t = (int(v) for v in spec.split("x"))
            r = run_ours_ray(x, k, iters, seed, a, t, {"": "float32", "bf16": "bfloat16"}[prec])
        rounds["ours"].append(_summary("ours", r, x, j0))
        f = run_faiss(x, k, iters, seed, threads)
        if not np.array_equal(f["c0"], c0):
            raise RuntimeError("k-means++ init is not deterministic: faiss got other centroids")
        rounds["faiss"].append(_summary("faiss", f, x, j0))
    ratios = [o["total_seconds"] / f["total_seconds"]
              for o, f in zip(rounds["ours"], rounds["faiss"])]
    cpu = [o["cpu_seconds"] / f["cpu_seconds"] for o, f in zip(rounds["ours"], rounds["faiss"])
           if "cpu_seconds" in o and "cpu_seconds" in f]
    j_ours = rounds["ours"][-1]["final_objective"]
    j_faiss = rounds["faiss"][-1]["final_objective"]
    return {
        "n": int(x.shape[0]), "d": int(x.shape[1]), "k": k, "iters": iters, "threads": threads,
        "repeats": repeats, "ours": ours, "init_sample": init_sample(k), "objective_c0": j0,
        "total_time_ratio_vs_faiss": statistics.median(ratios),
        "total_time_ratio_vs_faiss_min": (min(o["total_seconds"] for o in rounds["ours"])
                                          / min(f["total_seconds"] for f in rounds["faiss"])),
        "round_ratios": ratios,
        # CPU seconds (all threads, spin-waits included): steadier than wall time under load
        "cpu_time_ratio_vs_faiss": statistics.median(cpu) if cpu else None,
        "train_only_ratio_vs_faiss": statistics.median(
            (o["total_seconds"] - f["init_seconds"] - f["assign_seconds"]) / f["train_seconds"]
            for o, f in zip(rounds["ours"], rounds["faiss"])),
        # ours' last round, per pass: rows whose bounds spared them the matmul (None: unpruned)
        "skipped_fraction_ours": rounds["ours"][-1].get("skipped_fraction"),
        "objective_ours": j_ours, "objective_faiss": j_faiss,
        "objective_gap": (j_faiss - j_ours) / abs(j_faiss),
        "rounds": rounds,
    }


def synthetic(n: int, d: int = 600, blobs: int = 2000, seed: int = 0) -> np.ndarray:
    """n x d float32 unit rows: a mixture of ``blobs`` Gaussian blobs (noise 1.5)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((blobs, d)).astype(np.float32)
    x = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 100_000):
        e = min(s + 100_000, n)
        lab = rng.integers(0, blobs, e - s)
        x[s:e] = centres[lab] + 1.5 * rng.standard_normal((e - s, d), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def find_or_build_run(run_dirs: list[str]) -> Path:
    """The first run directory with ``memory/facts.npy``; none: build ``runs/sq32k`` up to its
    memory stage with the pipeline (``configs/sq32k.yaml``)."""
    for run_dir in run_dirs:
        if (ROOT / run_dir / "memory" / "facts.npy").exists():
            return ROOT / run_dir
    target = run_dirs[0]
    cmd = [sys.executable, "-m", "pipeline.run", "--config", "configs/sq32k.yaml",
           "--run-dir", target, "--stages", "ingest,embed,memory"]
    logger.info("no SQ-32k memory in %s: building it: %s", run_dirs, " ".join(cmd))
    subprocess.run(cmd, cwd=ROOT, check=True)
    return ROOT / target


def sq32k_rows(run_dir: Path) -> tuple[np.ndarray, dict]:
    """The run's facts after its eq. 6-7 transform, unit rows (what the index build clusters)."""
    import yaml

    memory = yaml.safe_load((run_dir / "config.resolved.yaml").read_text()).get("memory", {})
    U, m = float(memory.get("U", 0.75)), int(memory.get("m", 3))
    xt = torch.from_numpy(np.ascontiguousarray(np.load(run_dir / "memory" / "facts.npy"),
                                               dtype=np.float32))
    t = fit_transform(float(xt.norm(dim=1).max()), U=U, m=m)
    x = torch.nn.functional.normalize(t.facts(xt), dim=1).numpy()
    name = run_dir.relative_to(ROOT) if run_dir.is_relative_to(ROOT) else run_dir  # or absolute
    return np.ascontiguousarray(x), {"run_dir": str(name), "U": U, "m": m}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="synthetic rows (the 1m data set)")
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--sq-k", type=int, default=256)
    ap.add_argument("--sq-iters", type=int, default=20)
    ap.add_argument("--run-dir", nargs="+", default=list(DEFAULT_RUN_DIRS),
                    help="run directories to take the SQ-32k memory from (the first that has it)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds of each method")
    ap.add_argument("--ours", default="torch",
                    help="torch (in-process, pruned passes), torch-plain (in-process, every "
                         "row's matmul) or ray-AxT[-bf16] (A shard actors of T CPUs)")
    ap.add_argument("--datasets", nargs="+", default=["sq32k", "1m"], choices=["sq32k", "1m"])
    ap.add_argument("--smoke", action="store_true",
                    help=f"small sizes {SMOKE} (explicit flags still win); out: kmeans_smoke.json")
    ap.add_argument("--out", default=None,
                    help="default benchmarks/out/kmeans.json (--smoke: kmeans_smoke.json)")
    args = ap.parse_args(argv)
    if args.ours not in ("torch", "torch-plain") and not args.ours.startswith("ray-"):
        ap.error(f"--ours={args.ours!r}: must be torch, torch-plain or ray-AxT[-bf16]")
    given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in (argv or sys.argv[1:])}
    if args.smoke:
        for key, value in SMOKE.items():
            if key not in given:
                setattr(args, key, value)
    out_path = Path(args.out or f"benchmarks/out/kmeans{'_smoke' if args.smoke else ''}.json")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(message)s")
    if args.ours.startswith("ray-"):
        import ray

        os.environ.pop("RAY_ADDRESS", None)
        ray.init(num_cpus=args.threads, include_dashboard=False, log_to_driver=False)
    result: dict = {"args": vars(args), "smoke": args.smoke, "torch": torch.__version__}
    try:
        import faiss

        result["faiss"] = faiss.__version__
    except ImportError:
        pass
    try:
        _run_datasets(args, result)
    finally:
        if args.ours.startswith("ray-"):
            import ray

            ray.shutdown()
    result["load_avg_end"] = list(os.getloadavg())
    out_path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result)
    out_path.write_text(text + "\n")
    print(text, flush=True)
    return 0


def _run_datasets(args: argparse.Namespace, result: dict) -> None:
    if "sq32k" in args.datasets:
        x, source = sq32k_rows(find_or_build_run(args.run_dir))
        sec = compare(x, args.sq_k, args.sq_iters, args.seed, args.threads, args.repeats,
                      args.ours)
        result["sq32k"] = {**source, **sec}
        result["total_time_ratio_vs_faiss_sq32k"] = sec["total_time_ratio_vs_faiss"]
        result["objective_gap_sq32k"] = sec["objective_gap"]
    if "1m" in args.datasets:
        x = synthetic(args.n)
        sec = compare(x, args.k, args.iters, args.seed, args.threads, args.repeats, args.ours)
        result["1m"] = sec
        result["total_time_ratio_vs_faiss_1m"] = sec["total_time_ratio_vs_faiss"]
        result["objective_gap_1m"] = sec["objective_gap"]


if __name__ == "__main__":
    raise SystemExit(main())
