"""Cluster-index build on Ray: a DataAccess adapter over long-lived shard actors.

The k-means loop and the index build are those of ``hmn`` (``hmn.kmeans``, ``hmn.index.build_index``
with an ``hmn.index.IndexSpec``); this module only supplies a :class:`hmn.index.DataFactory` whose
views fan each call out to ``num_shards`` actors and sum their partial results (RAY_NOTES section 3:
actors holding numpy shards were the cheapest per iteration).

* Each actor holds a contiguous shard of the memory, without copying it: when the memory is a
  memory map of a ``.npy`` file (the memory stage's ``facts.npy``), every actor on the driver's
  node maps its rows of that file (``np.memmap``, read-only), so the page cache holds the one
  copy that the driver and all actors share; otherwise (an in-memory array, or an actor on
  another node) the shard goes through the object store once (``ray.put``) and the actor keeps
  the zero-copy, read-only object-store array (1m facts x 600: 2.4 GB once, where a ``ray.put``
  per shard plus a heap copy in each actor made two more copies). For every view (transform,
  subset of fact ids, groups, precision) the actor wraps the rows in an
  ``hmn.kmeans.InMemoryData`` that applies the transform and normalisation chunk by chunk.
* Factorised shards (``build_index_on_ray(FactorisedMemory, ...)``): every actor gets the entity
  and relation tables by reference (one ``ray.put``; numpy arrays from the object store are
  zero-copy, so actors on one node share one copy) plus its slice of the fact table, and gathers
  rows chunk by chunk (``hmn.kmeans.FactorisedData``): the (N, D) matrix never exists.
* A view serves the grouped ``DataAccess`` methods (a view without groups is one group): levels
  > 0 of a hierarchical index run all parents' k-means together, ``iters`` round trips per level
  instead of C1 x iters.
* Per k-means iteration the centroids are ``ray.put`` once and every actor returns
  (sums, counts, objectives) for its rows; the driver adds them in float64 in shard order, so the
  result is deterministic and matches the in-memory build up to float32 rounding inside blocks.
* Speed: an actor sets ``torch.set_num_threads`` to its CPU share (``num_cpus``; Ray itself only
  sets OMP_NUM_THREADS), keeps the unit rows of a view once computed (``InMemoryData`` with
  ``cache_rows``: no transform or normalisation copy per iteration; rows already unit-norm are
  used in place), and does the assignment as one matmul per chunk into a reused buffer.  Per
  iteration only the centroids (C, D) go out and (C, D) float64 sums come back per actor.
* GPUs (``memory.use_gpu``): each actor is started with ``num_gpus`` and computes on its GPU
  (``device``): a dense shard is moved there whole; a factorised shard moves its tables when they
  take at most half the GPU's free memory, and otherwise keeps them in host memory and stages the
  gathered rows to the GPU ``chunk`` rows at a time (``hmn.kmeans.InMemoryData``'s ``device``).
  Results come back to the driver as numpy, as on CPU.
"""

from __future__ import annotations

import logging
import mmap
import os
import warnings

import numpy as np
import ray
import torch

from hmn.devices import fits_on_device, resolve_device
from hmn.index import (
    ClusterIndex,
    IndexSpec,
    Progress,
    build_index,
    check_branching,
    check_subset_ids,
)
from hmn.kmeans import FactorisedData, InMemoryData
from hmn.memory import FactorisedMemory
from hmn.mips import MipsTransform

logger = logging.getLogger(__name__)

__all__ = ["RayShardedData", "RayShardedDataFactory", "ShardActor", "build_index_on_ray"]


