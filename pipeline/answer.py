"""Ask a trained run questions:
``python -m pipeline.answer --run-dir DIR [--k 5] [--reader NAME] "question" ... | --questions FILE``

Prints one JSON line per question, in input order:

    {"question": ..., "reader": "exact", "unknown_words": [...], "facts": [
        {"rank": 1, "fact_id": ..., "score": ...,
         "subject": {"key": "/m/...", "name": ...}, "relation": "/people/person/...",
         "objects": [{"key": "/m/...", "name": ...}, ...]}, ...]}

`facts` are the reader's top k, best first (fewer when the reader reads fewer facts); `score` is
the inner product of the question's encoding with the fact's vector, which the reader ranks by.
`unknown_words` are the question's words that are not in the run's vocabulary: the bag-of-words
encoder cannot use them, so a question made only of unknown words gets an arbitrary answer. The
reader defaults to the run's ``train.infer_reader``.

A question file holds one question per line, or SimpleQuestions lines (subject, relation,
object, question, tab-separated), whose question column is asked; .gz and .bz2 are read too.

No Ray: the run is loaded in this process (under its shared lock, after the checks of
``python -m pipeline.evaluate``: `pipeline.evaluate.load_run_config`) by the evaluate stage's
scorer (`pipeline.stages.score.Scorer`), and the questions are scored with
`hmn.training.predict` in batches of ``eval.batch_size`` as the evaluate stage and
``python -m pipeline.evaluate`` do, so the top fact is their prediction for the same question
and reader.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from hmn.config import READER_NAMES, RunConfig
from hmn.formats.lines import iter_line_chunks
from hmn.text import Vocabulary, tokenize
from hmn.training import predict
from pipeline.artifacts import KnowledgeBase, UnsafeFileError
from pipeline.evaluate import InputError, load_run_config, reading
from pipeline.rundir import is_store_uri, local_run_path
from pipeline.stages.score import Scorer

log = logging.getLogger("pipeline.answer")

#: fields of a SimpleQuestions line; the question is the last
SIMPLEQUESTIONS_FIELDS = 4


class Answerer:
    """A trained run loaded once (knowledge base, vocabulary, model, memory, one reader), to
    answer any number of questions."""

    def __init__(self, run_dir: str | Path, reader: str | None = None):
        target = run_dir if is_store_uri(run_dir) else local_run_path(run_dir).resolve()
        with reading(target) as local:  # loaded whole, so the lock is held while loading only
            self.run_dir = local  # a run directory on a store: its cache
            self.cfg: RunConfig = load_run_config(local, str(target))
            self.reader_name = reader or self.cfg.train.infer_reader
            if self.reader_name not in READER_NAMES:
                raise InputError(f"reader {self.reader_name!r}: unknown; "
                                 f"known: {', '.join(READER_NAMES)}")
            self.kb = KnowledgeBase.load(self.run_dir / "ingest")
            self.vocab = Vocabulary.load(self.run_dir / "train" / "vocab.json")
            self.known_words = frozenset(self.vocab.words)
            try:  # the model, the memory and the reader; threads: keep this process's setting
                self.scorer = Scorer(str(self.run_dir), (self.reader_name,), self.cfg.reader,
                                     k=self.cfg.reader.k, threads=torch.get_num_threads())
            except UnsafeFileError as e:
                raise InputError(str(e)) from None

    def answer(self, questions: Sequence[str], k: int = 5) -> list[dict]:
        """One dict per question (the JSON line the CLI prints), in order."""
        texts = check_questions(questions, k)
        tokens, _ = self.vocab.encode_many(texts)
        pred = predict(self.scorer.model, self.scorer.readers[self.reader_name], tokens, k=k,
                       batch_size=self.cfg.eval.batch_size)
        out = []
        for i, text in enumerate(texts):
            unknown = [w for w in tokenize(text) if w not in self.known_words]
            if len(tokens[i]) == 0:
                log.warning("question %d has no known word (%r): its answer is arbitrary", i + 1, text)
            facts = [self.fact(int(f), float(s), rank)
                     for rank, (f, s) in enumerate(zip(pred.candidates[i], pred.scores[i]), 1)
                     if f >= 0]
            out.append({"question": text, "reader": self.reader_name, "unknown_words": unknown,
                        "facts": facts})
        return out

    def entity(self, entity_id: int) -> dict:
        return {"key": str(self.kb.entity_keys[entity_id]), "name": self.kb.entity_names[entity_id]}

    def fact(self, fact_id: int, score: float, rank: int) -> dict:
        kb = self.kb
        objects = kb.object_values[kb.object_offsets[fact_id]:kb.object_offsets[fact_id + 1]]
        return {"rank": rank, "fact_id": fact_id, "score": score,
                "subject": self.entity(int(kb.fact_subject[fact_id])),
                "relation": str(kb.relation_keys[kb.fact_relation[fact_id]]),
                "objects": [self.entity(int(o)) for o in objects]}


def check_questions(questions: Sequence[str], k: int) -> list[str]:
    """The questions stripped; raises `InputError` for an empty one or a bad `k`."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise InputError(f"k={k!r}: must be an integer >= 1")
    if not questions:
        raise InputError("no questions given")
    texts = [q.strip() for q in questions]
    for i, text in enumerate(texts):
        if not text:
            raise InputError(f"question {i + 1} is empty")
    return texts


def read_questions(path: str | Path) -> list[str]:
    """The questions of a file: one per line, or the question column of SimpleQuestions lines.
    Raises `InputError` naming the line for an empty question or another number of fields."""
    path = str(path)
    if not Path(path).is_file():
        raise InputError(f"questions file {path!r} does not exist")
    questions = []
    for first, chunk in iter_line_chunks(path):
        for n, line in enumerate(chunk.to_pylist(), first):
            if line is None:
                raise InputError(f"{path}:{n}: not valid UTF-8")
            fields = line.split("\t")
            if len(fields) not in (1, SIMPLEQUESTIONS_FIELDS):
                raise InputError(f"{path}:{n}: expected a question or {SIMPLEQUESTIONS_FIELDS} "
                                 f"tab-separated SimpleQuestions fields, got {len(fields)} fields")
            question = fields[-1].strip()
            if not question:
                raise InputError(f"{path}:{n}: empty question")
            questions.append(question)
    if not questions:
        raise InputError(f"questions file {path!r} has no questions")
    return questions


def answer_questions(run_dir: str | Path, questions: str | Sequence[str], k: int = 5,
                     reader: str | None = None) -> list[dict]:
    """Top-k facts of each question (a string is one question); see the module docstring."""
    questions = [questions] if isinstance(questions, str) else list(questions)
    check_questions(questions, k)  # before the run is loaded
    return Answerer(run_dir, reader).answer(questions, k=k)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.answer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True,
                        help="a run whose train stage is done: a local path, s3://BUCKET/PATH or "
                             "gs://BUCKET/PATH")
    parser.add_argument("questions", nargs="*", help="questions to answer")
    parser.add_argument("--questions", dest="questions_file", metavar="FILE",
                        help="a file of questions: one per line, or SimpleQuestions lines")
    parser.add_argument("--k", type=int, default=5, help="facts per question (default: 5)")
    parser.add_argument("--reader", choices=READER_NAMES,
                        help="reader to answer with (default: the run's train.infer_reader)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if bool(args.questions) == bool(args.questions_file):
            raise InputError("give questions as arguments or --questions FILE (one of the two)")
        questions = read_questions(args.questions_file) if args.questions_file else args.questions
        answers = answer_questions(args.run_dir, questions, k=args.k, reader=args.reader)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for a in answers:
        print(json.dumps(a, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
