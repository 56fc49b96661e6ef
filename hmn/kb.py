"""The knowledge base from parsed fact chunks: dense ids, merged facts, names and questions.

Entity and relation ids are positions in the sorted distinct keys (hence deterministic); fact
ids are positions in the facts sorted by (subject id, relation id), one fact per pair, its
objects the union of the objects of every line of that pair in first-seen order.

:func:`build_kb` assembles the knowledge base from the chunks of :mod:`hmn.parse_tasks`
(:class:`hmn.formats.coded.CodedFacts`: chunk-local ids, rows sorted by (subject, relation,
line)) without hashing or comparing key strings: one merge of the chunks' sorted distinct
machine-id codes gives the entity ids (:func:`entity_ids`), numpy gathers map local to global
ids, and a merge of the chunks' sorted runs of packed ``subject | relation | row`` integers
(:func:`merge_runs`) orders the facts and finds the lines of one (subject, relation) pair, which
make one fact; the objects are gathered once, in fact order. With a thread pool the array passes
are split over its threads (numpy releases the GIL) and the entity keys are decoded to strings
meanwhile.

:func:`resolve_names` gives each entity its name (first seen wins); :func:`match_questions`
resolves parsed question rows (subject, relation keys) to fact ids against a knowledge base's
:class:`KeyTables`, with the reject reasons of the ingest (:func:`resolve_questions`).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hmn import ids
from hmn.formats.coded import CodedFacts
from hmn.formats.parsed import REJECT_SCHEMA

__all__ = [
    "ENTITIES_SCHEMA",
    "RELATIONS_SCHEMA",
    "KB_FACTS_SCHEMA",
    "KB_QUESTIONS_SCHEMA",
    "SKIP_NOT_IN_KB",
    "SKIP_DUPLICATE_NAME",
    "PARALLEL_MIN",
    "key_ids",
    "assign_ids",
    "entity_ids",
    "merge_runs",
    "BuiltKB",
    "build_kb",
    "answer_codes",
    "rejects_table",
    "resolve_names",
    "KeyTables",
    "QuestionMatch",
    "match_questions",
    "resolve_questions",
]

ENTITIES_SCHEMA = pa.schema(
    [("entity_id", pa.int64()), ("key", pa.string()), ("name", pa.string())]
)
RELATIONS_SCHEMA = pa.schema([("relation_id", pa.int64()), ("key", pa.string())])
KB_FACTS_SCHEMA = pa.schema(
    [
        ("fact_id", pa.int64()),
        ("subject_id", pa.int64()),
        ("relation_id", pa.int64()),
        ("object_ids", pa.list_(pa.int64())),
    ]
)
# questions resolved against the knowledge base (object_id null when not an entity of the KB)
KB_QUESTIONS_SCHEMA = pa.schema(
    [
        ("question", pa.string()),
        ("fact_id", pa.int64()),
        ("subject_id", pa.int64()),
        ("relation_id", pa.int64()),
        ("object_id", pa.int64()),
        ("source", pa.string()),
        ("line", pa.int64()),
    ]
)

SKIP_NOT_IN_KB = "entity not in knowledge base"
SKIP_DUPLICATE_NAME = "duplicate name for entity"

# the assembly splits its array passes over the pool's threads from this many rows (numpy
# releases the GIL in take, sort and elementwise kernels)
PARALLEL_MIN = 1 << 16


def _column(table: pa.Table, name: str) -> pa.Array:
    col = table[name]
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _sorted_unique(arr: pa.Array) -> pa.Array:
    uniq = pc.unique(arr)
    return uniq.take(pc.sort_indices(uniq))


def key_ids(keys: pa.Array, value_set: pa.Array) -> np.ndarray:
    """Position of each key in ``value_set`` (int64; -1 when absent or null)."""
    idx = pc.index_in(keys, value_set=value_set)
    return pc.fill_null(idx, -1).to_numpy(zero_copy_only=False).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# entity ids
# ---------------------------------------------------------------------------------------------


def assign_ids(parts: list[tuple[pa.Array, np.ndarray]]) -> tuple[pa.Array, np.ndarray]:
    """Sorted distinct keys of all chunk dictionaries, and the global id of every chunk's
    indices (concatenated in chunk order). Dictionaries may be int64 machine-id codes or
    strings (machine ids among them take the integer path; other keys are hashed once)."""
    if not parts:
        return pa.array([], pa.string()), np.zeros(0, dtype=np.int64)
    coded = [pa.types.is_integer(d.type) for d, _ in parts]
    if all(coded):
        distinct, maps = ids.sorted_union([np.unique(d.to_numpy()) for d, _ in parts])
        entry = [m[np.searchsorted(np.unique(d.to_numpy()), d.to_numpy())] for m, (d, _) in
                 zip(maps, parts)]  # fmt: skip
        return ids.mid_strings(distinct), np.concatenate(
            [e[np.asarray(idx)] for e, (_, idx) in zip(entry, parts)]
        )
    allkeys = pa.concat_arrays(
        [ids.mid_strings(d.to_numpy()) if c else d.cast(pa.string()) for (d, _), c in zip(parts, coded)]
    )
    codes = ids.mid_codes(allkeys)  # (entries,) order-preserving int64 of /m/ keys, -1 otherwise
    mid = codes >= 0
    uniq, mid_inv = np.unique(codes[mid], return_inverse=True)
    enc = allkeys.filter(pa.array(~mid)).dictionary_encode()
    distinct = pa.concat_arrays([ids.mid_strings(uniq), enc.dictionary])
    order = pc.sort_indices(distinct).to_numpy()
    rank = np.empty(len(distinct), dtype=np.int64)
    rank[order] = np.arange(len(distinct), dtype=np.int64)
    entry_id = np.empty(len(codes), dtype=np.int64)
    entry_id[mid] = rank[mid_inv]
    entry_id[~mid] = rank[len(uniq) + enc.indices.to_numpy(zero_copy_only=False)]
    distinct_sorted = distinct.take(pa.array(order))
    out, offset = [], 0
    for d, idx in parts:
        out.append(entry_id[offset + np.asarray(idx)])
        offset += len(d)
    return distinct_sorted, np.concatenate(out)


def entity_ids(chunks: list[CodedFacts], pool: ThreadPoolExecutor | None = None):
    """Sorted distinct entity keys of all chunks, their number and, per chunk, the global id of
    each of its local ids. Machine-id codes only: one sort of the chunks' distinct codes and a
    binary search per chunk (sorted queries), no string is hashed or compared. With a ``pool``,
    the keys are a ``Future`` (machine-id codes are decoded to strings by the pool while the
    caller goes on)."""
    if all(isinstance(c.entities, np.ndarray) for c in chunks):
        union, maps = ids.sorted_union([c.entities for c in chunks])
        if pool is not None:
            return pool.submit(ids.mid_strings, union), len(union), maps
        return ids.mid_strings(union), len(union), maps
    parts = [
        pa.array(c.entities) if isinstance(c.entities, np.ndarray) else c.entities for c in chunks
    ]
    distinct, gid = assign_ids([(p, np.arange(len(p))) for p in parts])
    maps, offset = [], 0
    for p in parts:
        maps.append(gid[offset : offset + len(p)])
        offset += len(p)
    if pool is not None:
        done = Future()
        done.set_result(distinct)
        return done, len(distinct), maps
    return distinct, len(distinct), maps


# ---------------------------------------------------------------------------------------------
# array passes split over a thread pool
# ---------------------------------------------------------------------------------------------


def merge_runs(key: np.ndarray, runs: list[tuple[int, int]], pool) -> np.ndarray:
    """``key`` sorted, where ``key[a:b]`` is sorted for every ``(a, b)`` of ``runs`` (which
    tile it). One stable sort (timsort: a merge of the runs), or with a ``pool`` two: the runs
    are cut at a pivot value (near the median) and the lower and upper parts merged at once."""
    runs = [(a, b) for a, b in runs if b > a]
    if pool is None or len(runs) < 2 or len(key) < PARALLEL_MIN:
        key.sort(kind="stable")
        return key
    pivot = int(np.median([key[(a + b) // 2] for a, b in runs]))
    cuts = [a + int(np.searchsorted(key[a:b], pivot)) for a, b in runs]
    lower = np.concatenate([key[a:c] for (a, _), c in zip(runs, cuts)])
    upper = np.concatenate([key[c:b] for (_, b), c in zip(runs, cuts)])
    del key
    merged = pool.submit(lower.sort, kind="stable")
    upper.sort(kind="stable")
    merged.result()
    return np.concatenate([lower, upper])


def _halves(n: int, pool) -> list[tuple[int, int]]:
    """``[0, n)`` cut in one piece per thread of ``pool`` (one piece when small or no pool)."""
    parts = pool._max_workers if pool is not None and n >= PARALLEL_MIN else 1
    bounds = np.linspace(0, n, parts + 1).astype(np.int64).tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def _run_all(pool, fn, pieces) -> None:
    """``fn(*piece)`` for every piece, on ``pool``'s threads when there is one (the last piece
    in the calling thread, which would otherwise wait idle)."""
    if pool is None or len(pieces) < 2:
        for piece in pieces:
            fn(*piece)
        return
    futures = [pool.submit(fn, *piece) for piece in pieces[:-1]]
    fn(*pieces[-1])
    for f in futures:
        f.result()


def _bits(n: int) -> int:
    return max(1, int(n - 1).bit_length())


# ---------------------------------------------------------------------------------------------
# the knowledge base from coded chunks
# ---------------------------------------------------------------------------------------------


@dataclass
class BuiltKB:
    """What :func:`build_kb` gives. ``entity_keys`` (E,) sorted keys, a ``Future`` when built
    with a pool; ``relation_keys`` (R,) sorted keys; ``facts`` the fact table
    (:data:`KB_FACTS_SCHEMA`); ``fact_pairs`` (F,) sorted ``subject_id * R + relation_id``;
    ``object_offsets`` (F + 1,) and ``object_ids`` the facts' objects (for :func:`answer_codes`);
    ``merged_lines`` (sources,) lines merged into an earlier line's fact, per fact source;
    ``info`` counts for the stats; ``steps_s`` seconds per step."""

    entity_keys: pa.Array | Future
    relation_keys: pa.Array
    facts: pa.Table
    fact_pairs: np.ndarray
    object_offsets: np.ndarray
    object_ids: np.ndarray
    merged_lines: np.ndarray
    info: dict
    steps_s: dict[str, float]


class _Rows:
    """Every fact line of every chunk with global ids: ``key`` (rows,) the packed
    ``subject | relation | row`` integers (or ``subject * R + relation`` when they do not fit
    63 bits), each chunk's rows one sorted run (``row_base``); ``obj_id`` the objects' global
    ids, chunk after chunk, each in the chunk's layout; ``row_start`` / ``row_len`` where each
    row's objects lie in ``obj_id``."""

    def __init__(self, chunks: list[CodedFacts], E: int, R: int):
        self.n_rows = sum(c.rows for c in chunks)
        self.n_objects = sum(int(c.offsets[-1]) for c in chunks)
        self.rb, self.nb = _bits(R), _bits(self.n_rows)
        self.packed = _bits(E) + self.rb + self.nb <= 63
        self.R = R
        # int32 cumsum is several times faster
        self.odt = np.int32 if self.n_objects < 2**31 else np.int64
        self.key: np.ndarray | None = np.empty(self.n_rows, dtype=np.int64)
        self.obj_id = np.empty(self.n_objects, dtype=np.int64)
        self.row_start = np.empty(self.n_rows, dtype=self.odt)  # first object of each row
        self.row_len = np.empty(self.n_rows, dtype=self.odt)  # objects of each row
        self.row_base = np.cumsum([0] + [c.rows for c in chunks]).tolist()
        self.obj_base = np.cumsum([0] + [len(c.objects) for c in chunks]).tolist()


