"""Cluster index for approximate K-MIPS (paper section 3.2, eq. 6-8).

Build: fit the MIPS transform P (eq. 6-7) on the facts' largest norm, then cluster the unit-norm
transformed facts P(x)/||P(x)|| with spherical k-means, flat or hierarchical:

* ``branching=(C,)``: one k-means with C clusters; the clusters are the leaves.
* ``branching=(C1, C2, ...)``: k-means with C1 clusters on all facts, then inside every cluster
  of level l-1 a k-means with min(C_l, size) clusters (all parents of a level in one grouped
  k-means), and so on.  Leaves (last level) are numbered globally, children of parent 0 first.
  An empty cluster gets a single empty child whose centroid is its own, so every cluster has at
  least one child.
* ``max_leaf_size``: a last step splits every leaf of more facts (:func:`split_leaves`).

What is built is one frozen :class:`IndexSpec` (made from the ``memory`` config section by
:meth:`IndexSpec.from_config`).  :func:`build_index` runs its steps: fit the transform, fit level
0, fit each deeper level, assign all facts (when fitted on a sample), split the leaves.

The build never touches the data matrix: it goes through a *data factory* (see
:class:`DataFactory`), so the same code runs in memory (:class:`InMemoryDataFactory`) or on Ray
actors holding shards of the memory (``pipeline.kmeans_ray``).

Short names: N facts, D fact dimension, m appended components (transformed dimension D + m),
C_l clusters at level l, L levels.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import numbers
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from hmn.kmeans import (
    INITS,
    PRECISIONS,
    DataAccess,
    FactorisedData,
    InMemoryData,
    KMeansResult,
    grouped_spherical_kmeans,
    imbalance_factor,
    spherical_kmeans,
)
from hmn.memory import FactorisedMemory
from hmn.mips import MipsTransform, check_params, fit_transform

if TYPE_CHECKING:
    from hmn.config import MemoryConfig

logger = logging.getLogger(__name__)

__all__ = [
    "ClusterIndex",
    "DataFactory",
    "FactorisedDataFactory",
    "InMemoryDataFactory",
    "IndexSpec",
    "build_index",
    "build_index_from_vectors",
    "check_branching",
    "check_subset_ids",
    "split_leaves",
]

FORMAT_VERSION = 1
_ARRAYS = "arrays.npz"
_META = "index.json"

Progress = Callable[[dict], None] | None

#: facts per piece of an assignment pass that reports progress (`_assign`)
ASSIGN_PIECE = 1 << 17
#: consecutive facts that stay together in a piece (`_assign`)
_ASSIGN_BLOCK = 4096


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"{name}={value!r}: must be an integer >= {low}")


def check_branching(branching: tuple[int, ...] | list[int], n: int | None = None) -> list[int]:
    """Validate ``branching`` (and, given N = n facts, ``branching[0] <= n``); returns a list."""
    if not isinstance(branching, (list, tuple)) or len(branching) == 0:
        raise ValueError(f"branching={branching!r}: must be a non-empty list of cluster counts")
    for i, b in enumerate(branching):
        _check_int(f"branching[{i}]", b, 1)
    if n is not None and branching[0] > n:
        raise ValueError(f"branching[0]={branching[0]}: must be <= n={n} (k <= n)")
    return [int(b) for b in branching]


@dataclass(frozen=True)
class IndexSpec:
    """Everything that decides the cluster index of given facts, validated on construction.

    Attributes:
        branching: clusters per level, top first: (C,) flat, (C1, C2, ...) hierarchical.
        U, m: MIPS transform parameters (eq. 6-7).
        iters, tol, init: spherical k-means parameters of every level.
        seed: seeds level 0; child k-means get seeds derived from (seed, level, parent).
        fit_sample: when 0 < fit_sample < N, every level's k-means iterates over the same seeded
            random sample of ``fit_sample`` facts, and one assignment pass then places all N facts
            (the usual large-scale practice, as faiss's ``max_points_per_centroid``): ``iters + 1``
            passes over a sample and one over all facts per level instead of ``iters`` over all.
        max_leaf_size: when > 0, last step: every leaf of more facts than this is split by a
            k-means of its facts into leaves under the same parent (:func:`split_leaves`), so
            that a query reading its top leaves is not charged the few oversized ones.
        precision: the k-means assignment matmul's, "float32", "bfloat16" or "auto"
            (:func:`hmn.kmeans.similarity_dtype`).
    """

    branching: tuple[int, ...]
    U: float = 0.75
    m: int = 3
    iters: int = 20
    tol: float = 1e-4
    seed: int = 0
    init: str = "kmeans++"
    fit_sample: int = 0
    max_leaf_size: int = 0
    precision: str = "float32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "branching", tuple(check_branching(self.branching)))
        check_params(self.U, self.m)
        _check_int("iters", self.iters, 1)
        if not (isinstance(self.tol, numbers.Real) and self.tol >= 0):
            raise ValueError(f"tol={self.tol!r}: must be >= 0")
        _check_int("seed", self.seed, 0)
        if self.init not in INITS:
            raise ValueError(f"init={self.init!r}: unknown, known: {sorted(INITS)}")
        _check_int("fit_sample", self.fit_sample, 0)
        _check_int("max_leaf_size", self.max_leaf_size, 0)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}: must be one of {PRECISIONS}")

    @classmethod
    def from_config(cls, cfg: MemoryConfig) -> IndexSpec:
        """The spec of the ``memory`` config section (its other fields say where and how the
        index is built: layout, dense_limit_gb, num_shards)."""
        return cls(
            branching=tuple(cfg.branching), U=cfg.U, m=cfg.m, iters=cfg.iters, tol=cfg.tol,
            seed=cfg.seed, init=cfg.init, fit_sample=cfg.fit_sample,
            max_leaf_size=cfg.max_leaf_size, precision=cfg.kmeans_precision,
        )  # fmt: skip


class DataFactory(Protocol):
    """Makes the :class:`~hmn.kmeans.DataAccess` views that :func:`build_index` clusters.

    ``factory(transform, ids, groups, precision)`` returns an adapter over the facts ``ids`` (all
    N facts when ``ids`` is None; otherwise a sorted, duplicate-free int64 array of global fact
    ids, and the adapter's row i is fact ``ids[i]``):

    * ``transform=None``: raw facts; build_index only calls ``max_norm()`` on it (to fit eq. 6).
    * ``transform=t``: rows are ``t.facts(x)`` (eq. 6-7), unit-normalised by the adapter.
    * ``groups``: (n,) int64 group label per row of the view (None: one group).
    * ``precision``: the view's assignment matmul (:func:`hmn.kmeans.similarity_dtype`).

    build_index calls the view's ``close()`` when done with it.

    Attributes:
        n: number of facts N.
    """

    n: int

    def __call__(
        self,
        transform: MipsTransform | None,
        ids: np.ndarray | None,
        groups: np.ndarray | None = None,
        precision: str = "float32",
    ) -> DataAccess: ...


class _ViewFactory:
    """A :class:`DataFactory` whose views are made in this process by ``_view``."""

    chunk: int

    @property
    def n(self) -> int:
        raise NotImplementedError

    def __call__(
        self,
        transform: MipsTransform | None,
        ids: np.ndarray | None,
        groups: np.ndarray | None = None,
        precision: str = "float32",
    ) -> InMemoryData:
        ids = None if ids is None else check_subset_ids(ids, self.n)
        options = {"transform": None if transform is None else transform.facts,
                   "groups": groups, "precision": precision}
        return self._view(ids, options)

    def _view(self, ids: np.ndarray | None, options: dict[str, Any]) -> InMemoryData:
        raise NotImplementedError


class InMemoryDataFactory(_ViewFactory):
    """:class:`DataFactory` over an (N, D) tensor in this process (CPU or CUDA).

    ``device``: where the views compute (default the tensor's); a CPU tensor's rows are then
    staged to it ``chunk`` rows at a time (:class:`~hmn.kmeans.InMemoryData`)."""

    def __init__(self, vectors: torch.Tensor | np.ndarray, chunk: int = 65536, *,
                 device: str | torch.device | None = None) -> None:
        if isinstance(vectors, np.ndarray):
            vectors = torch.from_numpy(vectors)
        if not isinstance(vectors, torch.Tensor):
            raise TypeError(f"vectors must be a tensor or ndarray, got {type(vectors).__name__}")
        if vectors.ndim != 2 or vectors.shape[0] == 0:
            raise ValueError(f"vectors must be (N, D) with N >= 1, got {tuple(vectors.shape)}")
        self.vectors = vectors.to(torch.float32)  # (N, D)
        self.chunk = chunk
        self.device = None if device is None else torch.device(device)

    @property
    def n(self) -> int:
        return int(self.vectors.shape[0])

    def _view(self, ids: np.ndarray | None, options: dict[str, Any]) -> InMemoryData:
        x = self.vectors
        if ids is not None:
            x = x[torch.from_numpy(ids).to(x.device)]  # (len(ids), D)
        return InMemoryData(x, self.chunk, device=self.device, **options)


class FactorisedDataFactory(_ViewFactory):
    """:class:`DataFactory` over a :class:`~hmn.memory.FactorisedMemory`: views gather fact rows
    from the entity / relation / fact tables chunk by chunk (:class:`~hmn.kmeans.FactorisedData`),
    so an FB2M-sized memory is clustered without its (N, D) matrix. ``device``: where the views
    compute (default the tables'); gathered chunks are staged to it."""

    def __init__(self, memory: FactorisedMemory, chunk: int = 65536, *,
                 device: str | torch.device | None = None) -> None:
        if not isinstance(memory, FactorisedMemory):
            raise TypeError(f"memory must be a FactorisedMemory, got {type(memory).__name__}")
        self.memory = memory
        self.chunk = chunk
        self.device = None if device is None else torch.device(device)

    @property
    def n(self) -> int:
        return self.memory.n

    def _view(self, ids: np.ndarray | None, options: dict[str, Any]) -> FactorisedData:
        return FactorisedData(self.memory, ids, self.chunk, device=self.device, **options)


def check_subset_ids(ids: np.ndarray, n: int) -> np.ndarray:
    """Validate a DataFactory ``ids`` argument: 1-D, sorted, unique, in [0, n); returns int64."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or ids.size == 0:
        raise ValueError(f"ids must be a non-empty 1-D array, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"ids must hold integers, got dtype {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    if ids[0] < 0 or ids[-1] >= n:
        raise ValueError(f"ids must lie in [0, {n}), got {int(ids[0])}..{int(ids[-1])}")
    if ids.size > 1 and not (np.diff(ids) > 0).all():
        raise ValueError("ids must be sorted ascending without duplicates")
    return ids


def _to_json(obj: Any) -> Any:
    """Make stats JSON-serialisable (numpy scalars and arrays to Python)."""
    if isinstance(obj, dict):
        return {str(k): _to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


@dataclass
class ClusterIndex:
    """A flat or hierarchical clustering of the transformed facts.

    Attributes:
        transform: the fitted MIPS transform (eq. 6-8).
        centroids: per level, level 0 = top, last = leaves; each (C_l, D + m) float32 unit-norm.
        parents: one array per level l > 0 (so ``parents[l - 1]`` belongs to level l): (C_l,)
            int64 index of each cluster's parent in level l - 1.  Empty for a flat index.
        fact_leaf: (N,) int64 leaf cluster of every fact.
        stats: build statistics (JSON-serialisable).
    """

    transform: MipsTransform
    centroids: list[torch.Tensor]
    parents: list[np.ndarray]
    fact_leaf: np.ndarray
    stats: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.transform, MipsTransform):
            raise TypeError(
                f"transform must be a MipsTransform, got {type(self.transform).__name__}"
            )
        if len(self.centroids) < 1:
            raise ValueError("centroids must hold at least one level")
        if len(self.parents) != len(self.centroids) - 1:
            raise ValueError(
                f"parents must have one array per level > 0: {len(self.centroids) - 1}, "
                f"got {len(self.parents)}"
            )
        self.centroids = [torch.as_tensor(c, dtype=torch.float32) for c in self.centroids]
        dim = self.centroids[0].shape[-1]
        for level, c in enumerate(self.centroids):
            if c.ndim != 2 or c.shape[1] != dim or c.shape[0] < 1:
                raise ValueError(
                    f"centroids[{level}] must be (C_{level} >= 1, {dim}), got {tuple(c.shape)}"
                )
        self.parents = [np.asarray(p, dtype=np.int64) for p in self.parents]
        for level in range(1, len(self.centroids)):
            p = self.parents[level - 1]
            c_prev = self.centroids[level - 1].shape[0]
            if p.shape != (self.centroids[level].shape[0],):
                raise ValueError(
                    f"parents[{level - 1}] (level {level}) must have shape "
                    f"({self.centroids[level].shape[0]},), got {p.shape}"
                )
            if p.size and (p.min() < 0 or p.max() >= c_prev):
                raise ValueError(f"parents[{level - 1}] must lie in [0, {c_prev})")
        self.fact_leaf = np.asarray(self.fact_leaf, dtype=np.int64)
        if self.fact_leaf.ndim != 1 or self.fact_leaf.size == 0:
            raise ValueError(
                f"fact_leaf must be a non-empty (N,) array, got {self.fact_leaf.shape}"
            )
        if self.fact_leaf.min() < 0 or self.fact_leaf.max() >= self.num_leaves:
            raise ValueError(f"fact_leaf must lie in [0, num_leaves={self.num_leaves})")

    @property
    def num_leaves(self) -> int:
        return int(self.centroids[-1].shape[0])

    @property
    def num_levels(self) -> int:
        return len(self.centroids)

    @property
    def n(self) -> int:
        """Number of facts N."""
        return int(self.fact_leaf.shape[0])

    @property
    def dim(self) -> int:
        """Transformed dimension D + m."""
        return int(self.centroids[0].shape[1])

    def leaf_sizes(self) -> np.ndarray:
        """(C_leaves,) int64 number of facts per leaf."""
        return np.bincount(self.fact_leaf, minlength=self.num_leaves).astype(np.int64)

    def save(self, directory: str) -> None:
        """Write ``arrays.npz`` + ``index.json`` to ``directory``, atomically.

        Files are written to a temporary sibling directory that then replaces ``directory`` with
        ``os.replace``; an existing index is first moved aside and deleted afterwards, so readers
        see either the old or the new complete index.
        """
        directory = os.path.abspath(directory)
        parent = os.path.dirname(directory)
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-index-", dir=parent)
        try:
            arrays: dict[str, np.ndarray] = {"fact_leaf": self.fact_leaf}
            for level, c in enumerate(self.centroids):
                arrays[f"centroids_{level}"] = c.detach().cpu().numpy()
            for level, p in enumerate(self.parents, start=1):
                arrays[f"parents_{level}"] = p
            np.savez(os.path.join(tmp, _ARRAYS), **arrays)
            meta = {
                "format_version": FORMAT_VERSION,
                "transform": self.transform.to_dict(),
                "num_levels": self.num_levels,
                "num_leaves": self.num_leaves,
                "n": self.n,
                "stats": _to_json(self.stats),
            }
            with open(os.path.join(tmp, _META), "w") as f:
                json.dump(meta, f, indent=1)
            old = None
            if os.path.exists(directory):
                old = f"{directory}.old-{uuid.uuid4().hex}"
                os.replace(directory, old)
            os.replace(tmp, directory)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info(
            "saved cluster index (%d leaves, %d facts) to %s", self.num_leaves, self.n, directory
        )

    @classmethod
    def load(cls, directory: str) -> ClusterIndex:
        """Read an index written by :meth:`save`."""
        meta_path = os.path.join(directory, _META)
        arrays_path = os.path.join(directory, _ARRAYS)
        for p in (meta_path, arrays_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"not a cluster index directory, missing {p}")
        with open(meta_path) as f:
            meta = json.load(f)
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{meta_path}: format_version={meta.get('format_version')!r}, "
                f"this code reads {FORMAT_VERSION}"
            )
        levels = int(meta["num_levels"])
        with np.load(arrays_path) as z:
            centroids = [torch.from_numpy(z[f"centroids_{lv}"].copy()) for lv in range(levels)]
            parents = [z[f"parents_{lv}"].copy() for lv in range(1, levels)]
            fact_leaf = z["fact_leaf"].copy()
        return cls(
            transform=MipsTransform.from_dict(meta["transform"]),
            centroids=centroids,
            parents=parents,
            fact_leaf=fact_leaf,
            stats=meta.get("stats", {}),
        )


def _child_seed(seed: int, level: int, parent: int) -> int:
    """Independent, reproducible seed for the k-means of ``parent``'s children."""
    return int(np.random.SeedSequence([int(seed), level, parent]).generate_state(1)[0])


def _sizes(counts: np.ndarray) -> dict[str, Any]:
    return {
        "min": int(counts.min()),
        "max": int(counts.max()),
        "mean": float(counts.mean()),
        "empty": int((counts == 0).sum()),
        "imbalance": imbalance_factor(counts),
    }


def _reporter(progress: Progress, level: int) -> Progress:
    """``progress`` with the level (and parent -1: all parents of the level at once) added."""
    if progress is None:
        return None
    return lambda stat: progress({"level": level, "parent": -1, **stat})


def _grouped_kmeans(
    data_factory: DataFactory,
    transform: MipsTransform,
    spec: IndexSpec,
    ids: np.ndarray | None,
    groups: np.ndarray,
    ks: np.ndarray,
    seeds: np.ndarray,
    progress: Progress,
) -> KMeansResult:
    """:func:`~hmn.kmeans.grouped_spherical_kmeans` over the facts ``ids`` (None: all), grouped
    by ``groups``, ``ks[g]`` clusters and seed ``seeds[g]`` per group; the view is closed after."""
    data = data_factory(transform, ids, groups=groups, precision=spec.precision)
    try:
        return grouped_spherical_kmeans(data, ks, iters=spec.iters, tol=spec.tol, init=spec.init,
                                        progress=progress, group_seeds=seeds)
    finally:
        data.close()


def _assign(
    data_factory: DataFactory,
    transform: MipsTransform,
    spec: IndexSpec,
    ids: np.ndarray | None,
    groups: np.ndarray | None,
    centroids: torch.Tensor,
    offsets: np.ndarray,
    progress: Progress = None,
) -> np.ndarray:
    """Assign the facts ``ids`` (None: all) each to its most similar centroid of its group
    (``groups``, None: one group); one pass over them.

    With ``progress``, a pass over more than `ASSIGN_PIECE` facts runs piece by piece, reporting
    ``{"assign_done", "assign_total"}`` (facts) as it starts and after each piece. A piece is every P-th block of
    `_ASSIGN_BLOCK` facts, so it spreads over the whole memory and every shard of sharded data
    works on each piece. A fact's assignment does not depend on the others: the result is the
    same as in one pass."""
    n = int(data_factory.n if ids is None else ids.size)
    pieces = 1 if progress is None else -(-n // ASSIGN_PIECE)
    if progress is not None:
        progress({"assign_done": 0, "assign_total": n})  # the pass starts
    if pieces <= 1:
        data = data_factory(transform, ids, groups=groups, precision=spec.precision)
        try:
            out = data.assign_grouped(centroids, offsets)
        finally:
            data.close()
        if progress is not None:
            progress({"assign_done": n, "assign_total": n})
        return out
    out = np.empty(n, dtype=np.int64)  # (n,) cluster of each fact of the pass
    blocks = -(-n // _ASSIGN_BLOCK)
    done = 0
    for piece in range(pieces):
        starts = np.arange(piece, blocks, pieces, dtype=np.int64) * _ASSIGN_BLOCK
        pos = (starts[:, None] + np.arange(_ASSIGN_BLOCK)).ravel()  # sorted positions in the pass
        pos = pos[pos < n]
        data = data_factory(transform, pos if ids is None else ids[pos],
                            groups=None if groups is None else groups[pos],
                            precision=spec.precision)
        try:
            out[pos] = data.assign_grouped(centroids, offsets)
        finally:
            data.close()
        done += pos.size
        progress({"assign_done": done, "assign_total": n})
    return out


def _max_norm(data_factory: DataFactory) -> float:
    """The raw facts' largest norm, which the eq. 6 transform is fitted on (one pass)."""
    raw = data_factory(None, None)
    try:
        if raw.n != data_factory.n:
            raise ValueError(f"data_factory's full view has {raw.n} facts, its n={data_factory.n}")
        return float(raw.max_norm())
    finally:
        raw.close()


def _fit_top_level(
    data_factory: DataFactory,
    transform: MipsTransform,
    spec: IndexSpec,
    fit_ids: np.ndarray | None,
    progress: Progress,
) -> tuple[torch.Tensor, np.ndarray, dict]:
    """Level 0: one k-means with ``branching[0]`` clusters over all facts (or over the facts
    ``fit_ids``, then one assignment pass over all facts).

    Returns (centroids (C0, D + m), fact -> cluster (N,), the level's stats).
    """
    t0 = time.perf_counter()
    k = spec.branching[0]
    data = data_factory(transform, fit_ids, precision=spec.precision)
    try:
        res = spherical_kmeans(data, k, iters=spec.iters, tol=spec.tol, seed=spec.seed,
                               init=spec.init, progress=progress)
    finally:
        data.close()
    fact_cluster = res.assignments  # (N,) cluster of each fact
    if fit_ids is not None:
        offsets = np.array([0, k], dtype=np.int64)
        fact_cluster = _assign(data_factory, transform, spec, None, None, res.centroids, offsets,
                               progress)
    stats = {
        "level": 0,
        "num_clusters": k,
        "sizes": _sizes(np.bincount(fact_cluster, minlength=k)),
        "kmeans": res.stats,
        "seconds": time.perf_counter() - t0,
    }
    return res.centroids, fact_cluster, stats


def _fit_child_level(
    data_factory: DataFactory,
    transform: MipsTransform,
    spec: IndexSpec,
    level: int,
    parent_centroids: torch.Tensor,
    fact_cluster: np.ndarray,
    fit_ids: np.ndarray | None,
    progress: Progress,
) -> tuple[torch.Tensor, np.ndarray, np.ndarray, dict]:
    """One level > 0 of a hierarchical index by a single grouped k-means over all facts (or over
    the facts ``fit_ids``, followed by one grouped assignment pass over all facts).

    Children of parent 0 come first; a parent without (fitted) facts gets one child with its
    centroid.  Returns (centroids, parents, fact -> new cluster, the level's stats).
    """
    t0 = time.perf_counter()
    c_prev = parent_centroids.shape[0]
    fit_cluster = fact_cluster if fit_ids is None else fact_cluster[fit_ids]
    sizes = np.bincount(fit_cluster, minlength=c_prev)  # (C_prev,)
    ks = np.minimum(spec.branching[level], sizes)  # 0 for empty parents
    seeds = np.array([_child_seed(spec.seed, level, p) for p in range(c_prev)], dtype=np.uint64)
    res = _grouped_kmeans(data_factory, transform, spec, fit_ids, fit_cluster, ks, seeds, progress)
    # Insert one child (a copy of the parent's centroid) for every empty parent.
    kk = np.maximum(ks, 1)  # children per parent in the output
    out_off = np.concatenate([[0], np.cumsum(kk)])
    in_off = np.concatenate([[0], np.cumsum(ks)])
    out = torch.empty((int(out_off[-1]), parent_centroids.shape[1]), dtype=torch.float32)
    for p in range(c_prev):
        if ks[p] == 0:
            out[out_off[p]] = parent_centroids[p]
        else:
            out[out_off[p] : out_off[p + 1]] = res.centroids[in_off[p] : in_off[p + 1]]
    if fit_ids is None:
        owner = np.repeat(np.arange(c_prev), ks)[res.assignments]  # parent of each fact
        new_cluster = res.assignments - in_off[owner] + out_off[owner]
    else:  # every fact to its most similar child of its own parent
        new_cluster = _assign(data_factory, transform, spec, None, fact_cluster, out, out_off,
                              progress)
    parents = np.repeat(np.arange(c_prev, dtype=np.int64), kk)
    runs = [
        {
            "parent": int(p),
            "n": int(sizes[p]),
            "k": int(ks[p]),
            "iterations": len(res.stats),
            "objective": float(res.group_objectives[p]),
        }
        for p in np.flatnonzero(ks > 0)
    ]
    num = int(out_off[-1])
    stats = {
        "level": level,
        "num_clusters": num,
        "batched": True,
        "sizes": _sizes(np.bincount(new_cluster, minlength=num)),
        "kmeans": runs,
        "seconds": time.perf_counter() - t0,
    }
    logger.info("index level %d: %d clusters, sizes %s", level, num, stats["sizes"])
    return out, parents, new_cluster, stats


@dataclass
class _Leaves:
    """Working state of :func:`_split_leaves` (C leaves so far, N facts)."""

    centroids: torch.Tensor  # (C, D + m)
    parent: np.ndarray  # (C,) parent of each leaf (0 for a flat index)
    origin: np.ndarray  # (C,) the original leaf every leaf was cut from
    fact_leaf: np.ndarray  # (N,)
    stuck: np.ndarray  # (C,) leaves k-means could not split


def _split_round(
    data_factory: DataFactory,
    transform: MipsTransform,
    spec: IndexSpec,
    st: _Leaves,
    r: int,
    progress: Progress,
) -> dict | None:
    """Round ``r``: one grouped k-means over the facts of every leaf over the cap (None if there
    is none); its first piece keeps the leaf's number, the others become new leaves."""
    t0 = time.perf_counter()
    cap = spec.max_leaf_size
    sizes = np.bincount(st.fact_leaf, minlength=st.centroids.shape[0])
    big = np.flatnonzero((sizes > cap) & ~st.stuck)
    if big.size == 0:
        return None
    is_big = np.zeros(sizes.size, dtype=bool)
    is_big[big] = True
    ids = np.flatnonzero(is_big[st.fact_leaf])  # (n_big,) sorted fact ids in big leaves
    groups = np.searchsorted(big, st.fact_leaf[ids])  # (n_big,) position of the leaf in `big`
    ks = np.minimum(-(-sizes[big] // cap), sizes[big])  # (G,) >= 2
    seeds = np.array([_child_seed(spec.seed, 1000 + r, int(leaf)) for leaf in big], dtype=np.uint64)
    res = _grouped_kmeans(data_factory, transform, spec, ids, groups, ks, seeds, progress)
    offsets = np.concatenate([[0], np.cumsum(ks)])
    first = offsets[:-1]
    rest = np.ones(int(offsets[-1]), dtype=bool)
    rest[first] = False
    n_new = int(rest.sum())
    new_leaf = np.empty(int(offsets[-1]), dtype=np.int64)  # leaf number of each centroid
    new_leaf[first] = big
    new_leaf[rest] = st.centroids.shape[0] + np.arange(n_new)
    owner = big[np.repeat(np.arange(big.size), ks)[rest]]  # (n_new,) leaf each was cut from
    st.centroids[torch.from_numpy(big)] = res.centroids[torch.from_numpy(first)]
    st.centroids = torch.cat([st.centroids, res.centroids[torch.from_numpy(rest)]], dim=0)
    st.parent = np.concatenate([st.parent, st.parent[owner]])
    st.origin = np.concatenate([st.origin, st.origin[owner]])
    st.fact_leaf[ids] = new_leaf[res.assignments]
    largest = np.maximum.reduceat(np.bincount(res.assignments, minlength=new_leaf.size), first)
    whole = largest == sizes[big]  # k-means could not separate any fact
    st.stuck = np.concatenate([st.stuck, np.zeros(n_new, dtype=bool)])
    st.stuck[big[whole]] = True
    return {"round": r, "split": int(big.size), "facts": int(ids.size), "new_leaves": n_new,
            "unsplittable": int(whole.sum()), "iterations": len(res.stats),
            "seconds": time.perf_counter() - t0}  # fmt: skip


def _assign_to_pieces(
    data_factory: DataFactory, transform: MipsTransform, spec: IndexSpec, st: _Leaves, c0: int,
    progress: Progress = None,
) -> dict:
    """Every fact of a split leaf to the most similar piece of that leaf (one grouped pass)."""
    t0 = time.perf_counter()
    pieces_of = np.bincount(st.origin, minlength=c0)  # (C0,) pieces per original leaf
    split_orig = np.flatnonzero(pieces_of > 1)
    is_split = np.zeros(c0, dtype=bool)
    is_split[split_orig] = True
    pieces = np.flatnonzero(is_split[st.origin])  # leaves cut from a split leaf
    pieces = pieces[np.argsort(st.origin[pieces], kind="stable")]  # grouped by original leaf
    piece_off = np.concatenate([[0], np.cumsum(pieces_of[split_orig])])
    ids = np.flatnonzero(is_split[st.origin[st.fact_leaf]])
    groups = np.searchsorted(split_orig, st.origin[st.fact_leaf[ids]])
    centroids = st.centroids[torch.from_numpy(pieces)]
    st.fact_leaf[ids] = pieces[
        _assign(data_factory, transform, spec, ids, groups, centroids, piece_off, progress)
    ]
    after = np.bincount(st.fact_leaf, minlength=st.centroids.shape[0])
    return {"round": "assign", "facts": int(ids.size),
            "over_cap": int((after > spec.max_leaf_size).sum()),
            "seconds": time.perf_counter() - t0}  # fmt: skip


def _split_leaves(
    data_factory: DataFactory,
    transform: MipsTransform,
    spec: IndexSpec,
    centroids: list[torch.Tensor],
    parents: list[np.ndarray],
    fact_leaf: np.ndarray,
    progress: Progress = None,
    rounds: int = 8,
) -> tuple[np.ndarray, list[torch.Tensor], list[np.ndarray], dict]:
    """Split every leaf of more than ``spec.max_leaf_size`` facts into ``ceil(size / cap)``
    leaves under the same parent by a spherical k-means of its own facts; pieces still too big
    are split again (up to ``rounds`` rounds); then every fact of a split leaf moves to the most
    similar of that leaf's pieces (one grouped assignment pass), as a query would pick them.

    The leaves' sizes are what a query pays: a reader takes its top leaves by centroid score,
    and with k-means' uneven leaves (FB2M: mean 331 facts, largest 12,809) the queries that land
    in big leaves read many times the mean. All big leaves of a round are clustered in one
    grouped k-means (:func:`~hmn.kmeans.grouped_spherical_kmeans`: ``iters`` passes over their
    facts only). The final assignment may leave some leaves over the cap (reported), as may
    the rounds' limit for very concentrated leaves (FB2M: many facts of one subject); a leaf
    whose k-means separates no fact at all (identical facts) is not split again. A split leaf's
    first piece keeps its number, the others are new leaves; the leaves are then renumbered so
    that each parent's children stay contiguous. Upper levels are unchanged (a parent's subtree
    holds the same facts).

    Returns (fact -> leaf, centroids per level, parents per level, the split's entry in the
    index's ``levels`` stats: sizes before and after, per-round stats, seconds).
    """
    t0 = time.perf_counter()
    c0 = centroids[-1].shape[0]
    before = _sizes(np.bincount(fact_leaf, minlength=c0))
    st = _Leaves(
        centroids=centroids[-1].clone(),
        parent=parents[-1].copy() if parents else np.zeros(c0, dtype=np.int64),
        origin=np.arange(c0, dtype=np.int64),
        fact_leaf=np.asarray(fact_leaf, dtype=np.int64).copy(),
        stuck=np.zeros(c0, dtype=bool),
    )
    stats: list[dict] = []
    for r in range(rounds):
        done = _split_round(data_factory, transform, spec, st, r, progress)
        if done is None:
            break
        stats.append(done)
        if progress is not None:
            progress({"split_round": r, **done})
    if stats:
        stats.append(_assign_to_pieces(data_factory, transform, spec, st, c0, progress))
    # children of each parent contiguous again (the documented numbering)
    perm = np.argsort(st.parent, kind="stable")  # new position -> old leaf
    inverse = np.empty_like(perm)
    inverse[perm] = np.arange(perm.size)
    out_centroids = [*centroids[:-1], st.centroids[torch.from_numpy(perm)]]
    out_parents = [*parents[:-1], st.parent[perm]] if parents else []
    out_leaf = inverse[st.fact_leaf]
    level = {
        "level": "split",
        "max_leaf_size": int(spec.max_leaf_size),
        "num_clusters": int(perm.size),
        "sizes_before": before,
        "sizes": _sizes(np.bincount(out_leaf, minlength=perm.size)),
        "rounds": stats,
        "seconds": time.perf_counter() - t0,
    }
    logger.info(
        "index: leaves over %d facts split in %d rounds: %d leaves, sizes %s",
        spec.max_leaf_size, sum(r["round"] != "assign" for r in stats), level["num_clusters"],
        level["sizes"],
    )  # fmt: skip
    return out_leaf, out_centroids, out_parents, level


def _fit_ids(spec: IndexSpec, n: int) -> np.ndarray | None:
    """The sorted, seeded sample of ``spec.fit_sample`` fact ids every level is fitted on (None:
    fit on all facts, also when fit_sample >= n)."""
    if not 0 < spec.fit_sample < n:
        return None
    if spec.fit_sample < spec.branching[0]:
        raise ValueError(
            f"fit_sample={spec.fit_sample} is smaller than branching[0]={spec.branching[0]}"
        )
    rng = np.random.default_rng([spec.seed, 0xF17])
    return np.sort(rng.choice(n, size=spec.fit_sample, replace=False)).astype(np.int64)


def build_index(
    data_factory: DataFactory, spec: IndexSpec, progress: Progress = None
) -> ClusterIndex:
    """Build the flat (``(C,)``) or hierarchical (``(C1, C2, ...)``) cluster index of ``spec``
    over the facts of ``data_factory`` (see :class:`DataFactory`).

    Steps: fit the transform (eq. 6) on the largest norm, fit level 0, fit each deeper level
    (one grouped k-means per level), each fitted on the ``fit_sample`` facts and followed by one
    assignment pass over all facts when fit_sample is set, and split the leaves over
    ``max_leaf_size``.

    Args:
        data_factory: makes the views of the facts, see :class:`DataFactory`.
        spec: what to build, see :class:`IndexSpec`.
        progress: called with every k-means iteration's stats plus "level" and "parent" (-1:
            every parent of the level at once), with every split round's stats, and during
            each assignment pass with ``{"assign_done", "assign_total"}`` (plus "level" and
            "parent"; see `_assign`).
    """
    if not isinstance(spec, IndexSpec):
        raise TypeError(f"spec must be an IndexSpec, got {type(spec).__name__}")
    t_start = time.perf_counter()
    n = int(data_factory.n)
    branching = check_branching(spec.branching, n)
    fit_ids = _fit_ids(spec, n)
    max_norm = _max_norm(data_factory)
    transform = fit_transform(max_norm, U=spec.U, m=spec.m)  # eq. 6
    top, fact_cluster, top_stats = _fit_top_level(
        data_factory, transform, spec, fit_ids, _reporter(progress, 0)
    )
    centroids, parents, level_stats = [top], [], [top_stats]
    for level in range(1, len(branching)):
        c, p, fact_cluster, stats = _fit_child_level(
            data_factory, transform, spec, level, centroids[-1], fact_cluster, fit_ids,
            _reporter(progress, level),
        )  # fmt: skip
        centroids.append(c)
        parents.append(p)
        level_stats.append(stats)
    if spec.max_leaf_size > 0:
        fact_cluster, centroids, parents, split = _split_leaves(
            data_factory, transform, spec, centroids, parents, fact_cluster,
            _reporter(progress, len(centroids)),
        )  # fmt: skip
        level_stats.append(split)
    stats = {
        "n": n,
        "dim": int(centroids[0].shape[1]),
        "max_norm": max_norm,
        "transform": transform.to_dict(),
        "branching": branching,
        "iters": spec.iters,
        "tol": spec.tol,
        "seed": spec.seed,
        "init": spec.init,
        "fit_sample": int(fit_ids.size) if fit_ids is not None else 0,
        "max_leaf_size": int(spec.max_leaf_size),
        "levels": level_stats,
        "leaf_sizes": _sizes(np.bincount(fact_cluster, minlength=centroids[-1].shape[0])),
        "seconds": time.perf_counter() - t_start,
    }
    logger.info("built cluster index: N=%d, branching=%s, %d leaves in %.2fs",
                n, branching, centroids[-1].shape[0], stats["seconds"])  # fmt: skip
    return ClusterIndex(transform, centroids, parents, fact_cluster, stats)


def split_leaves(
    index: ClusterIndex, data_factory: DataFactory, spec: IndexSpec, progress: Progress = None
) -> ClusterIndex:
    """A copy of ``index`` whose leaves of more than ``spec.max_leaf_size`` facts are split (the
    last step of :func:`build_index`, see :func:`_split_leaves`), for an index that is already
    built; ``spec`` gives the cap and the k-means settings (iters, tol, seed, init, precision).
    ``data_factory`` must serve the facts the index was built on."""
    if spec.max_leaf_size < 1:
        raise ValueError(f"max_leaf_size={spec.max_leaf_size!r}: must be an integer >= 1")
    if data_factory.n != index.n:
        raise ValueError(f"data_factory gives {data_factory.n} facts, the index has {index.n}")
    fact_leaf, centroids, parents, split_level = _split_leaves(
        data_factory, index.transform, spec, index.centroids, index.parents, index.fact_leaf,
        progress,
    )  # fmt: skip
    stats = dict(index.stats)
    stats["levels"] = [*stats.get("levels", []), split_level]
    stats["max_leaf_size"] = int(spec.max_leaf_size)
    stats["leaf_sizes"] = split_level["sizes"]
    return ClusterIndex(index.transform, centroids, parents, fact_leaf, stats)


def build_index_from_vectors(
    vectors: torch.Tensor | np.ndarray | FactorisedMemory,
    spec: IndexSpec | None = None,
    *,
    progress: Progress = None,
    device: str | torch.device | None = None,
    **fields: Any,
) -> ClusterIndex:
    """In-memory convenience: :func:`build_index` over :class:`InMemoryDataFactory` (or
    :class:`FactorisedDataFactory` when ``vectors`` is a :class:`~hmn.memory.FactorisedMemory`).

    ``fields``: :class:`IndexSpec` fields, replacing those of ``spec`` (or making the spec when
    ``spec`` is None), e.g. ``build_index_from_vectors(x, branching=[16], seed=1)``.
    ``device``: where k-means computes (default where ``vectors`` are; rows held elsewhere are
    staged chunk by chunk); the index itself is returned on the CPU either way.
    """
    spec = IndexSpec(**fields) if spec is None else dataclasses.replace(spec, **fields)
    if isinstance(vectors, FactorisedMemory):
        factory = FactorisedDataFactory(vectors, device=device)
    else:
        factory = InMemoryDataFactory(vectors, device=device)
    return build_index(factory, spec, progress)
