"""The reader registry: every K-MIPS reader's name, class and tunable parameters, declared once.

This module imports neither torch nor faiss, so that `hmn.config` can build the ``reader`` config
section from it and stay cheap to import:

* each reader's tunable keyword arguments are a small frozen dataclass (`ClusteredParams`,
  `PCATreeParams`, ...). A field carries its default, its help text and the name of its field in
  the flat ``reader`` config section (``reader.pca_depth`` for `PCATreeParams.depth`); a config
  field that several readers declare (``baseline_seed``) is one field of the section.
  ``problems()`` yields the parameter values that are out of range, ``kwargs(training)`` gives
  the reader's keyword arguments;
* `READERS` maps a reader name to a `ReaderEntry`: the reader class, named by import path and
  imported on first use (`reader_class`), and its params type;
* `hmn.config.ReaderConfig` is made from `config_fields()` with `dataclasses.make_dataclass`;
  ``ReaderConfig.params(name, training)`` looks the reader up here;
* the reader classes (`hmn.readers`, `hmn.baselines`) take their keyword defaults from these
  dataclasses, so a default is written once.

Adding a reader: its class, its params dataclass here and one `READERS` entry; nothing in
`hmn.config`.
"""

from __future__ import annotations

import importlib
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = [
    "READERS",
    "READER_NAMES",
    "ClusteredParams",
    "ConfigField",
    "FaissIVFParams",
    "PCATreeParams",
    "ReaderEntry",
    "ReaderParams",
    "WTAHashParams",
    "config_fields",
    "reader_class",
    "reader_entry",
]


def _param(config: str, default: Any, help: str, stable: bool = False) -> Any:
    """A reader parameter: its default, help text and ``reader.<config>`` field name; a
    ``stable`` one counts in fingerprints only when it differs from its default (a parameter
    added later whose default keeps the old behaviour)."""
    return field(default=default, metadata={"config": config, "help": help, "stable": stable})


def _baseline_seed() -> Any:
    return _param("baseline_seed", 0, "seed of the pca-tree / wta-hash / faiss-ivf structures")


@dataclass(frozen=True)
class ReaderParams:
    """Tunable keyword arguments of a reader (none for the exact reader)."""

    def problems(self) -> Iterator[tuple[str, str]]:
        """(parameter, why) of each value out of range, in a fixed order."""
        return iter(())

    def kwargs(self, training: bool) -> dict[str, Any]:
        """Keyword arguments of the reader's constructor."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class ClusteredParams(ReaderParams):
    """Bias reducers of the clustered reader (paper section 3.2; `hmn.readers.ClusteredReader`)."""

    top_clusters: int = _param("top_clusters", 4, "clustered reader: leaf clusters read per "
                               "question (Top-K)")
    sample_clusters: int = _param("sample_clusters", 0, "clustered reader: extra clusters "
                                  "sampled without replacement (Sample-K)")
    rand_blocks: int = _param("rand_blocks", 0, "clustered reader: random blocks of facts added "
                              "(Rand-block)")
    temperature: float = _param("temperature", 1.0, "Sample-K: log-probability = centroid score "
                                "/ temperature")
    scan: str = _param("scan", "exact", "clustered reader: how the facts of the leaves read are "
                       "scored: 'exact' (each fact's inner product), or 'sq8' / 'sq6' / 'sq4' / "
                       "'fp16' (faiss inverted lists of quantised facts scanned, the best "
                       "reader.scan_rerank re-scored exactly; hmn.compressed)", stable=True)
    rerank: int = _param("scan_rerank", 100, "clustered reader with a compressed scan: facts "
                         "of each question re-scored exactly (>= reader.k)", stable=True)

    def problems(self) -> Iterator[tuple[str, str]]:
        if self.top_clusters <= 0:
            yield "top_clusters", "must be > 0"
        for name in ("sample_clusters", "rand_blocks"):
            if getattr(self, name) < 0:
                yield name, "must be >= 0"
        if self.temperature <= 0:
            yield "temperature", "must be > 0"
        if self.scan not in ("exact", "sq8", "sq6", "sq4", "fp16"):
            yield "scan", "must be 'exact', 'sq8', 'sq6', 'sq4' or 'fp16'"
        if self.rerank <= 0:
            yield "rerank", "must be > 0"
        if self.scan != "exact" and self.rand_blocks:
            yield "scan", "a compressed scan reads leaves only: not with reader.rand_blocks"

    def kwargs(self, training: bool) -> dict[str, Any]:
        """The bias reducers (Sample-K, Rand-block) only matter while training; at inference the
        reader spends the same read budget (top + sampled clusters + random blocks of about a
        leaf each) on its best clusters."""
        if training:
            return super().kwargs(training)
        return {"top_clusters": self.top_clusters + self.sample_clusters + self.rand_blocks,
                "sample_clusters": 0, "rand_blocks": 0, "temperature": self.temperature,
                "scan": self.scan, "rerank": self.rerank}


@dataclass(frozen=True)
class PCATreeParams(ReaderParams):
    """PCA-Tree (Bachrach et al. 2014; `hmn.baselines.PCATreeReader`)."""

    depth: int = _param("pca_depth", 8, "pca-tree reader: tree depth (2^depth leaves, Bachrach "
                        "et al. 2014)")
    probes: int = _param("pca_probes", 1, "pca-tree reader: leaves read per question (1 = own "
                         "leaf; more = the leaves behind the narrowest splits)")
    seed: int = _baseline_seed()

    def problems(self) -> Iterator[tuple[str, str]]:
        if not 1 <= self.depth <= 20:
            yield "depth", "must be in [1, 20]"
        elif not 1 <= self.probes <= 2**self.depth:
            yield "probes", f"must be in [1, 2^pca_depth = {2**self.depth}]"


@dataclass(frozen=True)
class WTAHashParams(ReaderParams):
    """Winner-take-all hashing (Vijayanarasimhan et al. 2014; `hmn.baselines.WTAHashReader`)."""

    bands: int = _param("wta_bands", 16, "wta-hash reader: hash bands L (candidates collide in "
                        "any band)")
    perms: int = _param("wta_perms", 4, "wta-hash reader: permutations K per band")
    window: int = _param("wta_window", 8, "wta-hash reader: coordinates compared per permutation "
                         "(>= 2)")
    seed: int = _baseline_seed()

    def problems(self) -> Iterator[tuple[str, str]]:
        for name in ("bands", "perms"):
            if getattr(self, name) <= 0:
                yield name, "must be > 0"
        if self.window < 2:
            yield "window", "must be >= 2"
        elif self.window**self.perms >= 2**62:
            yield "perms", f"wta_window ** wta_perms must fit 62 bits (wta_window={self.window})"


@dataclass(frozen=True)
class FaissIVFParams(ReaderParams):
    """``faiss.IndexIVFFlat`` with inner product (`hmn.baselines.FaissIVFReader`)."""

    nlist: int = _param("ivf_nlist", 128, "faiss-ivf reader: inverted lists of "
                        "faiss.IndexIVFFlat (inner product)")
    nprobe: int = _param("ivf_nprobe", 8, "faiss-ivf reader: lists scanned per question "
                         "(<= ivf_nlist)")
    seed: int = _baseline_seed()

    def problems(self) -> Iterator[tuple[str, str]]:
        if self.nlist <= 0:
            yield "nlist", "must be > 0"
        if self.nprobe <= 0:
            yield "nprobe", "must be > 0"
        elif self.nprobe > self.nlist:
            yield "nprobe", f"must be <= reader.ivf_nlist ({self.nlist})"


@dataclass(frozen=True)
class ReaderEntry:
    """A registered reader: its class as ``"module:Class"`` and its params type."""

    target: str
    params: type[ReaderParams] = ReaderParams

    def config_name(self, param: str) -> str:
        """The ``reader`` config field of parameter ``param``."""
        return next(f.metadata["config"] for f in fields(self.params) if f.name == param)

    def from_config(self, section: Any) -> ReaderParams:
        """The reader's params, read from the flat ``reader`` config section."""
        return self.params(**{f.name: getattr(section, f.metadata["config"])
                              for f in fields(self.params)})