def _global_rows(chunks: list[CodedFacts], maps, rmaps, E: int, R: int, pool) -> _Rows:
    """The chunks' rows and objects with global ids (:class:`_Rows`), each chunk's rows cut in
    pieces over the pool's threads."""
    rows = _Rows(chunks, E, R)
    key, rb, nb, odt = rows.key, rows.rb, rows.nb, rows.odt

    def global_ids(i: int, lo: int, hi: int) -> None:  # rows [lo, hi) of chunk i
        c, m, rm, base, obase = chunks[i], maps[i], rmaps[i], rows.row_base[i], rows.obj_base[i]
        k = key[base + lo : base + hi]
        np.take(m, c.subject[lo:hi], out=k)  # (rows,) global subject ids
        if rows.packed:
            k <<= rb + nb
            k |= rm[c.relation[lo:hi]] << nb
            k |= np.arange(base + lo, base + hi, dtype=np.int64)
        else:
            k *= R
            k += rm[c.relation[lo:hi]]
        a, b = int(c.offsets[lo]), int(c.offsets[hi])
        np.take(m, c.objects[a:b], out=rows.obj_id[obase + a : obase + b])
        # a chunk's rows may locate their objects by `starts` (rows sorted, objects in place)
        starts = c.offsets[lo:hi] if c.starts is None else c.starts[lo:hi]
        np.add(starts, obase, out=rows.row_start[base + lo : base + hi], dtype=odt,
               casting="unsafe")  # fmt: skip
        np.subtract(c.offsets[lo + 1 : hi + 1], c.offsets[lo:hi],
                    out=rows.row_len[base + lo : base + hi], dtype=odt, casting="unsafe")  # fmt: skip

    _run_all(pool, global_ids, [(i, lo, hi) for i, c in enumerate(chunks)
                                for lo, hi in _halves(c.rows, pool)])  # fmt: skip
    return rows


