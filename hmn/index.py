"""Cluster index for approximate K-MIPS (paper section 3.2, eq. 6-8).

Build: fit the MIPS transform P (eq. 6-7) on the facts' largest norm, then cluster the unit-norm
transformed facts P(x)/||P(x)|| with spherical k-means, flat or hierarchical:

* ``branching=[C]``: one k-means with C clusters; the clusters are the leaves.
* ``branching=[C1, C2, ...]``: k-means with C1 clusters on all facts, then inside every cluster of
  level l-1 a k-means with min(C_l, size) clusters, and so on.  Leaves (last level) are numbered
  globally, children of parent 0 first.  An empty cluster gets a single empty child whose centroid
  is its own, so every cluster has at least one child.

The build never touches the data matrix: it goes through a *data factory* (see
:class:`DataFactory`), so the same code runs in memory (:class:`InMemoryDataFactory`) or on Ray
actors holding shards of the memory (``pipeline.kmeans_ray``).

Short names: N facts, D fact dimension, m appended components (transformed dimension D + m),
C_l clusters at level l, L levels.
"""

from __future__ import annotations

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
from typing import Any, Protocol

import numpy as np
import torch

from hmn.kmeans import (
    DataAccess,
    FactorisedData,
    InMemoryData,
    grouped_spherical_kmeans,
    imbalance_factor,
    spherical_kmeans,
)
from hmn.memory import FactorisedMemory
from hmn.mips import MipsTransform, fit_transform

logger = logging.getLogger(__name__)

__all__ = [
    "ClusterIndex",
    "DataFactory",
    "FactorisedDataFactory",
    "InMemoryDataFactory",
    "build_index",
    "split_leaves",
    "check_branching",
    "check_subset_ids",
    "build_index_from_vectors",
]

FORMAT_VERSION = 1
_ARRAYS = "arrays.npz"
_META = "index.json"


class DataFactory(Protocol):
    """Makes the :class:`~hmn.kmeans.DataAccess` views that :func:`build_index` clusters.

    ``factory(transform, ids)`` returns an adapter over the facts ``ids`` (all N facts when
    ``ids`` is None; otherwise a sorted, duplicate-free int64 array of global fact ids, and the
    adapter's row i is fact ``ids[i]``):

    * ``transform=None``: raw facts; build_index only calls ``max_norm()`` on it (to fit eq. 6).
    * ``transform=t``: rows are ``t.facts(x)`` (eq. 6-7), unit-normalised by the adapter.

    A factory that accepts ``groups=`` (an (n,) int64 group label per row of the view) returns a
    grouped adapter (``partial_stats_grouped`` / ``assign_grouped``); :func:`build_index` then
    clusters all parents of a level in one pass (``batched_levels=True``).

    If the adapter has a ``close()`` method, build_index calls it when done with that view.
    """

    def __call__(
        self, transform: MipsTransform | None, ids: np.ndarray | None, groups: np.ndarray | None = None
    ) -> DataAccess: ...


class InMemoryDataFactory:
    """:class:`DataFactory` over an (N, D) tensor in this process (CPU or CUDA)."""

    def __init__(self, vectors: torch.Tensor | np.ndarray, chunk: int = 65536,
                 precision: str = "float32") -> None:
        if isinstance(vectors, np.ndarray):
            vectors = torch.from_numpy(vectors)
        if not isinstance(vectors, torch.Tensor):
            raise TypeError(f"vectors must be a tensor or ndarray, got {type(vectors).__name__}")
        if vectors.ndim != 2 or vectors.shape[0] == 0:
            raise ValueError(f"vectors must be (N, D) with N >= 1, got {tuple(vectors.shape)}")
        self.vectors = vectors.to(torch.float32)  # (N, D)
        self.chunk = chunk
        self.precision = precision

    @property
    def n(self) -> int:
        return int(self.vectors.shape[0])

    def __call__(
        self, transform: MipsTransform | None, ids: np.ndarray | None, groups: np.ndarray | None = None
    ) -> InMemoryData:
        x = self.vectors
        if ids is not None:
            ids = check_subset_ids(ids, self.n)
            x = x[torch.from_numpy(ids).to(x.device)]  # (len(ids), D)
        fn = None if transform is None else transform.facts
        return InMemoryData(x, self.chunk, transform=fn, groups=groups, precision=self.precision)


