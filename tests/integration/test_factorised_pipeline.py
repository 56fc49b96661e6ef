"""The FB2M-scale path on tiny data: factorised memory layout, hierarchical index fitted on a
sample, clustered training, sampled evaluation, per-stage peak memory in the report (issue 7)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from hmn.config import load_config
from pipeline.artifacts import load_memory
from pipeline.driver import Pipeline
from pipeline.report import write_report
from pipeline.rundir import RunDir

ROOT = Path(__file__).resolve().parents[2]


def test_factorised_memory_runs_every_stage(ray_local, tmp_path):
    cfg = load_config(ROOT / "configs/smoke.yaml", [
        "synthetic.entities=800", "synthetic.relations=20", "synthetic.facts=600",
        "synthetic.train_questions=300", "synthetic.dev_questions=120", "synthetic.test_questions=80",
        "synthetic.max_objects=4", "synthetic.objects_decay=0.3",
        "embed.epochs=5", "embed.num_cpus=1",
        "memory.layout=factorised", "memory.branching=4,4", "memory.fit_sample=300", "memory.iters=4",
        "reader.top_clusters=3", "train.reader=clustered", "train.infer_reader=clustered",
        "train.artificial_per_epoch=100", "train.max_epochs=2", "train.batch_size=64",
        "train.num_workers=1", "eval.max_questions=50", "eval.splits=[dev]",
    ])
    run = RunDir(tmp_path / "fact")
    results = Pipeline(cfg, run).execute()
    assert not any(r.skipped for r in results.values())

    mem_dir = run.stage_dir("memory")
    assert not (mem_dir / "facts.npy").exists()
    stats = json.loads((mem_dir / "stats.json").read_text())
    assert stats["layout"] == "factorised" and stats["index"]["fit_sample"] == 300
    mem = load_memory(mem_dir)
    assert type(mem).__name__ == "FactorisedMemory" and mem.n == 600 and mem.d == 600

    train = json.loads((run.stage_dir("train") / "stats.json").read_text())
    # no fixed artificial questions: each epoch draws 100 afresh from the pool and trains on them
    assert train["artificial_questions"] == 0 and train["artificial_per_epoch"] == 100
    assert train["artificial_pool"] > 100
    assert [h["questions"] for h in train["history"]] == [train["train_questions"] + 100] * 2
    assert train["history"][-1]["train_facts_touched"] < 600

    report = json.loads((run.stage_dir("evaluate") / "report.json").read_text())
    dev = report["splits"]["dev"]
    assert dev["questions"] == 50 and dev["questions_in_split"] == 120
    assert dev["readers"]["clustered"]["facts_per_query"] < 600
    assert dev["readers"]["exact"]["facts_per_query"] == 600

    manifest = run.manifest()["stages"]
    for stage in ("ingest", "embed", "memory", "train", "evaluate"):
        assert manifest[stage]["peak_pss_gb"] > 0.05  # at least this process
    table = write_report(run, results)
    assert "peak memory" in table
    full = json.loads((run.root / "report.json").read_text())
    assert set(full["stage_peak_pss_gb"]) >= {"ingest", "memory", "train"}
    assert np.isfinite(list(full["stage_peak_pss_gb"].values())).all()
