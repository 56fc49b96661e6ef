"""Ingest stage: original text files -> dense-id Parquet tables of the knowledge base and questions.

Formats (``IngestSources``; "auto" sniffs each file; any file may be gzip/bzip2/xz compressed):
grouped facts (FB2M/FB5M, SimpleQuestions ``kb.txt``), plain triples (FB15k-237, grouped into
facts by (head, relation)), the Freebase RDF N-Triples dump (entity-to-entity facts of chosen
relations, plus English names), ``entity<TAB>name`` files, SimpleQuestions question files
(:mod:`hmn.formats.registry`).

The stage is plan -> parse -> assemble -> write:

* plan: every plain source file is cut into byte ranges of whole lines, a compressed file is one
  task (:func:`hmn.parse_tasks.plan_tasks`);
* parse (:func:`hmn.parse_tasks.parse_task`): on a pool of threads in this process, one per CPU
  of this machine (pyarrow and numpy release the GIL; results stay in memory, with no IPC
  serialisation and no Ray Data executor) when no Ray cluster is attached or the attached one
  has a single node; on a multi-node cluster, whose CPUs the driver's threads cannot use, one
  task per Ray Data ``map_batches`` task, results shipped back as Arrow IPC. Both give the same
  bytes (tested);
* assemble, in this process: the knowledge base from the coded fact chunks
  (:func:`hmn.kb.build_kb`, its array passes on one thread per CPU), names and questions
  resolved against it (:mod:`hmn.kb`), every line accounted for (:mod:`hmn.source_stats`);
* write with ``pyarrow.parquet`` (the facts by a thread, overlapped with the rest).

At FB2M scale (10.8M lines) the whole process tree stays under 3.5 GB (``benchmarks/ingest.py``).

``out_dir/``
    ``kb/entities.parquet``   entity_id int64, key string, name string (nullable)
    ``kb/relations.parquet``  relation_id int64, key string
    ``kb/facts.parquet``      fact_id int64, subject_id int64, relation_id int64,
    object_ids list<int64>
    ``questions/<split>.parquet``  question string, fact_id int64, subject_id int64,
    relation_id int64, object_id int64 (nullable), source string, line int64
    ``rejects.parquet``       ``hmn.formats.parsed.REJECT_SCHEMA``: every line not accepted
    (except the counted skips)
    ``stats.json``            what :func:`run_ingest` returns

Every line of every source is accounted for: ``lines == accepted + rejected + skipped`` per file
(see :mod:`hmn.source_stats`). "Malformed" lines are the parser rejects, always with their line
number; their rate per file must stay under ``max_reject_rate``. Questions whose fact is not in
the KB are rejected but do not count as malformed.

The caller publishes ``out_dir`` by renaming it (``pipeline.rundir.RunDir.run_stage``), so a
run killed midway leaves only a staging folder, and the re-run gives the same bytes.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hmn import kb as kb_lib
from hmn.alloc import reuse_memory
from hmn.formats.choices import FORMATS_BY_KIND
from hmn.formats.keys import normalize_keys
from hmn.formats.lines import open_text
from hmn.formats.parsed import FormatError
from hmn.formats.registry import RdfOptions, resolve_format
from hmn.parse_tasks import (
    ChunkResult,
    ParseTask,
    SourceResult,
    empty_result,
    join_source,
    local_cpus,
    parse_task,
    plan_tasks,
    results_from_table,
    results_to_table,
)
from hmn.source_stats import finish_source_stats, malformed_report, source_stats

logger = logging.getLogger(__name__)

__all__ = ["IngestSources", "run_ingest", "read_relation_list"]

_SPLIT_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class IngestSources:
    """Input files and how to read them.

    ``facts``: fact files, each in ``facts_format`` ("grouped" FB2M/FB5M/SimpleQuestions
    ``kb.txt``, "triples" ``head<TAB>relation<TAB>tail`` grouped by (head, relation), "rdf" the
    Freebase N-Triples dump, or "auto" to detect per file). ``names``: ``entity<TAB>name`` files
    or RDF files (``names_format``). ``questions``: SimpleQuestions files per split name. Any file
    may be gzip/bzip2/xz compressed. RDF files keep the predicates in ``rdf_relations`` (any key
    spelling; empty = every entity-to-entity predicate) and, with ``rdf_names``, the names in
    ``rdf_language``.
    """

    facts: list[str]
    names: list[str] = field(default_factory=list)
    questions: dict[str, list[str]] = field(default_factory=dict)
    facts_format: str = "auto"
    names_format: str = "auto"
    questions_format: str = "auto"
    rdf_relations: list[str] = field(default_factory=list)
    rdf_names: bool = True
    rdf_language: str = "en"

    def listed(self) -> list[tuple[str, str | None, str, str]]:
        """``(kind, split, path, format)`` for every source, in a fixed order; validated, with
        "auto" formats resolved by sniffing each file."""
        out: list[tuple[str, str | None, str]] = []
        if not self.facts:
            raise ValueError("ingest.sources.facts: at least one facts file is required")
        out += [("facts", None, str(p)) for p in self.facts]
        out += [("names", None, str(p)) for p in self.names]
        for split, paths in self.questions.items():
            if not _SPLIT_RE.match(split):
                raise ValueError(
                    f"ingest.sources.questions: split name {split!r} must match {_SPLIT_RE.pattern}"
                )
            out += [("questions", split, str(p)) for p in paths]
        seen: dict[str, str] = {}
        for kind, _, path in out:
            if path in seen:
                raise ValueError(f"ingest.sources: {path} is listed twice ({seen[path]}, {kind})")
            seen[path] = kind
            if os.path.isdir(path):
                raise IsADirectoryError(f"ingest.sources.{kind}: {path} is a directory, not a file")
            if not os.path.isfile(path):
                raise FileNotFoundError(f"ingest.sources.{kind}: no such file: {path}")
        if not re.match(r"^[A-Za-z-]+$", self.rdf_language):
            raise ValueError(f"ingest.sources.rdf_language={self.rdf_language!r}: not a language tag")
        chosen = {"facts": self.facts_format, "names": self.names_format,
                  "questions": self.questions_format}  # fmt: skip
        resolved = []
        for kind, split, path in out:
            choices, fmt = FORMATS_BY_KIND[kind], chosen[kind]
            if os.path.getsize(path) == 0 and fmt == "auto":
                fmt = choices[1]  # an empty file parses the same in any format
            fmt = resolve_format(path, fmt, choices, f"{kind}_format")
            resolved.append((kind, split, path, fmt))
        return resolved

    def relation_filter(self) -> list[str] | None:
        """The normalised RDF relation allow-list (None = all); invalid keys raise."""
        if not self.rdf_relations:
            return None
        keys = normalize_keys(pa.array(list(self.rdf_relations), pa.string()))
        bad = [r for r, k in zip(self.rdf_relations, keys.to_pylist()) if k is None]
        if bad:
            raise ValueError(f"ingest.sources.rdf_relations: invalid relation keys {bad[:5]}")
        return sorted(set(keys.to_pylist()))

    def rdf_options(self) -> RdfOptions:
        """How the RDF sources are filtered (:func:`relation_filter`, names, language)."""
        relations = self.relation_filter()
        return RdfOptions(relations=None if relations is None else tuple(relations),
                          names=bool(self.rdf_names), language=self.rdf_language)  # fmt: skip


def read_relation_list(path: str) -> list[str]:
    """Relation keys, one per line (blank lines and ``#`` comments ignored), any spelling."""
    with open_text(path) as f:
        text = f.read().decode("utf-8-sig")
    out = [ln.strip() for ln in text.splitlines()]
    return [ln for ln in out if ln and not ln.startswith("#")]


# ---------------------------------------------------------------------------------------------
# parse: the driver's threads or Ray Data tasks
# ---------------------------------------------------------------------------------------------


def _parse_where() -> str:
    """"driver" when no Ray cluster is attached or the attached one is a single node (the
    driver's machine), "ray" when the cluster has several nodes (their CPUs are not the
    driver's)."""
    import sys

    if "ray" not in sys.modules:
        return "driver"
    import ray

    if not ray.is_initialized():
        return "driver"
    alive = [n for n in ray.nodes() if n.get("Alive")]
    return "driver" if len(alive) <= 1 else "ray"


def _parse_in_driver(tasks: list[ParseTask], cpus: int):
    """``(task, result)`` of every task, parsed by a pool of ``cpus`` threads of this process,
    in task order. At most ``2 * cpus`` tasks are in flight, so memory stays that of a few
    chunks."""
    with ThreadPoolExecutor(max_workers=cpus, thread_name_prefix="ingest-parse") as pool:
        pending = []
        for task in tasks:
            pending.append((task, pool.submit(parse_task, task)))
            if len(pending) >= 2 * cpus:
                task0, fut = pending.pop(0)
                yield task0, fut.result()
        for task0, fut in pending:
            yield task0, fut.result()


def _parse_batch(batch: pa.Table) -> pa.Table:
    """``map_batches`` UDF: parse each task of the batch; the results as one Arrow table."""
    rows = batch.to_pylist()
    results = [parse_task(ParseTask.from_json(row["task"])) for row in rows]
    return results_to_table([row["item"] for row in rows], results)


def _parse_on_ray(tasks: list[ParseTask]):
    """``(task, result)`` of every task, parsed by Ray Data tasks (``map_batches``), in
    completion order."""
    import ray

    rows = [{"item": t.item, "task": t.to_json()} for t in tasks]
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    ds = ds.map_batches(_parse_batch, batch_size=1, batch_format="pyarrow")
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for item, result in results_from_table(batch):
            yield tasks[item], result
        del batch


def _parse_all(listed, chunk_lines: int, sources: IngestSources) -> tuple[list[SourceResult], str]:
    """Plan and parse every source; return one result per source, in order, and where they
    were parsed ("driver" threads or "ray" tasks: :func:`_parse_where`)."""
    rdf = sources.rdf_options()
    where = _parse_where()
    if where == "ray":
        import ray

        cpus = int(ray.cluster_resources().get("CPU", 1))
    else:
        cpus = local_cpus()
    tasks = plan_tasks(listed, chunk_lines, rdf, cpus, spread=where == "driver")
    per_source: list[list[tuple[int, ChunkResult]]] = [[] for _ in listed]
    if tasks:
        logger.info("parsing %d sources in %d work items (%s)", len(listed), len(tasks), where)
        parsed = _parse_in_driver(tasks, cpus) if where == "driver" else _parse_on_ray(tasks)
        for task, res in parsed:
            per_source[task.source].append((task.byte_start, res))
    out = []
    for src_idx, (kind, _split, path, fmt) in enumerate(listed):
        parts = [r for _, r in sorted(per_source[src_idx], key=lambda p: p[0])]
        out.append(join_source(kind, parts or [empty_result(kind, fmt, path, rdf)]))
    return out, where


# ---------------------------------------------------------------------------------------------
# assemble
# ---------------------------------------------------------------------------------------------


def _write(table: pa.Table, path: Path, **options) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, **options)


