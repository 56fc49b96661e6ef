"""Train stage: the HMN reader on Ray Train's TorchTrainer (gloo on CPU, NCCL on GPU).

The driver prepares the questions (natural plus the paper's artificial ones), the vocabulary and
the encoded token lists, and hands the training questions to Train as a Ray Dataset; each worker
gets its shard through `get_dataset_shard` (Train splits it with ``equal=True``, so every rank runs
the same number of steps). Every worker holds the memory and the index; the word vectors are the
only parameters, so DDP all-reduces just their gradients. Rank 0 writes a checkpoint every epoch
with everything needed to resume (model, optimiser, early-stopping state, history, best model),
and `FailureConfig` restarts a failed worker group from the last one. Runs are named by the
stage's fingerprint, so a killed driver started again resumes the same run (RAY_NOTES 1).
Rank 0 shows each epoch's progress (steps, rate, ETA: `pipeline.progress`) and logs each epoch's
metrics to the run's tracking (`pipeline.tracking`) as the epoch ends.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from hmn.config import ReaderConfig, TrainConfig
from hmn.devices import cpu_threads
from hmn.exact_bf16 import with_exact_precision
from hmn.model import BowEncoder, MemoryLike, make_optimizer
from hmn.readers import Reader, make_reader
from hmn.text import ArtificialPool, Vocabulary, artificial_questions
from hmn.training import EarlyStopping, EpochStats, correct, make_batch, predict, train_epoch
from pipeline.artifacts import (
    KnowledgeBase,
    load_index,
    load_memory,
    load_torch_file,
    memory_dim,
    read_questions,
)
from pipeline.progress import Progress
from pipeline.rundir import RayStorage
from pipeline.stages import ray_train_env
from pipeline.tracking import Tracker, TrackingTarget, attach

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainJob:
    """Everything a worker needs; passed through train_loop_config (picklable, typed)."""

    train: TrainConfig
    reader: ReaderConfig
    memory_dir: str
    dev_path: str            # Parquet: tokens list<int64>, fact_id int64
    facts_meta_path: str     # .npz: fact_subject, fact_relation (for the accuracy metric)
    vocab_size: int
    dim: int
    fingerprints: dict
    pool_path: str = ""      # ArtificialPool (.npz) each epoch draws from; '' = none
    fixed_rows: int = 0      # rows of the training table (the questions of every epoch)
    tracking: TrackingTarget | None = None  # rank 0 logs each epoch's metrics there


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if hasattr(model, "module") else model


def _tokens(col) -> list[np.ndarray]:
    return [np.asarray(t, dtype=np.int64) for t in col]


@dataclass
class _Worker:
    """One worker's fixed inputs: device, memory, readers, and its slice of dev."""

    rank: int
    world: int
    device: torch.device
    memory: MemoryLike
    train_reader: Reader
    infer_reader: Reader
    dev_tokens: list[np.ndarray]     # this rank's slice of dev
    dev_gold: np.ndarray             # (Q,) gold fact ids of that slice
    fact_subject: np.ndarray         # (N,) for the accuracy metric
    fact_relation: np.ndarray
    pool: ArtificialPool | None      # the artificial questions drawn afresh each epoch
    tracker: Tracker                 # rank 0: the run's tracking (pipeline.tracking); else no-op


