"""The HMN reader model: a bag-of-words question encoder and the two losses of the paper.

Only torch; no I/O. Shapes: B questions, D fact dimension (600), N facts, K candidates, U the
union of candidates over a batch, T tokens in a batch.

- `BowEncoder`: h(q) = sum of learned word vectors (section 4).
- `full_softmax_loss`: softmax over all N facts (the paper's baseline); on a factorised memory
  (FB2M scale, where the dense (N, D) matrix does not fit) its gradient is computed in closed
  form, a few questions and a chunk of facts at a time, so it never holds more than
  (sub_batch, N) floats.
- `ksoftmax_loss`: eq. 3-4. C = top-K of h(q).M^T from a reader; the softmax runs over M[C] only.
  In training the gold fact is always added, and the candidate set is the union over the
  mini-batch, so one dense (B, U) matmul serves the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hmn.memory import FactMemory, FactorisedMemory

#: the memory a loss reads: a dense (N, D) tensor, a FactMemory or the factorised tables
MemoryLike = torch.Tensor | FactMemory | FactorisedMemory


class BowEncoder(nn.Module):
    """h(q) = sum of word vectors: an EmbeddingBag in 'sum' mode."""

    def __init__(self, vocab_size: int, dim: int, init_std: float = 0.01, sparse: bool = False):
        super().__init__()
        if vocab_size <= 0 or dim <= 0:
            raise ValueError(f"BowEncoder: vocab_size={vocab_size} and dim={dim} must be > 0")
        # sparse=True: gradients hold only the batch's words (for torch.optim.SparseAdam); a dense
        # Adam step over a (V, D) table costs more than the whole K-softmax at V ~ 30k.
        self.words = nn.EmbeddingBag(vocab_size, dim, mode="sum", sparse=sparse)
        nn.init.normal_(self.words.weight, std=init_std)

    def forward(self, tokens: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        # tokens (T,), offsets (B,) -> (B, D); an empty question encodes to the zero vector
        return self.words(tokens, offsets)


@dataclass
class LossOutput:
    loss: torch.Tensor       # scalar, mean NLL of the gold facts
    softmax_size: int        # facts the softmax ran over (N for full, U for the K-softmax)


def _rows(memory: MemoryLike, ids: torch.Tensor) -> torch.Tensor:
    """(len(ids), D) fact vectors of any memory kind."""
    if isinstance(memory, torch.Tensor):
        return memory[ids]
    return memory.gather(ids)


def num_facts(memory: MemoryLike) -> int:
    return int(memory.shape[0]) if isinstance(memory, torch.Tensor) else memory.n


def full_softmax_loss(queries: torch.Tensor, memory: MemoryLike, gold: torch.Tensor, *,
                      sub_batch: int = 16, chunk: int = 1 << 20) -> LossOutput:
    """Softmax over the whole memory. queries (B, D), memory (N, D), gold (B,) fact ids.

    A :class:`FactorisedMemory` is never materialised: see :func:`factorised_full_softmax`.
    """
    if isinstance(memory, FactorisedMemory):
        loss = _FactorisedFullSoftmax.apply(queries, memory, gold, sub_batch, chunk)
        return LossOutput(loss, memory.n)
    vectors = memory.vectors if isinstance(memory, FactMemory) else memory
    scores = queries @ vectors.T  # (B, N)
    return LossOutput(F.cross_entropy(scores, gold), vectors.shape[0])


@torch.no_grad()
def factorised_full_softmax(queries: torch.Tensor, memory: FactorisedMemory, gold: torch.Tensor, *,
                            sub_batch: int = 16, chunk: int = 1 << 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean NLL of the gold facts under a softmax over all N facts, and its gradient (B, D).

    With G = softmax(s) - onehot(gold) the (b, N) gradient of the logits s = q M^T, the gradient
    of q is G M; M = [E[s_f]; R[r_f]; mean_o E[o]] factorises it into
    ``(G summed per subject) E``, ``(G summed per relation) R`` and
    ``(G / |objects| summed per object) E``: three scatter-adds and three small matmuls, never the
    (N, D) matrix. Peak memory: a few (sub_batch, N) and (sub_batch, Ne) float32 arrays.
    """
    q_all = memory.check_queries(queries)  # (B, D)
    gold = gold.to(device=memory.device, dtype=torch.int64)
    b_all, w, n = q_all.shape[0], memory.width, memory.n
    grad = torch.empty_like(q_all)  # (B, D)
    total = q_all.new_zeros((), dtype=torch.float64)
    ne, nr = memory.entity_emb.shape[0], memory.relation_emb.shape[0]
    for a in range(0, b_all, sub_batch):
        q, g = q_all[a:a + sub_batch], gold[a:a + sub_batch]
        b = q.shape[0]
        parts = memory.partial_scores(q)
        logits = torch.empty((b, n), dtype=torch.float32, device=q.device)  # (b, N)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            logits[:, s:e] = memory.scores_from_parts(parts, s, e)
        del parts
        lse = torch.logsumexp(logits, dim=1)  # (b,)
        rows = torch.arange(b, device=q.device)
        total += (lse - logits[rows, g]).sum(dtype=torch.float64)
        p = logits.sub_(lse[:, None]).exp_()  # (b, N) softmax, in place
        p[rows, g] -= 1.0
        p /= b_all  # gradient of the batch mean
        per_subject = torch.zeros((b, ne), dtype=torch.float32, device=q.device)
        per_subject.index_add_(1, memory.subject_ids, p)
        per_relation = torch.zeros((b, nr), dtype=torch.float32, device=q.device)
        per_relation.index_add_(1, memory.relation_ids, p)
        per_object = torch.zeros((b, ne), dtype=torch.float32, device=q.device)
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            lo, hi = int(memory.object_offsets[s]), int(memory.object_offsets[e])
            share = p[:, s:e] / memory.object_counts[s:e]  # (b, e - s)
            per_object.index_add_(1, memory.object_values[lo:hi], share[:, memory._value_fact[lo:hi] - s])
        del p
        grad[a:a + b, :w] = per_subject @ memory.entity_emb
        grad[a:a + b, w:2 * w] = per_relation @ memory.relation_emb
        grad[a:a + b, 2 * w:] = per_object @ memory.entity_emb
    return (total / max(b_all, 1)).to(torch.float32), grad


