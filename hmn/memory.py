"""Fact memory of the Hierarchical Memory Network (Chandar et al. 2016, section 3).

Every fact (subject, relation, objects) of the knowledge base becomes one fixed memory vector

    M[i] = [ E[s_i] ; R[r_i] ; mean_{o in objects(i)} E[o] ]        (d + d + d = D, 600 for d=200)

built from fixed, pre-trained TransE entity (E) and relation (R) embeddings.  Facts grouped by
(subject, relation) have several objects; their object part is the mean of the object embeddings.

Short names used in this module:
    N  facts            d  embedding width of E and R (D = 3 d)
    B  queries          Ne / Nr  number of entities / relations
"""

from __future__ import annotations

import logging

import numpy as np
import torch

logger = logging.getLogger(__name__)

__all__ = ["FactMemory", "FactorisedMemory", "build_fact_vectors"]


def _as_int_array(name: str, a: np.ndarray, ndim: int = 1) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{name}: expected an integer array, got dtype {a.dtype}")
    return a.astype(np.int64, copy=False)


def _check_ids(name: str, ids: np.ndarray, upper: int, table: str) -> None:
    """Raise ValueError naming the first id of `name` outside [0, upper)."""
    if ids.size == 0:
        return
    bad = np.flatnonzero((ids < 0) | (ids >= upper))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{name}[{i}]={int(ids[i])} is out of range for {table} with {upper} rows "
            f"({bad.size} bad ids in total)"
        )


