"""Spherical k-means over a data-access object (paper section 3.2, clustering step of K-MIPS).

The loop follows faiss ``contrib/clustering.py``: it never touches the data matrix, it talks to a
:class:`DataAccess` adapter.  The same loop therefore runs on an in-memory tensor (CPU or CUDA,
:class:`InMemoryData`) or on a sharded memory held by Ray actors (``pipeline.kmeans_ray``), whose
adapter only sums the shards' partial results.

Spherical k-means maximises the objective

    J(c) = sum_i max_j cos(x_i, c_j)          (x_i, c_j unit norm)

by Lloyd iterations: assign each row to its most similar centroid, then set each centroid to the
normalised mean of its rows.  Both steps can only increase J, so J never decreases.

One loop serves both entries: rows come in groups and a row only joins its own group's
centroids (:func:`grouped_spherical_kmeans`, all parents of an index level in one pass); the flat
:func:`spherical_kmeans` is the same loop over a view with one group.

Short names used inside kernels: x rows (n, d), c centroids (C, d), lab assignment (n,),
sim similarities (b, C), b rows in a chunk.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = [
    "INITS",
    "DataAccess",
    "FactorisedData",
    "InMemoryData",
    "KMeansResult",
    "grouped_spherical_kmeans",
    "imbalance_factor",
    "spherical_kmeans",
]

# Rows per float32 block when summing rows per centroid on the CPU: the block's sums are added
# into the float64 totals, so float32 rounding is bounded by the block, not the data size.
_SUM_BLOCK = 16384
# Bytes of the (b, C) similarity buffer of one assignment matmul: bounds b for large C.
_SIM_BYTES = 64 << 20
# Rows x dimension x 4 bytes below which an in-memory view keeps its unit rows (cache_rows=None).
_CACHE_BYTES = 1 << 30
# An untransformed row whose norm is within this of 1 is used as is (no normalised copy).
_UNIT_TOL = 1e-6
# Relative perturbation of a split centroid (faiss Clustering.cpp uses the same EPS = 1/1024).
_SPLIT_EPS = 1.0 / 1024.0
# A pruned pass gives a chunk one matmul over all its rows when more than this fraction of them
# need their similarities: gathering them would cost more than the rows it spares.
_DENSE_REDO = 0.8
# A chunk whose bounds proved fewer of its rows than this fraction drops its bounds for a pass.
# Bytes of the buffer that rows to recompute are gathered into, block by block: at most 32 MiB,
# so that glibc's malloc reuses its pages from pass to pass (larger blocks are mapped afresh, and
# their page faults cost as much as the gather: 55 against 3.4 ms for 20k rows of 603 floats).
_GATHER_BYTES = 32 << 20
_MIN_PROVED = 0.01
# Added to every float32 bound update: covers the update's own rounding (|bound| <= 2: half an
# ulp of 2 is 1.2e-7; a bound beyond 2 cannot let a row skip, cosines are <= 1).
_BOUND_ROUNDING = 2.0**-23


def _dot_error(d: int) -> float:
    """Worst-case rounding error of a float32 dot product of two vectors of norm <= 1 in d
    dimensions, in any summation order (GEMM blocking or a row-wise sum): gamma_d = d u / (1 - d u)
    with u = 2^-24 (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., eq. 3.5),
    widened by 0.1% for rows and centroids whose norms are 1 only up to float32 rounding."""
    du = d * 2.0**-24
    return 1.001 * du / (1.0 - du)


@runtime_checkable
class DataAccess(Protocol):
    """What the k-means loop needs from the data (rows are the *transformed* facts).

    Rows are split into groups, and a row may only join the centroids of its own group: group g
    owns centroids ``offsets[g]:offsets[g + 1]`` of the (C, d) centroids handed to the grouped
    methods.  A view without groups (``groups is None``) is one group: offsets ``[0, C]``.  This
    is how one pass over the data runs the k-means of every parent of an index level (grouped)
    or a single k-means (one group).

    Attributes:
        n: number of rows.
        d: dimension of the rows seen by k-means.
        groups: (n,) int64 group of every row, or None (all rows in group 0).
    """

    n: int
    d: int
    groups: np.ndarray | None

    def rows(self, idx: np.ndarray) -> torch.Tensor:
        """(len(idx), d) float32 unit-norm rows, in the order of ``idx`` (init and re-seeding)."""
        ...

    def partial_stats_grouped(
        self, centroids: torch.Tensor, offsets: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Assign every row to its most similar centroid of its group and return

        sums (C, d) float64 of unit-norm rows per centroid, counts (C,) int64, and objectives
        (G,) float64, per group sum_i max_j cos(x_i, c_j) over its rows.
        """
        ...

    def assign_grouped(self, centroids: torch.Tensor, offsets: np.ndarray) -> np.ndarray:
        """(n,) int64 global index of the most similar centroid of every row's group."""
        ...

    def max_norm(self) -> float:
        """Largest L2 norm of the rows as handed to the adapter, before transform/normalisation.

        Used by ``hmn.index.build_index`` to fit the MIPS transform (eq. 6) through the adapter.
        """
        ...

    def close(self) -> None:
        """Release what the view holds elsewhere (``hmn.index`` calls it when done with a view)."""
        ...


def _normalise_rows(x: torch.Tensor) -> torch.Tensor:
    """Unit-normalise rows; all-zero rows stay zero (cosine 0 with everything)."""
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-12)


def _check_index_array(idx: np.ndarray, n: int) -> np.ndarray:
    idx = np.asarray(idx)
    if idx.ndim != 1:
        raise ValueError(f"idx must be 1-D, got shape {idx.shape}")
    if idx.size and not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"idx must hold integers, got dtype {idx.dtype}")
    idx = idx.astype(np.int64, copy=False)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise ValueError(f"idx must lie in [0, {n}), got {int(idx.min())}..{int(idx.max())}")
    return idx


PRECISIONS = ("float32", "bfloat16", "auto")


