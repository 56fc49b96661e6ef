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
from pipeline.driver import STAGES, data_files, stage_fingerprints

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = json.loads((ROOT / "tests" / "data" / "fingerprints.json").read_text())
SECTIONS = ("data", "synthetic", "ingest", "embed", "memory", "reader", "train", "eval")


def _stage_fingerprints(cfg) -> dict[str, str]:
    """The chain the driver builds (`pipeline.driver.STAGE_TABLE`), with the data files of a
    data.source=files preset replaced by a fixed token."""
    return stage_fingerprints(cfg, files_token="FILES")


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


def test_the_table_covers_every_stage_and_files_presets_hash_their_files():
    assert STAGES == ("generate", "ingest", "embed", "memory", "train", "evaluate")
    cfg = load_config(ROOT / "configs" / "sq32k.yaml")
    assert cfg.data.source == "files"
    seen = []

    def signature(paths):
        seen.append(tuple(paths))
        return [[p, len(seen)] for p in paths]

    fps = stage_fingerprints(cfg, signature)
    # the data files' signature stands in the generate slot and feeds ingest; the embed stage
    # hashes the signature of its (here absent) embedding files
    assert seen == [data_files(cfg), ()]
    assert fps["generate"] == fingerprint("files", [[p, 1] for p in data_files(cfg)])
    # the token takes the place of the files' fingerprint, and every later stage follows it
    assert stage_fingerprints(cfg, files_token=fps["generate"]) == fps
    frozen = GOLDEN["presets"]["sq32k.yaml"]["stages"]
    assert all(fps[s] != frozen[s] for s in STAGES)
