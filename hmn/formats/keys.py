"""Freebase key normalisation, vectorised with ``pyarrow.compute``.

Freebase keys come in several spellings; :func:`normalize_keys` maps all of them to the canonical
slash form (``/m/0abc``, ``/people/person/place_of_birth``): ``www.freebase.com/m/0abc``,
``/m/0abc``, ``m.0abc`` and ``<http://rdf.freebase.com/ns/m.0abc>`` all become ``/m/0abc``.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

__all__ = ["normalize_keys", "normalize_key", "is_entity_key"]

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



def is_entity_key(keys: pa.Array) -> pa.Array:
    """True for canonical keys of entities (machine ids ``/m/...`` and ``/g/...``)."""
    return pc.fill_null(pc.or_(pc.starts_with(keys, "/m/"), pc.starts_with(keys, "/g/")), False)
