"""Dense ids for Freebase keys without hashing strings: machine ids as order-preserving integers.

A machine id ``/m/`` + up to 12 characters of ``[0-9_a-z]`` maps to one int64 *code* (base 38,
digit 0 = end of key, then the characters in byte order), so that the integer order is the byte
order of the keys (a shorter key sorts before its extensions; 38^12 < 2^63). Ids are ranks in the
sorted distinct keys, so sorting codes gives the same ids as sorting the strings.

* :func:`mid_codes` codes canonical keys (``/m/0abc``), -1 for any other key;
* :func:`prefixed_mid_codes` codes raw keys that all share one spelling (``www.freebase.com/m/``,
  ``/m/`` or ``m.``): the fast path of the ingest parsers, None when some key needs the general
  normaliser (:func:`hmn.formats.keys.normalize_keys`);
* :func:`window_ids` gives such raw keys (suffixes of up to 8 characters) chunk-local dense ids
  without coding every key: each key's last 8 bytes, loaded as one integer, are hashed
  (``pyarrow.compute.dictionary_encode``) and only the distinct ones are decoded, validated,
  coded and sorted (the fast path's main step: ~2.3 keys a line, ~1.3 of them distinct in a
  1M-line chunk of FB2M);
* :func:`mid_strings` inverts the codes;
* :func:`local_unique` and :func:`sorted_union` turn codes into dense ranks by sorting: per
  chunk (sorted distinct codes + int32 positions), then across chunks.
"""

from __future__ import annotations

import sys

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

__all__ = [
    "MID_CHARS",
    "MID_PREFIXES",
    "mid_codes",
    "prefixed_mid_codes",
    "mid_strings",
    "window_ids",
    "local_unique",
    "sorted_union",
]

MID_CHARS = "0123456789_abcdefghijklmnopqrstuvwxyz"
_BASE = 38
_LEN = 12
_SHORT = 8  # keys of up to 8 characters after "/m/" have codes divisible by 38^4
_LUT = np.full(256, 255, dtype=np.int64)
_LUT[np.frombuffer(MID_CHARS.encode(), dtype=np.uint8)] = np.arange(1, _BASE)
_POW = _BASE ** np.arange(_LEN - 1, -1, -1, dtype=np.int64)  # (12,)
_LUT8 = _LUT.astype(np.uint8)
_LUT8[0] = 0  # the padding byte: end of key
_POW_HEAD = (_BASE ** np.arange(_SHORT - 1, -1, -1)).astype(np.float64)  # exact: 38^8 < 2^53
_TAIL = int(_BASE ** (_LEN - _SHORT))
_PACK_BITS = 22  # local_unique packs (code // 38^4) << 22 | position into one uint64

# spellings whose canonical form is "/m/" + the rest (hmn.formats.keys.normalize_keys)
MID_PREFIXES = ("www.freebase.com/m/", "/m/", "m.")


def _combine_short(d: np.ndarray) -> np.ndarray:
    """int64 codes of ``(n, 8)`` base-38 digits (first digit most significant), combining the
    digits inside one uint64 per key (pairs, then quads, then the halves)."""
    x = np.ascontiguousarray(d).view(np.uint64).ravel()  # byte i of key = bits 8i..8i+7
    m8, m16 = np.uint64(0x00FF00FF00FF00FF), np.uint64(0x0000FFFF0000FFFF)
    y = (x & m8) * np.uint64(_BASE) + ((x >> np.uint64(8)) & m8)  # 16-bit lanes < 38^2
    z = (y & m16) * np.uint64(_BASE**2) + ((y >> np.uint64(16)) & m16)  # 32-bit lanes < 38^4
    w = (z & np.uint64(0xFFFFFFFF)) * np.uint64(_BASE**4) + (z >> np.uint64(32))  # < 38^8
    return w.view(np.int64) * _TAIL


