"""Unit tests for hmn.kb (the knowledge base from coded chunks, questions and names against it)
and hmn.parse_tasks (planning, parsing and joining the ingest's tasks); no Ray."""

import gzip
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pytest

from hmn import ids
from hmn import kb as kb_lib
from hmn.formats.coded import code_facts
from hmn.formats.grouped import parse_grouped_facts
from hmn.formats.registry import RdfOptions
from hmn.parse_tasks import ParseTask, join_source, parse_task, plan_tasks


def test_machine_id_codes_keep_string_order():
    """The integer id path for /m/ keys gives the same ids as a string sort, mixed keys too."""
    keys = ["/m/0abc", "/m/0ab", "/m/0_z", "/m/09", "/g/11x", "/m/0ABC", "/m/0" + "a" * 12,
            "/m/0" + "a" * 11, "/m/0b\u00e9", "/people/person", "/m/0zz"]  # fmt: skip
    codes = ids.mid_codes(pa.array(keys))
    ok = codes >= 0
    assert ok.tolist() == [True, True, True, True, False, False, False, True, False, False, True]
    order = np.argsort(codes[ok])
    assert ids.mid_strings(codes[ok][order]).to_pylist() == sorted(np.array(keys)[ok])
    for chunk_keys in (keys, [k for k, o in zip(keys, ok) if o]):
        half = len(chunk_keys) // 2
        parts = [(pa.array(chunk_keys[:half]), np.arange(half)[::-1]),
                 (pa.array(chunk_keys[half:]), np.arange(len(chunk_keys) - half))]  # fmt: skip
        distinct, gid = kb_lib.assign_ids(parts)
        assert distinct.to_pylist() == sorted(set(chunk_keys))
        got = [distinct[i].as_py() for i in gid]
        assert got == chunk_keys[:half][::-1] + chunk_keys[half:]


CHUNKS = [
    ["/m/02\t/r/b\t/m/01 /m/03", "/m/01\t/r/a\t/m/02", "/m/02\t/r/b\t/m/04 /m/01"],
    ["/m/01\t/r/a\t/m/05", "/g/07\t/r/c\t/m/01 /m/01", "/m/02\t/r/a\t/m/03"],
]


def _reference(chunks):
    """Facts by a dict: (subject, relation) -> objects in first-seen order."""
    facts: dict[tuple[str, str], list[str]] = {}
    for lines in chunks:
        for line in lines:
            s, r, objs = line.split("\t")
            seen = facts.setdefault((s, r), [])
            for o in objs.split():
                if o not in seen:
                    seen.append(o)
    return dict(sorted(facts.items()))


@pytest.mark.parametrize("threads", [0, 3])
@pytest.mark.parametrize("string_keys", [False, True])
def test_build_kb_merges_lines_of_one_pair(monkeypatch, threads, string_keys):
    chunks = CHUNKS if string_keys else [[ln for ln in c if "/g/" not in ln] for c in CHUNKS]
    coded = [code_facts(parse_grouped_facts(pa.array(c), 1, f"kb{i}").table)
             for i, c in enumerate(chunks)]  # fmt: skip
    assert string_keys == (not isinstance(coded[1].entities, np.ndarray))
    monkeypatch.setattr(kb_lib, "PARALLEL_MIN", 1)
    pool = ThreadPoolExecutor(threads) if threads else None
    built = kb_lib.build_kb(coded, [0, 1], 2, pool)
    keys = built.entity_keys.result() if pool is not None else built.entity_keys
    if pool is not None:
        pool.shutdown()
    ekeys, rkeys = keys.to_pylist(), built.relation_keys.to_pylist()
    assert ekeys == sorted(ekeys) and rkeys == sorted(rkeys)
    got = {(ekeys[f["subject_id"]], rkeys[f["relation_id"]]): [ekeys[o] for o in f["object_ids"]]
           for f in built.facts.to_pylist()}  # fmt: skip
    want = _reference(chunks)
    assert got == want and list(got) == list(want)  # fact ids in (subject, relation) order
    assert built.merged_lines.tolist() == [1, 1]  # (/m/02, /r/b) in kb0, (/m/01, /r/a) in kb1
    assert built.info["fact_lines"] == sum(len(c) for c in chunks)
    assert built.info["duplicate_objects_dropped"] == (2 if string_keys else 1)
    pairs = built.facts["subject_id"].to_numpy() * len(rkeys) + built.facts["relation_id"].to_numpy()
    assert built.fact_pairs.tolist() == pairs.tolist()


