"""SimpleQuestions question files: ``subject<TAB>relation<TAB>object<TAB>question``."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from hmn.formats.parsed import LineSieve, Parsed, check_key, keep_rows, split_fields

__all__ = ["QUESTION_LINES_SCHEMA", "parse_questions"]

QUESTION_LINES_SCHEMA = pa.schema(
    [
        ("line", pa.int64()),
        ("subject", pa.string()),
        ("relation", pa.string()),
        ("object", pa.string()),
        ("question", pa.string()),
    ]
)


def parse_questions(lines: pa.Array, first_line: int, source: str) -> Parsed:
    """Parse SimpleQuestions lines ``subject<TAB>relation<TAB>object<TAB>question``.

    Table columns (``QUESTION_LINES_SCHEMA``): ``line``, ``subject``, ``relation``, ``object``
    (null when the object field is empty), ``question`` (surrounding whitespace stripped).
    Reject reasons: "invalid UTF-8", "empty line", "expected 4 tab-separated fields, got N",
    "invalid entity key '...'", "invalid relation key '...'", "empty question".
    """
    sieve = LineSieve(lines, first_line, source)
    fields = split_fields(sieve, 4)
    fields = check_key(sieve, fields, 0, "entity")
    fields = check_key(sieve, fields, 1, "relation")
    fields = check_key(sieve, fields, 2, "entity", allow_empty=True)
    subject, relation, obj, question = fields
    question = pc.utf8_trim_whitespace(question)
    keep = sieve.reject(pc.equal(pc.utf8_length(question), 0), "empty question")
    table = pa.table(
        {
            "line": sieve.line_numbers(),
            "subject": keep_rows(subject, keep),
            "relation": keep_rows(relation, keep),
            "object": keep_rows(obj, keep),
            "question": keep_rows(question, keep),
        },
        schema=QUESTION_LINES_SCHEMA,
    )
    return Parsed(table, sieve.rejects(), len(sieve.lines))
