"""Embed stage: TransE entity and relation vectors for the memory.

Either reads user-supplied embeddings (text, npy + keys, OpenKE; keys normalised like the
knowledge base's) or trains TransE on Ray Train (``TorchTrainer``, gloo on CPU) with
``embed.num_workers`` workers.

Design (PyTorch-BigGraph, Lerer et al. 2019): the entity table is the part that outgrows a
worker, so no worker ever holds all of it. Entities are split into ``embed.num_partitions``
contiguous ranges of a seeded permutation of the ids (``hmn.transe.entity_order``: every
partition a random sample, so buckets are about equal); a triple belongs to the bucket
(partition of its head, partition of its
tail). Each partition (its rows plus their optimiser state: Adam's m and v, n_p x d each, or
row-wise Adagrad's n_p sums, `hmn.transe_params.optimizer_slots`) is one flat float32 ``.npy`` file in
shared storage (``<checkpoint_dir>/tables/epoch-<e>/part-<p>.npy``: the slots one after the
other, each (n_p, width) in C order). An epoch is a
sequence of rounds (``hmn.transe.bucket_schedule``); in a round every worker trains one bucket
whose two partitions no other worker holds, loading them from storage and writing them back
(a partition that the worker's next bucket also uses stays in its memory instead), so a worker
needs memory for about three partitions only. Negatives are drawn among the rows of the two
partitions held. The relation table is small and replicated: after each round the workers
all-reduce (sum) their relation updates. The triples come from a Ray Dataset (the ingested
facts, exploded); each worker files its shard into per-bucket edge files once.

GPUs (``embed.use_gpu``): every Ray Train worker gets a GPU and the group NCCL (Ray Train's
default with ``use_gpu``). The partition files stay the storage format: a worker copies its
bucket's partitions (rows and optimiser state) to its GPU, trains the bucket there and copies them
back before writing or keeping them; the relation table, its optimiser state and the round's all-reduce
live on the GPU. On CPU nothing is copied.

Rank 0 shows each epoch's progress (its buckets' triples, rate, ETA: `pipeline.progress`) and
logs each epoch's record to the run's tracking (`pipeline.tracking`).

Checkpoints and resume: epoch e reads partitions from ``epoch-<e>`` and writes them to
``epoch-<e+1>``, so ``epoch-<e>`` stays intact until the epoch is complete; then every rank
writes its relation optimiser state, rank 0 marks the folder done and reports a Ray Train
checkpoint that points at it, and the previous folder is deleted. A failed worker group
(``embed.max_failures``) or a re-run after a killed driver (Ray Train resumes by
``(storage_path, name)``) restarts the interrupted epoch from the last complete folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.distributed as dist

from hmn.config import EmbedConfig
from hmn.devices import cpu_threads, resolve_device
from hmn.embedding_files import align_embeddings, read_embeddings
from hmn.transe import (
    RowOptimizer,
    auto_partitions,
    bucket_schedule,
    embeddings_fingerprint,
    entity_order,
    entity_partition,
    epoch_lr,
    head_corruption_probs,
    init_entity_rows,
    init_relations,
    link_prediction,
    partition_bounds,
    train_bucket,
)
from hmn.transe_params import entity_row_floats, optimizer_slots
from pipeline.artifacts import KnowledgeBase, load_torch_file, write_vectors
from pipeline.progress import Progress
from pipeline.stages import ray_train_env
from pipeline.tracking import Tracker, TrackingTarget, attach

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedJob:
    """Everything a TransE worker needs; passed as the train loop's config."""

    cfg: EmbedConfig  # also the worker's TransEParams (EmbedConfig extends it)
    num_entities: int
    num_relations: int
    p_head: np.ndarray  # (R,) probability of corrupting the head
    root: str  # shared storage: tables/, edges/
    fail_at_epoch: int = -1  # test hook: the last rank raises once at the start of this epoch
    tracking: TrackingTarget | None = None  # rank 0 logs each epoch's record there


# ---------------------------------------------------------------------------------------------
# Partition storage (a folder per epoch in shared storage)


def partition_slots(cfg: EmbedConfig) -> dict[str, int]:
    """The slots of a partition file, in file order: name -> floats a row (the entity rows,
    then the optimiser's state of them)."""
    return {"rows": cfg.dim, **optimizer_slots(cfg, "entity")}


