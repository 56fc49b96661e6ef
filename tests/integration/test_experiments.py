"""Table experiments: every variant is its own run directory sharing the base run's stages."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from hmn.config import load_config
from pipeline.experiments import run_experiment, table1, table2
from pipeline.rundir import RunDir

from .cli_runs import TINY, copy_upstream

ROOT = Path(__file__).resolve().parents[2]


def test_variant_lists_follow_the_paper():
    cfg = load_config()
    names = [v.name for v in table1(cfg, 29423)]
    assert names[:6] == ["full", "exact-k10", "exact-k50", "exact-k100", "exact-k1000", "clustered"]
    sq = load_config(ROOT / "configs/sq32k.yaml")
    pca = next(v for v in table1(sq, 29423) if v.name == "pca-tree")
    assert pca.overrides["reader.pca_probes"] == 12  # 100 of 2048 leaves -> 12 of 256 PCA-tree leaves
    wta = next(v for v in table1(sq, 29423) if v.name == "wta-hash")
    # 1 - (1 - 0.004)^12 = 4.7%, the clustered reader's 4.9%
    assert (wta.overrides["reader.wta_bands"], wta.overrides["reader.wta_window"]) == (12, 4)
    t2 = table2(cfg, 29423)
    assert {v.overrides["memory.branching"][0] for v in t2} == {294, 588}  # ~100 and ~50 facts per cluster
    assert all(v.overrides["train.reader"] == "clustered" for v in t2)


# (preset, facts in memory) -> per cluster count: budget (round(clusters * top_clusters / leaves)
# of the base config), and each variant's (Top-K, Sample-K, Rand-block), worked out by hand
TABLE2_SPLITS = {
    ("sq32k.yaml", 29423): {  # 100 of 2048 leaves: 4.88% of 294 clusters = 14, of 588 = 29
        294: (14, {"top-k": (14, 0, 0), "top-k+sample-k": (7, 7, 0),
                   "top-k+rand-block": (7, 0, 7), "top-k+sample-k+rand-block": (7, 3, 4)}),
        588: (29, {"top-k": (29, 0, 0), "top-k+sample-k": (14, 15, 0),
                   "top-k+rand-block": (14, 0, 15), "top-k+sample-k+rand-block": (14, 7, 8)}),
    },
    ("smoke.yaml", 4000): {  # 4 of 32 leaves: 12.5% of 40 clusters = 5, of 80 = 10
        40: (5, {"top-k": (5, 0, 0), "top-k+sample-k": (2, 3, 0),
                 "top-k+rand-block": (2, 0, 3), "top-k+sample-k+rand-block": (2, 1, 2)}),
        80: (10, {"top-k": (10, 0, 0), "top-k+sample-k": (5, 5, 0),
                  "top-k+rand-block": (5, 0, 5), "top-k+sample-k+rand-block": (5, 2, 3)}),
    },
}  # fmt: skip


@pytest.mark.parametrize("preset, num_facts", sorted(TABLE2_SPLITS))
def test_table2_splits_the_clustered_readers_budget(preset, num_facts):
    """Every Table 2 variant reads the base clustered reader's share of its leaves: Top-K +
    Sample-K + Rand-block = the budget, half (rounded down) Top-K where reducers are used."""
    cfg = load_config(ROOT / "configs" / preset)
    want = TABLE2_SPLITS[(preset, num_facts)]
    got: dict[int, dict[str, tuple[int, int, int]]] = {}
    for v in table2(cfg, num_facts):
        o = v.overrides
        (clusters,) = o["memory.branching"]
        split = (o["reader.top_clusters"], o["reader.sample_clusters"], o["reader.rand_blocks"])
        got.setdefault(clusters, {})[v.name.rsplit("-c", 1)[0]] = split
        assert v.name.endswith(f"-c{clusters}") and o["train.reader"] == "clustered"
    assert got == {c: splits for c, (_, splits) in want.items()}
    share = cfg.reader.top_clusters / math.prod(cfg.memory.branching)
    for clusters, (budget, splits) in want.items():
        assert budget == round(clusters * share)  # the stated budget: the base reader's share
        for name, (top, sample, rand) in splits.items():
            assert top + sample + rand == budget, name
            if name != "top-k":
                assert top == budget // 2, name  # half Top-K, the rest to the reducers
                assert ("sample-k" in name) == (sample > 0) and ("rand-block" in name) == (rand > 0)


def _base_run(smoke_run, path: Path) -> RunDir:
    """A base run directory holding a copy of the session's smoke run's stages before training
    (``TINY``'s, the base configs' below): the experiment skips them and runs its variants."""
    copy_upstream(smoke_run[1].root, path)
    return RunDir(path)


def test_table1_subset_end_to_end(smoke_run, tmp_path, capsys):
    from pipeline.evaluate import main as evaluate_main

    cfg = load_config(ROOT / "configs/smoke.yaml", TINY + ["train.num_workers=0", "train.max_epochs=2"])
    base = _base_run(smoke_run, tmp_path / "exp")
    result = run_experiment("table1", cfg, base, only=("full", "exact-k10", "clustered"))
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"full", "exact-k10", "clustered"}
    assert rows["full"]["avg_softmax_size"] == 600
    assert rows["exact-k10"]["avg_softmax_size"] < 600
    assert rows["clustered"]["facts_per_query"] < 600
    assert rows["full"]["speedup_per_epoch_vs_full"] == pytest.approx(1.0)
    md = (base.root / "eval" / "table1.md").read_text()
    assert "Full softmax" in md and "Exact K-MIPS (K=10)" in md
    assert json.loads((base.root / "eval" / "table1.json").read_text())["rows"]
    assert (base.root / "eval" / "plots" / "table1_validation.png").stat().st_size > 1000
    assert (base.root / "eval" / "plots" / "table1_accuracy_vs_touched.png").stat().st_size > 1000
    # the variants share the base run's memory (a link), and each is a run pipeline.evaluate accepts
    variant = base.root / "experiments" / "table1" / "clustered"
    assert (variant / "memory").is_symlink()
    dev = base.stage_dir("generate") / "questions_dev.txt"
    assert evaluate_main(["--run-dir", str(variant), "--questions", str(dev), "--reader", "clustered"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["reader"] == "clustered" and out["questions"] == 150
    # a later run of one variant keeps the rows of the variants finished before in the table
    again = run_experiment("table1", cfg, base, only=("exact-k10",))
    assert [r["variant"] for r in again["rows"]] == ["full", "exact-k10", "clustered"]
    assert again["rows"][1]["accuracy"] == rows["exact-k10"]["accuracy"]
    assert "Full softmax" in (base.root / "eval" / "table1.md").read_text()


def test_table2_variant_builds_its_own_index(smoke_run, tmp_path):
    cfg = load_config(ROOT / "configs/smoke.yaml", TINY + ["train.num_workers=0", "train.max_epochs=1"])
    base = _base_run(smoke_run, tmp_path / "exp2")
    name = "top-k+sample-k-c12"  # ~50 facts per cluster on 600 facts
    assert name in {v.name for v in table2(cfg, 600)}
    result = run_experiment("table2", cfg, base, only=(name,))
    row = result["rows"][0]
    variant = base.root / "experiments" / "table2" / name
    assert not (variant / "memory").is_symlink() and (variant / "ingest").is_symlink()
    index = json.loads((variant / "memory" / "stats.json").read_text())
    assert index["leaves"] == row["branching"][0] == 12  # ~50 facts per cluster on 600 facts
    assert row["facts_per_query"] < 600
    assert (base.root / "eval" / "table2.md").read_text().count("Top-K + Sample-K") == 1
