"""Every device path of the heavy stages, run on each device torch has here ("cpu" always,
"cuda" when present): the results stay on the device where they should and leave it where they
should, and on the CPU they equal the default path exactly (the device switches change nothing
there). Also `hmn.devices`, the bfloat16 exact reader and the config fields of the switches."""

from __future__ import annotations

import dataclasses
import logging
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from hmn.config import (
    ConfigError,
    EmbedConfig,
    EvalConfig,
    MemoryConfig,
    TrainConfig,
    describe,
    fingerprint,
    load_config,
)
from hmn.devices import check_faiss_install, matmul_dtype, resolve_device
from hmn.exact_bf16 import BF16ExactReader, with_exact_precision
from hmn.index import build_index_from_vectors
from hmn.kmeans import FactorisedData, InMemoryData
from hmn.memory import FactMemory, FactorisedMemory, build_fact_vectors
from hmn.model import BowEncoder
from hmn.readers import ClusteredReader, ExactReader
from hmn.training import iterate_batches, predict, train_epoch
from hmn.transe import RowOptimizer, train_bucket, train_transe
from hmn.transe_params import TransEParams

ROOT = Path(__file__).resolve().parents[2]
CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu,
                                            pytest.mark.skipif(not CUDA, reason="needs CUDA")])]


def _kb(seed: int = 0, n: int = 300, ne: int = 120, nr: int = 6, d: int = 8):
    """A random factorised fact table: (entity, relation, subject, relation ids, offsets, values)."""
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(rng.integers(1, 4, n))])
    return (rng.standard_normal((ne, d)).astype(np.float32),
            rng.standard_normal((nr, d)).astype(np.float32), rng.integers(0, ne, n),
            rng.integers(0, nr, n), offsets, rng.integers(0, ne, offsets[-1]))


def _triples(seed: int = 0, ne: int = 50, nr: int = 4, t: int = 400) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, ne, t), rng.integers(0, nr, t), rng.integers(0, ne, t)], 1)


# --------------------------------------------------------------------------- embed (TransE)


@pytest.mark.parametrize("device", DEVICES)
def test_transe_epoch_on_the_device(device):
    params = TransEParams(dim=8, epochs=2, batch_size=64, seed=1)
    got = train_transe(_triples(), 50, 4, params, device=device)
    assert isinstance(got.entities, np.ndarray) and got.entities.shape == (50, 8)  # off the device
    assert all(np.isfinite(h["loss"]) for h in got.history)
    if device == "cpu":
        ref = train_transe(_triples(), 50, 4, params)
        assert np.array_equal(got.entities, ref.entities)
        assert np.array_equal(got.relations, ref.relations)
        assert [h["loss"] for h in got.history] == [h["loss"] for h in ref.history]


@pytest.mark.parametrize("device", DEVICES)
def test_a_bucket_trains_where_its_partitions_are(device):
    """An embed worker moves its bucket's partition rows to its device: the pass runs there."""
    params = TransEParams(dim=8, batch_size=32, seed=2)

    def run(dev):
        rng = torch.Generator().manual_seed(0)
        ent = torch.randn(50, 8, generator=rng).to(dev)
        rel = torch.randn(4, 8, generator=rng).to(dev)
        opt = RowOptimizer(params, {"entity": ent, "relation": rel})
        stats = train_bucket(_triples(), ent, rel, opt, torch.full((4,), 0.5), params, (2, 0, 0))
        return ent, rel, opt, stats

    ent, rel, opt, stats = run(torch.device(device))
    assert ent.device.type == rel.device.type == opt.moments["entity_m"].device.type == device
    assert stats["triples"] == 400 and np.isfinite(stats["loss_sum"])
    if device == "cpu":
        ref_ent, ref_rel, _, ref_stats = run(None)  # the default: wherever the tables are
        assert torch.equal(ent, ref_ent) and torch.equal(rel, ref_rel)
        assert stats["loss_sum"] == ref_stats["loss_sum"]


