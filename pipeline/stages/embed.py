"""Embed stage: TransE entity and relation vectors for the memory.

Either reads user-supplied embeddings (text, npy + keys, OpenKE; keys normalised like the
knowledge base's) or trains TransE on Ray Train (``TorchTrainer``, gloo on CPU) with
``embed.num_workers`` workers.

Design (PyTorch-BigGraph, Lerer et al. 2019): the entity table is the part that outgrows a
worker, so no worker ever holds all of it. Entities are split into ``embed.num_partitions``
contiguous id ranges; a triple belongs to the bucket (partition of its head, partition of its
tail). Each partition (its rows plus their Adam moments) is one ``.npy`` file in shared storage
(``<checkpoint_dir>/tables/epoch-<e>/part-<p>.npy``, shape (S, n_p, d): rows, m, v). An epoch is a
sequence of rounds (``hmn.transe.bucket_schedule``); in a round every worker trains one bucket
whose two partitions no other worker holds, loading them from storage and writing them back
(a partition that the worker's next bucket also uses stays in its memory instead), so a worker
needs memory for about three partitions only. Negatives are drawn among the rows of the two
partitions held. The relation table is small and replicated: after each round the workers
all-reduce (sum) their relation updates. The triples come from a Ray Dataset (the ingested
facts, exploded); each worker files its shard into per-bucket edge files once.

Checkpoints and resume: epoch e reads partitions from ``epoch-<e>`` and writes them to
``epoch-<e+1>``, so ``epoch-<e>`` stays intact until the epoch is complete; then every rank
writes its relation optimiser state, rank 0 marks the folder done and reports a Ray Train
checkpoint that points at it, and the previous folder is deleted. A failed worker group
(``embed.max_failures``) or a re-run after a killed driver (Ray Train resumes by
``(storage_path, name)``) restarts the interrupted epoch from the last complete folder.
"""

from __future__ import annotations

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

from hmn.config import EmbedConfig
from hmn.embedding_files import align_embeddings, read_embeddings
from hmn.transe import (
    TransEParams,
    bernoulli_head_probs,
    bucket_schedule,
    embeddings_fingerprint,
    entity_partition,
    epoch_lr,
    init_entity_rows,
    init_relations,
    link_prediction,
    partition_bounds,
)
from pipeline.artifacts import KnowledgeBase, write_vectors
from pipeline.stages import ray_train_env

log = logging.getLogger(__name__)

def transe_params(cfg: EmbedConfig) -> TransEParams:
    return TransEParams(dim=cfg.dim, norm=cfg.norm, margin=cfg.margin, lr=cfg.lr, epochs=cfg.epochs,
                        batch_size=cfg.batch_size, negatives=cfg.negatives,
                        num_negatives=cfg.num_negatives, shared_negatives=cfg.shared_negatives,
                        loss=cfg.loss, adversarial_temperature=cfg.adversarial_temperature,
                        normalize_entities=cfg.normalize_entities, lr_decay=cfg.lr_decay, seed=cfg.seed)


@dataclass(frozen=True)
class EmbedJob:
    """Everything a TransE worker needs; passed as the train loop's config."""

    cfg: EmbedConfig
    num_entities: int
    num_relations: int
    p_head: np.ndarray  # (R,) probability of corrupting the head
    root: str  # shared storage: tables/, edges/
    fail_at_epoch: int = -1  # test hook: the last rank raises once at the start of this epoch


# ---------------------------------------------------------------------------------------------
# Partition storage (a folder per epoch in shared storage)


