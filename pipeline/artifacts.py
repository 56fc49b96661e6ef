"""Readers of the run directory's artifacts, shared by the stages and the batch-evaluation job.

Layout (see ARCHITECTURE.md):
    ingest/kb/{entities,relations,facts}.parquet, ingest/questions/<split>.parquet, ingest/rejects.parquet
    embed/{entities,relations}.parquet            id int64, vector fixed_size_list<float32>[d]
    memory/facts.npy (N, D) float32 (dense layout) or memory/factorised/*.npy (the entity,
        relation and fact tables of hmn.memory.FactorisedMemory), memory/index/ (hmn.index.ClusterIndex)
    train/model.pt, train/vocab.json, train/history.json
    eval/report.json, eval/report.md, eval/predictions/<split>.<reader>.parquet

No pickle from a run directory: run directories live on shared storage, and whoever can write one
must not run code as whoever reads it. Torch files (``model.pt``, Ray Train's ``state.pt``, the
TransE moments) are read by `load_torch_file` (``weights_only=True``: tensors and plain
containers, nothing else); ``.npy``/``.npz`` files by ``np.load`` without ``allow_pickle``; Parquet
files by `read_table`, which refuses extension types (Ray Data registers one whose values are
unpickled when read).
"""

from __future__ import annotations

import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from hmn.index import ClusterIndex
from hmn.memory import FactMemory, FactorisedMemory
from hmn.model import BowEncoder
from hmn.text import Vocabulary


class UnsafeFileError(ValueError):
    """A run directory's file holds something other than plain data; it is not loaded."""


def load_torch_file(path: str | Path, map_location: torch.device | str = "cpu",
                    what: str = "the stage that wrote it", *, mmap: bool = False) -> dict:
    """``torch.load(path, weights_only=True)``: tensors, numbers, strings and plain containers.
    A file holding any other object (a pickled class, a ``__reduce__`` payload) is refused with
    `UnsafeFileError` naming the file and ``what`` re-creates it; nothing in it runs. ``mmap``
    maps the tensors instead of reading them (for a look at the metadata)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        detail = f"a reference to {found.group(1)}" if found else str(e).strip()[:160]
        raise UnsafeFileError(f"{path}: refused: it holds objects other than tensors and plain "
                              f"data ({detail}); loading it could run code. Re-create it with "
                              f"{what}") from None


def read_table(path: str | Path, **kw) -> pa.Table:
    """``pyarrow.parquet.read_table`` of a run directory's file, refusing a column of an
    extension type: the stages write none, and Ray Data's Python-object type unpickles its
    values when they are read."""
    _check_schema(path)
    return pq.read_table(path, **kw)


def _check_schema(path: str | Path) -> pa.Schema:
    """``path``'s Parquet schema; `UnsafeFileError` for a column of an extension type."""
    schema = pq.read_schema(path)

    def extension(t: pa.DataType) -> bool:
        if isinstance(t, pa.BaseExtensionType):
            return True
        if pa.types.is_dictionary(t):
            return extension(t.value_type)
        return any(extension(t.field(i).type) for i in range(t.num_fields))

    bad = [f.name for f in schema if extension(f.type)]
    if bad:
        raise UnsafeFileError(f"{path}: refused: column(s) {bad} have an extension type "
                              f"(pickled objects?); the pipeline writes plain Arrow types only")
    return schema


def write_vectors(path: Path, vectors: np.ndarray) -> None:
    """(n, d) float32 -> Parquet with id int64 and vector fixed_size_list<float32>[d]."""
    n, d = vectors.shape
    flat = pa.array(np.ascontiguousarray(vectors, dtype=np.float32).reshape(-1))
    table = pa.table({"id": pa.array(np.arange(n, dtype=np.int64)),
                      "vector": pa.FixedSizeListArray.from_arrays(flat, d)})
    pq.write_table(table, path)