class _Tables:
    """The partition files of one training run; every method is safe for disjoint partitions."""

    def __init__(self, root: Path, bounds: np.ndarray, slots: dict[str, int]):
        self.root, self.bounds, self.slots = root, bounds, slots
        self.dim = slots["rows"]

    def epoch_dir(self, epoch: int) -> Path:
        return self.root / f"epoch-{epoch:05d}"

    def is_done(self, epoch: int) -> bool:
        return (self.epoch_dir(epoch) / "DONE").exists()

    def latest_done(self) -> int | None:
        """The newest complete epoch folder (None if there is none)."""
        done = [int(f.name.split("-")[1]) for f in self.root.glob("epoch-*")
                if (f / "DONE").exists()]
        return max(done) if done else None

    def size(self, part: int) -> int:
        return int(self.bounds[part + 1] - self.bounds[part])

    def _segments(self, part: int) -> list[tuple[str, int, tuple[int, int]]]:
        """(slot, start, (n_p, width)) of each slot in partition ``part``'s flat file."""
        n, start, out = self.size(part), 0, []
        for name, width in self.slots.items():
            out.append((name, start, (n, width)))
            start += n * width
        return out

    def _open(self, folder: Path, part: int) -> np.ndarray:
        flat = np.load(folder / f"part-{part}.npy", mmap_mode="r")
        want = self.size(part) * sum(self.slots.values())
        if flat.ndim != 1 or flat.shape[0] != want:
            raise ValueError(f"{folder / f'part-{part}.npy'}: shape {flat.shape}, expected "
                             f"({want},): slots {self.slots} of {self.size(part)} rows")
        return flat

    def read_into(self, folder: Path, part: int, out: dict[str, np.ndarray]) -> int:
        """Copy partition ``part``'s slots into ``out`` (slot -> (n_p, width), C-contiguous);
        returns its optimiser step count. The file is read straight into ``out``: mapping it
        would add the partition's pages to the worker's memory while it copies."""
        path = folder / f"part-{part}.npy"
        want = self.size(part) * sum(self.slots.values())
        with open(path, "rb") as f:
            major, _ = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if major == 1
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            if shape != (want,) or fortran or dtype != np.float32:
                raise ValueError(f"{path}: shape {shape} {dtype}, expected ({want},) float32: "
                                 f"slots {self.slots} of {self.size(part)} rows")
            for name, _, shape in self._segments(part):
                buf = memoryview(out[name]).cast("B")
                if out[name].shape != shape or f.readinto(buf) != buf.nbytes:
                    raise ValueError(f"{path}: slot {name!r} short or of shape {out[name].shape}")
        return int(json.loads((folder / f"part-{part}.json").read_text())["step"])

    def write(self, folder: Path, part: int, state: dict[str, np.ndarray], step: int) -> None:
        """Write partition ``part``'s slots (slot -> (n_p, width)) atomically, from the arrays
        themselves (no copy, no mapping)."""
        tmp = folder / f".part-{part}.tmp.npy"
        total = self.size(part) * sum(self.slots.values())
        with open(tmp, "wb") as f:
            np.lib.format.write_array_header_1_0(
                f, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                    "fortran_order": False, "shape": (total,)})
            for name, _, shape in self._segments(part):
                block = np.ascontiguousarray(state[name], dtype=np.float32)
                if block.shape != shape:
                    raise ValueError(f"partition {part}: slot {name!r} of shape {block.shape}, "
                                     f"expected {shape}")
                f.write(memoryview(block).cast("B"))
        os.replace(tmp, folder / f"part-{part}.npy")
        (folder / f"part-{part}.json").write_text(json.dumps({"step": step}))

    def source(self, epoch: int, part: int) -> Path:
        """Where epoch ``epoch`` reads ``part``: its output folder once written, else its input."""
        nxt = self.epoch_dir(epoch + 1)
        return nxt if (nxt / f"part-{part}.npy").exists() else self.epoch_dir(epoch)

    def initialise(self, num_relations: int, seed: int) -> None:
        folder = self.epoch_dir(0)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for part in range(len(self.bounds) - 1):
            n = self.size(part)
            state = {name: np.zeros((n, width), np.float32) for name, width in self.slots.items()}
            state["rows"] = init_entity_rows(n, self.dim, seed, part)
            self.write(folder, part, state, 0)
        np.save(folder / "relations.npy", init_relations(num_relations, self.dim, seed))
        (folder / "DONE").write_text("{}")

    def entities(self, epoch: int, order: np.ndarray) -> np.ndarray:
        """(E, d) entity rows of a complete epoch folder in entity id order (``order``: the
        position of each id in the partitions, `hmn.transe.entity_order`)."""
        folder = self.epoch_dir(epoch)
        ids = np.empty_like(order)
        ids[order] = np.arange(order.shape[0])  # the entity id at each position
        out = np.empty((int(self.bounds[-1]), self.dim), np.float32)
        for part in range(len(self.bounds) - 1):
            a, b = self.bounds[part], self.bounds[part + 1]
            out[ids[a:b]] = self._open(folder, part)[:(b - a) * self.dim].reshape(b - a, -1)
        return out