@pytest.mark.parametrize("device", DEVICES)
def test_embed_worker_trains_a_bucket_on_its_device_and_writes_it_back(tmp_path, device):
    from pipeline.stages.embed import EmbedJob, _bucket_dir, _Worker

    cfg = EmbedConfig(dim=8, batch_size=32, num_partitions=2, seed=3)
    triples = _triples(ne=40)

    def run(root, dev):
        job = EmbedJob(cfg=cfg, num_entities=40, num_relations=4,
                       p_head=np.full(4, 0.5, np.float32), root=str(root))
        w = _Worker(job, 0, 1, dev) if dev is not None else _Worker(job, 0, 1)
        w.tables.initialise(4, cfg.seed)
        local = triples[(triples[:, 0] < 20) & (triples[:, 2] < 20)]  # bucket (0, 0)
        folder = _bucket_dir(w.edges, 0, 0)
        folder.mkdir(parents=True)
        np.save(folder / "rank-0.npy", local)
        w.load_relations(0)
        w.tables.epoch_dir(1).mkdir()
        totals = w._train_bucket(0, (0, 0), set(), {})
        return w, totals, np.load(w.tables.epoch_dir(1) / "part-0.npy")

    w, totals, written = run(tmp_path / device, device)
    assert w.relations.device.type == device and totals.device.type == device
    assert float(totals[3]) > 0 and np.isfinite(written).all()  # trained, back in host memory
    if device == "cpu":
        ref_w, ref_totals, ref_written = run(tmp_path / "default", None)
        assert np.array_equal(written, ref_written)
        assert torch.equal(w.relations, ref_w.relations)
        assert torch.equal(totals[:4], ref_totals[:4])  # [4] is seconds


# --------------------------------------------------------------------------- memory (k-means)


@pytest.mark.parametrize("device", DEVICES)
def test_index_build_on_the_device_equals_the_default(device):
    x = torch.from_numpy(np.random.default_rng(0).standard_normal((600, 12)).astype(np.float32))
    spec = dict(branching=[4, 3], iters=6, seed=0, fit_sample=400)
    staged = build_index_from_vectors(x, device=device, **spec)  # host rows, staged to device
    held = build_index_from_vectors(x.to(device), **spec)  # rows on the device
    for index in (staged, held):
        assert all(c.device.type == "cpu" for c in index.centroids)  # the index comes back
    assert np.array_equal(staged.fact_leaf, held.fact_leaf)
    if device == "cpu":
        ref = build_index_from_vectors(x, **spec)
        assert np.array_equal(staged.fact_leaf, ref.fact_leaf)
        for a, b in zip(staged.centroids, ref.centroids):
            assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_kmeans_views_stage_host_rows_to_the_device(device):
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((500, 9)).astype(np.float32))
    c = torch.nn.functional.normalize(torch.randn(7, 9), dim=1)
    fm = FactorisedMemory(*_kb(d=3, n=500))
    groups = np.arange(500) % 2
    offsets = np.array([0, 3, 7])
    for cache in (None, False):
        view = InMemoryData(x, 64, device=device, cache_rows=cache, groups=groups)
        ref = InMemoryData(x, 64, cache_rows=cache, groups=groups)
        assert view.device.type == device and view.rows(np.array([3, 1])).device.type == device
        got, want = view.partial_stats_grouped(c, offsets), ref.partial_stats_grouped(c, offsets)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-5)
        assert np.array_equal(got[1], want[1])
        assert np.array_equal(view.assign_grouped(c, offsets), ref.assign_grouped(c, offsets))
    # the factorised tables stay in host memory; gathered chunks are staged to the device
    fview, fref = FactorisedData(fm, chunk=64, device=device), FactorisedData(fm, chunk=64)
    assert fview.device.type == device and fm.device.type == "cpu"
    c9 = torch.nn.functional.normalize(torch.randn(5, 9), dim=1)
    assert np.array_equal(fview.assign_grouped(c9, np.array([0, 5])),
                          fref.assign_grouped(c9, np.array([0, 5])))


# --------------------------------------------------------------------------- train and evaluate


def _setup(device):
    rng = np.random.default_rng(0)
    vectors = torch.from_numpy(rng.standard_normal((400, 24)).astype(np.float32))
    index = build_index_from_vectors(vectors, branching=[8], seed=0)
    memory = FactMemory(vectors.to(device))
    tokens = [np.array([i % 97, 97 + i % 13]) for i in range(400)]
    return memory, index, tokens, np.arange(400)


