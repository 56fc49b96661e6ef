"""``pipeline.answer`` against ``pipeline.evaluate`` on a trained run (issue 18): for the first
``--n`` questions of a SimpleQuestions file, the top fact of ``pipeline.answer`` must have the
subject and relation of the batch evaluation's prediction, for each reader asked; and the answers
carry names.

    python benchmarks/answer_agreement.py --run-dir runs/sq-scaling/experiments/scaling/1m \\
        --questions ../shared/data/simplequestions/questions_dev.txt --n 200

The last line is a JSON object (its arguments in it): per reader the questions compared, how many
agree, and the share of answers whose top fact's subject has a name; one example answer. Also
written to ``benchmarks/out/answer_agreement.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import answer, evaluate  # noqa: E402
from pipeline.answer import read_questions  # noqa: E402
from pipeline.artifacts import KnowledgeBase  # noqa: E402

OUT = ROOT / "benchmarks" / "out" / "answer_agreement.json"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", required=True)
    p.add_argument("--questions", required=True, help="SimpleQuestions lines (tab-separated)")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--readers", default="clustered,exact")
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    readers = args.readers.split(",")
    with open(args.questions, encoding="utf-8") as f:
        lines = [line for _, line in zip(range(args.n), f)]
    kb = KnowledgeBase.load(Path(args.run_dir) / "ingest")
    result = {"benchmark": "answer_agreement", "args": vars(args), "readers": {}}
    with tempfile.TemporaryDirectory() as tmp:
        subset = Path(tmp) / "questions.txt"
        subset.write_text("".join(lines), encoding="utf-8")
        out = evaluate(args.run_dir, subset, readers=readers, output=Path(tmp) / "pred.parquet")
        if out["questions"] != len(lines):
            raise SystemExit(f"{args.questions}: {out['questions']} of the first {len(lines)} "
                             "lines were scored; the rows would not align")
        pred = pq.read_table(Path(tmp) / "pred.parquet")
        questions = read_questions(subset)
        for reader in readers:
            answers = answer(args.run_dir, questions, k=args.k, reader=reader)
            got = [(a["facts"][0]["subject"]["key"], a["facts"][0]["relation"]) for a in answers]
            want = [(kb.entity_keys[kb.fact_subject[f]], kb.relation_keys[kb.fact_relation[f]])
                    for f in pred[f"pred_{reader}"].to_numpy()]
            named = sum(a["facts"][0]["subject"]["name"] is not None for a in answers)
            result["readers"][reader] = {
                "questions": len(questions), "agree": sum(g == w for g, w in zip(got, want)),
                "top_subject_named_share": round(named / len(questions), 4)}
            result.setdefault("example", answers[0])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
