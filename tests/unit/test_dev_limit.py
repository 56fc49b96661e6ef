"""train.dev_limit: the per-epoch validation reads a seeded sample of dev, in file order."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hmn.config import ConfigError, TrainConfig
from pipeline.stages.train import prepare_questions


class _KB:
    num_facts = 50
    fact_subject = np.arange(50) % 7
    fact_relation = np.arange(50) % 3
    entity_names = [f"entity {i}" for i in range(7)]
    relation_keys = ["people.person.place_of_birth", "film.film.genre", "music.album.artist"]


def _write(ingest: Path, split: str, n: int) -> None:
    (ingest / "questions").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"question": [f"{split} question {i}" for i in range(n)],
                             "fact_id": pa.array(np.arange(n) % 50, pa.int64())}),
                   ingest / "questions" / f"{split}.parquet")


def test_dev_limit_samples_dev_in_order(tmp_path: Path) -> None:
    _write(tmp_path, "train", 20)
    _write(tmp_path, "dev", 40)
    _, full = prepare_questions(_KB(), tmp_path, artificial=False)
    assert len(full["texts"]) == 40 and full["total"] == 40
    _, a = prepare_questions(_KB(), tmp_path, artificial=False, seed=3, dev_limit=10)
    _, b = prepare_questions(_KB(), tmp_path, artificial=False, seed=3, dev_limit=10)
    _, c = prepare_questions(_KB(), tmp_path, artificial=False, seed=4, dev_limit=10)
    assert a["total"] == 40 and len(a["texts"]) == 10 and len(a["facts"]) == 10
    assert a["texts"] == b["texts"]  # seeded
    assert a["texts"] != c["texts"]
    idx = [int(t.split()[-1]) for t in a["texts"]]
    assert idx == sorted(idx) and len(set(idx)) == 10  # file order, no repeats
    assert list(a["facts"]) == [i % 50 for i in idx]  # texts and gold facts stay paired
    _, big = prepare_questions(_KB(), tmp_path, artificial=False, dev_limit=1000)
    assert big["texts"] == full["texts"]


def test_dev_limit_must_not_be_negative() -> None:
    with pytest.raises(ConfigError, match="dev_limit"):
        TrainConfig(dev_limit=-1).validate()
