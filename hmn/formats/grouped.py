"""Grouped facts ``subject<TAB>relation<TAB>obj1 obj2 ...`` (FB2M / FB5M / SimpleQuestions
``kb.txt``; objects separated by spaces) and plain triples ``head<TAB>relation<TAB>tail``
(FB15k-237), parsed into string tables of keys (:data:`FACT_LINES_SCHEMA`) with rejects.

:func:`parse_grouped_facts` is the careful line parser; :func:`parse_grouped_bytes` gives the
same result from raw bytes, tokenising a clean chunk with pyarrow's CSV reader. The ingest's
fast path for clean machine-id chunks is :mod:`hmn.formats.coded`.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hmn.formats.keys import normalize_keys
from hmn.formats.lines import bytes_to_lines
from hmn.formats.parsed import (
    LineSieve,
    NeedLines,
    Parsed,
    check_key,
    keep_rows,
    split_fields,
)

__all__ = ["FACT_LINES_SCHEMA", "parse_grouped_facts", "parse_triples", "parse_grouped_bytes"]

FACT_LINES_SCHEMA = pa.schema(
    [
        ("line", pa.int64()),
        ("subject", pa.string()),
        ("relation", pa.string()),
        ("objects", pa.list_(pa.string())),
    ]
)


def parse_grouped_facts(
    lines: pa.Array,
    first_line: int,
    source: str,
    *,
    single_object: bool = False,
    dictionary: bool = False,
) -> Parsed:
    """Parse grouped facts ``subject<TAB>relation<TAB>obj1 obj2 ...``.

    With ``single_object`` (plain triples ``head<TAB>relation<TAB>tail``, as in FB15k-237) a line
    with more than one object is rejected ("expected one tail entity, got N"); the ingest stage
    groups the triples into facts by (head, relation). With ``dictionary`` the key columns are
    dictionary-encoded (``subject``, ``relation``: dictionary<int32, string>; ``objects``:
    list<dictionary<int32, string>>) for id assignment without hashing every string again.

    Table columns (``FACT_LINES_SCHEMA``): ``line`` int64, ``subject`` string, ``relation`` string,
    ``objects`` list<string> (all keys normalised; objects in file order, as written).
    Reject reasons: "invalid UTF-8", "empty line", "expected 3 tab-separated fields, got N",
    "invalid entity key '...'", "invalid relation key '...'", "no objects".
    """
    sieve = LineSieve(lines, first_line, source)
    fields = split_fields(sieve, 3)
    return _grouped_from_fields(sieve, fields, single_object, dictionary)


def _grouped_from_fields(
    sieve: LineSieve, fields: list[pa.Array], single_object: bool, dictionary: bool
) -> Parsed:
    fields = check_key(sieve, fields, 0, "entity", dictionary=dictionary)
    fields = check_key(sieve, fields, 1, "relation", dictionary=dictionary)
    subject, relation, objects_raw = fields
    objects_raw = pc.utf8_trim_whitespace(objects_raw)
    keep = sieve.reject(pc.equal(pc.utf8_length(objects_raw), 0), "no objects")
    subject, relation, objects_raw = (keep_rows(a, keep) for a in (subject, relation, objects_raw))

    obj_lists = pc.ascii_split_whitespace(objects_raw)
    if single_object:
        n_obj = pc.list_value_length(obj_lists)
        reason = pc.binary_join_element_wise(
            "expected one tail entity, got ", n_obj.cast(pa.string()), ""
        )
        keep = sieve.reject(pc.greater(n_obj, 1), reason)
        subject, relation, obj_lists = (keep_rows(a, keep) for a in (subject, relation, obj_lists))
    flat_raw = pc.list_flatten(obj_lists)
    flat = normalize_keys(flat_raw, dictionary=dictionary)
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
        subject, relation = keep_rows(subject, keep), keep_rows(relation, keep)
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
        schema=None if dictionary else FACT_LINES_SCHEMA,
    )
    return Parsed(table, sieve.rejects(), sieve.n)


def read_three_fields(buffer, block_size: int, column_types: dict, check_utf8: bool = True):
    """``buffer`` tokenised by pyarrow's CSV reader as TAB-separated lines of three fields
    ``s``, ``p``, ``o`` (no quoting, one thread: the caller is one of several parallel tasks),
    or None when a line has another field count or pyarrow rejects the bytes."""
    import pyarrow.csv as pacsv

    invalid: list[int] = []

    def on_invalid(row) -> str:
        invalid.append(1)
        return "skip"

    try:
        table = pacsv.read_csv(
            pa.BufferReader(buffer),
            read_options=pacsv.ReadOptions(
                column_names=["s", "p", "o"], use_threads=False, block_size=block_size
            ),
            parse_options=pacsv.ParseOptions(
                delimiter="\t", quote_char=False, escape_char=False, ignore_empty_lines=False,
                newlines_in_values=False, invalid_row_handler=on_invalid,
            ),
            convert_options=pacsv.ConvertOptions(
                column_types=column_types, strings_can_be_null=False,
                quoted_strings_can_be_null=False, check_utf8=check_utf8,
            ),
        )  # fmt: skip
    except pa.ArrowInvalid:  # invalid UTF-8, among others
        return None
    return None if invalid else table


def _csv_fields(data: bytes, n_lines: int) -> list[pa.Array] | None:
    """The three TAB-separated fields of every line of ``data`` via pyarrow's CSV tokenizer
    (no quoting, single-threaded: the caller is one of several parallel tasks), or None when a
    line needs the careful line-by-line path (a wrong field count, an empty field, a ``\\r``,
    invalid UTF-8 or a U+FFFD, or a count other than ``n_lines``)."""
    if not data or data.find(b"\r") >= 0 or (data.find(b"\xef") >= 0 and data.find(b"\xef\xbf\xbd") >= 0):
        return None
    table = read_three_fields(data, max(1 << 20, len(data) + 1),
                              {c: pa.string() for c in "spo"})
    if table is None or table.num_rows != n_lines:
        return None
    fields = [table.column(c).combine_chunks() for c in "spo"]
    for f in fields:
        if f.null_count or not pc.all(pc.greater(pc.binary_length(f), 0)).as_py():
            return None
    return fields


def parse_grouped_bytes(
    data: bytes,
    first_line: int,
    n_lines: int,
    source: str,
    *,
    single_object: bool = False,
    dictionary: bool = False,
) -> Parsed:
    """:func:`parse_grouped_facts` of the ``n_lines`` lines in ``data`` (raw bytes of whole
    lines, as :func:`hmn.formats.lines.read_byte_chunk` returns them), with the same result, faster: a clean chunk
    is tokenised by pyarrow's CSV reader; a chunk with any line to reject is parsed line by line.
    """
    fields = _csv_fields(data, n_lines)
    if fields is not None:
        try:
            sieve = LineSieve(None, first_line, source, n=n_lines)
            return _grouped_from_fields(sieve, fields, single_object, dictionary)
        except NeedLines:
            pass
    lines = bytes_to_lines(data)
    return parse_grouped_facts(
        lines, first_line, source, single_object=single_object, dictionary=dictionary
    )



def parse_triples(
    lines: pa.Array, first_line: int, source: str, *, dictionary: bool = False
) -> Parsed:
    """Parse plain triples ``head<TAB>relation<TAB>tail`` (FB15k-237's train/valid/test files)
    into the grouped-facts table (one object per row); see :func:`parse_grouped_facts`."""
    return parse_grouped_facts(lines, first_line, source, single_object=True, dictionary=dictionary)
