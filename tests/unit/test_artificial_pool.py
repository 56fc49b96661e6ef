"""train.artificial_per_epoch: the facts of artificial_fixed_from keep their artificial question
in every epoch, the others form the pool each epoch draws from, and every batch mixes both."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hmn.config import ConfigError, TrainConfig
from hmn.formats.parsed import FormatError
from pipeline.stages.train import batch_split, facts_in_file, prepare_questions


class _KB:
    """Six entities, two relations, facts (s, r) for s in 0..5, r in 0..1: fact id 2 * s + r."""

    num_facts = 12
    entity_keys = np.array([f"/m/0{i}" for i in range(6)], dtype=object)
    entity_names = [f"name{i}" for i in range(6)]
    relation_keys = np.array(["/film/film/genre", "/people/person/place_of_birth"], dtype=object)
    fact_subject = np.repeat(np.arange(6), 2)
    fact_relation = np.tile(np.arange(2), 6)


def _questions(ingest: Path) -> None:
    (ingest / "questions").mkdir(parents=True)
    for split, facts in (("train", [0, 5]), ("dev", [3])):
        pq.write_table(pa.table({"question": [f"q{f}" for f in facts],
                                 "fact_id": pa.array(facts, pa.int64())}),
                       ingest / "questions" / f"{split}.parquet")


def _kb_file(path: Path, lines: list[str]) -> str:
    path.write_text("".join(f"{line}\n" for line in lines))
    return str(path)


def test_fixed_facts_every_epoch_and_the_rest_pooled(tmp_path: Path) -> None:
    _questions(tmp_path)
    core = _kb_file(tmp_path / "kb.txt", [
        "www.freebase.com/m/00\twww.freebase.com/film/film/genre\twww.freebase.com/m/01",  # fact 0
        "www.freebase.com/m/01\twww.freebase.com/film/film/genre\twww.freebase.com/m/02",  # fact 2
        "www.freebase.com/m/01\twww.freebase.com/people/person/place_of_birth\twww.freebase.com/m/02",
        "www.freebase.com/m/09\twww.freebase.com/film/film/genre\twww.freebase.com/m/02",  # not in kb
    ])
    train, _ = prepare_questions(_KB(), tmp_path, True, per_epoch=4, fixed_from=core)
    artificial = [f for f, a in zip(train["facts"].tolist(), train["artificial"]) if a]
    assert artificial == [2, 3]  # fact 0 has a natural question
    assert train["pool"].tolist() == [1, 4, 6, 7, 8, 9, 10, 11]  # neither natural nor fixed
    # every fact is exactly once a natural, fixed or pooled one
    assert sorted(train["facts"].tolist() + train["pool"].tolist()) == list(range(12))
    everything, _ = prepare_questions(_KB(), tmp_path, True)
    assert everything["pool"].size == 0 and len(everything["texts"]) == 12
    drawn, _ = prepare_questions(_KB(), tmp_path, True, per_epoch=4)
    assert drawn["artificial_count"] == 0 and drawn["pool"].size == 10


def test_a_bad_line_of_the_fixed_file_is_an_error_naming_it(tmp_path: Path) -> None:
    bad = _kb_file(tmp_path / "kb.txt", ["www.freebase.com/m/00\twww.freebase.com/film/film/genre"])
    with pytest.raises(FormatError, match=r"kb.txt:1: expected 3 tab-separated fields"):
        facts_in_file(bad, _KB())
    with pytest.raises(FileNotFoundError, match="artificial_fixed_from"):
        facts_in_file(str(tmp_path / "missing.txt"), _KB())


def test_batches_mix_fixed_and_drawn_questions_and_use_every_drawn_one() -> None:
    assert batch_split(128, 30_000, 0) == (128, 0)  # nothing drawn: the paper's batches
    for fixed_rows, drawn in ((30_176, 20_000), (1000, 9000), (50, 3), (10_000, 1)):
        fixed, pooled = batch_split(128, fixed_rows, drawn)
        steps = -(-fixed_rows // fixed)
        assert fixed >= 1 and steps * pooled >= drawn  # no drawn question left over
        assert steps * pooled - drawn < steps  # spread evenly: ceil(drawn / steps) a batch
        assert abs(fixed + pooled - 128) <= 2 or fixed_rows + drawn < 128  # the batch size, ±2


def test_per_epoch_settings_are_checked() -> None:
    with pytest.raises(ConfigError, match="artificial_fixed_from"):
        TrainConfig(artificial_fixed_from="kb.txt").validate()
    with pytest.raises(ConfigError, match="artificial_limit"):
        TrainConfig(artificial_per_epoch=10, artificial_limit=5).validate()
    with pytest.raises(ConfigError, match="artificial_per_epoch"):
        TrainConfig(artificial_per_epoch=-1).validate()
    TrainConfig(artificial_per_epoch=10, artificial_fixed_from="kb.txt").validate()