class _Tables:
    """The partition files of one training run; every method is safe for disjoint partitions."""

    def __init__(self, root: Path, bounds: np.ndarray, dim: int, slots: int):
        self.root, self.bounds, self.dim, self.slots = root, bounds, dim, slots

    def epoch_dir(self, epoch: int) -> Path:
        return self.root / f"epoch-{epoch:05d}"

    def is_done(self, epoch: int) -> bool:
        return (self.epoch_dir(epoch) / "DONE").exists()

    def latest_done(self) -> int | None:
        """The newest complete epoch folder (None if there is none)."""
        done = [int(f.name.split("-")[1]) for f in self.root.glob("epoch-*") if (f / "DONE").exists()]
        return max(done) if done else None

    def size(self, part: int) -> int:
        return int(self.bounds[part + 1] - self.bounds[part])

    def read_into(self, folder: Path, part: int, out: np.ndarray) -> int:
        """Copy partition ``part`` (S, n_p, d) into ``out``; returns its Adam step count."""
        out[...] = np.load(folder / f"part-{part}.npy", mmap_mode="r")
        return int(json.loads((folder / f"part-{part}.json").read_text())["step"])

    def write(self, folder: Path, part: int, state: np.ndarray, step: int) -> None:
        tmp = folder / f".part-{part}.tmp.npy"
        np.save(tmp, state)
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
            state = np.zeros((self.slots, self.size(part), self.dim), np.float32)
            state[0] = init_entity_rows(self.size(part), self.dim, seed, part)
            self.write(folder, part, state, 0)
        np.save(folder / "relations.npy", init_relations(num_relations, self.dim, seed))
        (folder / "DONE").write_text("{}")

    def entities(self, epoch: int) -> np.ndarray:
        """(E, d) entity rows of a complete epoch folder."""
        folder = self.epoch_dir(epoch)
        out = np.empty((int(self.bounds[-1]), self.dim), np.float32)
        for part in range(len(self.bounds) - 1):
            out[self.bounds[part]:self.bounds[part + 1]] = np.load(folder / f"part-{part}.npy",
                                                                    mmap_mode="r")[0]
        return out


def _bucket_dir(edges: Path, head_part: int, tail_part: int) -> Path:
    return edges / f"bucket-{head_part}-{tail_part}"


def _file_edges(shard, edges: Path, bounds: np.ndarray, rank: int) -> int:
    """Write this worker's shard of triples into per-bucket files of partition-local ids."""
    P = len(bounds) - 1
    pieces: dict[int, list[np.ndarray]] = {}
    count = 0
    for batch in shard.iter_batches(batch_size=1 << 20, batch_format="numpy"):
        h, r, t = (np.asarray(batch[c], np.int64) for c in ("head", "relation", "tail"))
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
        import torch.distributed as dist

        dist.barrier()


