"""Readers for the original text formats of the data sets (Freebase dumps, SimpleQuestions, names,
embeddings), vectorised with ``pyarrow.compute``.

Every reader works on a chunk of lines (a ``pa.StringArray``) and returns a :class:`Parsed`
record: the accepted rows as a table plus one reject row per bad line (``REJECT_SCHEMA``), so that
``lines == table.num_rows + rejects.num_rows`` always holds and nothing is dropped silently.

Formats (fields separated by one TAB, one record per line):

* grouped facts (FB2M / FB5M / SimpleQuestions ``kb.txt``): ``subject  relation  obj1 obj2 ...``
  (objects separated by spaces);
* SimpleQuestions questions: ``subject  relation  object  question``;
* names: ``entity  name``;
* plain triples (FB15k-237): ``head  relation  tail`` (:func:`parse_triples`);
* the Freebase RDF dump (N-Triples, :func:`parse_rdf`): entity-to-entity facts of chosen
  predicates and English names, everything else counted as skipped per reason;
* embedding text: ``key<TAB>v1 v2 ... vD`` or ``key v1 ... vD``, optionally preceded by a word2vec
  header line ``count D`` (other embedding formats: :mod:`hmn.embedding_files`).

Large plain files are read in byte ranges of whole lines (:func:`plan_byte_chunks`, no scan);
:func:`parse_grouped_coded` is the fast path for clean chunks of grouped facts with machine-id
keys: it returns chunk-local dense ids (:class:`CodedFacts`, keys as :mod:`hmn.ids` codes)
instead of string tables, and None whenever a line needs the careful parsers above.

:func:`detect_format` guesses a file's format from its first lines.

Freebase keys come in several spellings; :func:`normalize_key` maps all of them to the canonical
slash form (``/m/0abc``, ``/people/person/place_of_birth``).

Files may be plain, gzip (``.gz``), bzip2 (``.bz2``) or xz (``.xz``) compressed.
"""

from __future__ import annotations

import bz2
import gzip
import io
import logging
import lzma
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hmn import ids

logger = logging.getLogger(__name__)

__all__ = [
    "FormatError",
    "REJECT_SCHEMA",
    "FACTS_SCHEMA",
    "QUESTIONS_SCHEMA",
    "NAMES_SCHEMA",
    "Parsed",
    "LineChunk",
    "normalize_key",
    "normalize_keys",
    "open_text",
    "iter_line_chunks",
    "plan_line_chunks",
    "read_line_chunk",
    "parse_grouped_facts",
    "parse_questions",
    "parse_names",
    "parse_triples",
    "parse_grouped_bytes",
    "read_chunk_bytes",
    "ByteChunk",
    "plan_byte_chunks",
    "read_byte_chunk",
    "CodedFacts",
    "code_facts",
    "parse_grouped_coded",
    "parse_rdf",
    "is_entity_key",
    "detect_format",
    "resolve_format",
    "sniff_lines",
    "FACT_FORMATS",
    "NAME_FORMATS",
    "QUESTION_FORMATS",
    "RDF_NAME_PREDICATE",
    "RDF_SKIP_REASONS",
    "read_embedding_text",
]


class FormatError(ValueError):
    """A file does not follow its format; the message names the file and the line number."""

    def __init__(self, source: str, line: int | None, message: str):
        self.source = source
        self.line = line
        where = f"{source}:{line}" if line is not None else source
        super().__init__(f"{where}: {message}")


REJECT_SCHEMA = pa.schema(
    [("source", pa.string()), ("line", pa.int64()), ("text", pa.string()), ("reason", pa.string())]
)
FACTS_SCHEMA = pa.schema(
    [
        ("line", pa.int64()),
        ("subject", pa.string()),
        ("relation", pa.string()),
        ("objects", pa.list_(pa.string())),
    ]
)
QUESTIONS_SCHEMA = pa.schema(
    [
        ("line", pa.int64()),
        ("subject", pa.string()),
        ("relation", pa.string()),
        ("object", pa.string()),
        ("question", pa.string()),
    ]
)
NAMES_SCHEMA = pa.schema([("line", pa.int64()), ("entity", pa.string()), ("name", pa.string())])

# --------------------------------------------------------------------------------------------
# Key normalisation
# --------------------------------------------------------------------------------------------

# <http://rdf.freebase.com/ns/m.0abc> (brackets optional) -> m.0abc (dotted, converted below)
_RDF_RE = (
    r"^(?:<(?:https?://)?rdf\.freebase\.com/ns/([^<>\s]+)>"
    r"|(?:https?://)?rdf\.freebase\.com/ns/([^<>\s]+))$"
)
# www.freebase.com/m/0abc, http://www.freebase.com/m/0abc, freebase.com/m/0abc -> /m/0abc
_WWW_RE = r"^(?:https?://)?(?:www\.)?freebase\.com(/.*)$"
# m.0abc, people.person.place_of_birth (at least two dot-separated parts, no slash)
_DOTTED_RE = r"^[A-Za-z0-9_$\-]+(?:\.[A-Za-z0-9_$\-]+)+$"
# canonical form: a slash, then non-empty segments without whitespace; no empty segment, no
# trailing slash (FB15k-237 paths such as /a/b/c./d/e/f are valid)
_CANONICAL_RE = r"^(?:/[^\s\p{Z}/<>]+)+$"


def normalize_keys(arr: pa.Array | pa.ChunkedArray, *, dictionary: bool = False) -> pa.Array:
    """Normalise Freebase keys to the canonical slash form, vectorised.

    ``www.freebase.com/m/0abc``, ``/m/0abc``, ``m.0abc`` and ``<http://rdf.freebase.com/ns/m.0abc>``
    all become ``/m/0abc`` (likewise for relations). A key that already starts with ``/`` is kept
    as it is. Surrounding whitespace is removed. Empty, null or otherwise invalid keys become null.

    Each distinct spelling is normalised once (dictionary encoding), and the common spellings
    (``www.freebase.com/...`` and ``/...``) take a regex-free path, so the cost is one hash
    lookup per key plus the regex work on the distinct unusual ones.

    With ``dictionary=True`` the result is that dictionary encoding itself (a
    ``DictionaryArray``: int32 indices, null where the key is invalid, into the normalised
    distinct spellings, which may repeat a key and may hold unreferenced nulls), for callers that
    assign ids by dictionary (the ingest stage) rather than by string.
    """
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if not pa.types.is_string(arr.type):
        arr = arr.cast(pa.string())
    if len(arr) >= 64 or dictionary:
        enc = arr.dictionary_encode()
        norm = _normalize_distinct(enc.dictionary)
        if not dictionary:
            return norm.take(enc.indices)
        indices = enc.indices
        if norm.null_count:
            invalid = pc.fill_null(pc.take(pc.is_null(norm), indices), True)
            indices = pc.if_else(invalid, pa.scalar(None, indices.type), indices)
        return pa.DictionaryArray.from_arrays(indices, norm)
    return _normalize_distinct(arr)