def _codes_of_suffixes(sfx: pa.Array, length: np.ndarray) -> np.ndarray | None:
    """Codes of machine-id suffixes (the characters after ``/m/``), each 1 to 12 characters;
    None when a character is not a machine-id character."""
    n = len(sfx)
    width = _SHORT if int(length.max()) <= _SHORT else _LEN
    padded = pc.utf8_rpad(sfx, width=width, padding="\x00")
    offsets = np.frombuffer(padded.buffers()[1], dtype=np.int32)
    start = int(offsets[padded.offset])
    if int(offsets[padded.offset + n]) - start != width * n:
        return None  # multi-byte characters
    mat = np.frombuffer(padded.buffers()[2], dtype=np.uint8, count=width * n, offset=start)
    mat = mat.reshape(n, width)
    data = sfx.buffers()[2]
    nul_free = data is None or np.frombuffer(data, dtype=np.uint8).all()
    digits = _LUT8[mat]  # (n, width), 0 = end, 255 = not a mid character
    if (digits == 255).any():
        return None
    if width == _SHORT and nul_free:  # every 0 digit is padding
        return _combine_short(digits)
    if ((digits > 0).sum(axis=1) != length).any():  # an inner NUL
        return None
    code = (digits[:, :_SHORT] @ _POW_HEAD).astype(np.int64) * _TAIL  # (n,) exact
    if width > _SHORT:
        code += digits[:, _SHORT:].astype(np.int64) @ _POW[_SHORT:]
    return code


def _single_prefix(keys: pa.Array) -> str | None:
    """The one entry of :data:`MID_PREFIXES` that every key starts with; None for a column with
    nulls, of another type, or mixing spellings."""
    if keys.null_count or not pa.types.is_string(keys.type):
        return None
    for prefix in MID_PREFIXES:
        if pc.all(pc.starts_with(keys, prefix)).as_py():
            return prefix
    return None


def prefixed_mid_codes(keys: pa.Array) -> np.ndarray | None:
    """Codes of raw keys that all are one of :data:`MID_PREFIXES` + 1 to 12 machine-id
    characters (the canonical key is then ``/m/`` + those characters); None when any key is
    spelled otherwise, is null, or is not a machine id (the caller takes the general path)."""
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    n = len(keys)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    prefix = _single_prefix(keys)
    if prefix is None:
        return None
    p = len(prefix)
    length = pc.binary_length(keys).to_numpy(zero_copy_only=False) - p
    if int(length.min()) < 1 or int(length.max()) > _LEN:
        return None
    sfx = pc.binary_slice(keys.view(pa.binary()), p, p + _LEN).view(pa.string())
    return _codes_of_suffixes(sfx, length)


# window_ids: _KEEP[k] keeps the last k bytes of a little-endian 8-byte window (its top k bytes)
_KEEP = np.array([0] + [((1 << (8 * k)) - 1) << (8 * (8 - k)) for k in range(1, 9)], dtype=np.uint64)


def _windows(keys: pa.Array) -> tuple[np.ndarray, np.ndarray] | None:
    """``(window, suffix length)`` per key of a column of raw keys that all are one of
    :data:`MID_PREFIXES` + 1 to 8 characters: the window is the key's suffix, right-aligned in
    8 bytes (the key's last 8 bytes as a little-endian uint64, prefix bytes zeroed), so that
    equal suffixes give equal windows whatever the spelling. None for any other column."""
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    n = len(keys)
    if n == 0:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int32)
    prefix = _single_prefix(keys)
    if prefix is None:
        return None
    offsets = np.frombuffer(keys.buffers()[1], dtype=np.int32, count=n + 1, offset=4 * keys.offset)
    length = np.diff(offsets) - len(prefix)  # (n,) suffix lengths
    k_min, k_max = int(length.min()), int(length.max())
    if k_min < 1 or k_max > _SHORT:
        return None
    data = np.frombuffer(keys.buffers()[2], dtype=np.uint8)
    ends = offsets[1:]
    if int(ends[0]) < 8:  # a window would start before the buffer (short keys): pad it
        data = np.concatenate([np.zeros(8, dtype=np.uint8), data])
        ends = ends + 8
    # element j of `view` is bytes j..j+7 (unaligned loads): one gather reads every window
    view = np.ndarray((len(data) - 7,), dtype="<u8", buffer=data, strides=(1,))
    window = view[ends - 8]  # (n,) uint64, the key's last byte most significant
    if k_min != k_max:
        window &= _KEEP[length]
    elif k_min < 8:
        window &= _KEEP[k_min]
    return window, length


