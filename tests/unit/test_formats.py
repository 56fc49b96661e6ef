"""Unit tests for the modules of hmn.formats (no Ray)."""

import bz2
import gzip
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from hmn.formats import lines as line_reading
from hmn.formats.choices import FACT_FORMATS
from hmn.formats.coded import CodedFacts, code_facts, parse_grouped_coded
from hmn.formats.embedding_text import read_embedding_text
from hmn.formats.grouped import (
    FACT_LINES_SCHEMA,
    parse_grouped_bytes,
    parse_grouped_facts,
    parse_triples,
)
from hmn.formats.keys import _normalize_full, normalize_key, normalize_keys
from hmn.formats.lines import (
    ByteChunk,
    bytes_to_lines,
    count_lines,
    iter_line_chunks,
    open_text,
    plan_byte_chunks,
    read_byte_chunk,
)
from hmn.formats.names import parse_names
from hmn.formats.parsed import REJECT_SCHEMA, FormatError
from hmn.formats.questions import parse_questions
from hmn.formats.rdf import (
    SKIP_BLANK,
    SKIP_LITERAL,
    SKIP_NAME_LANGUAGE,
    SKIP_NAMES_OFF,
    SKIP_NOT_ENTITY,
    SKIP_PREDICATE,
    parse_rdf,
)
from hmn.formats.registry import detect_format, resolve_format

# ------------------------------------------------------------------------------------------------
# keys
# ------------------------------------------------------------------------------------------------

ENTITY_FORMS = [
    "www.freebase.com/m/0abc",
    "http://www.freebase.com/m/0abc",
    "/m/0abc",
    "m.0abc",
    "<http://rdf.freebase.com/ns/m.0abc>",
    "http://rdf.freebase.com/ns/m.0abc",
    "  www.freebase.com/m/0abc\t",
]
RELATION_FORMS = [
    "www.freebase.com/people/person/place_of_birth",
    "/people/person/place_of_birth",
    "people.person.place_of_birth",
    "<http://rdf.freebase.com/ns/people.person.place_of_birth>",
]


@pytest.mark.parametrize("raw", ENTITY_FORMS)
def test_normalize_entity_forms(raw):
    assert normalize_key(raw) == "/m/0abc"


@pytest.mark.parametrize("raw", RELATION_FORMS)
def test_normalize_relation_forms(raw):
    assert normalize_key(raw) == "/people/person/place_of_birth"


def test_slash_keys_kept_as_is():
    fb15k = "/film/film/release_date_s./film/film_regional_release_date/film_release_region"
    assert normalize_key(fb15k) == fb15k
    assert normalize_key("/m/0_x-y") == "/m/0_x-y"


@pytest.mark.parametrize(
    "raw", ["", "   ", "xyz", "www.freebase.com/", "/", "/m/", "/m/0a b", "<m.0abc", "m..0a"]
)
def test_normalize_invalid_raises(raw):
    with pytest.raises(ValueError):
        normalize_key(raw)


def test_normalize_keys_vectorised_matches_scalar():
    raw = ENTITY_FORMS + RELATION_FORMS + ["xyz", "", None]
    out = normalize_keys(pa.array(raw, pa.string())).to_pylist()
    assert out[: len(ENTITY_FORMS)] == ["/m/0abc"] * len(ENTITY_FORMS)
    assert out[len(ENTITY_FORMS) : -3] == ["/people/person/place_of_birth"] * len(RELATION_FORMS)
    assert out[-3:] == [None, None, None]
    chunked = normalize_keys(pa.chunked_array([pa.array(["m.0x"]), pa.array(["/m/0y"])]))
    assert chunked.to_pylist() == ["/m/0x", "/m/0y"]


# ------------------------------------------------------------------------------------------------
# reading lines
# ------------------------------------------------------------------------------------------------

TEXT = "a\tb\n\nc d\r\n  \nlast"  # 5 lines: CRLF, empty, blank, no final newline


def _write(tmp_path, name, data: bytes):
    path = tmp_path / name
    if name.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(data)
    elif name.endswith(".bz2"):
        with bz2.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)
    return str(path)


def _all_lines(path, chunk_lines=1_000_000):
    out = []
    for first, lines in iter_line_chunks(path, chunk_lines):
        assert first == len(out) + 1
        out += lines.to_pylist()
    return out


@pytest.mark.parametrize("name", ["x.txt", "x.txt.gz", "x.txt.bz2"])
def test_iter_line_chunks_plain_and_compressed(tmp_path, name):
    path = _write(tmp_path, name, TEXT.encode())
    assert _all_lines(path) == ["a\tb", "", "c d", "  ", "last"]
    with open_text(path) as f:
        assert f.read() == TEXT.encode()