def _normalize_distinct(arr: pa.Array) -> pa.Array:
    """:func:`normalize_keys` without the dictionary step: a fast path for the two common
    spellings, the full regex path (:func:`_normalize_full`) for everything else."""
    www = pc.starts_with(arr, "www.freebase.com/")
    keys = pc.if_else(www, pc.utf8_slice_codeunits(arr, 16), arr)
    valid = pc.fill_null(pc.match_substring_regex(keys, _CANONICAL_RE), False)
    if pc.all(valid).as_py() is not False:
        return keys
    bad = pc.invert(valid)
    fixed = _normalize_full(arr.filter(bad))
    return pc.replace_with_mask(keys, bad, fixed)


def _normalize_full(arr: pa.Array) -> pa.Array:
    keys = pc.utf8_trim_whitespace(arr)
    keys = pc.replace_substring_regex(keys, _RDF_RE, r"\1\2")
    keys = pc.replace_substring_regex(keys, _WWW_RE, r"\1")
    dotted = pc.fill_null(
        pc.and_(pc.invert(pc.starts_with(keys, "/")), pc.match_substring_regex(keys, _DOTTED_RE)),
        False,
    )
    slashed = pc.binary_join_element_wise("/", pc.replace_substring(keys, ".", "/"), "")
    keys = pc.if_else(dotted, slashed, keys)
    valid = pc.fill_null(pc.match_substring_regex(keys, _CANONICAL_RE), False)
    return pc.if_else(valid, keys, pa.scalar(None, keys.type))


def normalize_key(raw: str) -> str:
    """Normalise one Freebase key (see :func:`normalize_keys`); raise ``ValueError`` if invalid."""
    if raw is None or not raw.strip():
        raise ValueError("empty key")
    out = normalize_keys(pa.array([raw], pa.string()))[0].as_py()
    if out is None:
        raise ValueError(f"invalid key {raw!r}")
    return out


# --------------------------------------------------------------------------------------------
# Reading lines
# --------------------------------------------------------------------------------------------

_BLOCK_BYTES = 16 << 20
_COMPRESSED_SUFFIXES = (".gz", ".bz2", ".xz")


def is_compressed(path: str) -> bool:
    """True when ``open_text`` decompresses ``path`` (by its extension)."""
    return str(path).endswith(_COMPRESSED_SUFFIXES)


def open_text(path: str) -> io.BufferedIOBase:
    """Open ``path`` for binary reading, decompressing ``.gz``/``.bz2``/``.xz`` by extension."""
    path = str(path)
    if path.endswith(".gz"):
        return gzip.open(path, "rb")
    if path.endswith(".bz2"):
        return bz2.open(path, "rb")
    if path.endswith(".xz"):
        return lzma.open(path, "rb")
    return open(path, "rb")


def _bytes_to_lines(data: bytes) -> pa.Array:
    """Split a byte string of complete lines into a string array of lines.

    ``data`` holds N lines separated by ``\\n`` (no terminator after the last). A trailing
    ``\\r`` is removed from each line. Invalid UTF-8 is decoded with U+FFFD replacement
    characters, which the parsers reject as "invalid UTF-8".
    """
    raw = pc.list_flatten(pc.split_pattern(pa.array([data], pa.binary()), "\n"))
    try:
        lines = raw.cast(pa.string())
    except pa.ArrowInvalid:
        # slow path, only for blocks that contain invalid UTF-8
        lines = pa.array(
            [b.decode("utf-8", errors="replace") for b in raw.to_pylist()], pa.string()
        )
    return pc.utf8_rtrim(lines, "\r")


def _concat(arrays: list[pa.Array]) -> pa.Array:
    if not arrays:
        return pa.array([], pa.string())
    return pa.concat_arrays(arrays) if len(arrays) > 1 else arrays[0]


def iter_line_chunks(path: str, chunk_lines: int = 1_000_000) -> Iterator[tuple[int, pa.Array]]:
    """Stream ``path`` as ``(first 1-based line number, string array of up to chunk_lines lines)``.

    Lines have no ``\\n``/``\\r`` terminator. Every line counts, empty ones included; a final
    trailing newline does not make an extra line. Memory stays bounded by one chunk plus one
    read block. Invalid UTF-8 never raises (see :func:`_bytes_to_lines`).
    """
    if chunk_lines < 1:
        raise ValueError(f"chunk_lines={chunk_lines}: must be >= 1")
    pending: list[pa.Array] = []
    pending_n = 0
    next_line = 1
    carry = b""
    with open_text(path) as f:
        while True:
            block = f.read(_BLOCK_BYTES)
            if not block:
                break
            data = carry + block if carry else block
            cut = data.rfind(b"\n")
            if cut < 0:
                carry = data
                continue
            carry = data[cut + 1 :]
            lines = _bytes_to_lines(data[:cut])
            pending.append(lines)
            pending_n += len(lines)
            while pending_n >= chunk_lines:
                merged = _concat(pending)
                yield next_line, merged.slice(0, chunk_lines)
                next_line += chunk_lines
                rest = merged.slice(chunk_lines)
                pending = [rest] if len(rest) else []
                pending_n = len(rest)
    if carry:
        pending.append(_bytes_to_lines(carry))
        pending_n += 1
    if pending_n:
        merged = _concat(pending)
        for start in range(0, pending_n, chunk_lines):
            yield next_line + start, merged.slice(start, chunk_lines)


@dataclass(frozen=True)
class LineChunk:
    """A run of whole lines of one file: ``lines`` lines from byte ``byte_start`` (inclusive) to
    ``byte_end`` (exclusive), the first being line ``first_line`` (1-based).

    For a compressed file the byte offsets are unknown: one chunk with ``byte_end = -1`` and
    ``lines = -1`` stands for the whole file.
    """

    path: str
    first_line: int
    byte_start: int
    byte_end: int
    lines: int


def plan_line_chunks(path: str, chunk_lines: int = 1_000_000) -> list[LineChunk]:
    """Split a plain text file into chunks of ``chunk_lines`` whole lines by scanning newlines.

    Reads the file once (vectorised newline search, bounded memory) so that independent workers
    can each read their byte range with :func:`read_line_chunk`. A compressed file cannot be
    seeked and is returned as one whole-file chunk.
    """
    if chunk_lines < 1:
        raise ValueError(f"chunk_lines={chunk_lines}: must be >= 1")
    path = str(path)
    if is_compressed(path):
        return [LineChunk(path, 1, 0, -1, -1)]
    chunks: list[LineChunk] = []
    start = 0  # byte offset of the current chunk
    in_chunk = 0  # complete lines seen in the current chunk
    first_line = 1
    offset = 0  # byte offset of the current block
    last_byte = b""
    with open(path, "rb") as f:
        while True:
            block = f.read(_BLOCK_BYTES)
            if not block:
                break
            last_byte = block[-1:]
            newlines = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10)
            pos = 0  # index into newlines
            while pos < len(newlines):
                need = chunk_lines - in_chunk
                if len(newlines) - pos >= need:
                    end = offset + int(newlines[pos + need - 1]) + 1
                    chunks.append(LineChunk(path, first_line, start, end, chunk_lines))
                    first_line += chunk_lines
                    start, in_chunk = end, 0
                    pos += need
                else:
                    in_chunk += len(newlines) - pos
                    pos = len(newlines)
            offset += len(block)
    if last_byte and last_byte != b"\n":
        in_chunk += 1  # unterminated last line
    if in_chunk:
        chunks.append(LineChunk(path, first_line, start, offset, in_chunk))
    return chunks


