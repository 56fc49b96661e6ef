"""Integration tests of the ingest stage on a local Ray (tiny synthetic data in tmp_path)."""

import gzip
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from hmn.formats import normalize_key
from hmn.synthetic import SyntheticSpec, generate
from pipeline.stages.ingest import IngestSources, run_ingest

REAL = Path(__file__).parents[3] / "shared/data/simplequestions"

SPEC = SyntheticSpec(
    entities=300, relations=20, facts=500, train_questions=150, dev_questions=40,
    test_questions=40, seed=1,
)  # fmt: skip


def _insert(path: Path, at: int, new_lines: list[str]) -> None:
    """Insert lines so that the first new line becomes line ``at`` (1-based)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[at - 1 : at - 1] = new_lines
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Synthetic KB with injected bad lines; returns (IngestSources, expectations)."""
    d = tmp_path_factory.mktemp("ingest_src")
    files = {k: Path(v) for k, v in generate(SPEC, str(d))["files"].items()}
    kb_lines = files["kb"].read_text(encoding="utf-8").splitlines()
    subj, rel, objs = kb_lines[0].split("\t")
    first_names = files["names"].read_text(encoding="utf-8").splitlines()[0]
    _insert(
        files["kb"],
        10,
        [
            f"{subj}\t{rel}",  # truncated line -> line 10
            f"{subj}\t{rel}\t{objs}\textra",  # wrong column count -> line 11
            f"{subj}\t{rel}\t{objs} www.freebase.com/m/0zzzzzz",  # merges into fact of line 1
        ],
    )
    _insert(
        files["names"],
        3,
        [
            "www.freebase.com/m/0notinkb\tNobody",  # line 3: skipped
            first_names.split("\t")[0] + "\tSecond Name",  # line 4: skipped (duplicate)
        ],
    )
    q_subject = files["questions_train"].read_text(encoding="utf-8").split("\t")[0]
    _insert(
        files["questions_train"],
        5,
        [f"{q_subject}\twww.freebase.com/no/such/relation\twww.freebase.com/m/01\twhat is it"],
    )
    dev_gz = d / "questions_dev.txt.gz"
    with open(files["questions_dev"], "rb") as src, gzip.open(dev_gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    srcs = IngestSources(
        facts=[str(files["kb"])],
        names=[str(files["names"])],
        questions={
            "train": [str(files["questions_train"])],
            "dev": [str(dev_gz)],
            "test": [str(files["questions_test"])],
        },
    )
    return srcs, {"first_fact": (normalize_key(subj), normalize_key(rel), objs.split())}


@pytest.fixture(scope="module")
def ingested(ray_local, sources, tmp_path_factory):
    srcs, _ = sources
    out = tmp_path_factory.mktemp("ingest_out") / "staging"
    stats = run_ingest(srcs, str(out), chunk_lines=128)
    return out, stats


def _read(out: Path, rel: str):
    return pq.read_table(out / rel)


def test_rejects_have_reasons_and_lines(sources, ingested):
    srcs, _ = sources
    out, stats = ingested
    rejects = {
        (r["source"], r["line"]): r["reason"] for r in _read(out, "rejects.parquet").to_pylist()
    }
    kb, names, train = srcs.facts[0], srcs.names[0], srcs.questions["train"][0]
    assert rejects == {
        (kb, 10): "expected 3 tab-separated fields, got 2",
        (kb, 11): "expected 3 tab-separated fields, got 4",
        (names, 3): "entity not in knowledge base",
        (names, 4): "duplicate name for entity",
        (train, 5): "unknown relation '/no/such/relation'",
    }
    s = stats["sources"]
    assert s[kb]["rejected"] == 2 and s[kb]["merged_lines"] == 1
    assert s[names]["skipped"] == 2 and s[names]["rejected"] == 0
    assert s[train]["rejected"] == 1 and s[train]["malformed"] == 0
    assert s[train]["by_reason"] == {"unknown relation '...'": 1}
    for path, src in s.items():
        assert src["lines"] == src["accepted"] + src["rejected"] + src["skipped"], path
    assert stats["checks"]["lines_accounted"] is True
    assert json.loads((out / "stats.json").read_text())["totals"] == stats["totals"]


def test_ids_dense_sorted_and_consistent(sources, ingested):
    _, expect = sources
    out, stats = ingested
    entities = _read(out, "kb/entities.parquet")
    relations = _read(out, "kb/relations.parquet")
    facts = _read(out, "kb/facts.parquet")
    ekeys, rkeys = entities["key"].to_pylist(), relations["key"].to_pylist()
    assert entities["entity_id"].to_pylist() == list(range(len(ekeys)))
    assert ekeys == sorted(ekeys) and len(set(ekeys)) == len(ekeys)
    assert relations["relation_id"].to_pylist() == list(range(len(rkeys)))
    assert rkeys == sorted(rkeys)
    rows = facts.to_pylist()
    assert [f["fact_id"] for f in rows] == list(range(len(rows)))
    pairs = [(ekeys[f["subject_id"]], rkeys[f["relation_id"]]) for f in rows]
    assert pairs == sorted(pairs) and len(set(pairs)) == len(pairs)
    assert len(rows) == SPEC.facts == stats["totals"]["facts"]
    assert stats["totals"]["entities"] == len(ekeys)

    # the merged line added one object to the first fact, after its original objects
    s, r, objs = expect["first_fact"]
    merged = rows[pairs.index((s, r))]
    want = [normalize_key(o) for o in objs] + ["/m/0zzzzzz"]
    assert [ekeys[i] for i in merged["object_ids"]] == want

    names = dict(zip(ekeys, entities["name"].to_pylist()))
    assert "/m/0notinkb" not in names
    assert sum(n is not None for n in names.values()) == stats["totals"]["named_entities"]

    answers = {f["fact_id"]: set(f["object_ids"]) for f in rows}
    for split, n in (("train", SPEC.train_questions), ("dev", 40), ("test", 40)):
        q = _read(out, f"questions/{split}.parquet").to_pylist()
        assert len(q) == n == stats["totals"]["questions"][split]
        for row in q:
            fact = rows[row["fact_id"]]
            assert (fact["subject_id"], fact["relation_id"]) == (
                row["subject_id"],
                row["relation_id"],
            )
            assert row["object_id"] in answers[row["fact_id"]]
            assert names[ekeys[row["subject_id"]]] is not None


def test_two_runs_identical(sources, ingested, tmp_path):
    srcs, _ = sources
    out, _ = ingested
    again = tmp_path / "again"
    run_ingest(srcs, str(again), chunk_lines=1_000_000)  # different chunking, same result
    for rel in [
        "kb/entities.parquet",
        "kb/relations.parquet",
        "kb/facts.parquet",
        "questions/train.parquet",
        "questions/dev.parquet",
        "questions/test.parquet",
        "rejects.parquet",
    ]:
        assert _read(out, rel).equals(_read(again, rel)), rel


def test_reject_rate_limit_raises(sources, ray_local, tmp_path):
    srcs, _ = sources
    with pytest.raises(ValueError) as err:
        run_ingest(srcs, str(tmp_path / "strict"), max_reject_rate=0.001)
    msg = str(err.value)
    assert srcs.facts[0] in msg and "max_reject_rate 0.001" in msg
    assert "line 10: expected 3 tab-separated fields, got 2" in msg
    assert (tmp_path / "strict" / "rejects.parquet").exists()


def test_out_dir_must_be_fresh(sources, ingested):
    srcs, _ = sources
    out, _ = ingested
    with pytest.raises(FileExistsError):
        run_ingest(srcs, str(out))


@pytest.mark.skipif(not REAL.is_dir(), reason=f"{REAL} not present")
def test_real_simplequestions(ray_local, tmp_path):
    srcs = IngestSources(
        facts=[str(REAL / "kb.txt")],
        names=[str(REAL / "names.tsv")],
        questions={"train": [str(REAL / "questions_train.txt")]},
    )
    stats = run_ingest(srcs, str(tmp_path / "sq"), chunk_lines=10_000)
    kb = stats["sources"][str(REAL / "kb.txt")]
    assert kb["lines"] == 29_423
    assert kb["accepted"] + kb["rejected"] + kb["skipped"] == 29_423
    assert stats["totals"]["fact_lines"] + kb["rejected"] == 29_423
    assert stats["totals"]["facts"] + stats["totals"]["merged_lines"] == kb["accepted"]
    q = stats["sources"][str(REAL / "questions_train.txt")]
    assert q["lines"] == 10_845 == q["accepted"] + q["rejected"] + q["skipped"]
