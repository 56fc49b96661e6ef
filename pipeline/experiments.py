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

Scaling (``--config configs/sq-scaling.yaml --experiment scaling``): a variant per memory size of
data.source=scaling with the clustered reader (``29k``, ``131k``, ``1m``, ``3m``, ``10m``) and,
up to 1m facts, with exact K-MIPS (``<size>-exact``); per-size settings come from the rules
`transe_epochs`, `transe_partitions`, `memory_layout`, `top_clusters`, `question_limit` and
`artificial_rule` (`size_overrides`); beyond 29k the clustered reader scans compressed leaves
(``reader.scan=sq8``, the best 100 of a question re-scored exactly). Each size's variants
share its generate, ingest, embed
and memory stages; ``<run>/eval/scaling.md`` and ``scaling.json`` hold the report.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hmn.config import (
    READER_NAMES,
    SCALING_SIZES,
    ConfigError,
    RunConfig,
    config_from_dict,
    config_to_dict,
)
from hmn.transe_params import entity_row_floats
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


# ---------------------------------------------------------------------------------------------
# Scaling: one run per memory size, per-size settings from the rules below
# ---------------------------------------------------------------------------------------------

SQ32K_FACTS = 29_423  # kb.txt: the memory the base settings (configs/sq-scaling.yaml) worked on
SQ32K_DEV = 7_229  # questions_dev.txt, at every size
#: facts of the sizes that have no target count (the real facts alone), for the rules
REAL_FACTS = {"29k": SQ32K_FACTS, "131k": 131_000}
EXACT_MAX_FACTS = 1_000_000  # exact K-MIPS training runs up to this memory size
FLAT_MAX_FACTS = 200_000  # flat index up to here (131k), hierarchical [C1, C2] beyond
QUESTION_BUDGET = 1e10  # fact scores per validation or evaluation pass


def size_facts(size: str, facts: int = 0) -> int:
    """Facts in the memory of ``size``: ``scaling.facts`` when set, else the size's count."""
    return facts or SCALING_SIZES[size] or REAL_FACTS[size]


def transe_epochs(n: int, base_epochs: int) -> int:
    """TransE epochs at ``n`` facts: the number of triple updates of ``base_epochs`` epochs over
    SQ-32k's 29,423 facts (where they worked) kept constant, so TransE costs about the same at
    every size; at least 5 epochs, so every fact of a large memory is still seen several times;
    never more than ``base_epochs``."""
    return min(base_epochs, max(5, round(base_epochs * SQ32K_FACTS / n)))


def transe_partitions(n: int, row_floats: int) -> tuple[int, int] | None:
    """``(embed.num_partitions, embed.num_workers)`` when the entity table (at most ``n``
    entities of ``row_floats`` float32 each: rows plus optimiser state,
    `hmn.transe.entity_row_floats`) may be over 1 GB: partitions chosen by the embed stage from
    the real entity count (0: `hmn.transe.auto_partitions`, partitions of at most 1 GB) and two
    workers; None: the base's settings."""
    table_gb = n * row_floats * 4 / 1e9
    if table_gb <= 1.0:
        return None
    return 0, 2


READ_SHARE = 0.005  # at FB2M's 10.8m facts: facts read plus centroid products a question, at most
FB2M_FACTS = 10_800_000
#: beyond 200k facts, products (facts read plus centroid products) a question at every size: 90%
#: of READ_SHARE at FB2M size (10% slack for leaves larger than the mean: split ones, and the
#: large leaves that questions favour), so a step costs about the same from 200k to 10.8m facts
PRODUCT_BUDGET = int(0.9 * READ_SHARE * FB2M_FACTS)