def _all_reduce_(tensor, world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.all_reduce(tensor)


def train_loop_per_worker(config: dict) -> dict:
    """One TransE worker: file the shard into buckets, then train the scheduled buckets."""
    import ray.train
    import torch

    from hmn.transe import RowOptimizer, train_bucket

    job: EmbedJob = config["job"]
    cfg = job.cfg
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(cfg.num_cpus)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    params = transe_params(cfg)
    P = cfg.num_partitions
    bounds = partition_bounds(job.num_entities, P)
    adam = params.optimizer == "adam"
    tables = _Tables(Path(job.root) / "tables", bounds, cfg.dim, 3 if adam else 1)
    p_head = torch.from_numpy(np.asarray(job.p_head, np.float32))

    # 1. The shard of triples, filed by bucket once per world size.
    edges = Path(job.root) / f"edges-w{world}"
    if not (edges / "DONE").exists():
        if rank == 0:  # files of an interrupted attempt may hold another split of the shards
            shutil.rmtree(edges, ignore_errors=True)
        _barrier(world)
        count = _file_edges(ray.train.get_dataset_shard("train"), edges, bounds, rank)
        log.info("rank %d: filed %d triples into %d x %d buckets", rank, count, P, P)
        _barrier(world)
        if rank == 0:
            (edges / "DONE").write_text("")

    # 2. Start: the last complete epoch folder named by the Ray Train checkpoint, else epoch 0.
    start, history = 0, []
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            meta = json.loads(Path(d, "meta.json").read_text())
        start, history = int(meta["epoch"]), meta["history"]
        log.info("rank %d: resuming TransE at epoch %d", rank, start)
    # A run killed between writing an epoch's folder (and removing the one before it) and Ray
    # Train recording that epoch's checkpoint resumes from the newest complete folder instead:
    # it holds everything an epoch starts from, and its history.json the history up to it.
    latest = tables.latest_done()
    if latest is not None and latest > start and (tables.epoch_dir(latest) / "history.json").exists():
        history = json.loads((tables.epoch_dir(latest) / "history.json").read_text())
        log.info("rank %d: epoch folder %d is newer than the checkpoint's %d: resuming there",
                 rank, latest, start)
        start = latest
    if rank == 0 and not tables.is_done(start):
        if start:
            raise RuntimeError(f"{tables.epoch_dir(start)}: checkpointed tables are missing")
        tables.initialise(job.num_relations, cfg.seed)
    _barrier(world)
    folder = tables.epoch_dir(start)
    rel_w = torch.from_numpy(np.load(folder / "relations.npy"))  # (R, d), replicated
    rel_m, rel_v = torch.zeros_like(rel_w), torch.zeros_like(rel_w)
    rel_state = folder / f"relopt-rank{rank}.pt"
    if adam and rel_state.exists():
        saved = torch.load(rel_state)
        rel_m.copy_(saved["m"])
        rel_v.copy_(saved["v"])

    for epoch in range(start, cfg.epochs):
        failed_marker = Path(job.root) / "failed-once"
        if epoch == job.fail_at_epoch and rank == world - 1 and not failed_marker.exists():
            failed_marker.write_text("")
            raise RuntimeError(f"fail_at_epoch={epoch}: injected failure")
        started = time.perf_counter()
        nxt = tables.epoch_dir(epoch + 1)
        if rank == 0:
            shutil.rmtree(nxt, ignore_errors=True)  # a partial folder of an interrupted attempt
            nxt.mkdir(parents=True)
        _barrier(world)
        lr = epoch_lr(params, epoch)
        totals = torch.zeros(5, dtype=torch.float64)  # loss, active, pairs, triples, busy seconds
        schedule = bucket_schedule(P, world, cfg.seed, epoch)
        mine = [round_[rank] for round_ in schedule] + [None]  # this worker's bucket per round
        held: dict[int, tuple[np.ndarray, int]] = {}  # partition kept in memory for the next round
        for r in range(len(schedule)):
            rel_before = rel_w.clone()
            if mine[r] is not None:
                i, j = mine[r]
                parts = [i] if i == j else [i, j]
                sizes = [tables.size(p) for p in parts]
                starts = np.cumsum([0] + sizes[:-1])
                state = np.empty((tables.slots, sum(sizes), cfg.dim), np.float32)  # (S, n, d)
                steps = []
                for p, a, n in zip(parts, starts, sizes):
                    if p in held:  # trained by this worker in the previous round
                        rows, step = held.pop(p)
                        state[:, a:a + n] = rows
                        steps.append(step)
                    else:
                        steps.append(tables.read_into(tables.source(epoch, p), p, state[:, a:a + n]))
                assert not held, f"partitions {sorted(held)} held but not used"
                tensor = torch.from_numpy(state)
                moments = {"relation_m": rel_m, "relation_v": rel_v}
                if adam:
                    moments.update(entity_m=tensor[1], entity_v=tensor[2])
                optimizer = RowOptimizer(params, {"entity": tensor[0], "relation": rel_w}, moments)
                optimizer.lr = lr
                optimizer.step_count = max(steps)
                triples = _bucket_triples(edges, i, j, sizes[0] if i != j else 0)
                stats = train_bucket(triples, tensor[0], rel_w, optimizer, p_head, params,
                                     (cfg.seed, epoch, i * P + j))
                totals += torch.tensor([stats["loss_sum"], stats["active_sum"], stats["pairs"],
                                        stats["triples"], stats["seconds"]], dtype=torch.float64)
                following = set(mine[r + 1] or ())
                for p, a, n in zip(parts, starts, sizes):
                    if p in following:  # no other worker can touch p before this one's next round
                        held[p] = (state[:, a:a + n].copy(), optimizer.step_count)
                    else:
                        tables.write(nxt, p, state[:, a:a + n], optimizer.step_count)
                del state, tensor, optimizer
            # Relations: every worker's update of this round, summed (also the round's barrier).
            delta = rel_w - rel_before
            _all_reduce_(delta, world)
            rel_w.copy_(rel_before + delta)
        busy = totals[4].clone()
        _all_reduce_(totals, world)
        # Epoch complete: fill in partitions no bucket wrote (empty buckets), save relations.
        if rank == 0:
            for part in range(P):
                if not (nxt / f"part-{part}.npy").exists():
                    shutil.copy(tables.epoch_dir(epoch) / f"part-{part}.npy", nxt / f"part-{part}.npy")
                    shutil.copy(tables.epoch_dir(epoch) / f"part-{part}.json", nxt / f"part-{part}.json")
            np.save(nxt / "relations.npy", rel_w.numpy())
        if adam:
            torch.save({"m": rel_m, "v": rel_v}, nxt / f"relopt-rank{rank}.pt")
        _barrier(world)
        seconds = time.perf_counter() - started
        record = {"epoch": epoch, "loss": float(totals[0] / max(totals[2], 1)),
                  "active": float(totals[1] / max(totals[2], 1)), "seconds": seconds,
                  "triples_per_s": float(totals[3]) / max(seconds, 1e-9),
                  "rank0_busy_fraction": float(busy) / max(seconds, 1e-9)}
        history.append(record)
        if rank == 0:
            (nxt / "history.json").write_text(json.dumps(history))
            (nxt / "DONE").write_text(json.dumps(record))
            log.info("TransE epoch %d/%d loss %.4f (%.0f triples/s, %d workers)", epoch + 1,
                     cfg.epochs, record["loss"], record["triples_per_s"], world)
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                Path(d, "meta.json").write_text(json.dumps({"epoch": epoch + 1, "tables": str(nxt),
                                                            "history": history}))
                checkpoint = ray.train.Checkpoint.from_directory(d)
            ray.train.report(record, checkpoint=checkpoint)
        if rank == 0:  # the reported checkpoint names nxt; the folder before it is no longer needed
            shutil.rmtree(tables.epoch_dir(epoch), ignore_errors=True)
    return {"epoch": cfg.epochs, "history": history}


# ---------------------------------------------------------------------------------------------
# Driver side


def _explode_facts(batch: pa.Table) -> pa.Table:
    """Grouped facts (subject, relation, [objects]) -> one (head, relation, tail) row per object."""
    objects = batch["object_ids"]
    parents = pc.list_parent_indices(objects)
    return pa.table({"head": pc.take(batch["subject_id"], parents),
                     "relation": pc.take(batch["relation_id"], parents),
                     "tail": pc.list_flatten(objects)})


def train_transe_on_ray(cfg: EmbedConfig, ingest_dir: Path, num_entities: int, num_relations: int,
                        p_head: np.ndarray, root: Path, *, fail_at_epoch: int = -1
                        ) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """TransE on Ray Train (see the module docstring); returns (entities, relations, history).

    ``root`` is the shared storage of the run (partition tables, edge buckets, Ray Train
    storage); calling again with the same ``root`` resumes from its last complete epoch.
    """
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    root.mkdir(parents=True, exist_ok=True)
    if cfg.num_partitions > num_entities:
        raise ValueError(f"embed.num_partitions={cfg.num_partitions}: more than the {num_entities} entities")
    facts = ray.data.read_parquet(str(Path(ingest_dir) / "kb" / "facts.parquet"))
    triples = facts.map_batches(_explode_facts, batch_format="pyarrow", batch_size=1 << 18).materialize()
    job = EmbedJob(cfg=cfg, num_entities=num_entities, num_relations=num_relations,
                   p_head=np.asarray(p_head, np.float32), root=str(root), fail_at_epoch=fail_at_epoch)
    ray_train_env()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers,
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
    tables = _Tables(root / "tables", bounds, cfg.dim, 1)
    final = int(state["epoch"])
    ent = tables.entities(final)
    rel = np.load(tables.epoch_dir(final) / "relations.npy")
    if cfg.normalize_entities:  # Bordes 2013: entities end on the unit sphere
        ent /= np.maximum(np.linalg.norm(ent, axis=1, keepdims=True), 1e-12)
    return ent, rel, state["history"]


def run_embed(cfg: EmbedConfig, ingest_dir: Path, out: Path, checkpoint_dir: Path) -> dict:
    kb = KnowledgeBase.load(ingest_dir)
    E, R = len(kb.entity_keys), len(kb.relation_keys)
    stats: dict = {"entities": E, "relations": R}
    if cfg.entities_file:
        ent, missing_e = _load(cfg, cfg.entities_file, cfg.entities_keys, kb.entity_keys, cfg.seed, "entity")
        rel, missing_r = _load(cfg, cfg.relations_file, cfg.relations_keys, kb.relation_keys, cfg.seed + 1,
                               "relation")
        stats.update(source="files", format=cfg.format, missing_policy=cfg.missing,
                     missing_entities=missing_e, missing_relations=missing_r)
    else:
        triples = kb.triples()
        p_head = (bernoulli_head_probs(triples, R) if cfg.negatives == "bern"
                  else np.full(R, 0.5))
        log.info("TransE on %d triples, %d entities, %d relations, %d epochs, %d workers, %d partitions",
                 len(triples), E, R, cfg.epochs, cfg.num_workers, cfg.num_partitions)
        ent, rel, history = train_transe_on_ray(cfg, ingest_dir, E, R, p_head, checkpoint_dir)
        # Link prediction on a sample of the training triples: a sanity figure, not a benchmark.
        rng = np.random.default_rng(cfg.seed)
        sample = triples[rng.choice(len(triples), size=min(1000, len(triples)), replace=False)]
        # Queries per batch so that the (Q, E) distance matrix stays ~256 MB (34 at FB2M).
        lp = link_prediction(ent, rel, sample, [triples], norm=cfg.norm,
                             batch_size=max(1, min(256, (1 << 26) // E)))
        stats.update(source="transe", triples=len(triples), history=history,
                     workers=cfg.num_workers, partitions=cfg.num_partitions,
                     train_sample_mrr=lp["mrr"], train_sample_hits10=lp["hits10"],
                     final_loss=float(history[-1]["loss"]) if history else None)
    if not (np.isfinite(ent).all() and np.isfinite(rel).all()):
        raise ValueError("embed: the embeddings contain NaN or Inf")
    write_vectors(out / "entities.parquet", ent)
    write_vectors(out / "relations.parquet", rel)
    stats["fingerprint"] = embeddings_fingerprint(ent, rel)
    stats["dim"] = int(ent.shape[1])
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return stats


def _load(cfg: EmbedConfig, path: str, keys_path: str, kb_keys: np.ndarray, seed: int,
          what: str) -> tuple[np.ndarray, int]:
    """Rows of an embedding file in knowledge-base id order; missing keys per `embed.missing`."""
    keys, vectors = read_embeddings(path, fmt=cfg.format, keys_path=keys_path or None, expected_dim=cfg.dim)
    aligned, missing = align_embeddings(list(kb_keys), keys, vectors, policy=cfg.missing, seed=seed,
                                        what=what, source=path)
    if missing:
        log.warning("%s: %d %s keys of the knowledge base had no embedding; initialised (embed.missing=init)",
                    path, missing, what)
    return aligned, missing