@dataclass
class _TrainState:
    """What an epoch checkpoint restores: model, optimiser, early stopping, history, best model."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    stopper: EarlyStopping
    history: list[dict]
    best_state: dict | None
    start_epoch: int


def _load_worker(job: TrainJob, rank: int, world: int, device: torch.device) -> _Worker:
    """The memory on `device`, the readers, the facts' metadata and this rank's slice of dev."""
    cfg = job.train
    memory = load_memory(Path(job.memory_dir), device)
    needs_index = "clustered" in (cfg.reader, cfg.infer_reader)
    index = load_index(Path(job.memory_dir)) if needs_index else None
    train_reader = make_reader(cfg.reader, memory, index, **job.reader.params(cfg.reader, training=True))
    infer_reader = make_reader(cfg.infer_reader, memory, index,
                               **job.reader.params(cfg.infer_reader, training=False))
    # bfloat16 scans of the exact reader where they pay (CUDA); readers live on memory.device
    train_reader = with_exact_precision(train_reader, cfg.exact_precision, "train.exact_precision")
    infer_reader = with_exact_precision(infer_reader, cfg.exact_precision, "train.exact_precision")
    meta = np.load(job.facts_meta_path)
    dev = pq.read_table(job.dev_path)
    tokens = _tokens(dev["tokens"].to_pylist())
    gold = dev["fact_id"].to_numpy()
    mine = np.arange(rank, len(gold), world)  # each rank scores its slice of dev
    pool = ArtificialPool.load(job.pool_path) if job.pool_path else None
    tracker = attach(job.tracking, "train") if rank == 0 else Tracker()
    return _Worker(rank, world, device, memory, train_reader, infer_reader, [tokens[i] for i in mine],
                   gold[mine], meta["fact_subject"], meta["fact_relation"], pool, tracker)


def _init_or_resume(job: TrainJob, w: _Worker) -> _TrainState:
    """A fresh model (the same initial weights on every rank), or the last epoch checkpoint's."""
    import ray.train
    import ray.train.torch

    cfg = job.train
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = BowEncoder(job.vocab_size, job.dim, init_std=cfg.init_std,
                       sparse=cfg.optimizer == "sparse_adam").to(w.device)
    st = _TrainState(model, make_optimizer(model, cfg.optimizer, cfg.lr), EarlyStopping(cfg.patience),
                     [], None, 0)
    ckpt = ray.train.get_checkpoint()
    if ckpt:
        with ckpt.as_directory() as d:
            state = _load_checkpoint_state(d, w.device)
        st.model.load_state_dict(state["model"])
        st.optimizer.load_state_dict(state["optimizer"])
        st.stopper.load_state_dict(state["stopper"])
        st.history, st.best_state, st.start_epoch = state["history"], state["best_model"], state["epoch"]
        log.info("rank %d: resuming at epoch %d", w.rank, st.start_epoch)
    if w.world > 1:
        st.model = ray.train.torch.prepare_model(st.model, move_to_device=False)
    return st


def _load_checkpoint_state(directory: str, device: torch.device | str) -> dict:
    """An epoch checkpoint's ``state.pt``: tensors and plain data only (`load_torch_file`)."""
    return load_torch_file(os.path.join(directory, "state.pt"), device,
                           "a fresh training run (python -m pipeline.run --stages train --force)")


def _plain(obj):
    """``obj`` with numpy scalars as Python numbers: a checkpoint holds tensors and plain data
    only, which `load_torch_file` (``weights_only=True``) accepts."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_plain(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_plain(v) for v in obj)
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def _validate(job: TrainJob, w: _Worker, model: torch.nn.Module, stats: EpochStats) -> torch.Tensor:
    """Dev accuracy counts and loss sums, summed over the ranks: (hits, questions, facts touched,
    loss * steps, steps)."""
    import torch.distributed as dist

    preds = predict(_unwrap(model), w.infer_reader, w.dev_tokens, k=job.reader.k, device=w.device)
    hit = correct(preds.fact_ids, w.dev_gold, w.fact_subject, w.fact_relation)
    sums = torch.tensor([hit.sum(), len(w.dev_gold), preds.touched.sum(), stats.loss * stats.steps,
                         stats.steps], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized() and w.world > 1:
        sums = sums.to(w.device)  # NCCL reduces CUDA tensors only
        dist.all_reduce(sums)
    return sums.cpu()


def _epoch_metrics(epoch: int, stats: EpochStats, sums: torch.Tensor, stopper: EarlyStopping, world: int) -> dict:
    return {
        "epoch": epoch, "loss": float(sums[3] / max(sums[4], 1)),
        "dev_accuracy": float(sums[0] / max(sums[1], 1)),
        "best_dev_accuracy": stopper.best, "best_epoch": stopper.best_epoch,
        "softmax_size": stats.softmax_size, "train_facts_touched": stats.facts_touched,
        "dev_facts_touched": float(sums[2] / max(sums[1], 1)), "epoch_seconds": stats.seconds,
        "steps": stats.steps, "questions": stats.questions * world,
    }


def _report_epoch(st: _TrainState, epoch: int, metrics: dict, rank: int) -> None:
    """Report the epoch's metrics; rank 0 attaches the checkpoint a restarted run resumes from."""
    import ray.train

    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0:
            torch.save({"model": _unwrap(st.model).state_dict(), "optimizer": st.optimizer.state_dict(),
                        "stopper": _plain(st.stopper.state_dict()), "history": _plain(st.history),
                        "best_model": st.best_state, "epoch": epoch + 1}, os.path.join(d, "state.pt"))
            checkpoint = ray.train.Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=checkpoint)