class FactorisedDataFactory:
    """:class:`DataFactory` over a :class:`~hmn.memory.FactorisedMemory`: views gather fact rows
    from the entity / relation / fact tables chunk by chunk (:class:`~hmn.kmeans.FactorisedData`),
    so an FB2M-sized memory is clustered without its (N, D) matrix."""

    def __init__(self, memory: FactorisedMemory, chunk: int = 65536,
                 precision: str = "float32") -> None:
        if not isinstance(memory, FactorisedMemory):
            raise TypeError(f"memory must be a FactorisedMemory, got {type(memory).__name__}")
        self.memory = memory
        self.chunk = chunk
        self.precision = precision

    @property
    def n(self) -> int:
        return self.memory.n

    def __call__(
        self, transform: MipsTransform | None, ids: np.ndarray | None, groups: np.ndarray | None = None
    ) -> FactorisedData:
        if ids is not None:
            ids = check_subset_ids(ids, self.n)
        fn = None if transform is None else transform.facts
        return FactorisedData(self.memory, ids, self.chunk, transform=fn, groups=groups,
                              precision=self.precision)


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


def _close(data: object) -> None:
    close = getattr(data, "close", None)
    if callable(close):
        close()


def _child_seed(seed: int, level: int, parent: int) -> int:
    """Independent, reproducible seed for the k-means of ``parent``'s children."""
    return int(np.random.SeedSequence([int(seed), level, parent]).generate_state(1)[0])


def check_branching(branching: list[int], n: int) -> list[int]:
    """Validate ``branching`` for N = n facts; returns it as a list of ints."""
    if not isinstance(branching, (list, tuple)) or len(branching) == 0:
        raise ValueError(f"branching={branching!r}: must be a non-empty list of cluster counts")
    for i, b in enumerate(branching):
        if isinstance(b, bool) or not isinstance(b, numbers.Integral) or b < 1:
            raise ValueError(f"branching[{i}]={b!r}: must be an integer >= 1")
    if branching[0] > n:
        raise ValueError(f"branching[0]={branching[0]}: must be <= n={n} (k <= n)")
    return [int(b) for b in branching]


def _sizes(counts: np.ndarray) -> dict[str, Any]:
    return {
        "min": int(counts.min()),
        "max": int(counts.max()),
        "mean": float(counts.mean()),
        "empty": int((counts == 0).sum()),
        "imbalance": imbalance_factor(counts),
    }


def _grouped_kmeans(
    data_factory: DataFactory,
    transform: MipsTransform,
    ids: np.ndarray | None,
    groups: np.ndarray,
    ks: np.ndarray,
    seeds: np.ndarray,
    **kw: Any,
):
    """:func:`~hmn.kmeans.grouped_spherical_kmeans` over the facts ``ids`` (None: all), grouped
    by ``groups``, ``ks[g]`` clusters and seed ``seeds[g]`` per group; the view is closed after."""
    data = data_factory(transform, ids, groups=groups)
    try:
        return grouped_spherical_kmeans(data, ks, group_seeds=seeds, **kw)
    finally:
        _close(data)


