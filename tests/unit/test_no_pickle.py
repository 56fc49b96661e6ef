"""No pickle from a run directory: every file a stage or job loads refuses a planted payload.

Each test plants an object whose ``__reduce__`` writes a marker file (what unpickling it would
run) into one kind of file a loader reads, and checks that the loader refuses it with an error
naming the file, and that the marker was never written.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hmn.config import RunConfig, dump_config
from pipeline.artifacts import (
    KnowledgeBase,
    UnsafeFileError,
    load_index,
    load_memory,
    load_model,
    load_torch_file,
)

ROOT = Path(__file__).resolve().parents[2]


class Payload:
    """Unpickling this runs code: it writes ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "payload-ran"
    yield path
    assert not path.exists(), "the planted payload ran"


def _model_pt(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {"emb.weight": torch.zeros(3, 4)}, "dim": 4, "vocab_size": 3,
                "fingerprints": {"train": "x"}, "train": {"seed": Payload(marker)}}, path)


def test_model_pt_payload_is_refused_by_load_model(tmp_path, marker):
    _model_pt(tmp_path / "train" / "model.pt", marker)
    (tmp_path / "train" / "vocab.json").write_text('{"words": ["a", "b", "c"]}')
    with pytest.raises(UnsafeFileError, match=r"model\.pt: refused: .*a reference to exec"):
        load_model(tmp_path / "train")


def test_model_pt_payload_is_refused_by_pipeline_evaluate(tmp_path, marker):
    from pipeline.evaluate import InputError, load_run_config

    run = tmp_path / "run"
    (run / "ingest" / "kb").mkdir(parents=True)
    (run / "memory").mkdir()
    (run / "config.resolved.yaml").write_text(dump_config(RunConfig()))
    _model_pt(run / "train" / "model.pt", marker)
    with pytest.raises(InputError, match=r"model\.pt: refused"):
        load_run_config(run)


def test_ray_train_checkpoint_payload_is_refused(tmp_path, marker):
    from pipeline.stages.train import _load_checkpoint_state

    torch.save({"model": {}, "optimizer": {}, "stopper": {"best": 0.5},
                "history": [Payload(marker)], "best_model": None, "epoch": 1},
               tmp_path / "state.pt")
    with pytest.raises(UnsafeFileError, match=r"state\.pt: refused"):
        _load_checkpoint_state(str(tmp_path), "cpu")


def test_transe_moments_payload_is_refused(tmp_path, marker):
    from hmn.config import EmbedConfig
    from pipeline.stages.embed import EmbedJob, _Worker

    job = EmbedJob(cfg=EmbedConfig(dim=4, num_partitions=1), num_entities=10, num_relations=2,
                   p_head=np.full(2, 0.5, np.float32), root=str(tmp_path))
    worker = _Worker(job, rank=0, world=1)
    folder = worker.tables.epoch_dir(0)
    folder.mkdir(parents=True)
    np.save(folder / "relations.npy", np.zeros((2, 4), np.float32))
    torch.save({"m": torch.zeros(2, 4), "v": Payload(marker)}, folder / "relopt-rank0.pt")
    with pytest.raises(UnsafeFileError, match=r"relopt-rank0\.pt: refused"):
        worker.load_relations(0)


def test_benchmark_model_pick_refuses_a_payload(tmp_path, marker):
    spec = importlib.util.spec_from_file_location("bench_readers", ROOT / "benchmarks" / "readers.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    _model_pt(tmp_path / "train" / "model.pt", marker)
    with pytest.raises(UnsafeFileError, match=r"model\.pt: refused"):
        bench.pick_model(tmp_path, None)


def test_memory_and_index_object_arrays_are_refused(tmp_path, marker):
    memory = tmp_path / "memory"
    memory.mkdir()
    np.save(memory / "facts.npy", np.array([Payload(marker)], dtype=object), allow_pickle=True)
    for mmap in (True, False):
        with pytest.raises(UnsafeFileError, match=r"facts\.npy: refused"):
            load_memory(memory, mmap=mmap)
    from hmn.index import _ARRAYS, _META, FORMAT_VERSION

    index = memory / "index"
    index.mkdir()
    (index / _META).write_text(f'{{"format_version": {FORMAT_VERSION}, "num_levels": 1}}')
    np.savez(index / _ARRAYS, centroids_0=np.array([Payload(marker)], dtype=object),
             fact_leaf=np.zeros(1, np.int64), allow_pickle=True)
    with pytest.raises(UnsafeFileError, match="index: refused"):
        load_index(memory)


def test_parquet_of_pickled_objects_is_refused(tmp_path, marker):
    # Ray Data registers an Arrow extension type whose values are unpickled when read
    from ray.data._internal.object_extensions.arrow import ArrowPythonObjectArray

    kb = tmp_path / "ingest" / "kb"
    kb.mkdir(parents=True)
    pq.write_table(pa.table({"entity_id": pa.array([0], pa.int64()),
                             "key": ArrowPythonObjectArray.from_objects([Payload(marker)]),
                             "name": pa.array(["x"])}), kb / "entities.parquet")
    assert "ray" in sys.modules
    with pytest.raises(UnsafeFileError, match=r"entities\.parquet: refused: column\(s\) \['key'\]"):
        KnowledgeBase.load(tmp_path / "ingest")


def test_plain_files_still_load(tmp_path):
    """What the stages write (tensors, numbers, strings, tuples, None) loads."""
    state = {"model": {"w": torch.ones(2)}, "dim": 2, "fingerprints": {"train": "ab"},
             "train": {"branching": (32, 8), "lr": 0.001, "reader": "exact", "x": None}}
    torch.save(state, tmp_path / "model.pt")
    loaded = load_torch_file(tmp_path / "model.pt")
    assert loaded["train"] == state["train"] and torch.equal(loaded["model"]["w"], torch.ones(2))
