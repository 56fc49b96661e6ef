"""Ingest stage: original text files -> dense-id Parquet tables of the knowledge base and questions.

Formats (``IngestSources``; "auto" sniffs each file; any file may be gzip/bzip2/xz compressed):
grouped facts (FB2M/FB5M, SimpleQuestions ``kb.txt``), plain triples (FB15k-237, grouped into
facts by (head, relation)), the Freebase RDF N-Triples dump (entity-to-entity facts of chosen
relations, plus English names), ``entity<TAB>name`` files, SimpleQuestions question files.

Parsing runs in parallel: every plain source file is cut into byte ranges of whole lines (about
``chunk_lines`` lines each, :func:`hmn.formats.plan_byte_chunks`: one small read per cut, no scan;
each work item numbers its lines from 1 and the driver shifts them by the line counts of the
chunks before), a compressed file is one work item, streamed. Where the items are parsed
(``parse_in``): "driver" runs them on a pool of threads in this process, one per CPU of this
machine (pyarrow's CSV reader and compute kernels and numpy release the GIL), with results kept
in memory; "ray" sends one work item per task through Ray Data ``map_batches`` calling the same
parser, each task returning Arrow IPC bytes. "auto" (the default) picks "driver" when no Ray
cluster is attached or the attached one has a single node (this machine: threads save the
tasks' serialisation and the Ray Data executor), and "ray" on a multi-node cluster, whose CPUs
the driver's threads cannot use. Both give the same bytes (tested).

Fact chunks come back as :class:`hmn.formats.CodedFacts`: chunk-local dense ids, rows sorted by
(subject, relation, line). A clean chunk of machine-id keys takes the fast path
(:func:`hmn.formats.parse_grouped_coded`: pyarrow's CSV reader over the memory-mapped range,
relations dictionary-encoded and normalised once per distinct spelling, keys of up to 8
characters hashed as one 8-byte integer each (:func:`hmn.ids.window_ids`: in cache-sized
partitions; only the distinct ones are decoded and sorted), longer ones as order-preserving
int64 codes of :mod:`hmn.ids`; rows sorted without moving their objects,
``CodedFacts.starts``); any other chunk goes through the careful line parser, with the same
result plus its rejects. The driver then never hashes or compares key strings: one merge of
the chunks' sorted distinct codes gives the entity ids (ids = sorted key order, hence
deterministic), numpy gathers map local to global ids, and a merge of the chunks' sorted runs
of packed ``subject | relation | row`` integers orders the facts and finds repeated (subject,
relation) pairs, which it merges into one fact; the objects are gathered once, in fact order.
These array passes run on a pool of one thread per CPU of this machine (the gathers split in
halves, the merge cut at a pivot value into two merges), and the entity keys are decoded to
strings by the pool meanwhile. It resolves names and questions against the KB and writes with
``pyarrow.parquet`` (the facts by a thread, overlapped with the rest). At FB2M scale (10.8M
lines) the whole process tree stays under 3.5 GB (``benchmarks/ingest.py``).

``out_dir/``
    ``kb/entities.parquet``   entity_id int64, key string, name string (nullable)
    ``kb/relations.parquet``  relation_id int64, key string
    ``kb/facts.parquet``      fact_id int64, subject_id int64, relation_id int64,
    object_ids list<int64>
    ``questions/<split>.parquet``  question string, fact_id int64, subject_id int64,
    relation_id int64, object_id int64 (nullable), source string, line int64
    ``rejects.parquet``       ``hmn.formats.REJECT_SCHEMA``: every line not accepted (except the
    counted skips below)
    ``stats.json``            what :func:`run_ingest` returns

Every line of every source is accounted for: ``lines == accepted + rejected + skipped`` per file.
"Skipped" lines are not errors: a name for an entity outside the KB, a second name for an
entity (both in ``rejects.parquet`` for names files), and the lines an RDF dump's filter leaves
out (other predicates, literals, non-English names; counted per reason in the source's
``skipped_by_filter`` and ``by_reason``, never written row by row: the dump has 1.9 billion
lines). "Malformed" lines are the parser rejects, always with their line number; their rate per
file must stay under ``max_reject_rate``. Questions whose fact is not in the KB are rejected but
do not count as malformed.

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
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hmn import formats, ids
from hmn.alloc import reuse_memory

logger = logging.getLogger(__name__)

__all__ = [
    "IngestSources",
    "run_ingest",
    "ENTITIES_SCHEMA",
    "RELATIONS_SCHEMA",
    "FACTS_SCHEMA",
    "QUESTIONS_SCHEMA",
    "SKIP_NOT_IN_KB",
    "SKIP_DUPLICATE_NAME",
]

ENTITIES_SCHEMA = pa.schema(
    [("entity_id", pa.int64()), ("key", pa.string()), ("name", pa.string())]
)
RELATIONS_SCHEMA = pa.schema([("relation_id", pa.int64()), ("key", pa.string())])
FACTS_SCHEMA = pa.schema(
    [
        ("fact_id", pa.int64()),
        ("subject_id", pa.int64()),
        ("relation_id", pa.int64()),
        ("object_ids", pa.list_(pa.int64())),
    ]
)
QUESTIONS_SCHEMA = pa.schema(
    [
        ("question", pa.string()),
        ("fact_id", pa.int64()),
        ("subject_id", pa.int64()),
        ("relation_id", pa.int64()),
        ("object_id", pa.int64()),
        ("source", pa.string()),
        ("line", pa.int64()),
    ]
)

SKIP_NOT_IN_KB = "entity not in knowledge base"
SKIP_DUPLICATE_NAME = "duplicate name for entity"

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
            if not os.path.isfile(path):
                raise FileNotFoundError(f"ingest.sources.{kind}: no such file: {path}")
        if not re.match(r"^[A-Za-z-]+$", self.rdf_language):
            raise ValueError(f"ingest.sources.rdf_language={self.rdf_language!r}: not a language tag")
        allowed = {
            "facts": (formats.FACT_FORMATS, self.facts_format),
            "names": (formats.NAME_FORMATS, self.names_format),
            "questions": (formats.QUESTION_FORMATS, self.questions_format),
        }
        resolved = []
        for kind, split, path in out:
            choices, fmt = allowed[kind]
            if os.path.getsize(path) == 0 and fmt == "auto":
                fmt = choices[1]  # an empty file parses the same in any format
            fmt = formats.resolve_format(path, fmt, choices, f"{kind}_format")
            resolved.append((kind, split, path, fmt))
        return resolved

    def relation_filter(self) -> list[str] | None:
        """The normalised RDF relation allow-list (None = all); invalid keys raise."""
        if not self.rdf_relations:
            return None
        keys = formats.normalize_keys(pa.array(list(self.rdf_relations), pa.string()))
        bad = [r for r, k in zip(self.rdf_relations, keys.to_pylist()) if k is None]
        if bad:
            raise ValueError(f"ingest.sources.rdf_relations: invalid relation keys {bad[:5]}")
        return sorted(set(keys.to_pylist()))


def read_relation_list(path: str) -> list[str]:
    """Relation keys, one per line (blank lines and ``#`` comments ignored), any spelling."""
    with formats.open_text(path) as f:
        text = f.read().decode("utf-8")
    out = [ln.strip() for ln in text.splitlines()]
    return [ln for ln in out if ln and not ln.startswith("#")]


# ---------------------------------------------------------------------------------------------
# parallel parsing (runs in Ray Data tasks)
# ---------------------------------------------------------------------------------------------


def _to_ipc(table: pa.Table) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue()


def _binary_column(values: list) -> pa.Array:
    """A large_binary column of IPC buffers (or b"" for none), concatenated once."""
    bufs = [v if isinstance(v, pa.Buffer) else pa.py_buffer(v) for v in values]
    offsets = np.zeros(len(bufs) + 1, dtype=np.int64)
    np.cumsum([b.size for b in bufs], out=offsets[1:])
    data = b"".join(bufs) if len(bufs) > 1 else bufs[0]
    return pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), len(bufs), [None, pa.py_buffer(offsets), pa.py_buffer(data)]
    )


