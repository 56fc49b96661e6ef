"""Embeddings in text form: ``key<TAB>v1 ... vD`` or ``key v1 ... vD`` per line, optionally
preceded by a word2vec header line ``count D`` (other embedding formats:
:mod:`hmn.embedding_files`)."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hmn.formats.keys import normalize_keys
from hmn.formats.lines import iter_line_chunks
from hmn.formats.parsed import FormatError

logger = logging.getLogger(__name__)

__all__ = ["read_embedding_text"]


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


def _keys_and_values(
    path: str, lines: pa.Array, line_no: np.ndarray, dim: int | None
) -> tuple[pa.Array, pa.Array, int]:
    """``(raw keys, list of value strings per line, dimension)`` of non-blank lines; the
    dimension is ``dim``, or the first line's number of values when ``dim`` is None."""
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
    return raw_keys, values, dim


def _vectors(path: str, values: pa.Array, line_no: np.ndarray, dim: int) -> np.ndarray:
    """``(n, D)`` float32 of ``dim`` value strings per line; non-numeric or non-finite values
    raise, naming the line."""
    flat_values = pc.list_flatten(values)
    try:
        vec = flat_values.cast(pa.float32()).to_numpy(zero_copy_only=False)
    except pa.ArrowInvalid:
        j = _first_uncastable(flat_values)
        i = j // dim
        raise FormatError(
            path, int(line_no[i]), f"non-numeric value {flat_values[j].as_py()!r}"
        ) from None
    vec = vec.reshape(len(values), dim)  # (n, D)
    finite = np.isfinite(vec)
    if not finite.all():
        i, j = np.argwhere(~finite)[0]
        raise FormatError(
            path, int(line_no[i]), f"non-finite value {vec[i, j]!r} in column {int(j) + 1}"
        )
    return vec


def _check_unique(path: str, keys: pa.Array, line_no: np.ndarray) -> None:
    """Raise on the earliest line that repeats a key seen before, naming where that key was
    first seen."""
    n = len(keys)
    codes = keys.dictionary_encode().indices.to_numpy()
    uniq, first_pos = np.unique(codes, return_index=True)
    if len(uniq) < n:
        is_first = np.zeros(n, dtype=bool)
        is_first[first_pos] = True
        i = int(np.argmax(~is_first))
        j = int(first_pos[np.searchsorted(uniq, codes[i])])
        raise FormatError(
            path,
            int(line_no[i]),
            f"duplicate key {keys[i].as_py()!r} (first seen on line {int(line_no[j])})",
        )


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
        raw_keys, values, dim = _keys_and_values(path, lines, line_no, dim)
        keys = normalize_keys(raw_keys) if normalize else raw_keys
        bad_key = pc.is_null(keys).to_numpy(zero_copy_only=False)
        if bad_key.any():
            i = int(np.argmax(bad_key))
            raise FormatError(path, int(line_no[i]), f"invalid key {raw_keys[i].as_py()!r}")
        vec = _vectors(path, values, line_no, dim)
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
    _check_unique(path, keys, line_no)
    matrix = np.concatenate(vec_parts, axis=0) if len(vec_parts) > 1 else vec_parts[0]
    logger.info("read %d embeddings of dimension %d from %s", n, dim, path)
    return keys.to_pylist(), np.ascontiguousarray(matrix, dtype=np.float32)
