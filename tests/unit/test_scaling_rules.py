"""The scaling experiment's per-size rules and its report builder (no Ray)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from hmn.config import load_config
from pipeline.driver import stage_fingerprints
from pipeline.experiments import (
    PRODUCT_BUDGET,
    artificial_rule,
    centroid_products,
    memory_layout,
    merge_scaling,
    question_limit,
    scaling_markdown,
    scaling_row,
    scaling_variants,
    size_facts,
    top_clusters,
    transe_epochs,
    transe_partitions,
    variant_config,
)
from pipeline.rundir import RunDir, write_json_atomic

ROOT = Path(__file__).resolve().parents[2]
FACTS = {"29k": 29_423, "131k": 131_000, "1m": 1_000_000, "3m": 3_000_000, "10m": 10_800_000}


@pytest.fixture(scope="module")
def cfg():
    return load_config(ROOT / "configs/sq-scaling.yaml")


def test_size_facts_from_the_size_or_the_facts_setting():
    assert {s: size_facts(s) for s in FACTS} == FACTS
    assert size_facts("10m", 2000) == 2000


def test_transe_epochs_keep_the_triple_updates_with_a_floor():
    assert transe_epochs(29_423, 100) == 100  # SQ-32k: the base's epochs
    assert transe_epochs(131_000, 100) == 22
    assert abs(22 * 131_000 - 100 * 29_423) / (100 * 29_423) < 0.03  # the same updates
    assert [transe_epochs(FACTS[s], 100) for s in ("1m", "3m", "10m")] == [5, 5, 5]  # the floor
    assert transe_epochs(2000, 7) == 7  # never more than the base's


def test_transe_partitions_only_for_large_tables():
    from hmn.transe import auto_partitions

    adam, row_wise = 600, 201  # floats an entity: rows and Adam's moments / row-wise Adagrad
    assert transe_partitions(131_000, adam) is None
    for n in (1_000_000, 3_000_000, 10_800_000):
        assert transe_partitions(n, adam) == (0, 2)  # the stage picks them from its entities
    assert transe_partitions(1_000_000, row_wise) is None  # 0.8 GB at most
    assert transe_partitions(3_000_000, row_wise) == (0, 2)
    # the scaling memories' entity counts (benchmarks/out/scaling_memories.json)
    for floats, wants in ((adam, (4, 4, 16)), (row_wise, (4, 4, 4))):
        for entities, want in zip((420_425, 1_228_957, 4_380_415), wants):
            parts = auto_partitions(entities, floats, 2)
            assert parts == want and parts >= 2 * 2, (entities, floats)
            gb = entities * floats * 4 / 1e9
            assert gb / parts <= 1.0  # a partition with its optimiser state <= 1 GB
            assert parts == 4 or gb / (parts // 2) > 1.0  # and the fewest
    assert auto_partitions(3, adam, 2) == 3  # never more than the entities


def test_memory_layout_flat_then_the_same_hierarchical_leaves_at_every_size():
    assert memory_layout(29_423) == {"memory.branching": [2048]}  # SQ-32k's
    assert memory_layout(131_000) == {"memory.branching": [8192]}
    for n in (1_000_000, 3_000_000, 10_800_000):
        assert memory_layout(n) == {"memory.branching": [256, 128], "memory.max_leaf_size": 1000,
                                    "memory.fit_sample": 1_000_000}
    assert memory_layout(300_000)["memory.fit_sample"] == 300_000
    for size, n in FACTS.items():
        layout = memory_layout(n)
        per_leaf = n / math.prod(layout["memory.branching"])
        assert (len(layout["memory.branching"]) == 1) == (n <= 131_000), size
        if n <= 131_000:
            assert 14 <= per_leaf <= 16, (size, per_leaf)
        else:  # half the product budget on centroids (within the power of two)
            assert 0.5 <= math.prod(layout["memory.branching"]) / (PRODUCT_BUDGET / 2) <= 1.5


def test_a_question_costs_the_same_products_from_1m_and_half_a_percent_at_10m():
    assert top_clusters(29_423, [2048]) == top_clusters(131_000, [8192]) == 100  # SQ-32k's
    totals = {}
    for size in ("1m", "3m", "10m"):
        n = FACTS[size]
        branching = memory_layout(n)["memory.branching"]
        leaves = math.prod(branching)
        read = top_clusters(n, branching) * n / leaves  # facts a question reads, on average
        totals[size] = read + centroid_products(branching, leaves)
        assert 0.98 * PRODUCT_BUDGET <= totals[size] <= PRODUCT_BUDGET, size
    assert totals["10m"] <= 0.0045 * FACTS["10m"]  # 10% under the 0.5% at FB2M size
    assert top_clusters(10_800_000, [256, 128]) == 47
    assert top_clusters(1_000_000, [256, 128]) == 510  # 15.6k facts of 30 a leaf
    assert top_clusters(1_000, [4]) == 4 and top_clusters(250_000, [2, 2]) == 1  # at least one


def test_question_limit_keeps_a_pass_within_the_budget():
    assert question_limit(1_000_000) == 0  # all of dev, exact, at 1m
    assert question_limit(10_800_000) == 925
    assert question_limit(10_800_000) * 10_800_000 <= 1e10 < 7_229 * 10_800_000
    assert question_limit(1e12) == 500  # the floor


def test_artificial_questions_every_epoch_at_29k_drawn_afresh_beyond():
    assert artificial_rule(29_423, "d") == {}  # the paper's rule: one per fact, every epoch
    for n in (131_000, 1_000_000, 10_800_000):  # a fixed draw a epoch, kb.txt's facts always
        assert artificial_rule(n, "d") == {"train.artificial_per_epoch": 20_000,
                                           "train.artificial_fixed_from": "d/simplequestions/kb.txt"}


def test_variants_and_their_settings(cfg):
    variants = {v.name: v for v in scaling_variants(cfg)}
    assert list(variants) == ["29k", "29k-exact", "131k", "131k-exact", "1m", "1m-exact", "3m",
                              "10m"]
    fps = {}
    for name, v in variants.items():
        c = variant_config(cfg, v)  # validates
        exact = name.endswith("-exact")
        assert c.scaling.size == name.split("-")[0]
        reader = "exact" if exact else "clustered"
        assert (c.train.reader, c.train.infer_reader) == (reader, reader)
        assert c.train.max_epochs >= 50 and c.train.max_steps_per_epoch == 0
        assert c.train.patience == 3
        fps[name] = stage_fingerprints(c, files_token="FILES")
    for size in ("29k", "131k", "1m"):  # a size's exact variant shares its data, TransE, index
        for stage in ("generate", "ingest", "embed", "memory"):
            assert fps[size][stage] == fps[f"{size}-exact"][stage], (size, stage)
        assert fps[size]["train"] != fps[f"{size}-exact"]["train"]
    assert len({fps[s]["generate"] for s in FACTS}) == len(FACTS)
    for name in variants:  # compressed scans from 1m, where questions read 2k-16k facts
        assert variant_config(cfg, variants[name]).reader.scan == (
            "exact" if name.split("-")[0] == "29k" else "sq8"), name
    # TransE partitions where rows and row-wise Adagrad's state may pass 1 GB (the stage's auto
    # rule picks how many); 1m's 0.8 GB at most stays one partition
    three_m = variant_config(cfg, variants["3m"])
    assert (three_m.embed.num_partitions, three_m.embed.num_workers) == (0, 2)
    one_m = variant_config(cfg, variants["1m"])
    assert one_m.embed.num_workers == cfg.embed.num_workers
    assert variant_config(cfg, variants["29k"]).embed.num_workers == cfg.embed.num_workers


def test_centroid_products_count_every_level():
    assert centroid_products([2048], 2048) == 2048
    assert centroid_products([256, 128], 33_000) == 256 + 33_000  # leaves after splitting


def _fake_variant(root: Path) -> RunDir:
    """A finished variant's files, as the stages write them."""
    run = RunDir(root)
    for stage in ("generate", "memory", "train", "evaluate"):
        (root / stage).mkdir()
    write_json_atomic(root / "generate/realism.json",
                      {"counts": {"facts": 1_000_000}, "ambiguity_ceiling": {"share": 0.81}})
    write_json_atomic(root / "memory/stats.json", {"leaves": 33_000})
    hist = [{"dev_accuracy": a, "train_facts_touched": 10.0, "questions": 50_176}
            for a in (0.5, 0.6, 0.55)]
    write_json_atomic(root / "train/stats.json", {
        "history": hist, "best_epoch": 1, "epochs": 3, "mean_epoch_seconds": 40.0,
        "mean_softmax_size": 900.0})
    readers = {"exact": {"accuracy": 0.62, "facts_per_query": 1e6}}
    readers["clustered"] = {"accuracy": 0.6, "facts_per_query": 4800.0, "recall10_vs_exact": 0.7}
    write_json_atomic(root / "evaluate/report.json", {"splits": {"dev": {"readers": readers}}})
    stages = {s: {"status": "done", "seconds": 10.0 * i, "peak_pss_gb": 0.5 * i}
              for i, s in enumerate(("generate", "ingest", "embed", "memory", "train",
                                     "evaluate"), 1)}
    write_json_atomic(run.manifest_path, {"stages": stages})
    return run


