"""Memory stage: the fact memory and its hierarchical index.

Fact vectors are [E[s]; R[r]; mean E[objects]] (section 4 of the paper). Two layouts:

- dense: the (N, D) float32 matrix as a memory-mappable ``facts.npy`` (SimpleQuestions sizes),
  built in place in the file and read back through a read-only memory map (`write_dense_memory`):
  the driver never holds the matrix in its heap, and the shard actors on the driver's node map
  the same file (`pipeline.kmeans_ray`), so the page cache holds the one copy (1m facts: 2.4 GB);
- factorised: the entity, relation and fact tables as ``factorised/*.npy``; rows are gathered on
  demand (FB2M: 2 GB of tables instead of a 26 GB matrix). ``memory.layout=auto`` picks
  factorised above ``memory.dense_limit_gb``.

The index is the MIPS-to-cosine transform (eq. 6-8) plus spherical k-means, flat or hierarchical,
run over Ray actors that each hold a shard of the memory (dense rows, or a slice of the fact table
with the shared entity and relation tables), fitted on a sample when ``memory.fit_sample`` is set.
With ``memory.use_gpu`` the actors compute on GPUs (``pipeline.kmeans_ray``). Each k-means run
and assignment pass shows its progress with rate and ETA (`IndexProgress`, `pipeline.progress`).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from hmn.config import MemoryConfig
from hmn.index import IndexSpec
from hmn.memory import FactorisedMemory, build_fact_vectors
from pipeline.artifacts import KnowledgeBase, load_array, read_vectors, write_factorised
from pipeline.kmeans_ray import build_index_on_ray
from pipeline.progress import Progress

log = logging.getLogger(__name__)


def choose_layout(cfg: MemoryConfig, n: int, dim: int) -> str:
    if cfg.layout != "auto":
        return cfg.layout
    return "factorised" if n * dim * 4 > cfg.dense_limit_gb * 1e9 else "dense"


def shard_placement(cfg: MemoryConfig) -> dict:
    """`build_index_on_ray`'s resources and device for the shard actors: 1 CPU each, plus
    ``memory.gpus_per_shard`` GPUs and CUDA with ``memory.use_gpu`` (the default is the CPU)."""
    if not cfg.use_gpu:
        return {}
    return {"actor_options": {"num_cpus": 1, "num_gpus": cfg.gpus_per_shard}, "device": "cuda"}


class IndexProgress:
    """`build_index_on_ray`'s progress callback, shown through `pipeline.progress`: each
    k-means run (a level, a leaf-split round) counts its iterations out of ``memory.iters`` (an
    upper bound: k-means stops early at ``memory.tol``, so its ETA is one too) with the
    objective; each assignment pass counts facts. Each logs a closing line with its time."""

    def __init__(self, iters: int, levels: int, **progress_kw) -> None:
        self.iters, self.levels, self.kw = iters, levels, progress_kw
        self.key: tuple | None = None
        self.bar: Progress | None = None

    def _name(self, level: int) -> str:
        return "leaf split" if level >= self.levels else f"level {level}"

    def _start(self, key: tuple, what: str, total: int, unit: str, elapsed: float = 0.0) -> None:
        self.close()
        self.key = key
        self.bar = Progress(what, total, unit=unit, final=True, log=log, elapsed=elapsed, **self.kw)

    def __call__(self, stat: dict) -> None:
        level = int(stat.get("level", 0))
        if "assign_total" in stat:
            if self.key != ("assign", level):
                self._start(("assign", level), f"index {self._name(level)}: assignment pass",
                            stat["assign_total"], "facts")
            self.bar.update(stat["assign_done"] - self.bar.done)
        elif "iteration" in stat:
            if self.key != ("kmeans", level) or stat["iteration"] == 0:
                self._start(("kmeans", level), f"index {self._name(level)}: k-means", self.iters,
                            "iterations", elapsed=stat.get("seconds", 0.0))  # its 1st iteration
            self.bar.update(1, postfix=f"objective {stat['objective']:.6g}, "
                                       f"imbalance {stat['imbalance']:.2f}")
        elif "split_round" in stat:
            self.close()
            log.info("index leaf split round %s: %s", stat["split_round"],
                     {k: (round(v, 3) if isinstance(v, float) else v) for k, v in stat.items()
                      if k not in ("split_round", "level", "parent")})

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.key = self.bar = None


def write_dense_memory(path: Path, ent: np.ndarray, rel: np.ndarray, kb: KnowledgeBase,
                       chunk: int = 1 << 14) -> tuple[np.ndarray, float, float]:
    """Build the (N, 3d) fact matrix straight into the ``.npy`` file ``path`` (the bytes
    ``np.save`` would write) and return (a read-only memory map of it, max norm, mean norm).

    The matrix is never in this process's heap: it is written through a writable memory map and
    its norms are taken ``chunk`` rows at a time (``np.linalg.norm`` of the whole matrix would
    allocate a squared copy of it); pages of the file are shared with every process that maps
    it (the shard actors) and count once in the stage's PSS. ``chunk`` bounds the temporaries
    (about 7 KB a fact for d = 200: 110 MB at the default); the values do not depend on it."""
    n, dim = kb.num_facts, 3 * ent.shape[1]
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    try:
        build_fact_vectors(ent, rel, kb.fact_subject, kb.fact_relation, kb.object_offsets,
                           kb.object_values, chunk=chunk, out=out)  # (N, 3d), in the file
        out.flush()
    finally:
        del out
    vectors = load_array(path, mmap_mode="r")  # (N, 3d) read-only
    norms = np.empty(n, dtype=np.float32)  # (N,) per-row norms, as np.linalg.norm(axis=1)
    for s in range(0, n, chunk):
        norms[s : s + chunk] = np.linalg.norm(vectors[s : s + chunk], axis=1)
    return vectors, float(norms.max()), float(norms.mean())


def _norms(mem: FactorisedMemory, chunk: int = 1 << 18) -> tuple[float, float]:
    """(max, mean) fact-vector norm, gathered chunk by chunk."""
    mx, total = 0.0, 0.0
    for s in range(0, mem.n, chunk):
        nrm = torch.linalg.vector_norm(mem.rows_between(s, s + chunk), dim=1)
        mx, total = max(mx, float(nrm.max())), total + float(nrm.sum(dtype=torch.float64))
    return mx, total / mem.n


def run_memory(
    cfg: MemoryConfig, ingest_dir: Path, embed_dir: Path, embed_fingerprint: str, out: Path
) -> dict:
    kb = KnowledgeBase.load(ingest_dir, text=False)  # ids only
    ent_path, rel_path = embed_dir / "entities.parquet", embed_dir / "relations.parquet"
    n, dim = kb.num_facts, 3 * pq.read_schema(ent_path).field("vector").type.list_size
    leaves = int(np.prod(cfg.branching))
    if leaves > n:
        raise ValueError(
            f"memory.branching={cfg.branching}: {leaves} leaf clusters for only {n} facts"
        )
    layout = choose_layout(cfg, n, dim)
    if layout == "dense":
        ent, rel = read_vectors(ent_path), read_vectors(rel_path)
        # (N, 3d) read-only memory map of facts.npy: the actors on this node map the same file
        data, norm_max, norm_mean = write_dense_memory(out / "facts.npy", ent, rel, kb)
        del ent, rel  # only the factorised layout keeps the tables
        # read_vectors' arrays were Arrow buffers: hand their pool's freed pages back now
        pa.default_memory_pool().release_unused()
    else:
        write_factorised(out / "factorised", ent_path, rel_path, kb)  # streamed, not loaded
        # The tables from their .npy files, mapped read-only: the shard actors on this node map
        # the same files (pipeline.kmeans_ray.table_file), so the page cache holds the one copy
        # of the entity table (3.5 GB at the 10m scaling memory) instead of the driver's heap
        # and the object store holding one each.
        ent, rel = (load_array(out / "factorised" / f"{name}.npy", mmap_mode="r")
                    for name in ("entity_emb", "relation_emb"))
        with warnings.catch_warnings():  # read-only maps: nothing writes to the tables
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            data = FactorisedMemory(ent, rel, kb.fact_subject, kb.fact_relation,
                                    kb.object_offsets, kb.object_values)
        norm_max, norm_mean = _norms(data)
        log.info("factorised memory: %d facts x %d, %.2f GB of tables (dense would be %.1f GB)",
                 n, dim, data.nbytes() / 1e9, n * dim * 4 / 1e9)
    del kb

    progress = IndexProgress(cfg.iters, len(cfg.branching))
    try:
        index = build_index_on_ray(data, IndexSpec.from_config(cfg), num_shards=cfg.num_shards,
                                   progress=progress, **shard_placement(cfg))
    finally:
        progress.close()
    index.stats["embeddings_fingerprint"] = embed_fingerprint
    index.save(str(out / "index"))
    sizes = index.leaf_sizes()
    return {
        "facts": int(n), "dim": int(dim), "layout": layout,
        "embeddings_fingerprint": embed_fingerprint,
        "leaves": int(index.num_leaves), "leaf_size_mean": float(sizes.mean()),
        "leaf_size_max": int(sizes.max()), "leaf_size_min": int(sizes.min()),
        "fact_norm_max": norm_max, "fact_norm_mean": norm_mean,
        "index": index.stats,
    }
