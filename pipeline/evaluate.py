"""Batch evaluation job:
``python -m pipeline.evaluate --run-dir DIR --questions FILE [--reader NAME]``

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
from hmn.formats.lines import iter_line_chunks
from hmn.formats.questions import parse_questions
from hmn.kb import KeyTables, match_questions
from hmn.text import Vocabulary
from hmn.training import correct
from pipeline.artifacts import KnowledgeBase
from pipeline.driver import init_ray
from pipeline.stages.score import metrics, score

log = logging.getLogger("pipeline.evaluate")


def read_question_file(questions: str) -> tuple[pa.Table | None, int, int]:
    """The parsed questions of a SimpleQuestions-format file (None when it has no lines), its
    line count and its malformed line count."""
    tables, rejects, lines = [], [], 0
    for first, chunk in iter_line_chunks(questions):
        parsed = parse_questions(chunk, first, questions)
        tables.append(parsed.table)
        rejects.append(parsed.rejects)
        lines += parsed.lines
    table = pa.concat_tables(tables) if tables else None
    return table, lines, sum(r.num_rows for r in rejects)


def gold_facts(kb: KnowledgeBase, table: pa.Table | None) -> tuple[np.ndarray, list[str], dict]:
    """Gold fact id of each parsed question (-1 when its subject, relation or (subject, relation)
    fact is not in the run's knowledge base), the question texts, and how many were unknown.
    The ingest stage's own resolution (:func:`hmn.kb.match_questions`)."""
    if table is None or table.num_rows == 0:
        counts = {"unknown_subject": 0, "unknown_relation": 0, "unknown_fact": 0}
        return np.zeros(0, dtype=np.int64), [], counts
    keys = KeyTables.from_facts(kb.entity_keys, kb.relation_keys, kb.fact_subject, kb.fact_relation)
    match = match_questions(table["subject"], table["relation"], keys)
    counts = {"unknown_subject": int((match.subject_id < 0).sum()),
              "unknown_relation": int((match.relation_id < 0).sum()),
              "unknown_fact": int(match.no_fact.sum())}
    return match.fact_id.astype(np.int64), table["question"].to_pylist(), counts


def _run_config(run_dir: Path):
    import yaml

    cfg = config_from_dict(yaml.safe_load((run_dir / "config.resolved.yaml").read_text()))
    for stage in ("ingest", "memory", "train"):
        if not (run_dir / stage).is_dir():
            raise FileNotFoundError(f"{run_dir}: stage {stage!r} has no output; "
                                    f"is this a finished run?")
    return cfg


def evaluate_file(run_dir: Path, questions: str, readers: tuple[str, ...],
                  output: Path | None = None) -> dict:
    """Score a finished run on a question file with `readers`; the first gives `accuracy`."""
    cfg = _run_config(run_dir)
    kb = KnowledgeBase.load(run_dir / "ingest")
    vocab = Vocabulary.load(run_dir / "train" / "vocab.json")
    table, lines, n_rejects = read_question_file(questions)
    gold, texts, counts = gold_facts(kb, table)
    known = gold >= 0
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
    # `accuracy` counts a question whose fact is not in the memory as wrong
    per_reader = metrics(pred, gold, readers, kb.fact_subject, kb.fact_relation, cfg.eval.recall_k)
    for name, m in per_reader.items():
        hit = correct(pred[f"pred_{name}"].to_numpy(), gold, kb.fact_subject, kb.fact_relation)
        m["accuracy_known_facts"] = float(hit.sum() / max(int(known.sum()), 1))
    primary = readers[0]
    result.update({"reader": primary, "accuracy": per_reader[primary]["accuracy"],
                   "accuracy_known_facts": per_reader[primary]["accuracy_known_facts"],
                   "facts_per_query": per_reader[primary]["facts_per_query"], "readers": per_reader,
                   "questions_file": str(questions), "run_dir": str(run_dir)})
    if output is not None:
        pq.write_table(pred.drop_columns([c for c in pred.column_names if c.startswith("cands_")])
                       .append_column("gold", pa.array(gold)), output)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, help="a finished run directory")
    parser.add_argument("--questions", required=True, help="SimpleQuestions-format file")
    parser.add_argument("--reader", action="append", choices=READER_NAMES,
                        help="reader(s) to score with; the first gives `accuracy` (default: the "
                             "run's training infer_reader)")
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

        resolved = yaml.safe_load((run_dir / "config.resolved.yaml").read_text())
        readers = (resolved["train"]["infer_reader"],)
    if "exact" not in readers:
        readers = readers + ("exact",)  # for recall against exact; `accuracy` stays the first's
    output = Path(args.output) if args.output else None
    result = evaluate_file(run_dir, args.questions, readers, output)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