READERS: dict[str, ReaderEntry] = {
    "exact": ReaderEntry("hmn.readers:ExactReader"),
    "clustered": ReaderEntry("hmn.readers:ClusteredReader", ClusteredParams),
    "pca-tree": ReaderEntry("hmn.baselines:PCATreeReader", PCATreeParams),
    "wta-hash": ReaderEntry("hmn.baselines:WTAHashReader", WTAHashParams),
    "faiss-ivf": ReaderEntry("hmn.baselines:FaissIVFReader", FaissIVFParams),
}
READER_NAMES = tuple(READERS)


def reader_entry(name: str) -> ReaderEntry:
    """The registry entry of reader ``name``; an unknown name lists the known ones."""
    if name not in READERS:
        raise ValueError(f"unknown reader {name!r}; known readers: {sorted(READERS)}")
    return READERS[name]


def reader_class(name: str) -> type:
    """The class of reader ``name``, imported on first use."""
    module, _, attr = reader_entry(name).target.partition(":")
    return getattr(importlib.import_module(module), attr)


class ConfigField(typing.NamedTuple):
    """One field of the flat ``reader`` config section."""

    name: str
    type: type
    default: Any
    help: str
    stable: bool = False


def config_fields() -> list[ConfigField]:
    """The ``reader`` config fields every registered reader declares: each reader's own fields
    in registry order, then the fields several readers share. A shared field must be declared
    with the same type, default and help by every reader that has it."""
    found: dict[str, ConfigField] = {}
    users: dict[str, int] = {}
    for entry in READERS.values():
        hints = typing.get_type_hints(entry.params)
        for f in fields(entry.params):
            name = f.metadata["config"]
            declared = ConfigField(name, hints[f.name], f.default, f.metadata["help"],
                                   f.metadata.get("stable", False))
            if found.setdefault(name, declared) != declared:
                raise TypeError(f"reader.{name} is declared differently by two readers: "
                                f"{found[name]} and {declared}")
            users[name] = users.get(name, 0) + 1
    own = [c for c in found.values() if users[c.name] == 1]
    return own + [c for c in found.values() if users[c.name] > 1]