def check_fact_table(
    subject_ids: np.ndarray,
    relation_ids: np.ndarray,
    object_offsets: np.ndarray,
    object_values: np.ndarray,
    num_entities: int,
    num_relations: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Validate the integer fact table (Arrow list layout for the objects).

    Returns int64 (subject_ids, relation_ids, object_offsets, object_values, lengths), where
    lengths (N,) is the number of objects of each fact. Raises ValueError naming the offending
    fact or id.
    """
    subject_ids = _as_int_array("subject_ids", subject_ids)
    relation_ids = _as_int_array("relation_ids", relation_ids)
    object_offsets = _as_int_array("object_offsets", object_offsets)
    object_values = _as_int_array("object_values", object_values)
    n = subject_ids.shape[0]
    if n == 0:
        raise ValueError("the fact table must hold at least one fact (N >= 1)")
    if relation_ids.shape[0] != n:
        raise ValueError(f"relation_ids has {relation_ids.shape[0]} rows, subject_ids has {n}")
    if object_offsets.shape[0] != n + 1:
        raise ValueError(
            f"object_offsets must have N+1={n + 1} entries (Arrow list layout), "
            f"got {object_offsets.shape[0]}"
        )
    if object_offsets[0] != 0 or object_offsets[-1] != object_values.shape[0]:
        raise ValueError(
            f"object_offsets must start at 0 and end at len(object_values)="
            f"{object_values.shape[0]}, got {int(object_offsets[0])}..{int(object_offsets[-1])}"
        )
    lengths = np.diff(object_offsets)  # (N,) objects per fact
    if (lengths < 0).any():
        i = int(np.flatnonzero(lengths < 0)[0])
        raise ValueError(f"object_offsets decreases at fact {i}: offsets must be non-decreasing")
    if (lengths == 0).any():
        empty = np.flatnonzero(lengths == 0)
        raise ValueError(
            f"fact {int(empty[0])} has no object ({empty.size} facts without objects in total)"
        )
    _check_ids("subject_ids", subject_ids, num_entities, "entity_emb")
    _check_ids("relation_ids", relation_ids, num_relations, "relation_emb")
    _check_ids("object_values", object_values, num_entities, "entity_emb")
    return subject_ids, relation_ids, object_offsets, object_values, lengths


def build_fact_vectors(
    entity_emb: np.ndarray,
    relation_emb: np.ndarray,
    subject_ids: np.ndarray,
    relation_ids: np.ndarray,
    object_offsets: np.ndarray,
    object_values: np.ndarray,
    chunk: int = 1 << 16,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Build the (N, 3d) float32 fact matrix M (section 3 of the paper).

    Args:
        entity_emb: (Ne, d) fixed TransE entity embeddings E.
        relation_emb: (Nr, d) fixed TransE relation embeddings R.
        subject_ids: (N,) subject entity id of each fact.
        relation_ids: (N,) relation id of each fact.
        object_offsets: (N + 1,) Arrow list offsets: the objects of fact i are
            ``object_values[object_offsets[i]:object_offsets[i + 1]]``.
        object_values: (nnz,) object entity ids.
        chunk: facts processed at a time (bounds the temporary memory).
        out: optional (N, 3d) float32 array to fill, e.g. a writable ``np.memmap`` of the
            memory's ``.npy`` file (``np.lib.format.open_memmap``): the matrix is then built
            in place, never held in this process's heap; the values are the same.

    Returns:
        (N, 3d) float32 array ``[E[s]; R[r]; mean E[objects]]`` (``out`` when given).

    Raises:
        ValueError: bad shapes, ids out of range, malformed offsets, or a fact with no object.
        TypeError: non-integer id arrays.
    """
    entity_emb = np.asarray(entity_emb)
    relation_emb = np.asarray(relation_emb)
    if entity_emb.ndim != 2 or relation_emb.ndim != 2:
        raise ValueError(
            f"entity_emb and relation_emb must be 2-D, got {entity_emb.shape} and "
            f"{relation_emb.shape}"
        )
    d = entity_emb.shape[1]
    if relation_emb.shape[1] != d:
        raise ValueError(
            f"relation_emb has width {relation_emb.shape[1]}, entity_emb has width {d}: "
            "they must match"
        )
    if chunk < 1:
        raise ValueError(f"chunk={chunk}: must be >= 1")
    subject_ids, relation_ids, object_offsets, object_values, lengths = check_fact_table(
        subject_ids, relation_ids, object_offsets, object_values, entity_emb.shape[0],
        relation_emb.shape[0])
    n = subject_ids.shape[0]

    if out is None:
        out = np.empty((n, 3 * d), dtype=np.float32)  # (N, 3d)
    elif not isinstance(out, np.ndarray) or out.shape != (n, 3 * d) or out.dtype != np.float32:
        raise ValueError(
            f"out must be an ({n}, {3 * d}) float32 array, got "
            f"{getattr(out, 'shape', type(out).__name__)} {getattr(out, 'dtype', '')}"
        )
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        out[s:e, :d] = entity_emb[subject_ids[s:e]]
        out[s:e, d : 2 * d] = relation_emb[relation_ids[s:e]]
        lo, hi = int(object_offsets[s]), int(object_offsets[e])
        obj = entity_emb[object_values[lo:hi]].astype(np.float64)  # (nnz_chunk, d)
        # Sum each fact's objects in float64 (segments are non-empty, checked above), then mean.
        sums = np.add.reduceat(obj, object_offsets[s:e] - lo, axis=0)  # (e - s, d)
        out[s:e, 2 * d :] = sums / lengths[s:e, None]
    logger.info("built %d fact vectors of dimension %d", n, 3 * d)
    return out


def _fact_ids(ids: torch.Tensor | np.ndarray, n: int, device: torch.device) -> torch.Tensor:
    """Validated 1-D int64 fact ids in [0, n), on ``device``."""
    ids = torch.as_tensor(ids)
    if ids.ndim != 1:
        raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
    ids = ids.to(device=device, dtype=torch.int64)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
        raise ValueError(f"ids must lie in [0, {n}), got {int(ids.min())}..{int(ids.max())}")
    return ids


def _grouped(q: torch.Tensor, facts: torch.Tensor, counts: torch.Tensor, max_rows: int,
             parts) -> torch.Tensor:
    """Scores of each query with its own run of ``facts`` (see ``grouped_scores``).

    ``parts(f)`` gives [(rows (len(f), w), column slice of q)] for a run of facts; queries are
    taken in groups of about ``max_rows`` facts, one matrix-vector product per query and part, so
    neither the (P, D) rows of all pairs nor the queries repeated per pair are ever built.
    """
    out = torch.empty(facts.numel(), dtype=torch.float32, device=q.device)  # (P,)
    ends = torch.cumsum(counts, 0).tolist()
    starts = [0] + ends[:-1]
    i, b = 0, q.shape[0]
    while i < b:
        j = i + 1
        while j < b and ends[j] - starts[i] <= max_rows:
            j += 1
        a, e = starts[i], ends[j - 1]
        if e > a:
            blocks = parts(facts[a:e])
            for qi in range(i, j):
                lo, hi = starts[qi] - a, ends[qi] - a
                if hi > lo:
                    acc = None
                    for rows, cols in blocks:
                        v = rows[lo:hi] @ q[qi, cols]
                        acc = v if acc is None else acc.add_(v)
                    out[starts[qi]:ends[qi]] = acc
        i = j
    return out


class FactMemory:
    """The memory M: an (N, D) float32 tensor of fact vectors on any device.

    ``scores`` gives the exact inner products h(q) . M[i] used by the K-MIPS readers.
    """

    def __init__(self, vectors: torch.Tensor) -> None:
        if not isinstance(vectors, torch.Tensor):
            raise TypeError(f"vectors must be a torch.Tensor, got {type(vectors).__name__}")
        if vectors.ndim != 2:
            raise ValueError(f"vectors must be (N, D), got shape {tuple(vectors.shape)}")
        if vectors.shape[0] == 0:
            raise ValueError("vectors must hold at least one fact (N >= 1)")
        if not vectors.is_floating_point():
            raise TypeError(f"vectors must be floating point, got {vectors.dtype}")
        self.vectors: torch.Tensor = vectors.to(torch.float32).contiguous()  # (N, D)

    @property
    def n(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def d(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def device(self) -> torch.device:
        return self.vectors.device

    def __repr__(self) -> str:
        return f"FactMemory(n={self.n}, d={self.d}, device={self.device})"

    def check_queries(self, queries: torch.Tensor) -> torch.Tensor:
        """Validate (B, D) queries and return them as float32 on the memory's device."""
        if not isinstance(queries, torch.Tensor):
            raise TypeError(f"queries must be a torch.Tensor, got {type(queries).__name__}")
        if queries.ndim != 2 or queries.shape[1] != self.d:
            raise ValueError(f"queries must be (B, D={self.d}), got shape {tuple(queries.shape)}")
        return queries.to(device=self.device, dtype=torch.float32)

    def scores(self, queries: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Inner products of queries with all facts (B, N), or with facts ``ids`` (B, len(ids))."""
        q = self.check_queries(queries)  # (B, D)
        if ids is None:
            return q @ self.vectors.T  # (B, N)
        return q @ self.vectors[_fact_ids(ids, self.n, self.device)].T  # (B, len(ids))

    def gather(self, ids: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(len(ids), D) rows M[ids] (the interface shared with :class:`FactorisedMemory`)."""
        ids = torch.as_tensor(ids).to(device=self.device, dtype=torch.int64)
        return self.vectors[ids]

    def grouped_scores(self, q: torch.Tensor, facts: torch.Tensor, counts: torch.Tensor,
                       max_rows: int = 1 << 16) -> torch.Tensor:
        """(P,) inner products of checked queries q (B, D) with their own facts: ``facts`` holds
        the facts of query 0, then of query 1, ... (``counts`` (B,) of each)."""
        return _grouped(q, facts, counts, max_rows, lambda f: [(self.vectors[f], slice(None))])

    def to(self, device: torch.device | str) -> FactMemory:
        """A FactMemory with the same vectors on ``device`` (self if already there)."""
        if torch.device(device) == self.device:
            return self
        return FactMemory(self.vectors.to(device))


class FactorisedMemory:
    """The memory M kept factorised: entity table E, relation table R and the integer fact table.

    Row i of M is ``[E[s_i]; R[r_i]; mean_{o in objects(i)} E[o]]`` (section 3) but is never
    materialised as a whole: at FB2M scale (N = 10.8M, Ne = 2.15M, d = 200) the dense (N, 600)
    float32 matrix is 26 GB, the tables are 1.7 GB of floats plus 0.3 GB of ids.

    * ``gather(ids)`` builds the requested rows on demand (candidate scoring, k-means chunks).
    * ``scores(queries)`` computes the exact inner products of all facts factorised:
      ``q . M[i] = (q_s . E)[s_i] + (q_r . R)[r_i] + mean_o (q_o . E)[o]``, i.e. one pass over E
      (two d-wide products per entity) and R, then gathers: about 2 Ne d + Nr d + nnz multiply-
      adds per query instead of 3 N d (7x fewer at FB2M scale).

    It has the reading interface of :class:`FactMemory` (``n``, ``d``, ``device``,
    ``check_queries``, ``scores``, ``to``) so every reader that scores candidates by id works on
    it; it has no ``vectors`` attribute.

    Args: as :func:`build_fact_vectors` (validated the same way).
    """

    def __init__(
        self,
        entity_emb: np.ndarray | torch.Tensor,
        relation_emb: np.ndarray | torch.Tensor,
        subject_ids: np.ndarray,
        relation_ids: np.ndarray,
        object_offsets: np.ndarray,
        object_values: np.ndarray,
    ) -> None:
        ent = torch.as_tensor(np.asarray(entity_emb) if not isinstance(entity_emb, torch.Tensor)
                              else entity_emb)
        rel = torch.as_tensor(np.asarray(relation_emb) if not isinstance(relation_emb, torch.Tensor)
                              else relation_emb)
        if ent.ndim != 2 or rel.ndim != 2:
            raise ValueError(
                f"entity_emb and relation_emb must be 2-D, got {tuple(ent.shape)} and "
                f"{tuple(rel.shape)}"
            )
        if rel.shape[1] != ent.shape[1]:
            raise ValueError(
                f"relation_emb has width {rel.shape[1]}, entity_emb has width {ent.shape[1]}: "
                "they must match"
            )
        subj, rels, offsets, values, lengths = check_fact_table(
            subject_ids, relation_ids, object_offsets, object_values, ent.shape[0], rel.shape[0])
        n = subj.shape[0]
        self.entity_emb = ent.to(torch.float32)  # (Ne, d)
        self.relation_emb = rel.to(torch.float32).to(ent.device)  # (Nr, d)
        dev = self.entity_emb.device
        self.subject_ids = torch.from_numpy(subj).to(dev)  # (N,)
        self.relation_ids = torch.from_numpy(rels).to(dev)  # (N,)
        self.object_offsets = torch.from_numpy(offsets).to(dev)  # (N + 1,)
        self.object_values = torch.from_numpy(values).to(dev)  # (nnz,)
        self.object_counts = torch.from_numpy(lengths).to(dev)  # (N,)
        # fact of every object value: the segment id used by the object-mean reductions
        self._value_fact = torch.repeat_interleave(
            torch.arange(n, device=dev), self.object_counts
        )  # (nnz,)

    @property
    def n(self) -> int:
        return int(self.subject_ids.shape[0])

    @property
    def width(self) -> int:
        """d, the width of E and R."""
        return int(self.entity_emb.shape[1])

    @property
    def d(self) -> int:
        """D = 3 d, the width of a fact vector."""
        return 3 * self.width

    @property
    def device(self) -> torch.device:
        return self.entity_emb.device

    def __repr__(self) -> str:
        return (
            f"FactorisedMemory(n={self.n}, d={self.d}, entities={self.entity_emb.shape[0]}, "
            f"relations={self.relation_emb.shape[0]}, device={self.device})"
        )

    def nbytes(self) -> int:
        """Bytes held by the tables (compare with 4 N D for the dense memory)."""
        ts = (self.entity_emb, self.relation_emb, self.subject_ids, self.relation_ids,
              self.object_offsets, self.object_values, self.object_counts, self._value_fact)
        return int(sum(t.element_size() * t.numel() for t in ts))

    check_queries = FactMemory.check_queries

    def _object_means(self, ids: torch.Tensor) -> torch.Tensor:
        """(len(ids), d) float32 mean object embedding of the facts ``ids`` (sums in float64)."""
        counts = self.object_counts[ids]  # (b,)
        starts = self.object_offsets[ids]  # (b,)
        total = int(counts.sum())
        seg = torch.repeat_interleave(torch.arange(ids.numel(), device=self.device), counts)
        first = torch.cumsum(counts, 0) - counts
        pos = torch.arange(total, device=self.device) + torch.repeat_interleave(
            starts - first, counts
        )  # (nnz_b,) positions in object_values
        obj = self.entity_emb[self.object_values[pos]].to(torch.float64)  # (nnz_b, d)
        sums = torch.zeros((ids.numel(), self.width), dtype=torch.float64, device=self.device)
        sums.index_add_(0, seg, obj)
        return (sums / counts[:, None]).to(torch.float32)

    def gather(self, ids: torch.Tensor | np.ndarray) -> torch.Tensor:
        """(len(ids), D) float32 rows M[ids], equal to :func:`build_fact_vectors`'s rows."""
        ids = _fact_ids(ids, self.n, self.device)
        return torch.cat(
            [
                self.entity_emb[self.subject_ids[ids]],
                self.relation_emb[self.relation_ids[ids]],
                self._object_means(ids),
            ],
            dim=1,
        )  # (b, 3d)

    def _object_means_fast(self, ids: torch.Tensor) -> torch.Tensor:
        """(len(ids), d) float32 mean object embeddings by one embedding_bag (no float64 pass)."""
        counts = self.object_counts[ids]
        first = torch.cumsum(counts, 0) - counts  # (b,) bag offsets
        pos = torch.arange(int(counts.sum()), device=self.device) + torch.repeat_interleave(
            self.object_offsets[ids] - first, counts)
        return torch.nn.functional.embedding_bag(self.object_values[pos], self.entity_emb, first,
                                                 mode="mean")

    def grouped_scores(self, q: torch.Tensor, facts: torch.Tensor, counts: torch.Tensor,
                       max_rows: int = 1 << 16) -> torch.Tensor:
        """(P,) inner products of checked queries q (B, D) with their own facts (``facts``: the
        facts of query 0, then of query 1, ...; ``counts`` (B,)), factorised: the subject,
        relation and object-mean parts are gathered as d-wide rows and never concatenated.
        The relation part is a (B, Nr) product (Nr is small: 6.7k at FB2M) read per pair, so only
        the subject and object rows are gathered."""
        w = self.width

        def parts(f: torch.Tensor):
            return [(self.entity_emb[self.subject_ids[f]], slice(0, w)),
                    (self._object_means_fast(f), slice(2 * w, 3 * w))]

        out = _grouped(q, facts, counts, max_rows, parts)  # (P,) subject + object parts
        rel = q[:, w:2 * w] @ self.relation_emb.T  # (B, Nr)
        qidx = torch.repeat_interleave(torch.arange(q.shape[0], device=q.device), counts)  # (P,)
        return out.add_(rel[qidx, self.relation_ids[facts]])

    def rows_between(self, s: int, e: int) -> torch.Tensor:
        """(e - s, D) rows s..e-1 (a chunk in fact order)."""
        return self.gather(torch.arange(s, min(e, self.n), device=self.device))

    def dense(self) -> FactMemory:
        """The materialised dense memory (tests and small KBs only)."""
        return FactMemory(self.rows_between(0, self.n))

    def partial_scores(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-table scores of checked queries (B, D): subject (B, Ne), relation (B, Nr),
        object (B, Ne) — one pass over E (both halves at once) and one over R."""
        w = self.width
        qse = torch.cat([q[:, :w], q[:, 2 * w :]], dim=0) @ self.entity_emb.T  # (2B, Ne)
        b = q.shape[0]
        return qse[:b], q[:, w : 2 * w] @ self.relation_emb.T, qse[b:]

    def scores_from_parts(
        self, parts: tuple[torch.Tensor, torch.Tensor, torch.Tensor], s: int, e: int
    ) -> torch.Tensor:
        """(B, e - s) exact scores of facts s..e-1 from :meth:`partial_scores`."""
        se, sr, so = parts
        lo, hi = int(self.object_offsets[s]), int(self.object_offsets[e])
        obj = so[:, self.object_values[lo:hi]].to(torch.float64)  # (B, nnz_chunk)
        sums = torch.zeros((so.shape[0], e - s), dtype=torch.float64, device=so.device)
        sums.index_add_(1, self._value_fact[lo:hi] - s, obj)
        mean = (sums / self.object_counts[s:e]).to(torch.float32)  # (B, e - s)
        return se[:, self.subject_ids[s:e]] + sr[:, self.relation_ids[s:e]] + mean

    def scores(self, queries: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Inner products with all facts (B, N) (factorised) or with facts ``ids``."""
        q = self.check_queries(queries)  # (B, D)
        if ids is None:
            return self.scores_from_parts(self.partial_scores(q), 0, self.n)
        ids = _fact_ids(ids, self.n, self.device)
        return q @ self.gather(ids).T  # (B, len(ids))

    def to(self, device: torch.device | str) -> FactorisedMemory:
        if torch.device(device) == self.device:
            return self
        return FactorisedMemory(
            self.entity_emb.to(device), self.relation_emb.to(device),
            self.subject_ids.cpu().numpy(), self.relation_ids.cpu().numpy(),
            self.object_offsets.cpu().numpy(), self.object_values.cpu().numpy(),
        )
