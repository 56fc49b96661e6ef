"""The Freebase RDF dump (N-Triples): entity-to-entity facts of chosen predicates and names.

:func:`parse_rdf` keeps the facts (:data:`hmn.formats.grouped.FACT_LINES_SCHEMA`, one object a
row) and the names in one language (:data:`hmn.formats.names.NAME_LINES_SCHEMA`); every other
line is counted as skipped per reason (:data:`RDF_SKIP_REASONS`), never written row by row.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hmn.formats.grouped import FACT_LINES_SCHEMA
from hmn.formats.keys import is_entity_key, normalize_keys
from hmn.formats.names import NAME_LINES_SCHEMA
from hmn.formats.parsed import LineSieve, Parsed, keep_rows, may_contain_replacement

__all__ = [
    "parse_rdf",
    "RDF_NAME_PREDICATE",
    "RDF_SKIP_REASONS",
    "SKIP_BLANK",
    "SKIP_PREDICATE",
    "SKIP_LITERAL",
    "SKIP_NOT_ENTITY",
    "SKIP_NAME_LANGUAGE",
    "SKIP_NAMES_OFF",
]

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


def _is_iri(terms: pa.Array) -> pa.Array:
    return pc.and_(pc.starts_with(terms, "<"), pc.ends_with(terms, ">"))


def _terms(sieve: LineSieve) -> tuple[pa.Array, pa.Array, pa.Array, pa.Array]:
    """``(subject, predicate, object terms, object is a literal)`` of the lines of ``sieve``
    that have the N-Triples shape; blank lines and comments skipped, the others rejected."""
    lines = sieve.lines
    if may_contain_replacement(lines):
        keep = sieve.reject(pc.match_substring(lines, "\ufffd"), "invalid UTF-8")
        lines = keep_rows(lines, keep)
    keep = sieve.skip(pc.match_substring_regex(lines, r"^\s*(?:#|$)"), SKIP_BLANK)
    lines = keep_rows(lines, keep)
    has_tab = pc.match_substring(lines, "\t")
    sep = pc.if_else(has_tab, lines, pc.replace_substring(lines, " ", "\t", max_replacements=2))
    parts = pc.split_pattern(sep, "\t", max_splits=2)
    n_parts = pc.list_value_length(parts).to_numpy(zero_copy_only=False)
    keep = sieve.reject(n_parts != 3, _NTRIPLES_REASON)
    parts = keep_rows(parts, keep)
    flat = pc.list_flatten(parts)
    subj_t, pred_t, rest = (flat.take(pa.array(np.arange(i, len(flat), 3))) for i in range(3))
    rest = pc.utf8_rtrim_whitespace(rest)
    keep = sieve.reject(pc.invert(pc.ends_with(rest, ".")), _NTRIPLES_REASON)
    subj_t, pred_t, rest = (keep_rows(a, keep) for a in (subj_t, pred_t, rest))
    obj_t = pc.utf8_trim_whitespace(pc.utf8_slice_codeunits(rest, 0, -1))
    for role, term in (("subject", subj_t), ("predicate", pred_t)):
        ok = _is_iri(term)
        if role == "subject":
            ok = pc.or_(ok, pc.starts_with(term, "_:"))  # blank nodes: skipped below
        reason = pc.binary_join_element_wise(f"invalid {role} term '", term, "'", "")
        keep = sieve.reject(pc.invert(ok), reason)
        subj_t, pred_t, obj_t = (keep_rows(a, keep) for a in (subj_t, pred_t, obj_t))
    literal = pc.starts_with(obj_t, '"')
    ok = pc.or_(pc.or_(_is_iri(obj_t), literal), pc.starts_with(obj_t, "_:"))
    reason = pc.binary_join_element_wise("invalid object term '", obj_t, "'", "")
    keep = sieve.reject(pc.invert(ok), reason)
    subj_t, pred_t, obj_t = (keep_rows(a, keep) for a in (subj_t, pred_t, obj_t))
    literal = keep_rows(literal, keep)
    return subj_t, pred_t, obj_t, literal


def _tables(sieve: LineSieve, subj, pred, obj, obj_t, is_name, lang_tag: str):
    """The facts table (one object a row) and the names table of the rows kept."""
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
        schema=FACT_LINES_SCHEMA,
    )
    name_mask = pa.array(name_np)
    raw_name = obj_t.filter(name_mask)
    text = pc.utf8_slice_codeunits(raw_name, 1, -len(lang_tag))
    text = pc.replace_substring_regex(text, r'\\(["\\])', r"\1")
    names_table = pa.table(
        {"line": pa.array(line_no[name_np]), "entity": subj.filter(name_mask), "name": text},
        schema=NAME_LINES_SCHEMA,
    )
    return facts, names_table


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
    predicate), one row per triple in the facts table (``FACT_LINES_SCHEMA``, one object each); with
    ``names``, ``<ns/m.x> <ns/type.object.name> "Name"@<language> .`` rows in ``Parsed.names``
    (``NAME_LINES_SCHEMA``; ``\\"`` and ``\\\\`` unescaped).

    Everything else is *skipped* and counted per reason in ``Parsed.skipped`` (``RDF_SKIP_REASONS``;
    no reject row: the dump has billions of such lines). Malformed lines are rejected:
    "invalid UTF-8", the N-Triples shape, "invalid subject term '...'", "invalid predicate term
    '...'", "invalid object term '...'".
    """
    sieve = LineSieve(lines, first_line, source)
    subj_t, pred_t, obj_t, literal = _terms(sieve)
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
        keep_rows(a, keep) for a in (subj_t, pred, obj_t, literal, is_name)
    )
    if not names:
        keep = sieve.skip(is_name, SKIP_NAMES_OFF)
        subj_t, pred, obj_t, literal, is_name = (
            keep_rows(a, keep) for a in (subj_t, pred, obj_t, literal, is_name)
        )
    subj = normalize_keys(subj_t)
    keep = sieve.skip(pc.invert(is_entity_key(subj)), SKIP_NOT_ENTITY)
    subj, pred, obj_t, literal, is_name = (
        keep_rows(a, keep) for a in (subj, pred, obj_t, literal, is_name)
    )
    # facts: an IRI object; names: a literal in the chosen language
    is_fact = pc.invert(is_name)
    keep = sieve.skip(pc.and_(is_fact, literal), SKIP_LITERAL)
    subj, pred, obj_t, literal, is_name, is_fact = (
        keep_rows(a, keep) for a in (subj, pred, obj_t, literal, is_name, is_fact)
    )
    lang_tag = f'"@{language}'
    keep = sieve.skip(
        pc.and_(is_name, pc.invert(pc.and_(literal, pc.ends_with(obj_t, lang_tag)))),
        SKIP_NAME_LANGUAGE,
    )
    subj, pred, obj_t, is_name, is_fact = (
        keep_rows(a, keep) for a in (subj, pred, obj_t, is_name, is_fact)
    )
    obj = pc.if_else(is_fact, normalize_keys(pc.if_else(is_fact, obj_t, "")), "")
    not_entity = pc.and_(is_fact, pc.invert(is_entity_key(obj)))
    keep = sieve.skip(not_entity, SKIP_NOT_ENTITY)
    subj, pred, obj, obj_t, is_name = (keep_rows(a, keep) for a in (subj, pred, obj, obj_t, is_name))

    facts, names_table = _tables(sieve, subj, pred, obj, obj_t, is_name, lang_tag)
    return Parsed(facts, sieve.rejects(), len(sieve.lines), dict(sieve.skipped), names_table)
