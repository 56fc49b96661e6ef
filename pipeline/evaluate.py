"""Batch evaluation job:
``python -m pipeline.evaluate --run-dir DIR --questions FILE [--reader NAME]``

Scores a trained run on any SimpleQuestions-format file (plain, .gz or .bz2) and prints one JSON
object. Nothing is dropped silently: malformed lines, questions whose subject, relation or fact is
not in the run's knowledge base, and questions with no known word are all counted. A question
whose (subject, relation) is not in the memory can never be answered correctly, so `accuracy`
counts it as wrong; `accuracy_known_facts` is over the questions whose fact is in the memory.

The run is read under its lock, shared (`pipeline.rundir.run_lock`: never while a run writes it),
and only when it is consistent (`pipeline.driver.check_evaluable`): its ingest, memory and train
stages done, their files of the recorded sizes (digests too with ``--verify``), their fingerprints
those its ``config.resolved.yaml`` gives, and ``model.pt`` trained against them. An empty
questions file, or one with no line in the format, is an error naming the file.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hmn.config import READER_NAMES, ConfigError, RunConfig, config_from_dict, read_yaml
from hmn.formats.lines import iter_line_chunks
from hmn.formats.parsed import FormatError
from hmn.formats.questions import parse_questions
from hmn.kb import KeyTables, match_questions
from hmn.text import Vocabulary
from hmn.training import correct
from pipeline.artifacts import KnowledgeBase, UnsafeFileError, load_torch_file
from pipeline.driver import check_evaluable, check_k, init_ray
from pipeline.rundir import RunDir, RunDirError, is_store_uri, local_run_path, run_lock
from pipeline.stages.score import ScoringPlacement, metrics, score

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


class InputError(ValueError):
    """A run directory or input that a job cannot use; the message is one line, for the CLI."""


#: the stages a trained run's scoring reads, each with the output that marks it published
SCORING_INPUTS = (("ingest", "kb"), ("memory", None), ("train", "model.pt"))


def load_run_config(run_dir: Path, shown: str | None = None) -> RunConfig:
    """The resolved config of a run whose ingest, memory and train stages are done, consistent
    with the config and their recorded outputs (`pipeline.driver.check_evaluable`); raises
    `InputError` naming what is missing or stale otherwise. ``shown`` names the run in messages
    (the URI of a run directory on a store, whose cache ``run_dir`` is)."""
    run_dir = Path(run_dir)
    shown = shown or str(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"run directory {shown!r} does not exist")
    resolved = run_dir / "config.resolved.yaml"
    if not resolved.exists():
        raise InputError(f"{shown} is not a run directory (no config.resolved.yaml)")
    manifest = run_dir / "manifest.json"
    stages = json.loads(manifest.read_text()).get("stages", {}) if manifest.exists() else {}
    for stage, output in SCORING_INPUTS:
        path = run_dir / stage if output is None else run_dir / stage / output
        if not path.exists():
            status = stages.get(stage, {}).get("status", "not run")
            raise InputError(f"{shown}: the {stage} stage has not finished (manifest: {status}); "
                             f"run `python -m pipeline.run --run-dir {shown}` first")
    try:
        cfg = config_from_dict(read_yaml(resolved))
        model = load_torch_file(run_dir / "train" / "model.pt", "cpu", "the train stage", mmap=True)
        run = RunDir(run_dir)
        run.location = shown
        check_evaluable(run, cfg, model.get("fingerprints") or {})
    except (ConfigError, RunDirError, UnsafeFileError) as e:
        raise InputError(str(e)) from None
    return cfg


@contextmanager
def reading(run_dir: str | Path) -> Iterator[Path]:
    """Hold ``run_dir``'s lock shared while reading it: evaluations run side by side, but never
    while a run writes the directory (`InputError` naming that run) nor a run while they read.
    Yields the local folder to read: ``run_dir``, or for a run directory on a store (``s3://``,
    ``gs://``) its cache, holding the manifest, ``config.resolved.yaml`` and the done stages
    that scoring reads, downloaded and checked against the manifest (`RunDir.snapshot`)."""
    with ExitStack() as stack:
        local = local_run_path(run_dir)
        try:
            if is_store_uri(run_dir):
                run = RunDir(str(run_dir))
                stack.enter_context(run.lock(shared=True))
                run.snapshot(tuple(stage for stage, _ in SCORING_INPUTS))
                local = run.root
            elif local.is_dir():
                stack.enter_context(run_lock(local, shared=True))
        except (RunDirError, OSError) as e:
            raise InputError(f"{run_dir}: {e}" if isinstance(e, OSError) else str(e)) from None
        yield local


def check_questions(questions: str, table: pa.Table | None, lines: int) -> None:
    """`InputError` naming the file when it yields no question: empty, or no line in the
    SimpleQuestions format (a names or facts file given by mistake), with the first bad line."""
    if table is not None and table.num_rows:
        return
    if lines == 0:
        raise InputError(f"{questions}: empty: no questions to score")
    _, head = next(iter_line_chunks(questions, chunk_lines=1000))
    rejects = parse_questions(head, 1, questions).rejects
    why = (f"line {rejects['line'][0].as_py()}: {rejects['reason'][0].as_py()}" if rejects.num_rows
           else "no line holds a question")
    raise InputError(f"{questions}: not a SimpleQuestions question file (subject, relation, "
                     f"object, question; tab-separated): none of its {lines} lines parsed ({why})")


def evaluate_file(run_dir: Path, questions: str, readers: tuple[str, ...],
                  output: Path | None = None, shown: str | None = None) -> dict:
    """Score a finished run on a question file with `readers`; the first gives `accuracy`.
    ``shown`` names the run (its URI when ``run_dir`` is a store's cache)."""
    cfg = load_run_config(run_dir, shown)
    try:
        table, lines, n_rejects = read_question_file(questions)
    except FormatError as e:  # a directory, a truncated .gz
        raise InputError(str(e)) from None
    check_questions(questions, table, lines)
    kb = KnowledgeBase.load(run_dir / "ingest")
    vocab = Vocabulary.load(run_dir / "train" / "vocab.json")
    try:
        check_k({"reader.k": cfg.reader.k, "eval.recall_k": cfg.eval.recall_k}, kb.num_facts)
    except ConfigError as e:
        raise InputError(str(e)) from None
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
                 num_actors=cfg.eval.num_actors, placement=ScoringPlacement.from_config(cfg.eval))
    # `accuracy` counts a question whose fact is not in the memory as wrong
    per_reader = metrics(pred, gold, readers, kb.fact_subject, kb.fact_relation, cfg.eval.recall_k)
    for name, m in per_reader.items():
        hit = correct(pred[f"pred_{name}"].to_numpy(), gold, kb.fact_subject, kb.fact_relation)
        m["accuracy_known_facts"] = float(hit.sum() / max(int(known.sum()), 1))
    primary = readers[0]
    result.update({"reader": primary, "accuracy": per_reader[primary]["accuracy"],
                   "accuracy_known_facts": per_reader[primary]["accuracy_known_facts"],
                   "facts_per_query": per_reader[primary]["facts_per_query"], "readers": per_reader,
                   "questions_file": str(questions), "run_dir": shown or str(run_dir)})
    if output is not None:
        pq.write_table(pred.drop_columns([c for c in pred.column_names if c.startswith("cands_")])
                       .append_column("gold", pa.array(gold)), output)
    return result


def evaluate_run(run_dir: str | Path, questions: str | Path, readers: Sequence[str] | None = None,
                 output: str | Path | None = None) -> dict:
    """What the CLI prints, as a dict (see the module docstring): scores `run_dir` on the
    `questions` file with `readers` (default: the run's ``train.infer_reader``; exact is added
    for recall against exact). Raises `InputError` for a run directory or file it cannot use."""
    if not is_store_uri(run_dir):
        run_dir = local_run_path(run_dir).resolve()
    with reading(run_dir) as local:
        cfg = load_run_config(local, str(run_dir))
        if not Path(questions).exists():
            raise InputError(f"questions file {str(questions)!r} does not exist")
        if Path(questions).is_dir():
            raise InputError(f"questions file {str(questions)!r} is a directory, not a file")
        names = tuple(dict.fromkeys(readers)) if readers else (cfg.train.infer_reader,)
        unknown = [n for n in names if n not in READER_NAMES]
        if unknown:
            raise InputError(f"reader(s) {unknown}: unknown; known: {', '.join(READER_NAMES)}")
        if "exact" not in names:
            names = names + ("exact",)  # for recall against exact; `accuracy` stays the first's
        try:
            result = evaluate_file(local, str(questions), names, Path(output) if output else None,
                                   shown=str(run_dir))
        except UnsafeFileError as e:  # a planted file among those the scoring reads
            raise InputError(str(e)) from None
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True,
                        help="a finished run directory: a local path, s3://BUCKET/PATH or "
                             "gs://BUCKET/PATH")
    parser.add_argument("--questions", required=True, help="SimpleQuestions-format file")
    parser.add_argument("--reader", action="append", choices=READER_NAMES,
                        help="reader(s) to score with; the first gives `accuracy` (default: the "
                             "run's training infer_reader)")
    parser.add_argument("--output", help="write per-question predictions to this Parquet file")
    parser.add_argument("--verify", action="store_true",
                        help="check the digests of the run's outputs, not only their sizes")
    args = parser.parse_args(argv)
    RunDir.verify_digests = args.verify
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        result = evaluate_run(args.run_dir, args.questions, args.reader, args.output)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
