"""The HMN reader model: a bag-of-words question encoder and the two losses of the paper.

Only torch; no I/O. Shapes: B questions, D fact dimension (600), N facts, K candidates, U the
union of candidates over a batch, T tokens in a batch.

- `BowEncoder`: h(q) = sum of learned word vectors (section 4).
- `full_softmax_loss`: softmax over all N facts (the paper's baseline).
- `ksoftmax_loss`: eq. 3-4. C = top-K of h(q).M^T from a reader; the softmax runs over M[C] only.
  In training the gold fact is always added, and the candidate set is the union over the
  mini-batch, so one dense (B, U) matmul serves the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


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


def full_softmax_loss(queries: torch.Tensor, memory: torch.Tensor, gold: torch.Tensor) -> LossOutput:
    """Softmax over the whole memory. queries (B, D), memory (N, D), gold (B,) fact ids."""
    scores = queries @ memory.T  # (B, N)
    return LossOutput(F.cross_entropy(scores, gold), memory.shape[0])


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
    queries: torch.Tensor, memory: torch.Tensor, candidate_ids: torch.Tensor, gold: torch.Tensor
) -> LossOutput:
    """K-softmax, eq. 3-4, over the union of the batch's candidates plus the gold facts."""
    union, gold_pos = candidate_union(candidate_ids, gold)
    scores = queries @ memory[union].T  # (B, U): one dense matmul for the whole batch
    return LossOutput(F.cross_entropy(scores, gold_pos), int(union.numel()))


def make_optimizer(model: nn.Module, name: str, lr: float) -> torch.optim.Optimizer:
    """'adam' (dense, the paper's) or 'sparse_adam' (lazy Adam on sparse gradients)."""
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    if name == "sparse_adam":
        return torch.optim.SparseAdam(list(model.parameters()), lr=lr)
    raise ValueError(f"optimizer={name!r}: must be 'adam' or 'sparse_adam'")