def _fact_order(rows: _Rows, pool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fact pairs, row order, new)``: the distinct sorted ``subject * R + relation`` pairs,
    the rows in fact order (lines ascending within a pair) and, in that order, whether a row
    starts a fact. Takes ``rows.key`` (each chunk a sorted run: a merge, not a sort)."""
    key, rows.key = rows.key, None
    rb, nb, R = rows.rb, rows.nb, rows.R
    if rows.packed:  # distinct values; rows ascend within a pair
        key = merge_runs(key, list(zip(rows.row_base[:-1], rows.row_base[1:])), pool)
        row_order = key & ((1 << nb) - 1)
        key >>= nb
        pair_sorted = (key >> rb) * R + (key & ((1 << rb) - 1))
    else:
        row_order = np.argsort(key, kind="stable")
        pair_sorted = key[row_order]
    del key
    new = np.empty(rows.n_rows, dtype=bool)
    if rows.n_rows:
        new[0] = True
        np.not_equal(pair_sorted[1:], pair_sorted[:-1], out=new[1:])
    return pair_sorted[new], row_order, new


def _gather_objects(rows: _Rows, first_row: np.ndarray, pool) -> tuple[np.ndarray, np.ndarray]:
    """Objects per fact when every fact is one row and no row repeats an object (the common
    case): the rows' lists reordered, no sort over the objects."""
    F = len(first_row)
    lens = rows.row_len[first_row]
    offsets = np.zeros(F + 1, dtype=rows.odt)
    np.cumsum(lens, out=offsets[1:])
    kept_obj = np.empty(rows.n_objects, dtype=np.int64)

    def gather(lo: int, hi: int) -> None:  # the objects of facts [lo, hi)
        a, b = int(offsets[lo]), int(offsets[hi])
        gather = np.repeat(rows.row_start[first_row[lo:hi]].astype(np.int64) - offsets[lo:hi],
                           lens[lo:hi])  # fmt: skip
        gather += np.arange(a, b, dtype=np.int64)
        np.take(rows.obj_id, gather, out=kept_obj[a:b])

    _run_all(pool, gather, _halves(F, pool))
    return offsets, kept_obj