def window_ids(columns: list[pa.Array]) -> tuple[np.ndarray, list[np.ndarray]] | None:
    """``(sorted distinct codes, [int32 position of each key among them, per column])`` for
    columns of raw keys that all are one of :data:`MID_PREFIXES` (one spelling per column) + 1
    to 8 machine-id characters; the codes are those of :func:`prefixed_mid_codes`, the positions
    those of :func:`local_unique` of the concatenated codes. None when some key is not such a
    key (the caller codes the keys one by one or takes the general path).

    Each key's suffix is read as one 8-byte integer (:func:`_windows`), the integers are hashed
    once (in cache-sized partitions when there are many: :func:`_hash_windows`), and only the
    distinct ones are decoded, validated (every suffix byte a machine-id character, the decoded
    length that of the key; the per-key length check only when some key holds a NUL byte) and
    coded; a sort of the distinct codes gives the ranks."""
    if sys.byteorder != "little":
        return None
    parts = [_windows(c) for c in columns]
    if any(p is None for p in parts):
        return None
    window = np.concatenate([w for w, _ in parts])
    sizes = [len(w) for w, _ in parts]
    if not len(window):
        return np.zeros(0, dtype=np.int64), [np.zeros(0, dtype=np.int32) for _ in columns]
    # (keys,) int32 positions in `distinct` (V,) of the windows in the order window[perm]
    perm, index, distinct = _hash_windows(window)
    window_len = len(window)
    del window
    # decode the distinct windows: the suffix starts after the leading NUL bytes (memory order)
    raw = distinct.view(np.uint8).reshape(-1, 8)
    lead = (raw != 0).argmax(axis=1)  # (V,) zero bytes before the suffix
    left = distinct >> (lead.astype(np.uint64) * np.uint64(8))  # suffix left-aligned, NUL-padded
    digits = _LUT8[left.view(np.uint8).reshape(-1, 8)]  # (V, 8), 0 = end, 255 = not a mid char
    decoded = 8 - lead
    if (digits == 255).any() or ((digits > 0).sum(axis=1) != decoded).any():
        return None  # a foreign character, or an inner NUL
    # a suffix that begins with NUL bytes decodes shorter than the key: compare every key
    # (needless when no key holds a NUL byte: then every window decodes to its whole suffix)
    if not all(_nul_free(c) for c in columns):
        lengths = np.concatenate([k for _, k in parts])
        if perm is not None:
            lengths = lengths[perm]
        if not np.array_equal(decoded[index], lengths):
            return None
        del lengths
    codes = _combine_short(digits)  # (V,) distinct codes, all divisible by 38^4
    V = len(codes)
    if V < (1 << _PACK_BITS):  # the codes are distinct: sort (code // 38^4) << 22 | position
        packed = ((codes // _TAIL).astype(np.uint64) << np.uint64(_PACK_BITS)) | np.arange(
            V, dtype=np.uint64
        )
        packed.sort()
        position = (packed & np.uint64((1 << _PACK_BITS) - 1)).astype(np.int64)
        del packed
    else:
        position = np.argsort(codes)
    rank = np.empty(V, dtype=np.int32)
    rank[position] = np.arange(V, dtype=np.int32)
    if perm is None:
        local = rank[index]  # (keys,) int32
    else:
        local = np.empty(window_len, dtype=np.int32)
        local[perm] = rank[index]  # one scatter back to key order
    del index
    out, start = [], 0
    for size in sizes:
        out.append(local[start : start + size])
        start += size
    return codes[position], out


# window_ids hashes at least this many windows in 2^_PARTITION_BITS partitions of a few
# thousand distinct values each (picked by a multiplicative hash): each partition's hash table
# stays in the core's cache, where one table over a chunk's ~1M distinct windows missed it on
# nearly every key (with two parsing threads: 0.5 -> 0.33 CPU s per 6.2M windows)
_PARTITION_MIN = 1 << 18
_PARTITION_BITS = 8
_FIBONACCI = np.uint64(0x9E3779B97F4A7C15)


def _hash_windows(window: np.ndarray) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """``(perm, index, distinct)``: the distinct windows (uint64, any order) and, for the
    windows in the order ``window[perm]`` (``perm`` None: as given), their int32 positions in
    ``distinct``. Large inputs are partitioned by a hash of the window first (a stable radix
    argsort of one byte), then each partition is hashed on its own."""
    n = len(window)
    if n < _PARTITION_MIN:
        enc = pc.dictionary_encode(pa.array(window))
        return None, enc.indices.to_numpy(), enc.dictionary.to_numpy()
    bits = _PARTITION_BITS
    part = ((window * _FIBONACCI) >> np.uint64(64 - bits)).astype(np.uint8)  # (keys,) 0..255
    perm = np.argsort(part, kind="stable")  # numpy: radix sort for one-byte keys
    bounds = np.zeros((1 << bits) + 1, dtype=np.int64)
    np.cumsum(np.bincount(part, minlength=1 << bits), out=bounds[1:])
    del part
    grouped = window[perm]  # (keys,) partition by partition
    index = np.empty(n, dtype=np.int32)
    pieces, found = [], 0
    for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
        if a == b:
            continue
        enc = pc.dictionary_encode(pa.array(grouped[a:b]))
        np.add(enc.indices.to_numpy(), found, out=index[a:b])
        pieces.append(enc.dictionary.to_numpy())
        found += len(pieces[-1])
    return perm, index, np.concatenate(pieces)


def _nul_free(keys: pa.Array) -> bool:
    """True when the characters of the string column ``keys`` hold no NUL byte."""
    if isinstance(keys, pa.ChunkedArray):
        return all(_nul_free(c) for c in keys.chunks)
    n = len(keys)
    if n == 0 or keys.buffers()[2] is None:
        return True
    offsets = np.frombuffer(keys.buffers()[1], dtype=np.int32, count=n + 1, offset=4 * keys.offset)
    start, end = int(offsets[0]), int(offsets[-1])
    if end <= start:
        return True
    data = np.frombuffer(keys.buffers()[2], dtype=np.uint8, count=end - start, offset=start)
    return bool(data.min() > 0)


def mid_codes(keys: pa.Array) -> np.ndarray:
    """Codes of canonical machine-id keys (``/m/`` + 1 to 12 of :data:`MID_CHARS`); -1 for any
    other key or a null."""
    if isinstance(keys, pa.ChunkedArray):
        keys = keys.combine_chunks()
    keys = keys.cast(pa.string())
    n = len(keys)
    out = np.full(n, -1, dtype=np.int64)
    if n == 0:
        return out
    is_mid = pc.fill_null(pc.starts_with(keys, "/m/"), False).to_numpy(zero_copy_only=False)
    length = pc.fill_null(pc.binary_length(keys), 0).to_numpy(zero_copy_only=False) - 3
    ok = is_mid & (length >= 1) & (length <= _LEN)
    if not ok.any():
        return out
    sub = keys.filter(pa.array(ok)) if not ok.all() else keys
    sub_len = length[ok]
    sfx = pc.binary_slice(sub.view(pa.binary()), 3, 3 + _LEN).view(pa.string())
    # per-row validity: a separate pass for rows with foreign characters
    padded = pc.utf8_rpad(sfx, width=_LEN, padding="\x00")
    offsets = np.frombuffer(padded.buffers()[1], dtype=np.int32)[
        padded.offset : padded.offset + len(sub) + 1
    ].astype(np.int64)
    data = np.frombuffer(padded.buffers()[2], dtype=np.uint8)
    row_bytes = np.diff(offsets)
    codes = np.full(len(sub), -1, dtype=np.int64)
    fits = row_bytes == _LEN  # rows with multi-byte characters are longer
    if fits.any():
        starts = offsets[:-1][fits]
        mat = data[starts[:, None] + np.arange(_LEN)[None, :]]  # (k, 12)
        digits = _LUT8[mat]
        good = (digits != 255).all(axis=1) & ((digits > 0).sum(axis=1) == sub_len[fits])
        code = np.where(digits == 255, 0, digits).astype(np.int64) @ _POW
        codes[fits] = np.where(good, code, -1)
    out[ok] = codes
    return out


def mid_strings(codes: np.ndarray) -> pa.Array:
    """The canonical keys of codes (inverse of :func:`mid_codes`), as a string array."""
    codes = np.asarray(codes, dtype=np.int64)
    n = len(codes)
    digits = np.zeros((n, _LEN), dtype=np.uint8)  # (n, 12), 0 = end
    short = n and not (codes % _TAIL).any()
    rest = codes // _TAIL if short else codes.copy()
    for i in range((_SHORT if short else _LEN) - 1, -1, -1):  # division by a scalar: vectorised
        q = rest // _BASE
        digits[:, i] = rest - q * _BASE
        rest = q
    chars = np.zeros((n, 3 + _LEN), dtype=np.uint8)  # "/m/" + characters, NUL-padded
    chars[:, :3] = np.frombuffer(b"/m/", dtype=np.uint8)
    lut = np.frombuffer(b"\0" + MID_CHARS.encode(), dtype=np.uint8)
    chars[:, 3:] = lut[digits]
    padded = pa.FixedSizeBinaryArray.from_buffers(pa.binary(3 + _LEN), n,
                                                  [None, pa.py_buffer(chars)])  # fmt: skip
    return pc.utf8_rtrim(padded.cast(pa.binary()).cast(pa.string()), characters="\x00")


def local_unique(
    codes: np.ndarray, *, return_order: bool = False
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(sorted distinct codes, int32 position of each code among them)``, and with
    ``return_order`` the indices of ``codes`` in sorted order (equal codes by index).

    When every key has at most 8 characters (its code divisible by 38^4) and there are fewer
    than 2^22 codes, one sort of ``(code // 38^4) << 22 | index`` (uint64, distinct values)
    replaces the argsort, several times faster; otherwise ``argsort``."""
    codes = np.asarray(codes, dtype=np.int64)
    n = len(codes)
    if n == 0:
        empty = (codes.copy(), np.zeros(0, dtype=np.int32))
        return (*empty, np.zeros(0, dtype=np.int64)) if return_order else empty
    head = codes // _TAIL
    packed_path = n < (1 << _PACK_BITS) and not (codes - head * _TAIL).any()
    if packed_path:
        packed = (head.astype(np.uint64) << np.uint64(_PACK_BITS)) | np.arange(n, dtype=np.uint64)
        packed.sort()
        position = (packed & np.uint64((1 << _PACK_BITS) - 1)).astype(np.int64)
        ordered = (packed >> np.uint64(_PACK_BITS)).astype(np.int64)
        del packed
    else:
        position = np.argsort(codes, kind="stable")
        ordered = codes[position]
    del head
    new = np.empty(n, dtype=bool)
    new[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=new[1:])
    rank = np.cumsum(new, dtype=np.int32) - 1
    inverse = np.empty(n, dtype=np.int32)
    inverse[position] = rank
    uniq = ordered[new]
    if packed_path:
        uniq *= _TAIL
    return (uniq, inverse, position) if return_order else (uniq, inverse)


def sorted_union(parts: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
    """``(U, [position in U of every entry of each part])`` for sorted distinct int64 arrays:
    U is their sorted union. One stable argsort of the concatenation (timsort: a merge of the
    sorted runs), ranks by a running count of new values, scattered back."""
    if not parts:
        return np.zeros(0, dtype=np.int64), []
    allc = np.concatenate(parts)
    order = np.argsort(allc, kind="stable")
    ordered = allc[order]
    new = np.empty(len(allc), dtype=bool)
    if len(allc):
        new[0] = True
        np.not_equal(ordered[1:], ordered[:-1], out=new[1:])
    rank = np.empty(len(allc), dtype=np.int64)
    rank[order] = np.cumsum(new) - 1
    out, offset = [], 0
    for p in parts:
        out.append(rank[offset : offset + len(p)])
        offset += len(p)
    return ordered[new], out