def _run_epoch(job: TrainJob, w: _Worker, st: _TrainState, shard, epoch: int,
               generator: torch.Generator) -> None:
    """Train one epoch on this rank's shard, validate, update early stopping, checkpoint."""
    cfg = job.train
    per_worker = max(1, cfg.batch_size // w.world)
    generator.manual_seed(cfg.seed * 1000 + epoch * 10 + w.rank)
    drawn = (w.pool.draw(cfg.artificial_per_epoch, cfg.seed, epoch, w.rank, w.world)
             if w.pool is not None else ([], np.zeros(0, np.int64)))
    fixed_size, pool_size = batch_split(per_worker, job.fixed_rows // w.world, len(drawn[0]))
    batches = (
        make_batch(_tokens(b["tokens"]) + drawn[0][i * pool_size:(i + 1) * pool_size],
                   np.concatenate([b["fact_id"], drawn[1][i * pool_size:(i + 1) * pool_size]]),
                   w.device)
        for i, b in enumerate(shard.iter_batches(batch_size=fixed_size, batch_format="numpy",
                                                 local_shuffle_buffer_size=max(4 * per_worker, 1024),
                                                 local_shuffle_seed=cfg.seed + epoch))
    )
    steps = math.ceil(job.fixed_rows // w.world / fixed_size)  # this rank's batches
    if cfg.max_steps_per_epoch:
        steps = min(steps, cfg.max_steps_per_epoch)
    on_step = _EpochProgress(epoch, w.rank, total=steps)
    stats = train_epoch(st.model, batches, w.memory, w.train_reader, st.optimizer, loss=cfg.loss,
                        k=job.reader.k, generator=generator, max_steps=cfg.max_steps_per_epoch,
                        on_step=on_step)
    on_step.close()
    sums = _validate(job, w, st.model, stats)
    if st.stopper.update(epoch, float(sums[0] / max(sums[1], 1))):
        st.best_state = {k: v.detach().cpu().clone() for k, v in _unwrap(st.model).state_dict().items()}
    metrics = _epoch_metrics(epoch, stats, sums, st.stopper, w.world)
    st.history.append(metrics)
    if w.rank == 0:
        log.info("epoch %d: loss %.4f dev acc %.4f (best %.4f at %d) softmax %.0f facts, %.1f s",
                 epoch, metrics["loss"], metrics["dev_accuracy"], st.stopper.best,
                 st.stopper.best_epoch, stats.softmax_size, stats.seconds)
        w.tracker.log_metrics(metrics, step=epoch, prefix="train/")  # live curves (pipeline.tracking)
    _report_epoch(st, epoch, metrics, w.rank)


def batch_split(per_worker: int, fixed_rows: int, drawn: int) -> tuple[int, int]:
    """(fixed questions, drawn questions) per batch of ``per_worker``: the epoch's ``drawn``
    artificial questions spread evenly over the batches of the ``fixed_rows`` fixed ones, so every
    batch mixes both and every drawn question is used; (per_worker, 0) with nothing drawn."""
    if drawn <= 0 or fixed_rows <= 0:
        return per_worker, 0
    fixed = max(1, round(per_worker * fixed_rows / (fixed_rows + drawn)))
    steps = math.ceil(fixed_rows / fixed)
    return fixed, math.ceil(drawn / steps)


def train_loop_per_worker(config: dict) -> dict:
    """Ray Train worker loop (also runs in local mode with num_workers=0).

    Returns the final state (history, early stopping, best and last weights); Ray Train hands rank
    0's return value to the driver. In local mode that is the only copy: its checkpoints are not
    persisted, so only multi-worker runs resume after a driver kill.
    """
    import ray.train
    import ray.train.torch

    job: TrainJob = config["job"]
    cfg = job.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # a worker process has no logging set up: rank 0's epoch and progress lines need a handler
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(cfg.threads or cpu_threads(math.ceil(cfg.cpus_per_worker),
                                                     ctx.get_local_world_size()))
    device = ray.train.torch.get_device() if cfg.use_gpu else torch.device("cpu")
    w = _load_worker(job, rank, world, device)
    st = _init_or_resume(job, w)
    shard = ray.train.get_dataset_shard("train")
    generator = torch.Generator(device=device).manual_seed(cfg.seed * 1000 + rank)
    try:
        for epoch in range(st.start_epoch, cfg.max_epochs):
            if st.stopper.should_stop:
                break
            _run_epoch(job, w, st, shard, epoch, generator)
    finally:
        w.tracker.close()
    # Ray Train refuses torch tensors in return values: hand back numpy arrays.
    return {"history": st.history, "stopper": st.stopper.state_dict(),
            "best_model": _to_numpy(st.best_state), "model": _to_numpy(_unwrap(st.model).state_dict())}


def _to_numpy(state: dict | None) -> dict | None:
    return None if state is None else {k: v.detach().cpu().numpy() for k, v in state.items()}


def _to_torch(state: dict | None) -> dict | None:
    if state is None:
        return None
    return {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in state.items()}


class _EpochProgress:
    """on_step callback of `train_epoch`: rank 0 shows the epoch's steps with their rate, the
    ETA of the epoch and the mean loss (`pipeline.progress`: a line every ``every_s`` seconds in
    a worker's log, a bar on a terminal); the other ranks stay quiet. ``total``: this rank's
    steps in the epoch (None: unknown, no ETA)."""

    def __init__(self, epoch: int, rank: int, every_s: float = 30.0, total: int | None = None,
                 **progress_kw) -> None:
        self.loss_sum = 0.0
        self.bar = (Progress(f"epoch {epoch}", total, unit="steps", every_s=every_s, log=log,
                             **progress_kw) if rank == 0 else None)

    def __call__(self, step: int, loss: float) -> None:
        self.loss_sum += loss
        if self.bar is not None:
            self.bar.update(step - self.bar.done, postfix=f"mean loss {self.loss_sum / step:.4f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def facts_in_file(path: str, kb: KnowledgeBase) -> np.ndarray:
    """Sorted ids of the facts of ``kb`` whose (subject, relation) pair is a line of the facts
    file ``path`` (SimpleQuestions grouped format); a line that does not parse is an error naming
    the file and line, a pair the knowledge base lacks is left out (and logged)."""
    from hmn.formats.grouped import parse_grouped_facts
    from hmn.formats.lines import iter_line_chunks
    from hmn.formats.parsed import FormatError
    from hmn.kb import KeyTables, match_questions

    if not os.path.isfile(path):
        raise FileNotFoundError(f"train.artificial_fixed_from: {path!r} is not a file")
    keys = KeyTables.from_facts(kb.entity_keys, kb.relation_keys, kb.fact_subject, kb.fact_relation)
    found, missing = [], 0
    for first, lines in iter_line_chunks(path):
        parsed = parse_grouped_facts(lines, first, path)
        if parsed.rejects.num_rows:
            bad = parsed.rejects.slice(0, 1).to_pylist()[0]
            raise FormatError(path, bad["line"], bad["reason"])
        match = match_questions(parsed.table["subject"], parsed.table["relation"], keys)
        found.append(match.fact_id[match.found])
        missing += int((~match.found).sum())
    if missing:
        log.info("%s: %d facts are not in the knowledge base", path, missing)
    return np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64)


def prepare_questions(kb: KnowledgeBase, ingest_dir: Path, artificial: bool, limit: int = 0,
                      seed: int = 0, dev_limit: int = 0, per_epoch: int = 0,
                      fixed_from: str = "") -> tuple[dict, dict]:
    """Training texts (natural + artificial) and dev texts with gold fact ids.

    Artificial questions go to facts without a natural one; ``limit`` > 0 keeps a seeded sample of
    that many such facts (FB2M: 10.7M facts lack a natural question). With ``per_epoch`` > 0 only
    the facts of the facts file ``fixed_from`` (none when '') keep theirs in the fixed texts; the
    others form the pool (``train["pool"]``, fact ids) that each epoch draws ``per_epoch`` from.
    ``dev_limit`` > 0 keeps a seeded sample of that many dev questions (in file order) for the
    per-epoch validation.
    """
    train = read_questions(ingest_dir, "train")
    dev = read_questions(ingest_dir, "dev")
    if train is None or train.num_rows == 0:
        raise ValueError(f"{ingest_dir}/questions/train.parquet: no training questions")
    if dev is None or dev.num_rows == 0:
        raise ValueError(f"{ingest_dir}/questions/dev.parquet: no dev questions")
    texts = train["question"].to_pylist()
    facts = train["fact_id"].to_numpy()
    flags = [False] * len(texts)
    n_art = 0
    pool = np.zeros(0, np.int64)
    if artificial:
        covered = np.zeros(kb.num_facts, dtype=bool)
        covered[facts] = True
        todo = np.flatnonzero(~covered)
        if per_epoch:
            fixed = np.zeros(kb.num_facts, dtype=bool)
            if fixed_from:
                fixed[facts_in_file(fixed_from, kb)] = True
            todo, pool = todo[fixed[todo]], todo[~fixed[todo]]
        if 0 < limit < todo.size:
            todo = np.sort(np.random.default_rng([seed, 0xA27]).choice(todo, size=limit, replace=False))
        names = [kb.entity_names[s] for s in kb.fact_subject[todo]]
        rels = [kb.relation_keys[r] for r in kb.fact_relation[todo]]
        a_texts, a_facts = artificial_questions(todo, names, rels, np.zeros(todo.size, dtype=bool))
        texts += a_texts
        facts = np.concatenate([facts, a_facts])
        flags += [True] * len(a_texts)
        n_art = len(a_texts)
    dev_total = dev.num_rows
    if 0 < dev_limit < dev_total:
        keep = np.sort(np.random.default_rng([seed, 0xDE7]).choice(dev_total, size=dev_limit,
                                                                      replace=False))
        dev = dev.take(pa.array(keep))
    return ({"texts": texts, "facts": facts, "artificial": flags, "artificial_count": n_art,
             "pool": pool},
            {"texts": dev["question"].to_pylist(), "facts": dev["fact_id"].to_numpy(),
             "total": dev_total})


class TrainingFailed(RuntimeError):
    """Ray Train gave up (retries spent); the message says where the checkpoints a re-run
    resumes from are kept."""


def _fit(job: TrainJob, train_table: pa.Table, storage: RayStorage, run_name: str) -> dict:
    """Run the worker loop on Ray Train; the final state (rank 0's return value, or else the last
    checkpoint's)."""
    import ray.data
    import ray.train
    from ray.train.torch import TorchTrainer

    cfg = job.train
    ray_train_env()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
            resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage.path, storage_filesystem=storage.filesystem,
            # controller_failure_limit: a worker group that cannot start (each try waits
            # RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S for its resources, e.g. after its node was
            # lost and none replaced it) fails the run after as many retries as a failed worker
            # group; Ray's default (-1) waits for resources forever.
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures,
                                                   controller_failure_limit=cfg.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)),
        datasets={"train": ray.data.from_arrow(train_table)},
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise TrainingFailed(
            f"training failed, Ray Train gave up (train.max_failures={cfg.max_failures}): "
            f"{str(e).strip().splitlines()[-1]}\nIts checkpoints are kept in "
            f"{storage.run_uri(run_name)}: the same command resumes from the last one.") from e
    state = result.return_value
    if not isinstance(state, dict) or "history" not in state:
        if result.checkpoint is None:
            raise RuntimeError("training finished without a checkpoint or a final state")
        with result.checkpoint.as_directory() as d:
            state = _load_checkpoint_state(d, "cpu")
    return state


def run_train(train_cfg: TrainConfig, reader_cfg: ReaderConfig, ingest_dir: Path, memory_dir: Path,
              out: Path, storage: RayStorage | Path, run_name: str, fingerprints: dict,
              force: bool = False, tracking: TrackingTarget | None = None) -> dict:
    """The train stage; ``storage`` is Ray Train's storage (a local folder, or
    `pipeline.rundir.RayStorage` on an object store), where the run ``run_name`` resumes."""
    if not isinstance(storage, RayStorage):
        storage = RayStorage.local(storage)
    kb = KnowledgeBase.load(ingest_dir)
    train_q, dev_q = prepare_questions(kb, ingest_dir, train_cfg.artificial_questions,
                                       train_cfg.artificial_limit, train_cfg.seed,
                                       train_cfg.dev_limit, train_cfg.artificial_per_epoch,
                                       train_cfg.artificial_fixed_from)
    pool_facts = train_q["pool"]
    pool_texts = ArtificialPool.vocabulary_texts(pool_facts, kb.fact_subject, kb.fact_relation,
                                                 kb.entity_names, kb.relation_keys)
    vocab = Vocabulary.build(train_q["texts"] + pool_texts)
    vocab.save(out / "vocab.json")
    train_tokens, train_unknown = vocab.encode_many(train_q["texts"])
    dev_tokens, dev_unknown = vocab.encode_many(dev_q["texts"])
    data = out / "data"
    data.mkdir()
    list_type = pa.list_(pa.int64())
    train_table = pa.table({"tokens": pa.array([t.tolist() for t in train_tokens], list_type),
                            "fact_id": pa.array(train_q["facts"], pa.int64()),
                            "artificial": pa.array(train_q["artificial"], pa.bool_())})
    pq.write_table(train_table, data / "train.parquet")
    pq.write_table(pa.table({"tokens": pa.array([t.tolist() for t in dev_tokens], list_type),
                             "fact_id": pa.array(dev_q["facts"], pa.int64())}), data / "dev.parquet")
    np.savez(data / "facts_meta.npz", fact_subject=kb.fact_subject, fact_relation=kb.fact_relation)
    pool_path, pool_size = "", 0
    if train_cfg.artificial_per_epoch:
        pool = ArtificialPool.build(pool_facts, kb.fact_subject, kb.fact_relation, kb.entity_names,
                                    kb.relation_keys, vocab)
        pool_path, pool_size = str(data / "artificial_pool.npz"), len(pool)
        pool.save(pool_path)
        del pool
    dim = memory_dim(memory_dir)
    job = TrainJob(train=train_cfg, reader=reader_cfg, memory_dir=str(memory_dir),
                   dev_path=str(data / "dev.parquet"), facts_meta_path=str(data / "facts_meta.npz"),
                   vocab_size=len(vocab), dim=dim, fingerprints=fingerprints,
                   pool_path=pool_path, fixed_rows=train_table.num_rows, tracking=tracking)
    log.info("training on %d questions (%d artificial) plus %d a epoch drawn from %d pool facts, "
             "vocabulary %d words, dev %d of %d questions, memory %d x %d", train_table.num_rows,
             train_q["artificial_count"], min(train_cfg.artificial_per_epoch, pool_size), pool_size,
             len(vocab), len(dev_tokens), dev_q["total"], kb.num_facts, dim)

    if force:
        storage.remove(run_name)
    state = _fit(job, train_table, storage, run_name)
    history = state["history"]
    best = _to_torch(state["best_model"] or state["model"])
    torch.save({"model": best, "dim": dim, "vocab_size": len(vocab), "fingerprints": _plain(fingerprints),
                "train": _plain(copy.deepcopy(train_cfg.__dict__)),
                "reader": _plain(copy.deepcopy(reader_cfg.__dict__))},
               out / "model.pt")
    (out / "history.json").write_text(json.dumps(history, indent=2))
    stopper = state["stopper"]
    return {
        "train_questions": train_table.num_rows, "artificial_questions": train_q["artificial_count"],
        "artificial_pool": pool_size, "artificial_per_epoch": min(train_cfg.artificial_per_epoch, pool_size),
        "vocabulary": len(vocab), "dev_questions": len(dev_tokens), "dev_total": dev_q["total"],
        "train_unknown_tokens": int(train_unknown.sum()), "dev_unknown_tokens": int(dev_unknown.sum()),
        "epochs": len(history), "best_epoch": stopper["best_epoch"], "best_dev_accuracy": stopper["best"],
        "mean_epoch_seconds": float(np.mean([h["epoch_seconds"] for h in history])) if history else 0.0,
        "mean_softmax_size": float(np.mean([h["softmax_size"] for h in history])) if history else 0.0,
        "loss": train_cfg.loss, "reader": train_cfg.reader, "infer_reader": train_cfg.infer_reader,
        "num_workers": train_cfg.num_workers, "history": history, "fingerprints": fingerprints,
        "ray_run": storage.run_uri(run_name),
    }
