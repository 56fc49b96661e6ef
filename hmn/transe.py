"""TransE knowledge-graph embeddings (Bordes et al. 2013) and filtered link prediction.

The HMN memory is built from fixed 200-d TransE vectors of Freebase entities and relations; this
module trains them and measures their quality. Plain torch and numpy, no I/O, no Ray. The
hyperparameters, `TransEParams`, are declared in `hmn.transe_params`.

Notation (shapes in comments):
    T  training triples        E  entities          R  relations
    B  triples in a batch      k  negatives per positive triple
    d  embedding dimension     Q  link-prediction queries in a batch

Model (Bordes 2013, eq. 1): a triple (h, r, t) scores ``d(h + r, t)`` with the L1 or L2 distance;
training minimises the margin ranking loss ``[margin + d(h + r, t) - d(h' + r, t')]_+`` over
corrupted triples (h', r, t') in which the head or the tail is replaced by a random entity, either
with probability 1/2 ("unif") or with the per-relation Bernoulli probability of Wang et al. 2014
section 3.2 ("bern"). Before each batch the entity rows it touches are projected to unit L2 norm
(Bordes 2013, Algorithm 1 line 5); relations are initialised uniform(-6/sqrt(d), 6/sqrt(d)) and
normalised once (Algorithm 1 lines 1-2).

Each epoch draws its shuffle and negatives from a generator seeded by ``(seed, epoch)``, so a run
is deterministic for a seed on CPU, and a run resumed at epoch ``e`` from the state after epoch
``e`` (embeddings and optimiser state) reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hmn.transe_params import NORMS, TransEParams, optimizer_slots

logger = logging.getLogger(__name__)


@dataclass
class TransEResult:
    """Trained embeddings and per-epoch statistics.

    Attributes:
        entities: (E, d) float32 entity embeddings.
        relations: (R, d) float32 relation embeddings.
        history: one dict per epoch trained in this call: ``epoch``, ``loss`` (mean loss over
            the epoch's pairs), ``active`` (fraction of pairs whose negative is within the
            margin), ``seconds``, ``triples_per_s`` (positive triples per second).
        optimizer_state: the optimiser's ``state_dict()`` at the end, to pass back as
            ``train_transe(optimizer_state=...)`` when resuming (None if no epoch ran).
    """

    entities: np.ndarray
    relations: np.ndarray
    history: list[dict] = field(default_factory=list)
    optimizer_state: dict | None = None


def _check_triples(triples: Any, num_entities: int, num_relations: int, name: str) -> np.ndarray:
    """Return ``triples`` as a (T, 3) int64 array of in-range (head, relation, tail) ids."""
    arr = np.asarray(triples)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise ValueError(f"{name}: expected shape (T, 3), got {arr.shape}")
    if arr.shape[0] == 0:
        raise ValueError(f"{name}: no triples (T = 0)")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name}: expected integer ids, got dtype {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    limits = np.array([num_entities, num_relations, num_entities], dtype=np.int64)
    bad = np.flatnonzero(((arr < 0) | (arr >= limits)).any(axis=1))
    if bad.size:
        row = int(bad[0])
        raise ValueError(
            f"{name}[{row}]={arr[row].tolist()}: ids out of range (num_entities={num_entities}, "
            f"num_relations={num_relations}); {bad.size} bad row(s)"
        )
    return arr


def _check_table(table: Any, rows: int, dim: int | None, name: str) -> np.ndarray:
    arr = np.asarray(table, dtype=np.float32)
    if arr.ndim != 2 or arr.shape[0] != rows or (dim is not None and arr.shape[1] != dim):
        want = f"({rows}, {dim if dim is not None else 'd'})"
        raise ValueError(f"{name}: expected shape {want}, got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name}: contains non-finite values")
    return arr


def bernoulli_head_probs(triples: np.ndarray, num_relations: int) -> np.ndarray:
    """Per-relation probability of corrupting the head (Wang et al. 2014, section 3.2).

    ``tph`` is the mean number of tails per (relation, head) and ``hpt`` the mean number of heads
    per (relation, tail); the head is replaced with probability ``tph / (tph + hpt)``, so the
    "many" side of a 1-to-N or N-to-1 relation is corrupted less often (fewer false negatives).
    Relations absent from ``triples`` get 0.5.

    Args:
        triples: (T, 3) int64 (head, relation, tail) ids.
        num_relations: R.

    Returns:
        (R,) float64 probabilities.
    """
    h, r, t = triples[:, 0], triples[:, 1], triples[:, 2]
    per_rel = np.bincount(r, minlength=num_relations).astype(np.float64)  # (R,) triples per r
    # Distinct (r, h) and (r, t) pairs, counted per relation: each pair as one int64 code
    # r * E + e (a 1-D unique sorts 26M codes in seconds; unique rows of a (T, 2) array take
    # minutes).
    E = int(max(h.max(), t.max())) + 1
    r64 = r.astype(np.int64) * E
    heads = np.bincount(np.unique(r64 + h) // E, minlength=num_relations)
    tails = np.bincount(np.unique(r64 + t) // E, minlength=num_relations)
    with np.errstate(invalid="ignore", divide="ignore"):
        tph = per_rel / heads
        hpt = per_rel / tails
        prob = tph / (tph + hpt)
    return np.where(per_rel > 0, prob, 0.5)


def head_corruption_probs(triples: np.ndarray, num_relations: int, negatives: str) -> np.ndarray:
    """(R,) float64 probability of corrupting the head rather than the tail, per relation:
    `bernoulli_head_probs` for ``negatives="bern"``, 1/2 for "unif"."""
    if negatives == "bern":
        return bernoulli_head_probs(triples, num_relations)
    return np.full(num_relations, 0.5)


def _seeded_generator(key: tuple[int, ...], device: str | torch.device = "cpu") -> torch.Generator:
    """A generator that depends only on ``key``, e.g. (seed, epoch), so that a resumed run
    replays the draws of the uninterrupted one."""
    state = np.random.SeedSequence(list(key)).generate_state(2, dtype=np.uint32)
    gen = torch.Generator(device=device)
    gen.manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)
    return gen


def _distance(x: torch.Tensor, norm: int) -> torch.Tensor:
    """L1 or L2 norm over the last dimension."""
    if norm == 1:
        return x.abs().sum(-1)
    return torch.linalg.vector_norm(x, dim=-1)


@torch.no_grad()
def _normalize_rows_(weight: torch.Tensor) -> None:
    """Project every row of ``weight`` to unit L2 norm, in place."""
    weight.div_(torch.linalg.vector_norm(weight, dim=1, keepdim=True).clamp_min(1e-12))


ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
ADAGRAD_EPS = 1e-10  # PyTorch-BigGraph's row-wise Adagrad


class RowOptimizer:
    """Adam or row-wise Adagrad applied to the rows of a table that a batch touched.

    Both are "lazy": a row's state is updated only when the row is in a batch (for Adam the
    semantics of ``torch.optim.SparseAdam``, with one global step count for the bias
    correction). Gathering the touched rows, updating them densely and scattering them back is
    several times faster on CPU than sparse-gradient tensors, and the cost of a step does not
    grow with the table (Freebase has millions of entities).

    Row-wise Adagrad (``params.optimizer == "row_adagrad"``; PyTorch-BigGraph's optimiser for
    embedding tables, Lerer et al. 2019) keeps one accumulator per entity row, ``sum += mean(grad ** 2)`` over the row,
    and steps ``row -= lr * grad / (sqrt(sum) + eps)``: an entity's state is one float instead
    of Adam's 2d, which is what lets a 10M-entity table and its state fit few partitions.
    """

    def __init__(
        self,
        params: TransEParams,
        tables: dict[str, torch.Tensor],
        moments: dict[str, torch.Tensor] | None = None,
    ):
        """``moments``: existing ``<name>_<slot>`` tables (slots: `optimizer_slots`) to update
        in place, e.g. slices of a partition loaded from disk; default zeros."""
        self.lr = params.lr
        self.kind = params.optimizer
        self.step_count = 0
        self.moments: dict[str, torch.Tensor] = {}
        for name, table in tables.items():
            for slot, width in optimizer_slots(params, name).items():
                key = f"{name}_{slot}"
                shape = (table.shape[0], width)
                given = None if moments is None else moments.get(key)
                if given is not None and tuple(given.shape) != shape:
                    raise ValueError(
                        f"moments[{key!r}]: shape {tuple(given.shape)}, expected {shape}"
                    )
                self.moments[key] = (
                    torch.zeros(shape, dtype=table.dtype, device=table.device)
                    if given is None else given
                )

    def state_dict(self) -> dict:
        """Live state (no copies): the step count and the optimiser's state tables."""
        return {"step": self.step_count, **self.moments}

    def load_state_dict(self, state: dict) -> None:
        missing = sorted({"step", *self.moments} - set(state))
        if missing:
            raise ValueError(f"optimizer_state: missing {missing}")
        self.step_count = int(state["step"])
        for name, moment in self.moments.items():
            saved = torch.as_tensor(np.asarray(state[name], dtype=np.float32))
            if saved.shape != moment.shape:
                raise ValueError(
                    f"optimizer_state[{name!r}]: shape {tuple(saved.shape)}, "
                    f"expected {tuple(moment.shape)}"
                )
            moment.copy_(saved)

    def begin_step(self) -> None:
        self.step_count += 1

    @torch.no_grad()
    def update_rows(
        self,
        name: str,
        table: torch.Tensor,
        ids: torch.Tensor,
        rows: torch.Tensor,
        grad: torch.Tensor,
    ) -> None:
        """Write ``rows - step(grad)`` to ``table[ids]``; ``rows`` (U, d) are the batch's values."""
        if self.kind == "row_adagrad":
            acc = self.moments[f"{name}_sum"]
            s = acc.index_select(0, ids)  # (U, 1) entity rows, (U, d) relations
            s.add_(grad.square().mean(1, keepdim=True) if s.shape[1] == 1 else grad.square())
            acc.index_copy_(0, ids, s)
            denom = s.sqrt_().add_(ADAGRAD_EPS)  # s is stored; reuse its buffer
            table.index_copy_(0, ids, torch.addcdiv(rows, grad, denom, value=-self.lr))
            return
        beta1, beta2 = ADAM_BETAS
        m = self.moments[f"{name}_m"].index_select(0, ids)  # (U, d)
        v = self.moments[f"{name}_v"].index_select(0, ids)  # (U, d)
        m.lerp_(grad, 1.0 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
        self.moments[f"{name}_m"].index_copy_(0, ids, m)
        self.moments[f"{name}_v"].index_copy_(0, ids, v)
        bias1 = 1.0 - beta1**self.step_count
        bias2 = 1.0 - beta2**self.step_count
        denom = v.sqrt_().div_(math.sqrt(bias2)).add_(ADAM_EPS)  # v is stored; reuse its buffer
        table.index_copy_(0, ids, torch.addcdiv(rows, m, denom, value=-self.lr / bias1))


@dataclass
class _Pass:
    """What every batch of one pass over a set of triples reads and updates."""

    params: TransEParams
    entities: torch.Tensor  # (E, d), updated in place; negatives are drawn among its rows
    relations: torch.Tensor  # (R, d), updated in place
    optimizer: RowOptimizer
    p_head: torch.Tensor  # (R,) probability of corrupting the head
    gen: torch.Generator  # the pass's shuffle and negatives


@dataclass
class _BatchRows:
    """Leaf tensors for the U distinct entity rows and U_r relation rows a batch reads;
    ``ent_pos`` / ``rel_pos`` map each id the batch asked for to its row."""

    ent_ids: torch.Tensor  # (U,)
    ent_pos: torch.Tensor
    ent_rows: torch.Tensor  # (U, d)
    rel_ids: torch.Tensor  # (U_r,)
    rel_pos: torch.Tensor
    rel_rows: torch.Tensor  # (U_r, d)


def _unit_rows(rows: torch.Tensor) -> torch.Tensor:
    return rows / torch.linalg.vector_norm(rows, dim=1, keepdim=True).clamp_min(1e-12)


def _pairwise_distance(queries: torch.Tensor, rows: torch.Tensor, norm: int) -> torch.Tensor:
    """(B, N) L1 or L2 distances between every query (B, d) and every row (N, d)."""
    if norm == 1:
        return torch.cdist(queries, rows, p=1)
    # ||q - e||^2 = ||q||^2 - 2 q.e + ||e||^2: one matrix product instead of B x N x d diffs.
    squared = (
        (queries * queries).sum(1, keepdim=True)
        - 2.0 * queries @ rows.T
        + (rows * rows).sum(1)[None, :]
    )  # (B, N)
    return squared.clamp_min(1e-12).sqrt()


def _gather_rows(run: _Pass, entity_ids: torch.Tensor, relation_ids: torch.Tensor) -> _BatchRows:
    """The rows of ``entity_ids`` and ``relation_ids`` as leaf tensors that collect gradients."""
    ent_ids, ent_pos = torch.unique(entity_ids, return_inverse=True)
    rel_ids, rel_pos = torch.unique(relation_ids, return_inverse=True)
    ent_rows = run.entities.index_select(0, ent_ids)  # (U, d)
    if run.params.normalize_entities:
        ent_rows = _unit_rows(ent_rows)  # Algorithm 1 line 5, on the rows in use
    ent_rows.requires_grad_(True)
    rel_rows = run.relations.index_select(0, rel_ids).requires_grad_(True)  # (U_r, d)
    return _BatchRows(ent_ids, ent_pos, ent_rows, rel_ids, rel_pos, rel_rows)


def _pair_loss(
    params: TransEParams, pos: torch.Tensor, neg: torch.Tensor, valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss of a batch from positive distances (B,) and negative distances (B, k).

    ``valid`` (B, k) masks out pairs that are not negatives (None = all are). Returns
    (scalar loss to minimise, its value summed over the batch's pairs for the epoch mean,
    active pairs (B, k) bool: negative within ``margin`` of the positive).
    """
    gap = params.margin + pos[:, None] - neg  # (B, k)
    active = gap > 0
    if valid is not None:
        active = active & valid
    pairs = neg.numel()
    if params.loss == "margin":
        hinge = torch.relu(gap)  # (B, k), eq. 1
        if valid is not None:
            hinge = hinge * valid
        return hinge.mean(), hinge.sum().detach(), active
    # Self-adversarial negative sampling (Sun et al. 2019, eq. 5); margin is gamma.
    logits = params.margin - neg  # (B, k) the negatives' scores
    with torch.no_grad():
        weights = params.adversarial_temperature * logits
        if valid is not None:
            weights = weights.masked_fill(~valid, -math.inf)
        weights = torch.softmax(weights, dim=1)  # (B, k)
    pos_term = -torch.nn.functional.logsigmoid(params.margin - pos)  # (B,)
    neg_term = -(weights * torch.nn.functional.logsigmoid(-logits)).sum(1)  # (B,)
    loss = 0.5 * (pos_term.mean() + neg_term.mean())
    return loss, loss.detach() * pairs, active


def _apply_step(run: _Pass, loss: torch.Tensor, rows: _BatchRows) -> None:
    loss.backward()
    run.optimizer.begin_step()
    run.optimizer.update_rows(
        "entity", run.entities, rows.ent_ids, rows.ent_rows.detach(), rows.ent_rows.grad
    )
    run.optimizer.update_rows(
        "relation", run.relations, rows.rel_ids, rows.rel_rows.detach(), rows.rel_rows.grad
    )


def _per_triple_step(batch: torch.Tensor, run: _Pass) -> tuple[torch.Tensor, torch.Tensor]:
    """One step on ``batch`` (B, 3) with ``num_negatives`` independent corruptions per positive.

    Returns (summed pair loss, active pairs (B, k)).
    """
    params, device = run.params, batch.device
    h, r, t = batch[:, 0], batch[:, 1], batch[:, 2]
    size, k = batch.shape[0], params.num_negatives
    # Corrupt the head or the tail of each positive k times (unif or bern).
    corrupt_head = torch.rand(size, k, generator=run.gen, device=device) < run.p_head[r, None]
    random_ids = torch.randint(
        run.entities.shape[0], (size, k), generator=run.gen, device=device
    )  # (B, k)
    neg_h = torch.where(corrupt_head, random_ids, h[:, None])  # (B, k)
    neg_t = torch.where(corrupt_head, t[:, None], random_ids)  # (B, k)

    rows = _gather_rows(run, torch.cat([h, t, neg_h.view(-1), neg_t.view(-1)]), r)
    ent_rows, ent_pos = rows.ent_rows, rows.ent_pos  # positions: (2B + 2Bk,)
    h_pos, t_pos = ent_pos[:size], ent_pos[size : 2 * size]  # (B,)
    nh_pos = ent_pos[2 * size : 2 * size + size * k].view(size, k)  # (B, k)
    nt_pos = ent_pos[2 * size + size * k :].view(size, k)  # (B, k)
    r_e = rows.rel_rows[rows.rel_pos]  # (B, d)
    pos = _distance(ent_rows[h_pos] + r_e - ent_rows[t_pos], params.norm)  # (B,)
    neg = _distance(ent_rows[nh_pos] + r_e[:, None, :] - ent_rows[nt_pos], params.norm)  # (B, k)
    loss, loss_sum, active = _pair_loss(params, pos, neg, None)  # (B, k) pairs
    _apply_step(run, loss, rows)
    return loss_sum, active


def _shared_negatives_step(batch: torch.Tensor, run: _Pass) -> tuple[torch.Tensor, torch.Tensor]:
    """One step on ``batch`` (B, 3) in which all B positives share N corrupting entities.

    Returns (summed pair loss, active pairs (B, N)).
    """
    params, device = run.params, batch.device
    h, r, t = batch[:, 0], batch[:, 1], batch[:, 2]
    size = batch.shape[0]
    corrupt_head = torch.rand(size, generator=run.gen, device=device) < run.p_head[r]  # (B,)
    shared = torch.randint(
        run.entities.shape[0], (params.shared_negatives,), generator=run.gen, device=device
    )  # (N,)

    rows = _gather_rows(run, torch.cat([h, t, shared]), r)  # positions: (2B + N,), (B,)
    ent_rows, ent_pos = rows.ent_rows, rows.ent_pos
    h_e, t_e = ent_rows[ent_pos[:size]], ent_rows[ent_pos[size : 2 * size]]  # (B, d)
    r_e = rows.rel_rows[rows.rel_pos]  # (B, d)
    pos = _distance(h_e + r_e - t_e, params.norm)  # (B,)
    # A corrupted head e scores d(e + r, t) = d(e, t - r); a corrupted tail, d(h + r, e).
    queries = torch.where(corrupt_head[:, None], t_e - r_e, h_e + r_e)  # (B, d)
    neg = _pairwise_distance(queries, ent_rows[ent_pos[2 * size :]], params.norm)  # (B, N)
    replaced = torch.where(corrupt_head, h, t)  # (B,)
    is_negative = replaced[:, None] != shared[None, :]  # (B, N) skip "corruptions" to itself
    loss, loss_sum, active = _pair_loss(params, pos, neg, is_negative)
    _apply_step(run, loss, rows)
    return loss_sum, active


def _run_batches(
    triples: torch.Tensor, run: _Pass, on_batch: Callable[[int], None] | None = None
) -> tuple[float, float]:
    """One pass over ``triples`` (T, 3) in an order shuffled by ``run.gen``, in batches;
    ``on_batch(triples in the batch)`` after each (progress; it must not read the loss, which
    stays on the device until the pass ends).

    Returns (pair loss, active pairs), each summed over the pass.
    """
    params = run.params
    order = torch.randperm(triples.shape[0], generator=run.gen, device=triples.device)  # (T,)
    loss_sum = torch.zeros((), dtype=torch.float64, device=triples.device)
    active_sum = torch.zeros((), dtype=torch.float64, device=triples.device)
    step = _shared_negatives_step if params.shared_negatives else _per_triple_step
    for begin in range(0, order.shape[0], params.batch_size):
        batch = triples[order[begin : begin + params.batch_size]]  # (B, 3)
        batch_loss, active = step(batch, run)  # active: (B, N) or (B, k)
        loss_sum += batch_loss.double()
        active_sum += active.sum().double()
        if on_batch is not None:
            on_batch(int(batch.shape[0]))
    return float(loss_sum), float(active_sum)


def _check_run(params: TransEParams, num_entities: int, num_relations: int, start_epoch: int):
    """Raise ``ValueError`` for bad params, counts or start epoch of `train_transe`."""
    params.validate()
    for name, value in (("num_entities", num_entities), ("num_relations", num_relations)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
            raise ValueError(f"{name}={value!r}: must be an int > 0")
    if isinstance(start_epoch, bool) or not isinstance(start_epoch, (int, np.integer)):
        raise ValueError(f"start_epoch={start_epoch!r}: must be an int")
    if not 0 <= start_epoch <= params.epochs:
        raise ValueError(f"start_epoch={start_epoch}: must be in [0, epochs={params.epochs}]")


def _initial_tables(
    params: TransEParams,
    num_entities: int,
    num_relations: int,
    init: tuple[np.ndarray, np.ndarray] | None,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(E, d) entity and (R, d) relation float32 tables on ``device``: copies of ``init``, or
    Bordes 2013, Algorithm 1 lines 1-3: uniform(-6/sqrt(d), 6/sqrt(d)), relations normalised
    once (entities are normalised before use in each batch)."""
    dim = params.dim
    if init is None:
        bound = 6.0 / math.sqrt(dim)
        gen = torch.Generator().manual_seed(params.seed)
        ent0 = torch.empty(num_entities, dim).uniform_(-bound, bound, generator=gen)
        rel0 = torch.empty(num_relations, dim).uniform_(-bound, bound, generator=gen)
        _normalize_rows_(rel0)
    else:
        if not (isinstance(init, (tuple, list)) and len(init) == 2):
            raise ValueError("init: expected a pair (entities, relations)")
        ent0 = torch.from_numpy(_check_table(init[0], num_entities, dim, "init[0] (entities)"))
        rel0 = torch.from_numpy(_check_table(init[1], num_relations, dim, "init[1] (relations)"))
    return (
        ent0.to(device=device, dtype=torch.float32, copy=True),
        rel0.to(device=device, dtype=torch.float32, copy=True),
    )


def _train_epoch(triples: torch.Tensor, run: _Pass, epoch: int) -> dict:
    """One epoch of `train_transe` over ``triples`` (T, 3); returns its history record."""
    params = run.params
    started = time.perf_counter()
    run.optimizer.lr = epoch_lr(params, epoch)
    loss_sum, active_sum = _run_batches(triples, run)
    if params.normalize_entities and epoch == params.epochs - 1:
        _normalize_rows_(run.entities)
    seconds = time.perf_counter() - started
    num_triples = triples.shape[0]
    pairs = num_triples * (params.shared_negatives or params.num_negatives)
    record = {
        "epoch": epoch,
        "loss": loss_sum / pairs,
        "active": active_sum / pairs,
        "seconds": seconds,
        "triples_per_s": num_triples / max(seconds, 1e-9),
    }
    logger.debug("transe epoch %d: %s", epoch, record)
    return record


def train_transe(
    triples: np.ndarray,
    num_entities: int,
    num_relations: int,
    params: TransEParams,
    *,
    init: tuple[np.ndarray, np.ndarray] | None = None,
    start_epoch: int = 0,
    progress: Callable[[dict], None] | None = None,
    device: str | torch.device = "cpu",
    optimizer_state: dict | None = None,
) -> TransEResult:
    """Train TransE embeddings with the margin ranking loss (Bordes et al. 2013).

    Args:
        triples: (T, 3) integer (head, relation, tail) ids, T > 0.
        num_entities: E; every head and tail must be < E.
        num_relations: R; every relation must be < R.
        params: hyperparameters (validated here).
        init: (entities (E, d), relations (R, d)) to start from, e.g. a checkpoint; relations are
            then used as given (not re-normalised). Default: the paper's uniform initialisation.
        start_epoch: first epoch to train (resume); epochs ``start_epoch .. params.epochs - 1``
            run, each with the same random draws as in an uninterrupted run.
        progress: called after each epoch with that epoch's history dict plus, valid only during
            the call (copy to keep), ``entities`` and ``relations`` (numpy views of the live
            tables) and ``optimizer_state`` (live tensors), which is everything a checkpoint
            needs to resume exactly.
        device: torch device for the tables and the batches.
        optimizer_state: ``TransEResult.optimizer_state`` or a progress call's
            ``optimizer_state`` from a run with the same params; without it a resumed Adam
            restarts its moment estimates and step count.

    Returns:
        TransEResult with float32 tables and one history dict per trained epoch.

    Raises:
        ValueError: bad params, counts, triples (the first offending row is named), init or
            optimizer_state.
    """
    _check_run(params, num_entities, num_relations, start_epoch)
    data = _check_triples(triples, num_entities, num_relations, "triples")
    device = torch.device(device)
    ent_w, rel_w = _initial_tables(params, num_entities, num_relations, init, device)
    optimizer = RowOptimizer(params, {"entity": ent_w, "relation": rel_w})
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)
    all_triples = torch.from_numpy(data).to(device)  # (T, 3)
    probs = head_corruption_probs(data, num_relations, params.negatives)
    p_head = torch.from_numpy(probs).float().to(device)  # (R,)
    history: list[dict] = []
    for epoch in range(start_epoch, params.epochs):
        gen = _seeded_generator((params.seed, epoch), device)
        run = _Pass(params, ent_w, rel_w, optimizer, p_head, gen)
        history.append(_train_epoch(all_triples, run, epoch))
        if progress is not None:
            progress(
                {
                    **history[-1],
                    "entities": ent_w.cpu().numpy(),
                    "relations": rel_w.cpu().numpy(),
                    "optimizer_state": optimizer.state_dict(),
                }
            )
    if history:
        logger.info(
            "transe: epochs %d-%d, final loss %.4f, %.0f triples/s",
            start_epoch,
            history[-1]["epoch"],
            history[-1]["loss"],
            float(np.mean([rec["triples_per_s"] for rec in history])),
        )
    return TransEResult(
        entities=ent_w.cpu().numpy().astype(np.float32, copy=True),
        relations=rel_w.cpu().numpy().astype(np.float32, copy=True),
        history=history,
        optimizer_state={
            key: value.cpu().numpy().copy() if isinstance(value, torch.Tensor) else value
            for key, value in optimizer.state_dict().items()
        },
    )


def epoch_lr(params: TransEParams, epoch: int) -> float:
    """Learning rate of ``epoch``: ``lr * lr_decay ** (epoch / (epochs - 1))``."""
    if params.lr_decay == 1.0:
        return params.lr
    return params.lr * params.lr_decay ** (epoch / max(params.epochs - 1, 1))


def init_relations(num_relations: int, dim: int, seed: int) -> np.ndarray:
    """(R, d) uniform(-6/sqrt(d), 6/sqrt(d)) rows normalised once (Bordes 2013, Alg. 1 l. 1-2)."""
    bound = 6.0 / math.sqrt(dim)
    gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, 1]).generate_state(1)[0]))
    rel = torch.empty(num_relations, dim).uniform_(-bound, bound, generator=gen)
    _normalize_rows_(rel)
    return rel.numpy()


