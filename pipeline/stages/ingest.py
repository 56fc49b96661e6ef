"""Ingest stage: original text files -> dense-id Parquet tables of the knowledge base and questions.

Parsing runs in parallel on Ray Data: every source file is cut into chunks of whole lines
(byte ranges found by :func:`hmn.formats.plan_line_chunks`; a compressed file is one chunk), one
work item per chunk goes through ``map_batches`` calling the ``hmn.formats`` parsers, and each
task returns its parsed rows and rejects as Arrow IPC bytes. The driver then assigns dense ids
(sorted by key, so ids are deterministic), merges repeated (subject, relation) pairs into one
fact, resolves names and questions against the KB, and writes with ``pyarrow.parquet``:

``out_dir/``
    ``kb/entities.parquet``   entity_id int64, key string, name string (nullable)
    ``kb/relations.parquet``  relation_id int64, key string
    ``kb/facts.parquet``      fact_id int64, subject_id int64, relation_id int64,
    object_ids list<int64>
    ``questions/<split>.parquet``  question string, fact_id int64, subject_id int64,
    relation_id int64, object_id int64 (nullable), source string, line int64
    ``rejects.parquet``       ``hmn.formats.REJECT_SCHEMA``: every line not accepted
    ``stats.json``            what :func:`run_ingest` returns

Every line of every source is accounted for: ``lines == accepted + rejected + skipped`` per file.
"Skipped" lines are not errors (a name for an entity outside the KB, a second name for an
entity); they are in ``rejects.parquet`` too. "Malformed" lines are the parser rejects; their
rate per file must stay under ``max_reject_rate``. Questions whose fact is not in the KB are
rejected but do not count as malformed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hmn import formats

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

_PARSERS = {
    "facts": formats.parse_grouped_facts,
    "names": formats.parse_names,
    "questions": formats.parse_questions,
}
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class IngestSources:
    """Input files: grouped facts, names, and SimpleQuestions files per split name."""

    facts: list[str]
    names: list[str] = field(default_factory=list)
    questions: dict[str, list[str]] = field(default_factory=dict)

    def listed(self) -> list[tuple[str, str | None, str]]:
        """``(kind, split, path)`` for every source, in a fixed order; validated."""
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
        return out


# ---------------------------------------------------------------------------------------------
# parallel parsing (runs in Ray Data tasks)
# ---------------------------------------------------------------------------------------------


def _to_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def _from_ipc(data: bytes) -> pa.Table:
    return pa.ipc.open_stream(pa.py_buffer(data)).read_all()


def _parse_item(item: dict) -> tuple[pa.Table, pa.Table, int]:
    """Parse one work item (a chunk of a plain file, or a whole compressed file).

    For names and questions the raw line is kept in an extra ``text`` column, so that lines
    rejected later against the KB keep their original text in ``rejects.parquet``.
    """
    parser = _PARSERS[item["kind"]]
    keep_text = item["kind"] != "facts"
    if item["byte_end"] >= 0:
        chunk = formats.LineChunk(
            item["path"], item["first_line"], item["byte_start"], item["byte_end"], item["lines"]
        )
        pieces = [(chunk.first_line, formats.read_line_chunk(chunk))]
    else:
        pieces = formats.iter_line_chunks(item["path"], item["chunk_lines"])
    tables, rejects, n_lines = [], [], 0
    for first_line, lines in pieces:
        parsed = parser(lines, first_line, item["path"])
        table = parsed.table
        if keep_text:
            pos = pc.subtract(table["line"], first_line)
            table = table.append_column("text", lines.take(pos))
        tables.append(table)
        rejects.append(parsed.rejects)
        n_lines += parsed.lines
    if not tables:  # empty compressed file
        empty = parser(pa.array([], pa.string()), 1, item["path"])
        table = empty.table
        if keep_text:
            table = table.append_column("text", pa.array([], pa.string()))
        tables, rejects = [table], [empty.rejects]
    return pa.concat_tables(tables), pa.concat_tables(rejects), n_lines


def _parse_batch(batch: pa.Table) -> pa.Table:
    """``map_batches`` UDF: parse each work item of the batch, return IPC-encoded results."""
    out = {"item": [], "lines": [], "table": [], "rejects": []}
    for item in batch.to_pylist():
        table, rejects, n_lines = _parse_item(item)
        out["item"].append(item["item"])
        out["lines"].append(n_lines)
        out["table"].append(_to_ipc(table))
        out["rejects"].append(_to_ipc(rejects))
    return pa.table(
        {
            "item": pa.array(out["item"], pa.int64()),
            "lines": pa.array(out["lines"], pa.int64()),
            "table": pa.array(out["table"], pa.large_binary()),
            "rejects": pa.array(out["rejects"], pa.large_binary()),
        }
    )


def _parse_all(listed, chunk_lines: int) -> list[tuple[pa.Table, pa.Table, int]]:
    """Parse every source on Ray Data; return (table, rejects, lines) per source, in order."""
    import ray

    items = []
    for src_idx, (kind, _split, path) in enumerate(listed):
        chunks = formats.plan_line_chunks(path, chunk_lines)
        if formats.is_compressed(path):
            logger.warning(
                "%s is compressed and is parsed by one task; decompress or pre-shard it "
                "for parallel parsing",
                path,
            )
        for c in chunks:
            items.append(
                {
                    "item": len(items),
                    "source": src_idx,
                    "kind": kind,
                    "path": path,
                    "first_line": c.first_line,
                    "byte_start": c.byte_start,
                    "byte_end": c.byte_end,
                    "lines": c.lines,
                    "chunk_lines": chunk_lines,
                }
            )
    per_source: list[list[tuple[int, pa.Table, pa.Table, int]]] = [[] for _ in listed]
    if items:
        logger.info("parsing %d sources in %d work items", len(listed), len(items))
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map_batches(_parse_batch, batch_size=1, batch_format="pyarrow")
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in batch.to_pylist():
                item = items[row["item"]]
                per_source[item["source"]].append(
                    (
                        item["first_line"],
                        _from_ipc(row["table"]),
                        _from_ipc(row["rejects"]),
                        row["lines"],
                    )
                )
    out = []
    for src_idx, (kind, _split, path) in enumerate(listed):
        parts = sorted(per_source[src_idx], key=lambda p: p[0])
        if not parts:  # empty plain file: no chunks
            empty = _PARSERS[kind](pa.array([], pa.string()), 1, path)
            table = empty.table
            if kind != "facts":
                table = table.append_column("text", pa.array([], pa.string()))
            out.append((table, empty.rejects, 0))
            continue
        out.append(
            (
                pa.concat_tables([p[1] for p in parts]).combine_chunks(),
                pa.concat_tables([p[2] for p in parts]).combine_chunks(),
                sum(p[3] for p in parts),
            )
        )
    return out


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


def _build_kb(fact_tables: list[pa.Table]):
    """Dense ids for entities, relations and merged facts."""
    facts = pa.concat_tables(fact_tables).combine_chunks()
    subj = _column(facts, "subject")
    rel = _column(facts, "relation")
    objects = _column(facts, "objects")
    flat_obj = pc.list_flatten(objects)
    entity_keys = _sorted_unique(pa.concat_arrays([subj, flat_obj]))
    relation_keys = _sorted_unique(rel)
    E, R = len(entity_keys), len(relation_keys)
    subj_id, rel_id, obj_id = (
        _ids(subj, entity_keys),
        _ids(rel, relation_keys),
        _ids(flat_obj, entity_keys),
    )

    # facts sorted by (subject key, relation key) == by (subject id, relation id)
    pair = subj_id * R + rel_id  # (rows,)
    uniq_pair, first_row, row_fact = np.unique(pair, return_index=True, return_inverse=True)
    F = len(uniq_pair)
    merged_row = np.ones(len(pair), dtype=bool)
    merged_row[first_row] = False

    # objects: union per fact, first-seen order (rows in source/line order, then in-line order)
    obj_row = pc.list_parent_indices(objects).to_numpy()
    obj_fact = row_fact[obj_row]
    _, first_obj = np.unique(obj_fact * E + obj_id, return_index=True)
    first_obj.sort()
    order = first_obj[np.argsort(obj_fact[first_obj], kind="stable")]
    kept_fact, kept_obj = obj_fact[order], obj_id[order]
    offsets = np.zeros(F + 1, dtype=np.int32)
    np.cumsum(np.bincount(kept_fact, minlength=F), out=offsets[1:])
    facts_out = pa.table(
        {
            "fact_id": pa.array(np.arange(F, dtype=np.int64)),
            "subject_id": pa.array(uniq_pair // R),
            "relation_id": pa.array(uniq_pair % R),
            "object_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(kept_obj)),
        },
        schema=FACTS_SCHEMA,
    )
    fact_rows = np.array([t.num_rows for t in fact_tables])
    row_source = np.repeat(np.arange(len(fact_tables)), fact_rows)
    merged_per_table = np.bincount(row_source[merged_row], minlength=len(fact_tables))
    info = {
        "fact_lines": int(len(pair)),
        "merged_lines": int(merged_row.sum()),
        "duplicate_objects_dropped": int(len(obj_id) - len(kept_obj)),
        "objects": int(len(kept_obj)),
    }
    # (fact, object) codes for answer checks
    answer_codes = np.sort(kept_fact * E + kept_obj)
    return entity_keys, relation_keys, facts_out, uniq_pair, answer_codes, merged_per_table, info


def _resolve_names(name_sources, entity_keys: pa.Array):
    """Name per entity (first seen wins); skipped rows per source."""
    E = len(entity_keys)
    if not name_sources:
        return pa.nulls(E, pa.string()), [], 0
    tables = [t for _, t in name_sources]
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
    skipped = []
    for i, (path, _) in enumerate(name_sources):
        lo, hi = offsets[i], offsets[i + 1]
        sub = names.slice(lo, hi - lo)
        for mask, reason in ((~in_kb[lo:hi], SKIP_NOT_IN_KB), (dup[lo:hi], SKIP_DUPLICATE_NAME)):
            if mask.any():
                rows = sub.filter(pa.array(mask))
                skipped.append(
                    (
                        path,
                        _rejects_table(path, _column(rows, "line"), _column(rows, "text"), reason),
                    )
                )
    return name_col, skipped, len(winner_rows)


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


def _write(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


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
    inspection).
    """
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

    parsed = _parse_all(listed, chunk_lines)
    t_parse = time.perf_counter()

    # --- per-source bookkeeping and the malformed-line limit -------------------------------------
    src_stats: dict[str, dict] = {}
    for (kind, split, path), (table, rejects, n_lines) in zip(listed, parsed):
        if n_lines != table.num_rows + rejects.num_rows:
            raise RuntimeError(
                f"internal error: {path}: {n_lines} lines != {table.num_rows} parsed + "
                f"{rejects.num_rows} rejected"
            )
        src_stats[path] = {
            "kind": kind,
            **({"split": split} if split is not None else {}),
            "lines": int(n_lines),
            "malformed": int(rejects.num_rows),
            "malformed_rate": rejects.num_rows / n_lines if n_lines else 0.0,
        }
    over = [(path, s) for path, s in src_stats.items() if s["malformed_rate"] > max_reject_rate]
    if over:
        all_rejects = pa.concat_tables([r for _, r, _ in parsed])
        _write(all_rejects, out / "rejects.parquet")
        messages = []
        for path, s in over:
            rej = parsed[list(src_stats).index(path)][1]
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
    fact_idx = [i for i, (k, _, _) in enumerate(listed) if k == "facts"]
    entity_keys, relation_keys, facts, uniq_pair, answer_codes, merged, kb_info = _build_kb(
        [parsed[i][0] for i in fact_idx]
    )
    for j, i in enumerate(fact_idx):
        src_stats[listed[i][2]]["merged_lines"] = int(merged[j])

    name_sources = [
        (listed[i][2], parsed[i][0]) for i, (k, _, _) in enumerate(listed) if k == "names"
    ]
    name_col, skipped, named = _resolve_names(name_sources, entity_keys)
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
    for i, (kind, split, path) in enumerate(listed):
        if kind != "questions":
            continue
        q, rej, info = _resolve_questions(
            path, parsed[i][0], entity_keys, relation_keys, uniq_pair, answer_codes
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
    for (_kind, _split, path), (_table, rejects, n_lines) in zip(listed, parsed):
        parts = [rejects] + skipped_by_source.get(path, [])
        if path in kb_rejects:
            parts.append(kb_rejects[path])
        src_rej = pa.concat_tables(parts)
        src_rej = src_rej.take(pc.sort_indices(src_rej, [("line", "ascending")]))
        reject_parts.append(src_rej)
        n_skipped = sum(t.num_rows for t in skipped_by_source.get(path, []))
        n_rejected = src_rej.num_rows - n_skipped
        s = src_stats[path]
        s.update(
            accepted=int(n_lines - src_rej.num_rows),
            rejected=int(n_rejected),
            skipped=int(n_skipped),
            by_reason=_by_reason(src_rej),
        )
        if s["lines"] != s["accepted"] + s["rejected"] + s["skipped"]:
            raise RuntimeError(
                f"internal error: {path}: lines {s['lines']} != accepted {s['accepted']} + "
                f"rejected {s['rejected']} + skipped {s['skipped']}"
            )
    all_rejects = pa.concat_tables(reject_parts).combine_chunks()
    t_assemble = time.perf_counter()

    # --- write ---------------------------------------------------------------------------------------
    _write(entities, out / "kb" / "entities.parquet")
    _write(relations, out / "kb" / "relations.parquet")
    _write(facts, out / "kb" / "facts.parquet")
    questions_count = {}
    for split, tables in split_tables.items():
        q = pa.concat_tables(tables).combine_chunks() if tables else QUESTIONS_SCHEMA.empty_table()
        _write(q, out / "questions" / f"{split}.parquet")
        questions_count[split] = q.num_rows
    _write(all_rejects, out / "rejects.parquet")
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
            "max_reject_rate": max_reject_rate,
            "chunk_lines": chunk_lines,
        },
        "timings_s": {
            "parse": round(t_parse - t0, 3),
            "assemble": round(t_assemble - t_parse, 3),
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