def _bucket_dir(edges: Path, head_part: int, tail_part: int) -> Path:
    return edges / f"bucket-{head_part}-{tail_part}"


def _file_edges(shard, edges: Path, bounds: np.ndarray, position: np.ndarray, rank: int,
                batch_size: int = 1 << 20) -> int:
    """Write this worker's shard of triples into per-bucket files of partition-local ids
    (``position``: each entity id's position in the partitions, `hmn.transe.entity_order`)."""
    P = len(bounds) - 1
    pieces: dict[int, list[np.ndarray]] = {}
    count = 0
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
        h, r, t = (np.asarray(batch[c], np.int64) for c in ("head", "relation", "tail"))
        h, t = position[h], position[t]
        hp, tp = entity_partition(h, bounds), entity_partition(t, bounds)
        bucket = hp * P + tp
        order = np.argsort(bucket, kind="stable")
        local = np.stack([h - bounds[hp], r, t - bounds[tp]], 1)[order]  # (T, 3) local ids
        ids, starts = np.unique(bucket[order], return_index=True)
        for b, chunk in zip(ids, np.split(local, starts[1:])):
            pieces.setdefault(int(b), []).append(chunk)
        count += len(h)
    for b, chunks in pieces.items():
        folder = _bucket_dir(edges, b // P, b % P)
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / f"rank-{rank}.npy", np.concatenate(chunks))
    return count


def _bucket_size(edges: Path, i: int, j: int) -> int:
    """Triples of bucket (i, j), read from its files' headers."""
    folder = _bucket_dir(edges, i, j)
    files = sorted(folder.glob("rank-*.npy")) if folder.exists() else []
    return sum(int(np.load(f, mmap_mode="r").shape[0]) for f in files)


def _bucket_triples(edges: Path, i: int, j: int, offset: int) -> np.ndarray:
    """(T, 3) triples of bucket (i, j) with tail ids shifted by ``offset`` (rows of j after i)."""
    folder = _bucket_dir(edges, i, j)
    files = sorted(folder.glob("rank-*.npy")) if folder.exists() else []
    if not files:
        return np.empty((0, 3), np.int64)
    triples = np.concatenate([np.load(f) for f in files])
    triples[:, 2] += offset
    return triples


# ---------------------------------------------------------------------------------------------
# The Ray Train worker loop


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _all_reduce_(tensor: torch.Tensor, world: int) -> None:
    if world > 1:
        dist.all_reduce(tensor)


