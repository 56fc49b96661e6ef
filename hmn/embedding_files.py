"""Pretrained embeddings from files, aligned to the knowledge base's dense ids.

Formats (``fmt``):

* ``"text"``: ``key v1 ... vD`` per line, TAB or space after the key, optionally a word2vec header
  line ``count D`` (:func:`hmn.formats.embedding_text.read_embedding_text`; plain or compressed);
* ``"npy"``: an ``(n, D)`` ``.npy`` matrix plus ``keys_path``, one key per line (row i = line i+1);
* ``"openke"``: OpenKE's binary dump ``entity2vec.bin`` / ``relation2vec.bin`` (raw little-endian
  float32 rows, no header) plus ``keys_path`` = ``entity2id.txt`` / ``relation2id.txt`` (first line
  the count, then ``key<TAB>id``; row ``id`` of the matrix is that key's vector). When
  ``keys_path`` is not given, the ``*2id.txt`` beside the ``*2vec.bin`` is used.

``"auto"`` picks by extension: ``.npy`` -> npy, ``.bin`` -> openke, anything else -> text.

Every reader returns ``(keys, vectors)``: normalised Freebase keys and an ``(n, D)`` float32
matrix. A wrong dimension, a NaN/Inf, an invalid or duplicate key raises
:class:`hmn.formats.parsed.FormatError` naming the file and the line (or the matrix row).
:func:`align_embeddings` then orders the rows by knowledge-base id.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hmn.formats.embedding_text import read_embedding_text
from hmn.formats.keys import normalize_keys
from hmn.formats.lines import iter_line_chunks
from hmn.formats.parsed import FormatError

logger = logging.getLogger(__name__)

__all__ = ["EMBEDDING_FORMATS", "read_embeddings", "align_embeddings", "detect_embedding_format"]

EMBEDDING_FORMATS = ("auto", "text", "npy", "openke")
ALIGN_POLICIES = ("fail", "init")


def detect_embedding_format(path: str) -> str:
    """``npy`` for ``.npy``, ``openke`` for ``.bin``, else ``text``."""
    p = str(path)
    if p.endswith(".npy"):
        return "npy"
    if p.endswith(".bin"):
        return "openke"
    return "text"


def read_embeddings(
    path: str,
    fmt: str = "auto",
    *,
    keys_path: str | None = None,
    expected_dim: int | None = None,
) -> tuple[list[str], np.ndarray]:
    """Read an embedding file (see module docstring); returns ``(keys, vectors (n, D) float32)``."""
    path = str(path)
    if fmt not in EMBEDDING_FORMATS:
        raise ValueError(f"fmt={fmt!r}: must be one of {', '.join(EMBEDDING_FORMATS)}")
    if expected_dim is not None and expected_dim < 1:
        raise ValueError(f"expected_dim={expected_dim}: must be >= 1")
    if fmt == "auto":
        fmt = detect_embedding_format(path)
    if fmt == "text":
        return read_embedding_text(path, expected_dim=expected_dim)
    if fmt == "npy":
        if keys_path is None:
            raise ValueError(f"{path}: the npy format needs keys_path (one key per line)")
        return _read_npy(path, str(keys_path), expected_dim)
    if keys_path is None:
        keys_path = _openke_ids_beside(path)
    return _read_openke(path, str(keys_path), expected_dim)


def _openke_ids_beside(path: str) -> str:
    base = os.path.basename(path)
    if not base.endswith("2vec.bin"):
        raise ValueError(f"{path}: give keys_path (the entity2id.txt / relation2id.txt file)")
    guess = os.path.join(os.path.dirname(path), base[: -len("2vec.bin")] + "2id.txt")
    if not os.path.isfile(guess):
        raise FileNotFoundError(f"{path}: no keys_path given and {guess} does not exist")
    return guess


def _key_lines(path: str) -> tuple[pa.Array, np.ndarray]:
    """Every line of a key file with its 1-based line number (trailing ``\\r`` removed)."""
    parts, numbers = [], []
    for first, lines in iter_line_chunks(path):
        parts.append(lines)
        numbers.append(np.arange(first, first + len(lines), dtype=np.int64))
    if not parts:
        return pa.array([], pa.string()), np.zeros(0, dtype=np.int64)
    return pa.concat_arrays(parts), np.concatenate(numbers)


def _normalised(raw: pa.Array, line_no: np.ndarray, path: str) -> pa.Array:
    bad_utf8 = pc.match_substring(raw, "\ufffd").to_numpy(zero_copy_only=False)
    if bad_utf8.any():
        raise FormatError(path, int(line_no[np.argmax(bad_utf8)]), "invalid UTF-8")
    keys = normalize_keys(raw)
    bad = pc.is_null(keys).to_numpy(zero_copy_only=False)
    if bad.any():
        i = int(np.argmax(bad))
        raise FormatError(path, int(line_no[i]), f"invalid key {raw[i].as_py()!r}")
    return keys


def _check_duplicates(keys: pa.Array, where: np.ndarray, path: str, unit: str) -> None:
    """Raise on the first key seen twice; ``where`` gives each key's line (or row) number."""
    codes = keys.dictionary_encode().indices.to_numpy()
    uniq, first_pos = np.unique(codes, return_index=True)
    if len(uniq) == len(keys):
        return
    is_first = np.zeros(len(keys), dtype=bool)
    is_first[first_pos] = True
    i = int(np.argmax(~is_first))
    j = int(first_pos[np.searchsorted(uniq, codes[i])])
    raise FormatError(
        path, int(where[i]), f"duplicate key {keys[i].as_py()!r} (first seen on {unit} {int(where[j])})"
    )