def test_report_rows_from_a_variants_files(cfg, tmp_path):
    v = next(v for v in scaling_variants(cfg) if v.name == "1m")
    c = variant_config(cfg, v)
    row = scaling_row(v, c, _fake_variant(tmp_path / "1m"))
    assert (row["size"], row["facts"], row["ambiguity_ceiling"]) == ("1m", 1_000_000, 0.81)
    assert (row["accuracy"], row["best_epoch"], row["epochs"]) == (0.6, 2, 3)
    assert (row["facts_per_query"], row["recall10_vs_exact"]) == (4800.0, 0.7)
    assert row["centroid_products_per_query"] == 256 + 33_000  # [256, 128], 33,000 leaves after splits
    assert row["seconds_per_epoch"] == 40.0
    assert row["stage_seconds"]["memory"] == 40.0 and row["stage_peak_pss_gb"]["train"] == 2.5
    md = scaling_markdown({"rows": [row], "not_run": ["3m", "10m"]})
    assert ("| 1m | 1,000,000 | 0.8100 | 0.6000 | 2 / 3 | 50,176 | 40.0 | 4,800 (0.48%) | 33,256 | "
            "0.700 |") in md
    assert "| 1m | 10.0 s, 0.50 GB | 20.0 s, 1.00 GB | 30.0 s, 1.50 GB |" in md
    assert md.rstrip().endswith("Not run: 3m, 10m.")


def test_reports_of_several_runs_merge_by_variant_later_ones_winning(tmp_path):
    def row(variant, facts, acc):
        return {"variant": variant, "facts": facts, "accuracy": acc}

    old = {"experiment": "scaling", "rows": [row("131k", 130_872, 0.8), row("29k-exact", 29_423, 0.87),
                                            row("29k", 29_423, 0.85)],
           "not_run": ["1m", "1m-exact", "10m"]}
    new = {"experiment": "scaling", "rows": [row("1m", 1_000_000, 0.5), row("131k", 130_872, 0.81)],
           "not_run": ["29k", "29k-exact", "1m-exact", "10m"]}
    merged = merge_scaling([old, new])
    assert [r["variant"] for r in merged["rows"]] == ["29k", "29k-exact", "131k", "1m"]
    assert merged["rows"][2]["accuracy"] == 0.81  # the later report's row
    assert merged["not_run"] == ["1m-exact", "10m"]
    with pytest.raises(ValueError, match="not a scaling report"):
        merge_scaling([old, {"experiment": "table1", "rows": [], "not_run": []}])