def read_vectors(path: Path, out: np.ndarray | None = None) -> np.ndarray:
    """The (n, d) float32 rows of a `write_vectors` file, row i = id i, read batch by batch
    into ``out`` (default: a new array; e.g. a ``.npy`` map, so that the table never sits in
    memory twice: Arrow's columns and their numpy copy took 7 GB for the 10m scaling memory's
    3.5 GB entity table)."""
    schema = _check_schema(path)
    d = schema.field("vector").type.list_size
    parquet = pq.ParquetFile(path)
    n = parquet.metadata.num_rows
    if out is None:
        out = np.empty((n, d), np.float32)
    if out.shape != (n, d):
        raise ValueError(f"{path}: {n} rows of {d}, the output has shape {out.shape}")
    seen = np.zeros(n, bool)
    for batch in parquet.iter_batches(batch_size=1 << 16, columns=["id", "vector"]):
        ids = batch.column("id").to_numpy()
        if ids.size and (ids.min() < 0 or ids.max() >= n):
            raise ValueError(f"{path}: id out of range [0, {n}) in column 'id'")
        rows = batch.column("vector").flatten().to_numpy(zero_copy_only=False).reshape(-1, d)
        if ids.size and ids[-1] - ids[0] == ids.size - 1 and (np.diff(ids) == 1).all():
            out[ids[0]:ids[-1] + 1] = rows  # in order (what write_vectors writes)
        else:
            out[ids] = rows
        seen[ids] = True
    if not seen.all():
        raise ValueError(f"{path}: ids {np.flatnonzero(~seen)[:5].tolist()}... missing "
                         f"({int((~seen).sum())} of {n})")
    return out


@dataclass
class KnowledgeBase:
    """The ingested knowledge base: keys, names and the integer fact table."""

    entity_keys: np.ndarray        # (E,) object
    entity_names: list             # (E,) str | None
    relation_keys: np.ndarray      # (R,) object
    fact_subject: np.ndarray       # (N,) int64
    fact_relation: np.ndarray      # (N,) int64
    object_offsets: np.ndarray     # (N+1,) int64
    object_values: np.ndarray      # (total objects,) int64

    @property
    def num_facts(self) -> int:
        return len(self.fact_subject)

    @classmethod
    def load(cls, ingest_dir: Path, text: bool = True) -> KnowledgeBase:
        """The ingested knowledge base; ``text=False``: the fact table only, keys and names
        left None (the embed and memory stages need counts and ids: at FB2M size the keys and
        names take GBs as Python strings)."""
        kb = Path(ingest_dir) / "kb"
        if text:
            ent = read_table(kb / "entities.parquet").sort_by("entity_id")
            rel = read_table(kb / "relations.parquet").sort_by("relation_id")
            entity_keys = np.asarray(ent["key"].to_pylist(), dtype=object)
            entity_names = ent["name"].to_pylist()
            relation_keys = np.asarray(rel["key"].to_pylist(), dtype=object)
        else:
            num_entities = pq.read_metadata(kb / "entities.parquet").num_rows
            entity_keys = np.empty(num_entities, dtype=object)
            entity_names = [None] * num_entities
            relation_keys = np.empty(pq.read_metadata(kb / "relations.parquet").num_rows,
                                     dtype=object)
        facts = read_table(kb / "facts.parquet").sort_by("fact_id")
        objs = facts["object_ids"].combine_chunks()
        return cls(
            entity_keys=entity_keys,
            entity_names=entity_names,
            relation_keys=relation_keys,
            fact_subject=facts["subject_id"].to_numpy(),
            fact_relation=facts["relation_id"].to_numpy(),
            object_offsets=objs.offsets.to_numpy().astype(np.int64),
            object_values=objs.values.to_numpy().astype(np.int64),
        )

    def triples(self) -> np.ndarray:
        """Atomic (head, relation, tail) triples: one per object of each grouped fact. (T, 3)"""
        counts = np.diff(self.object_offsets)
        heads = np.repeat(self.fact_subject, counts)
        rels = np.repeat(self.fact_relation, counts)
        return np.stack([heads, rels, self.object_values], axis=1).astype(np.int64)

def read_questions(ingest_dir: Path, split: str) -> pa.Table | None:
    path = Path(ingest_dir) / "questions" / f"{split}.parquet"
    return read_table(path) if path.exists() else None


FACTORISED_ARRAYS = ("entity_emb", "relation_emb", "subject_ids", "relation_ids", "object_offsets",
                     "object_values")


