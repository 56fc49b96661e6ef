"""Memory readers: exact and approximate K-MIPS over the fact memory (paper section 3.2).

A reader returns, for each query h(q), the K facts with the largest inner products h(q) . M[i]
among the facts it reads, with their exact inner products.

* :class:`ExactReader`: brute force over all N facts (chunked); on a factorised memory it scores
  factorised (one pass over E and R, then gathers: ~7x fewer flops at FB2M scale).
* :class:`ClusteredReader`: clustering-based approximate K-MIPS (eq. 6-8).  The query is mapped by
  Q (eq. 8) and normalised; leaf centroids are scored by cosine; the facts of the selected leaves
  (and of random blocks) are scored exactly.  Bias reducers of the paper:
    - Top-K clusters: the ``top_clusters`` best leaves;
    - Sample-K clusters: ``sample_clusters`` more leaves drawn without replacement with
      p(c) ~ exp(score_c / T), via the Gumbel-top-k trick: argtop-k of score_c / T + G_c,
      G_c ~ Gumbel(0, 1);
    - Rand-block: ``rand_blocks`` random contiguous blocks of ``block_size`` facts.

Baselines of the paper's comparison live in :mod:`hmn.baselines`: "pca-tree" (Bachrach et al.
2014), "wta-hash" (Vijayanarasimhan et al. 2014), "faiss-ivf" (faiss IndexIVFFlat, inner product).
Every reader is registered, with its tunable parameters and their defaults, in
:mod:`hmn.reader_registry`; :func:`make_reader` builds one by name.  Every reader reports
``touched``, the facts whose inner product it computed per query.

Short names inside kernels: q queries (B, D), S leaf scores (B, C), sel selected leaves (B, C),
U union of facts read by the batch, mask (B, |U|) facts read by each query.
"""

from __future__ import annotations

import logging
import numbers
import time
from typing import Any

import torch

from hmn.baselines import FaissIVFReader, PCATreeReader, WTAHashReader
from hmn.compressed import SCANS, compressed_leaves
from hmn.index import ClusterIndex
from hmn.memory import FactorisedMemory
from hmn.reader_base import Candidates, Memory, Reader, _check_count, _check_k, _pad
from hmn.reader_registry import ClusteredParams, reader_class

logger = logging.getLogger(__name__)

__all__ = [
    "Candidates",
    "ClusteredReader",
    "ExactReader",
    "FaissIVFReader",
    "PCATreeReader",
    "Reader",
    "WTAHashReader",
    "make_reader",
    "recall_at_k",
]


class ExactReader(Reader):
    """Exact K-MIPS: inner products with all N facts, ``chunk`` facts at a time; touched = N.

    On a :class:`~hmn.memory.FactorisedMemory` it scores factorised (DESIGN "Factorized
    memory"): ``q . M[i] = (q_s . E)[s_i] + (q_r . R)[r_i] + mean_o (q_o . E)[o]``, one pass over
    the entity table (subject and object halves of the query together, (2B, d) x (d, Ne)) and
    over the relation table, then per chunk of facts gathers and an object mean.  Multiply-adds
    per query: 2 Ne d + Nr d + nnz instead of 3 N d (FB2M: 0.87 G instead of 6.5 G, 7.5x fewer).
    """

    name = "exact"

    def __init__(self, memory: Memory, chunk: int = 65536) -> None:
        super().__init__(memory)
        if isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or chunk < 1:
            raise ValueError(f"chunk={chunk!r}: must be an integer >= 1")
        self.chunk = int(chunk)

    @torch.no_grad()
    def search(
        self, queries: torch.Tensor, k: int, generator: torch.Generator | None = None
    ) -> Candidates:
        k = _check_k(k)
        q = self.memory.check_queries(queries)  # (B, D)
        n, b = self.memory.n, q.shape[0]
        if isinstance(self.memory, FactorisedMemory):
            parts = self.memory.partial_scores(q)  # one pass over E and R
            block = lambda s, e: self.memory.scores_from_parts(parts, s, e)  # noqa: E731
        else:
            mem = self.memory.vectors  # (N, D)
            block = lambda s, e: q @ mem[s:e].T  # noqa: E731
        kk = min(k, n)
        best_s = q.new_empty((b, 0))  # (B, <=K) running best scores
        best_i = torch.empty((b, 0), dtype=torch.int64, device=q.device)
        for s in range(0, n, self.chunk):
            e = min(s + self.chunk, n)
            cs = block(s, e)  # (B, e - s)
            ci = torch.arange(s, e, device=q.device).expand(b, -1)
            cand_s = torch.cat([best_s, cs], dim=1)
            cand_i = torch.cat([best_i, ci], dim=1)
            best_s, pos = cand_s.topk(min(kk, cand_s.shape[1]), dim=1)  # (B, K)
            best_i = cand_i.gather(1, pos)
        ids, scores = _pad(best_i, best_s, k)
        touched = torch.full((b,), n, dtype=torch.int64, device=q.device)
        return Candidates(ids=ids, scores=scores, touched=touched)


