"""Recall@10 against exact MIPS versus facts touched per query, for every K-MIPS reader.

    .venv/bin/python benchmarks/readers.py [--run-dir runs/sq32k] [--model-dir DIR]
                                           [--out benchmarks/out] [--max-queries 0]

Memory: ``<run-dir>/memory/facts.npy`` (read only).  Queries: the trained encoder (``train/model.pt``
+ ``vocab.json``, via ``pipeline.artifacts.load_model``) applied to
../shared/data/simplequestions/questions_dev.txt.  The encoder must have been trained on this
memory: its ``fingerprints["embeddings"]`` must equal ``memory/stats.json``'s
``embeddings_fingerprint``.  Without ``--model-dir`` the first matching model among
``<run-dir>/train`` and ``<run-dir>/experiments/*/*/train`` (exact-reader variants first) is used;
if none matches, the base model is used and the summary says ``queries_match_memory: false``.

Readers (each at several settings, all with k = 10):
* clustered, flat index of C leaves (U = 0.9, m = 3; C = 128 ... 1024), Top-K = 1 ... 32 leaves;
  leaf balance and recall for other (U, m) of the eq. 6-7 transform; Sample-K / Rand-block;
* clustered, hierarchical index [32, 16] with the default beam, with beam = top_clusters (the
  old default) and with the full beam (every parent);
* pca-tree (depth 6 ... 10, probes), wta-hash (K = 3, 4; bands), and faiss IndexIVFFlat with
  inner product (nlist = 128 ... 1024, nprobe = 1 ... 32).

Every setting gives one point (mean facts touched per query, recall@10); the points of one
family (reader + index) form a curve.  ``recall@10 at 2%`` of a curve is interpolated linearly in
log(facts touched) between the two points around 2% of the memory (None if the curve does not
reach 2%; its value at its last point if it ends below 2%).  Writes ``readers.json`` and PNG plots
to ``--out``; the last line printed is a JSON summary with ``clustered_recall10_at_2pct`` and
``faiss_ivf_recall10_at_2pct`` (best flat clustered curve / best faiss curve at 2%).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hmn.index import build_index_from_vectors  # noqa: E402
from hmn.kmeans import imbalance_factor  # noqa: E402
from hmn.memory import FactMemory  # noqa: E402
from hmn.reader_base import Candidates  # noqa: E402
from hmn.readers import ExactReader, make_reader, recall_at_k  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "simplequestions"
BUDGET = 0.02  # fraction of the memory a query may touch in the target


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def sq32k_memory(run_dir: str) -> tuple[np.ndarray, str]:
    """The SQ-32k fact matrix (N, 600) of a pipeline run and its path."""
    path = Path(run_dir) / "memory" / "facts.npy"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the sq32k pipeline first")
    return np.load(path), str(path)


def pick_model(run_dir: Path, model_dir: str | None) -> tuple[Path, bool, str | None]:
    """(train directory, whether its encoder was trained on this memory, memory fingerprint)."""
    stats = run_dir / "memory" / "stats.json"
    mem_fp = json.loads(stats.read_text()).get("embeddings_fingerprint") if stats.exists() else None
    if model_dir:
        cands = [Path(model_dir)]
    else:
        exp = sorted(run_dir.glob("experiments/*/*/train"), key=lambda p: ("exact" not in str(p), p))
        cands = [run_dir / "train", *exp]
    cands = [c for c in cands if (c / "model.pt").exists()]
    if not cands:
        raise FileNotFoundError(f"no train/model.pt under {run_dir} (or --model-dir)")
    for c in cands:
        from pipeline.artifacts import load_torch_file  # tensors and plain data only

        state = load_torch_file(c / "model.pt", "cpu")
        fp = state.get("fingerprints", {}).get("embeddings")
        if mem_fp is not None and fp == mem_fp:
            return c, True, mem_fp
        log(f"{c}/model.pt: embeddings fingerprint {fp} != memory's {mem_fp}")
    return cands[0], False, mem_fp


def dev_queries(train_dir: Path, max_queries: int) -> torch.Tensor:
    """(B, D) encoder outputs h(q) for the dev questions."""
    from hmn.training import iterate_batches
    from pipeline.artifacts import load_model

    model, vocab, _ = load_model(train_dir)
    texts = [ln.rstrip("\n").split("\t")[-1] for ln in open(DATA / "questions_dev.txt")]
    if max_queries > 0:
        texts = texts[:max_queries]
    tokens, _ = vocab.encode_many(texts)
    out = []
    dummy = np.zeros(len(tokens), dtype=np.int64)
    with torch.no_grad():
        for tok, off, _ in iterate_batches(tokens, dummy, 1024, shuffle=False):
            out.append(model(tok, off))
    return torch.cat(out)


def batched_search(reader, q: torch.Tensor, k: int, batch: int,
                   generator: torch.Generator | None = None) -> Candidates:
    """Search in batches: the readers score the union of a batch's candidates, so small batches
    keep the work near the facts actually touched."""
    parts = [reader.search(q[s : s + batch], k, generator=generator)
             for s in range(0, q.shape[0], batch)]
    return Candidates(ids=torch.cat([p.ids for p in parts]),
                      scores=torch.cat([p.scores for p in parts]),
                      touched=torch.cat([p.touched for p in parts]))


def at_fraction(points: list[tuple[float, float]], frac: float) -> float | None:
    """Recall of a curve [(touched fraction, recall)] at ``frac``, linear in log(touched)."""
    pts = sorted(p for p in points if p[0] > 0)
    if not pts or pts[0][0] > frac:
        return None
    if pts[-1][0] <= frac:
        return pts[-1][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= frac <= x1:
            if x1 == x0:
                return max(y0, y1)
            w = (math.log(frac) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + w * (y1 - y0)
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--run-dir", default="runs/sq32k")
    ap.add_argument("--model-dir", default=None, help="train directory of the encoder")
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-queries", type=int, default=0, help="0 = every dev question")
    ap.add_argument("--batch", type=int, default=16, help="queries per reader call")
    ap.add_argument("--iters", type=int, default=20, help="k-means iterations of the indexes")
    ap.add_argument("--grid", choices=["full", "small", "quick"], default="full",
                    help="settings per reader: full; small (fewer leaf counts / nlists, no (U, m) "
                         "or bias variants); quick (smoke run)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        import faiss

        faiss.omp_set_num_threads(args.threads)
    except ImportError:
        pass
    os.makedirs(args.out, exist_ok=True)
    t_start = time.perf_counter()
    loads = [os.getloadavg()]

    run_dir = Path(args.run_dir)
    x, source = sq32k_memory(args.run_dir)
    mem = FactMemory(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
    train_dir, consistent, mem_fp = pick_model(run_dir, args.model_dir)
    q = dev_queries(train_dir, args.max_queries)
    n = mem.n
    log(f"memory {tuple(x.shape)} ({source}); {q.shape[0]} dev queries from {train_dir} "
        f"(trained on this memory: {consistent}); 2% = {BUDGET * n:.0f} facts")
    t0 = time.perf_counter()
    exact = batched_search(ExactReader(mem), q, 10, 1024)
    log(f"exact: {time.perf_counter() - t0:.1f}s")

    results: list[dict] = []

    def run(family: str, label: str, reader, seed: int | None = None, **extra) -> dict:
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        c = batched_search(reader, q, 10, len(q) if family.startswith("faiss") else args.batch, g)
        rec = recall_at_k(c, exact, 10)
        touched = float(c.touched.double().mean())
        r = {"family": family, "setting": label, "recall10": rec, "touched": touched,
             "touched_frac": touched / n, "search_seconds": time.perf_counter() - t0, **extra}
        results.append(r)
        log(f"{family:28s} {label:26s} recall@10={rec:.3f} touched={touched:8.0f} "
            f"({100 * touched / n:.2f}%)")
        return r

    def index(branching: list[int], U: float = 0.9, m: int = 3):
        t0 = time.perf_counter()
        idx = build_index_from_vectors(mem.vectors, branching=branching, U=U, m=m, seed=0,
                                       iters=args.iters)
        sizes = idx.leaf_sizes()
        info = {"branching": branching, "U": U, "m": m,
                "leaves": idx.num_leaves,
                "max_leaf": int(sizes.max()), "max_leaf_frac": float(sizes.max() / n),
                "imbalance": imbalance_factor(sizes), "build_seconds": time.perf_counter() - t0}
        log(f"index {branching} U={U} m={m}: max leaf {sizes.max()} "
            f"({100 * sizes.max() / n:.1f}%), imbalance {info['imbalance']:.2f}, "
            f"{info['build_seconds']:.1f}s")
        return idx, info

    tops = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
    quick = args.grid == "quick"
    small = args.grid != "full"
    stop = 2 * BUDGET if small else 4 * BUDGET  # a curve ends after its first point beyond this
    indexes: list[dict] = []

    # Flat clustered (U = 0.9, m = 3: the sq32k configuration).
    flat = {}
    for C in ((256,) if quick else (256, 512, 1024) if small else (128, 256, 512, 1024)):
        idx, info = index([C])
        indexes.append(info)
        flat[C] = idx
        for t in tops:
            r = run(f"clustered-flat{C}", f"top={t}",
                    make_reader("clustered", mem, idx, top_clusters=t), leaves=C)
            if r["touched_frac"] > stop:
                break
    # Leaf balance and recall of other (U, m) of the transform at C = 256.
    for U, m in ([] if small else [(0.75, 3), (0.99, 5)]):
        idx, info = index([256], U=U, m=m)
        indexes.append(info)
        for t in (1, 2, 4, 8, 16):
            run(f"clustered-flat256-U{U}-m{m}", f"top={t}",
                make_reader("clustered", mem, idx, top_clusters=t))
    # Bias reducers (training-time readers), flat 512 (256 in quick mode).
    cb = 256 if quick else 512
    cb = cb if cb in flat else next(iter(flat))
    bias = [("top=4,sample=4", dict(top_clusters=4, sample_clusters=4)),
            ("top=4,rand_blocks=2", dict(top_clusters=4, rand_blocks=2)),
            ("top=2,sample=2,rand=1", dict(top_clusters=2, sample_clusters=2, rand_blocks=1))]
    for label, kw in ([] if small and not quick else bias):
        run(f"clustered-flat{cb}-bias", label, make_reader("clustered", mem, flat[cb], **kw), 0)

    # Hierarchical [32, 16]: default beam, beam = top as the old default, every parent.
    hier, info = index([32, 16])
    indexes.append(info)
    for t in ((2, 8) if quick else (2, 4, 8, 16, 32) if small else (1, 2, 4, 8, 12, 16, 24, 32)):
        fams = [("clustered-hier32x16", hier, None), ("clustered-hier32x16-beam=top", hier, t),
                ("clustered-hier32x16-beam=all", hier, 32)]
        for fam, idx, beam in fams:
            reader = make_reader("clustered", mem, idx, top_clusters=t, beam=beam)
            r = run(fam, f"top={t}", reader, beam=reader.beam)
        if r["touched_frac"] > stop:
            break

    for depth in ((8,) if small else (6, 8, 10)):
        for probes in (1, 2, 4, 8, 16, 32):
            r = run(f"pca-tree-d{depth}", f"probes={probes}",
                    make_reader("pca-tree", mem, depth=depth, probes=probes))
            if r["touched_frac"] > stop:
                break
    for perms in ((4,) if small else (3, 4)):
        for bands in (4, 16, 64):
            run(f"wta-hash-K{perms}", f"bands={bands}",
                make_reader("wta-hash", mem, bands=bands, perms=perms, window=8))
    for nlist in ((256,) if quick else (256, 512, 1024) if small else (128, 256, 512, 1024)):
        # one build per nlist: the reader's nprobe is set on the faiss index per search
        reader = make_reader("faiss-ivf", mem, nlist=nlist, nprobe=1, niter=args.iters)
        for nprobe in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32):
            if nprobe > nlist:
                break
            reader.set_nprobe(nprobe)
            r = run(f"faiss-ivf-{nlist}", f"nprobe={nprobe}", reader, nlist=nlist)
            if r["touched_frac"] > stop:
                break
    loads.append(os.getloadavg())

    # Curves at 2% of the memory.
    families = list(dict.fromkeys(r["family"] for r in results))
    curves = {}
    for fam in families:
        pts = [(r["touched_frac"], r["recall10"]) for r in results if r["family"] == fam]
        within = [y for xf, y in pts if xf <= BUDGET]
        curves[fam] = {"recall10_at_2pct": at_fraction(pts, BUDGET),
                       "best_measured_recall10_le_2pct": max(within) if within else None,
                       "min_touched_frac": min(p[0] for p in pts),
                       "max_touched_frac": max(p[0] for p in pts)}

    def best(prefix: str, key: str = "recall10_at_2pct", exclude: tuple = ()) -> tuple:
        vals = [(v[key], f) for f, v in curves.items()
                if f.startswith(prefix) and v[key] is not None
                and not any(e in f for e in exclude)]
        return max(vals) if vals else (None, None)

    flat_excl = ("-U", "-bias")
    c2, cfam = best("clustered-flat", exclude=flat_excl)
    f2, ffam = best("faiss-ivf")
    cm, _ = best("clustered-flat", "best_measured_recall10_le_2pct", flat_excl)
    h2, h2fam = best("clustered-hier32x16")
    same_nlist = {C: {"clustered": curves.get(f"clustered-flat{C}", {}).get("recall10_at_2pct"),
                      "faiss_ivf": curves.get(f"faiss-ivf-{C}", {}).get("recall10_at_2pct")}
                  for C in (128, 256, 512, 1024)}
    summary = {
        "memory": source, "n": n, "num_queries": int(q.shape[0]), "model": str(train_dir),
        "queries_match_memory": consistent, "embeddings_fingerprint": mem_fp,
        "clustered_recall10_at_2pct": c2, "clustered_family": cfam,
        "clustered_best_measured_recall10_le_2pct": cm,
        "faiss_ivf_recall10_at_2pct": f2, "faiss_family": ffam,
        "clustered_minus_faiss_at_2pct": None if c2 is None or f2 is None else c2 - f2,
        "clustered_hier_recall10_at_2pct": h2, "clustered_hier_family": h2fam,
        "hier_default_beam_at_2pct": curves.get("clustered-hier32x16", {}).get("recall10_at_2pct"),
        "hier_beam_eq_top_at_2pct": curves.get("clustered-hier32x16-beam=top", {}).get(
            "recall10_at_2pct"),
        "pca_tree_recall10_at_2pct": best("pca-tree")[0],
        "wta_hash_recall10_at_2pct": best("wta-hash")[0],
        "same_nlist_at_2pct": same_nlist,
        "target_clustered_ge_0.9_within_2pct": cm is not None and cm >= 0.9,
        "target_clustered_ge_faiss_at_2pct": None if c2 is None or f2 is None else c2 >= f2,
        "seconds": time.perf_counter() - t_start,
        "load_avg_1_5_15": loads,
    }
    with open(os.path.join(args.out, "readers.json"), "w") as f:
        json.dump({"summary": summary, "curves": curves, "indexes": indexes, "results": results},
                  f, indent=1)
    plot(results, curves, summary, args.out, n, int(q.shape[0]))
    print(json.dumps({k: v for k, v in summary.items() if k != "same_nlist_at_2pct"}))
    return 0


def plot(results: list[dict], curves: dict, summary: dict, out: str, n: int, nq: int) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib not installed: no plots")
        return

    def draw(ax, fams, title):
        for fam in fams:
            rs = sorted((r for r in results if r["family"] == fam), key=lambda r: r["touched"])
            if not rs:
                continue
            style = "s--" if fam.startswith("faiss") else ("D" if "-bias" in fam else "o-")
            ax.plot([100 * r["touched_frac"] for r in rs], [r["recall10"] for r in rs], style,
                    label=fam, ms=3, lw=1)
        ax.axvline(100 * BUDGET, color="grey", ls=":", lw=1)
        ax.axhline(0.9, color="grey", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel("facts touched per query (% of memory, log)")
        ax.set_ylabel("recall@10 vs exact MIPS")
        ax.set_ylim(0, 1.01)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=6, loc="lower right")

    fams = list(curves)
    sub = f"SQ-32k memory ({n} facts), {nq} dev questions through the trained encoder"
    fig, ax = plt.subplots(figsize=(9, 6))
    main_fams = [f for f in fams if not ("-U" in f or "-bias" in f or "beam=" in f)]
    draw(ax, main_fams, f"All readers. {sub}")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "recall_vs_touched.png"), dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    draw(axes[0], [f for f in fams if f.startswith("clustered-flat") and "-U" not in f
                   and "-bias" not in f] + [f for f in fams if f.startswith("faiss")],
         f"Clustered (flat) vs faiss IVF at 2%: {summary['clustered_recall10_at_2pct']:.3f} vs "
         f"{summary['faiss_ivf_recall10_at_2pct']:.3f}"
         if summary["clustered_recall10_at_2pct"] is not None
         and summary["faiss_ivf_recall10_at_2pct"] is not None else "Clustered vs faiss IVF")
    draw(axes[1], [f for f in fams if f.startswith("clustered-hier") or "-U" in f
                   or "-bias" in f] + ["clustered-flat512"],
         "Hierarchical beams, transform (U, m), bias reducers")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "recall_vs_touched_clustered.png"), dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