class _Worker:
    """One TransE worker of the Ray Train group: its rank, the partition tables, its edge
    buckets and the replicated relation table (R, d) with its optimiser state."""

    def __init__(self, job: EmbedJob, rank: int, world: int,
                 device: torch.device | str = "cpu"):
        self.job, self.cfg, self.rank, self.world = job, job.cfg, rank, world
        self.device = torch.device(device)  # where buckets train (a worker's GPU, or the CPU)
        self.P = job.cfg.num_partitions
        self.bounds = partition_bounds(job.num_entities, self.P)
        self.order = entity_order(job.num_entities, job.cfg.seed)
        self.tables = _Tables(Path(job.root) / "tables", self.bounds, partition_slots(job.cfg))
        self.edges = Path(job.root) / f"edges-w{world}"
        self.p_head = torch.from_numpy(np.asarray(job.p_head, np.float32)).to(self.device)  # (R,)
        self.relations = torch.empty(0)  # (R, d): set by load_relations
        self.rel_state: dict[str, torch.Tensor] = {}  # relation_<slot>: set by load_relations
        # rank 0 logs each epoch's record to the run's tracking (pipeline.tracking)
        self.tracker = attach(job.tracking, "embed") if rank == 0 else Tracker()

    def file_edges(self) -> None:
        """This worker's shard of triples, filed by bucket once per world size."""
        import ray.train

        if (self.edges / "DONE").exists():
            return
        if self.rank == 0:  # files of an interrupted attempt may hold another split of the shards
            shutil.rmtree(self.edges, ignore_errors=True)
        _barrier(self.world)
        shard = ray.train.get_dataset_shard("train")
        count = _file_edges(shard, self.edges, self.bounds, self.order, self.rank)
        log.info("rank %d: filed %d triples into %d x %d buckets", self.rank, count, self.P, self.P)
        _barrier(self.world)
        if self.rank == 0:
            (self.edges / "DONE").write_text("")

    def resume_point(self) -> tuple[int, list[dict]]:
        """The epoch to start at and the history before it: the last complete epoch folder
        named by the Ray Train checkpoint, else epoch 0 (whose tables rank 0 initialises)."""
        import ray.train

        start, history = 0, []
        ckpt = ray.train.get_checkpoint()
        if ckpt:
            with ckpt.as_directory() as d:
                meta = json.loads(Path(d, "meta.json").read_text())
            start, history = int(meta["epoch"]), meta["history"]
            log.info("rank %d: resuming TransE at epoch %d", self.rank, start)
        # A run killed between writing an epoch's folder (and removing the one before it) and Ray
        # Train recording that epoch's checkpoint resumes from the newest complete folder instead:
        # it holds everything an epoch starts from, and its history.json the history up to it.
        tables = self.tables
        latest = tables.latest_done()
        newer = None if latest is None else tables.epoch_dir(latest) / "history.json"
        if newer is not None and latest > start and newer.exists():
            history = json.loads(newer.read_text())
            log.info("rank %d: epoch folder %d is newer than the checkpoint's %d: resuming there",
                     self.rank, latest, start)
            start = latest
        if self.rank == 0 and not tables.is_done(start):
            if start:
                raise RuntimeError(f"{tables.epoch_dir(start)}: checkpointed tables are missing")
            tables.initialise(self.job.num_relations, self.cfg.seed)
        _barrier(self.world)
        return start, history

    def load_relations(self, epoch: int) -> None:
        """The relation table of epoch folder ``epoch`` and this rank's optimiser state of it."""
        folder = self.tables.epoch_dir(epoch)
        relations = torch.from_numpy(np.load(folder / "relations.npy"))  # (R, d), replicated
        self.relations = relations.to(self.device)
        R = self.relations.shape[0]
        self.rel_state = {
            f"relation_{slot}": torch.zeros(R, width, device=self.device)
            for slot, width in optimizer_slots(self.cfg, "relation").items()
        }
        path = folder / f"relopt-rank{self.rank}.pt"
        if path.exists():
            saved = load_torch_file(path, self.device,
                                    "a fresh embed stage (--stages embed --force)")
            for key, value in self.rel_state.items():
                slot = key.removeprefix("relation_")
                if slot not in saved or tuple(saved[slot].shape) != tuple(value.shape):
                    raise ValueError(f"{path}: no {slot!r} of shape {tuple(value.shape)} "
                                     f"(embed.optimizer={self.cfg.optimizer!r}); rerun with "
                                     "--stages embed --force")
                value.copy_(saved[slot])

    def fail_if_injected(self, epoch: int) -> None:
        """Test hook: the last rank raises once at the start of ``job.fail_at_epoch``."""
        marker = Path(self.job.root) / "failed-once"
        if epoch == self.job.fail_at_epoch and self.rank == self.world - 1 and not marker.exists():
            marker.write_text("")
            raise RuntimeError(f"fail_at_epoch={epoch}: injected failure")

    def train_epoch(self, epoch: int) -> dict:
        """Train this worker's buckets of every round of ``epoch`` (partitions read from epoch
        folder ``epoch``, written to ``epoch + 1``), summing the relation updates of all workers
        after each round; returns the epoch's history record."""
        started = time.perf_counter()
        nxt = self.tables.epoch_dir(epoch + 1)
        if self.rank == 0:
            shutil.rmtree(nxt, ignore_errors=True)  # a partial folder of an interrupted attempt
            nxt.mkdir(parents=True)
        _barrier(self.world)
        # loss, active, pairs, triples, busy seconds, partition I/O seconds (on the device: NCCL
        # reduces CUDA tensors)
        totals = torch.zeros(6, dtype=torch.float64, device=self.device)
        schedule = bucket_schedule(self.P, self.world, self.cfg.seed, epoch)
        mine = [round_[self.rank] for round_ in schedule] + [None]  # this worker's bucket per round
        held: dict[int, tuple[np.ndarray, int]] = {}  # partition kept in memory for the next round
        progress = self._progress(epoch, mine[:-1])
        for r in range(len(schedule)):
            rel_before = self.relations.clone()
            if mine[r] is not None:
                on_batch = None
                if progress is not None:
                    progress.update(0, postfix=f"round {r + 1}/{len(schedule)}")
                    on_batch = progress.update
                totals += self._train_bucket(epoch, mine[r], set(mine[r + 1] or ()), held,
                                             on_batch)
            # Relations: every worker's update of this round, summed (also the round's barrier).
            delta = self.relations - rel_before
            _all_reduce_(delta, self.world)
            self.relations.copy_(rel_before + delta)
        if progress is not None:
            progress.close()
        busy, io = float(totals[4]), float(totals[5])
        _all_reduce_(totals, self.world)
        self._complete_epoch_folder(epoch)
        seconds = time.perf_counter() - started
        return {"epoch": epoch, "loss": float(totals[0] / max(totals[2], 1)),
                "active": float(totals[1] / max(totals[2], 1)), "seconds": seconds,
                "triples_per_s": float(totals[3]) / max(seconds, 1e-9),
                "rank0_busy_fraction": busy / max(seconds, 1e-9),
                "rank0_io_fraction": io / max(seconds, 1e-9)}

    def _progress(self, epoch: int, buckets: list[tuple[int, int] | None]) -> Progress | None:
        """Rank 0: the progress of its buckets' triples in ``epoch`` (the other ranks train as
        many, give or take a bucket); None on the other ranks."""
        if self.rank != 0:
            return None
        total = sum(_bucket_size(self.edges, *b) for b in buckets if b is not None)
        what = f"TransE epoch {epoch + 1}/{self.cfg.epochs}"
        if self.world > 1:
            what += f" (rank 0 of {self.world})"
        return Progress(what, total, unit="triples", log=log)

    def _load_partitions(self, epoch: int, parts: list[int], held: dict
                         ) -> tuple[dict[str, np.ndarray], list[int], list[slice]]:
        """The slots of ``parts`` side by side (slot -> (n, width): rows, optimiser state),
        their optimiser step counts and the slice of n each part fills. A part in ``held``
        (trained by this worker in the previous round) comes from memory, the others from
        storage."""
        sizes = [self.tables.size(p) for p in parts]
        starts = np.cumsum([0] + sizes[:-1])
        slices = [slice(int(a), int(a) + n) for a, n in zip(starts, sizes)]
        state = {name: np.empty((sum(sizes), width), np.float32)
                 for name, width in self.tables.slots.items()}
        steps = []
        for p, rows in zip(parts, slices):
            if p in held:
                block, step = held.pop(p)
                for name, values in block.items():
                    state[name][rows] = values
            else:
                step = self.tables.read_into(self.tables.source(epoch, p), p,
                                             {name: a[rows] for name, a in state.items()})
            steps.append(step)
        if held:
            raise RuntimeError(f"partitions {sorted(held)} held but not used")
        return state, steps, slices

    def _train_bucket(self, epoch: int, bucket: tuple[int, int], following: set[int],
                      held: dict, on_batch=None) -> torch.Tensor:
        """Train bucket (i, j) on its one or two partitions, then keep in ``held`` those that
        this worker's next bucket (``following``) uses, since no other worker can touch them
        before that, and write the others to epoch folder ``epoch + 1``.

        Returns the (6,) totals to add: loss, active pairs, pairs, triples, seconds, partition
        I/O seconds.
        """
        i, j = bucket
        parts = [i] if i == j else [i, j]
        io_started = time.perf_counter()
        state, steps, slices = self._load_partitions(epoch, parts, held)
        io = time.perf_counter() - io_started
        tensor = {name: torch.from_numpy(a).to(self.device)  # a copy on a GPU
                  for name, a in state.items()}
        moments = {**self.rel_state,
                   **{f"entity_{name}": t for name, t in tensor.items() if name != "rows"}}
        optimizer = RowOptimizer(self.cfg, {"entity": tensor["rows"], "relation": self.relations},
                                 moments)
        optimizer.lr = epoch_lr(self.cfg, epoch)
        optimizer.step_count = max(steps)
        triples = _bucket_triples(self.edges, i, j, slices[-1].start)  # tails: rows of j after i
        stats = train_bucket(triples, tensor["rows"], self.relations, optimizer, self.p_head,
                             self.cfg, (self.cfg.seed, epoch, i * self.P + j), on_batch)
        if self.device.type != "cpu":
            for name, t in tensor.items():  # the bucket's partitions back to host memory
                state[name][...] = t.cpu().numpy()
        nxt = self.tables.epoch_dir(epoch + 1)
        io_started = time.perf_counter()
        for p, rows in zip(parts, slices):
            block = {name: a[rows] for name, a in state.items()}
            if p in following:
                held[p] = ({name: a.copy() for name, a in block.items()}, optimizer.step_count)
            else:
                self.tables.write(nxt, p, block, optimizer.step_count)
        io += time.perf_counter() - io_started
        return torch.tensor([stats["loss_sum"], stats["active_sum"], stats["pairs"],
                             stats["triples"], stats["seconds"], io], dtype=torch.float64,
                            device=self.device)

    def _complete_epoch_folder(self, epoch: int) -> None:
        """Epoch ``epoch`` trained: rank 0 copies the partitions no bucket wrote (empty buckets)
        into folder ``epoch + 1`` and saves the relations there; every rank saves its relation
        optimiser state."""
        done, nxt = self.tables.epoch_dir(epoch), self.tables.epoch_dir(epoch + 1)
        if self.rank == 0:
            for part in range(self.P):
                if not (nxt / f"part-{part}.npy").exists():
                    shutil.copy(done / f"part-{part}.npy", nxt / f"part-{part}.npy")
                    shutil.copy(done / f"part-{part}.json", nxt / f"part-{part}.json")
            np.save(nxt / "relations.npy", self.relations.cpu().numpy())
        torch.save({key.removeprefix("relation_"): value.cpu()
                    for key, value in self.rel_state.items()}, nxt / f"relopt-rank{self.rank}.pt")
        _barrier(self.world)

    def publish_epoch(self, epoch: int, history: list[dict]) -> None:
        """Mark folder ``epoch + 1`` done, report a Ray Train checkpoint naming it, then remove
        folder ``epoch``, which nothing needs any more."""
        import ray.train

        nxt = self.tables.epoch_dir(epoch + 1)
        record = history[-1]
        if self.rank == 0:
            (nxt / "history.json").write_text(json.dumps(history))
            (nxt / "DONE").write_text(json.dumps(record))
            log.info("TransE epoch %d/%d loss %.4f (%.0f triples/s, %d workers)", epoch + 1,
                     self.cfg.epochs, record["loss"], record["triples_per_s"], self.world)
            self.tracker.log_metrics(record, step=epoch, prefix="embed/")  # live curves (pipeline.tracking)
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if self.rank == 0:
                Path(d, "meta.json").write_text(json.dumps({"epoch": epoch + 1, "tables": str(nxt),
                                                            "history": history}))
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(record, checkpoint=checkpoint)
        if self.rank == 0:
            shutil.rmtree(self.tables.epoch_dir(epoch), ignore_errors=True)


