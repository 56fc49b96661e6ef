"""The embed stage with user-supplied embeddings (no Ray needed on this path)."""

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hmn.config import EmbedConfig
from pipeline.artifacts import read_vectors
from pipeline.stages.embed import run_embed


def _kb(tmp_path):
    kb = tmp_path / "ingest" / "kb"
    kb.mkdir(parents=True)
    pq.write_table(pa.table({"entity_id": pa.array([0, 1, 2], pa.int64()), "key": ["/m/a", "/m/b", "/m/c"],
                             "name": ["a", None, "c"]}), kb / "entities.parquet")
    pq.write_table(pa.table({"relation_id": pa.array([0], pa.int64()), "key": ["/r/x"]}), kb / "relations.parquet")
    pq.write_table(pa.table({"fact_id": pa.array([0], pa.int64()), "subject_id": pa.array([0], pa.int64()),
                             "relation_id": pa.array([0], pa.int64()),
                             "object_ids": pa.array([[1, 2]], pa.list_(pa.int64()))}), kb / "facts.parquet")
    return tmp_path / "ingest"


def _write(path, rows):
    path.write_text("".join(f"{k}\t{' '.join(map(str, v))}\n" for k, v in rows))
    return str(path)


def test_text_embeddings_are_aligned_and_missing_keys_follow_the_policy(tmp_path):
    ingest = _kb(tmp_path)
    ent = _write(tmp_path / "e.txt", [("www.freebase.com/m/b", [1, 2]), ("m.a", [3, 4])])  # /m/c missing
    rel = _write(tmp_path / "r.txt", [("/r/x", [5, 6])])
    cfg = EmbedConfig(entities_file=ent, relations_file=rel, dim=2)
    with pytest.raises(ValueError, match=r"1 of 3 entity keys .*/m/c"):
        run_embed(cfg, ingest, _out(tmp_path, "o1"), tmp_path / "ck")
    out = _out(tmp_path, "o2")
    stats = run_embed(dataclasses.replace(cfg, missing="init"), ingest, out, tmp_path / "ck")
    assert stats["missing_entities"] == 1 and stats["missing_relations"] == 0
    vectors = read_vectors(out / "entities.parquet")
    assert vectors[0].tolist() == [3, 4] and vectors[1].tolist() == [1, 2]  # KB id order, keys normalised
    assert np.isfinite(vectors[2]).all()
    assert json.dumps(stats)  # JSON-able for stats.json


def test_non_numeric_embedding_names_file_and_line(tmp_path):
    ingest = _kb(tmp_path)
    ent = _write(tmp_path / "e.txt", [("/m/a", [1, 2]), ("/m/b", ["x", 2]), ("/m/c", [1, 1])])
    rel = _write(tmp_path / "r.txt", [("/r/x", [5, 6])])
    with pytest.raises(ValueError, match=r"e\.txt:2: non-numeric value .x."):
        run_embed(EmbedConfig(entities_file=ent, relations_file=rel, dim=2), ingest, _out(tmp_path, "o"),
                  tmp_path / "ck")


def _out(tmp_path, name):
    p = tmp_path / name
    p.mkdir()
    return p


@pytest.mark.parametrize("override,message", [
    (["embed.shared_negatives=8", "embed.num_negatives=4"],
     r"embed\.num_negatives=4: must be 1 when embed\.shared_negatives=8 > 0"),
    (["embed.margin=.inf"], r"embed\.margin=inf: must be a finite number > 0"),
    (["embed.seed=-1"], r"embed\.seed=-1: must be >= 0"),
    (["embed.num_partitions=-1"], r"embed\.num_partitions=-1: must be >= 0"),
])
def test_embed_section_checks_the_transe_settings_by_their_declaration(override, message):
    """The TransE settings are TransEParams' fields; the embed section checks them with the
    same rules, naming the field as embed.<name> in a ConfigError."""
    from hmn.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(None, override)


def test_embed_config_is_the_workers_transe_params():
    from hmn.transe_params import TransEParams

    cfg = EmbedConfig(dim=8, margin=2.0, num_workers=2)
    assert isinstance(cfg, TransEParams)
    params = TransEParams(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(TransEParams)})
    assert params == TransEParams(dim=8, margin=2.0)
    with pytest.raises(ValueError, match=r"transe\.margin=0\.0"):
        dataclasses.replace(params, margin=0.0).validate()