def _train(device, reader_name):
    memory, index, tokens, gold = _setup(device)
    reader = (ExactReader(memory) if reader_name == "exact"
              else ClusteredReader(memory, index, top_clusters=2))
    torch.manual_seed(0)
    model = BowEncoder(110, 24).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    gen = torch.Generator(device=device).manual_seed(0)
    stats = train_epoch(model, iterate_batches(tokens, gold, 64, shuffle=False, device=device),
                        memory, reader, opt, k=10, generator=gen, max_steps=3)
    return model, reader, tokens, stats


@pytest.mark.parametrize("reader_name", ["exact", "clustered"])
@pytest.mark.parametrize("device", DEVICES)
def test_train_step_on_the_device(device, reader_name):
    model, reader, _, stats = _train(device, reader_name)
    assert model.words.weight.device.type == device and stats.steps == 3
    if reader_name == "clustered":  # the reader's index reads on the memory's device
        assert reader._centroids[0].device.type == device
        assert reader._leaf_facts.device.type == device
    if device == "cpu":
        assert stats.loss == _train("cpu", reader_name)[3].loss
    else:
        assert stats.loss == pytest.approx(_train("cpu", reader_name)[3].loss, rel=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_predict_on_the_device(device):
    model, reader, tokens, _ = _train(device, "exact")
    preds = predict(model, reader, tokens[:100], k=5, batch_size=32, device=device)
    assert isinstance(preds.candidates, np.ndarray) and preds.candidates.shape == (100, 5)
    model_cpu, reader_cpu, _, _ = _train("cpu", "exact")
    ref = predict(model_cpu, reader_cpu, tokens[:100], k=5, batch_size=32)
    if device == "cpu":
        assert np.array_equal(preds.candidates, ref.candidates)
        assert np.array_equal(preds.scores, ref.scores)
    else:
        assert (preds.fact_ids == ref.fact_ids).mean() >= 0.98


# --------------------------------------------------------------------------- bfloat16


@pytest.mark.parametrize("factorised", [False, True])
def test_bf16_exact_reader_rescores_exactly_and_keeps_recall(factorised):
    """Run on the CPU here (emulated bfloat16: correct, only slow): the scan in bfloat16, the
    returned scores the exact float32 inner products of the returned facts."""
    parts = _kb(n=800, d=16)
    memory = FactorisedMemory(*parts) if factorised else FactMemory(
        torch.from_numpy(build_fact_vectors(*parts)))
    q = torch.randn(32, 48, generator=torch.Generator().manual_seed(0))
    ref = ExactReader(memory, chunk=100).search(q, 10)
    got = BF16ExactReader(memory, chunk=100).search(q, 10)
    assert torch.equal(got.touched, ref.touched)
    rows = memory.gather(got.ids.reshape(-1)).view(32, 10, 48)
    torch.testing.assert_close(got.scores, (rows @ q[:, :, None]).squeeze(2), rtol=1e-5,
                               atol=1e-5)
    hits = (got.ids[:, :, None] == ref.ids[:, None, :]).any(2).float().mean()
    assert hits >= 0.99 and (got.ids[:, 0] == ref.ids[:, 0]).float().mean() >= 0.97


def test_bf16_is_granted_on_cuda_only_and_logged_once_where_ignored(caplog):
    memory = FactMemory(torch.randn(50, 6))
    reader = ExactReader(memory)
    assert with_exact_precision(reader, "float32") is reader
    with caplog.at_level(logging.INFO, logger="hmn.devices"):
        for _ in range(2):
            assert with_exact_precision(reader, "bfloat16", "test.exact_precision") is reader
            assert matmul_dtype(True, "cpu", "test.exact_precision") == torch.float32
    assert sum("test.exact_precision" in r.message for r in caplog.records) == 1
    assert matmul_dtype(False, "cpu", "x") == torch.float32
    with pytest.raises(ValueError, match="precision='half'"):
        with_exact_precision(reader, "half")
    if CUDA and torch.cuda.is_bf16_supported():
        on_gpu = with_exact_precision(ExactReader(memory.to("cuda")), "bfloat16")
        assert isinstance(on_gpu, BF16ExactReader)


def test_resolve_device():
    assert resolve_device(use_gpu=False) == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="must be 'cpu' or 'cuda'"):
        resolve_device("meta", setting="x.device")
    if not CUDA:
        with pytest.raises(RuntimeError, match="memory.use_gpu: CUDA asked for"):
            resolve_device(use_gpu=True, setting="memory.use_gpu")


