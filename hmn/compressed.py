"""Compressed scanning of a clustered index's leaves: faiss inverted lists of quantised facts.

At millions of facts a clustered-reader step spends most of its time scoring the facts of the
leaves each question reads: every (question, fact) pair gathers the fact's rows (a factorised
memory: the subject's and the objects' entity rows) at memory speed, about 1.6 us a pair on 2 CPU
cores, and a 10.8M-fact memory has questions read ~15k facts each. :class:`CompressedLeaves`
keeps the facts instead as faiss inverted lists, one per leaf of the index (the index's own
assignment, ``faiss.contrib.ivf_tools.add_preassigned``), of scalar-quantised codes
(``faiss.IndexIVFScalarQuantizer``, inner product, no residual): a question's leaves are scanned
by faiss's SIMD code (``search_preassigned``), sequentially through each list, and the best
``rerank`` facts are re-scored exactly by the caller, so the returned scores stay exact inner
products and only the choice of the top-k can differ from scoring every fact exactly (measured:
benchmarks/train_throughput.py, ``scan_agreement``).

Codes: ``sq8`` (1 byte a dimension: 600 bytes a fact, 6.5 GB at 10.8M facts), ``sq6``, ``sq4``,
``fp16``; each dimension's range is trained on a sample of the facts (faiss's per-dimension
min-max scalar quantiser).
"""

from __future__ import annotations

import logging
import time
import weakref

import numpy as np
import torch

log = logging.getLogger(__name__)

SCANS = ("exact", "sq8", "sq6", "sq4", "fp16")
_QTYPES = {"sq8": "QT_8bit", "sq6": "QT_6bit", "sq4": "QT_4bit", "fp16": "QT_fp16"}
#: the lists built for a (memory, index) pair, shared by every reader over them (the train
#: stage's training and validation readers): {id(index): lists} per memory
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _rows(memory, ids: torch.Tensor) -> np.ndarray:
    """(len(ids), D) float32 fact vectors, on the CPU."""
    rows = memory.gather(ids) if hasattr(memory, "gather") else memory.vectors[ids]
    return np.ascontiguousarray(rows.detach().to("cpu", torch.float32).numpy())


class CompressedLeaves:
    """The facts of ``index``'s leaves as faiss inverted lists of ``scan`` codes (module doc).

    Args:
        memory: a FactMemory or FactorisedMemory (the facts; read once, chunk by chunk).
        fact_leaf: (N,) the leaf of each fact (the index's assignment).
        num_leaves: leaves of the index.
        scan: one of ``sq8``, ``sq6``, ``sq4``, ``fp16``.
        train_sample: facts the quantiser's ranges are trained on (a seeded sample).
        chunk: facts gathered and encoded at a time.
    """

    def __init__(self, memory, fact_leaf: np.ndarray, num_leaves: int, scan: str = "sq8", *,
                 train_sample: int = 200_000, chunk: int = 1 << 16, seed: int = 0) -> None:
        import faiss
        from faiss.contrib.ivf_tools import add_preassigned

        if scan not in _QTYPES:
            raise ValueError(f"scan={scan!r}: must be one of {sorted(_QTYPES)}")
        t0 = time.perf_counter()
        n, d = memory.n, memory.d
        fact_leaf = np.asarray(fact_leaf, dtype=np.int64)
        if fact_leaf.shape != (n,):
            raise ValueError(f"fact_leaf has shape {fact_leaf.shape}, expected ({n},)")
        self.scan, self.d, self.n = scan, d, n
        # a quantizer already holding num_leaves vectors is not trained again: the lists are the
        # index's leaves, assigned by the index, and the quantizer is never searched
        self._quantizer = faiss.IndexFlatIP(d)
        self._quantizer.add(np.zeros((num_leaves, d), dtype=np.float32))
        qtype = getattr(faiss.ScalarQuantizer, _QTYPES[scan])
        self.ivf = faiss.IndexIVFScalarQuantizer(self._quantizer, d, num_leaves, qtype,
                                                 faiss.METRIC_INNER_PRODUCT, False)
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n, size=min(n, train_sample), replace=False))
        self.ivf.train(_rows(memory, torch.from_numpy(sample).to(memory.device)))
        for s in range(0, n, chunk):
            ids = np.arange(s, min(n, s + chunk), dtype=np.int64)
            add_preassigned(self.ivf, _rows(memory, torch.from_numpy(ids).to(memory.device)),
                            fact_leaf[ids], ids)
        self.build_seconds = time.perf_counter() - t0
        log.info("compressed leaves: %d facts in %d lists, %s codes (%.2f GB), built in %.1f s",
                 n, num_leaves, scan, self.nbytes() / 1e9, self.build_seconds)

    def nbytes(self) -> int:
        """Bytes of the codes and ids."""
        return int(self.n * (self.ivf.code_size + 8))

    def search(self, queries: torch.Tensor, lists: torch.Tensor, k: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The best ``k`` facts by compressed score of each query among the facts of its
        ``lists`` ((B, L) leaf ids, -1 pads): (scores (B, k), ids (B, k); -inf / -1 pads), on
        the queries' device."""
        from faiss.contrib.ivf_tools import search_preassigned

        dev = queries.device
        q = np.ascontiguousarray(queries.detach().to("cpu", torch.float32).numpy())
        ln = np.ascontiguousarray(lists.to("cpu", torch.int64).numpy())
        self.ivf.nprobe = max(1, ln.shape[1])
        if ln.shape[1] == 0:
            ln = np.full((q.shape[0], 1), -1, dtype=np.int64)
        scores, ids = search_preassigned(self.ivf, q, k, ln)
        scores = torch.from_numpy(scores).to(dev)
        ids = torch.from_numpy(ids).to(dev)
        return scores.masked_fill(ids < 0, float("-inf")), ids


def compressed_leaves(memory, index, scan: str) -> CompressedLeaves:
    """The lists of ``index`` over ``memory`` in ``scan`` codes, built once per (memory, index,
    scan) and shared while the memory lives."""
    per_memory = _CACHE.setdefault(memory, {})
    key = (id(index), scan)
    if key not in per_memory:
        per_memory[key] = CompressedLeaves(memory, index.fact_leaf, index.num_leaves, scan)
    return per_memory[key]
