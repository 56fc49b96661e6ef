"""Recall@10 against exact MIPS versus facts touched per query, for every K-MIPS reader.

    .venv/bin/python benchmarks/readers.py [--run-dir runs/sq32k] [--out benchmarks/out]

Memory: ``<run-dir>/memory/facts.npy`` when it exists, else built from scratch from
../shared/data/simplequestions/kb.txt (TransE with a short schedule, then
``hmn.memory.build_fact_vectors``; cached under /tmp).  Queries: the trained encoder of
``<run-dir>/train/model.pt`` on questions_dev.txt when present, else held-out noisy fact vectors.

Readers: clustered (flat and hierarchical, Top-K; plus Sample-K / Rand-block settings), pca-tree,
wta-hash and faiss IndexIVFFlat (inner product).  Also measures the leaf-size imbalance of the
cluster index for several (U, m) of the eq. 6-7 transform.  Writes ``readers.json`` and
``recall_vs_touched.png``; the last line printed is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
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
from hmn.memory import FactMemory, build_fact_vectors  # noqa: E402
from hmn.readers import ExactReader, make_reader, recall_at_k  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "simplequestions"


def parse_kb(path: Path):
    """(subject, relation, object offsets, object values, num entities, num relations, triples)."""
    subj, rel, objs = [], [], []
    for line in open(path, encoding="utf-8"):
        f = line.rstrip("\n").split("\t")
        if len(f) != 3:
            continue
        subj.append(f[0])
        rel.append(f[1])
        objs.append(f[2].split())
    ents = {k: i for i, k in enumerate(sorted(set(subj) | {o for os_ in objs for o in os_}))}
    rels = {k: i for i, k in enumerate(sorted(set(rel)))}
    s = np.array([ents[k] for k in subj])
    r = np.array([rels[k] for k in rel])
    lengths = np.array([len(o) for o in objs])
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    values = np.array([ents[o] for os_ in objs for o in os_])
    triples = np.stack([np.repeat(s, lengths), np.repeat(r, lengths), values], axis=1)
    return s, r, offsets, values, len(ents), len(rels), triples


def sq32k_memory(run_dir: str | None, epochs: int = 20, log=print) -> tuple[np.ndarray, str]:
    """The SQ-32k fact matrix (N, 600) and where it came from."""
    if run_dir and (Path(run_dir) / "memory" / "facts.npy").exists():
        return np.load(Path(run_dir) / "memory" / "facts.npy"), f"{run_dir}/memory/facts.npy"
    cache = Path(f"/tmp/hmn_bench_sq32k_facts_e{epochs}.npy")
    if cache.exists():
        return np.load(cache), f"from scratch (cached {cache})"
    from hmn.transe import TransEParams, train_transe

    t0 = time.perf_counter()
    s, r, offsets, values, ne, nr, triples = parse_kb(DATA / "kb.txt")
    params = TransEParams(dim=200, epochs=epochs, margin=4.0, lr=0.003, batch_size=1024)
    res = train_transe(triples, ne, nr, params)
    m = build_fact_vectors(res.entities, res.relations, s, r, offsets, values)
    np.save(cache, m)
    log(f"built SQ-32k memory from kb.txt: TransE {epochs} epochs, {time.perf_counter() - t0:.0f}s")
    return m, f"from scratch (kb.txt + TransE {epochs} epochs)"


def dev_queries(run_dir: str | None, memory: np.ndarray, n_noise: int = 2000, seed: int = 0):
    """Query vectors (B, D) and their source."""
    if run_dir and (Path(run_dir) / "train" / "model.pt").exists():
        from hmn.training import iterate_batches
        from pipeline.artifacts import load_model

        model, vocab, _ = load_model(Path(run_dir) / "train")
        texts = [ln.rstrip("\n").split("\t")[-1] for ln in open(DATA / "questions_dev.txt")]
        tokens, _ = vocab.encode_many(texts)
        out = []
        dummy = np.zeros(len(tokens), dtype=np.int64)
        with torch.no_grad():
            for tok, off, _ in iterate_batches(tokens, dummy, 1024, shuffle=False):
                out.append(model(tok, off))
        return torch.cat(out), f"encoder of {run_dir}/train/model.pt on questions_dev.txt"
    rng = np.random.default_rng(seed)
    idx = rng.choice(memory.shape[0], size=n_noise, replace=False)
    x = memory[idx]
    noise = rng.standard_normal(x.shape).astype(np.float32) * x.std() * 0.5
    return torch.from_numpy(x + noise), "held-out noisy fact vectors (sigma = 0.5 std)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--run-dir", default="runs/sq32k")
    ap.add_argument("--out", default="benchmarks/out")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--transe-epochs", type=int, default=20)
    ap.add_argument("--max-queries", type=int, default=2000)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    log = lambda *a: print(*a, file=sys.stderr, flush=True)  # noqa: E731

    x, source = sq32k_memory(args.run_dir, args.transe_epochs, log)
    mem = FactMemory(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
    q, qsource = dev_queries(args.run_dir, x)
    q = q[: args.max_queries]
    n = mem.n
    budget = 0.02 * n
    log(f"memory {tuple(x.shape)} ({source}); {q.shape[0]} queries ({qsource}); 2% = {budget:.0f}")
    exact = ExactReader(mem).search(q, 10)

    results: list[dict] = []

    def run(family: str, label: str, reader, gen_seed: int | None = None) -> None:
        t0 = time.perf_counter()
        g = torch.Generator().manual_seed(gen_seed) if gen_seed is not None else None
        c = reader.search(q, 10, generator=g)
        rec = recall_at_k(c, exact, 10)
        touched = float(c.touched.double().mean())
        results.append({"family": family, "setting": label, "recall10": rec,
                        "touched": touched, "touched_frac": touched / n,
                        "search_seconds": time.perf_counter() - t0})
        log(f"{family:22s} {label:34s} recall@10={rec:.3f} touched={touched:8.0f} "
            f"({100 * touched / n:.2f}%)")

    # Leaf balance of the eq. 6-7 transform on real data.
    balance = []
    for U, m in [(0.75, 3), (0.9, 3), (0.99, 5)]:
        t0 = time.perf_counter()
        idx = build_index_from_vectors(mem.vectors, branching=[256], U=U, m=m, seed=0, iters=15)
        sizes = idx.leaf_sizes()
        balance.append({"U": U, "m": m, "leaves": 256, "max_leaf": int(sizes.max()),
                        "max_leaf_frac": float(sizes.max() / n),
                        "imbalance": imbalance_factor(sizes),
                        "seconds": time.perf_counter() - t0})
        log(f"balance U={U} m={m}: max leaf {sizes.max()} ({100 * sizes.max() / n:.1f}%), "
            f"imbalance {imbalance_factor(sizes):.2f}")
        for t in (1, 2, 4, 8):
            run(f"clustered-flat256-U{U}-m{m}", f"top={t}",
                make_reader("clustered", mem, idx, top_clusters=t))

    for C in (128, 512):
        idx = build_index_from_vectors(mem.vectors, branching=[C], seed=0, iters=15)
        for t in (1, 2, 4, 8, 16):
            run(f"clustered-flat{C}", f"top={t}", make_reader("clustered", mem, idx, top_clusters=t))
        if C == 512:
            flat512 = idx
    hier = build_index_from_vectors(mem.vectors, branching=[32, 16], seed=0, iters=15)
    for t in (2, 4, 8, 16):
        run("clustered-hier32x16", f"top={t}", make_reader("clustered", mem, hier, top_clusters=t))
    for label, kw in [("top=4,sample=4", dict(top_clusters=4, sample_clusters=4)),
                      ("top=4,rand_blocks=2", dict(top_clusters=4, rand_blocks=2)),
                      ("top=2,sample=2,rand=1", dict(top_clusters=2, sample_clusters=2,
                                                     rand_blocks=1))]:
        run("clustered-flat512-bias", label, make_reader("clustered", mem, flat512, **kw), 0)

    for depth in (6, 9):
        for probes in (1, 2, 4, 8):
            run(f"pca-tree-d{depth}", f"probes={probes}",
                make_reader("pca-tree", mem, depth=depth, probes=probes))
    for perms in (3, 4):
        for bands in (4, 16, 64):
            run(f"wta-hash-K{perms}", f"bands={bands}",
                make_reader("wta-hash", mem, bands=bands, perms=perms, window=8))
    for nlist in (128, 512):
        for nprobe in (1, 2, 4, 8, 16):
            run(f"faiss-ivf-{nlist}", f"nprobe={nprobe}",
                make_reader("faiss-ivf", mem, nlist=nlist, nprobe=nprobe))

    def best_at(prefix: str) -> float:
        ok = [r["recall10"] for r in results
              if r["family"].startswith(prefix) and r["touched"] <= budget]
        return max(ok) if ok else 0.0

    summary = {
        "memory": source, "queries": qsource, "n": n, "num_queries": int(q.shape[0]),
        "clustered_recall10_at_2pct": best_at("clustered-flat"),
        "clustered_hier_recall10_at_2pct": best_at("clustered-hier"),
        "pca_tree_recall10_at_2pct": best_at("pca-tree"),
        "wta_hash_recall10_at_2pct": best_at("wta-hash"),
        "faiss_ivf_recall10_at_2pct": best_at("faiss-ivf"),
        "leaf_balance": balance,
    }
    with open(os.path.join(args.out, "readers.json"), "w") as f:
        json.dump({"summary": summary, "results": results}, f, indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 5.5))
        for fam in dict.fromkeys(r["family"] for r in results):
            rs = sorted((r for r in results if r["family"] == fam), key=lambda r: r["touched"])
            ax.plot([100 * r["touched_frac"] for r in rs], [r["recall10"] for r in rs], "o-",
                    label=fam, ms=3)
        ax.axvline(2.0, color="grey", ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("facts touched per query (% of memory)")
        ax.set_ylabel("recall@10 vs exact MIPS")
        ax.set_title(f"SQ-32k memory ({n} facts), {q.shape[0]} queries")
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "recall_vs_touched.png"), dpi=120)
    except ImportError:
        log("matplotlib not installed: no plot")
    print(json.dumps({k: v for k, v in summary.items() if k != "leaf_balance"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