# --------------------------------------------------------------------------- evaluate (scorer)


def _run_dir(tmp_path: Path) -> Path:
    from hmn.text import Vocabulary

    memory, index, _, _ = _setup("cpu")
    (tmp_path / "memory").mkdir()
    np.save(tmp_path / "memory" / "facts.npy", memory.vectors.numpy())
    index.save(str(tmp_path / "memory" / "index"))
    (tmp_path / "train").mkdir()
    torch.manual_seed(0)
    model = BowEncoder(30, 24, init_std=0.5)
    torch.save({"model": model.state_dict(), "dim": 24, "vocab_size": 30},
               tmp_path / "train" / "model.pt")
    Vocabulary(tuple(f"w{i:02d}" for i in range(30))).save(tmp_path / "train" / "vocab.json")
    return tmp_path


@pytest.mark.parametrize("device", DEVICES)
def test_scorer_actor_holds_everything_on_its_device_and_sets_its_threads(tmp_path, device):
    from hmn.config import ReaderConfig
    from pipeline.stages.score import Scorer

    run = str(_run_dir(tmp_path))
    batch = {"row": np.arange(6), "tokens": np.array([np.array([i, 10 + i]) for i in range(6)],
                                                     dtype=object)}
    before = torch.get_num_threads()
    try:
        scorer = Scorer(run, ("exact", "clustered"), ReaderConfig(top_clusters=2), k=5,
                        threads=2, device=device)
        assert torch.get_num_threads() == 2  # its CPUs, not Ray's OMP_NUM_THREADS=1 alone
        got = scorer(batch)
        ref = Scorer(run, ("exact", "clustered"), ReaderConfig(top_clusters=2), k=5)(batch)
    finally:
        torch.set_num_threads(before)
    assert next(scorer.model.parameters()).device.type == device
    assert scorer.readers["exact"].memory.device.type == device
    assert isinstance(got["cands_exact"], np.ndarray)  # predictions come back as numpy
    if device == "cpu":
        for key in ref:
            assert np.array_equal(got[key], ref[key]), key


@pytest.mark.parametrize("device", DEVICES)
def test_train_worker_holds_memory_index_and_readers_on_its_device(tmp_path, device):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hmn.config import ReaderConfig
    from pipeline.stages.train import TrainJob, _load_worker

    run = _run_dir(tmp_path)
    pq.write_table(pa.table({"tokens": pa.array([[1, 2], [3]], pa.list_(pa.int64())),
                             "fact_id": pa.array([0, 1], pa.int64())}), run / "dev.parquet")
    np.savez(run / "meta.npz", fact_subject=np.arange(400), fact_relation=np.zeros(400, int))
    train = TrainConfig(reader="clustered", infer_reader="exact", exact_precision="bfloat16")
    job = TrainJob(train=train, reader=ReaderConfig(top_clusters=2), memory_dir=str(run / "memory"),
                   dev_path=str(run / "dev.parquet"), facts_meta_path=str(run / "meta.npz"),
                   vocab_size=30, dim=24, fingerprints={})
    w = _load_worker(job, 0, 1, torch.device(device))
    assert w.memory.device.type == device
    assert w.train_reader._centroids[-1].device.type == device  # the index reads there too
    assert w.train_reader._fact_leaf.device.type == device
    bf16 = CUDA and torch.cuda.is_bf16_supported() and device == "cuda"
    assert type(w.infer_reader) is (BF16ExactReader if bf16 else ExactReader)  # CPU: ignored


def test_scoring_placement_defaults_are_todays_resources():
    from pipeline.stages.score import ScoringPlacement

    default = ScoringPlacement.from_config(EvalConfig())
    # 1 CPU (Ray Data's default for an actor), 1 torch thread (the Scorer's old default), CPU
    assert default == ScoringPlacement() and default.threads == 1 and default.device == "cpu"
    assert default.ray_args() == {"num_cpus": 1.0}
    four = ScoringPlacement.from_config(EvalConfig(cpus_per_actor=3.5))
    assert four.threads == 4 and four.ray_args() == {"num_cpus": 3.5}
    gpu = ScoringPlacement.from_config(EvalConfig(use_gpu=True, gpus_per_actor=0.5,
                                                  exact_precision="bfloat16"))
    assert gpu.device == "cuda" and gpu.ray_args() == {"num_gpus": 0.5}
    assert gpu.exact_precision == "bfloat16"


