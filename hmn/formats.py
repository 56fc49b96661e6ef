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
* embedding text: ``key<TAB>v1 v2 ... vD`` or ``key v1 ... vD``, optionally preceded by a word2vec
  header line ``count D``.

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
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

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
_CANONICAL_RE = r"^(?:/[^\s/<>]+)+$"


def normalize_keys(arr: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Normalise Freebase keys to the canonical slash form, vectorised.

    ``www.freebase.com/m/0abc``, ``/m/0abc``, ``m.0abc`` and ``<http://rdf.freebase.com/ns/m.0abc>``
    all become ``/m/0abc`` (likewise for relations). A key that already starts with ``/`` is kept
    as it is. Surrounding whitespace is removed. Empty, null or otherwise invalid keys become null.
    """
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        arr = arr.cast(pa.string())
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


# --------------------------------------------------------------------------------------------
# Parsers
# --------------------------------------------------------------------------------------------


@dataclass
class Parsed:
    """Result of parsing a chunk of lines: accepted rows, one reject row per bad line, and the
    number of lines read (``lines == table.num_rows + rejects.num_rows``)."""

    table: pa.Table
    rejects: pa.Table
    lines: int


class _LineSieve:
    """Runs a chunk of lines through successive checks, keeping the rows that pass.

    ``idx`` holds the positions (in the chunk) of the rows still alive; each ``reject`` call
    removes the rows flagged by a boolean mask (over the alive rows) and records their reason.
    The first failing check decides a line's reason.
    """

    def __init__(self, lines: pa.Array, first_line: int, source: str):
        if isinstance(lines, pa.ChunkedArray):
            lines = lines.combine_chunks()
        if not pa.types.is_string(lines.type):
            lines = lines.cast(pa.string())
        self.lines = lines
        self.first_line = int(first_line)
        self.source = source
        self.idx = np.arange(len(lines), dtype=np.int64)
        self._rej_idx: list[np.ndarray] = []
        self._rej_reason: list[pa.Array] = []

    def reject(self, mask: pa.Array | np.ndarray, reason: str | pa.Array) -> np.ndarray:
        """Drop the alive rows where ``mask`` is true with ``reason`` (a string, or a string array
        aligned with the alive rows); return the keep mask (numpy bool over the alive rows)."""
        if isinstance(mask, (pa.Array, pa.ChunkedArray)):
            mask = pc.fill_null(mask, False).to_numpy(zero_copy_only=False)
        mask = np.asarray(mask, dtype=bool)
        if mask.any():
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


def _split_fields(sieve: _LineSieve, n_fields: int) -> list[pa.Array]:
    """Common checks (invalid UTF-8, empty line, field count); return the fields of the alive
    rows, each a string array."""
    lines = sieve.lines
    keep = sieve.reject(pc.match_substring(lines, "\ufffd"), "invalid UTF-8")
    lines = _filter(lines, keep)
    keep = sieve.reject(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(lines)), 0), "empty line")
    lines = _filter(lines, keep)
    parts = pc.split_pattern(lines, "\t")
    count = pc.list_value_length(parts)
    bad = pc.not_equal(count, n_fields)
    reason = pc.binary_join_element_wise(
        f"expected {n_fields} tab-separated fields, got ", count.cast(pa.string()), ""
    )
    keep = sieve.reject(bad, reason)
    parts = _filter(parts, keep)
    flat = pc.list_flatten(parts)  # every alive row has exactly n_fields fields
    return [flat.take(pa.array(np.arange(i, len(flat), n_fields))) for i in range(n_fields)]


def _check_key(
    sieve: _LineSieve, fields: list[pa.Array], which: int, role: str, allow_empty: bool = False
) -> list[pa.Array]:
    """Normalise ``fields[which]`` in place of the raw text and reject rows whose key is invalid
    ("invalid <role> key '...'"); return all fields filtered to the surviving rows. With
    ``allow_empty`` an empty field is kept as a null key."""
    raw = fields[which]
    keys = normalize_keys(raw)
    bad = pc.is_null(keys)
    if allow_empty:
        empty = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(raw)), 0)
        bad = pc.and_(bad, pc.invert(empty))
    reason = pc.binary_join_element_wise(f"invalid {role} key '", raw, "'", "")
    keep = sieve.reject(bad, reason)
    fields = [keys if i == which else f for i, f in enumerate(fields)]
    return [_filter(f, keep) for f in fields]


def parse_grouped_facts(lines: pa.Array, first_line: int, source: str) -> Parsed:
    """Parse grouped facts ``subject<TAB>relation<TAB>obj1 obj2 ...``.

    Table columns (``FACTS_SCHEMA``): ``line`` int64, ``subject`` string, ``relation`` string,
    ``objects`` list<string> (all keys normalised; objects in file order, as written).
    Reject reasons: "invalid UTF-8", "empty line", "expected 3 tab-separated fields, got N",
    "invalid entity key '...'", "invalid relation key '...'", "no objects".
    """
    sieve = _LineSieve(lines, first_line, source)
    fields = _split_fields(sieve, 3)
    fields = _check_key(sieve, fields, 0, "entity")
    fields = _check_key(sieve, fields, 1, "relation")
    subject, relation, objects_raw = fields
    objects_raw = pc.utf8_trim_whitespace(objects_raw)
    keep = sieve.reject(pc.equal(pc.utf8_length(objects_raw), 0), "no objects")
    subject, relation, objects_raw = (_filter(a, keep) for a in (subject, relation, objects_raw))

    obj_lists = pc.utf8_split_whitespace(objects_raw)
    flat_raw = pc.list_flatten(obj_lists)
    flat = normalize_keys(flat_raw)
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
        schema=FACTS_SCHEMA,
    )
    return Parsed(table, sieve.rejects(), len(sieve.lines))


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
