"""Shared pieces of the K-MIPS readers: the :class:`Reader` interface, :class:`Candidates` and
the batch scoring of per-query candidate sets (used by :mod:`hmn.readers` and
:mod:`hmn.baselines`).

Short names inside kernels: q queries (B, D), U union of the facts read by the batch,
mask (B, |U|) facts read by each query.
"""

from __future__ import annotations

import abc
import numbers
from dataclasses import dataclass
from typing import Any

import torch

from hmn.memory import FactMemory, FactorisedMemory

__all__ = ["Candidates", "Reader", "score_candidate_sets"]

#: what a reader reads: the dense memory or the factorised tables
Memory = FactMemory | FactorisedMemory


@dataclass
class Candidates:
    """K candidate facts per query.

    Attributes:
        ids: (B, K) int64 fact ids, best first; -1 pads where fewer than K facts were read.
        scores: (B, K) float32 exact inner products h(q) . M[id]; -inf at pads.
        touched: (B,) int64 number of facts whose inner product was computed for each query.
    """

    ids: torch.Tensor
    scores: torch.Tensor
    touched: torch.Tensor


def _check_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k={k!r}: must be an integer >= 1")
    return int(k)


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name}={value!r}: must be an integer >= 0")
    return int(value)


def _pad(ids: torch.Tensor, scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (B, k') candidates to (B, k) with id -1 / score -inf; also mark -inf scores as -1."""
    ids = torch.where(torch.isneginf(scores), torch.full_like(ids, -1), ids)
    missing = k - ids.shape[1]
    if missing > 0:
        b = ids.shape[0]
        ids = torch.cat([ids, ids.new_full((b, missing), -1)], dim=1)
        scores = torch.cat([scores, scores.new_full((b, missing), float("-inf"))], dim=1)
    return ids, scores


class Reader(abc.ABC):
    """A K-MIPS reader over a :class:`FactMemory`."""

    name: str = ""
    #: whether :func:`make_reader` must pass a ClusterIndex
    needs_index: bool = False

    def __init__(self, memory: FactMemory) -> None:
        if not isinstance(memory, (FactMemory, FactorisedMemory)):
            raise TypeError(
                f"memory must be a FactMemory or FactorisedMemory, got {type(memory).__name__}"
            )
        self.memory = memory

    @abc.abstractmethod
    def search(
        self, queries: torch.Tensor, k: int, generator: torch.Generator | None = None
    ) -> Candidates:
        """Top-k facts for each of the (B, D) queries; never builds an autograd graph."""


def score_candidate_sets(
    memory: Memory, q: torch.Tensor, cand: list[torch.Tensor], k: int
) -> Candidates:
    """Top-k of each query among its own candidate fact ids, with exact inner products.

    The batch is scored at once: U = union of all candidates, one (B, |U|) product, then the
    facts a query did not select are masked.  ``touched`` = number of distinct candidates.

    Args:
        memory: the fact memory.
        q: (B, D) checked queries on the memory's device.
        cand: B 1-D int64 tensors of candidate fact ids (duplicates allowed).
        k: candidates to return per query.
    """
    b, dev = q.shape[0], q.device
    cand = [c.to(device=dev, dtype=torch.int64).reshape(-1) for c in cand]
    sizes = torch.tensor([c.numel() for c in cand], dtype=torch.int64, device=dev)
    flat = torch.cat(cand) if cand else torch.empty(0, dtype=torch.int64, device=dev)
    union = torch.unique(flat)  # (|U|,) sorted
    if union.numel() == 0:
        ids = torch.full((b, k), -1, dtype=torch.int64, device=dev)
        scores = torch.full((b, k), float("-inf"), device=dev)
        return Candidates(ids=ids, scores=scores, touched=torch.zeros(b, dtype=torch.int64))
    rows = torch.repeat_interleave(torch.arange(b, device=dev), sizes)
    mask = torch.zeros((b, union.numel()), dtype=torch.bool, device=dev)  # (B, |U|)
    mask[rows, torch.searchsorted(union, flat)] = True
    touched = mask.sum(dim=1)  # (B,)
    s = memory.scores(q, union).masked_fill(~mask, float("-inf"))  # (B, |U|)
    top_s, top_p = s.topk(min(k, union.numel()), dim=1)
    ids, scores = _pad(union[top_p], top_s, k)
    return Candidates(ids=ids, scores=scores, touched=touched)
