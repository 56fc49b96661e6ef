"""Baseline approximate K-MIPS readers the paper compares against (Chandar et al. 2016, section 5):

* :class:`PCATreeReader`: PCA-Tree (Bachrach et al. 2014).  The MIPS -> nearest-neighbour
  transform with one extra dimension, x' = [x ; sqrt(phi^2 - ||x||^2)], q' = [q ; 0] with
  phi = max ||x|| (so ||q' - x'||^2 = ||q||^2 + phi^2 - 2 q.x: the NN of q' is the MIPS of q), then
  a tree of ``depth`` levels: at level l every node splits its facts at their median projection
  on the l-th principal direction of the transformed facts.  A query reads the facts of its leaf
  and, with ``probes > 1``, of the leaves whose paths flip the splits it passed most narrowly
  (leaf cost = sum over flipped splits of |projection - threshold|, the ``probes`` cheapest).
  Build cost: one pass for the mean and the (D+1)^2 covariance (O(N D^2)), an eigendecomposition
  (O(D^3)), projections (O(N D depth)) and a sort per level (O(depth N log N)).
* :class:`WTAHashReader`: winner-take-all hashing (Yagnik et al. 2011, as used for large output
  spaces by Vijayanarasimhan et al. 2014).  For each of ``bands`` bands, ``perms`` random
  permutations; each looks at the first ``window`` coordinates of the permuted vector and
  records the position of the largest one; the band's hash is the tuple of the ``perms`` codes.
  Candidates are the facts that collide with the query in any band.  Build cost: O(N bands perms
  window) comparisons plus a sort per band (O(bands N log N)); memory (N, bands) int64.
* :class:`FaissIVFReader`: ``faiss.IndexIVFFlat`` with ``METRIC_INNER_PRODUCT`` (``nlist`` lists,
  ``nprobe`` probed per query), on the GPU when faiss-gpu and CUDA are present.  Build cost: faiss's
  k-means on at most 256 nlist facts (``niter`` 10 by default) plus one assignment pass over N.

Every reader builds its structure from the memory in its constructor, deterministically for a given
``seed``; ``touched`` counts the facts whose inner product was computed for each query.  Their
tunable parameters, with their defaults, are declared in :mod:`hmn.reader_registry`.

Short names: N facts, D fact dimension, B queries, L leaves (2^depth), q queries (B, D).
"""

from __future__ import annotations

import abc
import logging
import numbers
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from hmn.memory import FactMemory
from hmn.reader_base import Candidates, Memory, Reader, _check_k, score_candidate_sets
from hmn.reader_registry import FaissIVFParams, PCATreeParams, ReaderParams, WTAHashParams

logger = logging.getLogger(__name__)

__all__ = ["FaissIVFReader", "PCATreeReader", "WTAHashReader", "iter_fact_rows"]


def _check_int(name: str, value: object, low: int, high: int | None = None) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or value < low
        or (high is not None and value > high)
    ):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name}={value!r}: must be an integer {bound}")
    return int(value)


def iter_fact_rows(memory: Memory, chunk: int = 65536) -> Iterator[tuple[int, torch.Tensor]]:
    """(start, (b, D) float32 rows) of the memory in fact order, gathered chunk by chunk."""
    for s in range(0, memory.n, chunk):
        e = min(s + chunk, memory.n)
        if isinstance(memory, FactMemory):
            yield s, memory.vectors[s:e]
        else:
            yield s, memory.rows_between(s, e)


