"""benchmarks/kmeans.py: ours and faiss start from the same centroids, run the same iterations and
threads, and the ratios come from interleaved rounds."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("faiss")

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_kmeans", ROOT / "benchmarks" / "kmeans.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    """600 unit rows in 16-d around 12 directions (a few k-means iterations matter)."""
    rng = np.random.default_rng(3)
    centres = rng.standard_normal((12, 16))
    x = centres[rng.integers(0, 12, 600)] + 0.6 * rng.standard_normal((600, 16))
    return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), dtype=np.float32)


def test_faiss_starts_from_the_given_centroids(rows):
    """After 0 iterations faiss's centroids are C0, our k-means++ init."""
    c0, _ = bench.initial_centroids(rows, 10, seed=5)
    r = bench.run_faiss(rows, 10, 0, 5, 1)
    assert np.array_equal(r["c0"], c0)
    np.testing.assert_allclose(r["centroids"], c0, atol=1e-6)  # faiss renormalises: 1 ulp
    # ... and the assignment is made under the final (here: the initial) centroids
    assert np.array_equal(r["assignments"], np.argmax(rows @ c0.T, axis=1))


def test_ours_and_faiss_make_the_same_first_iteration(rows):
    """Both evaluate J(C0) in their first iteration and move to the same centroids."""
    k, seed = 10, 5
    c0, _ = bench.initial_centroids(rows, k, seed)
    j0 = bench.final_objective(rows, c0)
    ours = bench.run_ours(rows, k, 1, seed, 1)
    faiss_run = bench.run_faiss(rows, k, 1, seed, 1)
    assert ours["threads"] == 1 and faiss_run["threads"] == 1
    assert ours["iterations"] == faiss_run["iterations"] == 1
    # ours' pruned passes sum c . (its rows' sum), j0 the cosines: the same J(C0) up to ~1e-8
    assert ours["objective_trace"][0] == pytest.approx(j0, rel=1e-7)
    assert faiss_run["objective_trace"][0] == pytest.approx(j0, rel=1e-5)  # float32 sum
    np.testing.assert_allclose(ours["centroids"], faiss_run["centroids"], atol=1e-5)
    assert np.mean(ours["assignments"] == faiss_run["assignments"]) >= 0.99


def test_rounds_alternate_and_the_ratio_is_the_median_of_paired_rounds(rows, monkeypatch):
    calls = []
    totals = {"ours": iter([4.0, 12.0, 3.0]), "faiss": iter([2.0, 3.0, 3.0])}

    def fake(name):
        def run(x, k, iters, seed, threads, *rest):
            calls.append(name)
            c0, _ = bench.initial_centroids(x, k, seed)
            out = {"total_seconds": next(totals[name]), "objective_trace": [1.0],
                   "centroids": c0, "assignments": np.zeros(len(x), int), "iterations": iters}
            if name == "faiss":
                out.update(c0=c0, init_seconds=0.5, assign_seconds=0.5, train_seconds=1.0)
            return out
        return run

    monkeypatch.setattr(bench, "run_ours", fake("ours"))
    monkeypatch.setattr(bench, "run_faiss", fake("faiss"))
    out = bench.compare(rows, 10, 2, 5, 1, 3, "torch")
    assert calls == ["ours", "faiss"] * 3
    assert out["round_ratios"] == [2.0, 4.0, 1.0]
    assert out["total_time_ratio_vs_faiss"] == 2.0  # median of the paired ratios
    assert out["total_time_ratio_vs_faiss_min"] == 1.5  # fastest ours / fastest faiss
    assert out["objective_gap"] == 0.0  # both returned C0: the same objective
    assert out["rounds"]["ours"][0]["init_check"]["j_c0"] == out["objective_c0"]


def test_smoke_run_writes_the_keys(rows, tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "synthetic", lambda n: rows)
    out = tmp_path / "k.json"
    assert bench.main(["--datasets", "1m", "--n", "600", "--k", "8", "--iters", "2",
                       "--repeats", "1", "--threads", "1", "--out", str(out)]) == 0
    import json

    got = json.loads(out.read_text())
    assert got["1m"]["rounds"]["ours"][0]["init_check"]["rel_diff"] < 1e-7  # J(C0), see above
    assert set(got) >= {"total_time_ratio_vs_faiss_1m", "objective_gap_1m", "args"}
    assert got["args"]["iters"] == 2 and got["1m"]["iters"] == 2