def _check_finite(vectors: np.ndarray, path: str) -> None:
    finite = np.isfinite(vectors)
    if not finite.all():
        i, j = np.argwhere(~finite)[0]
        raise FormatError(
            path, None, f"row {int(i)}: non-finite value {float(vectors[i, j])} in column {int(j) + 1}"
        )


def _read_npy(path: str, keys_path: str, expected_dim: int | None):
    vectors = np.load(path, mmap_mode="r", allow_pickle=False)
    if vectors.ndim != 2:
        raise FormatError(path, None, f"expected a 2-d (n, D) matrix, got shape {vectors.shape}")
    if not (np.issubdtype(vectors.dtype, np.floating) or np.issubdtype(vectors.dtype, np.integer)):
        raise FormatError(path, None, f"expected a numeric matrix, got dtype {vectors.dtype}")
    n, d = vectors.shape
    if expected_dim is not None and d != expected_dim:
        raise FormatError(path, None, f"dimension {d} != expected dimension {expected_dim}")
    raw, line_no = _key_lines(keys_path)
    blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(raw)), 0).to_numpy(
        zero_copy_only=False
    )
    if blank.any():
        i = int(np.argmax(blank))
        raise FormatError(keys_path, int(line_no[i]), "empty key line")
    if len(raw) != n:
        raise FormatError(keys_path, None, f"{len(raw)} keys for the {n} rows of {path}")
    keys = _normalised(raw, line_no, keys_path)
    _check_duplicates(keys, line_no, keys_path, "line")
    out = np.ascontiguousarray(vectors, dtype=np.float32)  # (n, D)
    _check_finite(out, path)
    logger.info("read %d embeddings of dimension %d from %s", n, d, path)
    return keys.to_pylist(), out


