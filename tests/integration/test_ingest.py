"""Integration tests of the ingest stage on a local Ray (tiny synthetic data in tmp_path)."""

import gzip
import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from hmn.formats.keys import normalize_key
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


# ------------------------------------------------------------------------------------------------
# other formats: RDF dump (gzip) with names, FB15k-style triples, names from RDF
# ------------------------------------------------------------------------------------------------

NS = "http://rdf.freebase.com/ns/"


def _rdf(s, p, o):
    return f"<{NS}{s}>\t<{NS}{p}>\t{o}\t."


def test_rdf_and_triples_sources(ray_local, tmp_path):
    rdf_lines = [
        _rdf("m.01", "people.person.nationality", f"<{NS}m.02>"),  # 1 fact
        _rdf("m.01", "people.person.nationality", f"<{NS}m.03>"),  # 2 merges into line 1
        _rdf("m.01", "film.film.directed_by", f"<{NS}m.04>"),  # 3 not in the allow-list
        _rdf("m.01", "type.object.name", '"Alpha"@en'),  # 4 name
        _rdf("m.02", "type.object.name", '"Beta"@de'),  # 5 skipped: language
        _rdf("m.99", "type.object.name", '"Nobody"@en'),  # 6 name of an entity outside the KB
        _rdf("m.01", "people.person.height_meters", '"1.8"'),  # 7 not selected
        "broken line",  # 8 malformed
    ]
    rdf = tmp_path / "freebase-rdf.gz"
    with gzip.open(rdf, "wt", encoding="utf-8") as f:
        f.write("\n".join(rdf_lines) + "\n")
    triples = tmp_path / "train.txt"
    triples.write_text("/m/05\t/people/person/nationality\t/m/02\n"
                       "/m/05\t/people/person/nationality\t/m/03\n"
                       "/m/05\t/a/b\n")  # fmt: skip
    srcs = IngestSources(
        facts=[str(rdf), str(triples)],
        rdf_relations=["www.freebase.com/people/person/nationality"],
    )
    stats = run_ingest(srcs, str(tmp_path / "out"), max_reject_rate=0.5)
    s_rdf, s_tri = stats["sources"][str(rdf)], stats["sources"][str(triples)]
    assert (s_rdf["format"], s_tri["format"]) == ("rdf", "triples")
    assert s_rdf["lines"] == 8 == s_rdf["accepted"] + s_rdf["rejected"] + s_rdf["skipped"]
    assert s_rdf["rejected"] == 1 and s_rdf["accepted"] == 3  # 2 facts + 1 name in the KB
    assert s_rdf["skipped"] == 4
    assert s_rdf["skipped_by_filter"] == {
        "name not in the chosen language": 1,
        "predicate not selected": 2,
    }
    assert s_rdf["by_reason"]["entity not in knowledge base"] == 1  # counted, no reject row
    assert s_tri["merged_lines"] == 1 and s_tri["rejected"] == 1
    out = tmp_path / "out"
    ents = pq.read_table(out / "kb/entities.parquet").to_pylist()
    keys = [e["key"] for e in ents]
    assert keys == ["/m/01", "/m/02", "/m/03", "/m/05"]
    assert {e["key"]: e["name"] for e in ents}["/m/01"] == "Alpha"
    facts = pq.read_table(out / "kb/facts.parquet").to_pylist()
    assert [(keys[f["subject_id"]], [keys[o] for o in f["object_ids"]]) for f in facts] == [
        ("/m/01", ["/m/02", "/m/03"]),
        ("/m/05", ["/m/02", "/m/03"]),
    ]
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    assert {(r["source"], r["line"]) for r in rejects} == {(str(rdf), 8), (str(triples), 3)}


# ------------------------------------------------------------------------------------------------
# faults: SIGKILL midway, then a clean re-run gives the uninterrupted output
# ------------------------------------------------------------------------------------------------

KILL_SCRIPT = """
import json, os, signal, sys
import ray
from pipeline.rundir import RunDir
from pipeline.stages import ingest

root, fp, srcs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
real_write = ingest._write

def write_then_die(table, path, **options):
    real_write(table, path, **options)
    if path.name == "facts.parquet":  # some outputs written, others not yet
        os.kill(os.getpid(), signal.SIGKILL)

ingest._write = write_then_die
ray.init(address=os.environ["HMN_TEST_RAY_ADDRESS"], log_to_driver=False)
RunDir(root).run_stage("ingest", fp, lambda out: ingest.run_ingest(
    ingest.IngestSources(**srcs), str(out), chunk_lines=128))
"""