def write_factorised(directory: Path, entity_emb: np.ndarray | Path,
                     relation_emb: np.ndarray | Path, kb: KnowledgeBase) -> None:
    """The factorised memory as memory-mappable .npy files (one per table). A table given as
    the path of a `write_vectors` file is streamed into its ``.npy`` (`read_vectors` into a
    map of the new file), never held whole in memory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, table in (("entity_emb", entity_emb), ("relation_emb", relation_emb)):
        if isinstance(table, (str, Path)):
            n = pq.ParquetFile(table).metadata.num_rows
            d = _check_schema(table).field("vector").type.list_size
            mapped = np.lib.format.open_memmap(directory / f"{name}.npy", mode="w+",
                                               dtype=np.float32, shape=(n, d))
            read_vectors(Path(table), out=mapped)
            mapped.flush()
            del mapped
        else:
            np.save(directory / f"{name}.npy", np.ascontiguousarray(table, dtype=np.float32))
    arrays = {"subject_ids": kb.fact_subject, "relation_ids": kb.fact_relation,
              "object_offsets": kb.object_offsets, "object_values": kb.object_values}
    for name, a in arrays.items():
        np.save(directory / f"{name}.npy", a)


def memory_layout(memory_dir: Path) -> str:
    if (Path(memory_dir) / "facts.npy").exists():
        return "dense"
    if (Path(memory_dir) / "factorised").is_dir():
        return "factorised"
    raise FileNotFoundError(f"{memory_dir}: neither facts.npy nor factorised/ (run the memory stage)")


def memory_dim(memory_dir: Path) -> int:
    """D, the width of a fact vector, without loading the memory."""
    if memory_layout(memory_dir) == "dense":
        return int(np.load(Path(memory_dir) / "facts.npy", mmap_mode="r").shape[1])
    return 3 * int(np.load(Path(memory_dir) / "factorised" / "entity_emb.npy", mmap_mode="r").shape[1])


def load_array(path: Path, **kw) -> np.ndarray:
    """``np.load`` of a run directory's ``.npy`` (never ``allow_pickle``): an object array (whose
    elements would be unpickled) is refused with `UnsafeFileError` naming the file."""
    try:
        return np.load(path, allow_pickle=False, **kw)
    except ValueError as e:
        if "allow_pickle" not in str(e) and "Python objects" not in str(e):
            raise
        raise UnsafeFileError(f"{path}: refused: an object array (pickled Python objects); the "
                              f"memory stage writes numbers only: re-run it") from None


def load_memory(memory_dir: Path, device: torch.device | str = "cpu",
                mmap: bool = True) -> FactMemory | FactorisedMemory:
    """The memory stage's memory: dense (facts.npy) or factorised (factorised/*.npy)."""
    if memory_layout(memory_dir) == "dense":
        vectors = load_array(Path(memory_dir) / "facts.npy", mmap_mode="r" if mmap else None)
        return FactMemory(torch.from_numpy(np.array(vectors, dtype=np.float32)).to(device))
    d = Path(memory_dir) / "factorised"
    a = {name: load_array(d / f"{name}.npy") for name in FACTORISED_ARRAYS}
    mem = FactorisedMemory(a["entity_emb"], a["relation_emb"], a["subject_ids"], a["relation_ids"],
                           a["object_offsets"], a["object_values"])
    return mem.to(device)


def load_index(memory_dir: Path) -> ClusterIndex:
    """The memory stage's index (``np.load`` without ``allow_pickle``: an object array is
    refused with `UnsafeFileError`)."""
    path = Path(memory_dir) / "index"
    try:
        return ClusterIndex.load(str(path))
    except ValueError as e:
        if "allow_pickle" not in str(e):
            raise
        raise UnsafeFileError(f"{path}: refused: an object array (pickled Python objects); the "
                              f"memory stage writes numbers only: re-run it") from None


def load_model(train_dir: Path, device: torch.device | str = "cpu") -> tuple[BowEncoder, Vocabulary, dict]:
    """The selected (best dev accuracy) model of a finished train stage (`load_torch_file`)."""
    state = load_torch_file(Path(train_dir) / "model.pt", device,
                            "the train stage (python -m pipeline.run --stages train --force)")
    vocab = Vocabulary.load(Path(train_dir) / "vocab.json")
    model = BowEncoder(len(vocab), state["dim"]).to(device)
    model.load_state_dict(state["model"])
    model.eval()
    return model, vocab, state