def train_loop_per_worker(config: dict) -> dict:
    """One TransE worker: file the shard into buckets, then train the scheduled buckets epoch
    by epoch from the last complete epoch folder, reporting a checkpoint after each."""
    import ray.train

    job: EmbedJob = config["job"]
    ctx = ray.train.get_context()
    torch.set_num_threads(cpu_threads(job.cfg.num_cpus, ctx.get_local_world_size()))
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    worker = _Worker(job, ctx.get_world_rank(), ctx.get_world_size(), worker_device(job.cfg))
    worker.file_edges()
    start, history = worker.resume_point()
    worker.load_relations(start)
    try:
        for epoch in range(start, job.cfg.epochs):
            worker.fail_if_injected(epoch)
            history.append(worker.train_epoch(epoch))
            worker.publish_epoch(epoch, history)
    finally:
        worker.tracker.close()
    return {"epoch": job.cfg.epochs, "history": history}


def worker_device(cfg: EmbedConfig) -> torch.device:
    """The device of this TransE worker: its GPU (the one Ray Train gave it) with
    ``embed.use_gpu``, else the CPU; a GPU worker without CUDA fails naming the setting."""
    if not cfg.use_gpu:
        return torch.device("cpu")
    import ray.train.torch

    device = ray.train.torch.get_device()
    if device.type != "cuda":
        raise RuntimeError(f"embed.use_gpu=true, but Ray Train gave this TransE worker no GPU "
                           f"(device {device})")
    device = resolve_device(device, setting="embed.use_gpu")
    torch.cuda.set_device(device)  # NCCL collectives use the current device
    return device