def _read_only_tensor(a: np.ndarray) -> torch.Tensor:
    """``torch.from_numpy`` of a read-only array (a file map, an object-store buffer) without a
    copy; nothing writes to a shard's rows (views build new tensors from them)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(a)


def mapped_file(x: np.ndarray) -> tuple[str, int] | None:
    """(path, byte offset of ``x[0, 0]`` in the file) when ``x`` is a C-contiguous float32 2-D
    view of a shared file map (``np.load(path, mmap_mode="r")`` or ``"r+"``, or a row slice of
    one); None otherwise (an in-memory array, a copy-on-write ``"c"`` map)."""
    if not (isinstance(x, np.memmap) and x.ndim == 2 and x.dtype == np.float32
            and x.flags.c_contiguous and getattr(x, "filename", None)
            and getattr(x, "mode", None) in ("r", "r+", "w+")):
        return None
    buf = getattr(x, "_mmap", None)  # the mmap.mmap the view lies in (numpy keeps it there)
    if not isinstance(buf, mmap.mmap):
        return None
    base = np.frombuffer(buf, dtype=np.uint8).ctypes.data  # address of the map's first byte
    start = int(x.offset) - int(x.offset) % mmap.ALLOCATIONGRANULARITY  # file offset mapped there
    return str(x.filename), start + (int(x.ctypes.data) - int(base))


def table_file(table: torch.Tensor | np.ndarray) -> dict | None:
    """``{"path", "offset", "rows", "dim", "node"}`` of a 2-D float32 C-contiguous table that
    lies in a read-only map of a ``.npy`` file on this node (the memory stage's factorised
    tables), so that actors on this node map the same pages; None otherwise."""
    a = table.numpy() if isinstance(table, torch.Tensor) and table.device.type == "cpu" else table
    if not (isinstance(a, np.ndarray) and a.ndim == 2 and a.dtype == np.float32
            and a.flags.c_contiguous and a.size):
        return None
    where = _mapping(int(a.ctypes.data))
    if where is None or not where[0].endswith(".npy") or not os.path.isfile(where[0]):
        return None
    return {"path": where[0], "offset": where[1], "rows": int(a.shape[0]), "dim": int(a.shape[1]),
            "node": ray.get_runtime_context().get_node_id()}


def _mapping(ptr: int) -> tuple[str, int] | None:
    """(path, file offset) of the mapping address ``ptr`` lies in (``/proc/self/maps``; path
    ``""`` for anonymous memory), None when unknown (no /proc)."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                lo, hi = (int(v, 16) for v in parts[0].split("-"))
                if lo <= ptr < hi:
                    path = parts[5].strip() if len(parts) > 5 else ""
                    return path, int(parts[2], 16) + ptr - lo
    except (OSError, ValueError, IndexError):
        return None
    return None


def _backing(ptr: int) -> str | None:
    """The path of the mapping ``ptr`` lies in, ``""`` for anonymous memory, None if unknown."""
    where = _mapping(ptr)
    return None if where is None else where[0]


def _map_rows(rows_file: dict) -> np.ndarray | None:
    """The (rows, dim) float32 read-only map of ``rows_file`` (see :class:`ShardActor`), or None
    when this process is not on the node that wrote the file or the file is not there."""
    node = rows_file.get("node")
    if node is not None and node != ray.get_runtime_context().get_node_id():
        return None
    path, offset = rows_file["path"], int(rows_file["offset"])
    shape = (int(rows_file["rows"]), int(rows_file["dim"]))
    try:
        if os.path.getsize(path) < offset + 4 * shape[0] * shape[1]:
            return None
    except OSError:
        return None
    return np.memmap(path, dtype=np.float32, mode="r", offset=offset, shape=shape)