def memory_layout(n: int) -> dict[str, Any]:
    """The index of ``n`` facts: flat up to 200k facts with ~15 facts per leaf (a power of two:
    SQ-32k's 2048); beyond, hierarchical [C1, C2] with the same leaves at every size, leaves
    split above 1000 facts, each level fitted on a sample of at most 1m facts. The clustered
    reader scores every centroid of every level, so a question costs ``C + r n / C`` products for
    C leaves of which it reads r: within a budget of T products it reads the most facts with half
    of T on each, C = T / 2 leaves whatever n (``PRODUCT_BUDGET``: 2^15 leaves, [256, 128], of
    30 facts at 1m and 330 at 10.8m)."""
    if n <= FLAT_MAX_FACTS:
        return {"memory.branching": [max(2, 2 ** round(math.log2(n / 15)))]}
    exp = round(math.log2(PRODUCT_BUDGET / 2))
    c1 = 2 ** math.ceil(exp / 2)
    return {"memory.branching": [c1, 2**exp // c1], "memory.max_leaf_size": 1000,
            "memory.fit_sample": min(n, 1_000_000)}


def top_clusters(n: int, branching: list[int]) -> int:
    """Leaves a question reads: up to 200k facts SQ-32k's 100 leaves of ~15 facts (about 1.5k
    facts a question at 29k and 131k alike, so a training step costs about the same); beyond,
    as many as keep the facts read plus the centroid products within ``PRODUCT_BUDGET`` (0.45%
    of the memory at 10.8m facts, more of a smaller one: the same work a question at every
    size), at least 1."""
    leaves = math.prod(branching)
    if n <= FLAT_MAX_FACTS:
        return min(100, leaves)
    facts = PRODUCT_BUDGET - centroid_products(list(branching), leaves)
    return max(1, min(leaves, math.floor(facts / (n / leaves))))


def question_limit(facts_scored: float, questions: int = SQ32K_DEV) -> int:
    """Questions of a validation or evaluation pass scoring ``facts_scored`` facts each: all
    (0) while the pass stays within 1e10 fact scores (all of dev, exact, up to 1m facts), else
    the budget's share, at least 500."""
    if facts_scored * questions <= QUESTION_BUDGET:
        return 0
    return max(500, int(QUESTION_BUDGET // facts_scored))


ARTIFICIAL_PER_EPOCH = 20_000  # about SQ-32k's own artificial questions (19,331)


def artificial_rule(n: int, data_dir: str) -> dict[str, Any]:
    """Artificial questions at ``n`` facts. Up to SQ-32k's memory, one for every fact without a
    natural question in every epoch (the paper's rule). Beyond it (changed): the benchmark's own
    facts (``<data_dir>/simplequestions/kb.txt``) keep theirs in every epoch, and the added facts'
    (FB15k-237's and the generated distractors') are drawn afresh each epoch, 20,000 of them, so
    an epoch is about 50k questions at every size (one question for every fact would make 0.1-10.8m
    questions an epoch, up to 84k steps of 128, and early stopping needs tens of epochs) while
    over the epochs the model still meets the added facts' names."""
    if n <= SQ32K_FACTS:
        return {}
    return {"train.artificial_per_epoch": ARTIFICIAL_PER_EPOCH,
            "train.artificial_fixed_from": os.path.join(data_dir, "simplequestions", "kb.txt")}


def size_overrides(cfg: RunConfig, size: str, exact: bool) -> dict[str, Any]:
    """The settings of one scaling variant: its size and the rules above at its fact count."""
    n = size_facts(size, cfg.scaling.facts)
    o: dict[str, Any] = {"scaling.size": size,
                         "embed.epochs": transe_epochs(n, cfg.embed.epochs)}
    parts = transe_partitions(n, entity_row_floats(cfg.embed))
    if parts:
        o["embed.num_partitions"], o["embed.num_workers"] = parts
    o.update(memory_layout(n))
    leaves = math.prod(o["memory.branching"])
    o["reader.top_clusters"] = top_clusters(n, o["memory.branching"])
    if n > SQ32K_FACTS:  # questions read different leaves: compressed scan, best 100 exact
        o["reader.scan"] = "sq8"
    read = n if exact else n * o["reader.top_clusters"] / leaves  # facts a dev question scores
    o["train.dev_limit"] = question_limit(read)
    o["eval.max_questions"] = question_limit(n)  # evaluation scores exact (recall@10) too
    o.update(artificial_rule(n, cfg.scaling.data_dir))
    o["train.max_steps_per_epoch"] = 0
    o.update(_reader("exact" if exact else "clustered"))
    return o


def scaling_variants(cfg: RunConfig) -> list[Variant]:
    """Every size with the clustered reader, and with exact K-MIPS up to 1m facts
    (``<size>-exact``)."""
    variants = []
    for size in SCALING_SIZES:
        variants.append(Variant(size, f"{size}, clustered", size_overrides(cfg, size, False)))
        if size_facts(size, cfg.scaling.facts) <= EXACT_MAX_FACTS:
            variants.append(Variant(f"{size}-exact", f"{size}, exact K-MIPS",
                                    size_overrides(cfg, size, True)))
    return variants


EXPERIMENTS = {"table1": table1, "table2": table2, "scaling": scaling_variants}


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
                   only: tuple[str, ...] = (), stages: tuple[str, ...] = ()) -> dict:
    """Run experiment ``name``: its variants ``only`` (all when empty); ``stages`` (the CLI's
    ``--stages``, scaling only) limits every variant's run to those stages."""
    if name not in EXPERIMENTS:
        raise ValueError(f"--experiment {name!r}: unknown; known: {', '.join(EXPERIMENTS)}")
    if name == "scaling":
        return run_scaling(base_cfg, base, force=force, only=only, stages=stages)
    if stages:
        raise ConfigError(f"--stages {','.join(stages)}: with --experiment only for 'scaling'; "
                          f"run a variant's directory with its config.resolved.yaml instead")
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


# ---------------------------------------------------------------------------------------------
# Scaling: running the variants and the report
# ---------------------------------------------------------------------------------------------

STAGE_COLUMNS = ("generate", "ingest", "embed", "memory", "train", "evaluate")


def run_scaling(base_cfg: RunConfig, base: RunDir, *, force: bool = False,
                only: tuple[str, ...] = (), stages: tuple[str, ...] = ()) -> dict:
    """Every scaling variant (or those in ``only``) as a run directory of its own,
    ``<run>/experiments/scaling/<variant>``. The clustered variant of a size owns its generate,
    ingest, embed and memory stages; its exact variant links them (`link_shared`). ``stages``
    (when given) are the only stages run, in every variant asked for. Writes
    ``<run>/eval/scaling.md`` and ``scaling.json``: a row per finished variant, the others
    listed as not run."""
    variants = scaling_variants(base_cfg)
    by_name = {v.name: v for v in variants}
    if only and set(only) - set(by_name):
        raise ValueError(f"--variants: unknown {sorted(set(only) - set(by_name))}; "
                         f"known: {list(by_name)}")
    root = base.root / "experiments" / "scaling"
    rows, not_run, prepared = [], [], set()
    for v in variants:
        cfg = variant_config(base_cfg, v)
        run = RunDir(root / v.name)
        if not only or v.name in only:
            owner = v.overrides["scaling.size"]  # the size's clustered variant
            if owner != v.name:
                owner_cfg = variant_config(base_cfg, by_name[owner])
                owner_run = RunDir(root / owner)
                shared = tuple(s for s in stages if s in SHARED_STAGES)
                if shared or not stages:
                    Pipeline(owner_cfg, owner_run, force=force and owner not in prepared,
                             only=shared).execute(until="memory")
                prepared.add(owner)
                link_shared(owner_run, run, owner_cfg, cfg)
            log.info("experiment scaling: variant %s (%s)", v.name, v.label)
            linked = ("train", "evaluate") if owner != v.name else ()  # the rest is the owner's
            mine = tuple(s for s in (linked or stages) if not stages or s in stages)
            if mine or not stages:
                Pipeline(cfg, run, force=force and v.name not in prepared, only=mine).execute()
            prepared.add(v.name)
        if _finished(run):
            rows.append(scaling_row(v, cfg, run))
        else:
            not_run.append(v.name)
    result = {"experiment": "scaling", "rows": rows, "not_run": not_run}
    write_scaling_report(result, base.root / "eval", base.root / "eval" / "plots")
    return result


def write_scaling_report(result: dict, out: Path, plot_dir: Path) -> None:
    """``out/scaling.json`` and ``scaling.md``; with rows, the validation, accuracy-vs-touched
    and accuracy-vs-size plots in ``plot_dir``."""
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "scaling.json", result)
    write_text_atomic(out / "scaling.md", scaling_markdown(result))
    if result["rows"]:
        plots(result["rows"], plot_dir, "scaling")
        size_plot(result["rows"], plot_dir / "scaling_accuracy_vs_size.png")


def merge_scaling(results: list[dict]) -> dict:
    """One scaling report from several (run directories of different runs): a variant's row
    from the last report that has it, rows ordered by memory size (clustered before exact),
    ``not_run`` the variants no report has a row of."""
    rows: dict[str, dict] = {}
    for result in results:
        if result.get("experiment") != "scaling":
            raise ValueError(f"not a scaling report: experiment {result.get('experiment')!r}")
        rows.update({r["variant"]: r for r in result["rows"]})
    not_run = []
    for result in results:
        not_run += [v for v in result["not_run"] if v not in rows and v not in not_run]
    ordered = sorted(rows.values(), key=lambda r: (r["facts"], r["variant"].endswith("-exact")))
    return {"experiment": "scaling", "rows": ordered, "not_run": not_run}


def size_plot(rows: list[dict], path: Path) -> None:
    """Dev accuracy against memory size: clustered-trained and exact-trained beside the
    ambiguity ceiling and (from the smallest clustered size) accuracy x ceiling, the share of
    the small memory's accuracy the ceiling leaves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, keep in (("clustered-trained", lambda r: not r["variant"].endswith("-exact")),
                        ("exact-trained", lambda r: r["variant"].endswith("-exact"))):
        pts = sorted((r["facts"], r["accuracy"]) for r in rows if keep(r))
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ceiling = sorted({(r["facts"], r["ambiguity_ceiling"]) for r in rows})
    ax.plot(*zip(*ceiling), ls="--", color="grey", label="ambiguity ceiling")
    clustered = sorted((r["facts"], r["accuracy"]) for r in rows if not r["variant"].endswith("-exact"))
    if clustered:
        first = clustered[0][1] / dict(ceiling)[clustered[0][0]]
        ax.plot([f for f, _ in ceiling], [first * c for _, c in ceiling], ls=":", color="black",
                label="smallest size's accuracy / its ceiling x ceiling")
    ax.set_xscale("log")
    ax.set_xlabel("facts in the memory (log)")
    ax.set_ylabel("dev accuracy")
    ax.set_ylim(0, 1)
    ax.set_title("scaling: dev accuracy against memory size")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def centroid_products(branching: list[int], leaves: int) -> int:
    """Centroid inner products per question of the clustered reader: it scores every centroid of
    every level (`hmn.readers.ClusteredReader._leaf_scores`); the last level holds ``leaves``
    (the index's leaves after splitting)."""
    return sum(math.prod(branching[: i + 1]) for i in range(len(branching) - 1)) + leaves


def scaling_row(v: Variant, cfg: RunConfig, run: RunDir) -> dict:
    """One report row of a finished variant: `_row`'s figures plus the size, the memory's facts,
    the ambiguity ceiling (``generate/realism.json``), centroid products per question and each
    stage's seconds and peak memory (the manifest)."""
    row = _row(v, cfg, run)
    realism = json.loads((run.stage_dir("generate") / "realism.json").read_text())
    memory = json.loads((run.stage_dir("memory") / "stats.json").read_text())
    stages = run.manifest()["stages"]
    clustered = cfg.train.infer_reader == "clustered"
    row.update({
        "size": cfg.scaling.size, "facts": realism["counts"]["facts"],
        "ambiguity_ceiling": realism["ambiguity_ceiling"]["share"],
        "best_epoch": row["epochs_to_converge"],
        "centroid_products_per_query": (centroid_products(list(cfg.memory.branching),
                                                          memory["leaves"]) if clustered else 0),
        "leaves": memory["leaves"],
        "questions_per_epoch": _train_stats(run).get("history", [{}])[-1].get("questions"),
        "stage_seconds": {s: stages[s].get("seconds") for s in STAGE_COLUMNS if s in stages},
        "stage_peak_pss_gb": {s: stages[s].get("peak_pss_gb") for s in STAGE_COLUMNS
                              if s in stages},
    })  # fmt: skip
    return row


def _train_stats(run: RunDir) -> dict:
    return json.loads((run.stage_dir("train") / "stats.json").read_text())


def _num(x: Any, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def scaling_markdown(result: dict) -> str:
    """The scaling report: dev accuracy against memory size beside the ambiguity ceiling, the
    cost of training and reading, then each stage's time and peak memory."""
    lines = ["# scaling: dev accuracy against memory size", "",
             "| variant | facts | ambiguity ceiling | dev accuracy | best epoch / epochs | "
             "questions / epoch | s / epoch | facts read / question | "
             "centroid products / question | recall@10 vs exact |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        share = 100 * r["facts_per_query"] / r["facts"]
        lines.append(
            f"| {r['variant']} | {r['facts']:,} | {r['ambiguity_ceiling']:.4f} | "
            f"{r['accuracy']:.4f} | {r['best_epoch']} / {r['epochs']} | "
            f"{_num(r.get('questions_per_epoch'), ',')} | {r['seconds_per_epoch']:.1f} | {r['facts_per_query']:,.0f} ({share:.2f}%) | "
            f"{r['centroid_products_per_query']:,} | {_num(r['recall10_vs_exact'], '.3f')} |")
    lines += ["", "Facts read per question count the facts the reader scored; the clustered "
              "reader also scores every centroid of every level (the centroid products column, "
              "from the index's shape). Questions per epoch: the natural training questions and "
              "the artificial ones of kb.txt's facts in every epoch, plus from 131k (changed: the "
              "paper adds one for every fact) 20,000 artificial questions of the added facts "
              "drawn afresh each epoch (`artificial_rule`).", "", "## time (s) and peak memory (GB, PSS) per stage",
              "", "| variant | " + " | ".join(STAGE_COLUMNS) + " |",
              "|---|" + "---|" * len(STAGE_COLUMNS)]
    for r in result["rows"]:
        cells = [f"{_num(r['stage_seconds'].get(s), '.1f')} s, "
                 f"{_num(r['stage_peak_pss_gb'].get(s), '.2f')} GB" if s in r["stage_seconds"]
                 else "" for s in STAGE_COLUMNS]  # fmt: skip
        lines.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
    lines += ["", "A variant's generate, ingest, embed and memory stages are its size's (the "
              "exact variant links the clustered one's)."]
    if result["not_run"]:
        lines += ["", "Not run: " + ", ".join(result["not_run"]) + "."]
    return "\n".join(lines) + "\n"
