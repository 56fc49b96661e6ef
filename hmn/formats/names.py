"""Entity name files: ``entity<TAB>name``."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from hmn.formats.parsed import LineSieve, Parsed, check_key, keep_rows, split_fields

__all__ = ["NAME_LINES_SCHEMA", "parse_names"]

NAME_LINES_SCHEMA = pa.schema([("line", pa.int64()), ("entity", pa.string()), ("name", pa.string())])


def parse_names(lines: pa.Array, first_line: int, source: str) -> Parsed:
    """Parse names ``entity<TAB>name``.

    Table columns (``NAME_LINES_SCHEMA``): ``line``, ``entity`` (normalised), ``name`` (stripped).
    Reject reasons: "invalid UTF-8", "empty line", "expected 2 tab-separated fields, got N",
    "invalid entity key '...'", "empty name".
    """
    sieve = LineSieve(lines, first_line, source)
    fields = split_fields(sieve, 2)
    entity, name = check_key(sieve, fields, 0, "entity")
    name = pc.utf8_trim_whitespace(name)
    keep = sieve.reject(pc.equal(pc.utf8_length(name), 0), "empty name")
    table = pa.table(
        {
            "line": sieve.line_numbers(),
            "entity": keep_rows(entity, keep),
            "name": keep_rows(name, keep),
        },
        schema=NAME_LINES_SCHEMA,
    )
    return Parsed(table, sieve.rejects(), len(sieve.lines))