# ---------------------------------------------------------------------------------------------
# Driver side


def _explode_facts(batch: pa.Table) -> pa.Table:
    """Grouped facts (subject, relation, [objects]) -> one (head, relation, tail) row per object."""
    objects = batch["object_ids"]
    parents = pc.list_parent_indices(objects)
    return pa.table({"head": pc.take(batch["subject_id"], parents),
                     "relation": pc.take(batch["relation_id"], parents),
                     "tail": pc.list_flatten(objects)})


def with_partitions(cfg: EmbedConfig, num_entities: int) -> EmbedConfig:
    """``cfg`` with ``num_partitions: 0`` (auto) replaced by `hmn.transe.auto_partitions`."""
    if cfg.num_partitions:
        return cfg
    parts = auto_partitions(num_entities, entity_row_floats(cfg), cfg.num_workers)
    return dataclasses.replace(cfg, num_partitions=parts)


def train_transe_on_ray(cfg: EmbedConfig, ingest_dir: Path, num_entities: int, num_relations: int,
                        p_head: np.ndarray, root: Path, *, fail_at_epoch: int = -1,
                        tracking: TrackingTarget | None = None
                        ) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """TransE on Ray Train (see the module docstring); returns (entities, relations, history).

    ``root`` is the shared storage of the run (partition tables, edge buckets, Ray Train
    storage); calling again with the same ``root`` resumes from its last complete epoch.
    """
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    root.mkdir(parents=True, exist_ok=True)
    cfg = with_partitions(cfg, num_entities)
    if cfg.num_partitions > num_entities:
        raise ValueError(f"embed.num_partitions={cfg.num_partitions}: "
                         f"more than the {num_entities} entities")
    facts = ray.data.read_parquet(str(Path(ingest_dir) / "kb" / "facts.parquet"))
    triples = facts.map_batches(_explode_facts, batch_format="pyarrow",
                                batch_size=1 << 18).materialize()
    job = EmbedJob(cfg=cfg, num_entities=num_entities, num_relations=num_relations,
                   p_head=np.asarray(p_head, np.float32), root=str(root),
                   fail_at_epoch=fail_at_epoch, tracking=tracking)
    ray_train_env()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker={"CPU": cfg.num_cpus}),
        run_config=ray.train.RunConfig(
            name="transe", storage_path=str(root / "ray"),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1)),
        datasets={"train": triples},
    )
    result = trainer.fit()
    state = result.return_value
    if not isinstance(state, dict) or "history" not in state:  # a resumed, already finished run
        if result.checkpoint is None:
            raise RuntimeError("TransE finished without a checkpoint or a final state")
        with result.checkpoint.as_directory() as d:
            state = json.loads(Path(d, "meta.json").read_text())
    bounds = partition_bounds(num_entities, cfg.num_partitions)
    tables = _Tables(root / "tables", bounds, partition_slots(cfg))
    final = int(state["epoch"])
    ent = tables.entities(final, entity_order(num_entities, cfg.seed))
    rel = np.load(tables.epoch_dir(final) / "relations.npy")
    if cfg.normalize_entities:  # Bordes 2013: entities end on the unit sphere
        for a in range(0, ent.shape[0], 1 << 18):  # by chunks: no (E, d) temporary
            rows = ent[a:a + (1 << 18)]
            rows /= np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    return ent, rel, state["history"]


