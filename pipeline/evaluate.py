"""Batch evaluation job: ``python -m pipeline.evaluate --run-dir DIR --questions FILE [--reader NAME]``

Scores a trained run on any SimpleQuestions-format file (plain, .gz or .bz2) and prints one JSON
object. Nothing is dropped silently: malformed lines, questions whose subject, relation or fact is
not in the run's knowledge base, and questions with no known word are all counted. A question
whose (subject, relation) is not in the memory can never be answered correctly, so `accuracy`
counts it as wrong; `accuracy_known_facts` is over the questions whose fact is in the memory.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hmn.config import READER_NAMES, config_from_dict
from hmn.formats import iter_line_chunks, parse_questions
from hmn.text import Vocabulary
from pipeline.artifacts import KnowledgeBase

log = logging.getLogger("pipeline.evaluate")


def evaluate_file(run_dir: Path, questions: str, readers: tuple[str, ...], output: Path | None = None) -> dict:
    import yaml

    from pipeline.run import init_ray
    from pipeline.scoring import metrics, score

    cfg = config_from_dict(yaml.safe_load((run_dir / "config.resolved.yaml").read_text()))
    for stage in ("ingest", "memory", "train"):
        if not (run_dir / stage).is_dir():
            raise FileNotFoundError(f"{run_dir}: stage {stage!r} has no output; is this a finished run?")
    kb = KnowledgeBase.load(run_dir / "ingest")
    vocab = Vocabulary.load(run_dir / "train" / "vocab.json")

    tables, rejects, lines = [], [], 0
    for first, chunk in iter_line_chunks(questions):
        parsed = parse_questions(chunk, first, questions)
        tables.append(parsed.table)
        rejects.append(parsed.rejects)
        lines += parsed.lines
    table = pa.concat_tables(tables) if tables else None
    n_rejects = sum(r.num_rows for r in rejects)
    entity_id = {k: i for i, k in enumerate(kb.entity_keys)}
    relation_id = {k: i for i, k in enumerate(kb.relation_keys)}
    facts = kb.fact_lookup()
    counts = {"unknown_subject": 0, "unknown_relation": 0, "unknown_fact": 0}
    gold = []
    texts = []
    for s, r, q in zip(*(table[c].to_pylist() for c in ("subject", "relation", "question"))) if table else []:
        si, ri = entity_id.get(s), relation_id.get(r)
        if si is None:
            counts["unknown_subject"] += 1
        if ri is None:
            counts["unknown_relation"] += 1
        fid = facts.get((si, ri), -1) if si is not None and ri is not None else -1
        if fid < 0 and si is not None and ri is not None:
            counts["unknown_fact"] += 1
        gold.append(fid)
        texts.append(q)
    gold_arr = np.asarray(gold, dtype=np.int64)
    known = gold_arr >= 0
    tokens, unknown_tokens = vocab.encode_many(texts)
    result: dict = {
        "questions": len(texts), "lines": lines, "malformed_lines": n_rejects,
        **counts, "questions_with_unknown_fact": int((~known).sum()),
        "questions_without_known_words": int(sum(len(t) == 0 for t in tokens)),
        "questions_with_unknown_words": int((unknown_tokens > 0).sum()),
        "unknown_tokens": int(unknown_tokens.sum()), "memory_facts": kb.num_facts,
    }
    k = max(cfg.reader.k, cfg.eval.recall_k)
    init_ray(cfg)
    pred = score(run_dir, tokens, readers, cfg.reader, k=k, batch_size=cfg.eval.batch_size,
                 num_actors=cfg.eval.num_actors)
    safe_gold = np.where(known, gold_arr, 0)
    per_reader = metrics(pred, safe_gold, readers, kb.fact_subject, kb.fact_relation, cfg.eval.recall_k)
    for name, m in per_reader.items():
        correct = (pred[f"pred_{name}"].to_numpy() >= 0) & known
        p = np.where(correct, pred[f"pred_{name}"].to_numpy(), 0)
        hit = correct & (kb.fact_subject[p] == kb.fact_subject[safe_gold]) & (
            kb.fact_relation[p] == kb.fact_relation[safe_gold])
        m["accuracy"] = float(hit.sum() / max(len(texts), 1))
        m["accuracy_known_facts"] = float(hit.sum() / max(int(known.sum()), 1))
    primary = readers[0]
    result.update({"reader": primary, "accuracy": per_reader[primary]["accuracy"],
                   "accuracy_known_facts": per_reader[primary]["accuracy_known_facts"],
                   "facts_per_query": per_reader[primary]["facts_per_query"], "readers": per_reader,
                   "questions_file": str(questions), "run_dir": str(run_dir)})
    if output is not None:
        pq.write_table(pred.drop_columns([c for c in pred.column_names if c.startswith("cands_")])
                       .append_column("gold", pa.array(gold_arr)), output)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, help="a finished run directory")
    parser.add_argument("--questions", required=True, help="SimpleQuestions-format file")
    parser.add_argument("--reader", action="append", choices=READER_NAMES,
                        help="reader(s) to score with; the first gives `accuracy` (default: the run's "
                             "training infer_reader)")
    parser.add_argument("--output", help="write per-question predictions to this Parquet file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_dir = Path(args.run_dir).resolve()
    if not (run_dir / "config.resolved.yaml").exists():
        print(f"error: {run_dir} is not a run directory (no config.resolved.yaml)", file=sys.stderr)
        return 2
    if not Path(args.questions).exists():
        print(f"error: questions file {args.questions!r} does not exist", file=sys.stderr)
        return 2
    if args.reader:
        readers = tuple(dict.fromkeys(args.reader))
    else:
        import yaml

        readers = (yaml.safe_load((run_dir / "config.resolved.yaml").read_text())["train"]["infer_reader"],)
    if "exact" not in readers:
        readers = readers + ("exact",)  # for recall against exact; `accuracy` stays the first reader's
    result = evaluate_file(run_dir, args.questions, readers, Path(args.output) if args.output else None)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