def _read_openke(path: str, ids_path: str, expected_dim: int | None):
    raw, line_no = _key_lines(ids_path)
    if not len(raw):
        raise FormatError(ids_path, 1, "empty file: expected the entry count on the first line")
    head = raw[0].as_py().strip()
    if not head.isdigit():
        raise FormatError(ids_path, 1, f"expected the entry count on the first line, got {head!r}")
    count = int(head)
    body, body_no = raw.slice(1), line_no[1:]
    blank = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(body)), 0).to_numpy(
        zero_copy_only=False
    )
    body, body_no = body.filter(pa.array(~blank)), body_no[~blank]  # trailing blank lines
    if len(body) != count:
        raise FormatError(ids_path, 1, f"the first line announces {count} entries, file has {len(body)}")
    parts = pc.split_pattern_regex(pc.utf8_trim_whitespace(body), r"\s+")
    n_parts = pc.list_value_length(parts).to_numpy()
    if (n_parts != 2).any():
        i = int(np.argmax(n_parts != 2))
        raise FormatError(ids_path, int(body_no[i]), f"expected 'key<TAB>id', got {body[i].as_py()!r}")
    flat = pc.list_flatten(parts)
    raw_keys = flat.take(pa.array(np.arange(0, len(flat), 2)))
    raw_ids = flat.take(pa.array(np.arange(1, len(flat), 2)))
    is_num = pc.match_substring_regex(raw_ids, r"^[0-9]+$").to_numpy(zero_copy_only=False)
    if not is_num.all():
        i = int(np.argmax(~is_num))
        raise FormatError(ids_path, int(body_no[i]), f"id {raw_ids[i].as_py()!r} is not an integer")
    ids = raw_ids.cast(pa.int64()).to_numpy()
    keys = _normalised(raw_keys, body_no, ids_path)
    _check_duplicates(keys, body_no, ids_path, "line")
    seen = np.zeros(count, dtype=np.int64)
    out_of_range = ids >= count
    if out_of_range.any():
        i = int(np.argmax(out_of_range))
        raise FormatError(ids_path, int(body_no[i]), f"id {int(ids[i])} is not below the count {count}")
    np.add.at(seen, ids, 1)
    if (seen != 1).any():
        dup_id = int(np.argmax(seen != 1))
        lines = body_no[ids == dup_id]
        raise FormatError(ids_path, int(lines[1]) if len(lines) > 1 else None,
                          f"id {dup_id} is used {int(seen[dup_id])} times")  # fmt: skip
    size = os.path.getsize(path)
    if size % 4:
        raise FormatError(path, None, f"{size} bytes is not a whole number of float32 values")
    values = size // 4
    if count == 0:
        if values:
            raise FormatError(path, None, f"{values} values for 0 entries")
        return [], np.zeros((0, expected_dim or 0), dtype=np.float32)
    if values % count:
        raise FormatError(path, None, f"{values} float32 values do not split into {count} rows")
    d = values // count
    if expected_dim is not None and d != expected_dim:
        raise FormatError(
            path, None, f"{values} float32 values / {count} rows = dimension {d}, "
            f"expected {expected_dim}",
        )  # fmt: skip
    matrix = np.fromfile(path, dtype="<f4").reshape(count, d)  # (count, D), row = OpenKE id
    _check_finite(matrix, path)
    order = np.argsort(ids)  # key of each row: row r = ids[order[r]] == r
    keys_by_row = keys.take(pa.array(order))
    logger.info("read %d OpenKE embeddings of dimension %d from %s", count, d, path)
    return keys_by_row.to_pylist(), np.ascontiguousarray(matrix, dtype=np.float32)


def align_embeddings(
    kb_keys: Sequence[str],
    keys: Sequence[str],
    vectors: np.ndarray,
    *,
    policy: str = "fail",
    seed: int = 0,
    what: str = "entity",
    source: str = "",
) -> tuple[np.ndarray, int]:
    """Rows of ``vectors`` in knowledge-base id order: ``aligned[i]`` is the vector of
    ``kb_keys[i]``. Keys of the file that the KB lacks are ignored.

    ``policy="fail"`` raises ``ValueError`` naming ``source``, the count of KB keys without a
    vector and a few of them; ``"init"`` gives those rows TransE's initialisation (uniform in
    ``[-6/sqrt(D), 6/sqrt(D)]``, seeded) and counts them. Returns ``(aligned (len(kb_keys), D)
    float32, missing)``.
    """
    if policy not in ALIGN_POLICIES:
        raise ValueError(f"policy={policy!r}: must be one of {', '.join(ALIGN_POLICIES)}")
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or vectors.shape[0] != len(keys):
        raise ValueError(
            f"{source}: vectors of shape {vectors.shape} do not match {len(keys)} keys"
        )
    d = vectors.shape[1]
    kb = pa.array(list(kb_keys) if not isinstance(kb_keys, pa.Array) else kb_keys, pa.string())
    file_keys = pa.array(list(keys) if not isinstance(keys, pa.Array) else keys, pa.string())
    rows = pc.fill_null(pc.index_in(kb, value_set=file_keys), -1).to_numpy(zero_copy_only=False)
    rows = rows.astype(np.int64)  # (E,) row of the file per KB id, -1 = missing
    missing_mask = rows < 0
    missing = int(missing_mask.sum())
    if missing and policy == "fail":
        examples = ", ".join(kb.filter(pa.array(missing_mask)).slice(0, 5).to_pylist())
        raise ValueError(
            f"{source}: {missing} of {len(kb)} {what} keys of the knowledge base have no "
            f"embedding (e.g. {examples}); set the missing policy to 'init' to initialise them"
        )
    aligned = np.empty((len(kb), d), dtype=np.float32)  # (E, D)
    aligned[~missing_mask] = vectors[rows[~missing_mask]]
    if missing:
        bound = 6.0 / np.sqrt(d)
        rng = np.random.default_rng(seed)
        aligned[missing_mask] = rng.uniform(-bound, bound, size=(missing, d)).astype(np.float32)
        logger.info("%s: %d of %d %s keys had no embedding; initialised uniformly",
                    source, missing, len(kb), what)  # fmt: skip
    return aligned, missing