class ShardActor:
    """Holds rows [start, start + len(shard)) of the memory and serves views of them.

    The rows are never copied on the CPU: a ``rows_file`` is mapped, a ``shard`` (an object-store
    array) is kept as it is (converted only if it is not C-contiguous float32); see
    :meth:`rows_backing`."""

    def __init__(
        self,
        shard: np.ndarray | None,
        start: int,
        chunk: int = 65536,
        factors: dict | None = None,
        entity_emb: np.ndarray | None = None,
        relation_emb: np.ndarray | None = None,
        threads: int | None = None,
        cache_rows: bool | None = None,
        device: str | None = None,
        rows_file: dict | None = None,
        table_files: dict | None = None,
    ) -> None:
        """Dense shard (``shard``, or ``rows_file``: ``{"path", "offset", "rows", "dim", "node"}``,
        rows of a float32 ``.npy`` file to map read-only when this actor runs on node ``node``
        (None: any); elsewhere the actor starts without rows and the driver sends them with
        :meth:`set_rows`, see :meth:`needs_rows`), or factorised: ``factors`` holds this shard's
        slice of the fact table (subject_ids, relation_ids, object_offsets rebased to 0,
        object_values) and ``entity_emb`` / ``relation_emb`` the whole tables (pass object refs:
        zero-copy), or ``table_files`` (``{"entity_emb": rows_file, "relation_emb": rows_file}``,
        `table_file`): the tables' ``.npy`` maps on the driver's node, mapped here too, so that
        the page cache holds the one copy; elsewhere the driver sends them (:meth:`set_tables`).
        ``threads``: torch intra-op threads (the actor's CPU share); ``cache_rows``: as
        :class:`hmn.kmeans.InMemoryData` (None: dense views cache when <= 1 GiB); ``device``:
        where the views compute (None: the CPU; ``"cuda"``: the GPU Ray gave this actor)."""
        self.device = resolve_device(device, setting="memory.use_gpu (shard actor)")
        if threads is not None:
            if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
                raise ValueError(f"threads={threads!r}: must be an integer >= 1")
            torch.set_num_threads(threads)
        self.start = int(start)
        self.chunk = int(chunk)
        self.cache_rows = cache_rows
        self._views: dict[int, InMemoryData] = {}
        self._mem: FactorisedMemory | None = None
        self._factors = factors
        if factors is not None:
            self._x = None
            if table_files is not None:
                entity_emb = _map_rows(table_files["entity_emb"])
                relation_emb = _map_rows(table_files["relation_emb"])
            if entity_emb is not None and relation_emb is not None:
                self.set_tables(entity_emb, relation_emb)
        else:
            if shard is None and rows_file is None:
                raise ValueError("a dense ShardActor needs a shard or a rows_file")
            self._x: torch.Tensor | None = None  # (n, D) rows, None until set_rows
            rows = shard if rows_file is None else _map_rows(rows_file)
            if rows is not None:
                self.set_rows(rows)

    def set_tables(self, entity_emb: np.ndarray, relation_emb: np.ndarray) -> None:
        """The factorised memory's whole entity / relation tables, kept as they are (read-only,
        shared: object-store arrays or file maps)."""
        f = self._factors
        self._mem = FactorisedMemory(
            _read_only_tensor(np.asarray(entity_emb)), _read_only_tensor(np.asarray(relation_emb)),
            f["subject_ids"], f["relation_ids"], f["object_offsets"], f["object_values"],
        )
        if self.device.type != "cpu" and fits_on_device(self._mem.nbytes(), self.device):
            self._mem = self._mem.to(self.device)  # else: rows staged chunk by chunk

    def tables_backing(self) -> str | None:
        """The path of the mapping the entity table lies in (a ``.npy`` file, or the object
        store's shared-memory file); tests use it to check that the table is not copied."""
        if self._mem is None or self._mem.entity_emb.device.type != "cpu":
            return None
        return _backing(self._mem.entity_emb.data_ptr())

    def set_rows(self, shard: np.ndarray) -> None:
        """This shard's (n, D) rows, kept without a copy: a file map or object-store array is
        read in place (the CPU views only read it); moved to the GPU when it fits there."""
        rows = np.asarray(shard)
        if rows.ndim != 2:
            raise ValueError(f"shard must be (n, D), got shape {rows.shape}")
        if rows.dtype != np.float32 or not rows.flags.c_contiguous:
            rows = np.ascontiguousarray(rows, dtype=np.float32)
        self._x = _read_only_tensor(rows)  # (n, D)
        if self.device.type != "cpu" and fits_on_device(self._x.nbytes, self.device):
            self._x = self._x.to(self.device)

    def needs_rows(self) -> bool:
        """Whether this actor still waits for its rows (:meth:`set_rows`) or, factorised, its
        tables (:meth:`set_tables`): its file is on another node."""
        return self._mem is None and self._x is None

    def rows_backing(self) -> str | None:
        """What holds this actor's dense rows: the path of the file mapping they lie in (the
        memory's ``.npy``, or the object store's shared-memory file), ``""`` for anonymous
        memory (a private heap copy), ``"cuda"`` on a GPU, None when unknown (factorised,
        or no /proc). Tests use it to check that the shard is not copied."""
        if self._mem is not None or self._x is None:
            return None
        if self._x.device.type != "cpu":
            return self._x.device.type
        return _backing(self._x.data_ptr())

    def num_rows(self) -> int:
        if self._mem is not None:
            return self._mem.n
        return 0 if self._x is None else int(self._x.shape[0])

    def num_threads(self) -> int:
        return torch.get_num_threads()

    def placement(self) -> dict[str, str]:
        """Where this actor computes and where its rows are held (tests, logs)."""
        held = self._mem.device if self._mem is not None else self._x.device
        return {"device": str(self.device), "rows": str(held)}

    def open_view(
        self,
        view_id: int,
        transform: dict | None,
        local_ids: np.ndarray | None,
        groups: np.ndarray | None = None,
        precision: str = "float32",
    ) -> int:
        """Create view ``view_id`` over the local rows ``local_ids`` (all if None); returns n."""
        fn = None if transform is None else MipsTransform.from_dict(transform).facts
        ids = None if local_ids is None else np.array(local_ids, dtype=np.int64)
        if ids is not None and ids.size == 0:
            return 0
        grp = None if groups is None else np.array(groups, dtype=np.int64)
        options = {"transform": fn, "groups": grp, "cache_rows": self.cache_rows,
                   "precision": precision, "device": self.device}
        if self._mem is not None:
            view = FactorisedData(self._mem, ids, self.chunk, **options)
        else:
            x = self._x if ids is None else self._x[torch.from_numpy(ids).to(self._x.device)]
            view = InMemoryData(x, self.chunk, **options)
        self._views[view_id] = view
        return int(view.n)

    def close_view(self, view_id: int) -> None:
        self._views.pop(view_id, None)

    def max_norm(self, view_id: int) -> float:
        return self._views[view_id].max_norm() if view_id in self._views else 0.0

    def rows(self, view_id: int, idx: np.ndarray) -> np.ndarray:
        return self._views[view_id].rows(np.array(idx, dtype=np.int64)).cpu().numpy()

    # Sums travel as float32 (the driver adds the shards' sums in float64): half the bytes through
    # the object store per iteration (1.2 -> 0.6 MB at C = 256, d = 603: ~3 ms of a 60 ms SQ-32k
    # iteration; 157 -> 78 MB per shard for the 32k leaves of FB2M's second level).

    def partial_stats_grouped(
        self, view_id: int, centroids: np.ndarray, offsets: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        sums, counts, objectives = self._views[view_id].partial_stats_grouped(
            torch.tensor(centroids), offsets)
        return sums.astype(np.float32), counts, objectives

    def assign_grouped(
        self, view_id: int, centroids: np.ndarray, offsets: np.ndarray
    ) -> np.ndarray:
        return self._views[view_id].assign_grouped(torch.tensor(centroids), offsets)


class RayShardedData:
    """DataAccess view over the shard actors (rows in global fact order, shard by shard)."""

    def __init__(
        self,
        actors: list,
        view_id: int,
        shard_rows: list[int],
        d: int,
        groups: np.ndarray | None = None,
    ) -> None:
        self.groups = groups  # (n,) group label per row, or None (one group)
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

    def _on_shards(self, method: str, centroids: torch.Tensor, offsets: np.ndarray) -> list:
        """``method(view, centroids, offsets)`` on every shard with rows, in shard order."""
        self._check_open()
        ref = ray.put(np.ascontiguousarray(centroids.detach().cpu().numpy(), dtype=np.float32))
        offsets = np.asarray(offsets, dtype=np.int64)
        return ray.get([getattr(self._actors[i], method).remote(self._view_id, ref, offsets)
                        for i in self._live])  # fmt: skip

    def partial_stats_grouped(
        self, centroids: torch.Tensor, offsets: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        parts = self._on_shards("partial_stats_grouped", centroids, offsets)
        k = int(centroids.shape[0])
        sums = np.zeros((k, self.d), dtype=np.float64)
        counts = np.zeros(k, dtype=np.int64)
        objectives = np.zeros(len(offsets) - 1, dtype=np.float64)
        for s, c, o in parts:  # fixed shard order: deterministic float64 reduction
            sums += s
            counts += c
            objectives += o
        return sums, counts, objectives

    def assign_grouped(self, centroids: torch.Tensor, offsets: np.ndarray) -> np.ndarray:
        parts = self._on_shards("assign_grouped", centroids, offsets)
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

    def __call__(
        self,
        transform: MipsTransform | None,
        ids: np.ndarray | None,
        groups: np.ndarray | None = None,
        precision: str = "float32",
    ) -> RayShardedData:
        view_id = self._next_view
        self._next_view += 1
        tdict = None if transform is None else transform.to_dict()
        if ids is None:
            local: list[np.ndarray | None] = [None] * len(self._actors)
        else:
            ids = check_subset_ids(ids, self.n)
            cut = np.searchsorted(ids, self._bounds)  # ids are sorted: split by shard
            local = [ids[cut[s] : cut[s + 1]] - self._starts[s] for s in range(len(self._actors))]
        local_groups: list[np.ndarray | None] = [None] * len(self._actors)
        if groups is not None:
            groups = np.asarray(groups, dtype=np.int64)
            nv = self.n if ids is None else ids.size
            if groups.shape != (nv,):
                raise ValueError(f"groups must have shape ({nv},), got {groups.shape}")
            rows_per_shard = (
                np.diff(self._bounds) if ids is None else np.array([li.size for li in local])
            )
            cuts = np.concatenate([[0], np.cumsum(rows_per_shard)])
            local_groups = [groups[cuts[s] : cuts[s + 1]] for s in range(len(self._actors))]
        shard_rows = ray.get(
            [
                a.open_view.remote(view_id, tdict, li, gi, precision)
                for a, li, gi in zip(self._actors, local, local_groups)
            ]
        )
        d = self.d if transform is None else transform.out_dim(self.d)
        return RayShardedData(self._actors, view_id, shard_rows, d, groups=groups)


def _put_rows(vectors: np.ndarray, a: int, b: int) -> ray.ObjectRef:
    """Rows a..b-1 in the object store (one copy, written straight from ``vectors``)."""
    return ray.put(np.ascontiguousarray(vectors[a:b], dtype=np.float32))


def _start_actors(
    vectors: np.ndarray | FactorisedMemory,
    num_shards: int,
    actor_options: dict | None,
    cache_rows: bool | None,
    device: str | None = None,
) -> tuple[list, np.ndarray]:
    """Start ``num_shards`` shard actors over contiguous row ranges; returns (actors, (S,) first
    row of each shard).  The caller kills the actors (also those started before an error: the
    list is filled as they start)."""
    factorised = isinstance(vectors, FactorisedMemory)
    n = vectors.n if factorised else vectors.shape[0]
    src = None if factorised else mapped_file(vectors)  # (path, offset) of a file-backed memory
    starts = np.array([len(a) for a in np.array_split(np.arange(n), num_shards)]).cumsum()
    starts = np.concatenate([[0], starts[:-1]])  # (S,) first row of each shard
    bounds = np.concatenate([starts, [n]])
    options = dict(actor_options or {"num_cpus": 1})
    kw = {"threads": max(1, int(options.get("num_cpus", 1))), "cache_rows": cache_rows,
          "device": device}
    remote_cls = ray.remote(ShardActor).options(**options)
    node = ray.get_runtime_context().get_node_id() if src is not None else None
    actors: list = []
    tables: list = []  # the factorised tables in the object store, put once when an actor needs them

    def put_tables() -> list:
        if not tables:
            tables.extend(ray.put(t.cpu().numpy()) for t in (vectors.entity_emb, vectors.relation_emb))
        return tables

    if factorised:
        files = {"entity_emb": table_file(vectors.entity_emb),
                 "relation_emb": table_file(vectors.relation_emb)}
        if all(files.values()):  # the memory stage's .npy maps: actors here map them too
            kw["table_files"] = files
        else:
            kw["entity_emb"], kw["relation_emb"] = put_tables()
        subj, rels = vectors.subject_ids.cpu().numpy(), vectors.relation_ids.cpu().numpy()
        offs, vals = vectors.object_offsets.cpu().numpy(), vectors.object_values.cpu().numpy()
    try:
        for s in range(num_shards):
            a, b = int(bounds[s]), int(bounds[s + 1])
            if factorised:
                factors = {"subject_ids": subj[a:b], "relation_ids": rels[a:b],
                           "object_offsets": offs[a : b + 1] - offs[a],
                           "object_values": vals[offs[a] : offs[b]]}  # fmt: skip
                actors.append(remote_cls.remote(None, a, factors=factors, **kw))
            elif src is not None:  # actors on this node map their rows of the file
                rows_file = {"path": src[0], "offset": src[1] + a * vectors.strides[0],
                             "rows": b - a, "dim": vectors.shape[1], "node": node}
                actors.append(remote_cls.remote(None, a, rows_file=rows_file, **kw))
            else:  # one copy in the object store, read there by the actor
                actors.append(remote_cls.remote(_put_rows(vectors, a, b), a, **kw))
        # surface construction errors here; actors on other nodes get their rows by ray.put
        waiting = ray.get([a.needs_rows.remote() for a in actors])
        refs = [actors[s].set_tables.remote(*put_tables()) if factorised else
                actors[s].set_rows.remote(_put_rows(vectors, int(bounds[s]), int(bounds[s + 1])))
                for s in np.flatnonzero(waiting)]
        ray.get(refs)
        if src is not None:
            logger.info("shard actors: %d of %d map %s", len(actors) - len(refs), len(actors),
                        src[0])
    except BaseException:
        for a in actors:
            ray.kill(a)
        raise
    return actors, starts


def build_index_on_ray(
    vectors: np.ndarray | FactorisedMemory,
    spec: IndexSpec,
    *,
    num_shards: int,
    progress: Progress = None,
    actor_options: dict | None = None,
    cache_rows: bool | None = None,
    device: str | None = None,
) -> ClusterIndex:
    """``hmn.index.build_index(factory, spec)`` with the memory split over ``num_shards`` Ray
    actors.

    Args:
        vectors: (N, D) fact vectors, or a :class:`hmn.memory.FactorisedMemory` (the actors then
            share its entity / relation tables and hold a slice of its fact table each). A
            read-only memory map of a ``.npy`` file (``np.load(path, mmap_mode="r")``) is not
            copied at all on the driver's node: its actors map the file (see the module doc).
        spec: what to build (:class:`hmn.index.IndexSpec`).
        num_shards: number of shard actors (1 <= num_shards <= N).
        progress: as :func:`hmn.index.build_index`.
        actor_options: passed to ``.options()`` of every actor (default ``{"num_cpus": 1}``);
            each actor runs torch with max(1, int(num_cpus)) threads.
        cache_rows: whether actors keep the unit rows of their views (see
            :class:`hmn.kmeans.InMemoryData`; None = dense shards when <= 1 GiB per view).
        device: where every actor computes: None (the CPU) or ``"cuda"`` (give the actors GPUs
            with ``actor_options={"num_gpus": ...}``); see the module docstring.
    """
    if not isinstance(spec, IndexSpec):
        raise TypeError(f"spec must be an IndexSpec, got {type(spec).__name__}")
    if not isinstance(vectors, FactorisedMemory):
        vectors = vectors if isinstance(vectors, np.ndarray) else np.asarray(vectors)
        if vectors.ndim != 2 or vectors.shape[0] == 0:
            raise ValueError(f"vectors must be (N, D) with N >= 1, got shape {vectors.shape}")
    n, d = (vectors.n, vectors.d) if isinstance(vectors, FactorisedMemory) else vectors.shape
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or not 1 <= num_shards <= n:
        raise ValueError(f"num_shards={num_shards!r}: must be an integer in [1, N={n}]")
    check_branching(spec.branching, n)  # fail before starting any actor
    if not ray.is_initialized():
        raise RuntimeError("build_index_on_ray needs ray.init() first")
    actors, starts = _start_actors(vectors, num_shards, actor_options, cache_rows, device)
    try:
        logger.info("built %d shard actors over N=%d facts", num_shards, n)
        return build_index(RayShardedDataFactory(actors, starts, n, d), spec, progress)
    finally:
        for a in actors:
            ray.kill(a)