@pytest.mark.parametrize("optimizer,row_floats", [("adam", 9), ("row_adagrad", 4)])
def test_partitions_hold_shuffled_entities_and_the_table_comes_back_in_id_order(
        tmp_path, optimizer, row_floats):
    """TransE partitions are ranges of a seeded permutation of the ids (balanced buckets when
    ingest numbers the well-connected entities first); the final table is in id order. A
    partition file holds its rows and the optimiser's state of them: 3d floats an entity with
    Adam, d + 1 with row-wise Adagrad."""
    from hmn.transe import entity_order, entity_partition, partition_bounds
    from pipeline.stages.embed import _Tables, partition_slots

    E, P, d = 1000, 4, 3
    order = entity_order(E, seed=5)
    assert np.array_equal(np.sort(order), np.arange(E))
    assert np.array_equal(order, entity_order(E, seed=5))
    assert not np.array_equal(order, entity_order(E, seed=6))
    bounds = partition_bounds(E, P)
    # ids 0..249 (one range of ids) spread over every partition, about equally
    first = np.bincount(entity_partition(order[:250], bounds), minlength=P)
    assert first.min() >= 40, first
    slots = partition_slots(EmbedConfig(dim=d, optimizer=optimizer))
    assert sum(slots.values()) == row_floats
    tables = _Tables(tmp_path, bounds, slots)
    folder = tables.epoch_dir(1)
    folder.mkdir(parents=True)
    ids = np.empty_like(order)
    ids[order] = np.arange(E)  # the entity at each position
    states = []
    for part in range(P):
        rows = ids[bounds[part]:bounds[part + 1]].astype(np.float32)  # row = its entity id
        state = {name: np.random.default_rng(part).random((len(rows), w), np.float32)
                 for name, w in slots.items()}
        state["rows"] = np.repeat(rows[:, None], d, 1)
        tables.write(folder, part, state, 7 + part)
        states.append(state)
        assert (folder / f"part-{part}.npy").stat().st_size < len(rows) * row_floats * 4 + 200
    table = tables.entities(1, order)
    assert np.array_equal(table[:, 0], np.arange(E, dtype=np.float32))
    for part in (0, 3):  # every slot reads back where it was written
        out = {name: np.zeros_like(a) for name, a in states[part].items()}
        assert tables.read_into(folder, part, out) == 7 + part
        for name in slots:
            assert np.array_equal(out[name], states[part][name]), name
    other = _Tables(tmp_path, bounds, partition_slots(EmbedConfig(dim=d, optimizer=(
        "adam" if optimizer == "row_adagrad" else "row_adagrad"))))
    with pytest.raises(ValueError, match=r"part-0\.npy: shape"):
        other.entities(1, order)  # tables of another optimiser are refused, not misread
    with pytest.raises(ValueError, match=r"part-1\.npy: shape"):
        other.read_into(folder, 1, {name: np.zeros((tables.size(1), w), np.float32)
                                    for name, w in other.slots.items()})
    path = folder / "part-1.npy"
    path.write_bytes(path.read_bytes()[:-8])  # a truncated partition file
    with pytest.raises(ValueError, match=r"part-1\.npy: slot '\w+' short"):
        tables.read_into(folder, 1, {name: np.zeros_like(a) for name, a in states[1].items()})


def test_torch_threads_never_oversubscribe_the_cores(monkeypatch):
    from hmn import devices

    monkeypatch.setattr(devices.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert devices.cpu_threads(2, local_workers=2) == 1  # two workers on 2 cores: one each
    assert devices.cpu_threads(2, local_workers=1) == 2
    assert devices.cpu_threads(8, local_workers=1) == 2
    assert devices.cpu_threads(1, local_workers=4) == 1


class _Shard:
    """A Ray Train dataset shard's ``iter_batches`` over (head, relation, tail) arrays."""

    def __init__(self, triples):
        self.triples = triples

    def iter_batches(self, batch_size, batch_format):
        for a in range(0, len(self.triples), batch_size):
            part = self.triples[a:a + batch_size]
            yield {"head": part[:, 0], "relation": part[:, 1], "tail": part[:, 2]}


def test_edges_are_filed_by_shuffled_partition_over_many_batches(tmp_path):
    from hmn.transe import entity_order, partition_bounds
    from pipeline.stages.embed import _bucket_triples, _file_edges

    E, R, P = 500, 7, 4
    rng = np.random.default_rng(0)
    triples = np.stack([rng.integers(0, E, 3000), rng.integers(0, R, 3000), rng.integers(0, E, 3000)], 1)
    position, bounds = entity_order(E, seed=3), partition_bounds(E, P)
    assert _file_edges(_Shard(triples), tmp_path, bounds, position, rank=0, batch_size=256) == 3000
    ids = np.empty_like(position)
    ids[position] = np.arange(E)  # the entity at each position
    filed = []
    for i in range(P):
        for j in range(P):
            local = _bucket_triples(tmp_path, i, j, offset=0)
            filed += [(ids[bounds[i] + h], r, ids[bounds[j] + t]) for h, r, t in local]
    assert sorted(filed) == sorted(map(tuple, triples))  # every triple once, in its bucket
