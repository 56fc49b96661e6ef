"""The ingest's fast path for grouped facts: chunk-local dense ids instead of string tables.

:func:`parse_grouped_coded` takes a clean chunk of grouped facts (or triples) whose keys are all
machine ids in one spelling per column and returns :class:`CodedFacts` (keys as :mod:`hmn.ids`
codes, rows sorted by (subject, relation, line)), or None whenever a line needs the careful
parser (:func:`hmn.formats.grouped.parse_grouped_bytes`, same result plus rejects), whose table
:func:`code_facts` turns into the same :class:`CodedFacts`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hmn import ids
from hmn.formats.grouped import FACT_LINES_SCHEMA, read_three_fields
from hmn.formats.keys import normalize_keys
from hmn.formats.lines import ByteChunk, count_lines
from hmn.formats.parsed import REJECT_SCHEMA, FormatError, Parsed

__all__ = ["CodedFacts", "code_facts", "parse_grouped_coded"]


@dataclass
class CodedFacts:
    """A chunk's fact rows with chunk-local dense ids (what the ingest stage merges into global
    ids): ``entities`` are the chunk's distinct entity keys, sorted: int64 machine-id codes
    (:mod:`hmn.ids`) when every key is a machine id, else canonical strings; ``relations`` the
    sorted distinct relation keys; per row ``subject`` and ``relation`` (int32 positions in
    those), ``offsets`` (int32, rows + 1) into ``objects`` (int32 positions in ``entities``, in
    file order within a row). Rows are sorted by (subject, relation, line), i.e. in the order of
    the facts they make (:meth:`sorted`), so that the ingest stage merges the chunks' sorted runs
    instead of sorting all rows; ``repeats`` is True when a row lists one object twice.

    ``starts`` (int64, one per row), when set, says that the rows were sorted without moving
    their objects: row i's objects are ``objects[starts[i] : starts[i] + offsets[i+1] -
    offsets[i]]`` (the ingest stage gathers them once, in fact order);
    :meth:`with_objects_moved` gives the plain layout."""

    entities: np.ndarray | pa.Array
    relations: pa.Array
    subject: np.ndarray
    relation: np.ndarray
    offsets: np.ndarray
    objects: np.ndarray
    repeats: bool = False
    starts: np.ndarray | None = None

    def sorted(self, by_subject: np.ndarray | None = None, *, move_objects: bool = True) -> CodedFacts:
        """The rows in (subject, relation, line) order, objects moved along (or, without
        ``move_objects``, left in place and located by ``starts``); ``repeats`` set.
        One sort of packed ``subject | relation | row`` integers; ``by_subject`` (the rows
        in subject order, lines ascending within a subject) makes that a cheap merge sort of
        nearly sorted keys."""
        if self.starts is not None:
            return self.with_objects_moved().sorted(by_subject, move_objects=move_objects)
        n = len(self.subject)
        lens = np.diff(self.offsets).astype(np.int64)
        repeats = _row_repeats(lens, self.offsets, self.objects, len(self.entities))
        sb, rb, nb = (max(1, int(x - 1).bit_length()) for x in
                      (len(self.entities), len(self.relations), n))  # fmt: skip
        if sb + rb + nb <= 63:
            if by_subject is None:
                key = self.subject.astype(np.int64)
                key <<= rb + nb
                key |= self.relation.astype(np.int64) << nb
                key |= np.arange(n, dtype=np.int64)
            else:
                key = (self.subject[by_subject].astype(np.int64) << (rb + nb)) | (
                    self.relation[by_subject].astype(np.int64) << nb)  # fmt: skip
                key |= by_subject
            key.sort(kind="stable" if by_subject is not None else "quicksort")
            order = key & ((1 << nb) - 1)
            subject = (key >> (rb + nb)).astype(np.int32)
            relation = ((key >> nb) & ((1 << rb) - 1)).astype(np.int32)
        else:
            order = np.lexsort((self.relation, self.subject))  # stable
            subject, relation = self.subject[order], self.relation[order]
        if n and (order[1:] > order[:-1]).all():  # already in order
            return CodedFacts(self.entities, self.relations, self.subject, self.relation,
                              self.offsets, self.objects, repeats)  # fmt: skip
        lens = lens[order]
        offsets = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        if not move_objects:
            return CodedFacts(self.entities, self.relations, subject, relation,
                              offsets.astype(np.int32), self.objects, repeats,
                              starts=self.offsets[:-1][order].astype(np.int64))  # fmt: skip
        gather = np.repeat(self.offsets[:-1][order].astype(np.int64) - offsets[:-1], lens)
        gather += np.arange(offsets[-1], dtype=np.int64)
        return CodedFacts(self.entities, self.relations, subject, relation,
                          offsets.astype(np.int32), self.objects[gather], repeats)  # fmt: skip

    def with_objects_moved(self) -> CodedFacts:
        """The same rows with ``objects`` in row order (``starts`` None)."""
        if self.starts is None:
            return self
        lens = np.diff(self.offsets).astype(np.int64)
        gather = np.repeat(self.starts - self.offsets[:-1].astype(np.int64), lens)
        gather += np.arange(int(self.offsets[-1]), dtype=np.int64)
        return CodedFacts(self.entities, self.relations, self.subject, self.relation,
                          self.offsets, self.objects[gather], self.repeats)  # fmt: skip

    @property
    def rows(self) -> int:
        return len(self.subject)

    def to_table(self) -> pa.Table:
        """One row of list columns (zero-copy views of the arrays, objects in row order), for
        transport."""
        if self.starts is not None:
            return self.with_objects_moved().to_table()

        def one(values) -> pa.Array:
            values = values if isinstance(values, pa.Array) else pa.array(values)
            return pa.ListArray.from_arrays(pa.array([0, len(values)], pa.int32()), values)

        return pa.table(
            {
                "entities": one(self.entities),
                "relations": one(self.relations),
                "subject": one(self.subject),
                "relation": one(self.relation),
                "offsets": one(self.offsets),
                "objects": one(self.objects),
                "repeats": pa.array([self.repeats]),
            }
        )

    @classmethod
    def from_table(cls, table: pa.Table) -> CodedFacts:
        def col(name: str) -> pa.Array:
            return table.column(name).chunk(0).values

        ent = col("entities")
        return cls(
            entities=ent.to_numpy() if pa.types.is_integer(ent.type) else ent,
            relations=col("relations"),
            **{k: col(k).to_numpy() for k in ("subject", "relation", "offsets", "objects")},
            repeats=bool(table.column("repeats")[0].as_py()),
        )


def _row_repeats(lens: np.ndarray, offsets: np.ndarray, objects: np.ndarray, n_ids: int) -> bool:
    """True when some row lists one object twice. Rows of two objects compare their two ids;
    only rows of three or more sort their (row, object) codes."""
    two = offsets[:-1][lens == 2].astype(np.int64)
    if (objects[two] == objects[two + 1]).any():
        return True
    more = np.flatnonzero(lens > 2)
    if not len(more):
        return False
    k = lens[more]
    starts = np.repeat(offsets[more].astype(np.int64), k)
    inner = np.arange(k.sum(), dtype=np.int64) - np.repeat(np.cumsum(k) - k, k)
    codes = np.repeat(np.arange(len(more), dtype=np.int64), k) * n_ids + objects[starts + inner]
    codes.sort()
    return bool((codes[1:] == codes[:-1]).any())


def _sorted_codes(keys: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """(sorted distinct strings, int32 position of each key among them) by hashing."""
    enc = keys.dictionary_encode()
    order = pc.sort_indices(enc.dictionary).to_numpy()
    rank = np.empty(len(order), dtype=np.int32)
    rank[order] = np.arange(len(order), dtype=np.int32)
    return enc.dictionary.take(pa.array(order)), rank[enc.indices.to_numpy(zero_copy_only=False)]


def code_facts(table: pa.Table) -> CodedFacts:
    """:class:`CodedFacts` of a parsed facts table (``FACT_LINES_SCHEMA``, string or
    dictionary-encoded keys, no nulls; rows in line order), rows sorted."""
    objects = table.column("objects").combine_chunks()
    subject = table.column("subject").combine_chunks().cast(pa.string())
    flat = pc.list_flatten(objects).cast(pa.string())
    keys = pa.concat_arrays([subject, flat])
    codes = ids.mid_codes(keys)
    if (codes >= 0).all():
        entities, inverse = ids.local_unique(codes)
    else:
        entities, inverse = _sorted_codes(keys)
    relations, relation = _sorted_codes(table.column("relation").combine_chunks().cast(pa.string()))
    n = len(subject)
    offsets = np.frombuffer(objects.offsets.buffers()[1], dtype=np.int32)
    offsets = offsets[objects.offset : objects.offset + n + 1]
    return CodedFacts(
        entities=entities,
        relations=relations,
        subject=inverse[:n],
        relation=relation.astype(np.int32),
        offsets=(offsets - offsets[0]).astype(np.int32),
        objects=inverse[n:],
    ).sorted()


class _MappedRange:
    """Bytes ``[start, end)`` of a file, memory-mapped (or given bytes): ``find`` and a
    zero-copy pyarrow buffer without reading the range into a bytes object."""

    def __init__(self, chunk: ByteChunk | None, data: bytes | None = None):
        if chunk is None:
            self._mm, self.start, self.size = data, 0, len(data)
            return
        import mmap

        self.start, self.size = chunk.byte_start, chunk.byte_end - chunk.byte_start
        if os.path.getsize(chunk.path) < chunk.byte_end:
            raise FormatError(chunk.path, None, "file changed while reading (shorter)")
        with open(chunk.path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self.size else b""

    def find(self, sub: bytes) -> int:
        return self._mm.find(sub, self.start, self.start + self.size)

    def buffer(self) -> pa.Buffer:
        return pa.py_buffer(self._mm).slice(self.start, self.size)

    def to_bytes(self) -> bytes:
        return bytes(self._mm[self.start : self.start + self.size])


def _one_chunk(col: pa.ChunkedArray) -> pa.Array:
    return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()


def _read_coded_csv(data: bytes | ByteChunk) -> pa.Table | None:
    """The columns ``s``, ``p`` (dictionary-encoded) and ``o`` of every line of ``data`` (bytes,
    or a byte range read through a memory map) by pyarrow's CSV reader, without its UTF-8
    check; None when a line needs the careful path (a wrong field count, an empty field, a
    U+FFFD, a lone ``\r``)."""
    if isinstance(data, ByteChunk):  # memory-mapped: the page cache is read in place
        view = _MappedRange(data)
    else:
        view = _MappedRange(None, data)
    if not view.size or (view.find(b"\xef") >= 0 and view.find(b"\xef\xbf\xbd") >= 0):
        return None  # U+FFFD: the careful path rejects it as invalid UTF-8
    # the CSV reader also ends rows at a lone "\r": then count the lines to compare
    n_lines = count_lines(view.to_bytes()) if view.find(b"\r") >= 0 else -1
    # UTF-8 is checked later: every byte of a key is a prefix byte or a machine-id character
    # (hmn.ids), and the distinct relation spellings are validated
    table = read_three_fields(
        view.buffer(), view.size + 1,
        {"s": pa.string(), "p": pa.dictionary(pa.int32(), pa.string()), "o": pa.string()},
        check_utf8=False,
    )
    if table is None or (n_lines >= 0 and table.num_rows != n_lines):
        return None
    return table


def _entity_ids(s: pa.Array, o_keys: pa.Array):
    """``(sorted distinct entity codes, subject positions, object positions, rows by subject or
    None)`` of raw machine-id keys of one spelling per column, or None when some key is not
    such a key. Keys of up to 8 characters are hashed (:func:`hmn.ids.window_ids`), longer ones
    coded and sorted (:func:`hmn.ids.local_unique`, which also gives the rows in subject order,
    lines ascending within a subject)."""
    n = len(s)
    hashed = ids.window_ids([s, o_keys])  # keys of up to 8 characters: hashed, not sorted
    if hashed is not None:
        entities, (subject, objects) = hashed
        return entities, subject, objects, None
    # longer keys are coded by utf8 kernels: their bytes must be valid UTF-8 first
    if not (_valid_utf8(s) and _valid_utf8(o_keys)):
        return None
    s_codes = ids.prefixed_mid_codes(s)
    o_codes = None if s_codes is None else ids.prefixed_mid_codes(o_keys)
    if o_codes is None:
        return None
    entities, inverse, order = ids.local_unique(np.concatenate([s_codes, o_codes]),
                                                return_order=True)  # fmt: skip
    by_subject = order[order < n]  # rows by subject code, lines ascending within a subject
    return entities, inverse[:n], inverse[n:], by_subject


def parse_grouped_coded(
    data: bytes | ByteChunk, source: str, *, single_object: bool = False
) -> tuple[CodedFacts, Parsed] | None:
    """The fast path of the ingest stage for a chunk of grouped facts (or triples) in which every
    line is clean and every key a machine id in one spelling per column (``www.freebase.com/m/``,
    ``/m/`` or ``m.``): pyarrow's CSV reader tokenises the bytes (TAB, no quoting; relations
    dictionary-encoded, so each distinct relation is normalised once), keys become
    :mod:`hmn.ids` codes, and the chunk's entities get local dense ids by one sort.

    Returns ``(coded facts, Parsed with no table rows and no rejects)``, lines numbered from 1,
    or None when any line needs the careful path (:func:`parse_grouped_bytes`, same result):
    a wrong field count, an empty line or field, a ``\r``, invalid UTF-8, a key in another
    spelling, an invalid key, or (``single_object``) a line with several objects.
    """
    table = _read_coded_csv(data)
    if table is None:
        return None
    n_lines = table.num_rows
    s, p, o = (_one_chunk(table.column(c)) for c in "spo")
    if not _valid_utf8(p.dictionary):
        return None
    # relations: each distinct spelling once
    rel_keys = normalize_keys(p.dictionary)
    if rel_keys.null_count or not _all_canonical_relations(p.dictionary, rel_keys):
        return None
    relations, rel_rank = _sorted_codes(rel_keys)
    relation = rel_rank[p.indices.to_numpy(zero_copy_only=False)]
    # objects: split on single spaces; an empty piece (extra whitespace) fails the key check
    obj_lists = None if single_object else pc.split_pattern(o, " ")
    o_keys = o if single_object else pc.list_flatten(obj_lists)
    n = len(s)
    found = _entity_ids(s, o_keys)
    if found is None:
        return None
    entities, subject, objects, by_subject = found
    if obj_lists is None:
        offsets = np.arange(n + 1, dtype=np.int32)
    else:
        offsets = np.frombuffer(obj_lists.buffers()[1], dtype=np.int32)
        offsets = offsets[obj_lists.offset : obj_lists.offset + n + 1]
        offsets = (offsets - offsets[0]).astype(np.int32)
    # the objects stay in line order: the ingest stage gathers them once, in fact order
    coded = CodedFacts(entities, relations, subject, relation.astype(np.int32), offsets,
                       objects).sorted(by_subject, move_objects=False)  # fmt: skip
    empty = pa.table(
        {
            "line": pa.array([], pa.int64()),
            "subject": pa.array([], pa.string()),
            "relation": pa.array([], pa.string()),
            "objects": pa.array([], pa.list_(pa.string())),
        },
        schema=FACT_LINES_SCHEMA,
    )
    return coded, Parsed(empty, REJECT_SCHEMA.empty_table(), n_lines)


def _valid_utf8(arr: pa.Array) -> bool:
    """True when every string of ``arr`` (read without the CSV reader's UTF-8 check) is valid
    UTF-8."""
    try:
        arr.validate(full=True)
    except pa.ArrowInvalid:
        return False
    return True


def _all_canonical_relations(raw: pa.Array, keys: pa.Array) -> bool:
    """True when no relation spelling is an empty field (the careful path rejects those)."""
    return bool(pc.all(pc.greater(pc.binary_length(raw), 0)).as_py() is not False)