# dictionary pages only where values repeat (ids and keys are mostly distinct: building a
# dictionary that overflows cost a third of the write time); sorted ids delta-encoded (measured
# at FB2M scale: facts.parquet 158 -> 102 MB, 10% less CPU than dictionary + snappy alone)
_FACTS_WRITE = {
    "use_dictionary": ["relation_id"],
    "column_encoding": {"fact_id": "DELTA_BINARY_PACKED", "subject_id": "DELTA_BINARY_PACKED"},
}
_ENTITIES_WRITE = {
    "use_dictionary": ["name"],
    "column_encoding": {"entity_id": "DELTA_BINARY_PACKED"},
}


def _check_malformed(out: Path, parsed, src_stats: dict, max_reject_rate: float) -> None:
    """Raise ``ValueError`` when a source's malformed-line rate exceeds ``max_reject_rate``,
    after writing every reject to ``out/rejects.parquet`` for inspection."""
    report = malformed_report(src_stats, parsed, max_reject_rate)
    if report is None:
        return
    _write(pa.concat_tables([r.rejects for r in parsed]), out / "rejects.parquet")
    raise ValueError(
        "ingest: too many malformed lines; see " + str(out / "rejects.parquet") + "\n" + report
    )


def _check_facts_present(listed, parsed: list[SourceResult], src_stats: dict) -> None:
    """Raise `FormatError` for an empty facts file, and when the facts files hold no fact at all
    (every line rejected or filtered out): a knowledge base of 0 facts would reject every name
    and question and fail stages later with a message far from its cause."""
    facts = [(i, src[2]) for i, src in enumerate(listed) if src[0] == "facts"]
    for _, path in facts:
        if src_stats[path]["lines"] == 0:
            raise FormatError(path, None, "empty: a facts file must hold at least one fact")
    if sum(parsed[i].rows for i, _ in facts) == 0:
        counts = ", ".join(f"{path}: {src_stats[path]['lines']} lines, "
                           f"{src_stats[path]['malformed']} malformed" for _, path in facts)
        raise FormatError(facts[0][1] if len(facts) == 1 else "ingest.sources.facts", None,
                          f"no fact accepted ({counts}); see the skipped and rejected lines")