def run_embed(cfg: EmbedConfig, ingest_dir: Path, out: Path, checkpoint_dir: Path,
              tracking: TrackingTarget | None = None) -> dict:
    """The embed stage: entity and relation vectors in knowledge-base id order, read from the
    configured files or trained by TransE, written to ``out``; returns the stage's stats.
    ``tracking``: where TransE's rank 0 logs each epoch (`pipeline.tracking`)."""
    kb = KnowledgeBase.load(ingest_dir, text=bool(cfg.entities_file))  # keys align files only
    stats: dict = {"entities": len(kb.entity_keys), "relations": len(kb.relation_keys)}
    if cfg.entities_file:
        ent, rel, source_stats = _embeddings_from_files(cfg, kb)
    else:
        ent, rel, source_stats = _embeddings_from_transe(cfg, kb, ingest_dir, checkpoint_dir,
                                                         tracking)
    stats.update(source_stats)
    if not (np.isfinite(ent).all() and np.isfinite(rel).all()):
        raise ValueError("embed: the embeddings contain NaN or Inf")
    write_vectors(out / "entities.parquet", ent)
    write_vectors(out / "relations.parquet", rel)
    stats["fingerprint"] = embeddings_fingerprint(ent, rel)
    stats["dim"] = int(ent.shape[1])
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return stats


