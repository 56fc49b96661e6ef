"""Memory stage: the fact matrix and its hierarchical index.

Fact vectors are [E[s]; R[r]; mean E[objects]] (section 4 of the paper), written as a
memory-mappable ``facts.npy``. The index is the MIPS-to-cosine transform (eq. 6-8) plus spherical
k-means, flat or hierarchical, run over Ray actors that each hold a shard of the memory.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from hmn.config import MemoryConfig
from hmn.memory import build_fact_vectors
from pipeline.artifacts import KnowledgeBase, read_vectors
from pipeline.kmeans_ray import build_index_on_ray

log = logging.getLogger(__name__)


def run_memory(cfg: MemoryConfig, ingest_dir: Path, embed_dir: Path, embed_fingerprint: str, out: Path) -> dict:
    kb = KnowledgeBase.load(ingest_dir)
    ent = read_vectors(embed_dir / "entities.parquet")
    rel = read_vectors(embed_dir / "relations.parquet")
    vectors = build_fact_vectors(ent, rel, kb.fact_subject, kb.fact_relation, kb.object_offsets,
                                 kb.object_values)  # (N, 3d)
    np.save(out / "facts.npy", vectors)
    n = vectors.shape[0]
    leaves = int(np.prod(cfg.branching))
    if leaves > n:
        raise ValueError(f"memory.branching={cfg.branching}: {leaves} leaf clusters for only {n} facts")

    def progress(s: dict) -> None:
        log.info("k-means %s", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()})

    index = build_index_on_ray(vectors, num_shards=cfg.num_shards, branching=list(cfg.branching), U=cfg.U,
                               m=cfg.m, iters=cfg.iters, tol=cfg.tol, seed=cfg.seed, init=cfg.init,
                               progress=progress, batched_levels=cfg.batched_levels)
    index.stats["embeddings_fingerprint"] = embed_fingerprint
    index.save(str(out / "index"))
    sizes = index.leaf_sizes()
    norms = np.linalg.norm(vectors, axis=1)
    return {
        "facts": int(n), "dim": int(vectors.shape[1]), "embeddings_fingerprint": embed_fingerprint,
        "leaves": int(index.num_leaves), "leaf_size_mean": float(sizes.mean()),
        "leaf_size_max": int(sizes.max()), "leaf_size_min": int(sizes.min()),
        "fact_norm_max": float(norms.max()), "fact_norm_mean": float(norms.mean()),
        "index": index.stats,
    }
