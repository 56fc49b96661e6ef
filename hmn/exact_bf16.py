"""The exact reader with a bfloat16 scan, for CUDA (``train.exact_precision`` /
``eval.exact_precision`` = ``bfloat16``).

`hmn.readers.ExactReader` scores all N facts of every query in float32. On a GPU the scan, a
(B, D) x (D, N) product (or the factorised (2B, d) x (d, Ne) and (B, d) x (d, Nr) products),
runs on the tensor cores in bfloat16. `BF16ExactReader` scans in bfloat16 (inputs rounded to 8
mantissa bits, products rounded likewise), keeps each query's best ``k'`` = max(2 K, K + 16)
facts, and re-scores those in float32 from the memory's rows. The scores it returns are
therefore exact inner products; its ids differ from the float32 reader's only where a fact of
the true top K scored more than the bfloat16 rounding (~2^-8 of the score's magnitude) below the
k'-th of the scan. `with_exact_precision` swaps it in where it pays (CUDA with bfloat16) and
keeps the float32 reader elsewhere, logging that the request was ignored (`hmn.devices`).

Short names inside kernels: q queries (B, D), kk = k' candidates re-scored per query.
"""

from __future__ import annotations

import torch

from hmn.devices import matmul_dtype
from hmn.memory import FactorisedMemory
from hmn.reader_base import Candidates, Memory, Reader, _check_k, _pad
from hmn.readers import ExactReader

__all__ = ["EXACT_PRECISIONS", "BF16ExactReader", "with_exact_precision"]

#: the values of ``train.exact_precision`` and ``eval.exact_precision``
EXACT_PRECISIONS = ("float32", "bfloat16")


class BF16ExactReader(ExactReader):
    """Exact K-MIPS whose scan over all N facts runs in bfloat16, then re-scores the best ``k'``
    of each query in float32 (see the module docstring); touched = N.

    Args:
        memory: the fact memory, dense or factorised (a bfloat16 copy of its vectors, or of its
            entity and relation tables, is kept: half their float32 bytes).
        chunk: facts scanned at a time.
        spare: re-scored candidates beyond K: k' = max(2 K, K + spare), at most N.
    """

    def __init__(self, memory: Memory, chunk: int = 65536, *, spare: int = 16) -> None:
        super().__init__(memory, chunk)
        if isinstance(spare, bool) or not isinstance(spare, int) or spare < 0:
            raise ValueError(f"spare={spare!r}: must be an integer >= 0")
        self.spare = spare
        if isinstance(memory, FactorisedMemory):
            self._entities = memory.entity_emb.to(torch.bfloat16)  # (Ne, d)
            self._relations = memory.relation_emb.to(torch.bfloat16)  # (Nr, d)
        else:
            self._vectors = memory.vectors.to(torch.bfloat16)  # (N, D)

    def rescored(self, k: int) -> int:
        """k', the candidates of a query re-scored in float32 for a top-``k``."""
        return min(self.memory.n, max(2 * k, k + self.spare))

    def _scan_blocks(self, q: torch.Tensor):
        """(s, e) -> (B, e - s) float32 scan scores of facts s..e-1 from bfloat16 products."""
        qb = q.to(torch.bfloat16)
        memory = self.memory
        if isinstance(memory, FactorisedMemory):
            w, b = memory.width, q.shape[0]
            qse = (torch.cat([qb[:, :w], qb[:, 2 * w :]], dim=0) @ self._entities.T).float()
            parts = (qse[:b], (qb[:, w : 2 * w] @ self._relations.T).float(), qse[b:])
            return lambda s, e: memory.scores_from_parts(parts, s, e)
        return lambda s, e: (qb @ self._vectors[s:e].T).float()

    @torch.no_grad()
    def search(
        self, queries: torch.Tensor, k: int, generator: torch.Generator | None = None
    ) -> Candidates:
        k = _check_k(k)
        q = self.memory.check_queries(queries)  # (B, D)
        n, b = self.memory.n, q.shape[0]
        kk = self.rescored(k)
        block = self._scan_blocks(q)
        best_s = q.new_empty((b, 0))  # (B, <=k') running best scan scores
        best_i = torch.empty((b, 0), dtype=torch.int64, device=q.device)
        for s in range(0, n, self.chunk):
            e = min(s + self.chunk, n)
            cand_s = torch.cat([best_s, block(s, e)], dim=1)
            cand_i = torch.cat([best_i, torch.arange(s, e, device=q.device).expand(b, -1)], dim=1)
            best_s, pos = cand_s.topk(min(kk, cand_s.shape[1]), dim=1)  # (B, k')
            best_i = cand_i.gather(1, pos)
        width = best_i.shape[1]
        rows = self.memory.gather(best_i.reshape(-1)).view(b, width, -1)  # (B, k', D) float32
        exact = torch.bmm(rows, q[:, :, None]).squeeze(2)  # (B, k') exact inner products
        top_s, pos = exact.topk(min(k, width), dim=1)  # (B, K)
        ids, scores = _pad(best_i.gather(1, pos), top_s, k)
        touched = torch.full((b,), n, dtype=torch.int64, device=q.device)
        return Candidates(ids=ids, scores=scores, touched=touched)


def with_exact_precision(reader: Reader, precision: str, what: str = "exact reader") -> Reader:
    """``reader`` itself, or for an `ExactReader` with ``precision="bfloat16"`` on a device where
    bfloat16 pays (CUDA), a `BF16ExactReader` over the same memory; on a CPU the request is
    logged and ignored. Readers other than the exact one are returned as they are."""
    if precision not in EXACT_PRECISIONS:
        raise ValueError(f"precision={precision!r}: must be one of {EXACT_PRECISIONS}")
    if precision == "float32" or type(reader) is not ExactReader:
        return reader
    if matmul_dtype(True, reader.memory.device, what) != torch.bfloat16:
        return reader
    return BF16ExactReader(reader.memory, reader.chunk)