def _embeddings_from_files(cfg: EmbedConfig, kb: KnowledgeBase
                           ) -> tuple[np.ndarray, np.ndarray, dict]:
    """(E, d) entities, (R, d) relations read from ``embed.entities_file`` / ``relations_file``,
    and their stats."""
    ent, missing_e = _load(cfg, cfg.entities_file, cfg.entities_keys, kb.entity_keys, cfg.seed,
                           "entity")
    rel, missing_r = _load(cfg, cfg.relations_file, cfg.relations_keys, kb.relation_keys,
                           cfg.seed + 1, "relation")
    return ent, rel, {"source": "files", "format": cfg.format, "missing_policy": cfg.missing,
                      "missing_entities": missing_e, "missing_relations": missing_r}


def _embeddings_from_transe(cfg: EmbedConfig, kb: KnowledgeBase, ingest_dir: Path,
                            checkpoint_dir: Path, tracking: TrackingTarget | None = None
                            ) -> tuple[np.ndarray, np.ndarray, dict]:
    """(E, d) entities, (R, d) relations trained by `train_transe_on_ray`, and their stats:
    the training history and link prediction on a sample of the training triples."""
    E, R = len(kb.entity_keys), len(kb.relation_keys)
    cfg = with_partitions(cfg, E)
    triples = kb.triples()
    p_head = head_corruption_probs(triples, R, cfg.negatives)
    rng = np.random.default_rng(cfg.seed)
    # The sanity link prediction ranks each sampled triple against every entity (L1 has no
    # matrix-product form): 1,000 triples up to 400k entities, then about 4 x 10^8 / E, at least
    # 100 (100 at the 10m memory's 4.38M entities, where 1,000 took minutes of the stage).
    size = min(len(triples), 1000, max(100, 4 * 10**8 // max(E, 1)))
    sample = triples[rng.choice(len(triples), size=size, replace=False)]
    count = len(triples)
    del triples  # (T, 3) int64: 630 MB at 10.8m facts, not needed while the workers train
    log.info("TransE on %d triples, %d entities, %d relations, %d epochs, %d workers, "
             "%d partitions", count, E, R, cfg.epochs, cfg.num_workers, cfg.num_partitions)
    ent, rel, history = train_transe_on_ray(cfg, ingest_dir, E, R, p_head, checkpoint_dir,
                                            tracking=tracking)
    # Link prediction on a sample of the training triples: a sanity figure, not a benchmark.
    triples = kb.triples()
    # Queries per batch so that the (Q, E) distance matrix stays ~256 MB (34 at FB2M).
    lp = link_prediction(ent, rel, sample, [triples], norm=cfg.norm,
                         batch_size=max(1, min(256, (1 << 26) // E)))
    return ent, rel, {"source": "transe", "triples": count, "history": history,
                      "workers": cfg.num_workers, "partitions": cfg.num_partitions,
                      "train_sample_mrr": lp["mrr"], "train_sample_hits10": lp["hits10"],
                      "train_sample_size": int(len(sample)),
                      "final_loss": float(history[-1]["loss"]) if history else None}


def _load(cfg: EmbedConfig, path: str, keys_path: str, kb_keys: np.ndarray, seed: int,
          what: str) -> tuple[np.ndarray, int]:
    """Rows of an embedding file in knowledge-base id order; missing keys per `embed.missing`."""
    keys, vectors = read_embeddings(path, fmt=cfg.format, keys_path=keys_path or None,
                                    expected_dim=cfg.dim)
    aligned, missing = align_embeddings(list(kb_keys), keys, vectors, policy=cfg.missing, seed=seed,
                                        what=what, source=path)
    if missing:
        log.warning("%s: %d %s keys of the knowledge base had no embedding; initialised "
                    "(embed.missing=init)", path, missing, what)
    return aligned, missing