def _grouped_level(
    data_factory: DataFactory,
    transform: MipsTransform,
    fact_cluster: np.ndarray,
    parent_centroids: torch.Tensor,
    branching: int,
    *,
    level: int,
    iters: int,
    tol: float,
    seed: int,
    init: str,
    progress: Callable[[dict], None] | None,
    fit_ids: np.ndarray | None = None,
) -> tuple[np.ndarray, torch.Tensor, np.ndarray, list[dict], int]:
    """One level > 0 of a hierarchical index by a single grouped k-means over all facts (or over
    the facts ``fit_ids``, followed by one grouped assignment pass over all facts).

    Returns (fact -> new cluster, centroids, parents, per-parent stats, number of clusters).
    Children of parent 0 come first; a parent without (fitted) facts gets one child with its
    centroid.
    """
    c_prev = parent_centroids.shape[0]
    fit_cluster = fact_cluster if fit_ids is None else fact_cluster[fit_ids]
    sizes = np.bincount(fit_cluster, minlength=c_prev)  # (C_prev,)
    ks = np.minimum(branching, sizes)  # 0 for empty parents
    seeds = np.array([_child_seed(seed, level, p) for p in range(c_prev)], dtype=np.uint64)
    res = _grouped_kmeans(data_factory, transform, fit_ids, fit_cluster, ks, seeds, iters=iters,
                          tol=tol, init=init, progress=progress)  # fmt: skip
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
        owner = np.repeat(np.arange(c_prev), ks)  # parent of each grouped centroid
        new_cluster = res.assignments - in_off[owner[res.assignments]] + out_off[
            owner[res.assignments]
        ]
    else:  # every fact to its most similar child of its own parent
        full = data_factory(transform, None, groups=fact_cluster)
        try:
            new_cluster = full.assign_grouped(out, out_off)
        finally:
            _close(full)
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
    return new_cluster, out, parents, runs, int(out_off[-1])


