"""benchmarks/memory_stage.py's comparison: equal memory outputs are found equal whatever their
timings, and a changed fact row or index array is not."""

import importlib.util
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_memory_stage",
                                               ROOT / "benchmarks" / "memory_stage.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _memory(run: Path, facts: np.ndarray, leaves: np.ndarray, seconds: float) -> Path:
    (run / "memory" / "index").mkdir(parents=True)
    np.save(run / "memory" / "facts.npy", facts)
    np.savez(run / "memory" / "index" / "arrays.npz", leaf_of_fact=leaves)
    (run / "memory" / "index" / "index.json").write_text(json.dumps(
        {"n": len(facts), "stats": {"seconds": seconds, "embeddings_fingerprint": str(seconds)}}))
    return run


def test_same_outputs_ignores_timings_and_catches_changes(tmp_path):
    facts = np.arange(12, dtype=np.float32).reshape(4, 3)
    leaves = np.array([0, 1, 1, 0])
    a = _memory(tmp_path / "a", facts, leaves, 1.0)
    b = _memory(tmp_path / "b", facts, leaves, 2.0)
    assert bench.same_outputs(a, b) == {"facts_npy": True, "index_arrays": True,
                                        "index_json": True}
    changed = facts.copy()
    changed[2, 1] += 1
    c = _memory(tmp_path / "c", changed, np.array([0, 1, 0, 0]), 1.0)
    assert bench.same_outputs(a, c) == {"facts_npy": False, "index_arrays": False,
                                        "index_json": True}
