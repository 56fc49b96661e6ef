"""Stage fingerprints of every preset and experiment variant are frozen.

A finished stage is skipped when its fingerprint is unchanged, so a refactoring that changes how a
config section hashes (a renamed, moved or removed field, a new default) silently redoes every
user's finished stages. ``tests/data/fingerprints.json`` holds the fingerprints the code produced
for ``configs/*.yaml``, the defaults and every Table 1 / Table 2 variant; a change that must alter
them (a real behaviour change) regenerates the file on purpose.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hmn.config import fingerprint, load_config

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = json.loads((ROOT / "tests" / "data" / "fingerprints.json").read_text())
SECTIONS = ("data", "synthetic", "ingest", "embed", "memory", "reader", "train", "eval")


def _stage_fingerprints(cfg) -> dict[str, str]:
    """The chain `pipeline.run` builds, with file inputs replaced by a fixed token."""
    upstream = fingerprint("generate", cfg.synthetic) if cfg.data.source == "synthetic" else "FILES"
    fp_ingest = fingerprint("ingest", cfg.ingest, cfg.data, upstream)
    fp_embed = fingerprint("embed", cfg.embed, fp_ingest, [])
    fp_memory = fingerprint("memory", cfg.memory, fp_embed)
    fp_train = fingerprint("train", cfg.train, cfg.reader, fp_memory, fp_ingest)
    fp_eval = fingerprint("evaluate", cfg.eval, cfg.reader, fp_train)
    return {"generate": upstream, "ingest": fp_ingest, "embed": fp_embed, "memory": fp_memory,
            "train": fp_train, "evaluate": fp_eval}


@pytest.mark.parametrize("preset", sorted(GOLDEN["presets"]))
def test_preset_fingerprints_unchanged(preset):
    cfg = load_config(None if preset == "<defaults>" else ROOT / "configs" / preset)
    want = GOLDEN["presets"][preset]
    assert {s: fingerprint(getattr(cfg, s)) for s in SECTIONS} == want["sections"]
    assert _stage_fingerprints(cfg) == want["stages"]


def test_experiment_variant_fingerprints_unchanged():
    from pipeline.experiments import table1, table2, variant_config

    got = {}
    for preset, num_facts in (("sq32k.yaml", 29423), ("smoke.yaml", 4000)):
        base = load_config(ROOT / "configs" / preset)
        for table, variants in (("table1", table1), ("table2", table2)):
            for v in variants(base, num_facts):
                cfg = variant_config(base, v)
                got[f"{preset}:{table}:{v.name}"] = [fingerprint(cfg.memory), fingerprint(cfg.reader),
                                                     fingerprint(cfg.train), fingerprint(cfg.eval)]
    assert got == GOLDEN["variants"]
