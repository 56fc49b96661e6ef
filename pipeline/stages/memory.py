"""Memory stage: the fact memory and its hierarchical index.

Fact vectors are [E[s]; R[r]; mean E[objects]] (section 4 of the paper). Two layouts:

- dense: the (N, D) float32 matrix as a memory-mappable ``facts.npy`` (SimpleQuestions sizes);
- factorised: the entity, relation and fact tables as ``factorised/*.npy``; rows are gathered on
  demand (FB2M: 2 GB of tables instead of a 26 GB matrix). ``memory.layout=auto`` picks
  factorised above ``memory.dense_limit_gb``.

The index is the MIPS-to-cosine transform (eq. 6-8) plus spherical k-means, flat or hierarchical,
run over Ray actors that each hold a shard of the memory (dense rows, or a slice of the fact table
with the shared entity and relation tables), fitted on a sample when ``memory.fit_sample`` is set.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from hmn.config import MemoryConfig
from hmn.index import IndexSpec
from hmn.memory import FactorisedMemory, build_fact_vectors
from pipeline.artifacts import KnowledgeBase, read_vectors, write_factorised
from pipeline.kmeans_ray import build_index_on_ray

log = logging.getLogger(__name__)


def choose_layout(cfg: MemoryConfig, n: int, dim: int) -> str:
    if cfg.layout != "auto":
        return cfg.layout
    return "factorised" if n * dim * 4 > cfg.dense_limit_gb * 1e9 else "dense"


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
    kb = KnowledgeBase.load(ingest_dir)
    ent = read_vectors(embed_dir / "entities.parquet")
    rel = read_vectors(embed_dir / "relations.parquet")
    n, dim = kb.num_facts, 3 * ent.shape[1]
    leaves = int(np.prod(cfg.branching))
    if leaves > n:
        raise ValueError(
            f"memory.branching={cfg.branching}: {leaves} leaf clusters for only {n} facts"
        )
    layout = choose_layout(cfg, n, dim)
    if layout == "dense":
        vectors = build_fact_vectors(ent, rel, kb.fact_subject, kb.fact_relation, kb.object_offsets,
                                     kb.object_values)  # (N, 3d)
        np.save(out / "facts.npy", vectors)
        norms = np.linalg.norm(vectors, axis=1)
        norm_max, norm_mean = float(norms.max()), float(norms.mean())
        data = vectors
    else:
        write_factorised(out / "factorised", ent, rel, kb)
        data = FactorisedMemory(ent, rel, kb.fact_subject, kb.fact_relation, kb.object_offsets,
                                kb.object_values)
        norm_max, norm_mean = _norms(data)
        log.info("factorised memory: %d facts x %d, %.2f GB of tables (dense would be %.1f GB)",
                 n, dim, data.nbytes() / 1e9, n * dim * 4 / 1e9)
    del kb

    def progress(s: dict) -> None:
        log.info("k-means %s",
                 {k: (round(v, 4) if isinstance(v, float) else v) for k, v in s.items()})

    index = build_index_on_ray(data, IndexSpec.from_config(cfg), num_shards=cfg.num_shards,
                               progress=progress)
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
