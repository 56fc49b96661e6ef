"""Experiments: train every variant of the paper's Tables 1 and 2 and report them side by side.

``python -m pipeline.run --config configs/sq32k.yaml --experiment table1`` (or ``table2``):

- the base run directory gets the shared stages (generate, ingest, embed, memory);
- each variant is a run directory of its own, ``<run>/experiments/<table>/<variant>``, whose
  upstream stages are links to the base run's (the memory too, unless the variant changes the
  index) and whose train and evaluate stages are its own, so ``pipeline.evaluate`` accepts any
  variant and the usual skip/resume rules apply per variant;
- ``<run>/eval/<table>.md`` and ``<table>.json`` hold the table in the paper's layout (accuracy,
  average softmax size, epochs to converge, time per epoch) and ``<run>/eval/plots/`` the
  validation curves (the paper's Figure 1) and accuracy against facts touched per query.

Table 1: full softmax, exact K-MIPS (K = 10, 50, 100, 1000), clustering, PCA-Tree, WTA-Hash.
Table 2: Top-K / Sample-K / Rand-block combinations of the clustered reader at two cluster counts
(the paper used about 100 and 50 facts per cluster).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hmn.config import READER_NAMES, RunConfig, config_from_dict, config_to_dict
from pipeline.driver import Pipeline
from pipeline.rundir import RunDir, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)

SHARED_STAGES = ("generate", "ingest", "embed", "memory")


@dataclass(frozen=True)
class Variant:
    name: str
    label: str
    overrides: dict[str, Any]


def _reader(name: str, k: int | None = None, **reader: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"train.loss": "ksoftmax", "train.reader": name, "train.infer_reader": name}
    if k is not None:
        out["reader.k"] = k
    out.update({f"reader.{key}": v for key, v in reader.items()})
    return out


def _clustered_share(cfg: RunConfig) -> float:
    """Share of its leaves the base config's clustered reader reads (top_clusters / leaves)."""
    return min(1.0, cfg.reader.top_clusters / math.prod(cfg.memory.branching))


def table1(cfg: RunConfig, num_facts: int) -> list[Variant]:
    variants = [Variant("full", "Full softmax", {"train.loss": "full", "train.infer_reader": "exact"})]
    for k in (10, 50, 100, 1000):
        if k < num_facts:
            variants.append(Variant(f"exact-k{k}", f"Exact K-MIPS (K={k})", _reader("exact", k)))
    variants.append(Variant("clustered", "Approximate K-MIPS: clustering", _reader("clustered", 10)))
    # PCA-Tree reads as many of its 2^depth leaves as the clustered reader's share of its leaves,
    # so the two approximations read about the same part of the memory (one leaf alone is 0.4%
    # at depth 8; the clustered reader reads ~5% on SQ-32k)
    share = _clustered_share(cfg)
    pca_leaves = 2 ** cfg.reader.pca_depth
    # WTA-Hash reads about the same share too: with window 4 and 4 permutations a band collides
    # with a given fact with probability p ~ 0.004 (measured on SQ-32k with a trained encoder:
    # 16 / 32 / 64 bands read 6.2 / 11.9 / 22.8% = 1 - (1 - p)^bands), so the band count that
    # reads `share` is log(1 - share) / log(1 - p) (12 for SQ-32k's 4.9%; the defaults, 16 bands
    # of window 8, read 0.5%)
    wta_p = 0.004
    wta_bands = max(1, round(math.log1p(-min(share, 0.99)) / math.log1p(-wta_p)))
    extra = {"pca-tree": {"pca_probes": max(1, min(pca_leaves, round(pca_leaves * share)))},
             "wta-hash": {"wta_bands": wta_bands, "wta_perms": 4, "wta_window": 4}}
    for name, label in (("pca-tree", "Approximate K-MIPS: PCA-Tree"), ("wta-hash", "Approximate K-MIPS: WTA-Hash")):
        if name in READER_NAMES:
            variants.append(Variant(name, label, _reader(name, 10, **extra.get(name, {}))))
        else:
            log.warning("table1: reader %r is not in the registry; its row is left out", name)
    return variants


