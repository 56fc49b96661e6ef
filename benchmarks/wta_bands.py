"""WTA-Hash: share of the memory read and accuracy against bands, permutations and window.

Calibrates the WTA-Hash row of Table 1 (``pipeline.experiments.table1`` picks the band count that
reads the clustered reader's share, from the per-band collision probability measured here). Uses a
finished run's trained encoder and memory, and a seeded sample of its dev questions; the exact
reader's accuracy on the same questions is printed first, side by side.

    python benchmarks/wta_bands.py --run-dir runs/sq32k/experiments/table1/exact-k10

The last line is one JSON object: per setting ``touched_share``, ``accuracy`` and
``band_collision_p`` (the p of touched = 1 - (1 - p)^bands).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from hmn.readers import make_reader
from hmn.text import Vocabulary
from hmn.training import accuracy, predict
from pipeline.artifacts import KnowledgeBase, load_memory, load_model, read_questions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True, help="a finished run (train and memory stages)")
    ap.add_argument("--questions", type=int, default=1000, help="dev questions sampled (seeded)")
    ap.add_argument("--bands", default="8,16,32,64")
    ap.add_argument("--perms", default="2,3,4")
    ap.add_argument("--windows", default="4,8")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.run_dir)
    model, _, _ = load_model(root / "train")
    memory = load_memory(root / "memory")
    kb = KnowledgeBase.load(root / "ingest")
    vocab = Vocabulary.load(root / "train" / "vocab.json")
    q = read_questions(root / "ingest", "dev")
    keep = np.sort(np.random.default_rng(0).choice(q.num_rows, min(args.questions, q.num_rows), replace=False))
    q = q.take(keep)
    tokens, _ = vocab.encode_many(q["question"].to_pylist())
    gold = q["fact_id"].to_numpy()

    def acc(pred: np.ndarray) -> float:
        return accuracy(pred, gold, kb.fact_subject, kb.fact_relation)

    exact = predict(model, make_reader("exact", memory, None), tokens, k=10, batch_size=256)
    out = {"questions": len(tokens), "facts": memory.n, "exact_accuracy": acc(exact.fact_ids), "settings": []}
    print(f"exact: accuracy {out['exact_accuracy']:.4f}", flush=True)
    for perms in map(int, args.perms.split(",")):
        for window in map(int, args.windows.split(",")):
            for bands in map(int, args.bands.split(",")):
                t0 = time.perf_counter()
                reader = make_reader("wta-hash", memory, None, bands=bands, perms=perms, window=window)
                p = predict(model, reader, tokens, k=10, batch_size=256)
                share = float(np.mean(p.touched)) / memory.n
                row = {"bands": bands, "perms": perms, "window": window, "touched_share": share,
                       "accuracy": acc(p.fact_ids),
                       "band_collision_p": 1 - (1 - min(share, 1 - 1e-12)) ** (1 / bands),
                       "seconds": time.perf_counter() - t0}
                out["settings"].append(row)
                print(f"L={bands} K={perms} w={window}: read {share:.4f}, accuracy {row['accuracy']:.4f}, "
                      f"p {row['band_collision_p']:.5f} ({row['seconds']:.1f} s)", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
