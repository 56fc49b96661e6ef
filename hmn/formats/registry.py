"""The format registry: every (kind of source, format) the ingest reads, with its line parser,
and the detection of a file's format ("auto").

Kinds are those of the ingest's sources: "facts", "names", "questions". The format names per
kind are :mod:`hmn.formats.choices` (import-free, for configuration checks); :data:`FORMATS`
gives each its :class:`SourceFormat`, and an import-time check keeps the two equal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa

from hmn.formats.choices import AUTO, FORMATS_BY_KIND
from hmn.formats.grouped import parse_grouped_facts, parse_triples
from hmn.formats.lines import sniff_lines
from hmn.formats.names import parse_names
from hmn.formats.parsed import FormatError, Parsed
from hmn.formats.questions import parse_questions
from hmn.formats.rdf import parse_rdf

__all__ = [
    "RdfOptions",
    "SourceFormat",
    "FORMATS",
    "source_format",
    "detect_format",
    "resolve_format",
]


@dataclass(frozen=True)
class RdfOptions:
    """How RDF files are filtered: ``relations``, the canonical predicate keys kept from a facts
    file (None = every entity-to-entity predicate); ``names``, whether a facts file's names are
    read too; ``language``, the language tag of the names kept."""

    relations: tuple[str, ...] | None = None
    names: bool = True
    language: str = "en"


# (lines, first 1-based line number, source path, RDF options) -> Parsed
LineParser = Callable[[pa.Array, int, str, RdfOptions], Parsed]


@dataclass(frozen=True)
class SourceFormat:
    """One format of one kind of source: its line parser and how the ingest treats its rows.

    ``grouped``: grouped-fact lines (the byte-range fast paths apply; ``single_object``: one
    object a line, plain triples); ``keep_text``: accepted rows keep their raw line, for the
    rejects of a later check against the knowledge base; ``rows_in_names``: the kind's rows are
    ``Parsed.names`` (an RDF file read for its names)."""

    kind: str
    name: str
    parse: LineParser
    grouped: bool = False
    single_object: bool = False
    keep_text: bool = False
    rows_in_names: bool = False


def _grouped(lines: pa.Array, first_line: int, source: str, rdf: RdfOptions) -> Parsed:
    return parse_grouped_facts(lines, first_line, source, dictionary=True)


def _triples(lines: pa.Array, first_line: int, source: str, rdf: RdfOptions) -> Parsed:
    return parse_triples(lines, first_line, source, dictionary=True)


def _rdf_facts(lines: pa.Array, first_line: int, source: str, rdf: RdfOptions) -> Parsed:
    relations = None if rdf.relations is None else pa.array(list(rdf.relations), pa.string())
    return parse_rdf(lines, first_line, source, relations=relations, names=rdf.names,
                     language=rdf.language)  # fmt: skip


def _rdf_names(lines: pa.Array, first_line: int, source: str, rdf: RdfOptions) -> Parsed:
    # a names-only RDF file: every other predicate is filtered out
    return parse_rdf(lines, first_line, source, relations=pa.array([], pa.string()), names=True,
                     language=rdf.language)  # fmt: skip


def _names(lines: pa.Array, first_line: int, source: str, rdf: RdfOptions) -> Parsed:
    return parse_names(lines, first_line, source)


def _questions(lines: pa.Array, first_line: int, source: str, rdf: RdfOptions) -> Parsed:
    return parse_questions(lines, first_line, source)


FORMATS: dict[tuple[str, str], SourceFormat] = {
    (f.kind, f.name): f
    for f in (
        SourceFormat("facts", "grouped", _grouped, grouped=True),
        SourceFormat("facts", "triples", _triples, grouped=True, single_object=True),
        SourceFormat("facts", "rdf", _rdf_facts),
        SourceFormat("names", "names", _names, keep_text=True),
        SourceFormat("names", "rdf", _rdf_names, rows_in_names=True),
        SourceFormat("questions", "simplequestions", _questions, keep_text=True),
    )
}
_NAMED = {(kind, name) for kind, names in FORMATS_BY_KIND.items() for name in names if name != AUTO}
if set(FORMATS) != _NAMED:
    raise RuntimeError(
        f"hmn.formats.registry: parsers for {sorted(FORMATS)} != names {sorted(_NAMED)} "
        "(hmn.formats.choices)"
    )


def source_format(kind: str, name: str) -> SourceFormat:
    """The registry entry of ``(kind, name)``; ``ValueError`` naming the known formats."""
    try:
        return FORMATS[(kind, name)]
    except KeyError:
        known = ", ".join(n for n in FORMATS_BY_KIND.get(kind, ()) if n != AUTO)
        raise ValueError(f"unknown {kind} format {name!r}; known: {known}") from None


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
    if fmt != AUTO:
        return fmt
    found = detect_format(path)
    if found not in allowed:
        raise FormatError(
            path, None, f"detected format {found!r}, which is not a {what} ({', '.join(allowed)})"
        )
    return found

