"""What every line parser returns, and the checks they share.

A parser works on a chunk of lines (a ``pa.StringArray``) and returns a :class:`Parsed` record:
the accepted rows as a table plus one reject row per bad line (:data:`REJECT_SCHEMA`), so that
``lines == table.num_rows + rejects.num_rows`` (+ skips and names, see :class:`Parsed`) always
holds and nothing is dropped silently. :class:`LineSieve` runs the lines through successive
checks and records the first failing check of each line as its reason; :func:`split_fields` and
:func:`check_key` are the checks of the TAB-separated formats. :class:`FormatError` is the error
of a file that does not follow its format (it names the file and the line).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hmn.formats.keys import normalize_keys

__all__ = [
    "FormatError",
    "REJECT_SCHEMA",
    "Parsed",
    "NeedLines",
    "LineSieve",
    "keep_rows",
    "may_contain_replacement",
    "split_fields",
    "check_key",
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


@dataclass
class Parsed:
    """Result of parsing a chunk of lines: accepted rows, one reject row per bad line, and the
    number of lines read.

    ``lines == table.num_rows + rejects.num_rows + sum(skipped.values()) + names rows``:
    ``skipped`` counts lines a filter left out on purpose (per reason; only the RDF reader has a
    filter) and ``names`` holds the English names an RDF file carries (``NAME_LINES_SCHEMA``).
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


class NeedLines(Exception):
    """A fast path met a line to reject: redo the chunk on the line path."""


class LineSieve:
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
                raise NeedLines()
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


def keep_rows(arr: pa.Array, keep: np.ndarray) -> pa.Array:
    return arr.filter(pa.array(keep)) if not keep.all() else arr


def may_contain_replacement(arr: pa.Array) -> bool:
    """Cheap pre-check: False when the data buffer has no 0xEF byte, so no U+FFFD (EF BF BD)."""
    if arr.null_count == len(arr) or len(arr) == 0:
        return False
    data = arr.buffers()[2]
    if data is None:
        return False
    return bool((np.frombuffer(data, dtype=np.uint8) == 0xEF).any())


def split_fields(sieve: LineSieve, n_fields: int) -> list[pa.Array]:
    """Common checks (invalid UTF-8, field count; empty lines get their own reason); return the
    fields of the alive rows, each a string array."""
    lines = sieve.lines
    if may_contain_replacement(lines):
        keep = sieve.reject(pc.match_substring(lines, "\ufffd"), "invalid UTF-8")
        lines = keep_rows(lines, keep)
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
        parts = keep_rows(parts, keep)
        reason = pc.binary_join_element_wise(
            f"expected {n_fields} tab-separated fields, got ", pa.array(count).cast(pa.string()), ""
        )
        keep = sieve.reject(bad, reason)
        parts = keep_rows(parts, keep)
    flat = pc.list_flatten(parts)  # every alive row has exactly n_fields fields
    return [flat.take(pa.array(np.arange(i, len(flat), n_fields))) for i in range(n_fields)]


def check_key(
    sieve: LineSieve,
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
    return [keep_rows(f, keep) for f in fields]