def _assemble_kb(listed, parsed: list[SourceResult], src_stats: dict, out: Path):
    """The knowledge base of the fact sources (:func:`hmn.kb.build_kb`, entity keys decoded),
    the merged lines recorded per source, and the facts table being written by a thread:
    ``(kb, facts_written, facts_writer)``."""
    fact_idx = [i for i, src in enumerate(listed) if src[0] == "facts"]
    chunks, chunk_source = [], []
    for j, i in enumerate(fact_idx):
        chunks += parsed[i].chunks
        chunk_source += [j] * len(parsed[i].chunks)
        parsed[i].chunks = parsed[i].table = None  # the driver keeps only the ids
    # the array passes of the assembly run on this machine's cores (numpy releases the GIL)
    cpus = local_cpus()
    pool = ThreadPoolExecutor(max_workers=cpus, thread_name_prefix="ingest-kb") if cpus > 1 else None
    try:
        kb = kb_lib.build_kb(chunks, chunk_source, len(fact_idx), pool)
        del chunks
        # the largest file is written by a thread (pyarrow releases the GIL) while the driver
        # decodes the entity keys, resolves names and questions and gathers the rejects
        facts_writer = ThreadPoolExecutor(max_workers=1)
        facts_written = facts_writer.submit(
            _write, kb.facts, out / "kb" / "facts.parquet", **_FACTS_WRITE
        )
        if isinstance(kb.entity_keys, Future):
            kb.entity_keys = kb.entity_keys.result()
    finally:
        if pool is not None:
            pool.shutdown()
    for j, i in enumerate(fact_idx):
        src_stats[listed[i][2]]["merged_lines"] = int(kb.merged_lines[j])
    return kb, facts_written, facts_writer


