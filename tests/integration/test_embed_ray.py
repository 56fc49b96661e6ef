"""TransE on Ray Train: partitioned entity table over 2 gloo workers, failure and resume."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hmn.config import EmbedConfig
from hmn.transe import bernoulli_head_probs, link_prediction
from pipeline.stages.embed import train_transe_on_ray


def _planted(E: int = 60, R: int = 3, dim: int = 8, seed: int = 0) -> np.ndarray:
    """Triples whose tail is the entity nearest (L1) to h + r for planted vectors."""
    rng = np.random.default_rng(seed)
    ent = rng.standard_normal((E, dim))
    ent /= np.linalg.norm(ent, axis=1, keepdims=True)
    rel = rng.standard_normal((R, dim))
    rel *= 0.8 / np.linalg.norm(rel, axis=1, keepdims=True)
    heads, rels = np.repeat(np.arange(E), R), np.tile(np.arange(R), E)
    tails = np.abs((ent[heads] + rel[rels])[:, None] - ent[None]).sum(-1).argmin(1)
    return np.stack([heads, rels, tails], 1).astype(np.int64)


def _ingest(tmp_path: Path, triples: np.ndarray) -> Path:
    """An ingest folder with one grouped fact per triple (what the embed stage reads)."""
    kb = tmp_path / "ingest" / "kb"
    kb.mkdir(parents=True)
    pq.write_table(pa.table({
        "fact_id": pa.array(np.arange(len(triples))),
        "subject_id": pa.array(triples[:, 0]),
        "relation_id": pa.array(triples[:, 1]),
        "object_ids": pa.array([[int(t)] for t in triples[:, 2]], pa.list_(pa.int64())),
    }), kb / "facts.parquet")
    return tmp_path / "ingest"


CFG = EmbedConfig(dim=16, margin=1.0, lr=0.02, epochs=12, batch_size=32, num_negatives=2,
                  num_workers=2, num_partitions=4, num_cpus=1, max_failures=1)


@pytest.mark.parametrize("optimizer,lr", [("adam", 0.02), ("row_adagrad", 0.1)])
def test_two_workers_four_partitions_learn_and_survive_a_worker_failure(ray_local, tmp_path,
                                                                         optimizer, lr):
    """Adam keeps 2d floats of state an entity in the partition files, row-wise Adagrad one;
    both learn, and resume from an epoch folder with their relation state."""
    cfg = dataclasses.replace(CFG, optimizer=optimizer, lr=lr)
    triples = _planted()
    E, R = 60, 3
    ingest = _ingest(tmp_path, triples)
    root = tmp_path / "shared"
    ent, rel, history = train_transe_on_ray(cfg, ingest, E, R, bernoulli_head_probs(triples, R), root,
                                            fail_at_epoch=5)
    assert (root / "failed-once").exists()  # the injected failure happened; the group restarted
    assert [h["epoch"] for h in history] == list(range(cfg.epochs))  # each epoch once, from the checkpoint
    losses = [h["loss"] for h in history]
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3]), losses
    assert ent.shape == (E, 16) and rel.shape == (R, 16)
    assert np.allclose(np.linalg.norm(ent, axis=1), 1.0, atol=1e-5)
    lp = link_prediction(ent, rel, triples, [triples])
    assert lp["mrr"] > 0.5, lp  # chance is ~0.08 for 60 entities
    # Every triple was filed into exactly one bucket, over the two workers' shards.
    edges = root / "edges-w2"
    filed = sum(len(np.load(f)) for f in edges.glob("bucket-*/rank-*.npy"))
    assert filed == len(triples)
    # Only the last complete epoch's tables are kept, and it is marked done.
    kept = sorted(p.name for p in (root / "tables").iterdir())
    assert kept == [f"epoch-{cfg.epochs:05d}"]
    assert json.loads((root / "tables" / kept[0] / "DONE").read_text())["epoch"] == cfg.epochs - 1
    part = np.load(root / "tables" / kept[0] / "part-0.npy")
    assert part.shape == (15 * (16 + (32 if optimizer == "adam" else 1)),)  # 60 / 4 entities
    relopt = torch.load(root / "tables" / kept[0] / "relopt-rank1.pt")
    assert sorted(relopt) == (["m", "v"] if optimizer == "adam" else ["sum"])

    # A second call on the same storage resumes the finished run: nothing is trained again.
    ent2, rel2, history2 = train_transe_on_ray(cfg, ingest, E, R, bernoulli_head_probs(triples, R), root)
    assert len(history2) == cfg.epochs and np.array_equal(ent, ent2) and np.array_equal(rel, rel2)


def test_embed_stage_trains_writes_vectors_and_removes_its_checkpoint(ray_local, tmp_path):
    """run_embed as the pipeline calls it (Ray Train local mode here, to keep the test short)."""
    from pipeline.artifacts import read_vectors
    from pipeline.stages.embed import run_embed

    triples = _planted(E=30, R=2)
    ingest = _ingest(tmp_path, triples)
    kb = ingest / "kb"
    pq.write_table(pa.table({"entity_id": pa.array(np.arange(30)), "key": [f"/m/e{i}" for i in range(30)],
                             "name": pa.array([None] * 30, pa.string())}), kb / "entities.parquet")
    pq.write_table(pa.table({"relation_id": pa.array(np.arange(2)), "key": ["/r/a", "/r/b"]}),
                   kb / "relations.parquet")
    out = tmp_path / "embed"
    out.mkdir()
    cfg = EmbedConfig(dim=8, margin=1.0, lr=0.02, epochs=6, batch_size=16, num_workers=0, num_cpus=1,
                      loss="self_adversarial", norm=2, shared_negatives=8, normalize_entities=False)
    stats = run_embed(cfg, ingest, out, tmp_path / "ck")
    assert stats["source"] == "transe" and stats["triples"] == len(triples)
    assert len(stats["history"]) == 6 and len(stats["fingerprint"]) == 16
    assert read_vectors(out / "entities.parquet").shape == (30, 8)
    assert read_vectors(out / "relations.parquet").shape == (2, 8)
    assert not (tmp_path / "ck").exists()
    assert json.dumps(stats)


def test_resume_from_an_epoch_folder_newer_than_the_checkpoint(ray_local, tmp_path):
    """Killed after an epoch's folder was written (and the one before removed) but before Ray
    Train recorded that epoch's checkpoint: the run resumes from the newest complete folder."""
    import dataclasses

    triples = _planted(E=40, R=2)
    ingest = _ingest(tmp_path, triples)
    root = tmp_path / "shared"
    probs = bernoulli_head_probs(triples, 2)
    cfg = dataclasses.replace(CFG, epochs=3)
    train_transe_on_ray(cfg, ingest, 40, 2, probs, root)
    # roll every recorded checkpoint back one epoch: it now names a folder that was removed
    rolled = 0
    for m in root.rglob("meta.json"):
        meta = json.loads(m.read_text())
        if meta["epoch"] == 3:
            meta["epoch"], meta["history"] = 2, meta["history"][:2]
            m.write_text(json.dumps(meta))
            rolled += 1
    assert rolled >= 1  # the latest checkpoint now names epoch 2
    assert not (root / "tables" / "epoch-00002").exists() and (root / "tables" / "epoch-00003" / "DONE").exists()
    ent, rel, history = train_transe_on_ray(dataclasses.replace(CFG, epochs=5), ingest, 40, 2, probs, root)
    assert [h["epoch"] for h in history] == [0, 1, 2, 3, 4]  # epoch 2 not trained twice
    assert ent.shape == (40, 16)
