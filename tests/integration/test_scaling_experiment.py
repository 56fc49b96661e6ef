"""The scaling experiment end to end on a tiny real-format data folder: the generate stage writes
the memory, two variants of one size share its stages, and the report has their rows."""

from __future__ import annotations

import json
from pathlib import Path

from hmn.config import load_config
from pipeline.experiments import run_experiment
from pipeline.rundir import RunDir
from tests.unit.test_scaling import make_real_data

ROOT = Path(__file__).resolve().parents[2]
TINY = ["scaling.facts=2000", "embed.dim=32", "embed.epochs=5", "embed.num_cpus=1",
        "memory.iters=5", "train.max_epochs=2", "train.batch_size=64", "train.num_workers=0",
        "train.cpus_per_worker=1"]  # fmt: skip


def test_two_variants_of_one_size_end_to_end(ray_local, tmp_path, capsys):
    from pipeline.evaluate import main as evaluate_main

    data = make_real_data(tmp_path / "data")
    cfg = load_config(ROOT / "configs/sq-scaling.yaml", TINY + [f"scaling.data_dir={data}"])
    base = RunDir(tmp_path / "exp")
    result = run_experiment("scaling", cfg, base, only=("1m", "1m-exact"))
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"1m", "1m-exact"}
    assert "29k" in result["not_run"] and "10m" in result["not_run"]
    clustered, exact = base.root / "experiments/scaling/1m", base.root / "experiments/scaling/1m-exact"
    # the clustered variant owns the size's stages, the exact one links them
    for stage in ("generate", "ingest", "embed", "memory"):
        assert (clustered / stage).is_dir() and not (clustered / stage).is_symlink()
        assert (exact / stage).is_symlink()
    assert not (exact / "train").is_symlink()
    gen = clustered / "generate"
    assert (gen / "questions_dev.txt").read_bytes() == (
        data / "simplequestions/questions_dev.txt").read_bytes()
    realism = json.loads((gen / "realism.json").read_text())
    for r in rows.values():
        assert r["facts"] == 2000 == realism["counts"]["facts"]
        assert r["ambiguity_ceiling"] == realism["ambiguity_ceiling"]["share"]
        assert set(r["stage_seconds"]) == {"generate", "ingest", "embed", "memory", "train",
                                           "evaluate"}
        assert 1 <= r["best_epoch"] <= r["epochs"] <= 2 and r["seconds_per_epoch"] > 0
    assert rows["1m-exact"]["facts_per_query"] == 2000
    assert rows["1m-exact"]["recall10_vs_exact"] is None
    assert rows["1m-exact"]["centroid_products_per_query"] == 0
    assert 0 < rows["1m"]["facts_per_query"] < 2000
    assert 0 <= rows["1m"]["recall10_vs_exact"] <= 1
    assert rows["1m"]["centroid_products_per_query"] == rows["1m"]["leaves"]  # a flat index
    md = (base.root / "eval/scaling.md").read_text()
    assert "| 1m | 2,000 |" in md and "| 1m-exact | 2,000 |" in md and "Not run: 29k" in md
    assert json.loads((base.root / "eval/scaling.json").read_text())["rows"]
    # a variant is a run pipeline.evaluate accepts
    dev = str(gen / "questions_dev.txt")
    assert evaluate_main(["--run-dir", str(clustered), "--questions", dev,
                          "--reader", "clustered"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["reader"] == "clustered" and out["questions"] == 100
