"""The ingest's parsing work: a plan of parse tasks, each parsed on its own, and the results of
one source joined in line order.

Every plain source file is cut into byte ranges of whole lines (:func:`plan_tasks`: about
``chunk_lines`` lines each, :func:`hmn.formats.lines.plan_byte_chunks`: one small read per cut, no
scan); a compressed file is one task, streamed. A task (:class:`ParseTask`) numbers its lines
from 1; :func:`join_source` shifts them by the line counts of the tasks before. Where the tasks
run (threads, processes, a cluster) is the caller's choice: :func:`parse_task` is a plain function
of a task.

Fact tasks give :class:`hmn.formats.coded.CodedFacts` (chunk-local dense ids, rows sorted by
(subject, relation, line)): a clean chunk of machine-id keys takes the fast path
(:func:`hmn.formats.coded.parse_grouped_coded`), any other goes through the careful line parser
with the same result plus its rejects. Name and question tasks give tables whose rows keep their
raw line (``text``), for the rejects of the later checks against the knowledge base.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hmn.formats.coded import CodedFacts, code_facts, parse_grouped_coded
from hmn.formats.grouped import FACT_LINES_SCHEMA, parse_grouped_bytes
from hmn.formats.lines import (
    ByteChunk,
    bytes_to_lines,
    count_lines,
    is_compressed,
    iter_line_chunks,
    plan_byte_chunks,
    read_byte_chunk,
)
from hmn.formats.parsed import Parsed
from hmn.formats.registry import RdfOptions, SourceFormat, source_format

logger = logging.getLogger(__name__)

__all__ = [
    "DRIVER_MAX_CHUNK_LINES",
    "ParseTask",
    "ChunkResult",
    "SourceResult",
    "local_cpus",
    "chunk_bytes",
    "plan_tasks",
    "parse_task",
    "empty_result",
    "join_source",
    "results_to_table",
    "results_from_table",
]

# in-process parsing takes one task per CPU up to this many lines each: fewer, larger chunks
# mean fewer distinct keys to decode and merge (measured at FB2M scale: merging 12 chunks'
# distinct entity codes 0.52 s, 4 chunks' 0.12 s); the cap bounds a chunk's memory (and the
# careful path's, when a chunk holds a bad line)
DRIVER_MAX_CHUNK_LINES = 4_000_000


@dataclass(frozen=True)
class ParseTask:
    """One unit of parsing: bytes ``byte_start`` to ``byte_end`` (whole lines) of the plain file
    ``path``, or with ``byte_end = -1`` the whole (compressed) file, streamed in pieces of
    ``chunk_lines`` lines. ``item`` is the task's position in the plan, ``source`` the index of
    its file among the listed sources, ``kind`` and ``format`` its registry entry
    (:mod:`hmn.formats.registry`)."""

    item: int
    source: int
    kind: str
    format: str
    path: str
    byte_start: int = 0
    byte_end: int = -1
    chunk_lines: int = 1_000_000
    rdf: RdfOptions = field(default_factory=RdfOptions)

    @property
    def source_format(self) -> SourceFormat:
        return source_format(self.kind, self.format)

    def to_json(self) -> str:
        """The task as one JSON string (for transport between processes)."""
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ParseTask:
        fields = json.loads(text)
        rdf = fields.pop("rdf")
        relations = rdf["relations"]
        rdf["relations"] = None if relations is None else tuple(relations)
        return cls(**fields, rdf=RdfOptions(**rdf))


@dataclass
class ChunkResult:
    """What one parse task gives: ``lines`` read (numbered from 1), their ``rejects``, the
    accepted rows as ``coded`` chunk-local facts (fact sources) or a ``table`` (names and
    questions, with a ``text`` column), the ``names`` an RDF facts file carries, and the lines
    an RDF filter ``skipped`` per reason."""

    lines: int
    rejects: pa.Table
    table: pa.Table | None = None
    coded: CodedFacts | None = None
    names: pa.Table | None = None
    skipped: dict[str, int] = field(default_factory=dict)


@dataclass
class SourceResult:
    """The joined results of one source, lines numbered in the file: ``table`` (names,
    questions) or ``chunks`` (facts: one :class:`CodedFacts` per task, in file order; their
    local ids differ), ``rejects``, ``lines``, ``skipped`` per reason, ``names`` (RDF facts)."""

    table: pa.Table | None
    chunks: list[CodedFacts] | None
    rejects: pa.Table
    lines: int
    skipped: dict[str, int]
    names: pa.Table | None

    @property
    def rows(self) -> int:
        """Accepted rows (fact lines, names or questions)."""
        return sum(c.rows for c in self.chunks) if self.chunks is not None else self.table.num_rows


def local_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def chunk_bytes(path: str, chunk_lines: int, cpus: int = 1, spread: bool = False) -> int:
    """Bytes per task for about ``chunk_lines`` lines, from the mean line length of the first
    MiB (tasks are byte ranges: planning them reads no more of the file). A file of several
    tasks gets a multiple of ``cpus`` tasks of equal size, so that the last wave keeps every CPU
    busy. With ``spread`` (in-process threads), tasks are larger when the file allows: one per
    CPU, of at least ``chunk_lines`` and at most :data:`DRIVER_MAX_CHUNK_LINES` lines."""
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


def plan_tasks(
    listed: Iterable[tuple[str, str | None, str, str]],
    chunk_lines: int,
    rdf: RdfOptions,
    cpus: int,
    spread: bool,
) -> list[ParseTask]:
    """The tasks of every ``(kind, split, path, format)`` source, in source then file order
    (``cpus``, ``spread``: see :func:`chunk_bytes`). An empty plain file has no task."""
    tasks: list[ParseTask] = []
    for src_idx, (kind, _split, path, fmt) in enumerate(listed):
        source_format(kind, fmt)  # a known format
        if is_compressed(path):
            logger.warning(
                "%s is compressed and is parsed by one task; decompress or pre-shard it "
                "for parallel parsing",
                path,
            )
            ranges = [(0, -1)]
        else:
            plan = plan_byte_chunks(path, chunk_bytes(path, chunk_lines, cpus, spread=spread))
            ranges = [(c.byte_start, c.byte_end) for c in plan]
        for start, end in ranges:
            tasks.append(ParseTask(item=len(tasks), source=src_idx, kind=kind, format=fmt,
                                   path=path, byte_start=start, byte_end=end,
                                   chunk_lines=chunk_lines, rdf=rdf))  # fmt: skip
    return tasks


def _finish(fmt: SourceFormat, parsed: list[Parsed], lines: list, firsts: list[int]) -> ChunkResult:
    """Join the pieces of one task. Name and question rows keep their raw line in a ``text``
    column; fact rows leave as :class:`CodedFacts` (chunk-local ids)."""
    tables, rejects, skipped, names = [], [], {}, []
    for p, ln, first in zip(parsed, lines, firsts):
        table = p.table
        if fmt.rows_in_names:
            table = p.names
        elif p.names is not None:
            names.append(p.names)
        if fmt.keep_text:
            table = table.append_column("text", ln.take(pc.subtract(table["line"], first)))
        tables.append(table)
        rejects.append(p.rejects)
        for k, v in p.skipped.items():
            skipped[k] = skipped.get(k, 0) + v
    coded = None
    if fmt.kind == "facts":
        # pieces of a streamed (compressed) file have different dictionaries: back to strings
        facts = [t.cast(FACT_LINES_SCHEMA) for t in tables] if len(tables) > 1 else tables
        coded = code_facts(pa.concat_tables(facts))
        tables = []
    return ChunkResult(
        lines=sum(p.lines for p in parsed),
        rejects=pa.concat_tables(rejects),
        table=pa.concat_tables(tables) if tables else None,
        coded=coded,
        names=pa.concat_tables(names) if names else None,
        skipped=skipped,
    )


def empty_result(kind: str, fmt: str, path: str, rdf: RdfOptions | None = None) -> ChunkResult:
    """The result of a source without lines (an empty file)."""
    spec = source_format(kind, fmt)
    empty = pa.array([], pa.string())
    return _finish(spec, [spec.parse(empty, 1, path, rdf or RdfOptions())], [empty], [1])


def _parse_grouped_range(task: ParseTask, fmt: SourceFormat) -> ChunkResult:
    """A byte range of grouped facts or triples: the coded fast path when every line is clean,
    else the careful parser of the bytes."""
    chunk = ByteChunk(task.path, task.byte_start, task.byte_end)
    fast = parse_grouped_coded(chunk, chunk.path, single_object=fmt.single_object)
    if fast is not None:  # every line clean: no rejects, coded directly
        coded, parsed = fast
        return ChunkResult(lines=parsed.lines, rejects=parsed.rejects, coded=coded)
    data = read_byte_chunk(chunk)
    parsed = parse_grouped_bytes(data, 1, count_lines(data), chunk.path,
                                 single_object=fmt.single_object, dictionary=True)  # fmt: skip
    return _finish(fmt, [parsed], [None], [1])


def parse_task(task: ParseTask) -> ChunkResult:
    """Parse one task: a byte range of whole lines of a plain file (lines numbered from 1
    within the range), or a whole compressed file, streamed."""
    fmt = task.source_format
    if task.byte_end >= 0:
        if fmt.grouped:
            return _parse_grouped_range(task, fmt)
        data = read_byte_chunk(ByteChunk(task.path, task.byte_start, task.byte_end))
        pieces = [(1, bytes_to_lines(data))]
        del data
    else:
        pieces = iter_line_chunks(task.path, task.chunk_lines)
    parsed, lines, firsts = [], [], []
    for first_line, chunk_lines in pieces:
        parsed.append(fmt.parse(chunk_lines, first_line, task.path, task.rdf))
        firsts.append(first_line)
        # the raw lines are kept only where a text column is built from them
        lines.append(chunk_lines if fmt.keep_text else None)
    if not parsed:  # empty compressed file
        return empty_result(task.kind, task.format, task.path, task.rdf)
    return _finish(fmt, parsed, lines, firsts)


def _shift_lines(table: pa.Table | None, offset: int) -> pa.Table | None:
    """``table`` with ``offset`` added to its ``line`` column (chunk-relative -> file lines)."""
    if table is None or offset == 0 or "line" not in table.column_names:
        return table
    i = table.schema.get_field_index("line")
    return table.set_column(i, "line", pc.add(table.column(i), offset))


def join_source(kind: str, results: list[ChunkResult]) -> SourceResult:
    """The results of one source's tasks, in file order, joined: lines renumbered in the file
    (each task's shifted by the lines of the tasks before), tables and rejects concatenated,
    fact chunks kept apart (their local ids differ)."""
    skipped: dict[str, int] = {}
    offset = 0  # lines before the chunk
    for r in results:
        for k, v in r.skipped.items():
            skipped[k] = skipped.get(k, 0) + v
        r.table, r.rejects, r.names = (_shift_lines(t, offset) for t in (r.table, r.rejects, r.names))
        offset += r.lines
    names = [r.names for r in results if r.names is not None]
    chunks = table = None
    if kind == "facts":
        chunks = [r.coded for r in results]
    else:
        table = pa.concat_tables([r.table for r in results]).combine_chunks()
    return SourceResult(
        table=table,
        chunks=chunks,
        rejects=pa.concat_tables([r.rejects for r in results]).combine_chunks(),
        lines=sum(r.lines for r in results),
        skipped=dict(sorted(skipped.items())),
        names=pa.concat_tables(names).combine_chunks() if names else None,
    )


# ---------------------------------------------------------------------------------------------
# results as one Arrow table (transport between processes)
# ---------------------------------------------------------------------------------------------

_IPC_COLUMNS = ("table", "coded", "rejects", "names")


def _to_ipc(table: pa.Table | None) -> pa.Buffer | bytes:
    if table is None:
        return b""
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


def results_to_table(items: list[int], results: list[ChunkResult]) -> pa.Table:
    """One row per result: the task's ``item``, ``lines``, the tables as Arrow IPC streams
    (``coded`` as :meth:`CodedFacts.to_table`; empty for none) and ``skipped`` as JSON."""
    ipc = {
        "table": [_to_ipc(r.table) for r in results],
        "coded": [_to_ipc(r.coded.to_table() if r.coded is not None else None) for r in results],
        "rejects": [_to_ipc(r.rejects) for r in results],
        "names": [_to_ipc(r.names) for r in results],
    }
    return pa.table(
        {
            "item": pa.array(items, pa.int64()),
            "lines": pa.array([r.lines for r in results], pa.int64()),
            **{k: _binary_column(ipc[k]) for k in _IPC_COLUMNS},
            "skipped": pa.array([json.dumps(r.skipped) for r in results], pa.string()),
        }
    )


def results_from_table(table: pa.Table) -> Iterator[tuple[int, ChunkResult]]:
    """``(item, result)`` of every row of a :func:`results_to_table` table."""
    for i in range(table.num_rows):
        loaded = {}
        for name in _IPC_COLUMNS:
            buf = table[name][i].as_buffer()
            loaded[name] = pa.ipc.open_stream(buf).read_all() if buf.size else None
        coded = loaded.pop("coded")
        yield table["item"][i].as_py(), ChunkResult(
            lines=table["lines"][i].as_py(),
            coded=CodedFacts.from_table(coded) if coded is not None else None,
            skipped=json.loads(table["skipped"][i].as_py()),
            **loaded,
        )