def similarity_dtype(precision: str, device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype of the assignment step's (b, C) similarity matmul.

    ``float32``: exact.  ``bfloat16``: rows and centroids rounded to bfloat16 for the matmul
    only (float32 accumulation; 2.3x faster on a CPU with AVX512-BF16, tensor cores on GPU); a
    row whose two best centroids lie within ~2^-8 of each other may take the second (99% of SQ-32k
    rows keep the float32 choice). The sums, counts and objective stay float32/float64 and exact
    for the assignment made.  ``auto``: bfloat16 where the hardware has bfloat16 matmul (CUDA with
    bf16 support, or a CPU with AVX512-BF16 or AMX), float32 elsewhere (emulated bfloat16 would be
    slower than float32).
    """
    if precision == "float32":
        return torch.float32
    dev = torch.device(device)
    if dev.type == "cuda":
        native = torch.cuda.is_bf16_supported()
    else:
        checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None),
                  getattr(torch.cpu, "_is_amx_tile_supported", None))
        native = any(f is not None and f() for f in checks)
    if precision == "bfloat16":
        if not native and dev.type not in _EMULATED_BF16_TOLD:
            _EMULATED_BF16_TOLD.add(dev.type)
            logger.info("k-means: bfloat16 assignment on %s without native bfloat16 is emulated "
                        "(slower than float32); memory.kmeans_precision=auto uses float32 there",
                        dev.type)
        return torch.bfloat16
    if precision == "auto":
        return torch.bfloat16 if native else torch.float32
    raise ValueError(f"precision={precision!r}: must be one of {PRECISIONS}")


_EMULATED_BF16_TOLD: set[str] = set()


def _add_segment_sums(
    out: torch.Tensor, x: torch.Tensor, lab: torch.Tensor, minus: torch.Tensor | None = None
) -> None:
    """out[c] += sum of rows x[i] with lab[i] == c, deterministically; ``out`` is float64.
    With ``minus``, also out[c] -= sum of rows x[i] with minus[i] == c (rows that move from
    centroid minus[i] to lab[i]).

    CPU: ``index_add_`` accumulates in index order; it sums a block of rows in float32 (10x
    faster than converting the rows to float64) and the block's (C, d) sums are added to ``out``
    in float64.  CUDA: ``index_add_`` uses atomics (non-deterministic order), so the rows are
    sorted by label and reduced per segment in float64 instead.
    """
    k = out.shape[0]
    # The (C, d) zero + add per block stays below the block's own work (>= C rows), and a block
    # holds ~128 rows per centroid on average (but >= 1024 rows): float32 rounding grows with the
    # rows a centroid takes in one block (the pruned passes' objective, c . sums, is then within
    # ~1e-8 of the sum of cosines where 16384-row blocks of 12 centroids were 1e-6 off).
    block = max(k, min(_SUM_BLOCK, max(1024, 128 * k)))
    # blocks of equal size: a chunk of 16777 rows is one block, not 16384 + a 393-row block that
    # would cost a second (C, d) zero + add
    block = -(-x.shape[0] // max(1, round(x.shape[0] / block)))
    for s in range(0, x.shape[0], block):
        xb = x[s : s + block]  # (b, d)
        signed = [(lab[s : s + block], 1.0)]  # (b,) labels and the sign their rows add with
        if minus is not None:
            signed.append((minus[s : s + block], -1.0))
        if xb.device.type == "cpu":
            part = torch.zeros(out.shape, dtype=xb.dtype)  # (C, d) float32 sums of this block
            for lb, sign in signed:
                part.index_add_(0, lb, xb, alpha=sign)
            out += part
        else:
            xb = xb.to(torch.float64)
            for lb, sign in signed:
                order = torch.argsort(lb, stable=True)
                lengths = torch.bincount(lb, minlength=k)  # (C,)
                part = torch.segment_reduce(xb[order], "sum", lengths=lengths, axis=0)  # (C, d)
                out.add_(part, alpha=sign)


@dataclass
class _BoundState:
    """What a view keeps between passes for pruned assignment (:meth:`InMemoryData._bounded_pass`).

    Rows are in pass order: row order, or group order for a grouped pass.

    Attributes:
        centroids: (C, d) float32 centroids of the last pass.
        offsets: (G + 1,) their groups (group g owns ``offsets[g]:offsets[g + 1]``).
        grouped: whether the rows were restricted to their group's centroids (group order).
        lab: (n,) int32 global index of every row's most similar centroid under ``centroids``.
        lower: (n,) float32 lower bound on x_i . c_lab(i).
        upper: (n,) float32 upper bound on x_i . c_j for every other centroid j of the row's group
            (-inf in a group of one centroid).
        sums: (C, d) float64 sums of the rows per centroid under ``lab``, or None (not kept: the
            last pass was a first assignment).
        counts: (C,) int64 rows per centroid under ``lab`` (with ``sums``).
    """

    centroids: torch.Tensor
    offsets: np.ndarray
    grouped: bool
    lab: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor
    sums: torch.Tensor | None = None
    counts: torch.Tensor | None = None


def _bound_drifts(
    old: torch.Tensor, new: torch.Tensor, offsets: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor]:
    """(C,) drift_j >= ||new_j - old_j|| and (C,) other_j >= max of the drifts of the *other*
    centroids of j's group (0 in a group of one), float32 on ``new``'s device, rounded up.

    For any row x with ||x|| <= 1, |x . new_j - x . old_j| <= ||new_j - old_j|| (Cauchy-Schwarz),
    so a row labelled j loses at most drift_j of its own similarity and gains at most other_j on
    any competitor (Hamerly 2010, "Making k-means even faster", with cosines for distances).
    """
    drift = torch.linalg.vector_norm(new.to(torch.float64) - old.to(torch.float64), dim=1)
    dn = drift.cpu().numpy()  # (C,)
    sizes = np.diff(offsets)  # (G,)
    filled = sizes > 0
    group = np.repeat(np.arange(sizes.size), sizes)  # (C,) group of every centroid
    order = np.lexsort((dn, group))  # by group, then drift ascending
    last = offsets[1:][filled] - 1  # position in `order` of each group's largest drift
    top = order[last]  # (G',) centroid with the largest drift of its group
    second = np.where(sizes[filled] > 1, dn[order[np.maximum(last - 1, 0)]], 0.0)  # (G',)
    other = np.repeat(dn[top], sizes[filled])  # (C,) the group's largest drift ...
    other[top] = second  # ... except for the centroid that has it: the second largest
    # 1e-6: float64 -> float32 rounding of the drifts; _BOUND_ROUNDING: the bound update's own
    both = np.stack([dn, other]) * (1.0 + 1e-6) + _BOUND_ROUNDING  # (2, C)
    both = torch.from_numpy(both.astype(np.float32)).to(new.device)
    return both[0], both[1]


class InMemoryData:
    """DataAccess over a tensor held in this process (CPU or CUDA).

    Rows are unit-normalised by the adapter (spherical k-means).  If ``transform`` is given (e.g.
    ``MipsTransform.facts``), ``x`` holds raw rows and the transform is applied by the adapter;
    ``max_norm`` then refers to the raw rows.

    Unit rows (``cache_rows``): every Lloyd iteration reads all rows, so transforming and
    normalising them chunk by chunk on every iteration costs a copy of the data per iteration.
    With ``cache_rows=True`` the view computes its unit rows once, on first use, and keeps them
    (grouped views keep them in group order, so every group is one contiguous slice).
    ``cache_rows=None`` (default) caches when the unit rows take at most 1 GiB, ``False`` never.
    Unless ``cache_rows=False``, untransformed rows that are already unit-norm (within 1e-6) are
    used as they are, whatever their size: no copy at all.

    :meth:`partial_stats_grouped` and :meth:`assign_grouped` (the :class:`DataAccess` methods)
    restrict a row to the centroids of its group (``groups``); on a view without groups they are
    :meth:`partial_stats` and :meth:`assign` (one group).  A grouped view runs the k-means of all
    children of one level of a hierarchical index in one pass (:func:`grouped_spherical_kmeans`).

    Pruned passes (``bounds``, Hamerly 2010 with cosines): a float32 view remembers, from its
    last pass, every row's centroid, a lower bound on its similarity to it, an upper bound on its
    similarity to any other centroid of its group, and the sums and counts of the rows per
    centroid.  The next pass moves the bounds by how far the centroids moved
    (:func:`_bound_drifts`) and computes similarities only for the rows whose bounds no longer
    prove that their centroid is still the most similar one; and it updates the sums with the
    rows that changed centroid only.  The proof covers float32 rounding (see
    :meth:`_bounded_pass`), so a pass returns what an unpruned pass returns (up to the float
    rounding of the sums), for any centroids, whatever the view saw before (a first pass when
    the centroids' shape or groups change).  This costs 12 bytes per row and 12 bytes per
    centroid and dimension; ``pass_stats`` records what each pass skipped.

    Subclasses that produce raw rows another way (e.g. :class:`FactorisedData`, which gathers
    them from the factorised tables) override ``_raw_between`` and ``_raw_rows``.

    Args:
        x: (n, d_in) rows; already transformed unless ``transform`` is given.
        chunk: rows per matmul chunk, bounds the (chunk, C) similarity buffer (further capped
            at 64 MiB).
        transform: optional row-wise map (b, d_in) -> (b, d) applied before normalisation.
        groups: optional (n,) int64 group of every row, for the grouped methods.
        cache_rows: keep the unit rows (see above); None = when they fit in 1 GiB.
        precision: the assignment matmul's precision, "float32", "bfloat16" or "auto" (see
            :func:`similarity_dtype`); the final :meth:`assign` is always float32.
        device: where the view computes (unit rows, matmuls, sums); default ``x``'s device.
            Rows held elsewhere (e.g. a CPU tensor for a CUDA view) are staged to it ``chunk``
            rows at a time, so a memory larger than the device's is clustered block by block;
            the unit-row cache (``cache_rows``) then lives on the device.
        bounds: pruned passes (see above); only for float32 ``precision`` (a bfloat16 view's
            passes are never pruned).  False: every pass is one matmul over all rows and sums
            them all, keeping nothing between passes.
    """

    #: whether ``cache_rows=None`` may cache (a factorised view must not materialise its rows)
    _auto_cache = True

    def __init__(
        self,
        x: torch.Tensor,
        chunk: int = 65536,
        *,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        groups: np.ndarray | None = None,
        cache_rows: bool | None = None,
        precision: str = "float32",
        device: str | torch.device | None = None,
        bounds: bool = True,
    ) -> None:
        if isinstance(x, np.ndarray):
            x = torch.from_numpy(x)
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"x must be (n, d) with n >= 1, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"x must be floating point, got {x.dtype}")
        self._x = x if x.dtype == torch.float32 else x.to(torch.float32)  # (n, d_in)
        self._device = self._x.device if device is None else torch.device(device)
        self._setup(int(x.shape[0]), chunk, transform=transform, groups=groups,
                    cache_rows=cache_rows, precision=precision, bounds=bounds)

    def _setup(
        self,
        n: int,
        chunk: int,
        *,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        groups: np.ndarray | None = None,
        cache_rows: bool | None = None,
        precision: str = "float32",
        bounds: bool = True,
    ) -> None:
        if isinstance(chunk, bool) or not isinstance(chunk, numbers.Integral) or chunk < 1:
            raise ValueError(f"chunk={chunk!r}: must be an integer >= 1")
        if not isinstance(bounds, bool):
            raise ValueError(f"bounds={bounds!r}: must be True or False")
        self.bounds = bounds
        self._bound_state: _BoundState | None = None
        self.pass_stats: list[dict] = []  # one record per pass (see _bounded_pass)
        if cache_rows not in (None, True, False):
            raise ValueError(f"cache_rows={cache_rows!r}: must be True, False or None")
        self._transform = transform
        self.precision = precision
        self._sim_dtype = similarity_dtype(precision, self.device)
        self.chunk = int(chunk)
        self.n = int(n)
        self.d = int(self._rows_between(0, 1).shape[1])
        self._max_norm: float | None = None
        self._cache_rows = cache_rows
        self._unit: torch.Tensor | None = None  # (n, d) unit rows; in group order if grouped
        self._unit_pos: torch.Tensor | None = None  # (n,) row i's position in _unit (grouped)
        self._unit_done = False
        self.groups: np.ndarray | None = None
        if groups is not None:
            groups = np.asarray(groups)
            if groups.shape != (self.n,) or (groups.size and groups.min() < 0):
                raise ValueError(f"groups must be ({self.n},) ints >= 0, got shape {groups.shape}")
            self.groups = groups.astype(np.int64, copy=False)
            self._group_order = np.argsort(self.groups, kind="stable")  # rows grouped, ascending
            g_sorted = self.groups[self._group_order]
            self._group_ids, starts = np.unique(g_sorted, return_index=True)  # non-empty groups
            self._group_bounds = np.append(starts, self.n)  # (G' + 1,)

    @property
    def device(self) -> torch.device:
        """Where the view computes (see ``device`` in the class doc)."""
        return self._device

    def _raw_between(self, s: int, e: int) -> torch.Tensor:
        return self._x[s:e].to(self._device)  # (b, d_in), staged when held elsewhere

    def _raw_rows(self, idx: np.ndarray) -> torch.Tensor:
        rows = self._x[torch.from_numpy(idx).to(self._x.device)]  # (len(idx), d_in)
        return rows.to(self._device)

    def _finish(self, xc: torch.Tensor) -> torch.Tensor:
        if self._transform is not None:
            xc = self._transform(xc)  # (b, d)
        return _normalise_rows(xc)

    def _rows_between(self, s: int, e: int) -> torch.Tensor:
        return self._finish(self._raw_between(s, e))

    def _build_unit_cache(self) -> None:
        """Decide once whether to keep the unit rows, and compute them (see the class doc)."""
        self._unit_done = True
        if self._cache_rows is False:
            return
        if self.groups is None and self._transform is None and hasattr(self, "_x"):
            unit = True
            for s in range(0, self.n, self.chunk):
                norms = torch.linalg.vector_norm(self._x[s : s + self.chunk], dim=1)
                if float((norms - 1.0).abs().max()) > _UNIT_TOL:
                    unit = False
                    break
            if unit and self._x.device == self._device:  # used in place, whatever their size
                self._unit = self._x
                return
        want = self._cache_rows
        if want is None:
            want = self._auto_cache and self.n * self.d * 4 <= _CACHE_BYTES
        if not want:
            return
        out = torch.empty((self.n, self.d), dtype=torch.float32, device=self.device)
        if self.groups is None:
            for s in range(0, self.n, self.chunk):
                e = min(s + self.chunk, self.n)
                out[s:e] = self._rows_between(s, e)
        else:
            for s in range(0, self.n, self.chunk):
                pos = self._group_order[s : s + self.chunk]
                out[s : s + pos.size] = self._finish(self._raw_rows(pos))
            inv = np.empty(self.n, dtype=np.int64)
            inv[self._group_order] = np.arange(self.n)
            self._unit_pos = torch.from_numpy(inv).to(self.device)
        self._unit = out

    def _unit_between(self, s: int, e: int) -> torch.Tensor:
        """(b, d) unit rows s..e (in group order for a cached grouped view: internal use)."""
        if not self._unit_done:
            self._build_unit_cache()
        if self._unit is None:
            return self._rows_between(s, e)
        if self._unit_pos is not None:  # group-ordered cache read in row order: gather
            return self._unit[self._unit_pos[s:e]]
        return self._unit[s:e]

    def rows(self, idx: np.ndarray) -> torch.Tensor:
        idx = _check_index_array(idx, self.n)
        if self._unit is not None:
            pos = torch.from_numpy(idx).to(self.device)
            if self._unit_pos is not None:
                pos = self._unit_pos[pos]
            return self._unit[pos]
        return self._finish(self._raw_rows(idx))

    def max_norm(self) -> float:
        if self._max_norm is None:
            best = 0.0
            for s in range(0, self.n, self.chunk):
                raw = self._raw_between(s, s + self.chunk)
                best = max(best, float(torch.linalg.vector_norm(raw, dim=1).max()))
            self._max_norm = best
        return self._max_norm

    def close(self) -> None:
        """Drops the pruning bounds; the view's other tensors go with the view."""
        self._bound_state = None

    def _centroids(self, centroids: torch.Tensor) -> torch.Tensor:
        if not isinstance(centroids, torch.Tensor):
            centroids = torch.as_tensor(np.asarray(centroids))
        if centroids.ndim != 2 or centroids.shape[1] != self.d:
            raise ValueError(
                f"centroids must be (C, d={self.d}), got shape {tuple(centroids.shape)}"
            )
        return centroids.to(device=self.device, dtype=torch.float32)

    def _step(self, k: int) -> int:
        """Rows per assignment matmul: ``chunk``, capped so the (b, C) buffer is <= 64 MiB."""
        return max(1, min(self.chunk, _SIM_BYTES // (4 * max(k, 1))))

    def _assign_chunks(self, c: torch.Tensor, dtype: torch.dtype = torch.float32):
        """Yield (start, unit rows (b, d), best cosine (b,), centroid (b,)) over all rows, the
        similarities computed in ``dtype`` (float32 or bfloat16: then ``best`` is approximate).

        One (b, C) similarity buffer is reused for every chunk: a fresh 64 MiB allocation per
        chunk would cost page faults comparable to the matmul's memory traffic.
        """
        k = c.shape[0]
        step = self._step(k)
        sim = torch.empty((min(step, self.n), k), dtype=dtype, device=self.device)
        ct = c.T.to(dtype)  # (d, C): BLAS reads the transpose in place
        for s in range(0, self.n, step):
            xc = self._unit_between(s, s + step)  # (b, d) unit rows
            b = xc.shape[0]
            torch.mm(xc.to(dtype), ct, out=sim[:b])  # (b, C) cosines
            best, lab = sim[:b].max(dim=1)  # (b,) max cosine and its centroid
            yield s, xc, best, lab

    def partial_stats(self, centroids: torch.Tensor) -> tuple[np.ndarray, np.ndarray, float]:
        c = self._centroids(centroids)  # (C, d)
        k = c.shape[0]
        if self._pruned():
            sums, counts, objectives = self._bounded_pass(c, np.array([0, k]), stats=True,
                                                          grouped=False)
            return sums, counts, float(objectives[0])
        sums = torch.zeros((k, self.d), dtype=torch.float64, device=self.device)  # (C, d)
        counts = torch.zeros(k, dtype=torch.int64, device=self.device)  # (C,)
        objective = torch.zeros((), dtype=torch.float64, device=self.device)
        exact = self._sim_dtype == torch.float32
        for _, xc, best, lab in self._assign_chunks(c, self._sim_dtype):
            if exact:
                objective += best.sum(dtype=torch.float64)
            counts += torch.bincount(lab, minlength=k)
            _add_segment_sums(sums, xc, lab)
        if not exact:  # exact for this assignment: sum_i x_i . c_lab(i) = sum_c c . (its rows sum)
            objective = (sums * c.to(torch.float64)).sum()
        return sums.cpu().numpy(), counts.cpu().numpy(), float(objective)

    def assign(self, centroids: torch.Tensor) -> np.ndarray:
        c = self._centroids(centroids)  # (C, d)
        if self._pruned():
            return self._bounded_pass(c, np.array([0, c.shape[0]]), stats=False, grouped=False)
        out = np.empty(self.n, dtype=np.int64)
        for s, xc, _, lab in self._assign_chunks(c):
            out[s : s + xc.shape[0]] = lab.cpu().numpy()
        return out

    def _one_group(self, centroid_offsets: np.ndarray, k: int) -> None:
        """Check that the offsets of a view without groups are [0, C]."""
        offs = np.asarray(centroid_offsets, dtype=np.int64)
        if offs.tolist() != [0, k]:
            raise ValueError(
                f"a view without groups is one group: offsets must be [0, {k}], got {offs.tolist()}"
            )

    def _grouped_chunks(self, centroid_offsets: np.ndarray):
        """Yield (row positions, unit rows, group, first centroid, end centroid) per chunk."""
        offs = np.asarray(centroid_offsets, dtype=np.int64)
        if not self._unit_done:
            self._build_unit_cache()
        for gi, g in enumerate(self._group_ids):
            if g + 1 >= offs.size or offs[g + 1] <= offs[g]:
                raise ValueError(f"group {int(g)} has rows but no centroids")
            lo, hi = int(self._group_bounds[gi]), int(self._group_bounds[gi + 1])
            for s in range(lo, hi, self.chunk):
                e = min(s + self.chunk, hi)
                pos = self._group_order[s:e]  # rows of this group
                # a cached grouped view holds its unit rows in group order: a slice
                xc = self._unit[s:e] if self._unit is not None else self.rows(pos)
                yield pos, xc, int(g), int(offs[g]), int(offs[g + 1])

    def partial_stats_grouped(
        self, centroids: torch.Tensor, centroid_offsets: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Like :meth:`partial_stats`, but row i only joins centroids
        ``centroid_offsets[groups[i]] : centroid_offsets[groups[i] + 1]``.

        Returns sums (C, d) float64, counts (C,) int64 and objectives (G,) float64 per group.
        """
        if self.groups is None:
            self._one_group(centroid_offsets, int(centroids.shape[0]))
            sums, counts, objective = self.partial_stats(centroids)
            return sums, counts, np.array([objective], dtype=np.float64)
        c = self._centroids(centroids)  # (C, d)
        if self._pruned():
            return self._bounded_pass(c, centroid_offsets, stats=True, grouped=True)
        k = c.shape[0]
        ng = len(centroid_offsets) - 1
        sums = torch.zeros((k, self.d), dtype=torch.float64, device=self.device)
        counts = torch.zeros(k, dtype=torch.int64, device=self.device)
        objectives = np.zeros(ng, dtype=np.float64)
        dt = self._sim_dtype
        exact = dt == torch.float32
        cd = c if exact else c.to(dt)
        for _, xc, g, a, b in self._grouped_chunks(centroid_offsets):
            # among the group's centroids only
            best, lab = ((xc if exact else xc.to(dt)) @ cd[a:b].T).max(dim=1)
            counts[a:b] += torch.bincount(lab, minlength=b - a)
            # only the group's own rows of the sums: a (C, d) pass per group would cost
            # G x C x d per iteration (FB2M, 256 x 128 children: 60 GB of memory traffic)
            _add_segment_sums(sums[a:b], xc, lab)
            if exact:
                objectives[g] += float(best.sum(dtype=torch.float64))
            else:  # exact for the assignment made (see partial_stats)
                objectives[g] = float((sums[a:b] * c[a:b].to(torch.float64)).sum())
        return sums.cpu().numpy(), counts.cpu().numpy(), objectives

    def assign_grouped(self, centroids: torch.Tensor, centroid_offsets: np.ndarray) -> np.ndarray:
        """(n,) int64 most similar centroid of every row among its group's centroids."""
        if self.groups is None:
            self._one_group(centroid_offsets, int(centroids.shape[0]))
            return self.assign(centroids)
        c = self._centroids(centroids)
        if self._pruned():
            return self._bounded_pass(c, centroid_offsets, stats=False, grouped=True)
        out = np.empty(self.n, dtype=np.int64)
        for pos, xc, _, a, b in self._grouped_chunks(centroid_offsets):
            out[pos] = (xc @ c[a:b].T).argmax(dim=1).cpu().numpy() + a
        return out

    # -- pruned passes (see the class doc) ----------------------------------------------------

    def _pruned(self) -> bool:
        return self.bounds and self._sim_dtype == torch.float32

    def _pass_chunks(self, offsets: np.ndarray, k: int, grouped: bool):
        """Yield (p, unit rows (b, d), first centroid, end centroid) over all rows in pass order,
        p = the chunk's first position in that order (row order; group order if grouped)."""
        if not grouped:
            step = self._step(k)
            for s in range(0, self.n, step):
                yield s, self._unit_between(s, s + step), 0, k
            return
        p = 0
        for _, xc, _, a, b in self._grouped_chunks(offsets):  # groups in order: p = s there
            yield p, xc, a, b
            p += xc.shape[0]

    @staticmethod
    def _full_rows(
        xc: torch.Tensor, c: torch.Tensor, out: torch.Tensor | None, *, second: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Most similar centroid (b,), its cosine (b,) and the second best cosine (b,) (-inf for
        one centroid; None unless ``second``) of rows xc (b, d) among c (C', d); ``out``: a
        (>= b, C') buffer or None.

        topk(2) rather than max, mask, max again (+9% of the k=1000 matmul; topk +4%); a row
        whose two best are an exact tie takes the lowest index, as the unpruned pass's max does.
        """
        ct = c.T  # (d, C'): BLAS reads the transpose in place
        sim = xc @ ct if out is None else torch.mm(xc, ct, out=out[: xc.shape[0]])  # (b, C')
        if not second or c.shape[0] == 1:
            best, lab = sim.max(dim=1)
            return lab, best, torch.full_like(best, -math.inf) if second else None
        top, idx = sim.topk(2, dim=1)  # (b, 2) each, best first
        best, second, lab = top[:, 0], top[:, 1], idx[:, 0]
        tie = torch.nonzero(best == second).squeeze(1)
        if tie.numel():
            lab[tie] = sim[tie].argmax(dim=1)
        return lab, best, second

    def _bounded_pass(self, c: torch.Tensor, offsets: np.ndarray, *, stats: bool, grouped: bool):
        """One pruned pass: ``partial_stats_grouped``'s (sums, counts, objectives) if ``stats``,
        else ``assign_grouped``'s labels (``grouped``: the view's groups, which it must have),
        or those of ``partial_stats`` / ``assign`` (one group, whatever the view's groups).

        Without bounds for these centroids' shape and groups (a first pass), every row gets its
        similarity row: label, best cosine (the lower bound) and second best (the upper bound),
        and the sums are those of the unpruned pass.  With bounds, per row of centroid a:
        upper += other_a and lower -= drift_a (:func:`_bound_drifts`); a row with
        lower > upper + eps keeps a without a matmul, the others get their similarity row
        (gathered into one matmul, or the whole chunk's matmul when most rows need it) and new
        bounds; the sums and counts move only the rows whose centroid changed (Hamerly 2010's
        update step).  An exact cosine of a row to its own centroid before the full row (his
        second test) is left out: on SQ-32k it spared 1% of the rows at a third of the matmul's
        cost.  A chunk whose bounds proved fewer than 1% of its rows takes the best cosine only
        (no second best, -> no bounds: upper = +inf) and its next pass computes it all again with
        the second best (a probe): where bounds never prove anything (600-d Gaussian blobs, 5
        iterations) half the passes then cost what an unpruned pass costs.

        eps = 4 gamma_d (:func:`_dot_error`; 1.4e-4 at d=600): each bound came from one computed
        dot product (error <= gamma_d against the exact one) and the unpruned pass's cosines of
        the row to a and to its best competitor are each within gamma_d of the exact ones, so
        lower > upper + 4 gamma_d proves that the unpruned pass picks a too (strictly: ties are
        not skipped).  The labels therefore equal the unpruned pass's except where its two best
        cosines of a re-examined row lie within float rounding of each other (the row's
        similarities then come from a matmul over other rows, which may round differently).

        The objective is sum_j c_j . sums_j (float64), exact for the labels made (as the
        bfloat16 pass's; within ~1e-7 of the unpruned pass's sum of float32 cosines), in every
        pass, so that it depends on the labels and centroids only, not on what the view saw
        before: a skipped row's cosine to its centroid is never computed.
        """
        k = int(c.shape[0])
        offs = np.asarray(offsets, dtype=np.int64)
        if not grouped:
            self._one_group(offs, k)
        ng = int(offs.size - 1)
        st, self._bound_state = self._bound_state, None  # re-set at the end: no half-done state
        fresh = (st is None or st.grouped != grouped or st.centroids.shape != c.shape
                 or st.offsets.shape != offs.shape or not np.array_equal(st.offsets, offs))
        dev = self.device
        if fresh:
            st = _BoundState(c, offs.copy(), grouped,
                             torch.empty(self.n, dtype=torch.int32, device=dev),
                             torch.empty(self.n, device=dev), torch.empty(self.n, device=dev))
        else:
            drift, other = _bound_drifts(st.centroids, c, offs)  # (C,) each
        eps = 4.0 * _dot_error(self.d)
        tracked = stats and st.sums is not None  # move the kept sums by the rows that move
        full_sums = stats and st.sums is None  # or sum every row under its final label
        sums = torch.zeros((k, self.d), dtype=torch.float64, device=dev) if full_sums else st.sums
        counts = torch.zeros(k, dtype=torch.int64, device=dev) if full_sums else st.counts
        objectives = np.zeros(ng, dtype=np.float64)
        buf = None
        if self.groups is None:  # one (b, C) buffer for every chunk, as the unpruned pass
            buf = torch.empty((min(self._step(k), self.n), k), device=dev)
        gbuf = None  # (gcap, d) gathered rows, allocated at the first gather
        gcap = max(1, min(self.chunk, self.n, _GATHER_BYTES // (4 * self.d)))
        full = moved = proved = 0
        for p, xc, a, b in self._pass_chunks(offs, k, grouped):
            m = xc.shape[0]
            lab, lower, upper = st.lab[p : p + m], st.lower[p : p + m], st.upper[p : p + m]
            old = None if fresh else lab.long()  # (b,) global centroid of every row before
            parts, keep = [None], True  # row blocks to compute (None: the chunk); bounds?
            if old is not None and not bool((upper == math.inf).all()):  # else: no bounds kept
                upper += other[old]
                lower -= drift[old]
                redo = lower <= upper + eps  # (b,) rows whose bounds prove nothing
                r = int(redo.sum())
                proved += m - r
                # bounds that prove (almost) nothing are not worth the second best's cost: the
                # chunk drops them and takes them again (probes) on the next pass
                keep = m - r >= _MIN_PROVED * m
                if r <= _DENSE_REDO * m:  # else the chunk's own matmul, no gather
                    rows = torch.nonzero(redo).squeeze(1)  # (r,) positions in the chunk
                    cap = min(gcap, self._step(b - a))  # the (b, C') buffer's rows too
                    parts = [rows[i : i + cap] for i in range(0, r, cap)]
            for part in parts:
                if part is None:
                    xs = xc  # (b, d)
                else:
                    if gbuf is None:
                        gbuf = torch.empty((gcap, self.d), device=dev)
                    xs = torch.index_select(xc, 0, part, out=gbuf[: part.numel()])  # (r, d)
                local, best, second = self._full_rows(xs, c[a:b], buf, second=keep)
                new = local + a  # (r,) or (b,)
                if part is None:
                    lab.copy_(new)
                    lower.copy_(best)
                    if keep:
                        upper.copy_(second)
                else:
                    lab[part] = new.to(torch.int32)
                    lower[part] = best
                    if keep:
                        upper[part] = second
                full += new.numel()
                if tracked:
                    was = old if part is None else old[part]
                    change = torch.nonzero(new != was).squeeze(1)
                    if change.numel():
                        moved += change.numel()
                        xm, to, fro = xs[change], new[change] - a, was[change] - a
                        _add_segment_sums(sums[a:b], xm, to, minus=fro)
                        counts[a:b] += (torch.bincount(to, minlength=b - a)
                                        - torch.bincount(fro, minlength=b - a))
            if not keep:
                upper.fill_(math.inf)  # every row of the chunk: the next pass computes them all
            if full_sums:
                local = lab.long() - a
                counts[a:b] += torch.bincount(local, minlength=b - a)
                _add_segment_sums(sums[a:b], xc, local)
        st.centroids = c.clone()  # c may be the caller's tensor
        # an assignment pass moves rows without moving the sums: they are summed again if needed
        st.sums, st.counts = (sums, counts) if stats else (None, None)
        self._bound_state = st
        self.pass_stats.append({"pass": "stats" if stats else "assign", "rows": self.n,
                                "first": fresh, "proved_rows": proved, "full_rows": full,
                                "moved_rows": moved, "skipped_fraction": 1.0 - full / self.n})
        if not stats:
            labels = st.lab.long().cpu().numpy()
            if not grouped:
                return labels
            out = np.empty(self.n, dtype=np.int64)
            out[self._group_order] = labels  # pass order is group order
            return out
        # exact for the labels made: sum_i x_i . c_lab(i) = sum_j c_j . sums_j
        per = (sums * c.to(torch.float64)).sum(dim=1).cpu().numpy()  # (C,)
        filled = offs[1:] > offs[:-1]
        if filled.any():
            objectives[filled] = np.add.reduceat(per, offs[:-1][filled])
        # copies: the kept sums and counts change in place on the next pass
        return sums.cpu().numpy().copy(), counts.cpu().numpy().copy(), objectives


class FactorisedData(InMemoryData):
    """DataAccess over a :class:`hmn.memory.FactorisedMemory`: rows are gathered from the entity,
    relation and fact tables chunk by chunk, so the (N, D) matrix is never materialised.

    Args:
        memory: the factorised memory.
        ids: optional sorted global fact ids of this view (row i is fact ``ids[i]``).
        chunk, transform, groups, precision, device: as :class:`InMemoryData` (rows are
            gathered where the tables are and staged to ``device`` chunk by chunk).
        cache_rows: as :class:`InMemoryData`, except that None means False here (caching would
            materialise the rows this adapter exists to avoid).
    """

    _auto_cache = False

    def __init__(self, memory, ids: np.ndarray | None = None, chunk: int = 65536, *,
                 device: str | torch.device | None = None, **options: Any) -> None:
        """``options``: the other keyword-only arguments of :class:`InMemoryData`."""
        if not hasattr(memory, "gather"):
            raise TypeError(f"memory must be a FactorisedMemory, got {type(memory).__name__}")
        self._memory = memory
        self._device = memory.device if device is None else torch.device(device)
        self._ids = None if ids is None else _check_index_array(ids, memory.n)
        n = memory.n if self._ids is None else int(self._ids.size)
        if n == 0:
            raise ValueError("a FactorisedData view needs at least one row")
        self._setup(n, chunk, **options)

    def _raw_between(self, s: int, e: int) -> torch.Tensor:
        e = min(e, self.n)
        if self._ids is None:
            return self._memory.rows_between(s, e).to(self._device)
        return self._memory.gather(torch.from_numpy(self._ids[s:e])).to(self._device)

    def _raw_rows(self, idx: np.ndarray) -> torch.Tensor:
        glob = idx if self._ids is None else self._ids[idx]
        return self._memory.gather(torch.from_numpy(np.ascontiguousarray(glob))).to(self._device)


@dataclass
class KMeansResult:
    """Result of :func:`spherical_kmeans` and :func:`grouped_spherical_kmeans`.

    Attributes:
        centroids: (C, d) float32 unit-norm centroids on CPU.
        assignments: (n,) int64 centroid of every row under ``centroids``.
        stats: one dict per iteration: iteration, objective (J of the centroids that entered the
            iteration), imbalance (faiss imbalance factor C * sum(count^2) / n^2, 1 = balanced),
            empty_splits, seconds.
        group_objectives: (G,) float64 final objective of each group (one group: (1,)).
    """

    centroids: torch.Tensor
    assignments: np.ndarray
    stats: list[dict] = field(default_factory=list)
    group_objectives: np.ndarray | None = None

    @property
    def objective(self) -> float:
        """Objective J at the last evaluated centroids."""
        return float(self.stats[-1]["objective"]) if self.stats else float("nan")

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])


def imbalance_factor(counts: np.ndarray) -> float:
    """faiss's imbalance factor C * sum(count^2) / n^2 (1.0 for perfectly balanced clusters)."""
    counts = np.asarray(counts, dtype=np.float64)
    n = counts.sum()
    return float(counts.shape[0] * np.square(counts).sum() / (n * n)) if n > 0 else float("nan")


def _init_sample(data: DataAccess, k: int, rng: np.random.Generator, sample: int) -> torch.Tensor:
    """k distinct random rows."""
    idx = np.sort(rng.choice(data.n, size=k, replace=False))
    return data.rows(idx).to("cpu", torch.float32)  # (C, d)


def _init_kmeanspp(data: DataAccess, k: int, rng: np.random.Generator, sample: int) -> torch.Tensor:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii 2007) on a random sample of rows.

    For unit vectors ||x - c||^2 = 2 (1 - cos(x, c)), so the D^2 sampling weight of a row is
    1 - max cos to the chosen seeds.  As in scikit-learn, each step draws 2 + log(k) candidates
    from that distribution and keeps the one that lowers the potential sum(1 - max cos) most,
    which makes two seeds in one tight cluster much less likely than plain k-means++.
    """
    s = min(data.n, max(sample, k))
    idx = np.sort(rng.choice(data.n, size=s, replace=False))
    xs = data.rows(idx).to("cpu", torch.float32)  # (S, d)
    trials = 2 + int(np.log(k))
    chosen = np.empty(k, dtype=np.int64)
    chosen[0] = rng.integers(s)
    best = (xs @ xs[int(chosen[0])]).to(torch.float64).numpy()  # (S,) max cosine to the seeds
    taken = np.zeros(s, dtype=bool)
    taken[chosen[0]] = True
    for j in range(1, k):
        weight = np.clip(1.0 - best, 0.0, None)  # (S,) D^2 / 2
        weight[taken] = 0.0
        cum = np.cumsum(weight)
        total = cum[-1]
        if total > 0.0:
            cand = np.searchsorted(cum, rng.random(trials) * total, side="right")  # (L,)
            cand = np.minimum(cand, s - 1)
            cand = cand[weight[cand] > 0]  # float rounding at the end of cum
            if cand.size == 0:
                cand = np.flatnonzero(weight > 0)[-1:]
        else:  # fewer distinct rows than k: any untaken row
            cand = np.array([rng.choice(np.flatnonzero(~taken))])
        sims = (xs @ xs[torch.from_numpy(cand)].T).to(torch.float64).numpy()  # (S, L)
        new_best = np.maximum(best[:, None], sims)  # (S, L)
        pick = int(np.argmin((1.0 - new_best).sum(axis=0)))  # lowest potential
        chosen[j] = cand[pick]
        taken[cand[pick]] = True
        best = new_best[:, pick].copy()
    return xs[torch.from_numpy(chosen)].clone()  # (C, d)


INITS: dict[str, Callable[[DataAccess, int, np.random.Generator, int], torch.Tensor]] = {
    "kmeans++": _init_kmeanspp,
    "sample": _init_sample,
}


def _split_empty(centroids: np.ndarray, counts: np.ndarray) -> int:
    """Re-seed empty centroids in place by splitting the largest clusters (as faiss does).

    An empty centroid becomes a slightly perturbed copy c * (1 +- eps) of the centroid c of the
    currently largest cluster, whose count is then shared between the two.  Unlike faiss we leave
    c itself unchanged, so the objective cannot decrease (every row keeps its centroid).
    Returns the number of splits.
    """
    counts = counts.astype(np.int64).copy()
    empty = np.flatnonzero(counts == 0)
    if empty.size == 0:
        return 0
    fac = np.ones(centroids.shape[1], dtype=np.float64)
    fac[::2] += _SPLIT_EPS
    fac[1::2] -= _SPLIT_EPS
    for ci in empty:
        cj = int(np.argmax(counts))  # ties -> lowest index: deterministic
        c = centroids[cj] * fac
        centroids[ci] = c / max(np.linalg.norm(c), 1e-300)
        counts[ci] = counts[cj] // 2
        counts[cj] -= counts[ci]
    return int(empty.size)


def _check_loop_args(iters: int, tol: float, init: str) -> None:
    if isinstance(iters, bool) or not isinstance(iters, numbers.Integral) or iters < 1:
        raise ValueError(f"iters={iters!r}: must be an integer >= 1")
    if not (isinstance(tol, numbers.Real) and tol >= 0):
        raise ValueError(f"tol={tol!r}: must be >= 0")
    if init not in INITS:
        raise ValueError(f"init={init!r}: unknown, known: {sorted(INITS)}")


def _lloyd(
    data: DataAccess,
    centroids: torch.Tensor,
    offsets: np.ndarray,
    *,
    iters: int,
    tol: float,
    progress: Callable[[dict], None] | None,
) -> KMeansResult:
    """Lloyd iterations from ``centroids`` (C, d), group g owning ``offsets[g]:offsets[g + 1]``.

    Every iteration is one ``partial_stats_grouped`` pass; the update sets each centroid to the
    normalised mean of its rows (a centroid whose mean vanishes keeps its value), empty centroids
    are re-seeded inside their group (:func:`_split_empty`), and the loop stops when the relative
    change of the total objective is < tol with no split.  Each group's objective can only
    increase.
    """
    t_start = time.perf_counter()
    n, d, k, ng = int(data.n), int(data.d), int(centroids.shape[0]), int(offsets.size - 1)
    stats: list[dict] = []
    prev: float | None = None
    group_obj = np.zeros(ng)
    for it in range(int(iters)):
        t0 = time.perf_counter()
        sums, counts, group_obj = data.partial_stats_grouped(centroids, offsets)
        sums = np.asarray(sums, dtype=np.float64)  # (C, d)
        counts = np.asarray(counts, dtype=np.int64)  # (C,)
        group_obj = np.asarray(group_obj, dtype=np.float64)  # (G,)
        if sums.shape != (k, d) or counts.shape != (k,) or group_obj.shape != (ng,):
            raise ValueError(
                f"partial_stats_grouped returned sums {sums.shape}, counts {counts.shape} and "
                f"objectives {group_obj.shape}, expected {(k, d)}, {(k,)} and {(ng,)}"
            )
        if int(counts.sum()) != n:
            raise ValueError(f"partial_stats_grouped counted {int(counts.sum())} rows, n={n}")
        new = centroids.to(torch.float64).numpy().copy()  # (C, d)
        norms = np.linalg.norm(sums, axis=1)  # (C,) the mean's norm times count
        ok = (counts > 0) & (norms > 0)
        new[ok] = sums[ok] / norms[ok, None]
        splits = 0
        if (counts == 0).any():
            for g in np.unique(np.searchsorted(offsets, np.flatnonzero(counts == 0), "right") - 1):
                a, b = int(offsets[g]), int(offsets[g + 1])
                splits += _split_empty(new[a:b], counts[a:b])  # views: split inside group g
        centroids = torch.from_numpy(new.astype(np.float32))  # (C, d)
        objective = float(group_obj.sum())
        stat = {
            "iteration": it,
            "objective": objective,
            "imbalance": imbalance_factor(counts),
            "empty_splits": splits,
            "seconds": time.perf_counter() - t0,
        }
        stats.append(stat)
        logger.debug("k-means C=%d iter %d: %s", k, it, stat)
        if progress is not None:
            progress(dict(stat))
        if prev is not None and splits == 0 and abs(objective - prev) < tol * max(abs(prev), 1e-30):
            break
        prev = objective

    assignments = np.asarray(data.assign_grouped(centroids, offsets), dtype=np.int64)
    if assignments.shape != (n,):
        raise ValueError(f"assign_grouped returned shape {assignments.shape}, expected {(n,)}")
    logger.info(
        "spherical k-means: %d groups, C=%d, n=%d, %d iterations, objective %.6g, %.2fs",
        ng, k, n, len(stats), stats[-1]["objective"], time.perf_counter() - t_start,
    )  # fmt: skip
    return KMeansResult(centroids, assignments, stats, group_objectives=group_obj)


def spherical_kmeans(
    data: DataAccess,
    k: int,
    *,
    iters: int = 20,
    tol: float = 1e-4,
    seed: int = 0,
    init: str = "kmeans++",
    progress: Callable[[dict], None] | None = None,
    init_sample: int | None = None,
) -> KMeansResult:
    """Spherical k-means (Lloyd iterations) over a :class:`DataAccess` without groups: the
    grouped loop with one group, seeded from the whole view.

    Args:
        data: the data adapter (its rows are normalised by the adapter); ``data.groups`` None.
        k: number of clusters C, 1 <= k <= data.n.
        iters: maximum number of Lloyd iterations.
        tol: stop when the relative objective change between iterations is < tol.
        seed: seeds the initialisation (the rest is deterministic).
        init: a key of :data:`INITS`: "kmeans++" (on a row sample) or "sample".
        progress: called with each iteration's stats dict.
        init_sample: rows sampled for k-means++ (default max(16 k, 1024), capped at n).

    Returns:
        :class:`KMeansResult` with CPU float32 unit-norm centroids.
    """
    if not isinstance(data, DataAccess):
        raise TypeError(f"data must implement DataAccess, got {type(data).__name__}")
    if data.groups is not None:
        raise ValueError("data has groups: use grouped_spherical_kmeans")
    n, d = int(data.n), int(data.d)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"k must be an integer, got {type(k).__name__}")
    if not 1 <= k <= n:
        raise ValueError(f"k={k}: must satisfy 1 <= k <= n={n}")
    _check_loop_args(iters, tol, init)
    sample = max(16 * int(k), 1024) if init_sample is None else int(init_sample)
    if sample < 1:
        raise ValueError(f"init_sample={init_sample!r}: must be >= 1")
    k = int(k)

    t_start = time.perf_counter()
    centroids = INITS[init](data, k, np.random.default_rng(seed), sample)  # (C, d) unit rows
    if tuple(centroids.shape) != (k, d):
        raise ValueError(f"init returned shape {tuple(centroids.shape)}, expected {(k, d)}")
    logger.debug(
        "k-means init %s: C=%d, n=%d, d=%d in %.3fs", init, k, n, d, time.perf_counter() - t_start
    )
    offsets = np.array([0, k], dtype=np.int64)
    return _lloyd(data, centroids, offsets, iters=iters, tol=tol, progress=progress)


def _init_grouped(
    data: DataAccess,
    groups: np.ndarray,
    ks: np.ndarray,
    seeds: np.ndarray,
    init: str,
    init_sample: int | None,
) -> torch.Tensor:
    """(sum(ks), d) initial centroids: per group g, ``INITS[init]`` on a sample of its rows
    (default max(16 ks[g], 256)) drawn with seed ``seeds[g]``; rows of many groups are fetched
    from the adapter at once."""
    offsets = np.concatenate([[0], np.cumsum(ks)])  # (G + 1,)
    sizes = np.bincount(groups, minlength=ks.size)
    order = np.argsort(groups, kind="stable")
    gstart = np.concatenate([[0], np.cumsum(sizes)])
    centroids = torch.empty((int(offsets[-1]), int(data.d)), dtype=torch.float32)
    batch: list[tuple[int, np.ndarray, np.random.Generator, int]] = []

    def flush() -> None:
        if not batch:
            return
        allidx = np.concatenate([idx for _, idx, _, _ in batch])
        fetched = data.rows(allidx).to("cpu", torch.float32)
        at = 0
        for g, idx, rng, k in batch:
            sub = InMemoryData(fetched[at : at + idx.size])  # already unit rows
            at += idx.size
            centroids[offsets[g] : offsets[g + 1]] = INITS[init](sub, k, rng, sub.n)
        batch.clear()

    pending = 0
    for g in np.flatnonzero(ks > 0):
        k = int(ks[g])
        rng = np.random.default_rng(int(seeds[g]))
        members = order[gstart[g] : gstart[g + 1]]  # row indices of group g (ascending)
        s = min(members.size, max(16 * k, 256) if init_sample is None else int(init_sample))
        idx = np.sort(rng.choice(members, size=max(s, k), replace=False))
        batch.append((int(g), idx, rng, k))
        pending += idx.size
        if pending >= 65536:
            flush()
            pending = 0
    flush()
    return centroids


def grouped_spherical_kmeans(
    data: DataAccess,
    ks: np.ndarray,
    *,
    iters: int = 20,
    tol: float = 1e-4,
    seed: int = 0,
    init: str = "kmeans++",
    progress: Callable[[dict], None] | None = None,
    init_sample: int | None = None,
    group_seeds: np.ndarray | None = None,
) -> KMeansResult:
    """Independent spherical k-means inside every group of rows, all groups in one pass.

    This is the second (and deeper) level of a hierarchical index: group g = the facts of parent
    cluster g, with ``ks[g]`` children.  Instead of one k-means (and ``iters`` round trips to the
    data) per parent, every Lloyd iteration is one ``partial_stats_grouped`` call over all rows,
    so a sharded adapter (Ray actors) costs ``iters`` round trips per level, not C1 x iters.
    Each group's objective can only increase, as in :func:`spherical_kmeans`; the loop stops when
    the relative change of the total objective is < tol.

    Args:
        data: the data adapter; its ``groups`` label the rows (None: one group).
        ks: (G,) clusters per group, 1 <= ks[g] <= size of group g; 0 for an empty group.
        group_seeds: optional (G,) seed of each group's initialisation (default from ``seed``).
        init_sample: rows sampled per group for the initialisation (default max(16 k, 256)).
        Other arguments: as :func:`spherical_kmeans`.

    Returns:
        :class:`KMeansResult`; centroids of group g are rows ``offsets[g]:offsets[g + 1]`` with
        ``offsets = [0, cumsum(ks)]``; assignments are global centroid indices;
        ``group_objectives`` (G,) the final objective of each group.
    """
    if not isinstance(data, DataAccess):
        raise TypeError(f"data must implement DataAccess, got {type(data).__name__}")
    n = int(data.n)
    groups = np.zeros(n, np.int64) if data.groups is None else np.asarray(data.groups, np.int64)
    ks = np.asarray(ks, dtype=np.int64)
    if ks.ndim != 1:
        raise ValueError(f"ks must be 1-D, got shape {ks.shape}")
    sizes = np.bincount(groups, minlength=ks.size)
    if sizes.size != ks.size:
        raise ValueError(f"groups go up to {sizes.size - 1} but ks has {ks.size} entries")
    bad = np.flatnonzero((ks < 0) | (ks > sizes) | ((sizes > 0) & (ks < 1)))
    if bad.size:
        g = int(bad[0])
        raise ValueError(f"ks[{g}]={int(ks[g])}: must satisfy 1 <= k <= group size {sizes[g]}")
    _check_loop_args(iters, tol, init)
    seeds = (
        np.asarray(group_seeds)
        if group_seeds is not None
        else np.random.SeedSequence(int(seed)).generate_state(ks.size)
    )
    centroids = _init_grouped(data, groups, ks, seeds, init, init_sample)
    offsets = np.concatenate([[0], np.cumsum(ks)])  # (G + 1,)
    return _lloyd(data, centroids, offsets, iters=iters, tol=tol, progress=progress)