class _FactorisedFullSoftmax(torch.autograd.Function):
    """Autograd wrapper: the loss and its gradient come from one pass (no graph over N facts)."""

    @staticmethod
    def forward(ctx, queries, memory, gold, sub_batch, chunk):  # noqa: D102
        loss, grad = factorised_full_softmax(queries.detach(), memory, gold, sub_batch=sub_batch,
                                             chunk=chunk)
        ctx.save_for_backward(grad.to(queries.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102
        (grad,) = ctx.saved_tensors
        return grad_output * grad, None, None, None, None


def candidate_union(candidate_ids: torch.Tensor, gold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Union of a batch's candidates and gold facts.

    candidate_ids (B, K) with -1 pads, gold (B,). Returns the sorted union (U,) and the position
    of each gold fact in it (B,).
    """
    ids = torch.cat([candidate_ids[candidate_ids >= 0], gold])
    union = torch.unique(ids)  # sorted
    gold_pos = torch.searchsorted(union, gold)
    return union, gold_pos


def ksoftmax_loss(
    queries: torch.Tensor, memory: MemoryLike, candidate_ids: torch.Tensor, gold: torch.Tensor
) -> LossOutput:
    """K-softmax, eq. 3-4, over the union of the batch's candidates plus the gold facts."""
    union, gold_pos = candidate_union(candidate_ids, gold)
    scores = queries @ _rows(memory, union).T  # (B, U): one dense matmul for the whole batch
    return LossOutput(F.cross_entropy(scores, gold_pos), int(union.numel()))


def make_optimizer(model: nn.Module, name: str, lr: float) -> torch.optim.Optimizer:
    """'adam' (dense, the paper's) or 'sparse_adam' (lazy Adam on sparse gradients).

    Dense Adam uses torch's fused kernel where the parameters allow it (floating point, on CPU or
    CUDA): the same update as the default multi-tensor Adam, and on the 26k x 600 word table of
    SQ-32k about 15x faster per step on 2 CPU cores (the default was half of the step time).
    """
    if name == "adam":
        params = list(model.parameters())
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
        return torch.optim.Adam(params, lr=lr, fused=fused or None)
    if name == "sparse_adam":
        return torch.optim.SparseAdam(list(model.parameters()), lr=lr)
    raise ValueError(f"optimizer={name!r}: must be 'adam' or 'sparse_adam'")
