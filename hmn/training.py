"""The HMN training and scoring loop, free of Ray so it runs in a Ray Train worker, in local mode,
or on a bare GPU box.

A batch is (tokens (T,), offsets (B,), gold (B,)) in EmbeddingBag layout. The loop:
encode -> reader candidates on the detached queries (no graph) -> loss over the union of the
batch's candidates plus gold facts (K-softmax, eq. 3-4) or over all facts (full softmax) ->
Adam step. Early stopping follows the paper: stop once dev accuracy has not improved for
`patience` epochs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from hmn.model import MemoryLike, full_softmax_loss, ksoftmax_loss, num_facts
from hmn.readers import Candidates, Reader, recall_at_k
from hmn.text import pack

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # tokens (T,), offsets (B,), gold (B,)


def make_batch(token_lists: Sequence[np.ndarray], gold: np.ndarray, device: torch.device | str = "cpu") -> Batch:
    tokens, offsets = pack(token_lists)
    return (
        torch.from_numpy(tokens).to(device),
        torch.from_numpy(offsets).to(device),
        torch.as_tensor(np.asarray(gold, dtype=np.int64)).to(device),
    )


def iterate_batches(
    token_lists: Sequence[np.ndarray], gold: np.ndarray, batch_size: int, *,
    shuffle: bool, generator: np.random.Generator | None = None, device: torch.device | str = "cpu",
) -> Iterator[Batch]:
    order = np.arange(len(token_lists))
    if shuffle:
        (generator or np.random.default_rng()).shuffle(order)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield make_batch([token_lists[i] for i in idx], gold[idx], device)


@dataclass
class EpochStats:
    loss: float
    steps: int
    questions: int
    softmax_size: float          # mean facts in the softmax per step (U, or N for full)
    facts_touched: float         # mean facts scored per question by the training reader
    seconds: float

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def train_epoch(
    model: nn.Module,
    batches: Iterable[Batch],
    memory: MemoryLike,
    reader: Reader | None,
    optimizer: torch.optim.Optimizer,
    *,
    loss: str = "ksoftmax",
    k: int = 10,
    generator: torch.Generator | None = None,
    max_steps: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> EpochStats:
    """One pass over `batches`. memory is the fixed fact memory on the model's device: an (N, D)
    tensor, a FactMemory or a FactorisedMemory (never materialised)."""
    if loss not in ("ksoftmax", "full"):
        raise ValueError(f"loss={loss!r}: must be 'ksoftmax' or 'full'")
    if loss == "ksoftmax" and reader is None:
        raise ValueError("loss='ksoftmax' needs a reader for the candidates")
    model.train()
    t0 = time.perf_counter()
    total_loss, steps, questions, softmax_sum, touched_sum = 0.0, 0, 0, 0.0, 0.0
    n = num_facts(memory)
    for tokens, offsets, gold in batches:
        if max_steps and steps >= max_steps:
            break
        queries = model(tokens, offsets)  # (B, D)
        if loss == "full":
            out = full_softmax_loss(queries, memory, gold)
            touched = float(n)
        else:
            cands: Candidates = reader.search(queries.detach(), k, generator=generator)
            out = ksoftmax_loss(queries, memory, cands.ids, gold)
            touched = float(cands.touched.float().mean())
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        steps += 1
        questions += int(gold.numel())
        value = float(out.loss.detach())
        total_loss += value
        softmax_sum += out.softmax_size
        touched_sum += touched
        if on_step is not None:
            on_step(steps, value)
    seconds = time.perf_counter() - t0
    steps_ = max(steps, 1)
    return EpochStats(total_loss / steps_, steps, questions, softmax_sum / steps_, touched_sum / steps_, seconds)


@dataclass
class Predictions:
    fact_ids: np.ndarray        # (Q,) top-1 predicted fact, -1 when the reader found nothing
    touched: np.ndarray         # (Q,) facts scored per question
    candidates: np.ndarray      # (Q, K) candidate ids (-1 pads), kept for recall computations
    scores: np.ndarray | None = None  # (Q, K) the candidates' scores (-inf pads), best first


@torch.no_grad()
def predict(
    model: nn.Module, reader: Reader, token_lists: Sequence[np.ndarray], *, k: int = 10,
    batch_size: int = 512, device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Predictions:
    """Top-1 fact per question with `reader`, and the reader's top-k candidates with their scores."""
    model.eval()
    dummy = np.zeros(len(token_lists), dtype=np.int64)
    ids, touched, cands, scores = [], [], [], []
    for tokens, offsets, _ in iterate_batches(token_lists, dummy, batch_size, shuffle=False, device=device):
        queries = model(tokens, offsets)
        c = reader.search(queries, k, generator=generator)
        cands.append(c.ids.cpu())
        scores.append(c.scores.float().cpu())
        ids.append(c.ids[:, 0].cpu())
        touched.append(c.touched.cpu())
    if not ids:
        return Predictions(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros((0, k), np.int64),
                           np.zeros((0, k), np.float32))
    return Predictions(torch.cat(ids).numpy(), torch.cat(touched).numpy(), torch.cat(cands).numpy(),
                       torch.cat(scores).numpy())


def correct(pred: np.ndarray, gold: np.ndarray, fact_subject: np.ndarray,
            fact_relation: np.ndarray) -> np.ndarray:
    """(Q,) bool, the SimpleQuestions criterion: the predicted fact has the gold fact's subject
    and relation. No prediction (pred < 0) or no gold fact in the memory (gold < 0) is wrong."""
    ok = (pred >= 0) & (gold >= 0)
    p, g = np.where(ok, pred, 0), np.where(ok, gold, 0)
    return ok & (fact_subject[p] == fact_subject[g]) & (fact_relation[p] == fact_relation[g])


def accuracy(pred: np.ndarray, gold: np.ndarray, fact_subject: np.ndarray,
             fact_relation: np.ndarray) -> float:
    """Share of questions answered `correct`-ly (0.0 for no questions)."""
    if len(gold) == 0:
        return 0.0
    return float(correct(pred, gold, fact_subject, fact_relation).mean())


def candidate_recall(approx: Predictions, exact: Predictions, k: int) -> float:
    """Recall@k of approximate candidates against exact ones (same questions, same order)."""
    a = torch.from_numpy(approx.candidates[:, :k])
    e = torch.from_numpy(exact.candidates[:, :k])
    dummy_scores = torch.zeros(a.shape)
    return recall_at_k(
        Candidates(a, dummy_scores, torch.zeros(a.shape[0], dtype=torch.int64)),
        Candidates(e, torch.zeros(e.shape), torch.zeros(e.shape[0], dtype=torch.int64)),
        k,
    )


@dataclass
class EarlyStopping:
    """Stop when dev accuracy has not improved on its best for `patience` epochs (the paper: 3)."""

    patience: int = 3
    best: float = -1.0
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list[float] = field(default_factory=list)

    def update(self, epoch: int, value: float) -> bool:
        """Record an epoch's dev accuracy; True when this epoch is the best so far."""
        self.history.append(value)
        if value > self.best:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)