@dataclass
class _Tables:
    """The stage's outputs besides the facts."""

    entities: pa.Table
    relations: pa.Table
    questions: dict[str, list[pa.Table]]  # per split
    rejects: pa.Table
    named: int


def _resolve(listed, parsed: list[SourceResult], src_stats: dict, kb: kb_lib.BuiltKB,
             splits) -> _Tables:  # fmt: skip
    """Names and questions against the knowledge base, and every source's rejects and counts."""
    entity_keys, relation_keys = kb.entity_keys, kb.relation_keys
    answers = None
    if any(src[0] == "questions" for src in listed):
        answers = kb_lib.answer_codes(kb.object_offsets, kb.object_ids, len(entity_keys))
    kb.object_offsets = kb.object_ids = None
    name_sources = []
    for (kind, _split, path, fmt), r in zip(listed, parsed):
        if kind == "names":
            name_sources.append((path, r.table, fmt != "rdf"))
        elif r.names is not None:
            name_sources.append((path, r.names, False))
    name_col, skipped, name_counts, named = kb_lib.resolve_names(name_sources, entity_keys)
    del name_sources
    E, R = len(entity_keys), len(relation_keys)
    entities = pa.table(
        {"entity_id": pa.array(np.arange(E, dtype=np.int64)), "key": entity_keys, "name": name_col},
        schema=kb_lib.ENTITIES_SCHEMA,
    )
    relations = pa.table(
        {"relation_id": pa.array(np.arange(R, dtype=np.int64)), "key": relation_keys},
        schema=kb_lib.RELATIONS_SCHEMA,
    )
    keys = kb_lib.KeyTables(entity_keys, relation_keys, kb.fact_pairs)
    questions: dict[str, list[pa.Table]] = {split: [] for split in splits}
    kb_rejects: dict[str, pa.Table] = {}
    for i, (kind, split, path, _fmt) in enumerate(listed):
        if kind != "questions":
            continue
        q, rej, info = kb_lib.resolve_questions(path, parsed[i].table, keys, answers)
        questions[split].append(q)
        if rej is not None:
            kb_rejects[path] = rej
        src_stats[path].update(info)
    rejects = finish_source_stats(listed, parsed, src_stats, skipped, name_counts, kb_rejects)
    return _Tables(entities, relations, questions, rejects, named)


