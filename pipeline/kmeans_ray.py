"""Cluster-index build on Ray: a DataAccess adapter over long-lived shard actors.

The k-means loop and the index build are those of ``hmn`` (``hmn.kmeans.spherical_kmeans``,
``hmn.index.build_index``); this module only supplies a :class:`hmn.index.DataFactory` whose views
fan each call out to ``num_shards`` actors and sum their partial results (RAY_NOTES section 3:
actors holding numpy shards were the cheapest per iteration).

* Each actor receives its contiguous shard of the memory once (``ray.put``) and keeps it in its
  heap; for every view (transform, subset of fact ids) it wraps the rows in an
  ``hmn.kmeans.InMemoryData`` that applies the transform and normalisation itself.
* Per k-means iteration the centroids are ``ray.put`` once and every actor returns
  (sums, counts, objective) for its rows; the driver adds them in float64 in shard order, so the
  result is deterministic and matches the in-memory build up to float64 rounding.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import ray
import torch

from hmn.index import ClusterIndex, build_index, check_branching, check_subset_ids
from hmn.kmeans import InMemoryData
from hmn.mips import MipsTransform, fit_transform

logger = logging.getLogger(__name__)

__all__ = ["RayShardedData", "RayShardedDataFactory", "ShardActor", "build_index_on_ray"]


class ShardActor:
    """Holds rows [start, start + len(shard)) of the memory and serves views of them."""

    def __init__(self, shard: np.ndarray, start: int, chunk: int = 65536) -> None:
        # Copy out of the (read-only) object store into this actor's heap.
        self._x = torch.from_numpy(np.array(shard, dtype=np.float32, order="C"))  # (n_shard, D)
        self.start = int(start)
        self.chunk = int(chunk)
        self._views: dict[int, InMemoryData] = {}

    def num_rows(self) -> int:
        return int(self._x.shape[0])

    def open_view(self, view_id: int, transform: dict | None, local_ids: np.ndarray | None) -> int:
        """Create view ``view_id`` over the local rows ``local_ids`` (all if None); returns n."""
        x = (
            self._x
            if local_ids is None
            else self._x[torch.from_numpy(np.array(local_ids, dtype=np.int64))]
        )
        if x.shape[0] == 0:
            return 0
        fn = None if transform is None else MipsTransform.from_dict(transform).facts
        self._views[view_id] = InMemoryData(x, self.chunk, transform=fn)
        return int(x.shape[0])

    def close_view(self, view_id: int) -> None:
        self._views.pop(view_id, None)

    def max_norm(self, view_id: int) -> float:
        return self._views[view_id].max_norm() if view_id in self._views else 0.0

    def rows(self, view_id: int, idx: np.ndarray) -> np.ndarray:
        return self._views[view_id].rows(np.array(idx, dtype=np.int64)).numpy()

    def partial_stats(
        self, view_id: int, centroids: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, float]:
        return self._views[view_id].partial_stats(torch.tensor(centroids))

    def assign(self, view_id: int, centroids: np.ndarray) -> np.ndarray:
        return self._views[view_id].assign(torch.tensor(centroids))


class RayShardedData:
    """DataAccess view over the shard actors (rows in global fact order, shard by shard)."""

    def __init__(self, actors: list, view_id: int, shard_rows: list[int], d: int) -> None:
        self._actors = actors
        self._view_id = view_id
        self._shard_rows = np.asarray(shard_rows, dtype=np.int64)  # rows of this view per shard
        self._bounds = np.concatenate([[0], np.cumsum(self._shard_rows)])  # (S + 1,)
        self._live = [i for i, r in enumerate(shard_rows) if r > 0]  # shards with rows, in order
        self.n = int(self._bounds[-1])
        self.d = int(d)
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this RayShardedData view is closed")

    def max_norm(self) -> float:
        self._check_open()
        return float(max(ray.get([a.max_norm.remote(self._view_id) for a in self._actors])))

    def rows(self, idx: np.ndarray) -> torch.Tensor:
        self._check_open()
        idx = np.asarray(idx, dtype=np.int64)
        if idx.ndim != 1 or (idx.size and (idx.min() < 0 or idx.max() >= self.n)):
            raise ValueError(f"idx must be 1-D in [0, {self.n})")
        shard = np.searchsorted(self._bounds, idx, side="right") - 1  # (len(idx),)
        out = np.empty((idx.size, self.d), dtype=np.float32)
        refs, where = [], []
        for s in np.unique(shard):
            pos = np.flatnonzero(shard == s)
            refs.append(self._actors[s].rows.remote(self._view_id, idx[pos] - self._bounds[s]))
            where.append(pos)
        for pos, rows in zip(where, ray.get(refs)):
            out[pos] = rows
        return torch.from_numpy(out)

    def partial_stats(self, centroids: torch.Tensor) -> tuple[np.ndarray, np.ndarray, float]:
        self._check_open()
        ref = ray.put(np.ascontiguousarray(centroids.detach().cpu().numpy(), dtype=np.float32))
        parts = ray.get(
            [self._actors[i].partial_stats.remote(self._view_id, ref) for i in self._live]
        )
        k = int(centroids.shape[0])
        sums = np.zeros((k, self.d), dtype=np.float64)
        counts = np.zeros(k, dtype=np.int64)
        objective = 0.0
        for s, c, o in parts:  # fixed shard order: deterministic float64 reduction
            sums += s
            counts += c
            objective += o
        return sums, counts, objective

    def assign(self, centroids: torch.Tensor) -> np.ndarray:
        self._check_open()
        ref = ray.put(np.ascontiguousarray(centroids.detach().cpu().numpy(), dtype=np.float32))
        parts = ray.get([self._actors[i].assign.remote(self._view_id, ref) for i in self._live])
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    def close(self) -> None:
        if not self._closed:
            ray.get([a.close_view.remote(self._view_id) for a in self._actors])
            self._closed = True


class RayShardedDataFactory:
    """:class:`hmn.index.DataFactory` over shard actors; see the module docstring."""

    def __init__(self, actors: list, shard_starts: np.ndarray, n: int, d: int) -> None:
        self._actors = actors
        self._starts = np.asarray(shard_starts, dtype=np.int64)  # (S,)
        self._bounds = np.concatenate([self._starts, [n]])  # (S + 1,)
        self.n = int(n)
        self.d = int(d)
        self._next_view = 0

    def __call__(self, transform: MipsTransform | None, ids: np.ndarray | None) -> RayShardedData:
        view_id = self._next_view
        self._next_view += 1
        tdict = None if transform is None else transform.to_dict()
        if ids is None:
            local: list[np.ndarray | None] = [None] * len(self._actors)
        else:
            ids = check_subset_ids(ids, self.n)
            cut = np.searchsorted(ids, self._bounds)  # ids are sorted: split by shard
            local = [ids[cut[s] : cut[s + 1]] - self._starts[s] for s in range(len(self._actors))]
        shard_rows = ray.get(
            [a.open_view.remote(view_id, tdict, li) for a, li in zip(self._actors, local)]
        )
        d = self.d if transform is None else transform.out_dim(self.d)
        return RayShardedData(self._actors, view_id, shard_rows, d)


def build_index_on_ray(
    vectors: np.ndarray,
    *,
    num_shards: int,
    branching: list[int],
    U: float = 0.75,
    m: int = 3,
    iters: int = 20,
    tol: float = 1e-4,
    seed: int = 0,
    init: str = "kmeans++",
    progress: Callable[[dict], None] | None = None,
    actor_options: dict | None = None,
) -> ClusterIndex:
    """``hmn.index.build_index`` with the memory split over ``num_shards`` Ray actors.

    Args:
        vectors: (N, D) fact vectors.
        num_shards: number of shard actors (1 <= num_shards <= N).
        actor_options: passed to ``.options()`` of every actor (default ``{"num_cpus": 1}``).
        Other arguments: as :func:`hmn.index.build_index`.
    """
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise ValueError(f"vectors must be (N, D) with N >= 1, got shape {vectors.shape}")
    n, d = vectors.shape
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or not 1 <= num_shards <= n:
        raise ValueError(f"num_shards={num_shards!r}: must be an integer in [1, N={n}]")
    check_branching(branching, n)  # fail before starting any actor
    fit_transform(1.0, U=U, m=m)  # validates U and m
    if not ray.is_initialized():
        raise RuntimeError("build_index_on_ray needs ray.init() first")

    starts = np.array([len(a) for a in np.array_split(np.arange(n), num_shards)]).cumsum()
    starts = np.concatenate([[0], starts[:-1]])  # (S,) first row of each shard
    bounds = np.concatenate([starts, [n]])
    remote_cls = ray.remote(ShardActor).options(**(actor_options or {"num_cpus": 1}))
    actors = []
    try:
        for s in range(num_shards):
            shard_ref = ray.put(
                np.ascontiguousarray(vectors[bounds[s] : bounds[s + 1]], dtype=np.float32)
            )
            actors.append(remote_cls.remote(shard_ref, int(starts[s])))
        ray.get([a.num_rows.remote() for a in actors])  # surface construction errors here
        factory = RayShardedDataFactory(actors, starts, n, d)
        logger.info("built %d shard actors over N=%d facts", num_shards, n)
        return build_index(
            factory,
            n=n,
            branching=branching,
            U=U,
            m=m,
            iters=iters,
            tol=tol,
            seed=seed,
            init=init,
            progress=progress,
        )
    finally:
        for a in actors:
            ray.kill(a)
