"""Line accounting of the ingest's sources: every line of every file is accepted, rejected or
skipped, and the counts are checked (``lines == accepted + rejected + skipped`` per file).

"Malformed" lines are the parser rejects (:func:`source_stats`, limited per file by
:func:`malformed_report`); "rejected" adds the lines rejected against the knowledge base
(questions without a fact); "skipped" lines are not errors (a name for an entity outside the
knowledge base, a second name for an entity, the lines an RDF filter leaves out, counted per
reason). :func:`finish_source_stats` gathers every source's rejects and completes its counts.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from hmn.parse_tasks import SourceResult

__all__ = ["source_stats", "malformed_report", "finish_source_stats", "by_reason"]

# (kind, split, path, format) of one source
Listed = tuple[str, "str | None", str, str]


def _reason_kind(reason: pa.Array) -> pa.Array:
    """Reason without the quoted specifics (the key, the pair), for per-reason counts."""
    reason = pc.replace_substring_regex(reason, r"'.*'", "'...'")
    return pc.replace_substring_regex(reason, r"^no fact \(.*\) in", "no fact (...) in")


def by_reason(rejects: pa.Table) -> dict[str, int]:
    """Reject rows counted per kind of reason, most frequent first."""
    if not rejects.num_rows:
        return {}
    reason = rejects["reason"]
    reason = reason.combine_chunks() if isinstance(reason, pa.ChunkedArray) else reason
    counts = pc.value_counts(_reason_kind(reason))
    pairs = [(d["values"], int(d["counts"])) for d in counts.to_pylist()]
    return dict(sorted(pairs, key=lambda kv: (-kv[1], kv[0])))


def source_stats(listed: list[Listed], parsed: list[SourceResult]) -> dict[str, dict]:
    """Per source path: kind, format, split, lines and malformed lines after parsing; raises
    ``RuntimeError`` when a source's lines are not all accounted for."""
    stats: dict[str, dict] = {}
    for (kind, split, path, fmt), r in zip(listed, parsed):
        n_rows = r.rows
        n_names = r.names.num_rows if r.names is not None else 0
        n_filtered = sum(r.skipped.values())
        if r.lines != n_rows + r.rejects.num_rows + n_filtered + n_names:
            raise RuntimeError(
                f"internal error: {path}: {r.lines} lines != {n_rows} parsed + "
                f"{r.rejects.num_rows} rejected + {n_filtered} filtered + {n_names} names"
            )
        stats[path] = {
            "kind": kind,
            "format": fmt,
            **({"split": split} if split is not None else {}),
            "lines": int(r.lines),
            "malformed": int(r.rejects.num_rows),
            "malformed_rate": r.rejects.num_rows / r.lines if r.lines else 0.0,
            **({"skipped_by_filter": r.skipped} if r.skipped or fmt == "rdf" else {}),
        }
    return stats


def malformed_report(
    stats: dict[str, dict], parsed: list[SourceResult], max_reject_rate: float
) -> str | None:
    """One line per source whose malformed-line rate exceeds ``max_reject_rate`` (counts, rate
    and the first reasons), or None when every source is within the limit."""
    over = [(path, s) for path, s in stats.items() if s["malformed_rate"] > max_reject_rate]
    if not over:
        return None
    messages = []
    for path, s in over:
        rej = parsed[list(stats).index(path)].rejects
        first = [f"line {r['line']}: {r['reason']}" for r in rej.slice(0, 5).to_pylist()]
        messages.append(
            f"{path}: {s['malformed']} of {s['lines']} lines malformed "
            f"(rate {s['malformed_rate']:.4f} > max_reject_rate {max_reject_rate}); "
            f"first: {'; '.join(first)}"
        )
    return "\n".join(messages)


def finish_source_stats(
    listed: list[Listed],
    parsed: list[SourceResult],
    stats: dict[str, dict],
    skipped: list[tuple[str, pa.Table]],
    name_counts: dict[str, dict[str, int]],
    kb_rejects: dict[str, pa.Table],
) -> pa.Table:
    """Every source's reject rows (parser rejects, ``skipped`` name rows, ``kb_rejects`` of
    questions), each source's sorted by line, in source order; completes ``stats`` with
    accepted / rejected / skipped and the counts per reason (``name_counts``: name skips
    without reject rows), and checks that every line is accounted for."""
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
        reasons = by_reason(src_rej)
        for reason, n in counted.items():
            reasons[reason] = reasons.get(reason, 0) + n
        s = stats[path]
        s.update(
            accepted=int(r.lines - src_rej.num_rows - n_counted),
            rejected=int(n_rejected),
            skipped=int(n_skipped),
            by_reason=dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
        )
        if s["lines"] != s["accepted"] + s["rejected"] + s["skipped"]:
            raise RuntimeError(
                f"internal error: {path}: lines {s['lines']} != accepted {s['accepted']} + "
                f"rejected {s['rejected']} + skipped {s['skipped']}"
            )
    return pa.concat_tables(reject_parts).combine_chunks()