def table2(cfg: RunConfig, num_facts: int) -> list[Variant]:
    """Bias reducers at two cluster counts (about 100 and 50 facts per cluster).

    Every variant reads the same share of the memory as the base config's clustered reader
    (reader.top_clusters out of its leaves), split between the reducers.
    """
    variants = []
    share = _clustered_share(cfg)
    for per_cluster in (100, 50):
        c = max(2, round(num_facts / per_cluster))
        budget = max(2, round(c * share))
        mem = {"memory.branching": [c]}
        half = max(1, budget // 2)
        combos = [
            ("top-k", "Top-K", dict(top_clusters=budget, sample_clusters=0, rand_blocks=0)),
            ("top-k+sample-k", "Top-K + Sample-K", dict(top_clusters=half, sample_clusters=budget - half, rand_blocks=0)),
            ("top-k+rand-block", "Top-K + Rand-block", dict(top_clusters=half, sample_clusters=0, rand_blocks=budget - half)),
            ("top-k+sample-k+rand-block", "Top-K + Sample-K + Rand-block",
             dict(top_clusters=half, sample_clusters=max(1, (budget - half) // 2) if budget - half > 1 else 1,
                  rand_blocks=max(1, (budget - half) - max(1, (budget - half) // 2)))),
        ]
        for name, label, reader in combos:
            o = _reader("clustered", 10, **reader)
            o.update(mem)
            variants.append(Variant(f"{name}-c{c}", f"{label} ({c} clusters)", o))
    return variants


EXPERIMENTS = {"table1": table1, "table2": table2}


def variant_config(base: RunConfig, variant: Variant) -> RunConfig:
    tree = config_to_dict(base)
    for dotted, value in variant.overrides.items():
        node = tree
        *path, last = dotted.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    tree["name"] = f"{base.name}-{variant.name}"
    readers = ["exact"] if variant.overrides.get("train.infer_reader", "exact") == "exact" else [
        variant.overrides["train.infer_reader"], "exact"]
    tree["eval"]["readers"] = readers
    tree["eval"]["splits"] = ["dev"]
    return config_from_dict(tree)


def link_shared(base: RunDir, target: RunDir, base_cfg: RunConfig, cfg: RunConfig) -> None:
    """Link the base run's shared stages into a variant run directory (with their manifest entries)."""
    shared = list(SHARED_STAGES)
    if cfg.memory != base_cfg.memory:
        shared.remove("memory")
    manifest = target.manifest()
    for stage in shared:
        src = base.stage_dir(stage)
        entry = base.entry(stage)
        if not src.is_dir() or not entry:
            continue
        dst = target.stage_dir(stage)
        if dst.is_symlink() or not dst.exists():
            if dst.is_symlink():
                dst.unlink()
            os.symlink(os.path.relpath(src, dst.parent), dst)
            manifest["stages"][stage] = entry
    write_json_atomic(target.manifest_path, manifest)


def run_experiment(name: str, base_cfg: RunConfig, base: RunDir, *, force: bool = False,
                   only: tuple[str, ...] = ()) -> dict:
    if name not in EXPERIMENTS:
        raise ValueError(f"--experiment {name!r}: unknown; known: {', '.join(EXPERIMENTS)}")
    Pipeline(base_cfg, base, force=force).execute(until="memory")
    facts = json.loads((base.stage_dir("ingest") / "stats.json").read_text())["totals"]["facts"]
    variants = EXPERIMENTS[name](base_cfg, facts)
    if only:
        unknown = set(only) - {v.name for v in variants}
        if unknown:
            raise ValueError(f"--variants: unknown {sorted(unknown)}; known: {[v.name for v in variants]}")
    rows = []
    for v in variants:
        cfg = variant_config(base_cfg, v)
        run = RunDir(base.root / "experiments" / name / v.name)
        if only and v.name not in only:
            # not asked for: its row comes from an earlier run of this variant, if one finished
            if _finished(run):
                rows.append(_row(v, cfg, run))
            continue
        link_shared(base, run, base_cfg, cfg)
        log.info("experiment %s: variant %s (%s)", name, v.name, v.label)
        Pipeline(cfg, run, force=force).execute()
        rows.append(_row(v, cfg, run))
    out = base.root / "eval"
    out.mkdir(exist_ok=True)
    full = next((r for r in rows if r["variant"] == "full"), None)
    for r in rows:
        r["speedup_per_epoch_vs_full"] = (full["seconds_per_epoch"] / r["seconds_per_epoch"]
                                          if full and r["seconds_per_epoch"] else None)
    result = {"experiment": name, "memory_facts": facts, "rows": rows, "paper": PAPER.get(name, {})}
    write_json_atomic(out / f"{name}.json", result)
    write_text_atomic(out / f"{name}.md", markdown(result))
    plots(rows, out / "plots", name)
    return result


# The paper's figures (Chandar et al. 2016, SimpleQuestions, 108,442 facts) for the report.
PAPER = {
    "table1": {"full": 59.5, "exact-k10": 62.2, "clustered": 51.5, "pca-tree": 32.4, "wta-hash": 40.2},
    "table2": {"top-k+sample-k": 53.1},
}


def _finished(run: RunDir) -> bool:
    """The variant's train and evaluate stages are done (its row can be reported)."""
    if not run.manifest_path.exists():
        return False
    return all((run.entry(s) or {}).get("status") == "done" for s in ("train", "evaluate"))


def _row(v: Variant, cfg: RunConfig, run: RunDir) -> dict:
    train = json.loads((run.stage_dir("train") / "stats.json").read_text())
    report = json.loads((run.stage_dir("evaluate") / "report.json").read_text())
    dev = report["splits"]["dev"]["readers"]
    infer = cfg.train.infer_reader
    hist = train["history"]
    return {
        "variant": v.name, "label": v.label, "train_reader": cfg.train.reader if cfg.train.loss == "ksoftmax" else "full",
        "infer_reader": infer, "k": cfg.reader.k, "branching": list(cfg.memory.branching),
        "accuracy": dev[infer]["accuracy"], "exact_inference_accuracy": dev["exact"]["accuracy"],
        "facts_per_query": dev[infer]["facts_per_query"],
        "recall10_vs_exact": dev[infer].get("recall10_vs_exact"),
        "avg_softmax_size": train["mean_softmax_size"],
        "train_facts_touched": sum(h["train_facts_touched"] for h in hist) / max(len(hist), 1),
        "epochs_to_converge": train["best_epoch"] + 1, "epochs": train["epochs"],
        "seconds_per_epoch": train["mean_epoch_seconds"],
        "curve": [h["dev_accuracy"] for h in hist], "run_dir": str(run.root),
    }


def markdown(result: dict) -> str:
    n = result["memory_facts"]
    lines = [f"# {result['experiment']}: {n} facts in memory (dev accuracy)", "",
             "| model | accuracy | paper | avg softmax size | facts scored / question (inference) | "
             "epochs to converge | s / epoch | speedup / epoch vs full |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        paper = result["paper"].get(r["variant"].split("-c")[0] if result["experiment"] == "table2" else r["variant"])
        sp = r.get("speedup_per_epoch_vs_full")
        lines.append(
            f"| {r['label']} | {r['accuracy']:.4f} | {'' if paper is None else f'{paper / 100:.3f}'} | "
            f"{r['avg_softmax_size']:.0f} | {r['facts_per_query']:.0f} ({100 * r['facts_per_query'] / n:.1f}%) | "
            f"{r['epochs_to_converge']} of {r['epochs']} | {r['seconds_per_epoch']:.1f} | "
            f"{'' if sp is None else f'{sp:.1f}x'} |")
    lines += ["", "Paper figures are test accuracy on the full SimpleQuestions memory (108,442 facts); "
              "ours are dev accuracy on this run's memory, model selected on dev."]
    return "\n".join(lines) + "\n"


def plots(rows: list[dict], out: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.plot(range(1, len(r["curve"]) + 1), r["curve"], marker="o", ms=3, label=r["label"])
    ax.set_xlabel("epoch")
    ax.set_ylabel("dev accuracy")
    ax.set_title(f"{name}: validation curves")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / f"{name}_validation.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.scatter(r["facts_per_query"], r["accuracy"], s=30)
        ax.annotate(r["variant"], (r["facts_per_query"], r["accuracy"]), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("facts scored per question at inference (log)")
    ax.set_ylabel("dev accuracy")
    ax.set_title(f"{name}: accuracy against facts touched")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / f"{name}_accuracy_vs_touched.png", dpi=120)
    plt.close(fig)