def _split_leaves(
    data_factory: DataFactory,
    transform: MipsTransform,
    centroids: list[torch.Tensor],
    parents: list[np.ndarray],
    fact_leaf: np.ndarray,
    max_leaf_size: int,
    *,
    iters: int,
    tol: float,
    seed: int,
    init: str,
    progress: Callable[[dict], None] | None = None,
    rounds: int = 8,
) -> tuple[np.ndarray, list[torch.Tensor], list[np.ndarray], list[dict]]:
    """Split every leaf of more than ``max_leaf_size`` facts into ``ceil(size / max_leaf_size)``
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

    Returns (fact -> leaf, centroids per level, parents per level, per-round stats).
    """
    leaves = centroids[-1].clone()
    c0 = leaves.shape[0]
    leaf_parent = parents[-1].copy() if parents else np.zeros(c0, dtype=np.int64)
    origin = np.arange(c0, dtype=np.int64)  # the original leaf every leaf was cut from
    fact_leaf = np.asarray(fact_leaf, dtype=np.int64).copy()
    stuck = np.zeros(c0, dtype=bool)  # leaves k-means could not split
    stats: list[dict] = []
    for r in range(rounds):
        t0 = time.perf_counter()
        sizes = np.bincount(fact_leaf, minlength=leaves.shape[0])
        big = np.flatnonzero((sizes > max_leaf_size) & ~stuck)
        if big.size == 0:
            break
        is_big = np.zeros(sizes.size, dtype=bool)
        is_big[big] = True
        ids = np.flatnonzero(is_big[fact_leaf])  # (n_big,) sorted fact ids in big leaves
        groups = np.searchsorted(big, fact_leaf[ids])  # (n_big,) position of the leaf in `big`
        ks = np.minimum(-(-sizes[big] // max_leaf_size), sizes[big])  # (G,) >= 2
        seeds = np.array([_child_seed(seed, 1000 + r, int(leaf)) for leaf in big], dtype=np.uint64)
        res = _grouped_kmeans(data_factory, transform, ids, groups, ks, seeds, iters=iters,
                              tol=tol, init=init, progress=progress)  # fmt: skip
        offsets = np.concatenate([[0], np.cumsum(ks)])
        first = offsets[:-1]
        rest = np.ones(int(offsets[-1]), dtype=bool)
        rest[first] = False
        n_new = int(rest.sum())
        new_leaf = np.empty(int(offsets[-1]), dtype=np.int64)  # leaf number of each centroid
        new_leaf[first] = big
        new_leaf[rest] = leaves.shape[0] + np.arange(n_new)
        owner = big[np.repeat(np.arange(big.size), ks)[rest]]  # (n_new,) leaf each was cut from
        leaves[torch.from_numpy(big)] = res.centroids[torch.from_numpy(first)]
        leaves = torch.cat([leaves, res.centroids[torch.from_numpy(rest)]], dim=0)
        leaf_parent = np.concatenate([leaf_parent, leaf_parent[owner]])
        origin = np.concatenate([origin, origin[owner]])
        fact_leaf[ids] = new_leaf[res.assignments]
        largest = np.maximum.reduceat(np.bincount(res.assignments, minlength=new_leaf.size), first)
        whole = largest == sizes[big]  # k-means could not separate any fact
        stuck = np.concatenate([stuck, np.zeros(n_new, dtype=bool)])
        stuck[big[whole]] = True
        stats.append({"round": r, "split": int(big.size), "facts": int(ids.size),
                      "new_leaves": n_new, "unsplittable": int(whole.sum()),
                      "iterations": len(res.stats), "seconds": time.perf_counter() - t0})  # fmt: skip
        if progress is not None:
            progress({"split_round": r, **stats[-1]})
    if stats:
        # every fact of a split leaf to the most similar piece of that leaf
        t0 = time.perf_counter()
        pieces_of = np.bincount(origin, minlength=c0)  # (C0,) pieces per original leaf
        split_orig = np.flatnonzero(pieces_of > 1)
        is_split = np.zeros(c0, dtype=bool)
        is_split[split_orig] = True
        pieces = np.flatnonzero(is_split[origin])  # leaves cut from a split leaf
        pieces = pieces[np.argsort(origin[pieces], kind="stable")]  # grouped by original leaf
        piece_off = np.concatenate([[0], np.cumsum(pieces_of[split_orig])])
        ids = np.flatnonzero(is_split[origin[fact_leaf]])
        groups = np.searchsorted(split_orig, origin[fact_leaf[ids]])
        data = data_factory(transform, ids, groups=groups)
        try:
            fact_leaf[ids] = pieces[data.assign_grouped(leaves[torch.from_numpy(pieces)], piece_off)]
        finally:
            _close(data)
        after = np.bincount(fact_leaf, minlength=leaves.shape[0])
        stats.append({"round": "assign", "facts": int(ids.size),
                      "over_cap": int((after > max_leaf_size).sum()),
                      "seconds": time.perf_counter() - t0})  # fmt: skip
    # children of each parent contiguous again (the documented numbering)
    perm = np.argsort(leaf_parent, kind="stable")  # new position -> old leaf
    inverse = np.empty_like(perm)
    inverse[perm] = np.arange(perm.size)
    out_centroids = [*centroids[:-1], leaves[torch.from_numpy(perm)]]
    out_parents = [*parents[:-1], leaf_parent[perm]] if parents else []
    return inverse[fact_leaf], out_centroids, out_parents, stats


def _split_level(
    data_factory: DataFactory,
    transform: MipsTransform,
    centroids: list[torch.Tensor],
    parents: list[np.ndarray],
    fact_leaf: np.ndarray,
    max_leaf_size: int,
    **kw: Any,
) -> tuple[np.ndarray, list[torch.Tensor], list[np.ndarray], dict]:
    """:func:`_split_leaves` plus its entry in the index's ``levels`` stats (sizes before and
    after, rounds, seconds)."""
    t0 = time.perf_counter()
    before = _sizes(np.bincount(fact_leaf, minlength=centroids[-1].shape[0]))
    fact_leaf, centroids, parents, rounds = _split_leaves(
        data_factory, transform, centroids, parents, fact_leaf, int(max_leaf_size), **kw
    )
    level = {
        "level": "split",
        "max_leaf_size": int(max_leaf_size),
        "num_clusters": int(centroids[-1].shape[0]),
        "sizes_before": before,
        "sizes": _sizes(np.bincount(fact_leaf, minlength=centroids[-1].shape[0])),
        "rounds": rounds,
        "seconds": time.perf_counter() - t0,
    }
    logger.info(
        "index: leaves over %d facts split in %d rounds: %d leaves, sizes %s",
        max_leaf_size, sum(r["round"] != "assign" for r in rounds), level["num_clusters"],
        level["sizes"],
    )  # fmt: skip
    return fact_leaf, centroids, parents, level


def _refine_leaves(
    data: DataAccess,
    centroids: list[torch.Tensor],
    parents: list[np.ndarray],
    iters: int,
    progress: Callable[[dict], None] | None = None,
) -> tuple[np.ndarray, list[torch.Tensor], list[dict]]:
    """Global Lloyd iterations over the leaves of a hierarchical index.

    A nested clustering assigns a fact only among the children of its parent, but a query picks
    leaves by their centroids over the whole level (ClusteredReader), so facts near a parent
    boundary sit in a leaf whose centroid is not their most similar one and are missed.  Here
    every fact may join any leaf: ``iters`` spherical k-means iterations over all leaves, starting
    from the nested leaves (the objective cannot decrease), then a final global assignment.  The
    tree is kept: upper-level centroids become the normalised sums of their children's rows, so
    a beam over them still routes to the leaves of similar facts.  Empty leaves keep their
    centroid (the reader skips them).

    Returns (fact -> leaf, centroids per level, per-iteration stats).
    """
    leaves = centroids[-1].to(torch.float32).clone()  # (C, d)
    k, d = leaves.shape
    stats: list[dict] = []
    sums = np.zeros((k, d))
    for it in range(iters):
        t0 = time.perf_counter()
        sums, counts, objective = data.partial_stats(leaves)
        sums = np.asarray(sums, dtype=np.float64)  # (C, d)
        counts = np.asarray(counts, dtype=np.int64)
        norms = np.linalg.norm(sums, axis=1)
        ok = (counts > 0) & (norms > 0)
        new = leaves.to(torch.float64).numpy().copy()
        new[ok] = sums[ok] / norms[ok, None]
        leaves = torch.from_numpy(new.astype(np.float32))
        stat = {"iteration": it, "objective": float(objective),
                "imbalance": imbalance_factor(counts), "empty": int((counts == 0).sum()),
                "seconds": time.perf_counter() - t0}
        stats.append(stat)
        if progress is not None:
            progress(dict(stat))
    fact_leaf = np.asarray(data.assign(leaves), dtype=np.int64)
    out = [*centroids[:-1], leaves]
    # Upper levels, bottom-up: normalised sum of the children's row sums.
    child_sums = sums
    for level in range(len(out) - 2, -1, -1):
        par = parents[level]  # (C_{level+1},) parent of every cluster of the next level
        up = np.zeros((out[level].shape[0], d))
        np.add.at(up, par, child_sums)
        norms = np.linalg.norm(up, axis=1)
        cur = out[level].to(torch.float64).numpy().copy()
        ok = norms > 0
        cur[ok] = up[ok] / norms[ok, None]
        out[level] = torch.from_numpy(cur.astype(np.float32))
        child_sums = up
    return fact_leaf, out, stats


def build_index(    data_factory: DataFactory,
    *,
    n: int,
    branching: list[int],
    U: float = 0.75,
    m: int = 3,
    iters: int = 20,
    tol: float = 1e-4,
    seed: int = 0,
    init: str = "kmeans++",
    progress: Callable[[dict], None] | None = None,
    batched_levels: bool = True,
    refine_leaves: int = 0,
    fit_sample: int = 0,
    max_leaf_size: int = 0,
) -> ClusterIndex:
    """Build a flat (``[C]``) or hierarchical (``[C1, C2, ...]``) cluster index.

    Args:
        data_factory: ``(transform | None, ids | None) -> DataAccess``, see :class:`DataFactory`.
        n: number of facts N (checked against the factory's full view).
        branching: clusters per level, top first.
        U, m: MIPS transform parameters (eq. 6-7).
        iters, tol, init: spherical k-means parameters.
        seed: seeds level 0; child k-means get seeds derived from (seed, level, parent).
        progress: called with every k-means iteration's stats plus "level" and "parent"
            (parent -1 for a batched level).
        batched_levels: cluster all parents of a level > 0 in one grouped k-means
            (:func:`~hmn.kmeans.grouped_spherical_kmeans`: ``iters`` passes over the data per
            level instead of one k-means per parent); False runs one k-means per parent.
        refine_leaves: hierarchical index only: after the last level, this many Lloyd iterations
            over *all* leaves (every fact may move to any leaf, not only to the children of its
            parent), then every fact goes to its most similar leaf and the upper levels'
            centroids become the normalised means of their subtrees (see :func:`_refine_leaves`).
            0 (default) keeps the strictly nested clustering.
        fit_sample: when 0 < fit_sample < n, every level's k-means iterates over the same seeded
            random sample of ``fit_sample`` facts, and one assignment pass then places all n facts
            (the usual large-scale practice, as faiss's ``max_points_per_centroid``): ``iters + 1``
            passes over a sample and one over all facts per level instead of ``iters`` over all.
            Needs ``batched_levels`` for hierarchical indexes.
        max_leaf_size: when > 0, last step: every leaf of more facts than this is split by a
            k-means of its facts into leaves under the same parent (:func:`_split_leaves`), so
            that a query reading its top leaves is not charged the few oversized ones. 0
            (default) keeps k-means' leaves.
    """
    if isinstance(max_leaf_size, bool) or not isinstance(max_leaf_size, numbers.Integral) or (
        max_leaf_size < 0
    ):
        raise ValueError(f"max_leaf_size={max_leaf_size!r}: must be an integer >= 0")
    if isinstance(fit_sample, bool) or not isinstance(fit_sample, numbers.Integral) or fit_sample < 0:
        raise ValueError(f"fit_sample={fit_sample!r}: must be an integer >= 0")
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n={n!r}: must be an integer >= 1")
    if isinstance(refine_leaves, bool) or not isinstance(refine_leaves, numbers.Integral) or (
        refine_leaves < 0
    ):
        raise ValueError(f"refine_leaves={refine_leaves!r}: must be an integer >= 0")
    branching = check_branching(branching, int(n))
    t_start = time.perf_counter()
    fit_ids: np.ndarray | None = None
    if 0 < fit_sample < n:
        if len(branching) > 1 and not batched_levels:
            raise ValueError("fit_sample needs batched_levels=True for a hierarchical index")
        if fit_sample < int(np.prod(branching[:1])):
            raise ValueError(f"fit_sample={fit_sample} is smaller than branching[0]={branching[0]}")
        rng = np.random.default_rng([seed, 0xF17])
        fit_ids = np.sort(rng.choice(int(n), size=int(fit_sample), replace=False)).astype(np.int64)

    raw = data_factory(None, None)
    if raw.n != n:
        raise ValueError(f"data_factory gives {raw.n} facts, but n={n}")
    max_norm = float(raw.max_norm())
    _close(raw)
    transform = fit_transform(max_norm, U=U, m=m)  # eq. 6

    def reporter(level: int, parent: int) -> Callable[[dict], None] | None:
        if progress is None:
            return None
        return lambda stat: progress({"level": level, "parent": parent, **stat})

    # Level 0: all facts.
    t0 = time.perf_counter()
    data = data_factory(transform, fit_ids)
    try:
        res = spherical_kmeans(
            data, branching[0], iters=iters, tol=tol, seed=seed, init=init, progress=reporter(0, -1)
        )
    finally:
        _close(data)
    centroids = [res.centroids]
    parents: list[np.ndarray] = []
    if fit_ids is None:
        fact_cluster = res.assignments  # (N,) cluster of each fact at the current level
    else:
        data = data_factory(transform, None)
        try:
            fact_cluster = data.assign(res.centroids)
        finally:
            _close(data)
    counts = np.bincount(fact_cluster, minlength=branching[0])
    level_stats = [
        {
            "level": 0,
            "num_clusters": branching[0],
            "sizes": _sizes(counts),
            "kmeans": res.stats,
            "seconds": time.perf_counter() - t0,
        }
    ]

    for level in range(1, len(branching)):
        t0 = time.perf_counter()
        c_prev = centroids[-1].shape[0]
        if batched_levels:
            new_cluster, lc, lp, runs, offset = _grouped_level(
                data_factory, transform, fact_cluster, centroids[-1], branching[level],
                level=level, iters=iters, tol=tol, seed=seed, init=init,
                progress=reporter(level, -1), fit_ids=fit_ids,
            )
            centroids.append(lc)
            parents.append(lp)
            fact_cluster = new_cluster
            counts = np.bincount(fact_cluster, minlength=offset)
            level_stats.append(
                {
                    "level": level,
                    "num_clusters": offset,
                    "batched": True,
                    "sizes": _sizes(counts),
                    "kmeans": runs,
                    "seconds": time.perf_counter() - t0,
                }
            )
            logger.info(
                "index level %d (batched): %d clusters, sizes %s", level, offset,
                level_stats[-1]["sizes"],
            )
            continue
        order = np.argsort(fact_cluster, kind="stable")  # facts grouped by cluster, ids ascending
        bounds = np.concatenate([[0], np.cumsum(np.bincount(fact_cluster, minlength=c_prev))])
        new_cluster = np.empty(n, dtype=np.int64)
        level_centroids: list[torch.Tensor] = []
        level_parents: list[np.ndarray] = []
        runs: list[dict] = []
        offset = 0
        for p in range(c_prev):
            ids = order[bounds[p] : bounds[p + 1]]  # (size,) sorted fact ids of cluster p
            if ids.size == 0:  # empty cluster: one empty child that copies its centroid
                level_centroids.append(centroids[-1][p : p + 1].clone())
                level_parents.append(np.array([p], dtype=np.int64))
                offset += 1
                continue
            k = min(branching[level], int(ids.size))
            sub = data_factory(transform, ids)
            try:
                r = spherical_kmeans(
                    sub,
                    k,
                    iters=iters,
                    tol=tol,
                    seed=_child_seed(seed, level, p),
                    init=init,
                    progress=reporter(level, p),
                )
            finally:
                _close(sub)
            new_cluster[ids] = offset + r.assignments
            level_centroids.append(r.centroids)
            level_parents.append(np.full(k, p, dtype=np.int64))
            runs.append(
                {
                    "parent": p,
                    "n": int(ids.size),
                    "k": k,
                    "iterations": len(r.stats),
                    "objective": r.objective,
                    "empty_splits": int(sum(s["empty_splits"] for s in r.stats)),
                    "seconds": float(sum(s["seconds"] for s in r.stats)),
                }
            )
            offset += k
        centroids.append(torch.cat(level_centroids, dim=0))
        parents.append(np.concatenate(level_parents))
        fact_cluster = new_cluster
        counts = np.bincount(fact_cluster, minlength=offset)
        level_stats.append(
            {
                "level": level,
                "num_clusters": offset,
                "sizes": _sizes(counts),
                "kmeans": runs,
                "seconds": time.perf_counter() - t0,
            }
        )
        logger.info(
            "index level %d: %d clusters, sizes %s", level, offset, level_stats[-1]["sizes"]
        )

    if refine_leaves > 0 and len(centroids) > 1:
        t0 = time.perf_counter()
        data = data_factory(transform, None)
        try:
            fact_cluster, centroids, refine_stats = _refine_leaves(
                data, centroids, parents, int(refine_leaves), progress=reporter(len(centroids), -1)
            )
        finally:
            _close(data)
        level_stats.append(
            {
                "level": "refine",
                "num_clusters": int(centroids[-1].shape[0]),
                "sizes": _sizes(np.bincount(fact_cluster, minlength=centroids[-1].shape[0])),
                "kmeans": refine_stats,
                "seconds": time.perf_counter() - t0,
            }
        )

    if max_leaf_size > 0:
        fact_cluster, centroids, parents, split_level = _split_level(
            data_factory, transform, centroids, parents, fact_cluster, max_leaf_size,
            iters=iters, tol=tol, seed=seed, init=init, progress=reporter(len(centroids), -1),
        )  # fmt: skip
        level_stats.append(split_level)

    stats = {
        "n": int(n),
        "dim": int(centroids[0].shape[1]),
        "max_norm": max_norm,
        "transform": transform.to_dict(),
        "branching": branching,
        "iters": iters,
        "tol": tol,
        "seed": seed,
        "init": init,
        "batched_levels": bool(batched_levels),
        "refine_leaves": int(refine_leaves),
        "fit_sample": int(fit_ids.size) if fit_ids is not None else 0,
        "max_leaf_size": int(max_leaf_size),
        "levels": level_stats,
        "leaf_sizes": _sizes(np.bincount(fact_cluster, minlength=centroids[-1].shape[0])),
        "seconds": time.perf_counter() - t_start,
    }
    logger.info(
        "built cluster index: N=%d, branching=%s, %d leaves in %.2fs",
        n,
        branching,
        centroids[-1].shape[0],
        stats["seconds"],
    )
    return ClusterIndex(
        transform=transform,
        centroids=centroids,
        parents=parents,
        fact_leaf=fact_cluster,
        stats=stats,
    )


def split_leaves(
    index: ClusterIndex,
    data_factory: DataFactory,
    max_leaf_size: int,
    *,
    iters: int = 20,
    tol: float = 1e-4,
    seed: int = 0,
    init: str = "kmeans++",
    progress: Callable[[dict], None] | None = None,
) -> ClusterIndex:
    """A copy of ``index`` whose leaves of more than ``max_leaf_size`` facts are split (what
    ``build_index(max_leaf_size=...)`` does as its last step, see :func:`_split_leaves`), for an
    index that is already built. ``data_factory`` must serve the facts the index was built on."""
    if isinstance(max_leaf_size, bool) or not isinstance(max_leaf_size, numbers.Integral) or (
        max_leaf_size < 1
    ):
        raise ValueError(f"max_leaf_size={max_leaf_size!r}: must be an integer >= 1")
    n = getattr(data_factory, "n", None)
    if n is not None and n != index.n:
        raise ValueError(f"data_factory gives {n} facts, the index has {index.n}")
    fact_leaf, centroids, parents, split_level = _split_level(
        data_factory, index.transform, index.centroids, index.parents, index.fact_leaf,
        max_leaf_size, iters=iters, tol=tol, seed=seed, init=init, progress=progress,
    )  # fmt: skip
    stats = dict(index.stats)
    stats["levels"] = [*stats.get("levels", []), split_level]
    stats["max_leaf_size"] = int(max_leaf_size)
    stats["leaf_sizes"] = split_level["sizes"]
    return ClusterIndex(index.transform, centroids, parents, fact_leaf, stats)


def build_index_from_vectors(
    vectors: torch.Tensor | np.ndarray,
    *,
    branching: list[int],
    U: float = 0.75,
    m: int = 3,
    iters: int = 20,
    tol: float = 1e-4,
    seed: int = 0,
    init: str = "kmeans++",
    progress: Callable[[dict], None] | None = None,
    batched_levels: bool = True,
    refine_leaves: int = 0,
    fit_sample: int = 0,
    precision: str = "float32",
    max_leaf_size: int = 0,
) -> ClusterIndex:
    """In-memory convenience: :func:`build_index` over :class:`InMemoryDataFactory` (or
    :class:`FactorisedDataFactory` when ``vectors`` is a :class:`~hmn.memory.FactorisedMemory`).
    ``precision``: the k-means assignment matmul's (:func:`hmn.kmeans.similarity_dtype`)."""
    if isinstance(vectors, FactorisedMemory):
        factory = FactorisedDataFactory(vectors, precision=precision)
    else:
        factory = InMemoryDataFactory(vectors, precision=precision)
    return build_index(
        factory,
        n=factory.n,
        branching=branching,
        U=U,
        m=m,
        iters=iters,
        tol=tol,
        seed=seed,
        init=init,
        progress=progress,
        batched_levels=batched_levels,
        refine_leaves=refine_leaves,
        fit_sample=fit_sample,
        max_leaf_size=max_leaf_size,
    )
