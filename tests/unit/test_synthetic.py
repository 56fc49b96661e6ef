"""Unit tests for hmn.synthetic (no Ray)."""

import dataclasses
import os
import re
from collections import Counter, defaultdict

import numpy as np
import pytest

from hmn.formats.grouped import parse_grouped_facts
from hmn.formats.lines import iter_line_chunks
from hmn.formats.names import parse_names
from hmn.formats.questions import parse_questions
from hmn.synthetic import FILE_NAMES, SyntheticSpec, generate

SMALL = SyntheticSpec(
    entities=600, relations=45, facts=1200, train_questions=500, dev_questions=150,
    test_questions=150, seed=3,
)  # fmt: skip


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    return generate(SMALL, str(out))


def _parse(path, parser):
    tables, rejects, lines = [], 0, 0
    for first, chunk in iter_line_chunks(path):
        parsed = parser(chunk, first, path)
        tables.append(parsed.table)
        rejects += parsed.rejects.num_rows
        lines += parsed.lines
    rows = [r for t in tables for r in t.to_pylist()]
    return rows, rejects, lines


def test_deterministic_bytes(tmp_path, small):
    again = generate(SMALL, str(tmp_path / "again"))
    for key, path in small["files"].items():
        with open(path, "rb") as a, open(again["files"][key], "rb") as b:
            assert a.read() == b.read(), key
    assert again["stats"] == small["stats"]
    other = generate(SyntheticSpec(**{**small["spec"], "seed": 4}), str(tmp_path / "other"))
    with open(small["files"]["kb"], "rb") as a, open(other["files"]["kb"], "rb") as b:
        assert a.read() != b.read()


def test_files_and_counts(small):
    assert set(small["files"]) == set(FILE_NAMES)
    out_dir = os.path.dirname(small["files"]["kb"])
    assert sorted(os.listdir(out_dir)) == sorted(FILE_NAMES.values())  # no temp files left
    stats = small["stats"]
    assert stats["facts"] == SMALL.facts and stats["relations"] == SMALL.relations
    assert stats["questions"] == {"train": 500, "dev": 150, "test": 150}
    for split, n in stats["questions"].items():
        with open(small["files"][f"questions_{split}"], "rb") as f:
            assert f.read().count(b"\n") == n
    assert stats["facts_without_question"] > 0


def test_parses_with_zero_rejects_and_is_consistent(small):
    files = small["files"]
    facts, rej, lines = _parse(files["kb"], parse_grouped_facts)
    assert rej == 0 and lines == SMALL.facts
    names, rej, _ = _parse(files["names"], parse_names)
    assert rej == 0

    # keys look like the real data
    with open(files["kb"], encoding="utf-8") as f:
        s, r, o = f.readline().rstrip("\n").split("\t")
    assert re.fullmatch(r"www\.freebase\.com/m/0[0-9a-z_]+", s)
    assert re.fullmatch(r"www\.freebase\.com/[a-z_]+/[a-z_]+/[a-z_0-9]+", r)

    pairs = [(f["subject"], f["relation"]) for f in facts]
    assert len(set(pairs)) == len(pairs)  # each (subject, relation) once
    objects = {(f["subject"], f["relation"]): f["objects"] for f in facts}
    n_obj = np.array([len(v) for v in objects.values()])
    assert 1.1 <= n_obj.mean() <= 1.3 and n_obj.max() <= SMALL.max_objects
    assert all(len(set(v)) == len(v) for v in objects.values())

    degree = Counter(s for s, _ in pairs)
    assert max(degree.values()) >= 4 * np.median(list(degree.values()))  # heavy-tailed

    name_of = {n["entity"]: n["name"] for n in names}
    assert len(name_of) == len(names)  # one name per entity
    shared = Counter(name_of.values())
    assert any(c > 1 for c in shared.values())  # some ambiguous names
    assert all(re.fullmatch(r"[A-Z][a-z]+( [A-Z][a-z]+){0,2}", n) for n in name_of.values())

    templates = defaultdict(set)
    train_pairs = set()
    for split in ("train", "dev", "test"):
        qs, rej, lines = _parse(files[f"questions_{split}"], parse_questions)
        assert rej == 0 and lines == SMALL.__getattribute__(f"{split}_questions")
        seen_train = 0
        for q in qs:
            pair = (q["subject"], q["relation"])
            assert pair in objects  # the question's fact is in kb.txt
            assert q["object"] in objects[pair]  # the answer is one of its objects
            assert q["subject"] in name_of  # subjects have names
            assert name_of[q["subject"]].lower() in q["question"].lower()
            prefix = q["question"].lower().split(name_of[q["subject"]].lower())[0]
            templates[q["relation"]].add(prefix)
            if split == "train":
                train_pairs.add(pair)
            else:
                seen_train += pair in train_pairs
        if split != "train":
            assert 0 < seen_train < len(qs)  # some eval facts have a train question, some not
    assert max(len(t) for t in templates.values()) >= 3  # several templates per relation