def _union_objects(
    rows: _Rows, row_order: np.ndarray, new: np.ndarray, F: int, E: int, moved: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Objects per fact, the union of its rows' objects in first-seen order (rows in
    source/line order, then in-line order). ``moved``: some chunk's objects are not in row
    order (``CodedFacts.starts``), so they are gathered into row order first."""
    row_len, obj_id, n_rows = rows.row_len, rows.obj_id, rows.n_rows
    if moved:
        row_end = np.cumsum(row_len, dtype=np.int64)
        gather = np.repeat(rows.row_start.astype(np.int64) - (row_end - row_len), row_len)
        gather += np.arange(rows.n_objects, dtype=np.int64)
        obj_id = obj_id[gather]
        del gather, row_end
    row_fact = np.empty(n_rows, dtype=np.int64)
    row_fact[row_order] = np.cumsum(new) - 1
    obj_row = np.repeat(np.arange(n_rows, dtype=np.int64), row_len)
    obj_fact = row_fact[obj_row]
    _, first_obj = np.unique(obj_fact * E + obj_id, return_index=True)
    first_obj.sort()
    order = first_obj[np.argsort(obj_fact[first_obj], kind="stable")]
    kept_fact, kept_obj = obj_fact[order], obj_id[order]
    offsets = np.zeros(F + 1, dtype=np.int32)
    np.cumsum(np.bincount(kept_fact, minlength=F), out=offsets[1:])
    return offsets, kept_obj


class _StepTimer:
    def __init__(self):
        self.steps: dict[str, float] = {}
        self._tick = time.perf_counter()

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.steps[name] = round(now - self._tick, 3)
        self._tick = now


def build_kb(
    chunks: list[CodedFacts], chunk_source: list[int], n_sources: int, pool=None
) -> BuiltKB:
    """Dense ids for entities, relations and merged facts (see the module docstring).

    ``chunks`` are the parsed chunks (source order, then line order) with chunk-local ids;
    ``chunk_source`` gives each chunk's index among the ``n_sources`` fact sources. With a
    thread ``pool`` the array passes are split over its threads and the entity keys are a
    ``Future`` (decoded to strings while the caller goes on)."""
    step = _StepTimer()
    entity_keys, E, maps = entity_ids(chunks, pool)
    rel_all = pa.concat_arrays([c.relations for c in chunks]) if chunks else pa.array([], pa.string())
    relation_keys = _sorted_unique(rel_all)
    rmaps = [key_ids(c.relations, relation_keys) for c in chunks]
    R = len(relation_keys)
    step("dictionaries")

    # facts sorted by (subject key, relation key) == by (subject id, relation id). Each chunk's
    # rows come sorted by its local ids, which map to global ids in the same order, so the
    # packed keys form one sorted run per chunk and a stable sort (timsort) merges the runs.
    rows = _global_rows(chunks, maps, rmaps, E, R, pool)
    del maps, rmaps
    step("ids")
    uniq_pair, row_order, new = _fact_order(rows, pool)
    first_row = row_order[new]  # the first row of each fact, in fact order
    F = len(uniq_pair)
    merged_row = np.ones(rows.n_rows, dtype=bool)
    merged_row[first_row] = False
    step("facts")

    if F == rows.n_rows and not any(c.repeats for c in chunks):
        offsets, kept_obj = _gather_objects(rows, first_row, pool)
    else:
        moved = any(c.starts is not None for c in chunks)
        offsets, kept_obj = _union_objects(rows, row_order, new, F, E, moved)
    del row_order, new
    facts = pa.table(
        {
            "fact_id": pa.array(np.arange(F, dtype=np.int64)),
            "subject_id": pa.array(uniq_pair // R if R else uniq_pair),
            "relation_id": pa.array(uniq_pair % R if R else uniq_pair),
            "object_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(kept_obj)),
        },
        schema=KB_FACTS_SCHEMA,
    )
    step("objects")
    chunk_rows = np.array([c.rows for c in chunks], dtype=np.int64)
    row_source = np.repeat(np.asarray(chunk_source, dtype=np.int64), chunk_rows)
    info = {
        "fact_lines": int(rows.n_rows),
        "merged_lines": int(merged_row.sum()),
        "duplicate_objects_dropped": int(rows.n_objects - len(kept_obj)),
        "objects": int(len(kept_obj)),
    }
    return BuiltKB(
        entity_keys=entity_keys, relation_keys=relation_keys, facts=facts, fact_pairs=uniq_pair,
        object_offsets=offsets, object_ids=kept_obj,
        merged_lines=np.bincount(row_source[merged_row], minlength=n_sources), info=info,
        steps_s=step.steps,
    )  # fmt: skip


def answer_codes(object_offsets: np.ndarray, object_ids: np.ndarray, E: int) -> np.ndarray:
    """Sorted (fact, object) codes ``fact * E + object`` of every fact's objects, for the
    answer checks of :func:`resolve_questions`."""
    kept_fact = np.repeat(np.arange(len(object_offsets) - 1, dtype=np.int64), np.diff(object_offsets))
    return np.sort(kept_fact * E + object_ids, kind="stable")  # nearly sorted already


# ---------------------------------------------------------------------------------------------
# names and questions against the knowledge base
# ---------------------------------------------------------------------------------------------


def rejects_table(source: str, lines: pa.Array, text: pa.Array, reason) -> pa.Table:
    """Reject rows (:data:`hmn.formats.parsed.REJECT_SCHEMA`) of one source; ``reason`` one
    string for all or a string array."""
    n = len(lines)
    if isinstance(reason, str):
        reason = pa.array([reason] * n, pa.string())
    return pa.table(
        {
            "source": pa.array([source] * n, pa.string()),
            "line": lines,
            "text": text,
            "reason": reason,
        },
        schema=REJECT_SCHEMA,
    )


def resolve_names(name_sources, entity_keys: pa.Array):
    """Name per entity (first seen wins, sources in order).

    ``name_sources`` holds ``(path, table, write_rejects)``. Returns the name column, the skipped
    rows of the sources with ``write_rejects`` as reject tables ``[(path, table)]``, the skip
    counts per reason of the others (RDF dumps, which name far more entities than the KB holds)
    ``{path: {reason: n}}``, and the number of named entities.
    """
    E = len(entity_keys)
    if not name_sources:
        return pa.nulls(E, pa.string()), [], {}, 0
    tables = [t.select(["line", "entity", "name"]) for _, t, _ in name_sources]
    names = pa.concat_tables(tables).combine_chunks()
    eid = key_ids(_column(names, "entity"), entity_keys)
    in_kb = eid >= 0
    rows_in_kb = np.flatnonzero(in_kb)
    _, first = np.unique(eid[rows_in_kb], return_index=True)
    winner_rows = rows_in_kb[first]
    dup = in_kb.copy()
    dup[winner_rows] = False
    row_of_entity = np.full(E, -1, dtype=np.int64)
    row_of_entity[eid[winner_rows]] = winner_rows
    name_col = _column(names, "name").take(pa.array(row_of_entity, mask=row_of_entity < 0))

    offsets = np.concatenate([[0], np.cumsum([t.num_rows for t in tables])])
    skipped, counts = [], {}
    for i, (path, table, write_rejects) in enumerate(name_sources):
        lo, hi = offsets[i], offsets[i + 1]
        for mask, reason in ((~in_kb[lo:hi], SKIP_NOT_IN_KB), (dup[lo:hi], SKIP_DUPLICATE_NAME)):
            if not mask.any():
                continue
            if write_rejects:
                rows = table.filter(pa.array(mask))
                text = _column(rows, "text")
                skipped.append((path, rejects_table(path, _column(rows, "line"), text, reason)))
            else:
                per = counts.setdefault(path, {})
                per[reason] = per.get(reason, 0) + int(mask.sum())
    return name_col, skipped, counts, len(winner_rows)


@dataclass(frozen=True)
class KeyTables:
    """A knowledge base's keys, as questions are resolved against them: ``entity_keys`` (E,)
    and ``relation_keys`` (R,) canonical keys, id = position; ``fact_pairs`` (F,) the sorted
    ``subject_id * R + relation_id`` codes of the facts; ``fact_ids`` (F,) the fact id of each
    pair (None: the position, as in the ingest's fact table, sorted by subject and relation)."""

    entity_keys: pa.Array
    relation_keys: pa.Array
    fact_pairs: np.ndarray
    fact_ids: np.ndarray | None = None

    @classmethod
    def from_facts(cls, entity_keys, relation_keys, fact_subject, fact_relation) -> KeyTables:
        """From key sequences (any order of facts; ``fact_subject`` / ``fact_relation`` (F,)
        ids per fact id, e.g. ``pipeline.artifacts.KnowledgeBase``'s)."""
        ent, rel = (keys if isinstance(keys, pa.Array) else pa.array(np.asarray(keys, object),
                                                                       pa.string())
                    for keys in (entity_keys, relation_keys))  # fmt: skip
        pairs = np.asarray(fact_subject, dtype=np.int64) * len(rel) + np.asarray(
            fact_relation, dtype=np.int64
        )
        if len(pairs) < 2 or (pairs[1:] > pairs[:-1]).all():
            return cls(ent, rel, pairs)
        order = np.argsort(pairs, kind="stable")
        return cls(ent, rel, pairs[order], order.astype(np.int64))


@dataclass(frozen=True)
class QuestionMatch:
    """Question rows resolved against :class:`KeyTables`, each (Q,) int64 with -1 for not
    found: ``subject_id``, ``relation_id``, ``fact_id``. ``reasons`` holds, for the rows without
    a fact only (in row order), the ingest's reject reason: "unknown relation '<key>'", else
    "unknown subject '<key>'", else "no fact (<subject>, <relation>) in the knowledge base"."""

    subject_id: np.ndarray
    relation_id: np.ndarray
    fact_id: np.ndarray
    reasons: pa.Array

    @property
    def found(self) -> np.ndarray:
        """(Q,) bool: the row's fact is in the knowledge base."""
        return self.fact_id >= 0

    @property
    def no_fact(self) -> np.ndarray:
        """(Q,) bool: subject and relation are known, their pair is not a fact."""
        return (self.fact_id < 0) & (self.subject_id >= 0) & (self.relation_id >= 0)


def match_questions(subject: pa.Array, relation: pa.Array, kb: KeyTables) -> QuestionMatch:
    """Resolve parsed question rows (canonical ``subject`` and ``relation`` keys, e.g. the
    columns of :func:`hmn.formats.questions.parse_questions`) to entity, relation and fact ids
    of ``kb``, with a reject reason for each row without a fact (:class:`QuestionMatch`)."""
    if isinstance(subject, pa.ChunkedArray):
        subject = subject.combine_chunks()
    if isinstance(relation, pa.ChunkedArray):
        relation = relation.combine_chunks()
    R, pairs = len(kb.relation_keys), kb.fact_pairs
    sid, rid = key_ids(subject, kb.entity_keys), key_ids(relation, kb.relation_keys)
    code = np.where((sid >= 0) & (rid >= 0), sid * R + rid, -1)
    pos = np.minimum(np.searchsorted(pairs, code), max(len(pairs) - 1, 0))
    found = (code >= 0) & (len(pairs) > 0)
    if len(pairs):
        found &= pairs[pos] == code
    fact_id = np.where(found, pos if kb.fact_ids is None else kb.fact_ids[pos], -1)
    bad = np.flatnonzero(~found)
    reasons = pa.array([], pa.string())
    if len(bad):
        take = pa.array(bad)
        subj, rel = subject.take(take), relation.take(take)
        reasons = pc.if_else(
            pa.array(rid[bad] < 0),
            pc.binary_join_element_wise("unknown relation '", rel, "'", ""),
            pc.if_else(
                pa.array(sid[bad] < 0),
                pc.binary_join_element_wise("unknown subject '", subj, "'", ""),
                pc.binary_join_element_wise(
                    "no fact (", subj, ", ", rel, ") in the knowledge base", ""
                ),
            ),
        )
    return QuestionMatch(sid, rid, fact_id, reasons)


def resolve_questions(path: str, table: pa.Table, kb: KeyTables, answers: np.ndarray):
    """The questions of one source with dense ids (:data:`KB_QUESTIONS_SCHEMA`), the rejects
    of those whose fact is not in the KB (None when none), and counts for the stats.
    ``table``: parsed question rows with their raw line (``text``); ``answers``: the sorted
    (fact, object) codes of :func:`answer_codes`."""
    E = len(kb.entity_keys)
    match = match_questions(_column(table, "subject"), _column(table, "relation"), kb)
    found = match.found
    rejects = None
    if not found.all():
        rows = table.filter(pa.array(~found))
        rejects = rejects_table(path, _column(rows, "line"), _column(rows, "text"), match.reasons)
    oid = key_ids(_column(table, "object"), kb.entity_keys)
    ok = table.filter(pa.array(found))
    oid_ok, fid_ok = oid[found], match.fact_id[found]
    questions = pa.table(
        {
            "question": _column(ok, "question"),
            "fact_id": pa.array(fid_ok),
            "subject_id": pa.array(match.subject_id[found]),
            "relation_id": pa.array(match.relation_id[found]),
            "object_id": pa.array(oid_ok, mask=oid_ok < 0),
            "source": pa.array([path] * ok.num_rows, pa.string()),
            "line": _column(ok, "line"),
        },
        schema=KB_QUESTIONS_SCHEMA,
    )
    known = oid_ok >= 0
    ans = fid_ok[known] * E + oid_ok[known]
    # membership by binary search (np.isin is slow on numpy 2.4's hash path)
    pos = np.minimum(np.searchsorted(answers, ans), max(len(answers) - 1, 0))
    in_fact = (answers[pos] == ans) if len(answers) else np.zeros(len(ans), bool)
    info = {
        "object_not_in_kb": int((~known).sum()),
        "answer_not_in_fact": int((~in_fact).sum()),
        "no_fact": int(match.no_fact.sum()),
    }
    return questions, rejects, info
