"""How evenly TransE's partitioned schedule spreads a run's triples: bucket sizes and the work a
round waits for, with entity partitions as ranges of ids against ranges of a seeded permutation
(``hmn.transe.entity_order``, what the embed stage uses).

    .venv/bin/python benchmarks/transe_buckets.py --run-dir runs/sq-scaling/experiments/scaling/1m

A round of the schedule (``hmn.transe.bucket_schedule``) lasts as long as its largest bucket, so
per partition count the JSON gives the largest bucket over the mean and ``round_work_ratio``: the
sum over rounds of the largest bucket of the round, over the ideal (the triples shared equally
by the workers); 1.0 = no worker ever waits; ``partition_loads_per_epoch``: partitions read
(and as many written) in an epoch, the I/O of the schedule. Last line printed: the JSON written to ``--out``
(default ``benchmarks/out/transe_buckets_<run name>.json``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hmn.transe import bucket_schedule, entity_order, entity_partition, partition_bounds  # noqa: E402


def triples_of(run: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """(heads, tails, entity count) of a run's ingested facts."""
    facts = pq.read_table(run / "ingest" / "kb" / "facts.parquet",
                          columns=["subject_id", "object_ids"])
    parents = pc.list_parent_indices(facts["object_ids"])
    heads = pc.take(facts["subject_id"], parents).to_numpy()
    tails = pc.list_flatten(facts["object_ids"]).to_numpy()
    entities = pq.read_metadata(run / "ingest" / "kb" / "entities.parquet").num_rows
    return heads.astype(np.int64), tails.astype(np.int64), int(entities)


def partition_loads(rounds: list, workers: int) -> int:
    """Partition loads of one epoch's schedule (as many writes): a worker keeps a partition
    that its next bucket also uses (`pipeline.stages.embed`), and loads the others."""
    loads = 0
    for w in range(workers):
        mine = [r[w] for r in rounds] + [None]
        held: set[int] = set()
        for k, bucket in enumerate(mine[:-1]):
            if bucket is None:
                continue
            loads += len(set(bucket) - held)
            held = set(bucket) & set(mine[k + 1] or ())
    return loads


def balance(heads: np.ndarray, tails: np.ndarray, E: int, P: int, workers: int,
            seed: int) -> dict:
    bounds = partition_bounds(E, P)
    hp, tp = entity_partition(heads, bounds), entity_partition(tails, bounds)
    sizes = np.bincount(hp * P + tp, minlength=P * P)
    rounds = bucket_schedule(P, workers, seed, 0)
    waited = sum(max(sizes[i * P + j] for (i, j) in (b for b in r if b is not None))
                 for r in rounds if any(b is not None for b in r))
    return {"partitions": P, "rounds": len(rounds),
            "partition_loads_per_epoch": partition_loads(rounds, workers),
            "largest_bucket_over_mean": float(sizes.max() / sizes.mean()),
            "round_work_ratio": float(waited / (len(heads) / workers))}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, required=True)
    parser.add_argument("--partitions", default="4,8,16")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    heads, tails, E = triples_of(args.run_dir)
    order = entity_order(E, args.seed)
    result = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "entities": E, "triples": int(len(heads)), "by_partitions": []}
    for P in (int(p) for p in args.partitions.split(",")):
        result["by_partitions"].append({
            "id_ranges": balance(heads, tails, E, P, args.workers, args.seed),
            "shuffled": balance(order[heads], order[tails], E, P, args.workers, args.seed)})
    out = args.out or ROOT / "benchmarks" / "out" / f"transe_buckets_{args.run_dir.name}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