def test_trailing_newline_is_not_a_line(tmp_path):
    assert _all_lines(_write(tmp_path, "a.txt", b"x\ny\n")) == ["x", "y"]
    assert _all_lines(_write(tmp_path, "b.txt", b"x\ny\n\n")) == ["x", "y", ""]
    assert _all_lines(_write(tmp_path, "c.txt", b"\n")) == [""]
    assert _all_lines(_write(tmp_path, "d.txt", b"")) == []


@pytest.mark.parametrize("block", [1, 3, 7, 1 << 20])
@pytest.mark.parametrize("chunk_lines", [1, 2, 3, 100])
def test_chunk_boundaries_keep_line_numbers(tmp_path, monkeypatch, block, chunk_lines):
    monkeypatch.setattr(line_reading, "_BLOCK_BYTES", block)
    lines = [f"line{i}" if i % 4 else "" for i in range(1, 11)]
    path = _write(tmp_path, "x.txt", ("\n".join(lines) + "\n").encode())
    chunks = list(iter_line_chunks(path, chunk_lines))
    assert all(len(c) <= chunk_lines for _, c in chunks)
    assert [first for first, _ in chunks] == list(range(1, 11, chunk_lines))
    assert _all_lines(path, chunk_lines) == lines


def test_invalid_utf8_does_not_crash(tmp_path):
    path = _write(tmp_path, "x.txt", b"/m/1\t/a/b\t/m/2\n/m/1\t/a/\xff\t/m/2\n")
    ((first, lines),) = iter_line_chunks(path)
    parsed = parse_grouped_facts(lines, first, path)
    assert parsed.table.num_rows == 1
    assert parsed.rejects.to_pylist()[0]["line"] == 2
    assert parsed.rejects.to_pylist()[0]["reason"] == "invalid UTF-8"


# ------------------------------------------------------------------------------------------------
# parsers
# ------------------------------------------------------------------------------------------------


def _check_counts(parsed):
    assert parsed.lines == parsed.table.num_rows + parsed.rejects.num_rows
    assert parsed.rejects.schema == REJECT_SCHEMA


def test_parse_grouped_facts_good_and_bad():
    lines = pa.array(
        [
            "www.freebase.com/m/0f3xg_\twww.freebase.com/symbols/namesake/named_after\t"
            "www.freebase.com/m/0cqt90",
            "m.01\tpeople.person.nationality\tm.02 m.03  www.freebase.com/m/04 ",
            "www.freebase.com/m/01\twww.freebase.com/a/b",  # truncated
            "",
            "   ",
            "a\tb\tc\td",  # too many fields
            "xyz\t/a/b\t/m/1",
            "/m/1\tnot a key\t/m/2",
            "/m/1\t/a/b\t ",
            "/m/1\t/a/b\t/m/2 bad",
            "/m/1\t/a/b\t/m/9\ufffd",
        ]
    )
    parsed = parse_grouped_facts(lines, 100, "kb.txt")
    _check_counts(parsed)
    assert parsed.table.schema == FACT_LINES_SCHEMA
    assert parsed.table.to_pylist() == [
        {
            "line": 100,
            "subject": "/m/0f3xg_",
            "relation": "/symbols/namesake/named_after",
            "objects": ["/m/0cqt90"],
        },
        {
            "line": 101,
            "subject": "/m/01",
            "relation": "/people/person/nationality",
            "objects": ["/m/02", "/m/03", "/m/04"],
        },
    ]
    rejects = {r["line"]: r["reason"] for r in parsed.rejects.to_pylist()}
    assert rejects == {
        102: "expected 3 tab-separated fields, got 2",
        103: "empty line",
        104: "empty line",
        105: "expected 3 tab-separated fields, got 4",
        106: "invalid entity key 'xyz'",
        107: "invalid relation key 'not a key'",
        108: "no objects",
        109: "invalid entity key 'bad'",
        110: "invalid UTF-8",
    }
    texts = parsed.rejects.column("text").to_pylist()
    assert texts[0] == lines[2].as_py()
    assert set(parsed.rejects.column("source").to_pylist()) == {"kb.txt"}


def test_parse_grouped_facts_empty_input():
    parsed = parse_grouped_facts(pa.array([], pa.string()), 1, "x")
    assert parsed.lines == 0 and parsed.table.num_rows == 0 and parsed.rejects.num_rows == 0