def _csr(labels: np.ndarray, num: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverted lists: (facts sorted by label, offsets (num + 1,))."""
    order = np.argsort(labels, kind="stable")
    offsets = np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=num))])
    return torch.from_numpy(order), torch.from_numpy(offsets)

def _median_splits(p: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Split every node at the lower median of its facts' projection, level by level.

    Args:
        p: (N, depth) projections; column l splits the nodes of level l.
    Returns:
        the leaf of each fact (N,) and, per level l, the 2^l node thresholds.
    """
    node = np.zeros(p.shape[0], dtype=np.int64)
    thresholds: list[np.ndarray] = []
    for level in range(p.shape[1]):
        width = 1 << level
        order = np.lexsort((p[:, level], node))  # by node, then projection
        counts = np.bincount(node, minlength=width)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        thr = np.zeros(width, dtype=np.float64)
        has = counts > 0
        thr[has] = p[order[starts[has] + (counts[has] - 1) // 2], level]  # lower median
        thresholds.append(thr)
        node = 2 * node + (p[:, level] > thr[node])
    return node, thresholds



class _BuiltReader(Reader):
    """A reader whose structure is built from the memory in its constructor.

    Its tunable parameters are the fields of ``Params`` (declared, with their defaults, in
    :mod:`hmn.reader_registry`), passed as keyword arguments; ``chunk`` facts are read at a time
    during the build.  ``build_seconds`` records the build time.
    """

    Params: type[ReaderParams] = ReaderParams

    def __init__(self, memory: Memory, *, chunk: int = 65536, **params: Any) -> None:
        super().__init__(memory)
        self.params = self.Params(**params)
        t0 = time.perf_counter()
        summary = self._build(self.params, chunk)
        self.build_seconds = time.perf_counter() - t0
        logger.info("%s %s built in %.2fs", self.name, summary, self.build_seconds)

    @abc.abstractmethod
    def _build(self, params: Any, chunk: int) -> str:
        """Check ``params`` against the memory and build the structure; a summary for the log."""

    @torch.no_grad()
    def search(
        self, queries: torch.Tensor, k: int, generator: torch.Generator | None = None
    ) -> Candidates:
        k = _check_k(k)
        return self._search(self.memory.check_queries(queries), k)

    @abc.abstractmethod
    def _search(self, q: torch.Tensor, k: int) -> Candidates:
        """Top-k facts of the checked (B, D) queries ``q`` (no random draws)."""


class PCATreeReader(_BuiltReader):
    """PCA-Tree K-MIPS (Bachrach et al. 2014); see the module docstring.

    Args:
        memory: the fact memory.
        depth: tree depth (2^depth leaves), 1 <= depth <= min(20, D + 1).
        probes: leaves read per query (1 = the query's own leaf).
        seed: unused by the (deterministic) build; kept for a uniform reader interface.
        chunk: facts per chunk during the build.
    """

    name = "pca-tree"
    Params = PCATreeParams

    def _build(self, params: PCATreeParams, chunk: int) -> str:
        self.depth = _check_int("depth", params.depth, 1, min(20, self.memory.d + 1))
        self.probes = _check_int("probes", params.probes, 1, 1 << self.depth)
        proj = self._principal_projections(chunk)  # (N, depth)
        node, thresholds = _median_splits(proj.numpy())
        self.leaf_of_fact = node  # (N,)
        self.num_leaves = 1 << self.depth
        facts, offsets = _csr(node, self.num_leaves)
        dev = self.memory.device
        self._leaf_facts, self._leaf_offsets = facts.to(dev), offsets.to(dev)
        # per level, the threshold of each leaf's ancestor: (depth, L)
        leaves = np.arange(self.num_leaves)
        self._leaf_thr = torch.from_numpy(
            np.stack([thresholds[lv][leaves >> (self.depth - lv)] for lv in range(self.depth)])
        ).to(torch.float32)
        self._leaf_bits = torch.from_numpy(
            np.stack([(leaves >> (self.depth - 1 - lv)) & 1 for lv in range(self.depth)])
        ).bool()  # (depth, L)
        sizes = np.diff(offsets.numpy())
        return f"depth {self.depth}: {self.num_leaves} leaves, sizes {sizes.min()}..{sizes.max()}"

    def _principal_projections(self, chunk: int) -> torch.Tensor:
        """(N, depth) float64 projections of the lifted, centred facts on their ``depth`` first
        principal directions; keeps the mean and the directions for the queries."""
        memory = self.memory
        n, d = memory.n, memory.d
        norms2 = torch.empty(n, dtype=torch.float64)
        total = torch.zeros(d + 1, dtype=torch.float64)
        for s, x in iter_fact_rows(memory, chunk):
            norms2[s : s + x.shape[0]] = x.double().square().sum(1).cpu()
        phi2 = float(norms2.max())
        self._phi2 = phi2

        def lift(s: int, x: torch.Tensor) -> torch.Tensor:  # (b, D + 1), Bachrach eq. for x'
            extra = (phi2 - norms2[s : s + x.shape[0]]).clamp_min(0).sqrt()
            return torch.cat([x.double().cpu(), extra[:, None]], dim=1)

        for s, x in iter_fact_rows(memory, chunk):
            total += lift(s, x).sum(0)
        mean = total / n
        cov = torch.zeros((d + 1, d + 1), dtype=torch.float64)
        for s, x in iter_fact_rows(memory, chunk):
            xc = lift(s, x) - mean
            cov += xc.T @ xc
        evals, evecs = torch.linalg.eigh(cov / n)  # ascending
        top = evecs[:, torch.argsort(evals, descending=True)[: self.depth]]  # (D + 1, depth)
        # sign convention: largest-magnitude component positive (deterministic directions)
        pivot = top.abs().argmax(0)
        top = top * torch.sign(top[pivot, torch.arange(self.depth)])[None, :]
        proj = torch.empty((n, self.depth), dtype=torch.float64)  # (N, depth)
        for s, x in iter_fact_rows(memory, chunk):
            proj[s : s + x.shape[0]] = (lift(s, x) - mean) @ top
        self._mean = mean[:d].to(torch.float32)  # query's extra coordinate is 0
        self._mean_extra = float(mean[d])
        self._dirs = top.to(torch.float32)  # (D + 1, depth)
        return proj

    def leaf_costs(self, q: torch.Tensor) -> torch.Tensor:
        """(B, L) cost of reaching each leaf: sum of |margin| over the splits it flips."""
        qp = (q.cpu() - self._mean) @ self._dirs[:-1] - self._mean_extra * self._dirs[-1]
        cost = torch.zeros((q.shape[0], self.num_leaves))
        for lv in range(self.depth):
            margin = qp[:, lv : lv + 1] - self._leaf_thr[lv][None, :]  # (B, L)
            flipped = (margin > 0) != self._leaf_bits[lv][None, :]
            cost += torch.where(flipped, margin.abs(), torch.zeros(()))
        return cost

    def _search(self, q: torch.Tensor, k: int) -> Candidates:
        leaves = self.leaf_costs(q).topk(self.probes, dim=1, largest=False).indices  # (B, P)
        leaves = leaves.to(q.device)
        cand = []
        for row in leaves:
            parts = [
                self._leaf_facts[self._leaf_offsets[c] : self._leaf_offsets[c + 1]] for c in row
            ]
            cand.append(torch.cat(parts))
        return score_candidate_sets(self.memory, q, cand, k)


class WTAHashReader(_BuiltReader):
    """WTA-hash K-MIPS (Vijayanarasimhan et al. 2014); see the module docstring.

    Args:
        memory: the fact memory.
        bands: L, hash tables; more bands -> more candidates (higher recall, more facts touched).
        perms: K, permutations per band; more -> fewer collisions per band.
        window: coordinates each permutation compares (2 <= window <= D).
        seed: seeds the permutations.
        chunk: facts per chunk during the build.
    """

    name = "wta-hash"
    Params = WTAHashParams

    def _build(self, params: WTAHashParams, chunk: int) -> str:
        memory = self.memory
        self.bands = _check_int("bands", params.bands, 1)
        self.perms = _check_int("perms", params.perms, 1)
        self.window = _check_int("window", params.window, 2, memory.d)
        if self.window**self.perms >= 2**62:
            raise ValueError(
                f"window**perms = {params.window}**{params.perms} does not fit a 64-bit hash"
            )
        rng = np.random.default_rng(params.seed)
        coords = np.stack(
            [rng.permutation(memory.d)[: self.window] for _ in range(self.bands * self.perms)]
        )  # (L K, w): the first w coordinates of each permutation
        self._coords = torch.from_numpy(coords)
        self._radix = torch.tensor([self.window**i for i in range(self.perms)], dtype=torch.int64)
        codes = torch.empty((memory.n, self.bands), dtype=torch.int64)
        for s, x in iter_fact_rows(memory, chunk):
            codes[s : s + x.shape[0]] = self._hash(x.cpu())
        self._order = torch.argsort(codes, dim=0, stable=True)  # (N, L) facts by hash per band
        self._sorted = torch.gather(codes, 0, self._order)  # (N, L)
        return f"L={self.bands} K={self.perms} w={self.window}"

    def _hash(self, x: torch.Tensor) -> torch.Tensor:
        """(b, L) int64 band hashes of rows x (b, D)."""
        win = x[:, self._coords]  # (b, L K, w)
        code = win.argmax(dim=2).reshape(x.shape[0], self.bands, self.perms)  # (b, L, K)
        return (code * self._radix).sum(dim=2)  # (b, L)

    def _search(self, q: torch.Tensor, k: int) -> Candidates:
        qh = self._hash(q.cpu())  # (B, L)
        cand: list[list[torch.Tensor]] = [[] for _ in range(q.shape[0])]
        for band in range(self.bands):
            col = self._sorted[:, band].contiguous()
            lo = torch.searchsorted(col, qh[:, band].contiguous(), side="left")
            hi = torch.searchsorted(col, qh[:, band].contiguous(), side="right")
            for b in range(q.shape[0]):
                if hi[b] > lo[b]:
                    cand[b].append(self._order[lo[b] : hi[b], band])
        sets = [
            torch.cat(c) if c else torch.empty(0, dtype=torch.int64) for c in cand
        ]
        return score_candidate_sets(self.memory, q, sets, k)


def _faiss():
    from hmn.devices import check_faiss_install

    check_faiss_install()  # faiss-cpu and a faiss-gpu package side by side break the module
    try:
        import faiss  # optional at import time of hmn: only this reader needs it
    except ImportError as e:
        raise ImportError(f"the faiss-ivf reader needs faiss: install the project with its "
                          f"'cpu' or its 'gpu' extra, never both ({e})") from e
    return faiss


class FaissIVFReader(_BuiltReader):
    """``faiss.IndexIVFFlat`` with inner product (the reference tool); see the module docstring.

    Args:
        memory: the fact memory (a factorised one is added chunk by chunk).
        nlist: inverted lists (k-means clusters), 1 <= nlist <= N.
        nprobe: lists scanned per query.
        seed: seed of faiss's k-means.
        niter: faiss's k-means iterations.
        use_gpu: None = on the GPU when faiss-gpu and CUDA are available; False = CPU.
        chunk: facts per chunk added to the index.
    """

    name = "faiss-ivf"
    Params = FaissIVFParams

    def __init__(
        self,
        memory: Memory,
        *,
        niter: int = 10,
        use_gpu: bool | None = None,
        chunk: int = 65536,
        **params: Any,
    ) -> None:
        self._niter, self._use_gpu = niter, use_gpu
        super().__init__(memory, chunk=chunk, **params)

    def _build(self, params: FaissIVFParams, chunk: int) -> str:
        faiss = _faiss()
        memory = self.memory
        self.nlist = _check_int("nlist", params.nlist, 1, memory.n)
        self.nprobe = _check_int("nprobe", params.nprobe, 1, self.nlist)
        quantizer = faiss.IndexFlatIP(memory.d)
        index = faiss.IndexIVFFlat(quantizer, memory.d, self.nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = int(params.seed)
        index.cp.niter = _check_int("niter", self._niter, 1)
        # faiss trains on at most max_points_per_centroid * nlist points: pick them ourselves,
        # reproducibly, so a factorised memory needs only that sample gathered.
        index.train(self._training_sample(index.cp.max_points_per_centroid * self.nlist,
                                           params.seed))
        for _, x in iter_fact_rows(memory, chunk):
            index.add(np.ascontiguousarray(x.cpu().numpy(), dtype=np.float32))
        invlists = index.invlists
        self.list_sizes = np.array([invlists.list_size(i) for i in range(self.nlist)], np.int64)
        index = self._to_device(faiss, index)
        index.nprobe = self.nprobe
        self._index = index
        self._quantizer = quantizer if not self.on_gpu else None
        return f"nlist={self.nlist} (gpu={self.on_gpu})"

    def _training_sample(self, limit: int, seed: int) -> np.ndarray:
        """(min(N, limit), D) float32 facts, a seeded sample in fact order."""
        memory = self.memory
        rng = np.random.default_rng(seed)
        if memory.n > limit:
            sample = np.sort(rng.choice(memory.n, size=limit, replace=False))
        else:
            sample = np.arange(memory.n)
        if isinstance(memory, FactMemory):
            train = memory.vectors[torch.from_numpy(sample).to(memory.device)]
        else:
            train = memory.gather(torch.from_numpy(sample))
        return np.ascontiguousarray(train.cpu().numpy(), dtype=np.float32)

    def _to_device(self, faiss: Any, index: Any) -> Any:
        """The index on the GPU when asked (or by default, when faiss-gpu and CUDA are there)."""
        self.on_gpu = False
        want_gpu = self._use_gpu if self._use_gpu is not None else torch.cuda.is_available()
        if want_gpu and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
            self._res = faiss.StandardGpuResources()
            self.on_gpu = True
            return faiss.index_cpu_to_gpu(self._res, 0, index)
        if self._use_gpu:
            logger.warning("faiss-ivf: use_gpu=True but faiss has no GPU support here; on CPU")
        return index

    def set_nprobe(self, nprobe: int) -> None:
        """Probe ``nprobe`` lists per query from now on (no rebuild)."""
        self.nprobe = _check_int("nprobe", nprobe, 1, self.nlist)
        self._index.nprobe = self.nprobe

    def _search(self, q: torch.Tensor, k: int) -> Candidates:
        xq = np.ascontiguousarray(q.cpu().numpy(), dtype=np.float32)
        if self.on_gpu:
            faiss = _faiss()
            lists = faiss.extract_index_ivf(self._index).quantizer.search(xq, self.nprobe)[1]
        else:
            lists = self._quantizer.search(xq, self.nprobe)[1]  # (B, nprobe) probed lists
        touched = np.where(lists >= 0, self.list_sizes[np.maximum(lists, 0)], 0).sum(1)
        scores, ids = self._index.search(xq, k)  # exact inner products within probed lists
        ids_t = torch.from_numpy(ids).to(q.device)
        sc = torch.from_numpy(scores).to(q.device)
        sc = torch.where(ids_t < 0, torch.full_like(sc, float("-inf")), sc)
        return Candidates(ids=ids_t, scores=sc, touched=torch.from_numpy(touched).to(q.device))

