"""How a trained scaling run does on the questions that names cannot settle.

The ambiguity ceiling of a scaling memory (``generate/realism.json``) is the share of dev
questions whose gold (subject name, relation) pair belongs to one subject only: a reader that
matched names and relations exactly would answer those for sure. It is not an upper bound on
accuracy: where several subjects share the pair, such a reader still guesses right 1 / ties of
the time, and a trained model may do better than guessing (FB2M systems do: the real subject is
usually the better-connected one). This splits a finished run's dev accuracy by ties and sets it
beside the name-only reader's expected accuracy with a random tie-break, ``mean(1 / ties)``.

    python benchmarks/ambiguity.py --run-dir runs/sq-scaling/experiments/scaling/1m

Ties are counted in the run's own knowledge base (its ingest stage: entity names, facts'
subjects and relations); predictions are the evaluate stage's (``evaluate/predictions/dev.parquet``:
a reader is right when its fact has the gold fact's subject and relation, as in the report).
The last line is a JSON object (its arguments in it), also written to
``benchmarks/out/ambiguity_<size>.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.artifacts import KnowledgeBase  # noqa: E402


def tie_counts(kb: KnowledgeBase, facts: np.ndarray) -> np.ndarray:
    """For each fact id in ``facts``: how many distinct subjects of the knowledge base carry its
    subject's name and a fact of its relation (0 where its subject has no name)."""
    names = pa.array(kb.entity_names, pa.string())
    subj_name = names.take(pa.array(kb.fact_subject))
    rel = pa.array(kb.fact_relation.astype(np.int64)).cast(pa.string())
    key = pc.binary_join_element_wise(subj_name, rel, "\t")  # null where the subject is unnamed
    table = pa.table({"key": key, "subject": pa.array(kb.fact_subject.astype(np.int64))})
    table = table.filter(pc.is_valid(table["key"]))
    counts = table.group_by("key").aggregate([("subject", "count_distinct")])
    wanted = key.take(pa.array(facts))
    pos = pc.index_in(wanted, value_set=counts["key"])
    ties = counts["subject_count_distinct"].take(pos.fill_null(0)).to_numpy(zero_copy_only=False)
    return np.where(pos.is_valid().to_numpy(zero_copy_only=False), ties, 0).astype(np.int64)


def split_accuracy(kb: KnowledgeBase, pred: pa.Table, readers: list[str]) -> dict:
    gold = pred["gold"].to_numpy()
    ties = tie_counts(kb, gold)
    groups = {"all": np.ones(len(gold), bool), "unique": ties == 1, "shared": ties > 1,
              "unnamed": ties == 0}
    guess = np.where(ties > 0, 1.0 / np.maximum(ties, 1), 0.0)
    out: dict = {"questions": int(len(gold)),
                 "ties": {"mean_where_shared": float(ties[ties > 1].mean()) if (ties > 1).any()
                          else None, "max": int(ties.max())}}
    for g, mask in groups.items():
        row = {"questions": int(mask.sum()),
               "name_only_expected_accuracy": float(guess[mask].mean()) if mask.any() else None}
        for r in readers:
            p = pred[f"pred_{r}"].to_numpy()
            right = (kb.fact_subject[p] == kb.fact_subject[gold]) & \
                (kb.fact_relation[p] == kb.fact_relation[gold])
            row[f"accuracy_{r}"] = float(right[mask].mean()) if mask.any() else None
        out[g] = row
    out["ceiling_unique_share"] = float(groups["unique"].mean())
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", required=True, type=Path)
    p.add_argument("--out", default=None, help="default benchmarks/out/ambiguity_<size>.json")
    args = p.parse_args(argv)
    run = args.run_dir
    pred_path = run / "evaluate" / "predictions" / "dev.parquet"
    if not pred_path.exists():
        raise SystemExit(f"{pred_path}: no dev predictions (is the run's evaluate stage done?)")
    kb = KnowledgeBase.load(run / "ingest")
    pred = pq.read_table(pred_path)
    readers = [c[len("pred_"):] for c in pred.column_names if c.startswith("pred_")]
    realism_path = run / "generate" / "realism.json"
    realism = json.loads(realism_path.read_text()) if realism_path.exists() else {}
    size = realism.get("size") or run.name
    result = {"benchmark": "ambiguity", "args": {"run_dir": str(run), "out": args.out},
              "size": size, "facts": kb.num_facts,
              "realism_ambiguity_ceiling": realism.get("ambiguity_ceiling", {}).get("share"),
              "dev": split_accuracy(kb, pred, readers)}
    out = Path(args.out or ROOT / "benchmarks" / "out" / f"ambiguity_{size}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