def _from_ipc(data) -> pa.Table:
    if isinstance(data, bytes):
        data = pa.py_buffer(data)
    return pa.ipc.open_stream(data).read_all()


def _parse_lines(item: dict, lines: pa.Array, first_line: int) -> formats.Parsed:
    fmt, kind, path = item["format"], item["kind"], item["path"]
    if fmt == "grouped":
        return formats.parse_grouped_facts(lines, first_line, path, dictionary=True)
    if fmt == "triples":
        return formats.parse_triples(lines, first_line, path, dictionary=True)
    if fmt == "names":
        return formats.parse_names(lines, first_line, path)
    if fmt == "simplequestions":
        return formats.parse_questions(lines, first_line, path)
    if fmt == "rdf":
        if kind == "names":  # a names-only RDF file: every other predicate is filtered out
            rel = pa.array([], pa.string())
            return formats.parse_rdf(lines, first_line, path, relations=rel, names=True,
                                     language=item["rdf_language"])  # fmt: skip
        rel = item["rdf_relations"]
        rel = None if rel is None else pa.array(rel, pa.string())
        return formats.parse_rdf(lines, first_line, path, relations=rel,
                                 names=item["rdf_names"], language=item["rdf_language"])  # fmt: skip
    raise ValueError(f"internal error: unknown format {fmt!r}")


def _finish(item: dict, parsed: list[formats.Parsed], lines: list[pa.Array], firsts: list[int]):
    """Merge the pieces of one work item. The rows of a names file or a questions file keep
    their raw line in a ``text`` column (rows rejected later against the KB keep their text).
    Fact rows leave the task as :class:`hmn.formats.CodedFacts` (chunk-local ids)."""
    keep_text = item["kind"] != "facts" and item["format"] != "rdf"
    tables, rejects, skipped, names = [], [], {}, []
    for p, ln, first in zip(parsed, lines, firsts):
        table = p.table
        if item["format"] == "rdf" and item["kind"] == "names":
            table = p.names
        elif p.names is not None:
            names.append(p.names)
        if keep_text:
            table = table.append_column("text", ln.take(pc.subtract(table["line"], first)))
        tables.append(table)
        rejects.append(p.rejects)
        for k, v in p.skipped.items():
            skipped[k] = skipped.get(k, 0) + v
    coded = None
    if item["kind"] == "facts":
        # pieces of a streamed (compressed) file have different dictionaries: back to strings
        facts = [t.cast(formats.FACTS_SCHEMA) for t in tables] if len(tables) > 1 else tables
        coded = formats.code_facts(pa.concat_tables(facts))
        tables = []
    return {
        "table": pa.concat_tables(tables) if tables else None,
        "coded": coded,
        "rejects": pa.concat_tables(rejects),
        "lines": sum(p.lines for p in parsed),
        "skipped": skipped,
        "names": pa.concat_tables(names) if names else None,
    }


def _empty_result(item: dict) -> dict:
    return _finish(item, [_parse_lines(item, pa.array([], pa.string()), 1)], [pa.array([], pa.string())], [1])


def _parse_item(item: dict) -> dict:
    """Parse one work item: a byte range of whole lines of a plain file (lines numbered from 1
    within the range; the driver shifts them), or a whole compressed file, streamed."""
    if item["byte_end"] >= 0:
        chunk = formats.ByteChunk(item["path"], item["byte_start"], item["byte_end"])
        if item["format"] in ("grouped", "triples"):
            single = item["format"] == "triples"
            fast = formats.parse_grouped_coded(chunk, chunk.path, single_object=single)
            if fast is not None:  # every line clean: no rejects, coded directly
                coded, parsed = fast
                return {"table": None, "coded": coded, "rejects": parsed.rejects,
                        "lines": parsed.lines, "skipped": {}, "names": None}  # fmt: skip
        data = formats.read_byte_chunk(chunk)
        if item["format"] in ("grouped", "triples"):
            parsed = formats.parse_grouped_bytes(
                data, 1, formats.count_lines(data), chunk.path, single_object=single,
                dictionary=True,
            )  # fmt: skip
            return _finish(item, [parsed], [None], [1])
        pieces = [(1, formats.bytes_to_lines(data))]
        del data
    else:
        pieces = formats.iter_line_chunks(item["path"], item["chunk_lines"])
    parsed, lines, firsts = [], [], []
    for first_line, chunk_lines in pieces:
        parsed.append(_parse_lines(item, chunk_lines, first_line))
        firsts.append(first_line)
        # the raw lines are kept only where a text column is built from them
        keep_text = item["kind"] != "facts" and item["format"] != "rdf"
        lines.append(chunk_lines if keep_text else None)
    if not parsed:  # empty compressed file
        return _empty_result(item)
    return _finish(item, parsed, lines, firsts)