def test_sigkill_midway_then_rerun_is_identical(sources, ingested, tmp_path):
    import dataclasses
    import os
    import signal
    import subprocess
    import sys

    import ray

    from pipeline.rundir import RunDir

    srcs, _ = sources
    reference, _ = ingested
    root = tmp_path / "run"
    env = {**os.environ, "HMN_TEST_RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(root), "fp1", json.dumps(dataclasses.asdict(srcs))],
        cwd=Path(__file__).parents[2], env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    staging = list(root.glob(".ingest.tmp-*"))
    assert len(staging) == 1 and (staging[0] / "kb/facts.parquet").exists()
    assert not (root / "ingest").exists()  # nothing published
    run = RunDir(root)
    assert run.entry("ingest")["status"] == "running" and not run.is_done("ingest", "fp1")

    result = run.run_stage("ingest", "fp1", lambda out: run_ingest(srcs, str(out)))
    assert not result.skipped and run.is_done("ingest", "fp1")
    assert not list(root.glob(".ingest.tmp-*"))  # the stale staging folder is gone
    for rel in ["kb/entities.parquet", "kb/relations.parquet", "kb/facts.parquet",
                "questions/train.parquet", "questions/dev.parquet", "questions/test.parquet",
                "rejects.parquet"]:  # fmt: skip
        assert pq.read_table(root / "ingest" / rel).equals(pq.read_table(reference / rel)), rel


# ------------------------------------------------------------------------------------------------
# where the chunks are parsed: the driver's threads and Ray Data tasks give the same bytes
# ------------------------------------------------------------------------------------------------

TABLES = ["kb/entities.parquet", "kb/relations.parquet", "kb/facts.parquet",
          "questions/train.parquet", "questions/dev.parquet", "questions/test.parquet",
          "rejects.parquet"]  # fmt: skip


def _same_outputs(a: Path, b: Path, rels=TABLES) -> None:
    for rel in rels:
        assert _read(a, rel).equals(_read(b, rel)), rel
    sa, sb = (json.loads((d / "stats.json").read_text()) for d in (a, b))
    assert sa["sources"] == sb["sources"] and sa["totals"] == sb["totals"]


def _parse_in(monkeypatch, where: str) -> None:
    """Parse in the driver's threads or in Ray Data tasks, whatever the cluster."""
    from pipeline.stages import ingest

    monkeypatch.setattr(ingest, "_parse_where", lambda: where)


def test_driver_and_ray_parsing_identical(sources, ingested, tmp_path, monkeypatch):
    """A single-node cluster parses in the driver; Ray Data tasks (the multi-node path), with
    another chunking, give the same tables, rejects and counts."""
    srcs, _ = sources
    out, stats = ingested
    assert stats["parsed_in"] == "driver" and stats["config"]["parse_in"] == "auto"
    _parse_in(monkeypatch, "ray")
    on_ray = run_ingest(srcs, str(tmp_path / "ray"), chunk_lines=200)
    assert on_ray["parsed_in"] == "ray"
    _same_outputs(out, tmp_path / "ray")


def test_driver_path_gzip_facts_and_bad_lines(sources, ray_local, tmp_path, monkeypatch):
    """A gzip facts file with bad lines and a plain one with a bad line, parsed in the driver's
    threads: every line accounted for (rejects with source, line, text, reason), and the
    same outputs as Ray Data tasks."""
    srcs, _ = sources
    kb = Path(srcs.facts[0])
    kb_gz = tmp_path / "kb.txt.gz"
    with open(kb, "rb") as src, gzip.open(kb_gz, "wb") as dst:
        shutil.copyfileobj(src, dst)
    extra = tmp_path / "extra_kb.txt"
    extra.write_text("www.freebase.com/m/0e1\twww.freebase.com/a/b\twww.freebase.com/m/0e2\n"
                     "www.freebase.com/m/0e1\twww.freebase.com/a/b\n"  # line 2: 2 fields
                     "www.freebase.com/m/0e3\twww.freebase.com/a/c\twww.freebase.com/m/0e1\n",
                     encoding="utf-8")  # fmt: skip
    both = IngestSources(facts=[str(kb_gz), str(extra)], facts_format="grouped")
    runs = {}
    for where in ("driver", "ray"):
        _parse_in(monkeypatch, where)
        runs[where] = run_ingest(both, str(tmp_path / where), chunk_lines=100, max_reject_rate=0.5)
    assert runs["driver"]["parsed_in"] == "driver"
    _same_outputs(tmp_path / "driver", tmp_path / "ray",
                  ["kb/entities.parquet", "kb/relations.parquet", "kb/facts.parquet",
                   "rejects.parquet"])  # fmt: skip
    stats = runs["driver"]["sources"]
    for path in (str(kb_gz), str(extra)):
        s = stats[path]
        assert s["lines"] == s["accepted"] + s["rejected"] + s["skipped"]
    rejects = _read(tmp_path / "driver", "rejects.parquet").to_pylist()
    got = {(r["source"], r["line"]) for r in rejects}
    assert got == {(str(kb_gz), 10), (str(kb_gz), 11), (str(extra), 2)}
    bad = [r for r in rejects if r["source"] == str(extra)][0]
    assert bad["text"] == "www.freebase.com/m/0e1\twww.freebase.com/a/b"
    assert "expected 3 tab-separated fields, got 2" in bad["reason"]
    # the plain file alone, in one chunk with its bad line, through the driver
    _parse_in(monkeypatch, "driver")
    alone = run_ingest(IngestSources(facts=[str(extra)]), str(tmp_path / "alone"),
                       max_reject_rate=0.5)  # fmt: skip
    assert alone["totals"]["facts"] == 2 and alone["totals"]["rejected"] == 1


# ------------------------------------------------------------------------------------------------
# the driver-side assembly split over threads (numpy passes, the fact-order merge, the entity
# keys decoded while the facts are written) gives the same bytes as one thread
# ------------------------------------------------------------------------------------------------


def _random_kb(path: Path, lines: int, seed: int, repeat_pairs: bool) -> None:
    import numpy as np

    rng = np.random.default_rng(seed)
    ents = [f"www.freebase.com/m/0{i:x}" for i in rng.choice(1 << 20, 3000, replace=False)]
    rels = [f"www.freebase.com/r/x/r{i}" for i in range(17)]
    out, seen = [], set()
    while len(out) < lines:
        s, r = int(rng.integers(len(ents))), int(rng.integers(len(rels)))
        if (s, r) in seen and not repeat_pairs:
            continue
        seen.add((s, r))
        objs = " ".join(ents[int(o)] for o in rng.integers(len(ents), size=int(rng.integers(1, 5))))
        out.append(f"{ents[s]}\t{rels[r]}\t{objs}")
    path.write_text("\n".join(out) + "\n", encoding="utf-8")


@pytest.mark.parametrize("repeat_pairs", [False, True])
def test_threaded_assembly_identical(monkeypatch, tmp_path, repeat_pairs):
    """Outputs with the threaded assembly forced on every size (3 threads, partitioned window
    hashing, several chunks) equal those of a single thread, with and without merged facts."""
    from hmn import ids
    from hmn import kb as kb_lib
    from pipeline.stages import ingest

    kb = tmp_path / "kb.txt"
    _random_kb(kb, 6000, seed=3, repeat_pairs=repeat_pairs)
    srcs = IngestSources(facts=[str(kb)], facts_format="grouped")
    _parse_in(monkeypatch, "driver")
    monkeypatch.setattr(ingest, "local_cpus", lambda: 1)
    single = run_ingest(srcs, str(tmp_path / "single"), chunk_lines=6000)
    monkeypatch.setattr(ingest, "local_cpus", lambda: 3)
    monkeypatch.setattr(kb_lib, "PARALLEL_MIN", 1)
    monkeypatch.setattr(ids, "_PARTITION_MIN", 1)
    threaded = run_ingest(srcs, str(tmp_path / "threaded"), chunk_lines=500)
    assert (single["totals"]["merged_lines"] > 0) == repeat_pairs
    assert threaded["totals"] == single["totals"]
    _same_outputs(tmp_path / "single", tmp_path / "threaded",
                  ["kb/entities.parquet", "kb/relations.parquet", "kb/facts.parquet",
                   "rejects.parquet"])  # fmt: skip