def read_chunk_bytes(chunk: LineChunk) -> bytes:
    """The raw bytes of one :class:`LineChunk` of a plain file (whole lines)."""
    if chunk.byte_end < 0:
        raise ValueError(
            f"{chunk.path}: whole-file chunk of a compressed file; use iter_line_chunks"
        )
    with open(chunk.path, "rb") as f:
        f.seek(chunk.byte_start)
        return f.read(chunk.byte_end - chunk.byte_start)


def read_line_chunk(chunk: LineChunk) -> pa.Array:
    """Read the lines of one :class:`LineChunk` of a plain file as a string array."""
    if chunk.byte_end < 0:
        raise ValueError(
            f"{chunk.path}: whole-file chunk of a compressed file; use iter_line_chunks"
        )
    with open(chunk.path, "rb") as f:
        f.seek(chunk.byte_start)
        data = f.read(chunk.byte_end - chunk.byte_start)
    if data.endswith(b"\n"):
        data = data[:-1]
    lines = _bytes_to_lines(data)
    if len(lines) != chunk.lines:
        raise FormatError(
            chunk.path,
            chunk.first_line,
            f"expected {chunk.lines} lines in bytes {chunk.byte_start}..{chunk.byte_end}, "
            f"got {len(lines)} (file changed while reading?)",
        )
    return lines


@dataclass(frozen=True)
class ByteChunk:
    """Whole lines of one plain file: bytes ``byte_start`` (inclusive) to ``byte_end``
    (exclusive), cut at line ends. The line numbers are not known when planning (no scan of the
    file): a parser numbers the chunk's lines from 1 and the caller shifts them by the lines of
    the chunks before (their counts come back with the results)."""

    path: str
    byte_start: int
    byte_end: int