def _write_outputs(out: Path, tables: _Tables) -> dict[str, int]:
    """Write everything but the facts; the questions per split."""
    _write(tables.entities, out / "kb" / "entities.parquet", **_ENTITIES_WRITE)
    _write(tables.relations, out / "kb" / "relations.parquet")
    count = {}
    for split, parts in tables.questions.items():
        q = pa.concat_tables(parts).combine_chunks() if parts else kb_lib.KB_QUESTIONS_SCHEMA.empty_table()
        _write(q, out / "questions" / f"{split}.parquet")
        count[split] = q.num_rows
    _write(tables.rejects, out / "rejects.parquet")
    return count


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------


def run_ingest(
    sources: IngestSources,
    out_dir: str,
    *,
    max_reject_rate: float = 0.01,
    chunk_lines: int = 1_000_000,
) -> dict:
    """Parse, validate and id-map the sources into ``out_dir`` (see module docstring).

    ``out_dir`` must be absent or empty (the caller renames it into place afterwards). Returns
    the stats, also written to ``out_dir/stats.json``. Raises ``ValueError`` when a source's
    malformed-line rate exceeds ``max_reject_rate`` (``rejects.parquet`` is written first, for
    inspection). The allocators keep freed memory for reuse meanwhile
    (:func:`hmn.alloc.reuse_memory`).
    """
    with reuse_memory():
        return _run_ingest(sources, out_dir, max_reject_rate, chunk_lines)


def _run_ingest(
    sources: IngestSources, out_dir: str, max_reject_rate: float, chunk_lines: int
) -> dict:
    t0 = time.perf_counter()
    if not 0.0 <= max_reject_rate <= 1.0:
        raise ValueError(f"ingest.max_reject_rate={max_reject_rate}: must be in [0, 1]")
    if chunk_lines < 1:
        raise ValueError(f"ingest.chunk_lines={chunk_lines}: must be >= 1")
    listed = sources.listed()
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"ingest: output directory {out} is not empty")
    out.mkdir(parents=True, exist_ok=True)

    parsed, parsed_in = _parse_all(listed, chunk_lines, sources)
    t_parse = time.perf_counter()
    src_stats = source_stats(listed, parsed)
    _check_malformed(out, parsed, src_stats, max_reject_rate)
    _check_facts_present(listed, parsed, src_stats)
    kb, facts_written, facts_writer = _assemble_kb(listed, parsed, src_stats, out)
    tables = _resolve(listed, parsed, src_stats, kb, sources.questions)
    t_assemble = time.perf_counter()
    questions_count = _write_outputs(out, tables)
    facts_written.result()
    facts_writer.shutdown()
    t_write = time.perf_counter()

    totals = {
        "entities": len(kb.entity_keys),
        "relations": len(kb.relation_keys),
        "facts": kb.facts.num_rows,
        **kb.info,
        "named_entities": int(tables.named),
        "questions": questions_count,
        **{k: sum(s[k] for s in src_stats.values()) for k in ("lines", "rejected", "skipped")},
    }
    stats = {
        "sources": src_stats,
        "totals": totals,
        "checks": {"lines_accounted": True},
        "config": {
            "sources": asdict(sources),
            "formats": {path: fmt for _, _, path, fmt in listed},
            "max_reject_rate": max_reject_rate,
            "chunk_lines": chunk_lines,
            "parse_in": "auto",  # where to parse is decided per run: parsed_in
        },
        "parsed_in": parsed_in,
        "timings_s": {
            "parse": round(t_parse - t0, 3),
            "assemble": round(t_assemble - t_parse, 3),
            "assemble_kb_steps": kb.steps_s,
            "write": round(t_write - t_assemble, 3),
            "total": round(time.perf_counter() - t0, 3),
        },
    }
    with open(out / "stats.json", "w") as f:
        json.dump(stats, f, indent=2, sort_keys=False)
    logger.info(
        "ingest: %d entities, %d relations, %d facts (%d merged lines), questions %s, "
        "%d rejected, %d skipped in %.1f s",
        totals["entities"], totals["relations"], totals["facts"], totals["merged_lines"],
        questions_count, totals["rejected"], totals["skipped"], stats["timings_s"]["total"],
    )  # fmt: skip
    return stats