# Partitioned training (PyTorch-BigGraph, Lerer et al. 2019): the entity table is split into P
# contiguous id ranges; a triple belongs to bucket (partition of its head, partition of its tail).
# Buckets that share no partition can be trained at the same time by different workers, each
# holding only two partitions; corrupted heads and tails are drawn from the two partitions held.
# These functions are pure; storage of the partitions and synchronisation live in the pipeline.


def partition_bounds(num_entities: int, num_partitions: int) -> np.ndarray:
    """(P + 1,) int64 bounds: partition p holds ids ``bounds[p] <= id < bounds[p + 1]``; sizes
    differ by at most one."""
    if num_partitions <= 0 or num_partitions > num_entities:
        raise ValueError(
            f"num_partitions={num_partitions}: must be in [1, num_entities={num_entities}]"
        )
    return np.linspace(0, num_entities, num_partitions + 1).round().astype(np.int64)


PARTITION_GB = 1.0  # rows plus optimiser state of one partition, at most (auto partitions)


def auto_partitions(num_entities: int, row_floats: int, num_workers: int) -> int:
    """Entity partitions for ``embed.num_partitions: 0``: the fewest, a power of two and at
    least 2 per worker, whose rows and optimiser state (``row_floats`` float32 an entity,
    `hmn.transe_params.entity_row_floats`) take at most ``PARTITION_GB`` each. Fewer partitions mean larger
    buckets and less partition traffic (an epoch loads about P^2 / W partitions), and a worker
    holds about three partitions: 3 GB."""
    table_gb = num_entities * row_floats * 4 / 1e9
    parts = max(2 * max(1, num_workers), 2 ** math.ceil(math.log2(max(table_gb / PARTITION_GB, 1))))
    return int(min(parts, max(1, num_entities)))