def test_parse_questions():
    lines = pa.array(
        [
            "www.freebase.com/m/07f3jg\twww.freebase.com/people/person/place_of_birth\t"
            "www.freebase.com/m/0565d\twhere was sasha vujačić born ",
            "/m/1\t/a/b\t\twhat is it?",  # empty object: unknown answer
            "/m/1\t/a/b\t/m/2\t   ",
            "/m/1\t/a/b\t/m/2",
            "/m/1\t/a/b\t/m/2\tq\textra",
            "/m/1\tb\t/m/2\tq",
            "/m/1\t/a/b\toops\tq",
        ]
    )
    parsed = parse_questions(lines, 1, "q.txt")
    _check_counts(parsed)
    rows = parsed.table.to_pylist()
    assert rows[0] == {
        "line": 1,
        "subject": "/m/07f3jg",
        "relation": "/people/person/place_of_birth",
        "object": "/m/0565d",
        "question": "where was sasha vujačić born",
    }
    assert rows[1]["object"] is None and rows[1]["line"] == 2
    assert {r["line"]: r["reason"] for r in parsed.rejects.to_pylist()} == {
        3: "empty question",
        4: "expected 4 tab-separated fields, got 3",
        5: "expected 4 tab-separated fields, got 5",
        6: "invalid relation key 'b'",
        7: "invalid entity key 'oops'",
    }


def test_parse_names():
    lines = pa.array(
        ["www.freebase.com/m/01jp8ww\tHarder.....Faster", "/m/2\t  ", "/m/3", "zz\tName", ""]
    )
    parsed = parse_names(lines, 5, "names.tsv")
    _check_counts(parsed)
    assert parsed.table.to_pylist() == [
        {"line": 5, "entity": "/m/01jp8ww", "name": "Harder.....Faster"}
    ]
    assert {r["line"]: r["reason"] for r in parsed.rejects.to_pylist()} == {
        6: "empty name",
        7: "expected 2 tab-separated fields, got 1",
        8: "invalid entity key 'zz'",
        9: "empty line",
    }


# ------------------------------------------------------------------------------------------------
# embeddings
# ------------------------------------------------------------------------------------------------


def test_read_embedding_tab_and_space(tmp_path):
    path = _write(
        tmp_path, "e.txt", b"www.freebase.com/m/01\t0.5 -1 2e-1\nm.02 1 2 3\n/a/b\t4\t5\t6\n\n"
    )
    keys, vec = read_embedding_text(path)
    assert keys == ["/m/01", "/m/02", "/a/b"]
    assert vec.dtype == np.float32 and vec.shape == (3, 3)
    np.testing.assert_allclose(vec[0], [0.5, -1, 0.2])


def test_read_embedding_header_and_gzip(tmp_path):
    path = _write(tmp_path, "e.txt.gz", b"2 2\n/m/1 1 2\n/m/2 3 4\n")
    keys, vec = read_embedding_text(path, expected_dim=2)
    assert keys == ["/m/1", "/m/2"] and vec.shape == (2, 2)


def test_read_embedding_words_without_normalisation(tmp_path):
    path = _write(tmp_path, "w.txt", "the 1 2\nnaïve 3 4\n".encode())
    keys, vec = read_embedding_text(path, normalize=False)
    assert keys == ["the", "naïve"] and vec.shape == (2, 2)
    with pytest.raises(FormatError, match="invalid key 'the'"):
        read_embedding_text(path)


@pytest.mark.parametrize(
    "data, expected_dim, line, message",
    [
        (b"/m/1 1 2\n/m/2 3 4\n", 3, 1, "expected 3 values"),
        (b"/m/1 1 2\n/m/2 3 4 5\n", None, 2, "expected 2 values"),
        (b"/m/1 1 2\n/m/2 3 x\n", None, 2, "non-numeric value 'x'"),
        (b"/m/1 1 2\n/m/2 3 4\n/m/3 5 1.2.3\n", None, 3, "non-numeric value '1.2.3'"),
        (b"/m/1 1 2\n/m/2 nan 4\n", None, 2, "non-finite"),
        (b"/m/1 1 2\n/m/2 3 -inf\n", None, 2, "non-finite"),
        (b"/m/1 1 2\n/m/2 3 4\nm.1 5 6\n", None, 3, "duplicate key '/m/1' (first seen on line 1)"),
        (b"3 2\n/m/1 1 2\n/m/2 3 4\n", None, 1, "header announces 3 rows, file has 2"),
        (b"2 4\n/m/1 1 2\n", 2, 1, "header dimension 4"),
        (b"/m/1 1 2\nxyz 3 4\n", None, 2, "invalid key 'xyz'"),
        (b"/m/1 1 2\n/m/2\n", None, 2, "expected a key followed by values"),
    ],
)
def test_read_embedding_errors_name_file_and_line(tmp_path, data, expected_dim, line, message):
    path = _write(tmp_path, "e.txt", data)
    with pytest.raises(FormatError) as err:
        read_embedding_text(path, expected_dim=expected_dim)
    assert err.value.line == line
    assert f"{path}:{line}:" in str(err.value)
    assert message in str(err.value)