class ClusteredReader(Reader):
    """Approximate K-MIPS by clustering (eq. 6-8) with Top-K / Sample-K / Rand-block readers.

    Leaf selection in a hierarchical index is a beam search: at every level above the leaves the
    ``beam`` best clusters (by cosine with the normalised Q(q)) among the children of the previous
    beam are kept; the candidate leaves are the children of the last beam.  The default beam is
    ``2 * (top_clusters + sample_clusters)`` (at least as many clusters as leaves to read, since
    every cluster has a child, and slack for the query's best leaves lying under parents that
    are not its best: on SQ-32k, [32, 16], beam = top lost recall; see
    benchmarks/readers.py).  With ``top_clusters >= num_leaves`` the reader is exact.
    (Each level is scored in full, (B, C_l), and clusters outside the beam are masked: simpler than
    gathering children and cheap next to the fact matmul.)  In a hierarchical index Sample-K draws
    only among the leaves under the beam.

    The batch is scored at once: U = union of the facts read by any query, one matmul
    q @ M[U].T (B, |U|), then the facts a query did not select are masked before the top-k.

    Args:
        memory: the fact memory M (N, D).
        index: a ClusterIndex built on the same facts.
        top_clusters: leaves taken by score (Top-K).
        sample_clusters: extra leaves sampled without replacement (Sample-K).
        rand_blocks: random contiguous blocks of facts added per query (Rand-block).
        block_size: facts per block; default: mean leaf size.
        temperature: T of the Sample-K distribution p ~ exp(score / T).
        beam: clusters kept per upper level of a hierarchical index (see above); None = default.
    """

    name = "clustered"
    needs_index = True

    def __init__(
        self,
        memory: Memory,
        index: ClusterIndex,
        *,
        top_clusters: int = ClusteredParams.top_clusters,
        sample_clusters: int = ClusteredParams.sample_clusters,
        rand_blocks: int = ClusteredParams.rand_blocks,
        block_size: int | None = None,
        temperature: float = ClusteredParams.temperature,
        beam: int | None = None,
        scan: str = ClusteredParams.scan,
        rerank: int = ClusteredParams.rerank,
    ) -> None:
        super().__init__(memory)
        if not isinstance(index, ClusterIndex):
            raise TypeError(f"index must be a ClusterIndex, got {type(index).__name__}")
        if index.n != memory.n:
            raise ValueError(f"index covers {index.n} facts but the memory holds {memory.n}")
        if index.dim != index.transform.out_dim(memory.d):
            raise ValueError(
                f"index centroids have dimension {index.dim}, expected D + m = "
                f"{memory.d} + {index.transform.m}"
            )
        self.top_clusters = _check_count("top_clusters", top_clusters)
        self.sample_clusters = _check_count("sample_clusters", sample_clusters)
        self.rand_blocks = _check_count("rand_blocks", rand_blocks)
        if self.top_clusters + self.sample_clusters + self.rand_blocks == 0:
            raise ValueError(
                "top_clusters + sample_clusters + rand_blocks = 0: the reader would read nothing"
            )
        if not (isinstance(temperature, numbers.Real) and temperature > 0):
            raise ValueError(f"temperature={temperature!r}: must be > 0")
        self.temperature = float(temperature)
        if block_size is None:
            block_size = max(1, round(memory.n / index.num_leaves))
        if (
            isinstance(block_size, bool)
            or not isinstance(block_size, numbers.Integral)
            or block_size < 1
        ):
            raise ValueError(f"block_size={block_size!r}: must be an integer >= 1")
        self.block_size = min(int(block_size), memory.n)
        if beam is None:
            beam = 2 * max(1, self.top_clusters + self.sample_clusters)
        if isinstance(beam, bool) or not isinstance(beam, numbers.Integral) or beam < 1:
            raise ValueError(f"beam={beam!r}: must be an integer >= 1")
        self.beam = int(beam)

        dev = memory.device
        self.index = index
        self.transform = index.transform
        self._centroids = [c.to(dev) for c in index.centroids]  # per level (C_l, D + m)
        self._parents = [torch.from_numpy(p).to(dev) for p in index.parents]  # per level > 0
        fact_leaf = torch.from_numpy(index.fact_leaf).to(dev)  # (N,)
        self._fact_leaf = fact_leaf
        # Inverted lists (CSR): facts of leaf c are _leaf_facts[_leaf_offsets[c]:_leaf_offsets[c+1]].
        self._leaf_facts = torch.argsort(fact_leaf, stable=True)  # (N,)
        counts = torch.bincount(fact_leaf, minlength=index.num_leaves)  # (C,)
        self._leaf_offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])  # (C + 1,)
        self._leaf_sizes = counts
        if scan not in SCANS:
            raise ValueError(f"scan={scan!r}: must be one of {SCANS}")
        if scan != "exact" and self.rand_blocks:
            raise ValueError("scan: a compressed scan reads leaves only, not with rand_blocks")
        self.scan, self.rerank = scan, _check_count("rerank", rerank)
        self._compressed = None if scan == "exact" else compressed_leaves(memory, index, scan)

    @property
    def num_leaves(self) -> int:
        return int(self._centroids[-1].shape[0])

    def _leaf_scores(self, q: torch.Tensor) -> torch.Tensor:
        """(B, C) cosine of the normalised Q(q) (eq. 8) with the leaf centroids; -inf for leaves
        outside the beam of a hierarchical index."""
        qt = self.transform.queries(q)  # (B, D + m)
        qt = qt / torch.linalg.vector_norm(qt, dim=1, keepdim=True).clamp_min(1e-12)
        allowed: torch.Tensor | None = None  # (B, C_{l-1}) clusters kept at the previous level
        scores = qt @ self._centroids[0].T  # (B, C_0)
        for level in range(len(self._centroids)):
            if level > 0:
                scores = qt @ self._centroids[level].T  # (B, C_l)
                keep = allowed.gather(1, self._parents[level - 1].expand(q.shape[0], -1))
                scores = scores.masked_fill(~keep, float("-inf"))
            if level < len(self._centroids) - 1:
                w = min(self.beam, scores.shape[1])
                top_s, top_i = scores.topk(w, dim=1)  # (B, beam)
                allowed = torch.zeros_like(scores, dtype=torch.bool)
                allowed.scatter_(1, top_i, torch.isfinite(top_s))
        return scores

    def select_leaves(
        self, queries: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """(B, C) bool mask of the leaves each query reads (Top-K + Sample-K, no Rand-block)."""
        q = self.memory.check_queries(queries)  # (B, D)
        if self.top_clusters + self.sample_clusters == 0:
            return torch.zeros((q.shape[0], self.num_leaves), dtype=torch.bool, device=q.device)
        with torch.no_grad():
            return self._select_leaves(self._leaf_scores(q), generator)

    def _select_leaves(
        self, scores: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        """(B, C) bool: Top-K leaves plus Sample-K leaves drawn without replacement."""
        b, c = scores.shape
        finite = torch.isfinite(scores)
        sel = torch.zeros_like(scores, dtype=torch.bool)  # (B, C)
        if self.top_clusters > 0:
            top_s, top_i = scores.topk(min(self.top_clusters, c), dim=1)
            sel.scatter_(1, top_i, torch.isfinite(top_s))
        if self.sample_clusters > 0:
            # Gumbel-top-k: the top-k of log p + G is a sample without replacement from p.
            gen_dev = generator.device if generator is not None else torch.device("cpu")
            u = torch.rand((b, c), generator=generator, dtype=torch.float64, device=gen_dev)
            gumbel = -torch.log(-torch.log(u.clamp(1e-12, 1.0 - 1e-12)))
            pert = scores.to(torch.float64) / self.temperature + gumbel.to(scores.device)
            pert = pert.masked_fill(sel | ~finite, float("-inf"))  # not yet taken, in the beam
            smp_s, smp_i = pert.topk(min(self.sample_clusters, c), dim=1)
            sel.scatter_(1, smp_i, torch.isfinite(smp_s) | sel.gather(1, smp_i))
        return sel

    def _facts_of_leaves(self, leaves: torch.Tensor) -> torch.Tensor:
        """Concatenated fact ids of the given leaves (1-D)."""
        starts = self._leaf_offsets[leaves]
        lengths = self._leaf_sizes[leaves]
        total = int(lengths.sum())
        if total == 0:
            return leaves.new_empty(0)
        # position j of the output reads _leaf_facts[starts[g] + (j - first_j_of_group g)]
        group_first = torch.cumsum(lengths, 0) - lengths
        shift = torch.repeat_interleave(starts - group_first, lengths)
        return self._leaf_facts[torch.arange(total, device=leaves.device) + shift]

    def _pairs(
        self, sel: torch.Tensor, b: int, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The (query, fact) pairs read by the batch, without duplicates, sorted by query then
        fact: facts of the selected leaves plus the Rand-block blocks. Returns (qidx, fact)."""
        dev, n = sel.device, self.memory.n
        qi, leaves = torch.nonzero(sel, as_tuple=True)  # (P_l,) each
        facts = [self._facts_of_leaves(leaves)]
        qidx = [torch.repeat_interleave(qi, self._leaf_sizes[leaves])]
        if self.rand_blocks > 0:  # Rand-block: random contiguous blocks of facts
            gen_dev = generator.device if generator is not None else torch.device("cpu")
            starts = torch.randint(
                0, n - self.block_size + 1, (b, self.rand_blocks), generator=generator,
                device=gen_dev,
            ).to(dev)  # (B, R)
            offs = torch.arange(self.block_size, device=dev)
            facts.append((starts[:, :, None] + offs).reshape(-1))
            qidx.append(torch.arange(b, device=dev).repeat_interleave(self.rand_blocks * self.block_size))
            keys = torch.unique(torch.cat(qidx) * n + torch.cat(facts))  # sorted, duplicate-free
            return keys // n, keys % n
        # leaves are disjoint and nonzero() is row-major: already grouped by query, no duplicates
        return qidx[0], facts[0]

    @torch.no_grad()
    def search(
        self, queries: torch.Tensor, k: int, generator: torch.Generator | None = None
    ) -> Candidates:
        """Top-k among the facts each query reads, with exact inner products.

        Two equivalent ways to score, chosen by cost: when the queries of the batch read mostly
        the same facts (small memories), one dense (B, |U|) product over the union U with the
        unread facts masked; when they read mostly different facts (FB2M-scale memories, where
        B |U| would be ~B times the pairs actually read), only the P (query, fact) pairs read,
        gathered in chunks.
        """
        k = _check_k(k)
        q = self.memory.check_queries(queries)  # (B, D)
        dev, b = q.device, q.shape[0]
        clock = _Clock(self.phase_seconds)
        sel = self.select_leaves(q, generator)  # (B, C)
        clock.lap("leaves")
        if self._compressed is not None:
            return self._compressed_search(q, sel, k, clock)
        qidx, facts = self._pairs(sel, b, generator)  # (P,), (P,)
        touched = torch.bincount(qidx, minlength=b)  # (B,)
        clock.lap("pairs")
        if facts.numel() == 0:
            ids = torch.full((b, k), -1, dtype=torch.int64, device=dev)
            scores = torch.full((b, k), float("-inf"), device=dev)
            return Candidates(ids=ids, scores=scores, touched=touched)
        # |U| without sorting: leaves are disjoint, so the facts of the leaves any query reads
        # (plus at most the blocks' facts, and never more than the memory: with Rand-block the
        # bound B R block_size alone can exceed N, which sent SQ-32k batches down the pair path)
        any_leaf = sel.any(0)
        union_size = min(self.memory.n, int(self._leaf_sizes[any_leaf].sum()) + (
            b * self.rand_blocks * self.block_size if self.rand_blocks else 0))
        if (b * union_size <= self.dense_factor * facts.numel()
                and union_size * self.memory.d * 4 <= self.dense_union_bytes):
            union = torch.unique(facts)  # (|U|,) sorted fact ids read by some query
            mask = torch.zeros((b, union.numel()), dtype=torch.bool, device=dev)  # (B, |U|)
            mask[qidx, torch.searchsorted(union, facts)] = True
            s = self.memory.scores(q, union).masked_fill(~mask, float("-inf"))  # (B, |U|) exact
            clock.lap("score_union")
            top_s, top_p = s.topk(min(k, union.numel()), dim=1)  # (B, K)
            ids, scores = _pad(union[top_p], top_s, k)
            clock.lap("topk")
            return Candidates(ids=ids, scores=scores, touched=touched)
        # pair path: score only what each query reads, then a per-query top-k
        pair_s = self.memory.grouped_scores(q, facts, touched, max_rows=self.pair_chunk)  # (P,)
        clock.lap("score_pairs")
        first = torch.cumsum(touched, 0) - touched  # (B,) first pair of each query
        width = int(touched.max())
        pos = torch.arange(facts.numel(), device=dev) - first[qidx]  # rank within the query
        grid = torch.full((b, width), float("-inf"), device=dev)  # (B, max touched)
        grid[qidx, pos] = pair_s
        grid_ids = torch.full((b, width), -1, dtype=torch.int64, device=dev)
        grid_ids[qidx, pos] = facts
        top_s, top_p = grid.topk(min(k, width), dim=1)  # (B, K)
        ids, scores = _pad(grid_ids.gather(1, top_p), top_s, k)
        clock.lap("topk")
        return Candidates(ids=ids, scores=scores, touched=touched)

    def _compressed_search(self, q: torch.Tensor, sel: torch.Tensor, k: int, clock) -> Candidates:
        """Top-k of each query's leaves: faiss scans the leaves' compressed codes for the best
        ``rerank``, which are re-scored exactly (hmn.compressed). ``touched``: every fact of the
        leaves read, as the exact scan."""
        b, dev = q.shape[0], q.device
        touched = (sel.to(torch.float64) @ self._leaf_sizes.to(torch.float64)).round().to(torch.int64)
        width = int(sel.sum(1).max()) if sel.numel() else 0
        lists = torch.full((b, max(width, 1)), -1, dtype=torch.int64, device=dev)  # (B, L)
        if width:
            qi, leaves = torch.nonzero(sel, as_tuple=True)  # row-major: grouped by query
            first = torch.cumsum(sel.sum(1), 0) - sel.sum(1)
            lists[qi, torch.arange(qi.numel(), device=dev) - first[qi]] = leaves
        approx, ids = self._compressed.search(q, lists, max(k, self.rerank))  # (B, R)
        clock.lap("scan")
        valid = ids >= 0
        exact = self.memory.grouped_scores(q, ids[valid], valid.sum(1))  # (P,) query-major
        grid = torch.full(ids.shape, float("-inf"), device=dev)
        grid[valid] = exact  # boolean indexing is row-major, as grouped_scores' order
        top_s, top_p = grid.topk(min(k, grid.shape[1]), dim=1)  # (B, K)
        ids, scores = _pad(ids.gather(1, top_p), top_s, k)
        clock.lap("rerank")
        return Candidates(ids=ids, scores=scores, touched=touched)

    #: the dense union product is used while B |U| <= dense_factor * pairs read (a dense product
    #: costs ~25 ns per (query, fact) at BLAS speed, a gathered pair ~1.6 us at memory speed, on
    #: 2 CPU cores: measured on SQ-32k with trained queries, B |U| / P = 18: dense 0.11 s, pairs
    #: 0.30 s a batch; FB2M, B |U| / P = 90: comparable times, but the dense path would gather
    #: 2M rows, 4.8 GB) and the union's rows take at most dense_union_bytes
    dense_factor: float = 32.0
    dense_union_bytes: int = 512 << 20
    #: pairs gathered at a time by the pair path
    pair_chunk: int = 1 << 16
    #: when a dict, ``search`` adds the seconds of its phases to it (benchmarks' breakdowns)
    phase_seconds: dict[str, float] | None = None


class _Clock:
    """Adds the time since the previous lap to ``into[name]`` (nothing when ``into`` is None)."""

    def __init__(self, into: dict[str, float] | None) -> None:
        self.into = into
        self.last = time.perf_counter() if into is not None else 0.0

    def lap(self, name: str) -> None:
        if self.into is not None:
            now = time.perf_counter()
            self.into[name] = self.into.get(name, 0.0) + now - self.last
            self.last = now


def make_reader(
    name: str, memory: Memory, index: ClusterIndex | None = None, **params: Any
) -> Reader:
    """Build the reader registered as ``name`` (see :data:`hmn.reader_registry.READERS`)."""
    cls = reader_class(name)
    if cls.needs_index:
        if index is None:
            raise ValueError(f"reader {name!r} needs a ClusterIndex (index=None given)")
        return cls(memory, index, **params)
    return cls(memory, **params)


def recall_at_k(approx: Candidates, exact: Candidates, k: int) -> float:
    """Mean over queries of |top-k approx ∩ top-k exact| / k (pads never count)."""
    k = _check_k(k)
    a, e = approx.ids, exact.ids.to(approx.ids.device)
    if a.ndim != 2 or e.ndim != 2 or a.shape[0] != e.shape[0]:
        raise ValueError(
            f"ids must be (B, K) with the same B, got {tuple(a.shape)}, {tuple(e.shape)}"
        )
    if k > a.shape[1] or k > e.shape[1]:
        raise ValueError(
            f"k={k} exceeds the candidates: approx K={a.shape[1]}, exact K={e.shape[1]}"
        )
    a, e = a[:, :k], e[:, :k]
    hits = ((a[:, :, None] == e[:, None, :]) & (a[:, :, None] >= 0)).any(dim=2).sum(dim=1)  # (B,)
    return float(hits.to(torch.float64).mean() / k) if a.shape[0] else float("nan")