def entity_order(num_entities: int, seed: int) -> np.ndarray:
    """(E,) int64 position of each entity id in the partitioned order: a seeded permutation.

    Partitions are contiguous ranges of positions, so each holds a random sample of the
    entities (PyTorch-BigGraph shuffles entities into partitions for the same reason). Ingest
    numbers entities in file order, so the real, well-connected ones come first: ranges of ids
    put them in one partition and made its buckets 7x the mean (1m scaling memory, 8
    partitions), and a round lasts as long as its largest bucket.
    """
    return np.random.default_rng([seed, 11]).permutation(num_entities).astype(np.int64)


def entity_partition(ids: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Partition of each entity id (same shape as ``ids``)."""
    return np.searchsorted(bounds, ids, side="right") - 1


def bucket_schedule(
    num_partitions: int, num_workers: int, seed: int, epoch: int
) -> list[list[tuple[int, int] | None]]:
    """Every bucket (i, j) once, grouped into rounds of ``num_workers`` slots whose buckets share
    no partition, so the buckets of one round can be trained in parallel. Slot w of a round is
    worker w's bucket (None: idle this round).

    The bucket order is a seeded permutation per epoch (the same on every worker). Rounds are
    filled greedily, and each worker first looks for a bucket that shares a partition with its
    bucket of the previous round, so that it can keep that partition in memory instead of
    writing and reading it back (PyTorch-BigGraph orders buckets for the same reason). With
    P >= 2W partitions most rounds are full.
    """
    rng = np.random.default_rng([seed, epoch, 7])
    buckets = [(i, j) for i in range(num_partitions) for j in range(num_partitions)]
    remaining = [buckets[k] for k in rng.permutation(len(buckets))]
    previous: list[tuple[int, int] | None] = [None] * num_workers
    rounds = []
    while remaining:
        used: set[int] = set()
        this: list[tuple[int, int] | None] = [None] * num_workers
        for w in range(num_workers):
            first = shared = None
            for bucket in remaining:
                if used.isdisjoint(bucket):
                    first = bucket if first is None else first
                    if previous[w] is not None and not set(previous[w]).isdisjoint(bucket):
                        shared = bucket
                        break
            chosen = shared or first
            if chosen is None:
                continue
            this[w] = chosen
            used.update(chosen)
            remaining.remove(chosen)
            previous[w] = chosen
        rounds.append(this)
    return rounds


def init_entity_rows(count: int, dim: int, seed: int, part: int) -> np.ndarray:
    """(count, d) uniform(-6/sqrt(d), 6/sqrt(d)) initial rows of one entity partition."""
    state = np.random.SeedSequence([seed, 2, part]).generate_state(1)[0]
    gen = torch.Generator().manual_seed(int(state))
    bound = 6.0 / math.sqrt(dim)
    return torch.empty(count, dim).uniform_(-bound, bound, generator=gen).numpy()


def train_bucket(
    triples: np.ndarray,
    entities: torch.Tensor,
    relations: torch.Tensor,
    optimizer: RowOptimizer,
    p_head: torch.Tensor,
    params: TransEParams,
    seed_key: tuple[int, ...],
    on_batch: Callable[[int], None] | None = None,
) -> dict:
    """One pass over a bucket's triples, updating ``entities``, ``relations`` and the
    optimizer's moments in place; ``on_batch(triples in the batch)`` after each batch (progress).

    Args:
        triples: (T, 3) int64 (head, relation, tail) with entity ids local to ``entities``
            (the rows of the bucket's one or two partitions); may be empty.
        entities: (n, d) float32 rows of the partitions held; negatives are drawn among them.
            The pass runs on their device (a CUDA worker moves its bucket's partitions there):
            ``relations``, the optimizer's moments and ``p_head`` must be on it too.
        relations: (R, d) float32 relation table.
        optimizer: a RowOptimizer over ``{"entity": entities, "relation": relations}``; its
            ``lr`` and ``step_count`` are the caller's to set.
        p_head: (R,) probability of corrupting the head (0.5 for unif).
        params: hyperparameters.
        seed_key: seeds the shuffle and negatives, e.g. (seed, epoch, bucket).

    Returns:
        {"loss_sum", "active_sum", "pairs", "triples", "seconds"}.
    """
    started = time.perf_counter()
    device = entities.device
    data = torch.from_numpy(np.ascontiguousarray(triples, dtype=np.int64)).to(device)  # (T, 3)
    num = data.shape[0]
    loss_sum = active_sum = 0.0
    if num:
        run = _Pass(params, entities, relations, optimizer, p_head.to(device),
                    _seeded_generator(seed_key, device))
        loss_sum, active_sum = _run_batches(data, run, on_batch)
    return {
        "loss_sum": loss_sum,
        "active_sum": active_sum,
        "pairs": num * (params.shared_negatives or params.num_negatives),
        "triples": num,
        "seconds": time.perf_counter() - started,
    }


class _FilterIndex:
    """Sorted CSR-like index from a query key (entity, relation) to its known answers.

    ``keys`` holds the distinct ``entity * R + relation`` codes, ``offsets`` the start of each
    key's answers in ``answers`` (answers of key i are ``answers[offsets[i]:offsets[i + 1]]``).
    """

    def __init__(self, anchor: np.ndarray, relation: np.ndarray, answer: np.ndarray, R: int):
        codes = anchor * R + relation  # (M,)
        order = np.lexsort((answer, codes))
        codes, self.answers = codes[order], answer[order]
        self.keys, starts = np.unique(codes, return_index=True)
        self.offsets = np.append(starts, codes.shape[0]).astype(np.int64)
        self.R = R

    def pairs(self, anchor: np.ndarray, relation: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, answer) pairs: row i of the query batch has all known answers of its key."""
        codes = anchor * self.R + relation  # (Q,)
        pos = np.searchsorted(self.keys, codes)
        found = pos < self.keys.shape[0]
        found[found] = self.keys[pos[found]] == codes[found]
        starts = np.where(found, self.offsets[np.minimum(pos, self.keys.shape[0] - 1)], 0)
        lengths = np.where(found, self.offsets[np.minimum(pos + 1, self.keys.shape[0])] - starts, 0)
        rows = np.repeat(np.arange(codes.shape[0]), lengths)
        # Concatenate the ranges [start, start + length) without a python loop.
        within = np.arange(rows.shape[0]) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        return rows, self.answers[np.repeat(starts, lengths) + within]


def _rank_batch(
    queries: torch.Tensor,
    entities: torch.Tensor,
    targets: torch.Tensor,
    filter_rows: torch.Tensor,
    filter_cols: torch.Tensor,
    norm: int,
) -> torch.Tensor:
    """Filtered ranks of ``targets`` among all entities by distance to ``queries``.

    Ties with the target count half (the mean of the optimistic and pessimistic rank).
    """
    if norm == 1:
        dist = torch.cdist(queries, entities, p=1)  # (Q, E)
    else:
        # Squared L2 ranks like L2; one matmul instead of cdist's pairwise loop.
        dist = (
            (queries * queries).sum(1, keepdim=True)
            - 2.0 * queries @ entities.T
            + (entities * entities).sum(1)[None, :]
        )  # (Q, E)
    rows = torch.arange(queries.shape[0], device=queries.device)
    target_dist = dist[rows, targets].clone()  # (Q,)
    dist[filter_rows, filter_cols] = math.inf  # filtered setting: other true answers don't count
    dist[rows, targets] = math.inf
    better = (dist < target_dist[:, None]).sum(1)
    ties = (dist == target_dist[:, None]).sum(1)
    return 1.0 + better.double() + 0.5 * ties.double()  # (Q,)


@torch.no_grad()
def link_prediction(
    entities: np.ndarray,
    relations: np.ndarray,
    test: np.ndarray,
    known: list[np.ndarray],
    *,
    norm: int = 1,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
) -> dict:
    """Filtered link prediction (Bordes 2013, section 4.2), ranking both heads and tails.

    For each test triple (h, r, t) the tail query ranks ``t`` among all entities e by
    ``d(h + r, e)`` and the head query ranks ``h`` by ``d(e + r, t) = d(e, t - r)``; other
    entities that form a triple in ``known`` are skipped (the filtered setting). Ties with the
    target count half. Each batch of queries is scored against all entities at once.

    Args:
        entities: (E, d) entity embeddings.
        relations: (R, d) relation embeddings.
        test: (T, 3) integer (head, relation, tail) ids.
        known: arrays of (n, 3) true triples (train, valid, test) used for filtering.
        norm: 1 (L1) or 2 (L2), as in training.
        batch_size: queries per scoring batch (memory is batch_size x E floats).
        device: torch device for the scoring.

    Returns:
        {"mrr", "hits1", "hits3", "hits10", "mean_rank"} averaged over the 2T head and tail
        queries, "mrr_head", "mrr_tail" per side, and "count" = T test triples.
    """
    if norm not in NORMS:
        raise ValueError(f"norm={norm!r}: must be one of {NORMS}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise ValueError(f"batch_size={batch_size!r}: must be an int")
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size}: must be > 0")
    ent = np.asarray(entities)
    rel = np.asarray(relations)
    if ent.ndim != 2 or ent.shape[0] == 0:
        raise ValueError(f"entities: expected shape (E, d), got {ent.shape}")
    ent = _check_table(ent, ent.shape[0], None, "entities")
    rel = _check_table(rel, rel.shape[0] if rel.ndim == 2 else -1, ent.shape[1], "relations")
    E, R = ent.shape[0], rel.shape[0]
    test_ids = _check_triples(test, E, R, "test")
    known_ids = np.concatenate(
        [_check_triples(arr, E, R, f"known[{i}]") for i, arr in enumerate(known)]
        or [np.empty((0, 3), np.int64)]
    )
    kh, kr, kt = known_ids[:, 0], known_ids[:, 1], known_ids[:, 2]
    tails_of = _FilterIndex(kh, kr, kt, R)  # (h, r) -> true tails
    heads_of = _FilterIndex(kt, kr, kh, R)  # (t, r) -> true heads

    device = torch.device(device)
    ent_t = torch.from_numpy(ent).to(device)
    rel_t = torch.from_numpy(rel).to(device)
    ranks = {"tail": [], "head": []}
    for begin in range(0, test_ids.shape[0], batch_size):
        batch = test_ids[begin : begin + batch_size]  # (Q, 3)
        h, r, t = batch[:, 0], batch[:, 1], batch[:, 2]
        bt = torch.from_numpy(batch).to(device)
        for side, query, target, index, anchor in (
            ("tail", ent_t[bt[:, 0]] + rel_t[bt[:, 1]], bt[:, 2], tails_of, h),
            ("head", ent_t[bt[:, 2]] - rel_t[bt[:, 1]], bt[:, 0], heads_of, t),
        ):
            rows, cols = index.pairs(anchor, r)
            ranks[side].append(
                _rank_batch(
                    query,  # (Q, d)
                    ent_t,
                    target,
                    torch.from_numpy(rows).to(device),
                    torch.from_numpy(cols).to(device),
                    norm,
                ).cpu()
            )
    tail = torch.cat(ranks["tail"]).numpy()
    head = torch.cat(ranks["head"]).numpy()
    both = np.concatenate([tail, head])
    return {
        "mrr": float(np.mean(1.0 / both)),
        "hits1": float(np.mean(both <= 1)),
        "hits3": float(np.mean(both <= 3)),
        "hits10": float(np.mean(both <= 10)),
        "mean_rank": float(np.mean(both)),
        "mrr_head": float(np.mean(1.0 / head)),
        "mrr_tail": float(np.mean(1.0 / tail)),
        "count": int(test_ids.shape[0]),
    }


def embeddings_fingerprint(entities: np.ndarray, relations: np.ndarray) -> str:
    """Short sha256 hex (16 chars) of both tables' shapes and float32 bytes."""
    digest = hashlib.sha256()
    for table in (entities, relations):
        arr = np.ascontiguousarray(np.asarray(table, dtype=np.float32))
        digest.update(repr(arr.shape).encode())
        digest.update(memoryview(arr).cast("B"))  # the bytes without a copy (GBs at FB2M)
    return digest.hexdigest()[:16]