def _parse_batch(batch: pa.Table) -> pa.Table:
    """``map_batches`` UDF: parse each work item of the batch, return IPC-encoded results."""
    out = {k: [] for k in ("item", "lines", "table", "coded", "rejects", "names", "skipped")}
    for item in batch.to_pylist():
        item = {**item, **json.loads(item["options"])}
        res = _parse_item(item)
        out["item"].append(item["item"])
        out["lines"].append(res["lines"])
        out["table"].append(_to_ipc(res["table"]) if res["table"] is not None else b"")
        out["coded"].append(_to_ipc(res["coded"].to_table()) if res["coded"] is not None else b"")
        out["rejects"].append(_to_ipc(res["rejects"]))
        out["names"].append(_to_ipc(res["names"]) if res["names"] is not None else b"")
        out["skipped"].append(json.dumps(res["skipped"]))
    binary = ("table", "coded", "rejects", "names")
    return pa.table(
        {
            "item": pa.array(out["item"], pa.int64()),
            "lines": pa.array(out["lines"], pa.int64()),
            **{k: _binary_column(out[k]) for k in binary},
            "skipped": pa.array(out["skipped"], pa.string()),
        }
    )


@dataclass
class _SourceResult:
    table: pa.Table | None  # names, questions
    chunks: list[formats.CodedFacts] | None  # facts: one per parsed chunk, in file order
    rejects: pa.Table
    lines: int
    skipped: dict[str, int]
    names: pa.Table | None  # English names of an RDF facts file


def _shift_lines(table: pa.Table | None, offset: int) -> pa.Table | None:
    """``table`` with ``offset`` added to its ``line`` column (chunk-relative -> file lines)."""
    if table is None or offset == 0 or "line" not in table.column_names:
        return table
    i = table.schema.get_field_index("line")
    return table.set_column(i, "line", pc.add(table.column(i), offset))


# the driver's threads parse a plain file in one item per CPU up to this many lines each: fewer,
# larger chunks mean fewer distinct keys to decode and merge (measured at FB2M scale: merging 12
# chunks' distinct entity codes 0.52 s, 4 chunks' 0.12 s); the cap bounds a chunk's memory
# (and the careful path's, when a chunk holds a bad line)
DRIVER_MAX_CHUNK_LINES = 4_000_000