# ------------------------------------------------------------------------------------------------
# package boundary
# ------------------------------------------------------------------------------------------------


def test_hmn_does_not_import_ray():
    code = ("import pkgutil, importlib, sys, hmn.formats, hmn.synthetic\n"
            "for m in pkgutil.iter_modules(hmn.formats.__path__):\n"
            "    importlib.import_module('hmn.formats.' + m.name)\n"
            "print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ------------------------------------------------------------------------------------------------
# fast normalisation path == full regex path
# ------------------------------------------------------------------------------------------------


def test_fast_path_matches_full_path():
    raw = ENTITY_FORMS + RELATION_FORMS + [
        "www.freebase.com/m/0a ", " /m/0b", "/m/0c\u00a0", "www.freebase.com//m", "/a//b", "/a/b/",
        "www.freebase.com/", "xyz", "", None, "<http://rdf.freebase.com/ns/m.0x>", "/m/0_x-y",
    ]  # fmt: skip
    arr = pa.array(raw * 30, pa.string())  # >= 64 values: the dictionary path
    fast = normalize_keys(arr).to_pylist()
    full = _normalize_full(arr).to_pylist()
    assert fast == full
    assert normalize_keys(pa.array(raw, pa.string())).to_pylist() == full[: len(raw)]


# ------------------------------------------------------------------------------------------------
# triples (FB15k-237)
# ------------------------------------------------------------------------------------------------

FB15K = Path(__file__).parents[3] / "shared/data/fb15k-237/train.txt"


def test_parse_triples():
    lines = pa.array(
        [
            "/m/027rn\t/location/country/form_of_government\t/m/06cx9",
            "/m/017dcd\t/tv/tv_program/regular_cast./tv/regular_tv_appearance/actor\t/m/06v8s0",
            "/m/01\t/a/b\t/m/02 /m/03",
            "/m/01\t/a/b",
        ]
    )
    parsed = parse_triples(lines, 1, "train.txt")
    _check_counts(parsed)
    assert [r["objects"] for r in parsed.table.to_pylist()] == [["/m/06cx9"], ["/m/06v8s0"]]
    assert parsed.table.column("relation")[1].as_py().startswith("/tv/tv_program/regular_cast.")
    assert {r["line"]: r["reason"] for r in parsed.rejects.to_pylist()} == {
        3: "expected one tail entity, got 2",
        4: "expected 3 tab-separated fields, got 2",
    }


@pytest.mark.skipif(not FB15K.is_file(), reason=f"{FB15K} not present")
def test_real_fb15k_triples_parse_cleanly():
    assert detect_format(str(FB15K)) == "triples"
    first, lines = next(iter_line_chunks(str(FB15K), 100_000))
    parsed = parse_triples(lines, first, str(FB15K))
    assert parsed.rejects.num_rows == 0 and parsed.table.num_rows == 100_000


# ------------------------------------------------------------------------------------------------
# RDF dump
# ------------------------------------------------------------------------------------------------

NS = "http://rdf.freebase.com/ns/"
RDF_LINES = [
    f"<{NS}m.0abc>\t<{NS}people.person.place_of_birth>\t<{NS}m.0xyz>\t.",  # 1 fact (TABs)
    f'<{NS}m.0abc> <{NS}type.object.name> "Sasha \\"V\\" Name"@en .',  # 2 name
    f'<{NS}m.0abc> <{NS}type.object.name> "Nom"@fr .',  # 3 skipped: language
    f'<{NS}m.0abc> <{NS}people.person.height_meters> "1.8" .',  # 4 skipped: literal
    f"<{NS}m.0abc> <http://www.w3.org/1999/02/22-rdf-syntax-ns#type> <{NS}people.person> .",  # 5
    f"<{NS}m.0abc> <{NS}type.object.type> <{NS}people.person> .",  # 6 skipped: not an entity
    "",  # 7 blank
    "# comment",  # 8 blank/comment
    "garbage",  # 9 malformed
    f"<{NS}m.0abc> <{NS}a.b> <{NS}m.0x>",  # 10 malformed: no final dot
    f"m.0abc <{NS}a.b> <{NS}m.0x> .",  # 11 malformed subject
    f"<{NS}m.0q> <{NS}film.film.directed_by> <{NS}m.0r> .",  # 12 fact (spaces)
]


def test_parse_rdf_all_relations_and_names():
    parsed = parse_rdf(pa.array(RDF_LINES), 1, "dump.nt")
    assert parsed.lines == parsed.accounted() == len(RDF_LINES)
    assert parsed.table.to_pylist() == [
        {"line": 1, "subject": "/m/0abc", "relation": "/people/person/place_of_birth",
         "objects": ["/m/0xyz"]},
        {"line": 12, "subject": "/m/0q", "relation": "/film/film/directed_by",
         "objects": ["/m/0r"]},
    ]  # fmt: skip
    assert parsed.names.to_pylist() == [{"line": 2, "entity": "/m/0abc", "name": 'Sasha "V" Name'}]
    assert parsed.skipped == {
        SKIP_BLANK: 2,
        SKIP_PREDICATE: 1,
        SKIP_LITERAL: 1,
        SKIP_NAME_LANGUAGE: 1,
        SKIP_NOT_ENTITY: 1,
    }
    rejects = {r["line"]: r["reason"] for r in parsed.rejects.to_pylist()}
    assert set(rejects) == {9, 10, 11}
    assert rejects[11] == "invalid subject term 'm.0abc'"
    assert rejects[9].startswith("expected N-Triples")


def test_parse_rdf_relation_filter_and_no_names():
    parsed = parse_rdf(
        pa.array(RDF_LINES), 100, "dump.nt",
        relations=pa.array(["/film/film/directed_by"]), names=False,
    )  # fmt: skip
    assert parsed.lines == parsed.accounted()
    assert [r["line"] for r in parsed.table.to_pylist()] == [111]
    assert parsed.names.num_rows == 0
    assert parsed.skipped[SKIP_NAMES_OFF] == 2
    assert parsed.skipped[SKIP_PREDICATE] == 4  # birth place, height, both types


def test_parse_rdf_gzip_and_detection(tmp_path):
    path = _write(tmp_path, "dump.nt.gz", ("\n".join(RDF_LINES) + "\n").encode())
    assert detect_format(path) == "rdf"
    ((first, lines),) = iter_line_chunks(path)
    parsed = parse_rdf(lines, first, path)
    assert parsed.table.num_rows == 2 and parsed.names.num_rows == 1


@pytest.mark.parametrize(
    "name, text, fmt",
    [
        ("kb.txt", "www.freebase.com/m/01\twww.freebase.com/a/b/c\twww.freebase.com/m/02\n", "grouped"),
        ("kb.txt.bz2", "/m/01\t/a/b/c\t/m/02 /m/03\n", "grouped"),
        ("train.txt", "/m/01\t/a/b/c\t/m/02\n/m/03\t/a/b\t/m/04\n", "triples"),
        ("q.txt.gz", "/m/01\t/a/b\t/m/02\twho is it\n", "simplequestions"),
        ("names.tsv", "# header comment\n/m/01\tSome Name\n", "names"),
    ],
)  # fmt: skip
def test_detect_format(tmp_path, name, text, fmt):
    assert detect_format(_write(tmp_path, name, text.encode())) == fmt


def test_detect_and_resolve_errors(tmp_path):
    with pytest.raises(FormatError, match="empty file"):
        detect_format(_write(tmp_path, "e.txt", b""))
    with pytest.raises(FormatError, match="5 TAB-separated"):
        detect_format(_write(tmp_path, "f.txt", b"a\tb\tc\td\te\n"))
    names = _write(tmp_path, "n.tsv", b"/m/01\tName\n")
    with pytest.raises(FormatError, match="not a facts_format"):
        resolve_format(names, "auto", FACT_FORMATS, "facts_format")
    with pytest.raises(ValueError, match="facts_format='csv'"):
        resolve_format(names, "csv", FACT_FORMATS, "facts_format")
    assert resolve_format(names, "grouped", FACT_FORMATS, "facts_format") == "grouped"


def test_dictionary_output_decodes_to_the_string_table():
    lines = pa.array(
        ["m.01\tpeople.person.nationality\tm.02 m.03", "/m/01\t/a/b\t/m/02", "xyz\t/a/b\t/m/1",
         "/m/1\t/a/b\t/m/2 bad", "www.freebase.com/m/01\t/a/b\twww.freebase.com/m/02"] * 20
    )  # fmt: skip
    plain = parse_grouped_facts(lines, 1, "kb")
    coded = parse_grouped_facts(lines, 1, "kb", dictionary=True)
    assert pa.types.is_dictionary(coded.table.schema.field("subject").type)
    assert coded.table.cast(FACT_LINES_SCHEMA).equals(plain.table)
    assert coded.rejects.equals(plain.rejects)
    keys = normalize_keys(pa.array(["m.01", "/m/01", "bad", None], pa.string()), dictionary=True)
    assert keys.cast(pa.string()).to_pylist() == ["/m/01", "/m/01", None, None]
    assert keys.null_count == 2  # invalid keys are null indices


@pytest.mark.parametrize(
    "text",
    [
        "www.freebase.com/m/01\twww.freebase.com/a/b\twww.freebase.com/m/02 m.03\n/m/04\t/a/b\t/m/05\n",
        "/m/01\t/a/b\t/m/02\n/m/04\t/a/b\t/m/05",  # no final newline
        "/m/01\t/a/b\t/m/02\n\n/m/04\t/a/b\t/m/05\n",  # empty line
        "/m/01\t/a/b\t/m/02\r\n/m/04\t/a/b\t/m/05\r\n",  # CRLF
        "/m/01\t/a/b\n/m/04\t/a/b\t/m/05\n",  # field count
        "/m/01\t/a/b\t/m/02\t\n",  # trailing TAB
        "/m/01\t/a/b\t \n",  # no objects
        "xyz\t/a/b\t/m/02\n",  # bad key
        '/m/01\t/a/b\t"/m/02"\n',  # quotes are plain characters
        "/m/01\t/a/\xff\t/m/02\n/m/01\t/a/b\t/m/02\n",  # invalid UTF-8 (latin-1 byte)
        "",
    ],
)  # fmt: skip
@pytest.mark.parametrize("single_object", [False, True])
def test_parse_grouped_bytes_equals_line_path(text, single_object):
    data = text.encode("latin-1") if "\xff" in text else text.encode()
    n = data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
    fast = parse_grouped_bytes(data, 7, n, "kb", single_object=single_object)
    lines = bytes_to_lines(data)
    slow = parse_grouped_facts(lines, 7, "kb", single_object=single_object)
    assert fast.lines == slow.lines == n
    assert fast.table.equals(slow.table) and fast.rejects.equals(slow.rejects)


# ------------------------------------------------------------------------------------------------
# machine-id codes (hmn.ids), byte-range chunks, the coded fast path of the ingest stage
# ------------------------------------------------------------------------------------------------


def test_prefixed_mid_codes_match_normalised_codes():
    from hmn import ids

    suffixes = ["0abc", "09", "0_z", "0" + "a" * 7, "0" + "a" * 11, "zz"]
    want = ids.mid_codes(pa.array(["/m/" + s for s in suffixes]))
    assert (want >= 0).all()
    for prefix in ids.MID_PREFIXES:
        raw = pa.array([prefix + s for s in suffixes])
        assert ids.prefixed_mid_codes(raw).tolist() == want.tolist()
        assert ids.mid_codes(normalize_keys(raw)).tolist() == want.tolist()
    assert ids.mid_strings(want).to_pylist() == ["/m/" + s for s in suffixes]
    for bad in (["/m/0abc", "m.09"], ["/m/0aBc"], ["/m/0a b"], ["/m/"], ["/m/0" + "a" * 12],
                ["/m/0b\u00e9"], ["/g/11x"], ["/m/0a.b"], ["/m/0a\x00"], [" /m/0abc"]):  # fmt: skip
        assert ids.prefixed_mid_codes(pa.array(bad)) is None, bad


@pytest.mark.parametrize("seed", range(4))
def test_window_ids_equal_codes_and_local_unique(seed):
    """The hashed 8-byte windows give the codes and positions of prefixed_mid_codes +
    local_unique: several columns, spellings, suffix lengths 1..8, sliced arrays."""
    from hmn import ids

    rng = np.random.default_rng(seed)
    pool = ["".join(rng.choice(list(ids.MID_CHARS[: rng.choice([2, 5, 37])]), rng.integers(1, 9)))
            for _ in range(200)]  # fmt: skip
    for _ in range(30):
        cols = []
        for _c in range(int(rng.integers(1, 4))):
            prefix = ids.MID_PREFIXES[int(rng.integers(0, 3))]
            n = int(rng.integers(0, 60))
            col = pa.array([prefix + pool[int(rng.integers(0, len(pool)))] for _ in range(n)])
            cols.append(col.slice(1, n - 2) if n > 2 and rng.random() < 0.3 else col)
        got = ids.window_ids(cols)
        assert got is not None
        codes = np.concatenate([ids.prefixed_mid_codes(c) for c in cols])
        uniq, inv = ids.local_unique(codes)
        assert got[0].tolist() == uniq.tolist()
        assert [len(g) for g in got[1]] == [len(c) for c in cols]
        assert np.concatenate(got[1]).tolist() == inv.tolist()


def test_window_ids_refuse_other_keys():
    from hmn import ids

    for bad in (["www.freebase.com/m/0a-b"], ["www.freebase.com/m/\x00ab"], ["/m/a\x00b"],
                ["www.freebase.com/m//m/abcde"], ["/m/"], ["/m/0abcdefgh"], ["/m/0aBc"],
                ["m.0b\u00e9"], ["www.freebase.com/m/0ab", "/m/0ab"], ["/g/11x"],
                ["/m/0ab", None]):  # fmt: skip
        assert ids.window_ids([pa.array(bad, pa.string())]) is None, bad
    # one spelling per column, different spellings across columns: the same entity
    uniq, (a, b) = ids.window_ids([pa.array(["www.freebase.com/m/0ab"]), pa.array(["m.0ab"])])
    assert ids.mid_strings(uniq).to_pylist() == ["/m/0ab"] and a.tolist() == b.tolist() == [0]


@pytest.mark.parametrize("max_len", [7, 12])
def test_local_unique_and_sorted_union(max_len):
    from hmn import ids

    rng = np.random.default_rng(max_len)
    keys = ["/m/0" + "".join(rng.choice(list("ab_19z"), rng.integers(0, max_len)))
            for _ in range(3000)]  # fmt: skip
    codes = ids.mid_codes(pa.array(keys))
    uniq, inv = ids.local_unique(codes)
    assert inv.dtype == np.int32 and (uniq[inv] == codes).all()
    assert ids.mid_strings(uniq).to_pylist() == sorted(set(keys))
    parts = [uniq[::2], uniq[1::3], uniq[:5], uniq[:0]]
    union, pos = ids.sorted_union(parts)
    assert union.tolist() == sorted(set(np.concatenate(parts).tolist()))
    assert all((union[p] == q).all() for p, q in zip(pos, parts))


@pytest.mark.parametrize("tail", [b"\n", b""])
@pytest.mark.parametrize("chunk_bytes", [1, 7, 40, 1000])
def test_plan_byte_chunks_cover_whole_lines(tmp_path, chunk_bytes, tail):
    lines = [b"x" * (i % 13) for i in range(50)]
    data = b"\n".join(lines) + tail
    path = _write(tmp_path, "f.txt", data)
    plan = plan_byte_chunks(path, chunk_bytes)
    assert plan[0].byte_start == 0 and plan[-1].byte_end == len(data)
    got = []
    for a, b in zip(plan, plan[1:] + [None]):
        piece = read_byte_chunk(a)
        if b is not None:
            assert a.byte_end == b.byte_start and piece.endswith(b"\n")
        got += bytes_to_lines(piece).to_pylist()
    assert got == [ln.decode() for ln in lines]
    assert sum(count_lines(read_byte_chunk(c)) for c in plan) == len(lines)
    assert plan_byte_chunks(_write(tmp_path, "e.txt", b""), chunk_bytes) == []


def _coded_equal(a, b):
    a, b = a.with_objects_moved(), b.with_objects_moved()
    assert type(a.entities) is type(b.entities)
    if isinstance(a.entities, np.ndarray):
        assert a.entities.tolist() == b.entities.tolist()
    else:
        assert a.entities.equals(b.entities)
    assert a.relations.equals(b.relations)
    for name in ("subject", "relation", "offsets", "objects"):
        assert getattr(a, name).tolist() == getattr(b, name).tolist(), name


CODED_TEXTS = [
    "www.freebase.com/m/01\twww.freebase.com/a/b\twww.freebase.com/m/02 www.freebase.com/m/01\n"
    "www.freebase.com/m/04\twww.freebase.com/a/b\twww.freebase.com/m/05\n"
    "www.freebase.com/m/04\ta.b\twww.freebase.com/m/02\n",  # clean (two relation spellings)
    "/m/01\t/a/b\t/m/02\n/m/04\t/c/d\t/m/05",  # no final newline
    "/m/09\t/c/d\t/m/02\n/m/01\t/e/f\t/m/05 /m/09\n/m/09\t/a/b\t/m/01\n/m/01\t/c/d\t/m/0\n"
    "/m/09\t/c/d\t/m/03\n",  # rows to reorder by (subject, relation, line)
    "m.01\t/a/b\tm.02\r\nm.04\t/a/b\tm.05\r\n",  # CRLF
    "/m/01\t/a/b\t/m/02\n\n/m/04\t/a/b\t/m/05\n",  # empty line
    "/m/01\t/a/b\n/m/04\t/a/b\t/m/05\n",  # field count
    "/m/01\t/a/b\t/m/02  /m/03\n",  # double space
    "/m/01\t/a/b\t/m/02 \n",  # trailing space
    "/m/01\t/a/b\t/m/02\r/m/03\n",  # lone CR
    "/m/01\t/a/b\tm.02\n/m/04\t/a/b\t/m/05\n",  # two spellings in one column
    "/m/01\t/a/b\t/g/02\n",  # not a machine id
    "/m/01\t\t/m/02\n",  # empty relation
    "/m/01\tbad\t/m/02\n",  # invalid relation
    "/m/01\t/a/\ufffd\t/m/02\n",  # U+FFFD
    "/m/01\t/a/b\t\"/m/02\"\n",  # quotes are plain characters
    "/m/0ABC\t/a/b\t/m/02\n",  # canonical, but not a machine-id code
]


@pytest.mark.parametrize("text", CODED_TEXTS)
@pytest.mark.parametrize("single_object", [False, True])
def test_parse_grouped_coded_equals_careful_path(tmp_path, text, single_object):
    data = text.encode()
    n = count_lines(data)
    careful = parse_grouped_bytes(data, 1, n, "kb", single_object=single_object,
                                          dictionary=True)  # fmt: skip
    fast = parse_grouped_coded(data, "kb", single_object=single_object)
    # the same through a memory-mapped byte range of a file
    path = _write(tmp_path, "kb.txt", b"/m/0\t/a/b\t/m/0\n" + data)
    mapped = parse_grouped_coded(ByteChunk(path, 15, 15 + len(data)), "kb",
                                         single_object=single_object) if data else None  # fmt: skip
    assert (fast is None) == (mapped is None)
    if fast is None:  # the careful path must then have a reason (or a spelling to normalise)
        return
    _coded_equal(mapped[0], fast[0])
    assert mapped[1].lines == fast[1].lines
    coded, parsed = fast
    assert careful.rejects.num_rows == 0 and parsed.rejects.num_rows == 0
    assert parsed.lines == careful.lines == n and coded.rows == n
    _coded_equal(coded, code_facts(careful.table))
    back = CodedFacts.from_table(coded.to_table())
    _coded_equal(back, coded)


def test_parse_grouped_coded_takes_clean_chunks():
    assert parse_grouped_coded(CODED_TEXTS[0].encode(), "kb") is not None
    assert parse_grouped_coded(CODED_TEXTS[2].encode(), "kb") is not None
    assert parse_grouped_coded(CODED_TEXTS[3].encode(), "kb") is not None
    for text in CODED_TEXTS[4:]:
        assert parse_grouped_coded(text.encode(), "kb") is None, text
    # triples: a line with two objects goes to the careful path (it is rejected there)
    assert parse_grouped_coded(CODED_TEXTS[0].encode(), "kb", single_object=True) is None
    assert parse_grouped_coded(CODED_TEXTS[1].encode(), "kb", single_object=True)


def test_code_facts_with_string_keys():
    lines = pa.array(["/m/01\t/a/b\t/g/02 /m/01", "/m/01\t/a/a\t/m/03"])
    coded = code_facts(parse_grouped_facts(lines, 1, "kb").table)
    assert coded.entities.to_pylist() == ["/g/02", "/m/01", "/m/03"]
    assert coded.relations.to_pylist() == ["/a/a", "/a/b"]
    # rows sorted by (subject, relation): the second line first
    assert coded.subject.tolist() == [1, 1] and coded.relation.tolist() == [0, 1]
    assert coded.offsets.tolist() == [0, 1, 3] and coded.objects.tolist() == [2, 0, 1]
    assert not coded.repeats
    again = code_facts(parse_grouped_facts(pa.array(["/m/01\t/a/b\t/m/02 /m/03 /m/02"]),
                                                   1, "kb").table)  # fmt: skip
    assert again.repeats


@pytest.mark.parametrize("data", [
    b"/m/0\xff1\t/a/b\t/m/02\n",  # subject (short key)
    b"/m/01\t/a/b\t/m/02 /m/0\xc3\n",  # object, truncated multi-byte sequence
    b"/m/01\t/a/\xff\t/m/02\n/m/03\t/a/b\t/m/02\n",  # relation
    b"/m/01\t/a/b\xc3\x28\t/m/02\n",  # relation, invalid continuation byte
    b"/m/0123456789\xff\t/a/b\t/m/02\n",  # subject of more than 8 characters
    b"/m/01\t/a/b\t/m/0123456789a \xe2\x82\n",  # long keys, truncated sequence in an object
])  # fmt: skip
def test_parse_grouped_coded_refuses_invalid_utf8(data):
    """The CSV reader of the fast path skips its UTF-8 check: invalid bytes anywhere still send
    the chunk to the careful path, which rejects the line as invalid UTF-8."""
    assert parse_grouped_coded(data, "kb") is None
    careful = parse_grouped_bytes(data, 1, count_lines(data), "kb",
                                          dictionary=True)  # fmt: skip
    assert "invalid UTF-8" in careful.rejects.column("reason").to_pylist()