def plan_byte_chunks(path: str, chunk_bytes: int) -> list[ByteChunk]:
    """Cut a plain file into chunks of about ``chunk_bytes`` bytes of whole lines, without
    reading it: a cut at offset x moves to just after the first ``\n`` at or after x (one small
    read per cut). An empty file has no chunks."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes={chunk_bytes}: must be >= 1")
    path = str(path)
    size = os.path.getsize(path)
    cuts = [0]
    with open(path, "rb") as f:
        target = chunk_bytes
        while target < size:
            f.seek(target - 1)
            pos = target - 1
            while True:
                piece = f.read(1 << 16)
                if not piece:
                    pos = size
                    break
                nl = piece.find(b"\n")
                if nl >= 0:
                    pos += nl + 1
                    break
                pos += len(piece)
            if pos >= size:
                break
            if pos > cuts[-1]:
                cuts.append(pos)
            target = max(pos, cuts[-1]) + chunk_bytes
    cuts.append(size)
    return [ByteChunk(path, a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]


def read_byte_chunk(chunk: ByteChunk) -> bytes:
    """The raw bytes of one :class:`ByteChunk`."""
    with open(chunk.path, "rb") as f:
        f.seek(chunk.byte_start)
        data = f.read(chunk.byte_end - chunk.byte_start)
    if len(data) != chunk.byte_end - chunk.byte_start:
        raise FormatError(chunk.path, None, "file changed while reading (short read)")
    return data


def count_lines(data: bytes) -> int:
    """Lines in ``data`` (an unterminated last line counts; a final ``\n`` adds none)."""
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


def bytes_to_lines(data: bytes) -> pa.Array:
    """The lines of ``data`` (whole lines, as :func:`read_byte_chunk` returns them) as a string
    array, ``\r`` removed, invalid UTF-8 replaced by U+FFFD (see :func:`_bytes_to_lines`)."""
    if not data:
        return pa.array([], pa.string())
    return _bytes_to_lines(data[:-1] if data.endswith(b"\n") else data)


# --------------------------------------------------------------------------------------------
# Parsers
# --------------------------------------------------------------------------------------------


@dataclass
class Parsed:
    """Result of parsing a chunk of lines: accepted rows, one reject row per bad line, and the
    number of lines read.

    ``lines == table.num_rows + rejects.num_rows + sum(skipped.values()) + names rows``:
    ``skipped`` counts lines a filter left out on purpose (per reason; only the RDF reader has a
    filter) and ``names`` holds the English names an RDF file carries (``NAMES_SCHEMA``).
    """

    table: pa.Table
    rejects: pa.Table
    lines: int
    skipped: dict[str, int] = field(default_factory=dict)
    names: pa.Table | None = None

    def accounted(self) -> int:
        """Lines in the table, the rejects, the skip counts and the names (== ``lines``)."""
        n_names = self.names.num_rows if self.names is not None else 0
        return self.table.num_rows + self.rejects.num_rows + sum(self.skipped.values()) + n_names


class _NeedLines(Exception):
    """A fast path met a line to reject: redo the chunk on the line path."""


class _LineSieve:
    """Runs a chunk of lines through successive checks, keeping the rows that pass.

    ``idx`` holds the positions (in the chunk) of the rows still alive; each ``reject`` call
    removes the rows flagged by a boolean mask (over the alive rows) and records their reason.
    The first failing check decides a line's reason.
    """

    def __init__(self, lines: pa.Array | None, first_line: int, source: str, n: int = -1):
        if isinstance(lines, pa.ChunkedArray):
            lines = lines.combine_chunks()
        if lines is not None and not pa.types.is_string(lines.type):
            lines = lines.cast(pa.string())
        self.lines = lines  # None: a fast path without the line texts, which cannot reject
        self.first_line = int(first_line)
        self.source = source
        self.n = len(lines) if lines is not None else n
        self.idx = np.arange(self.n, dtype=np.int64)
        self._rej_idx: list[np.ndarray] = []
        self._rej_reason: list[pa.Array] = []
        self.skipped: dict[str, int] = {}

    def skip(self, mask: pa.Array | np.ndarray, reason: str) -> np.ndarray:
        """Drop the alive rows where ``mask`` is true, counting them under ``reason`` (a filter,
        not an error: no reject row); return the keep mask over the alive rows."""
        if isinstance(mask, (pa.Array, pa.ChunkedArray)):
            mask = pc.fill_null(mask, False).to_numpy(zero_copy_only=False)
        mask = np.asarray(mask, dtype=bool)
        n = int(mask.sum())
        if n:
            self.skipped[reason] = self.skipped.get(reason, 0) + n
            self.idx = self.idx[~mask]
        return ~mask

    def reject(self, mask: pa.Array | np.ndarray, reason: str | pa.Array) -> np.ndarray:
        """Drop the alive rows where ``mask`` is true with ``reason`` (a string, or a string array
        aligned with the alive rows); return the keep mask (numpy bool over the alive rows)."""
        if isinstance(mask, (pa.Array, pa.ChunkedArray)):
            mask = pc.fill_null(mask, False).to_numpy(zero_copy_only=False)
        mask = np.asarray(mask, dtype=bool)
        if mask.any():
            if self.lines is None:
                raise _NeedLines()
            self._rej_idx.append(self.idx[mask])
            if isinstance(reason, str):
                self._rej_reason.append(pa.array([reason] * int(mask.sum()), pa.string()))
            else:
                self._rej_reason.append(reason.filter(pa.array(mask)))
            self.idx = self.idx[~mask]
        return ~mask

    def rejects(self) -> pa.Table:
        if not self._rej_idx:
            return REJECT_SCHEMA.empty_table()
        idx = np.concatenate(self._rej_idx)
        reason = pa.concat_arrays(self._rej_reason)
        order = np.argsort(idx, kind="stable")
        idx = idx[order]
        return pa.table(
            {
                "source": pa.array([self.source] * len(idx), pa.string()),
                "line": pa.array(idx + self.first_line, pa.int64()),
                "text": self.lines.take(pa.array(idx)),
                "reason": reason.take(pa.array(order)),
            },
            schema=REJECT_SCHEMA,
        )

    def line_numbers(self) -> pa.Array:
        return pa.array(self.idx + self.first_line, pa.int64())


def _filter(arr: pa.Array, keep: np.ndarray) -> pa.Array:
    return arr.filter(pa.array(keep)) if not keep.all() else arr


def _may_contain_replacement(arr: pa.Array) -> bool:
    """Cheap pre-check: False when the data buffer has no 0xEF byte, so no U+FFFD (EF BF BD)."""
    if arr.null_count == len(arr) or len(arr) == 0:
        return False
    data = arr.buffers()[2]
    if data is None:
        return False
    return bool((np.frombuffer(data, dtype=np.uint8) == 0xEF).any())


def _split_fields(sieve: _LineSieve, n_fields: int) -> list[pa.Array]:
    """Common checks (invalid UTF-8, field count; empty lines get their own reason); return the
    fields of the alive rows, each a string array."""
    lines = sieve.lines
    if _may_contain_replacement(lines):
        keep = sieve.reject(pc.match_substring(lines, "\ufffd"), "invalid UTF-8")
        lines = _filter(lines, keep)
    parts = pc.split_pattern(lines, "\t")
    count = pc.list_value_length(parts).to_numpy(zero_copy_only=False)
    bad = count != n_fields
    if bad.any():
        # only the lines with a wrong field count can be empty (an empty line has one field)
        bad_pos = np.flatnonzero(bad)
        sub = lines.take(pa.array(bad_pos))
        empty_sub = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(sub)), 0)
        empty = np.zeros(len(bad), dtype=bool)
        empty[bad_pos] = empty_sub.to_numpy(zero_copy_only=False)
        keep = sieve.reject(empty, "empty line")
        count, bad = count[keep], bad[keep]
        parts = _filter(parts, keep)
        reason = pc.binary_join_element_wise(
            f"expected {n_fields} tab-separated fields, got ", pa.array(count).cast(pa.string()), ""
        )
        keep = sieve.reject(bad, reason)
        parts = _filter(parts, keep)
    flat = pc.list_flatten(parts)  # every alive row has exactly n_fields fields
    return [flat.take(pa.array(np.arange(i, len(flat), n_fields))) for i in range(n_fields)]


def _check_key(
    sieve: _LineSieve,
    fields: list[pa.Array],
    which: int,
    role: str,
    allow_empty: bool = False,
    dictionary: bool = False,
) -> list[pa.Array]:
    """Normalise ``fields[which]`` in place of the raw text and reject rows whose key is invalid
    ("invalid <role> key '...'"); return all fields filtered to the surviving rows. With
    ``allow_empty`` an empty field is kept as a null key; with ``dictionary`` the normalised
    field is dictionary-encoded (see :func:`normalize_keys`)."""
    raw = fields[which]
    keys = normalize_keys(raw, dictionary=dictionary)
    bad = pc.is_null(keys)
    if allow_empty:
        empty = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(raw)), 0)
        bad = pc.and_(bad, pc.invert(empty))
    bad = pc.fill_null(bad, False).to_numpy(zero_copy_only=False)
    if bad.any():  # the reason strings only for the rows that need them
        reason_np = np.empty(len(bad), dtype=object)
        reason_np[bad] = [f"invalid {role} key '{k}'" for k in raw.filter(pa.array(bad)).to_pylist()]
        keep = sieve.reject(bad, pa.array(reason_np, pa.string()))
    else:
        keep = np.ones(len(bad), dtype=bool)
    fields = [keys if i == which else f for i, f in enumerate(fields)]
    return [_filter(f, keep) for f in fields]


def parse_grouped_facts(
    lines: pa.Array,
    first_line: int,
    source: str,
    *,
    single_object: bool = False,
    dictionary: bool = False,
) -> Parsed:
    """Parse grouped facts ``subject<TAB>relation<TAB>obj1 obj2 ...``.

    With ``single_object`` (plain triples ``head<TAB>relation<TAB>tail``, as in FB15k-237) a line
    with more than one object is rejected ("expected one tail entity, got N"); the ingest stage
    groups the triples into facts by (head, relation). With ``dictionary`` the key columns are
    dictionary-encoded (``subject``, ``relation``: dictionary<int32, string>; ``objects``:
    list<dictionary<int32, string>>) for id assignment without hashing every string again.

    Table columns (``FACTS_SCHEMA``): ``line`` int64, ``subject`` string, ``relation`` string,
    ``objects`` list<string> (all keys normalised; objects in file order, as written).
    Reject reasons: "invalid UTF-8", "empty line", "expected 3 tab-separated fields, got N",
    "invalid entity key '...'", "invalid relation key '...'", "no objects".
    """
    sieve = _LineSieve(lines, first_line, source)
    fields = _split_fields(sieve, 3)
    return _grouped_from_fields(sieve, fields, single_object, dictionary)


def _grouped_from_fields(
    sieve: _LineSieve, fields: list[pa.Array], single_object: bool, dictionary: bool
) -> Parsed:
    fields = _check_key(sieve, fields, 0, "entity", dictionary=dictionary)
    fields = _check_key(sieve, fields, 1, "relation", dictionary=dictionary)
    subject, relation, objects_raw = fields
    objects_raw = pc.utf8_trim_whitespace(objects_raw)
    keep = sieve.reject(pc.equal(pc.utf8_length(objects_raw), 0), "no objects")
    subject, relation, objects_raw = (_filter(a, keep) for a in (subject, relation, objects_raw))

    obj_lists = pc.ascii_split_whitespace(objects_raw)
    if single_object:
        n_obj = pc.list_value_length(obj_lists)
        reason = pc.binary_join_element_wise(
            "expected one tail entity, got ", n_obj.cast(pa.string()), ""
        )
        keep = sieve.reject(pc.greater(n_obj, 1), reason)
        subject, relation, obj_lists = (_filter(a, keep) for a in (subject, relation, obj_lists))
    flat_raw = pc.list_flatten(obj_lists)
    flat = normalize_keys(flat_raw, dictionary=dictionary)
    bad_obj = pc.is_null(flat).to_numpy(zero_copy_only=False)
    if bad_obj.any():
        parents = pc.list_parent_indices(obj_lists).to_numpy()
        bad_rows, first_bad = np.unique(parents[bad_obj], return_index=True)
        bad_flat_pos = np.flatnonzero(bad_obj)[first_bad]
        row_mask = np.zeros(len(obj_lists), dtype=bool)
        row_mask[bad_rows] = True
        # reason array aligned with alive rows: only the flagged rows' entries are used
        reason_np = np.empty(len(obj_lists), dtype=object)
        reason_np[bad_rows] = [
            f"invalid entity key '{k}'" for k in flat_raw.take(pa.array(bad_flat_pos)).to_pylist()
        ]
        keep = sieve.reject(row_mask, pa.array(reason_np, pa.string()))
        subject, relation = _filter(subject, keep), _filter(relation, keep)
        keep_flat = keep[parents]
        counts = pc.list_value_length(obj_lists).to_numpy()[keep]
        flat = flat.filter(pa.array(keep_flat))
    else:
        counts = pc.list_value_length(obj_lists).to_numpy()
    offsets = np.zeros(len(counts) + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    objects = pa.ListArray.from_arrays(pa.array(offsets), flat)
    table = pa.table(
        {
            "line": sieve.line_numbers(),
            "subject": subject,
            "relation": relation,
            "objects": objects,
        },
        schema=None if dictionary else FACTS_SCHEMA,
    )
    return Parsed(table, sieve.rejects(), sieve.n)


def _csv_fields(data: bytes, n_lines: int) -> list[pa.Array] | None:
    """The three TAB-separated fields of every line of ``data`` via pyarrow's CSV tokenizer
    (no quoting, single-threaded: the caller is one of several parallel tasks), or None when a
    line needs the careful line-by-line path (a wrong field count, an empty field, a ``\\r``,
    invalid UTF-8 or a U+FFFD, or a count other than ``n_lines``)."""
    import pyarrow.csv as pacsv

    if not data or data.find(b"\r") >= 0 or (data.find(b"\xef") >= 0 and data.find(b"\xef\xbf\xbd") >= 0):
        return None
    invalid: list[int] = []

    def on_invalid(row) -> str:
        invalid.append(1)
        return "skip"

    try:
        table = pacsv.read_csv(
            pa.BufferReader(data),
            read_options=pacsv.ReadOptions(
                column_names=["s", "p", "o"], use_threads=False, block_size=max(1 << 20, len(data) + 1)
            ),
            parse_options=pacsv.ParseOptions(
                delimiter="\t", quote_char=False, escape_char=False, ignore_empty_lines=False,
                newlines_in_values=False, invalid_row_handler=on_invalid,
            ),
            convert_options=pacsv.ConvertOptions(
                column_types={c: pa.string() for c in "spo"}, strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )  # fmt: skip
    except pa.ArrowInvalid:  # invalid UTF-8, among others
        return None
    if invalid or table.num_rows != n_lines:
        return None
    fields = [table.column(c).combine_chunks() for c in "spo"]
    for f in fields:
        if f.null_count or not pc.all(pc.greater(pc.binary_length(f), 0)).as_py():
            return None
    return fields


def parse_grouped_bytes(
    data: bytes,
    first_line: int,
    n_lines: int,
    source: str,
    *,
    single_object: bool = False,
    dictionary: bool = False,
) -> Parsed:
    """:func:`parse_grouped_facts` of the ``n_lines`` lines in ``data`` (raw bytes of whole
    lines, as :func:`read_chunk_bytes` returns them), with the same result, faster: a clean chunk
    is tokenised by pyarrow's CSV reader; a chunk with any line to reject is parsed line by line.
    """
    fields = _csv_fields(data, n_lines)
    if fields is not None:
        try:
            sieve = _LineSieve(None, first_line, source, n=n_lines)
            return _grouped_from_fields(sieve, fields, single_object, dictionary)
        except _NeedLines:
            pass
    lines = _bytes_to_lines(data[:-1] if data.endswith(b"\n") else data) if data else pa.array(
        [], pa.string()
    )
    return parse_grouped_facts(
        lines, first_line, source, single_object=single_object, dictionary=dictionary
    )


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
    """:class:`CodedFacts` of a parsed facts table (``FACTS_SCHEMA``, string or
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
    import pyarrow.csv as pacsv

    if isinstance(data, ByteChunk):  # memory-mapped: the page cache is read in place
        view = _MappedRange(data)
    else:
        view = _MappedRange(None, data)
    if not view.size or (view.find(b"\xef") >= 0 and view.find(b"\xef\xbf\xbd") >= 0):
        return None  # U+FFFD: the careful path rejects it as invalid UTF-8
    # the CSV reader also ends rows at a lone "\r": then count the lines to compare
    n_lines = count_lines(view.to_bytes()) if view.find(b"\r") >= 0 else -1
    invalid: list[int] = []

    def on_invalid(row) -> str:
        invalid.append(1)
        return "skip"

    try:
        table = pacsv.read_csv(
            pa.BufferReader(view.buffer()),
            read_options=pacsv.ReadOptions(
                column_names=["s", "p", "o"], use_threads=False, block_size=view.size + 1
            ),
            parse_options=pacsv.ParseOptions(
                delimiter="\t", quote_char=False, escape_char=False, ignore_empty_lines=False,
                newlines_in_values=False, invalid_row_handler=on_invalid,
            ),
            convert_options=pacsv.ConvertOptions(
                column_types={"s": pa.string(), "p": pa.dictionary(pa.int32(), pa.string()),
                              "o": pa.string()},
                strings_can_be_null=False, quoted_strings_can_be_null=False,
                # UTF-8 is checked below: every byte of a key is a prefix byte or a machine-id
                # character (hmn.ids), and the distinct relation spellings are validated
                check_utf8=False,
            ),
        )  # fmt: skip
    except pa.ArrowInvalid:
        return None
    if invalid or (n_lines >= 0 and table.num_rows != n_lines):
        return None
    n_lines = table.num_rows
    del view
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
    by_subject = None
    hashed = ids.window_ids([s, o_keys])  # keys of up to 8 characters: hashed, not sorted
    if hashed is not None:
        entities, (subject, objects) = hashed
    else:  # longer keys are coded by utf8 kernels: their bytes must be valid UTF-8 first
        if not (_valid_utf8(s) and _valid_utf8(o_keys)):
            return None
        s_codes = ids.prefixed_mid_codes(s)
        o_codes = None if s_codes is None else ids.prefixed_mid_codes(o_keys)
        if o_codes is None:
            return None
        entities, inverse, order = ids.local_unique(np.concatenate([s_codes, o_codes]),
                                                    return_order=True)  # fmt: skip
        by_subject = order[order < n]  # rows by subject code, lines ascending within a subject
        subject, objects = inverse[:n], inverse[n:]
        del order
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
        schema=FACTS_SCHEMA,
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


def parse_triples(
    lines: pa.Array, first_line: int, source: str, *, dictionary: bool = False
) -> Parsed:
    """Parse plain triples ``head<TAB>relation<TAB>tail`` (FB15k-237's train/valid/test files)
    into the grouped-facts table (one object per row); see :func:`parse_grouped_facts`."""
    return parse_grouped_facts(lines, first_line, source, single_object=True, dictionary=dictionary)


def parse_questions(lines: pa.Array, first_line: int, source: str) -> Parsed:
    """Parse SimpleQuestions lines ``subject<TAB>relation<TAB>object<TAB>question``.

    Table columns (``QUESTIONS_SCHEMA``): ``line``, ``subject``, ``relation``, ``object``
    (null when the object field is empty), ``question`` (surrounding whitespace stripped).
    Reject reasons: "invalid UTF-8", "empty line", "expected 4 tab-separated fields, got N",
    "invalid entity key '...'", "invalid relation key '...'", "empty question".
    """
    sieve = _LineSieve(lines, first_line, source)
    fields = _split_fields(sieve, 4)
    fields = _check_key(sieve, fields, 0, "entity")
    fields = _check_key(sieve, fields, 1, "relation")
    fields = _check_key(sieve, fields, 2, "entity", allow_empty=True)
    subject, relation, obj, question = fields
    question = pc.utf8_trim_whitespace(question)
    keep = sieve.reject(pc.equal(pc.utf8_length(question), 0), "empty question")
    table = pa.table(
        {
            "line": sieve.line_numbers(),
            "subject": _filter(subject, keep),
            "relation": _filter(relation, keep),
            "object": _filter(obj, keep),
            "question": _filter(question, keep),
        },
        schema=QUESTIONS_SCHEMA,
    )
    return Parsed(table, sieve.rejects(), len(sieve.lines))


def parse_names(lines: pa.Array, first_line: int, source: str) -> Parsed:
    """Parse names ``entity<TAB>name``.

    Table columns (``NAMES_SCHEMA``): ``line``, ``entity`` (normalised), ``name`` (stripped).
    Reject reasons: "invalid UTF-8", "empty line", "expected 2 tab-separated fields, got N",
    "invalid entity key '...'", "empty name".
    """
    sieve = _LineSieve(lines, first_line, source)
    fields = _split_fields(sieve, 2)
    entity, name = _check_key(sieve, fields, 0, "entity")
    name = pc.utf8_trim_whitespace(name)
    keep = sieve.reject(pc.equal(pc.utf8_length(name), 0), "empty name")
    table = pa.table(
        {
            "line": sieve.line_numbers(),
            "entity": _filter(entity, keep),
            "name": _filter(name, keep),
        },
        schema=NAMES_SCHEMA,
    )
    return Parsed(table, sieve.rejects(), len(sieve.lines))


# --------------------------------------------------------------------------------------------
# Freebase RDF dump (N-Triples)
# --------------------------------------------------------------------------------------------

RDF_NAME_PREDICATE = "/type/object/name"
SKIP_BLANK = "blank line or comment"
SKIP_PREDICATE = "predicate not selected"
SKIP_LITERAL = "literal object"
SKIP_NOT_ENTITY = "subject or object not an entity"
SKIP_NAME_LANGUAGE = "name not in the chosen language"
SKIP_NAMES_OFF = "name (names not read from this file)"
RDF_SKIP_REASONS = (
    SKIP_BLANK, SKIP_PREDICATE, SKIP_LITERAL, SKIP_NOT_ENTITY, SKIP_NAME_LANGUAGE, SKIP_NAMES_OFF,
)  # fmt: skip
_NTRIPLES_REASON = "expected N-Triples '<subject> <predicate> <object> .'"


def is_entity_key(keys: pa.Array) -> pa.Array:
    """True for canonical keys of entities (machine ids ``/m/...`` and ``/g/...``)."""
    return pc.fill_null(pc.or_(pc.starts_with(keys, "/m/"), pc.starts_with(keys, "/g/")), False)


def _is_iri(terms: pa.Array) -> pa.Array:
    return pc.and_(pc.starts_with(terms, "<"), pc.ends_with(terms, ">"))


def parse_rdf(
    lines: pa.Array,
    first_line: int,
    source: str,
    *,
    relations: pa.Array | None = None,
    names: bool = True,
    language: str = "en",
) -> Parsed:
    """Filter lines of the Freebase RDF dump (N-Triples; terms separated by TABs, as in
    ``freebase-rdf-latest.gz``, or single spaces) into facts and names.

    Kept: entity-to-entity triples ``<ns/m.x> <ns/a.b.c> <ns/m.y> .`` whose predicate (normalised,
    ``/a/b/c``) is in ``relations`` (canonical keys; ``None`` = every predicate but the name
    predicate), one row per triple in the facts table (``FACTS_SCHEMA``, one object each); with
    ``names``, ``<ns/m.x> <ns/type.object.name> "Name"@<language> .`` rows in ``Parsed.names``
    (``NAMES_SCHEMA``; ``\\"`` and ``\\\\`` unescaped).

    Everything else is *skipped* and counted per reason in ``Parsed.skipped`` (``RDF_SKIP_REASONS``;
    no reject row: the dump has billions of such lines). Malformed lines are rejected:
    "invalid UTF-8", the N-Triples shape, "invalid subject term '...'", "invalid predicate term
    '...'", "invalid object term '...'".
    """
    sieve = _LineSieve(lines, first_line, source)
    lines = sieve.lines
    if _may_contain_replacement(lines):
        keep = sieve.reject(pc.match_substring(lines, "\ufffd"), "invalid UTF-8")
        lines = _filter(lines, keep)
    keep = sieve.skip(pc.match_substring_regex(lines, r"^\s*(?:#|$)"), SKIP_BLANK)
    lines = _filter(lines, keep)
    has_tab = pc.match_substring(lines, "\t")
    sep = pc.if_else(has_tab, lines, pc.replace_substring(lines, " ", "\t", max_replacements=2))
    parts = pc.split_pattern(sep, "\t", max_splits=2)
    n_parts = pc.list_value_length(parts).to_numpy(zero_copy_only=False)
    keep = sieve.reject(n_parts != 3, _NTRIPLES_REASON)
    parts = _filter(parts, keep)
    flat = pc.list_flatten(parts)
    subj_t, pred_t, rest = (flat.take(pa.array(np.arange(i, len(flat), 3))) for i in range(3))
    rest = pc.utf8_rtrim_whitespace(rest)
    keep = sieve.reject(pc.invert(pc.ends_with(rest, ".")), _NTRIPLES_REASON)
    subj_t, pred_t, rest = (_filter(a, keep) for a in (subj_t, pred_t, rest))
    obj_t = pc.utf8_trim_whitespace(pc.utf8_slice_codeunits(rest, 0, -1))
    for role, term in (("subject", subj_t), ("predicate", pred_t)):
        ok = _is_iri(term)
        if role == "subject":
            ok = pc.or_(ok, pc.starts_with(term, "_:"))  # blank nodes: skipped below
        reason = pc.binary_join_element_wise(f"invalid {role} term '", term, "'", "")
        keep = sieve.reject(pc.invert(ok), reason)
        subj_t, pred_t, obj_t = (_filter(a, keep) for a in (subj_t, pred_t, obj_t))
    literal = pc.starts_with(obj_t, '"')
    ok = pc.or_(pc.or_(_is_iri(obj_t), literal), pc.starts_with(obj_t, "_:"))
    reason = pc.binary_join_element_wise("invalid object term '", obj_t, "'", "")
    keep = sieve.reject(pc.invert(ok), reason)
    subj_t, pred_t, obj_t = (_filter(a, keep) for a in (subj_t, pred_t, obj_t))
    literal = _filter(literal, keep)

    pred = normalize_keys(pred_t)  # null for predicates outside the Freebase namespace
    is_name = pc.fill_null(pc.equal(pred, RDF_NAME_PREDICATE), False)
    if relations is None:
        selected = pc.and_(pc.is_valid(pred), pc.invert(is_name))
    else:
        selected = pc.is_in(pred, value_set=relations.cast(pa.string()))
        selected = pc.and_(pc.fill_null(selected, False), pc.invert(is_name))
    wanted = pc.or_(selected, is_name)
    keep = sieve.skip(pc.invert(wanted), SKIP_PREDICATE)
    subj_t, pred, obj_t, literal, is_name = (
        _filter(a, keep) for a in (subj_t, pred, obj_t, literal, is_name)
    )
    if not names:
        keep = sieve.skip(is_name, SKIP_NAMES_OFF)
        subj_t, pred, obj_t, literal, is_name = (
            _filter(a, keep) for a in (subj_t, pred, obj_t, literal, is_name)
        )
    subj = normalize_keys(subj_t)
    keep = sieve.skip(pc.invert(is_entity_key(subj)), SKIP_NOT_ENTITY)
    subj, pred, obj_t, literal, is_name = (
        _filter(a, keep) for a in (subj, pred, obj_t, literal, is_name)
    )
    # facts: an IRI object; names: a literal in the chosen language
    is_fact = pc.invert(is_name)
    keep = sieve.skip(pc.and_(is_fact, literal), SKIP_LITERAL)
    subj, pred, obj_t, literal, is_name, is_fact = (
        _filter(a, keep) for a in (subj, pred, obj_t, literal, is_name, is_fact)
    )
    lang_tag = f'"@{language}'
    keep = sieve.skip(
        pc.and_(is_name, pc.invert(pc.and_(literal, pc.ends_with(obj_t, lang_tag)))),
        SKIP_NAME_LANGUAGE,
    )
    subj, pred, obj_t, is_name, is_fact = (
        _filter(a, keep) for a in (subj, pred, obj_t, is_name, is_fact)
    )
    obj = pc.if_else(is_fact, normalize_keys(pc.if_else(is_fact, obj_t, "")), "")
    not_entity = pc.and_(is_fact, pc.invert(is_entity_key(obj)))
    keep = sieve.skip(not_entity, SKIP_NOT_ENTITY)
    subj, pred, obj, obj_t, is_name = (_filter(a, keep) for a in (subj, pred, obj, obj_t, is_name))

    name_np = is_name.to_numpy(zero_copy_only=False)
    line_no = sieve.line_numbers().to_numpy()
    fact_mask = pa.array(~name_np)
    f_obj = obj.filter(fact_mask)
    offsets = pa.array(np.arange(len(f_obj) + 1, dtype=np.int32))
    facts = pa.table(
        {
            "line": pa.array(line_no[~name_np]),
            "subject": subj.filter(fact_mask),
            "relation": pred.filter(fact_mask),
            "objects": pa.ListArray.from_arrays(offsets, f_obj),
        },
        schema=FACTS_SCHEMA,
    )
    name_mask = pa.array(name_np)
    raw_name = obj_t.filter(name_mask)
    text = pc.utf8_slice_codeunits(raw_name, 1, -len(lang_tag))
    text = pc.replace_substring_regex(text, r'\\(["\\])', r"\1")
    names_table = pa.table(
        {"line": pa.array(line_no[name_np]), "entity": subj.filter(name_mask), "name": text},
        schema=NAMES_SCHEMA,
    )
    return Parsed(facts, sieve.rejects(), len(sieve.lines), dict(sieve.skipped), names_table)


# --------------------------------------------------------------------------------------------
# Format detection
# --------------------------------------------------------------------------------------------

FACT_FORMATS = ("auto", "grouped", "triples", "rdf")
NAME_FORMATS = ("auto", "names", "rdf")
QUESTION_FORMATS = ("auto", "simplequestions")


def sniff_lines(path: str, n: int = 64, max_bytes: int = 1 << 20) -> list[str]:
    """Up to ``n`` non-blank, non-comment lines from the start of ``path`` (decompressed)."""
    with open_text(path) as f:
        head = f.read(max_bytes)
    out = []
    for raw in head.split(b"\n")[:-1] if len(head) == max_bytes else head.split(b"\n"):
        line = raw.decode("utf-8", errors="replace").rstrip("\r")
        if line.strip() and not line.lstrip().startswith("#"):
            out.append(line)
            if len(out) >= n:
                break
    return out


def detect_format(path: str) -> str:
    """Guess a file's format from its first lines: "rdf" (N-Triples), "simplequestions" (four
    TAB fields), "grouped" (three fields, some with several objects or www.freebase.com keys),
    "triples" (three fields, one ``/m/`` tail each), "names" (two fields). Raises
    :class:`FormatError` when the lines fit none."""
    lines = sniff_lines(path)
    if not lines:
        raise FormatError(path, None, "cannot detect the format of an empty file")
    if sum(line.startswith("<") and line.rstrip().endswith(".") for line in lines) > len(lines) / 2:
        return "rdf"
    fields = [line.split("\t") for line in lines]
    counts = [len(f) for f in fields]
    common = max(set(counts), key=counts.count)
    if common == 4:
        return "simplequestions"
    if common == 2:
        return "names"
    if common == 3:
        third = [f[2] for f in fields if len(f) == 3]
        if any(len(t.split()) > 1 for t in third) or any("freebase.com" in t for t in third):
            return "grouped"
        return "triples"
    raise FormatError(
        path, None, f"cannot detect the format: the first lines have {common} TAB-separated fields"
    )


def resolve_format(path: str, fmt: str, allowed: tuple[str, ...], what: str) -> str:
    """``fmt`` checked against ``allowed`` ("auto" = :func:`detect_format`)."""
    if fmt not in allowed:
        raise ValueError(f"{what}={fmt!r}: must be one of {', '.join(allowed)}")
    if fmt != "auto":
        return fmt
    found = detect_format(path)
    if found not in allowed:
        raise FormatError(
            path, None, f"detected format {found!r}, which is not a {what} ({', '.join(allowed)})"
        )
    return found


# --------------------------------------------------------------------------------------------
# Embeddings
# --------------------------------------------------------------------------------------------


def _first_uncastable(values: pa.Array) -> int:
    """Index of the first value that does not cast to float32 (binary search over casts)."""
    lo, hi = 0, len(values)  # the first failure lies in [lo, hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            values.slice(lo, mid - lo).cast(pa.float32())
            lo = mid
        except pa.ArrowInvalid:
            hi = mid
    return lo


def read_embedding_text(
    path: str, expected_dim: int | None = None, *, normalize: bool = True
) -> tuple[list[str], np.ndarray]:
    """Read embeddings in text form: ``key<TAB>v1 ... vD`` or ``key v1 ... vD`` per line, with an
    optional word2vec header ``count D`` on the first line.

    Returns the keys (normalised Freebase keys; with ``normalize=False``, e.g. for word vectors,
    the keys as written) and an ``(n, D)`` float32 matrix. Raises :class:`FormatError`
    (naming the file and line) on a wrong number of values, a dimension other than
    ``expected_dim`` or the header's, a non-numeric, NaN or infinite value, an invalid key, a
    duplicate key, or a header count that does not match. Blank lines are skipped.
    """
    path = str(path)
    dim = expected_dim
    if dim is not None and dim < 1:
        raise ValueError(f"expected_dim={dim}: must be >= 1")
    header_count: int | None = None
    key_parts: list[pa.Array] = []
    line_parts: list[np.ndarray] = []
    vec_parts: list[np.ndarray] = []
    for first, lines in iter_line_chunks(path):
        line_no = np.arange(first, first + len(lines), dtype=np.int64)
        bad_utf8 = pc.match_substring(lines, "\ufffd").to_numpy(zero_copy_only=False)
        if bad_utf8.any():
            raise FormatError(path, int(line_no[np.argmax(bad_utf8)]), "invalid UTF-8")
        if first == 1 and len(lines):
            head = lines[0].as_py().split()
            if len(head) == 2 and all(t.isdigit() for t in head):
                header_count, header_dim = int(head[0]), int(head[1])
                if dim is not None and header_dim != dim:
                    raise FormatError(
                        path, 1, f"header dimension {header_dim} != expected dimension {dim}"
                    )
                dim = header_dim
                lines, line_no = lines.slice(1), line_no[1:]
        blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(lines)), 0)
        blank = blank.to_numpy(zero_copy_only=False)
        if blank.any():
            lines, line_no = lines.filter(pa.array(~blank)), line_no[~blank]
        if not len(lines):
            continue
        # key = text before the first TAB, or before the first space when there is no TAB
        has_tab = pc.match_substring(lines, "\t")
        sep_lines = pc.if_else(
            has_tab, lines, pc.replace_substring(lines, " ", "\t", max_replacements=1)
        )
        parts = pc.split_pattern(sep_lines, "\t", max_splits=1)
        n_parts = pc.list_value_length(parts).to_numpy()
        if (n_parts < 2).any():
            i = int(np.argmax(n_parts < 2))
            raise FormatError(path, int(line_no[i]), "expected a key followed by values")
        flat = pc.list_flatten(parts)
        raw_keys = flat.take(pa.array(np.arange(0, len(flat), 2)))
        values = pc.utf8_split_whitespace(
            pc.utf8_trim_whitespace(flat.take(pa.array(np.arange(1, len(flat), 2))))
        )
        n_values = pc.list_value_length(values).to_numpy()
        if dim is None:
            dim = int(n_values[0])
            if dim < 1:
                raise FormatError(path, int(line_no[0]), "no values after the key")
        wrong = n_values != dim
        if wrong.any():
            i = int(np.argmax(wrong))
            raise FormatError(
                path,
                int(line_no[i]),
                f"expected {dim} values after the key, got {int(n_values[i])}",
            )
        keys = normalize_keys(raw_keys) if normalize else raw_keys
        bad_key = pc.is_null(keys).to_numpy(zero_copy_only=False)
        if bad_key.any():
            i = int(np.argmax(bad_key))
            raise FormatError(path, int(line_no[i]), f"invalid key {raw_keys[i].as_py()!r}")
        flat_values = pc.list_flatten(values)
        try:
            vec = flat_values.cast(pa.float32()).to_numpy(zero_copy_only=False)
        except pa.ArrowInvalid:
            j = _first_uncastable(flat_values)
            i = j // dim
            raise FormatError(
                path, int(line_no[i]), f"non-numeric value {flat_values[j].as_py()!r}"
            ) from None
        vec = vec.reshape(len(keys), dim)  # (n, D)
        finite = np.isfinite(vec)
        if not finite.all():
            i, j = np.argwhere(~finite)[0]
            raise FormatError(
                path, int(line_no[i]), f"non-finite value {vec[i, j]!r} in column {int(j) + 1}"
            )
        key_parts.append(keys)
        line_parts.append(line_no)
        vec_parts.append(vec)
    if not key_parts:
        if header_count:
            raise FormatError(path, None, f"header announces {header_count} rows, file has 0")
        return [], np.zeros((0, dim or 0), dtype=np.float32)
    keys = pa.chunked_array(key_parts).combine_chunks()
    line_no = np.concatenate(line_parts)
    n = len(keys)
    if header_count is not None and header_count != n:
        raise FormatError(path, 1, f"header announces {header_count} rows, file has {n}")
    codes = keys.dictionary_encode().indices.to_numpy()
    uniq, first_pos = np.unique(codes, return_index=True)
    if len(uniq) < n:
        # the earliest line that repeats a key seen before, and where that key was first seen
        is_first = np.zeros(n, dtype=bool)
        is_first[first_pos] = True
        i = int(np.argmax(~is_first))
        j = int(first_pos[np.searchsorted(uniq, codes[i])])
        raise FormatError(
            path,
            int(line_no[i]),
            f"duplicate key {keys[i].as_py()!r} (first seen on line {int(line_no[j])})",
        )
    matrix = np.concatenate(vec_parts, axis=0) if len(vec_parts) > 1 else vec_parts[0]
    logger.info("read %d embeddings of dimension %d from %s", n, dim, path)
    return keys.to_pylist(), np.ascontiguousarray(matrix, dtype=np.float32)