def _chunk_bytes(path: str, chunk_lines: int, cpus: int = 1, spread: bool = False) -> int:
    """Bytes per work item for about ``chunk_lines`` lines, from the mean line length of the
    first MiB (work items are byte ranges: planning them reads no more of the file). A file of
    several items gets a multiple of ``cpus`` items of equal size, so that the last wave of
    tasks keeps every CPU busy. With ``spread`` (the driver's threads), items are larger
    when the file allows: one per CPU, of at least ``chunk_lines`` and at most
    :data:`DRIVER_MAX_CHUNK_LINES` lines."""
    with open(path, "rb") as f:
        head = f.read(1 << 20)
    n = max(head.count(b"\n"), 1)
    size = os.path.getsize(path)
    if spread:
        per_cpu = -(-size * n // (len(head) * max(cpus, 1))) if head else 0  # lines, estimated
        chunk_lines = max(chunk_lines, min(per_cpu, DRIVER_MAX_CHUNK_LINES))
    target = max(1, (len(head) * chunk_lines) // n)
    items = -(-size // target)  # ceil
    if items > 1 and cpus > 1:
        items = -(-items // cpus) * cpus
        target = max(1, -(-size // items))
    return target


PARSE_IN = ("auto", "driver", "ray")


def _local_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _parse_where(parse_in: str) -> str:
    """"driver" or "ray" for ``parse_in``: "auto" parses in the driver's threads when no Ray
    cluster is attached or the attached one is a single node (the driver's machine), and on
    Ray Data when the cluster has several nodes (their CPUs are not the driver's)."""
    if parse_in not in PARSE_IN:
        raise ValueError(f"ingest.parse_in={parse_in!r}: must be one of {', '.join(PARSE_IN)}")
    if parse_in != "auto":
        return parse_in
    import sys

    if "ray" not in sys.modules:
        return "driver"
    import ray

    if not ray.is_initialized():
        return "driver"
    alive = [n for n in ray.nodes() if n.get("Alive")]
    return "driver" if len(alive) <= 1 else "ray"


def _parse_items_in_driver(items: list[dict], cpus: int):
    """``(item, result)`` of every work item, parsed by a pool of ``cpus`` threads of this
    process (pyarrow and numpy release the GIL in the parsers' kernels), in item order. At
    most ``2 * cpus`` items are in flight, so memory stays that of a few chunks."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=cpus, thread_name_prefix="ingest-parse") as pool:
        pending = []
        for item in items:
            pending.append((item, pool.submit(_parse_item, item)))
            if len(pending) >= 2 * cpus:
                item0, fut = pending.pop(0)
                yield item0, fut.result()
        for item0, fut in pending:
            yield item0, fut.result()


def _parse_items_on_ray(items: list[dict]):
    """``(item, result)`` of every work item, parsed by Ray Data tasks (``map_batches``),
    results shipped back as Arrow IPC, in completion order."""
    import ray

    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(_parse_batch, batch_size=1, batch_format="pyarrow")
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for i in range(batch.num_rows):
            item = items[batch["item"][i].as_py()]

            def load(name: str, i=i):
                buf = batch[name][i].as_buffer()
                return _from_ipc(buf) if buf.size else None

            coded = load("coded")
            yield item, {
                "table": load("table"),
                "coded": formats.CodedFacts.from_table(coded) if coded is not None else None,
                "rejects": load("rejects"),
                "names": load("names"),
                "lines": batch["lines"][i].as_py(),
                "skipped": json.loads(batch["skipped"][i].as_py()),
            }
        del batch


def _parse_all(
    listed, chunk_lines: int, sources: IngestSources, parse_in: str = "auto"
) -> tuple[list[_SourceResult], str]:
    """Parse every source; return one result per source, in order, and where they were parsed
    ("driver" threads or "ray" tasks: :func:`_parse_where`)."""
    where = _parse_where(parse_in)
    options = json.dumps(
        {
            "rdf_relations": sources.relation_filter(),
            "rdf_names": bool(sources.rdf_names),
            "rdf_language": sources.rdf_language,
            "chunk_lines": chunk_lines,
        }
    )
    items = []
    if where == "ray":
        import ray

        cpus = int(ray.cluster_resources().get("CPU", 1))
    else:
        cpus = _local_cpus()
    for src_idx, (kind, _split, path, fmt) in enumerate(listed):
        if formats.is_compressed(path):
            logger.warning(
                "%s is compressed and is parsed by one task; decompress or pre-shard it "
                "for parallel parsing",
                path,
            )
            ranges = [(0, -1)]
        else:
            chunk_bytes = _chunk_bytes(path, chunk_lines, cpus, spread=where == "driver")
            plan = formats.plan_byte_chunks(path, chunk_bytes)
            ranges = [(c.byte_start, c.byte_end) for c in plan]
        for start, end in ranges:
            items.append(
                {
                    "item": len(items),
                    "source": src_idx,
                    "kind": kind,
                    "format": fmt,
                    "path": path,
                    "byte_start": start,
                    "byte_end": end,
                    "options": options,
                }
            )
    per_source: list[list[tuple[int, dict]]] = [[] for _ in listed]
    if items:
        logger.info("parsing %d sources in %d work items (%s)", len(listed), len(items), where)
        if where == "driver":
            results = _parse_items_in_driver(
                [{**item, **json.loads(item["options"])} for item in items], cpus
            )
        else:
            results = _parse_items_on_ray(items)
        for item, res in results:
            per_source[item["source"]].append((item["byte_start"], res))
    out = []
    opts = json.loads(options)
    for src_idx, (kind, _split, path, fmt) in enumerate(listed):
        parts = sorted(per_source[src_idx], key=lambda p: p[0])
        if not parts:  # empty plain file: no chunks
            parts = [(0, _empty_result({"kind": kind, "format": fmt, "path": path, **opts}))]
        skipped: dict[str, int] = {}
        offset = 0  # lines before the chunk
        for _, r in parts:
            for k, v in r["skipped"].items():
                skipped[k] = skipped.get(k, 0) + v
            for name in ("table", "rejects", "names"):
                r[name] = _shift_lines(r[name], offset)
            offset += r["lines"]
        names = [r["names"] for _, r in parts if r["names"] is not None]
        chunks = table = None
        if kind == "facts":  # chunks stay apart: their local ids differ
            chunks = [r["coded"] for _, r in parts]
        else:
            table = pa.concat_tables([r["table"] for _, r in parts]).combine_chunks()
        out.append(
            _SourceResult(
                table=table,
                chunks=chunks,
                rejects=pa.concat_tables([r["rejects"] for _, r in parts]).combine_chunks(),
                lines=sum(r["lines"] for _, r in parts),
                skipped=dict(sorted(skipped.items())),
                names=pa.concat_tables(names).combine_chunks() if names else None,
            )
        )
    return out, where


# ---------------------------------------------------------------------------------------------
# driver-side assembly
# ---------------------------------------------------------------------------------------------


def _column(table: pa.Table, name: str) -> pa.Array:
    col = table[name]
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


def _sorted_unique(arr: pa.Array) -> pa.Array:
    uniq = pc.unique(arr)
    return uniq.take(pc.sort_indices(uniq))


def _ids(keys: pa.Array, value_set: pa.Array) -> np.ndarray:
    """Position of each key in ``value_set`` (int64; -1 when absent or null)."""
    idx = pc.index_in(keys, value_set=value_set)
    return pc.fill_null(idx, -1).to_numpy(zero_copy_only=False).astype(np.int64)


def _rejects_table(source: str, lines: pa.Array, text: pa.Array, reason) -> pa.Table:
    n = len(lines)
    if isinstance(reason, str):
        reason = pa.array([reason] * n, pa.string())
    return pa.table(
        {
            "source": pa.array([source] * n, pa.string()),
            "line": lines,
            "text": text,
            "reason": reason,
        },
        schema=formats.REJECT_SCHEMA,
    )


def _reason_kind(reason: pa.Array) -> pa.Array:
    """Reason without the quoted specifics (the key, the pair), for per-reason counts."""
    reason = pc.replace_substring_regex(reason, r"'.*'", "'...'")
    return pc.replace_substring_regex(reason, r"^no fact \(.*\) in", "no fact (...) in")


def _by_reason(rejects: pa.Table) -> dict[str, int]:
    if not rejects.num_rows:
        return {}
    counts = pc.value_counts(_reason_kind(_column(rejects, "reason")))
    pairs = [(d["values"], int(d["counts"])) for d in counts.to_pylist()]
    return dict(sorted(pairs, key=lambda kv: (-kv[1], kv[0])))


# machine-id codes (hmn.ids); the names stay for the tests and callers of this module
_mid_codes = ids.mid_codes
_mid_strings = ids.mid_strings


def _assign_ids(parts: list[tuple[pa.Array, np.ndarray]]) -> tuple[pa.Array, np.ndarray]:
    """Sorted distinct keys of all chunk dictionaries, and the global id of every chunk's
    indices (concatenated in chunk order). Dictionaries may be int64 machine-id codes or
    strings (machine ids among them take the integer path; other keys are hashed once)."""
    if not parts:
        return pa.array([], pa.string()), np.zeros(0, dtype=np.int64)
    coded = [pa.types.is_integer(d.type) for d, _ in parts]
    if all(coded):
        distinct, maps = ids.sorted_union([np.unique(d.to_numpy()) for d, _ in parts])
        entry = [m[np.searchsorted(np.unique(d.to_numpy()), d.to_numpy())] for m, (d, _) in
                 zip(maps, parts)]  # fmt: skip
        return ids.mid_strings(distinct), np.concatenate(
            [e[np.asarray(idx)] for e, (_, idx) in zip(entry, parts)]
        )
    allkeys = pa.concat_arrays(
        [ids.mid_strings(d.to_numpy()) if c else d.cast(pa.string()) for (d, _), c in zip(parts, coded)]
    )
    codes = ids.mid_codes(allkeys)  # (entries,) order-preserving int64 of /m/ keys, -1 otherwise
    mid = codes >= 0
    uniq, mid_inv = np.unique(codes[mid], return_inverse=True)
    enc = allkeys.filter(pa.array(~mid)).dictionary_encode()
    distinct = pa.concat_arrays([ids.mid_strings(uniq), enc.dictionary])
    order = pc.sort_indices(distinct).to_numpy()
    rank = np.empty(len(distinct), dtype=np.int64)
    rank[order] = np.arange(len(distinct), dtype=np.int64)
    entry_id = np.empty(len(codes), dtype=np.int64)
    entry_id[mid] = rank[mid_inv]
    entry_id[~mid] = rank[len(uniq) + enc.indices.to_numpy(zero_copy_only=False)]
    distinct_sorted = distinct.take(pa.array(order))
    out, offset = [], 0
    for d, idx in parts:
        out.append(entry_id[offset + np.asarray(idx)])
        offset += len(d)
    return distinct_sorted, np.concatenate(out)


def _entity_ids(chunks: list[formats.CodedFacts], pool: ThreadPoolExecutor | None = None):
    """Sorted distinct entity keys of all chunks and, per chunk, the global id of each of its
    local ids. Machine-id codes only: one sort of the chunks' distinct codes and a binary search
    per chunk (sorted queries), no string is hashed or compared. With a ``pool``, the keys are
    a ``Future`` (machine-id codes are decoded to strings by the pool while the caller goes on)."""
    if all(isinstance(c.entities, np.ndarray) for c in chunks):
        union, maps = ids.sorted_union([c.entities for c in chunks])
        if pool is not None:
            return pool.submit(ids.mid_strings, union), len(union), maps
        return ids.mid_strings(union), len(union), maps
    parts = [
        pa.array(c.entities) if isinstance(c.entities, np.ndarray) else c.entities for c in chunks
    ]
    distinct, gid = _assign_ids([(p, np.arange(len(p))) for p in parts])
    maps, offset = [], 0
    for p in parts:
        maps.append(gid[offset : offset + len(p)])
        offset += len(p)
    if pool is not None:
        done = Future()
        done.set_result(distinct)
        return done, len(distinct), maps
    return distinct, len(distinct), maps


def _merge_runs(key: np.ndarray, runs: list[tuple[int, int]], pool) -> np.ndarray:
    """``key`` sorted, where ``key[a:b]`` is sorted for every ``(a, b)`` of ``runs`` (which
    tile it). One stable sort (timsort: a merge of the runs), or with a ``pool`` two: the runs
    are cut at a pivot value (near the median) and the lower and upper parts merged at once."""
    runs = [(a, b) for a, b in runs if b > a]
    if pool is None or len(runs) < 2 or len(key) < _PARALLEL_MIN:
        key.sort(kind="stable")
        return key
    pivot = int(np.median([key[(a + b) // 2] for a, b in runs]))
    cuts = [a + int(np.searchsorted(key[a:b], pivot)) for a, b in runs]
    lower = np.concatenate([key[a:c] for (a, _), c in zip(runs, cuts)])
    upper = np.concatenate([key[c:b] for (_, b), c in zip(runs, cuts)])
    del key
    merged = pool.submit(lower.sort, kind="stable")
    upper.sort(kind="stable")
    merged.result()
    return np.concatenate([lower, upper])


def _halves(n: int, pool) -> list[tuple[int, int]]:
    """``[0, n)`` cut in one piece per thread of ``pool`` (one piece when small or no pool)."""
    parts = pool._max_workers if pool is not None and n >= _PARALLEL_MIN else 1
    bounds = np.linspace(0, n, parts + 1).astype(np.int64).tolist()
    return list(zip(bounds[:-1], bounds[1:]))


def _run_all(pool, fn, pieces) -> None:
    """``fn(*piece)`` for every piece, on ``pool``'s threads when there is one (the last piece
    in the calling thread, which would otherwise wait idle)."""
    if pool is None or len(pieces) < 2:
        for piece in pieces:
            fn(*piece)
        return
    futures = [pool.submit(fn, *piece) for piece in pieces[:-1]]
    fn(*pieces[-1])
    for f in futures:
        f.result()


# the driver-side assembly splits its array passes over its threads from this many rows (numpy
# releases the GIL in take, sort and elementwise kernels)
_PARALLEL_MIN = 1 << 16


def _bits(n: int) -> int:
    return max(1, int(n - 1).bit_length())


def _build_kb(
    chunks: list[formats.CodedFacts], chunk_source: list[int], n_sources: int, pool=None
):
    """Dense ids for entities, relations and merged facts.

    ``chunks`` are the parsed chunks (source order, then line order) with chunk-local ids;
    ``chunk_source`` gives each chunk's index among the ``n_sources`` fact sources. Entity and
    relation ids are positions in the sorted distinct keys; facts are sorted by (subject id,
    relation id): a merge of the chunks' sorted runs of packed ``subject | relation | row``
    integers. With a thread ``pool`` the array passes are split over its threads and the entity
    keys are returned as a ``Future`` (decoded to strings while the facts are written)."""
    steps: dict[str, float] = {}
    tick = time.perf_counter()

    def step(name: str) -> None:
        nonlocal tick
        now = time.perf_counter()
        steps[name] = round(now - tick, 3)
        tick = now

    entity_keys, E, maps = _entity_ids(chunks, pool)
    rel_all = pa.concat_arrays([c.relations for c in chunks]) if chunks else pa.array([], pa.string())
    relation_keys = _sorted_unique(rel_all)
    rmaps = [_ids(c.relations, relation_keys) for c in chunks]
    R = len(relation_keys)
    n_rows = sum(c.rows for c in chunks)
    step("dictionaries")

    # facts sorted by (subject key, relation key) == by (subject id, relation id). Each chunk's
    # rows come sorted by its local ids, which map to global ids in the same order, so the
    # packed keys form one sorted run per chunk and a stable sort (timsort) merges the runs.
    eb, rb, nb = _bits(E), _bits(R), _bits(n_rows)
    packed = eb + rb + nb <= 63
    n_objects = sum(int(c.offsets[-1]) for c in chunks)
    odt = np.int32 if n_objects < 2**31 else np.int64  # int32 cumsum is several times faster
    key = np.empty(n_rows, dtype=np.int64)
    obj_id = np.empty(n_objects, dtype=np.int64)
    row_start = np.empty(n_rows, dtype=odt)  # first object of each row in obj_id
    row_len = np.empty(n_rows, dtype=odt)  # objects of each row
    row_base = np.cumsum([0] + [c.rows for c in chunks]).tolist()
    obj_base = np.cumsum([0] + [len(c.objects) for c in chunks]).tolist()

    def global_ids(i: int, lo: int, hi: int) -> None:  # rows [lo, hi) of chunk i
        c, m, rm, base = chunks[i], maps[i], rmaps[i], row_base[i]
        k = key[base + lo : base + hi]
        np.take(m, c.subject[lo:hi], out=k)  # (rows,) global subject ids
        if packed:
            k <<= rb + nb
            k |= rm[c.relation[lo:hi]] << nb
            k |= np.arange(base + lo, base + hi, dtype=np.int64)
        else:
            k *= R
            k += rm[c.relation[lo:hi]]
        a, b = int(c.offsets[lo]), int(c.offsets[hi])
        np.take(m, c.objects[a:b], out=obj_id[obj_base[i] + a : obj_base[i] + b])
        # a chunk's rows may locate their objects by `starts` (rows sorted, objects in place)
        starts = c.offsets[lo:hi] if c.starts is None else c.starts[lo:hi]
        np.add(starts, obj_base[i], out=row_start[base + lo : base + hi], dtype=odt,
               casting="unsafe")  # fmt: skip
        np.subtract(c.offsets[lo + 1 : hi + 1], c.offsets[lo:hi],
                    out=row_len[base + lo : base + hi], dtype=odt, casting="unsafe")  # fmt: skip

    _run_all(pool, global_ids, [(i, lo, hi) for i, c in enumerate(chunks)
                                for lo, hi in _halves(c.rows, pool)])  # fmt: skip
    del maps, rmaps
    step("ids")
    if packed:  # distinct values; rows ascend within a pair
        key = _merge_runs(key, list(zip(row_base[:-1], row_base[1:])), pool)
        row_order = key & ((1 << nb) - 1)
        key >>= nb
        pair_sorted = (key >> rb) * R + (key & ((1 << rb) - 1))
    else:
        row_order = np.argsort(key, kind="stable")
        pair_sorted = key[row_order]
    del key
    new = np.empty(n_rows, dtype=bool)
    if n_rows:
        new[0] = True
        np.not_equal(pair_sorted[1:], pair_sorted[:-1], out=new[1:])
    uniq_pair = pair_sorted[new]
    first_row = row_order[new]  # the first row of each fact, in fact order
    F = len(uniq_pair)
    merged_row = np.ones(n_rows, dtype=bool)
    merged_row[first_row] = False
    del pair_sorted
    step("facts")

    # objects: union per fact, first-seen order (rows in source/line order, then in-line order)
    kept_obj = None
    if F == n_rows and not any(c.repeats for c in chunks):
        # one row per fact, no line repeats an object (the common case): reorder the rows'
        # lists, no sort over the objects
        lens = row_len[first_row]
        offsets = np.zeros(F + 1, dtype=odt)
        np.cumsum(lens, out=offsets[1:])
        kept_obj = np.empty(n_objects, dtype=np.int64)

        def gather_objects(lo: int, hi: int) -> None:  # the objects of facts [lo, hi)
            a, b = int(offsets[lo]), int(offsets[hi])
            gather = np.repeat(row_start[first_row[lo:hi]].astype(np.int64) - offsets[lo:hi],
                               lens[lo:hi])  # fmt: skip
            gather += np.arange(a, b, dtype=np.int64)
            np.take(obj_id, gather, out=kept_obj[a:b])

        _run_all(pool, gather_objects, _halves(F, pool))
        del lens
    if kept_obj is None:
        if any(c.starts is not None for c in chunks):  # objects into row order first
            row_end = np.cumsum(row_len, dtype=np.int64)
            gather = np.repeat(row_start.astype(np.int64) - (row_end - row_len), row_len)
            gather += np.arange(n_objects, dtype=np.int64)
            obj_id = obj_id[gather]
            del gather, row_end
        row_fact = np.empty(n_rows, dtype=np.int64)
        row_fact[row_order] = np.cumsum(new) - 1
        obj_row = np.repeat(np.arange(n_rows, dtype=np.int64), row_len)
        obj_fact = row_fact[obj_row]
        _, first_obj = np.unique(obj_fact * E + obj_id, return_index=True)
        first_obj.sort()
        order = first_obj[np.argsort(obj_fact[first_obj], kind="stable")]
        kept_fact, kept_obj = obj_fact[order], obj_id[order]
        offsets = np.zeros(F + 1, dtype=np.int32)
        np.cumsum(np.bincount(kept_fact, minlength=F), out=offsets[1:])
    del row_order, new
    facts_out = pa.table(
        {
            "fact_id": pa.array(np.arange(F, dtype=np.int64)),
            "subject_id": pa.array(uniq_pair // R if R else uniq_pair),
            "relation_id": pa.array(uniq_pair % R if R else uniq_pair),
            "object_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(kept_obj)),
        },
        schema=FACTS_SCHEMA,
    )
    step("objects")
    chunk_rows = np.array([c.rows for c in chunks], dtype=np.int64)
    row_source = np.repeat(np.asarray(chunk_source, dtype=np.int64), chunk_rows)
    merged_per_table = np.bincount(row_source[merged_row], minlength=n_sources)
    info = {
        "fact_lines": int(n_rows),
        "merged_lines": int(merged_row.sum()),
        "duplicate_objects_dropped": int(len(obj_id) - len(kept_obj)),
        "objects": int(len(kept_obj)),
    }
    info["steps_s"] = steps
    answers = (offsets, kept_obj)  # for _answer_codes, computed only when there are questions
    return entity_keys, relation_keys, facts_out, uniq_pair, answers, merged_per_table, info


def _answer_codes(answers: tuple[np.ndarray, np.ndarray], E: int) -> np.ndarray:
    """Sorted (fact, object) codes ``fact * E + object`` for the answer checks."""
    offsets, kept_obj = answers
    kept_fact = np.repeat(np.arange(len(offsets) - 1, dtype=np.int64), np.diff(offsets))
    return np.sort(kept_fact * E + kept_obj, kind="stable")  # nearly sorted already


def _resolve_names(name_sources, entity_keys: pa.Array):
    """Name per entity (first seen wins, sources in order).

    ``name_sources`` holds ``(path, table, write_rejects)``. Returns the name column, the skipped
    rows of the sources with ``write_rejects`` as reject tables ``[(path, table)]``, the skip
    counts per reason of the others (RDF dumps, which name far more entities than the KB holds)
    ``{path: {reason: n}}``, and the number of named entities.
    """
    E = len(entity_keys)
    if not name_sources:
        return pa.nulls(E, pa.string()), [], {}, 0
    tables = [t.select(["line", "entity", "name"]) for _, t, _ in name_sources]
    names = pa.concat_tables(tables).combine_chunks()
    eid = _ids(_column(names, "entity"), entity_keys)
    in_kb = eid >= 0
    rows_in_kb = np.flatnonzero(in_kb)
    _, first = np.unique(eid[rows_in_kb], return_index=True)
    winner_rows = rows_in_kb[first]
    dup = in_kb.copy()
    dup[winner_rows] = False
    row_of_entity = np.full(E, -1, dtype=np.int64)
    row_of_entity[eid[winner_rows]] = winner_rows
    name_col = _column(names, "name").take(pa.array(row_of_entity, mask=row_of_entity < 0))

    offsets = np.concatenate([[0], np.cumsum([t.num_rows for t in tables])])
    skipped, counts = [], {}
    for i, (path, table, write_rejects) in enumerate(name_sources):
        lo, hi = offsets[i], offsets[i + 1]
        for mask, reason in ((~in_kb[lo:hi], SKIP_NOT_IN_KB), (dup[lo:hi], SKIP_DUPLICATE_NAME)):
            if not mask.any():
                continue
            if write_rejects:
                rows = table.filter(pa.array(mask))
                skipped.append(
                    (
                        path,
                        _rejects_table(path, _column(rows, "line"), _column(rows, "text"), reason),
                    )
                )
            else:
                per = counts.setdefault(path, {})
                per[reason] = per.get(reason, 0) + int(mask.sum())
    return name_col, skipped, counts, len(winner_rows)


def _resolve_questions(
    path: str, table: pa.Table, entity_keys, relation_keys, uniq_pair, answer_codes
):
    """Questions with dense ids, and rejects for those whose fact is not in the KB."""
    E, R = len(entity_keys), len(relation_keys)
    subj, rel = _column(table, "subject"), _column(table, "relation")
    sid, rid = _ids(subj, entity_keys), _ids(rel, relation_keys)
    code = np.where((sid >= 0) & (rid >= 0), sid * R + rid, -1)
    pos = np.minimum(np.searchsorted(uniq_pair, code), max(len(uniq_pair) - 1, 0))
    found = (code >= 0) & (len(uniq_pair) > 0)
    if len(uniq_pair):
        found &= uniq_pair[pos] == code
    fact_id = np.where(found, pos, -1)

    unknown_rel = rid < 0
    unknown_subj = (sid < 0) & ~unknown_rel
    no_fact = ~found & ~unknown_rel & ~unknown_subj
    reason = pc.if_else(
        pa.array(unknown_rel),
        pc.binary_join_element_wise("unknown relation '", rel, "'", ""),
        pc.if_else(
            pa.array(unknown_subj),
            pc.binary_join_element_wise("unknown subject '", subj, "'", ""),
            pc.binary_join_element_wise(
                "no fact (", subj, ", ", rel, ") in the knowledge base", ""
            ),
        ),
    )
    bad = ~found
    rejects = None
    if bad.any():
        mask = pa.array(bad)
        rows = table.filter(mask)
        rejects = _rejects_table(
            path, _column(rows, "line"), _column(rows, "text"), reason.filter(mask)
        )
    good = pa.array(found)
    oid = _ids(_column(table, "object"), entity_keys)
    ok = table.filter(good)
    n_ok = ok.num_rows
    oid_ok, fid_ok = oid[found], fact_id[found]
    questions = pa.table(
        {
            "question": _column(ok, "question"),
            "fact_id": pa.array(fid_ok),
            "subject_id": pa.array(sid[found]),
            "relation_id": pa.array(rid[found]),
            "object_id": pa.array(oid_ok, mask=oid_ok < 0),
            "source": pa.array([path] * n_ok, pa.string()),
            "line": _column(ok, "line"),
        },
        schema=QUESTIONS_SCHEMA,
    )
    known = oid_ok >= 0
    ans = fid_ok[known] * E + oid_ok[known]
    # membership by binary search (np.isin is slow on numpy 2.4's hash path)
    pos = np.minimum(np.searchsorted(answer_codes, ans), max(len(answer_codes) - 1, 0))
    in_fact = (answer_codes[pos] == ans) if len(answer_codes) else np.zeros(len(ans), bool)
    info = {
        "object_not_in_kb": int((~known).sum()),
        "answer_not_in_fact": int((~in_fact).sum()),
        "no_fact": int(no_fact.sum()),
    }
    return questions, rejects, info


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


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------


def run_ingest(
    sources: IngestSources,
    out_dir: str,
    *,
    max_reject_rate: float = 0.01,
    chunk_lines: int = 1_000_000,
    parse_in: str = "auto",
) -> dict:
    """Parse, validate and id-map the sources into ``out_dir`` (see module docstring).

    ``out_dir`` must be absent or empty (the caller renames it into place afterwards). Returns
    the stats, also written to ``out_dir/stats.json``. Raises ``ValueError`` when a source's
    malformed-line rate exceeds ``max_reject_rate`` (``rejects.parquet`` is written first, for
    inspection). ``parse_in``: where the chunks are parsed, "auto", "driver" (this process's
    threads) or "ray" (Ray Data tasks); see the module docstring. The allocators keep freed
    memory for reuse meanwhile (:func:`hmn.alloc.reuse_memory`).
    """
    with reuse_memory():
        return _run_ingest(sources, out_dir, max_reject_rate, chunk_lines, parse_in)


def _run_ingest(
    sources: IngestSources, out_dir: str, max_reject_rate: float, chunk_lines: int, parse_in: str
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

    parsed, parsed_in = _parse_all(listed, chunk_lines, sources, parse_in)
    t_parse = time.perf_counter()

    # --- per-source bookkeeping and the malformed-line limit -------------------------------------
    src_stats: dict[str, dict] = {}
    for (kind, split, path, fmt), r in zip(listed, parsed):
        n_rows = sum(c.rows for c in r.chunks) if r.chunks is not None else r.table.num_rows
        n_names = r.names.num_rows if r.names is not None else 0
        n_filtered = sum(r.skipped.values())
        if r.lines != n_rows + r.rejects.num_rows + n_filtered + n_names:
            raise RuntimeError(
                f"internal error: {path}: {r.lines} lines != {n_rows} parsed + "
                f"{r.rejects.num_rows} rejected + {n_filtered} filtered + {n_names} names"
            )
        src_stats[path] = {
            "kind": kind,
            "format": fmt,
            **({"split": split} if split is not None else {}),
            "lines": int(r.lines),
            "malformed": int(r.rejects.num_rows),
            "malformed_rate": r.rejects.num_rows / r.lines if r.lines else 0.0,
            **({"skipped_by_filter": r.skipped} if r.skipped or fmt == "rdf" else {}),
        }
    over = [(path, s) for path, s in src_stats.items() if s["malformed_rate"] > max_reject_rate]
    if over:
        all_rejects = pa.concat_tables([r.rejects for r in parsed])
        _write(all_rejects, out / "rejects.parquet")
        messages = []
        for path, s in over:
            rej = parsed[list(src_stats).index(path)].rejects
            first = [f"line {r['line']}: {r['reason']}" for r in rej.slice(0, 5).to_pylist()]
            messages.append(
                f"{path}: {s['malformed']} of {s['lines']} lines malformed "
                f"(rate {s['malformed_rate']:.4f} > max_reject_rate {max_reject_rate}); "
                f"first: {'; '.join(first)}"
            )
        raise ValueError(
            "ingest: too many malformed lines; see "
            + str(out / "rejects.parquet")
            + "\n"
            + "\n".join(messages)
        )

    # --- knowledge base ---------------------------------------------------------------------------
    fact_idx = [i for i, src in enumerate(listed) if src[0] == "facts"]
    fact_tables, table_source = [], []
    for j, i in enumerate(fact_idx):
        fact_tables += parsed[i].chunks
        table_source += [j] * len(parsed[i].chunks)
        parsed[i].chunks = parsed[i].table = None  # the driver keeps only the ids
    # the array passes of the assembly run on this machine's cores (numpy releases the GIL)
    cpus = _local_cpus()
    pool = ThreadPoolExecutor(max_workers=cpus, thread_name_prefix="ingest-kb") if cpus > 1 else None
    try:
        entity_keys, relation_keys, facts, uniq_pair, answers, merged, kb_info = _build_kb(
            fact_tables, table_source, len(fact_idx), pool
        )
        # the largest file is written by a thread (pyarrow releases the GIL) while the driver
        # decodes the entity keys, resolves names and questions and gathers the rejects
        facts_writer = ThreadPoolExecutor(max_workers=1)
        facts_written = facts_writer.submit(
            _write, facts, out / "kb" / "facts.parquet", **_FACTS_WRITE
        )
        if isinstance(entity_keys, Future):
            entity_keys = entity_keys.result()
    finally:
        if pool is not None:
            pool.shutdown()
    has_questions = any(src[0] == "questions" for src in listed)
    answer_codes = _answer_codes(answers, len(entity_keys)) if has_questions else None
    del answers
    del fact_tables
    kb_steps = kb_info.pop("steps_s")
    for j, i in enumerate(fact_idx):
        src_stats[listed[i][2]]["merged_lines"] = int(merged[j])

    name_sources = []
    for (kind, _split, path, fmt), r in zip(listed, parsed):
        if kind == "names":
            name_sources.append((path, r.table, fmt != "rdf"))
        elif r.names is not None:
            name_sources.append((path, r.names, False))
    name_col, skipped, name_counts, named = _resolve_names(name_sources, entity_keys)
    del name_sources
    E, R = len(entity_keys), len(relation_keys)
    entities = pa.table(
        {"entity_id": pa.array(np.arange(E, dtype=np.int64)), "key": entity_keys, "name": name_col},
        schema=ENTITIES_SCHEMA,
    )
    relations = pa.table(
        {"relation_id": pa.array(np.arange(R, dtype=np.int64)), "key": relation_keys},
        schema=RELATIONS_SCHEMA,
    )

    # --- questions ----------------------------------------------------------------------------------
    split_tables: dict[str, list[pa.Table]] = {split: [] for split in sources.questions}
    kb_rejects: dict[str, pa.Table] = {}
    for i, (kind, split, path, _fmt) in enumerate(listed):
        if kind != "questions":
            continue
        q, rej, info = _resolve_questions(
            path, parsed[i].table, entity_keys, relation_keys, uniq_pair, answer_codes
        )
        split_tables[split].append(q)
        if rej is not None:
            kb_rejects[path] = rej
        src_stats[path].update(info)

    # --- rejects and per-source stats -----------------------------------------------------------
    skipped_by_source: dict[str, list[pa.Table]] = {}
    for path, t in skipped:
        skipped_by_source.setdefault(path, []).append(t)
    reject_parts = []
    for (_kind, _split, path, _fmt), r in zip(listed, parsed):
        parts = [r.rejects] + skipped_by_source.get(path, [])
        if path in kb_rejects:
            parts.append(kb_rejects[path])
        src_rej = pa.concat_tables(parts)
        src_rej = src_rej.take(pc.sort_indices(src_rej, [("line", "ascending")]))
        reject_parts.append(src_rej)
        counted = dict(r.skipped)  # filter skips and name skips that have no reject rows
        for reason, n in name_counts.get(path, {}).items():
            counted[reason] = counted.get(reason, 0) + n
        n_counted = sum(counted.values())
        n_skipped = sum(t.num_rows for t in skipped_by_source.get(path, [])) + n_counted
        n_rejected = src_rej.num_rows - (n_skipped - n_counted)
        by_reason = _by_reason(src_rej)
        for reason, n in counted.items():
            by_reason[reason] = by_reason.get(reason, 0) + n
        s = src_stats[path]
        s.update(
            accepted=int(r.lines - src_rej.num_rows - n_counted),
            rejected=int(n_rejected),
            skipped=int(n_skipped),
            by_reason=dict(sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0]))),
        )
        if s["lines"] != s["accepted"] + s["rejected"] + s["skipped"]:
            raise RuntimeError(
                f"internal error: {path}: lines {s['lines']} != accepted {s['accepted']} + "
                f"rejected {s['rejected']} + skipped {s['skipped']}"
            )
    all_rejects = pa.concat_tables(reject_parts).combine_chunks()
    t_assemble = time.perf_counter()

    # --- write ---------------------------------------------------------------------------------------
    _write(entities, out / "kb" / "entities.parquet", **_ENTITIES_WRITE)
    _write(relations, out / "kb" / "relations.parquet")
    questions_count = {}
    for split, tables in split_tables.items():
        q = pa.concat_tables(tables).combine_chunks() if tables else QUESTIONS_SCHEMA.empty_table()
        _write(q, out / "questions" / f"{split}.parquet")
        questions_count[split] = q.num_rows
    _write(all_rejects, out / "rejects.parquet")
    facts_written.result()
    facts_writer.shutdown()
    t_write = time.perf_counter()

    stats = {
        "sources": src_stats,
        "totals": {
            "entities": E,
            "relations": R,
            "facts": facts.num_rows,
            **kb_info,
            "named_entities": int(named),
            "questions": questions_count,
            "lines": sum(s["lines"] for s in src_stats.values()),
            "rejected": sum(s["rejected"] for s in src_stats.values()),
            "skipped": sum(s["skipped"] for s in src_stats.values()),
        },
        "checks": {"lines_accounted": True},
        "config": {
            "sources": asdict(sources),
            "formats": {path: fmt for _, _, path, fmt in listed},
            "max_reject_rate": max_reject_rate,
            "chunk_lines": chunk_lines,
            "parse_in": parse_in,
        },
        "parsed_in": parsed_in,
        "timings_s": {
            "parse": round(t_parse - t0, 3),
            "assemble": round(t_assemble - t_parse, 3),
            "assemble_kb_steps": kb_steps,
            "write": round(t_write - t_assemble, 3),
            "total": round(time.perf_counter() - t0, 3),
        },
    }
    with open(out / "stats.json", "w") as f:
        json.dump(stats, f, indent=2, sort_keys=False)
    logger.info(
        "ingest: %d entities, %d relations, %d facts (%d merged lines), questions %s, "
        "%d rejected, %d skipped in %.1f s",
        E,
        R,
        facts.num_rows,
        kb_info["merged_lines"],
        questions_count,
        stats["totals"]["rejected"],
        stats["totals"]["skipped"],
        stats["timings_s"]["total"],
    )
    return stats