def _key_tables(shuffle: bool) -> kb_lib.KeyTables:
    entities = ["/m/01", "/m/02", "/m/03"]
    relations = ["/r/a", "/r/b"]
    subject, relation = np.array([0, 1, 2]), np.array([1, 0, 1])  # facts 0, 1, 2
    if shuffle:  # fact ids in another order than (subject, relation)
        subject, relation = subject[::-1], relation[::-1]
    return kb_lib.KeyTables.from_facts(np.array(entities, dtype=object), relations, subject,
                                       relation)  # fmt: skip


@pytest.mark.parametrize("shuffle", [False, True])
def test_match_questions_ids_and_reasons(shuffle):
    kb = _key_tables(shuffle)
    subject = pa.array(["/m/01", "/m/02", "/m/09", "/m/01", "/m/09", "/m/03"])
    relation = pa.array(["/r/b", "/r/a", "/r/a", "/r/a", "/r/z", "/r/b"])
    m = kb_lib.match_questions(subject, relation, kb)
    facts = [0, 1, -1, -1, -1, 2] if not shuffle else [2, 1, -1, -1, -1, 0]
    assert m.fact_id.tolist() == facts
    assert m.subject_id.tolist() == [0, 1, -1, 0, -1, 2]
    assert m.relation_id.tolist() == [1, 0, 0, 0, -1, 1]
    assert m.found.tolist() == [f >= 0 for f in facts]
    assert m.no_fact.tolist() == [False, False, False, True, False, False]
    assert m.reasons.to_pylist() == [
        "unknown subject '/m/09'",
        "no fact (/m/01, /r/a) in the knowledge base",
        "unknown relation '/r/z'",  # the relation is checked first
    ]
    empty = kb_lib.match_questions(pa.array([], pa.string()), pa.array([], pa.string()), kb)
    assert len(empty.fact_id) == 0 and len(empty.reasons) == 0


def test_resolve_questions_rejects_and_answers():
    kb = _key_tables(False)
    table = pa.table({
        "line": pa.array([3, 4, 5], pa.int64()), "subject": ["/m/01", "/m/09", "/m/02"],
        "relation": ["/r/b", "/r/a", "/r/a"], "object": ["/m/02", "/m/01", None],
        "question": ["q1", "q2", "q3"], "text": ["t1", "t2", "t3"],
    })  # fmt: skip
    answers = kb_lib.answer_codes(np.array([0, 1, 2, 3]), np.array([1, 0, 1]), 3)
    questions, rejects, info = kb_lib.resolve_questions("q.txt", table, kb, answers)
    assert questions.schema == kb_lib.KB_QUESTIONS_SCHEMA
    assert questions.column("fact_id").to_pylist() == [0, 1]
    assert questions.column("object_id").to_pylist() == [1, None]
    assert rejects.to_pylist() == [{"source": "q.txt", "line": 4, "text": "t2",
                                    "reason": "unknown subject '/m/09'"}]  # fmt: skip
    assert info == {"object_not_in_kb": 1, "answer_not_in_fact": 0, "no_fact": 0}