def test_memory_shards_ask_for_gpus_only_with_the_switch():
    from pipeline.stages.memory import shard_placement

    assert shard_placement(MemoryConfig()) == {}
    assert shard_placement(MemoryConfig(use_gpu=True, gpus_per_shard=0.25)) == {
        "actor_options": {"num_cpus": 1, "num_gpus": 0.25}, "device": "cuda"}


# --------------------------------------------------------------------------- config and install


def test_the_switches_default_to_todays_behaviour_and_are_documented():
    cfg = load_config()
    assert (cfg.embed.use_gpu, cfg.memory.use_gpu, cfg.train.use_gpu, cfg.eval.use_gpu) == (
        False, False, False, False)
    assert cfg.memory.gpus_per_shard == cfg.eval.gpus_per_actor == 1.0
    assert cfg.eval.cpus_per_actor == 1.0
    assert cfg.train.exact_precision == cfg.eval.exact_precision == "float32"
    assert cfg.memory.kmeans_precision == "float32"
    described = "\n".join(describe())
    for name in ("embed.use_gpu", "memory.use_gpu", "memory.gpus_per_shard", "train.use_gpu",
                 "train.exact_precision", "eval.use_gpu", "eval.gpus_per_actor",
                 "eval.cpus_per_actor", "eval.exact_precision"):
        assert f"\n{name} = " in "\n" + described, name


@pytest.mark.parametrize("section, field, value", [
    (EmbedConfig, "use_gpu", True), (MemoryConfig, "use_gpu", True),
    (MemoryConfig, "gpus_per_shard", 0.5), (TrainConfig, "exact_precision", "bfloat16"),
    (EvalConfig, "use_gpu", True), (EvalConfig, "cpus_per_actor", 2.0),
    (EvalConfig, "gpus_per_actor", 2.0), (EvalConfig, "exact_precision", "bfloat16"),
])
def test_a_switch_counts_in_the_fingerprint_only_when_on(section, field, value):
    default = section()
    assert field not in _hashed(default)  # stable: existing runs keep their fingerprints
    assert fingerprint(dataclasses.replace(default, **{field: value})) != fingerprint(default)


def _hashed(cfg) -> dict:
    from hmn.config import config_to_dict

    return config_to_dict(cfg, omit_stable_defaults=True)


@pytest.mark.parametrize("override, message", [
    ("memory.gpus_per_shard=0", "memory.gpus_per_shard=0.0: must be a fraction in (0, 1]"),
    ("eval.gpus_per_actor=1.5", "eval.gpus_per_actor=1.5: must be a fraction in (0, 1]"),
    ("eval.cpus_per_actor=0", "eval.cpus_per_actor=0.0: must be > 0"),
    ("train.exact_precision=half", "train.exact_precision='half': must be one of float32"),
    ("eval.exact_precision=fp16", "eval.exact_precision='fp16': must be one of float32"),
])
def test_switch_errors_name_the_field(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_faiss_extras_are_exclusive(monkeypatch):
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = meta["project"]["dependencies"]
    assert not [d for d in deps if d.startswith("faiss")]  # only through an extra
    extras = meta["project"]["optional-dependencies"]
    assert extras["cpu"] == ["faiss-cpu>=1.8"] and extras["gpu"][0].startswith("faiss-gpu")
    assert meta["tool"]["uv"]["conflicts"] == [[{"extra": "cpu"}, {"extra": "gpu"}]]
    import re

    installs = re.findall(r'-e "\.\[([a-z,]+)\]"', (ROOT / "scripts" / "setup.sh").read_text())
    assert installs and all("cpu" in e.split(",") and "gpu" not in e.split(",") for e in installs)

    from importlib import metadata

    installed = {"faiss-cpu", "faiss-gpu-cu12"}

    def distribution(name):
        if name not in installed:
            raise metadata.PackageNotFoundError(name)
        return name

    monkeypatch.setattr(metadata, "distribution", distribution)
    check_faiss_install.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="faiss-cpu and faiss-gpu-cu12 are both installed"):
            check_faiss_install()
        installed.discard("faiss-cpu")
        assert check_faiss_install() == ("faiss-gpu-cu12",)
    finally:
        check_faiss_install.cache_clear()