def test_spec_validation(tmp_path):
    with pytest.raises(ValueError, match="synthetic.entities"):
        generate(SyntheticSpec(entities=0), str(tmp_path))
    with pytest.raises(ValueError, match="synthetic.name_ambiguity"):
        generate(SyntheticSpec(name_ambiguity=1.0), str(tmp_path))
    with pytest.raises(ValueError, match="synthetic.facts"):
        generate(SyntheticSpec(entities=100, relations=2, facts=1000), str(tmp_path))


def test_high_ambiguity(tmp_path):
    spec = SyntheticSpec(entities=300, facts=400, train_questions=50, dev_questions=10,
                         test_questions=10, name_ambiguity=0.9)  # fmt: skip
    stats = generate(spec, str(tmp_path))["stats"]
    assert stats["entities_with_shared_name"] >= 0.85 * stats["named_entities"]


def test_small_chunks_same_bytes(tmp_path, small):
    spec = SyntheticSpec(**{**small["spec"], "chunk_rows": 37})
    again = generate(spec, str(tmp_path / "chunked"))
    for key, path in small["files"].items():
        with open(path, "rb") as a, open(again["files"][key], "rb") as b:
            assert a.read() == b.read(), key


def test_presets_are_the_run_configs_synthetic_sections():
    from hmn.config import SyntheticConfig, load_config
    from hmn.synthetic import preset, preset_names, scaled_fb2m

    assert preset_names() == ["fb2m", "fb2m-synthetic", "fb5m", "fb5m-synthetic", "smoke"]
    fb2m = preset("fb2m")
    assert fb2m == preset("fb2m-synthetic")
    assert fb2m == SyntheticSpec.from_config(load_config("configs/fb2m-synthetic.yaml").synthetic)
    assert (fb2m.entities, fb2m.relations, fb2m.facts) == (2_150_000, 6_700, 10_800_000)
    assert (preset("fb5m").entities, preset("fb5m").facts) == (4_900_000, 12_000_000)
    # the smoke preset is the embedded default, and the spec's defaults are the config's
    assert preset("smoke") == SyntheticSpec() == SyntheticSpec.from_config(SyntheticConfig())
    assert (SyntheticSpec().entities, SyntheticSpec().relations) == (3000, 40)
    with pytest.raises(ValueError, match="unknown synthetic preset 'sq32k'"):
        preset("sq32k")  # a run config without a synthetic section
    assert scaled_fb2m(10_800_000) == fb2m
    small = scaled_fb2m(20_000)
    assert small.facts == 20_000 and small.entities == round(2_150_000 * 20_000 / 10_800_000)
    for name in preset_names():
        preset(name).validate()


def test_spec_knobs_stay_out_of_the_config_and_questions_may_be_zero():
    from hmn.config import ConfigError, SyntheticConfig

    with pytest.raises(ValueError, match="synthetic.objects_decay"):
        SyntheticSpec(objects_decay=1.0).validate()
    with pytest.raises(ConfigError, match="synthetic.chunk_rows=0: must be > 0"):
        SyntheticSpec(chunk_rows=0).validate()
    with pytest.raises(ConfigError, match="synthetic.zipf_exponent=-1"):
        SyntheticSpec(zipf_exponent=-1).validate()
    SyntheticSpec(train_questions=0, dev_questions=0).validate()  # the generator alone
    with pytest.raises(ConfigError, match="synthetic.train_questions=0: must be > 0"):
        SyntheticConfig(train_questions=0).validate()  # the pipeline trains on them
    with pytest.raises(ConfigError, match="synthetic.test_questions=-1: must be >= 0"):
        SyntheticSpec(test_questions=-1).validate()
    assert {"name_coverage", "zipf_exponent", "chunk_rows"}.isdisjoint(
        f.name for f in dataclasses.fields(SyntheticConfig))


def test_cli_fb2m_like_statistics(tmp_path):
    """The CLI at a small scale keeps FB2M's ratios: ~0.2 entities per fact, ~1.3 objects per
    fact, heavy-tailed subject degrees; every file parses without rejects."""
    import json
    import subprocess
    import sys

    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "hmn.synthetic", "--facts", "20000", "--seed", "5", "--out",
         str(out)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    result = json.loads(proc.stdout)
    stats = result["stats"]
    assert stats["facts"] == 20_000 and result["spec"]["seed"] == 5
    assert 1.25 <= stats["objects_per_fact"] <= 1.35
    assert stats["max_subject_degree"] >= 10
    facts, rej, lines = _parse(result["files"]["kb"], parse_grouped_facts)
    assert rej == 0 and lines == 20_000
    assert max(len(f["objects"]) for f in facts) > 3  # a longer tail than the default
    for split in ("train", "dev", "test"):
        _, rej, _ = _parse(result["files"][f"questions_{split}"], parse_questions)
        assert rej == 0