def test_resolve_questions_rejects_a_pair_that_is_not_a_fact_with_its_own_reason():
    """A question whose subject and relation both exist but whose (subject, relation) pair is
    not a fact is rejected as "no fact (...)", apart from an unknown subject or relation."""
    kb = _key_tables(False)  # facts (/m/01, /r/b), (/m/02, /r/a), (/m/03, /r/b)
    table = pa.table({
        "line": pa.array([1, 2, 3, 4, 5], pa.int64()),
        "subject": ["/m/02", "/m/01", "/m/09", "/m/03", "/m/01"],
        "relation": ["/r/b", "/r/b", "/r/a", "/r/z", "/r/a"],
        "object": ["/m/01", "/m/02", "/m/01", "/m/01", "/m/03"],
        "question": ["q1", "q2", "q3", "q4", "q5"], "text": ["t1", "t2", "t3", "t4", "t5"],
    })  # fmt: skip
    answers = kb_lib.answer_codes(np.array([0, 1, 2, 3]), np.array([1, 0, 1]), 3)
    questions, rejects, info = kb_lib.resolve_questions("q.txt", table, kb, answers)
    assert questions.column("line").to_pylist() == [2]
    assert questions.column("fact_id").to_pylist() == [0]
    assert rejects.column("line").to_pylist() == [1, 3, 4, 5]
    assert rejects.column("text").to_pylist() == ["t1", "t3", "t4", "t5"]
    assert rejects.column("reason").to_pylist() == [
        "no fact (/m/02, /r/b) in the knowledge base",  # both known, the pair is not a fact
        "unknown subject '/m/09'",
        "unknown relation '/r/z'",
        "no fact (/m/01, /r/a) in the knowledge base",
    ]
    assert info["no_fact"] == 2


def test_resolve_names_first_wins():
    keys = pa.array(["/m/01", "/m/02"])
    names = pa.table({"line": pa.array([1, 2, 3], pa.int64()), "entity": ["/m/02", "/m/09", "/m/02"],
                      "name": ["B", "X", "B2"], "text": ["a", "b", "c"]})  # fmt: skip
    col, skipped, counts, named = kb_lib.resolve_names([("n.tsv", names, True)], keys)
    assert col.to_pylist() == [None, "B"] and named == 1 and counts == {}
    assert [(p, t.column("reason").to_pylist()) for p, t in skipped] == [
        ("n.tsv", [kb_lib.SKIP_NOT_IN_KB]), ("n.tsv", [kb_lib.SKIP_DUPLICATE_NAME])]
    _, skipped, counts, _ = kb_lib.resolve_names([("dump.nt", names, False)], keys)
    assert skipped == [] and counts == {
        "dump.nt": {kb_lib.SKIP_NOT_IN_KB: 1, kb_lib.SKIP_DUPLICATE_NAME: 1}}


# ------------------------------------------------------------------------------------------------
# parse tasks
# ------------------------------------------------------------------------------------------------


def test_parse_task_json_round_trip():
    task = ParseTask(item=3, source=1, kind="facts", format="rdf", path="/x.nt", byte_start=5,
                     byte_end=90, rdf=RdfOptions(relations=("/a/b",), names=False))  # fmt: skip
    assert ParseTask.from_json(task.to_json()) == task
    plain = ParseTask(item=0, source=0, kind="names", format="names", path="/n.tsv")
    assert ParseTask.from_json(plain.to_json()) == plain
    with pytest.raises(ValueError, match="unknown facts format 'csv'; known: grouped"):
        ParseTask(0, 0, "facts", "csv", "/x").source_format  # noqa: B018


def test_plan_and_join_number_lines_across_tasks(tmp_path):
    """Byte-range tasks of a names file with bad lines, joined: the rows and rejects carry the
    file's line numbers, as one streamed task of the gzip copy does."""
    lines = [f"/m/0{i}\tName {i}" if i % 7 else "bad line" for i in range(1, 200)]
    plain = tmp_path / "names.tsv"
    plain.write_text("\n".join(lines) + "\n")
    packed = tmp_path / "names.tsv.gz"
    with gzip.open(packed, "wt") as f:
        f.write("\n".join(lines) + "\n")
    listed = [("names", None, str(plain), "names"), ("names", None, str(packed), "names")]
    tasks = plan_tasks(listed, 16, RdfOptions(), cpus=2, spread=False)
    by_source = [[t for t in tasks if t.source == s] for s in (0, 1)]
    assert len(by_source[0]) > 2 and [t.byte_end for t in by_source[1]] == [-1]
    joined = [join_source("names", [parse_task(t) for t in ts]) for ts in by_source]
    for j in joined:
        assert j.lines == len(lines) and j.rows + j.rejects.num_rows == len(lines)
        assert j.rejects.column("line").to_pylist() == list(range(7, 200, 7))
        assert j.table.column("line").to_pylist() == [i for i in range(1, 200) if i % 7]
        assert j.table.column("text")[0].as_py() == lines[0]
    assert joined[0].table.equals(joined[1].table)
