"""Memories of the real SQ-32k facts plus distractors, named by size, in the original formats.

``build_memory`` writes, into one folder:

* ``kb.txt``: grouped facts ``subject<TAB>relation<TAB>obj1 obj2 ...`` with
  ``www.freebase.com/...`` keys: first ``simplequestions/kb.txt`` byte for byte, then (sizes from
  ``131k``) every FB15k-237 fact (train + valid + test grouped by (head, relation), objects
  sorted) whose (subject, relation) pair is not already a kb.txt fact, then (sizes from ``1m``)
  generated distractor facts up to the size;
* ``names.tsv``: ``entity<TAB>name``: ``simplequestions/names.tsv`` byte for byte, then the
  FB15k-237 names of the FB15k-237 entities it does not name, then one name per distractor
  entity;
* ``questions_train.txt``, ``questions_dev.txt``: the real question files, byte for byte;
* ``realism.json``: :func:`_realism` (relation overlap, homonym shares, degrees, counts, and the
  ambiguity ceiling of the dev questions).

A kb.txt fact whose (subject, relation) pair FB15k-237 also has keeps its kb.txt line unchanged:
the FB15k-237 objects it lacks are not added (counted in ``realism.json`` as
``fb15k_pairs_in_kb`` and ``fb15k_objects_not_added``).

Distractors (see :class:`ScalingSpec`, the ``scaling`` config section):

* each distractor subject copies the relations, and the object count of each, of a *template*:
  a real subject drawn uniformly, so that the distractor relation distribution is the real
  fact-weighted one in expectation, the facts per subject follow the real (heavy-tailed)
  distribution, and relations that co-occur on a real subject co-occur on a distractor;
* each object is, with probability ``real_object_share``, an object that the template
  relation has in the real facts (a real entity of the right kind), else a distractor entity
  drawn with a preference for early ids (a heavy-tailed in-degree);
* ``homonym_share`` of the real kb.txt subjects (drawn among the named ones) get
  Geometric(``homonym_p``) distractor namesakes (at least 1, mean 1 / p); each namesake takes
  its real subject as template with probability ``homonym_same_template`` (and so carries a
  fact with each of its relations), else a random one; other distractor names are 1-6 words
  drawn from the words of the real names with their frequencies, the word count distributed as
  in the real names;
* distractor entities get keys ``www.freebase.com/m/0a`` + 6 characters: Freebase machine ids
  contain no vowel, so no real key can collide (checked on load), and 8 characters after
  ``/m/`` keep the ingest on its fast path (:func:`hmn.ids.window_ids`).

Distractors are drawn and written ``_CHUNK_SUBJECTS`` subjects at a time, each chunk from its
own seeded stream, so memory stays bounded by a chunk and the same seed gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections import defaultdict
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hmn.config import SCALING_SIZES, ScalingConfig
from hmn.formats.keys import normalize_keys
from hmn.synthetic import _write_lines

logger = logging.getLogger(__name__)

__all__ = ["SIZES", "ScalingSpec", "Sources", "build_memory", "main"]

SIZES = SCALING_SIZES  # memory sizes in facts; None = the real facts alone
_PREFIX = "www.freebase.com"  # kb.txt's spelling: _PREFIX + canonical key
_RESERVED = "/m/0a"  # distractor entity keys: _RESERVED + 6 of _ALPHABET (no real mid has a vowel)
_ALPHABET = np.frombuffer(b"0123456789bcdfghjklmnpqrstvwxyz_", dtype=np.uint8)
_DIGITS = 6
_CHUNK_SUBJECTS = 100_000  # distractor subjects per chunk (fixed: the bytes do not depend on RAM)
_MAX_NAME_WORDS = 6


@dataclass(frozen=True)
class ScalingSpec(ScalingConfig):
    """What to build: the ``scaling`` config section (`hmn.config.ScalingConfig`: the size, the
    facts, the seed, the real data's folder and the distractor generator's settings); the
    generator has no knob of its own."""

    @classmethod
    def from_config(cls, config: ScalingConfig) -> ScalingSpec:
        """The spec of a ``scaling`` config section."""
        return cls(**{f.name: getattr(config, f.name) for f in fields(config)})

    def with_fb15k(self) -> bool:
        """FB15k-237 joins the memory from 131k, and whenever ``facts`` sets the size."""
        return self.size != "29k" or self.facts > 0


@dataclass(frozen=True)
class Sources:
    """The real input files."""

    kb: str
    names: str
    questions_train: str
    questions_dev: str
    fb15k: tuple[str, ...]
    fb15k_names: str

    def files(self, with_fb15k: bool) -> tuple[str, ...]:
        """Every file `build_memory` reads (FB15k-237's only ``with_fb15k``)."""
        real = (self.kb, self.names, self.questions_train, self.questions_dev)
        return real + (self.fb15k + (self.fb15k_names,) if with_fb15k else ())

    @classmethod
    def from_data_dir(cls, data: str) -> Sources:
        """The files of ``data/simplequestions`` and ``data/fb15k-237``."""
        sq, fb = Path(data) / "simplequestions", Path(data) / "fb15k-237"
        return cls(str(sq / "kb.txt"), str(sq / "names.tsv"), str(sq / "questions_train.txt"),
                   str(sq / "questions_dev.txt"),
                   tuple(str(fb / f"{s}.txt") for s in ("train", "valid", "test")),
                   str(fb / "names.tsv"))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# the real facts
# ---------------------------------------------------------------------------------------------


@dataclass
class _Real:
    """The real facts as arrays: F facts, E entities (sorted canonical keys), R relations."""

    kb_bytes: bytes  # kb.txt as it is
    extra_lines: list[str]  # FB15k-237 grouped lines in kb.txt's spelling
    names_bytes: bytes  # names.tsv as it is plus the FB15k-237 names lines
    entity_keys: list[str]  # (E,) canonical
    relation_keys: list[str]  # (R,) canonical
    fact_subj: np.ndarray  # (F,) entity index, facts sorted by subject
    fact_rel: np.ndarray  # (F,)
    fact_nobj: np.ndarray  # (F,) objects per fact
    fact_in_kb: np.ndarray  # (F,) bool: a kb.txt fact
    objs: np.ndarray  # (sum nobj,) entity index, grouped by fact
    names: dict[int, str]  # entity index -> name
    stats: dict[str, int]


def _read_tsv(path: str, columns: int) -> list[list[str]]:
    with open(path, encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    bad = [i for i, r in enumerate(rows) if len(r) != columns]
    if bad:
        raise ValueError(f"{path}: line {bad[0] + 1} does not have {columns} tab-separated fields")
    return rows


def _canonical(keys: list[str], path: str) -> list[str]:
    out = normalize_keys(pa.array(keys, pa.string()))
    if out.null_count:
        bad = keys[pc.index(pc.is_null(out), True).as_py()]
        raise ValueError(f"{path}: invalid Freebase key {bad!r}")
    return out.to_pylist()


def _load_real(sources: Sources, with_fb15k: bool) -> _Real:
    """kb.txt (+ FB15k-237) as :class:`_Real`; raises when a real key uses the reserved range."""
    kb_bytes = Path(sources.kb).read_bytes()
    if kb_bytes and not kb_bytes.endswith(b"\n"):
        kb_bytes += b"\n"
    rows = _read_tsv(sources.kb, 3)
    subj = _canonical([r[0] for r in rows], sources.kb)
    rel = _canonical([r[1] for r in rows], sources.kb)
    obj_lists = [r[2].split(" ") for r in rows]
    flat = _canonical([o for ol in obj_lists for o in ol], sources.kb)
    facts: dict[tuple[str, str], tuple[list[str], bool]] = {}
    pos = 0
    for s, r, ol in zip(subj, rel, obj_lists):
        objs = flat[pos : pos + len(ol)]
        pos += len(ol)
        old = facts.get((s, r))
        facts[(s, r)] = ((old[0] if old else []) + [o for o in objs if not old or o not in old[0]],
                         True)  # fmt: skip
    stats = {"kb_lines": len(rows), "kb_facts": len(facts), "fb15k_facts": 0,
             "fb15k_pairs_in_kb": 0, "fb15k_objects_not_added": 0}  # fmt: skip
    extra_lines: list[str] = []
    fb_names: dict[str, str] = {}
    if with_fb15k:
        extra_lines = _add_fb15k(sources, facts, stats)
        rows = _read_tsv(sources.fb15k_names, 2)  # a key that is not valid names nothing
        keys = normalize_keys(pa.array([k for k, _ in rows], pa.string())).to_pylist()
        fb_names = {k: v for k, (_, v) in zip(keys, rows) if k is not None}
    return _arrays(sources, kb_bytes, extra_lines, facts, fb_names, stats)


def _add_fb15k(sources: Sources, facts: dict, stats: dict[str, int]) -> list[str]:
    """Group the FB15k-237 triples into ``facts`` (pairs kb.txt has keep kb.txt's objects);
    returns the new facts' lines in kb.txt's spelling, sorted by (subject, relation)."""
    grouped: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in sources.fb15k:
        rows = _read_tsv(path, 3)
        keys = _canonical([k for r in rows for k in r], path)
        for i in range(0, len(keys), 3):
            objs = grouped[(keys[i], keys[i + 1])]
            if keys[i + 2] not in objs:
                objs.append(keys[i + 2])
    stats["fb15k_facts"] = len(grouped)
    lines = []
    for (s, r), objs in sorted(grouped.items()):
        objs = sorted(objs)
        if (s, r) in facts:
            stats["fb15k_pairs_in_kb"] += 1
            stats["fb15k_objects_not_added"] += len(set(objs) - set(facts[(s, r)][0]))
            continue
        facts[(s, r)] = (objs, False)
        lines.append(f"{_PREFIX}{s}\t{_PREFIX}{r}\t" + " ".join(_PREFIX + o for o in objs))
    return lines


def _arrays(sources: Sources, kb_bytes: bytes, extra_lines: list[str], facts: dict,
            fb_names: dict[str, str], stats: dict[str, int]) -> _Real:  # fmt: skip
    """Index the facts (sorted by subject, relation) and the names."""
    pairs = sorted(facts)
    entity_keys = sorted({s for s, _ in pairs} | {o for p in pairs for o in facts[p][0]})
    bad = [k for k in entity_keys if k.startswith(_RESERVED)]
    if bad:
        raise ValueError(f"real key {bad[0]!r} is in the distractors' reserved range {_RESERVED}")
    relation_keys = sorted({r for _, r in pairs})
    e_id = {k: i for i, k in enumerate(entity_keys)}
    r_id = {k: i for i, k in enumerate(relation_keys)}
    objs = [facts[p][0] for p in pairs]
    names_rows = _read_tsv(sources.names, 2)
    sq_keys = _canonical([k for k, _ in names_rows], sources.names) if names_rows else []
    names: dict[int, str] = {}
    for k, v in zip(sq_keys, (v for _, v in names_rows)):
        if k in e_id:
            names.setdefault(e_id[k], v)
    names_bytes = Path(sources.names).read_bytes()
    if names_bytes and not names_bytes.endswith(b"\n"):
        names_bytes += b"\n"
    sq_named = set(sq_keys)
    fb_lines = []
    for k in sorted(fb_names):
        if k in e_id and k not in sq_named:
            names[e_id[k]] = fb_names[k]
            fb_lines.append(f"{_PREFIX}{k}\t{fb_names[k]}\n")
    return _Real(
        kb_bytes=kb_bytes, extra_lines=extra_lines,
        names_bytes=names_bytes + "".join(fb_lines).encode("utf-8"),
        entity_keys=entity_keys, relation_keys=relation_keys,
        fact_subj=np.array([e_id[s] for s, _ in pairs], dtype=np.int64),
        fact_rel=np.array([r_id[r] for _, r in pairs], dtype=np.int64),
        fact_nobj=np.array([len(o) for o in objs], dtype=np.int64),
        fact_in_kb=np.array([facts[p][1] for p in pairs], dtype=bool),
        objs=np.array([e_id[o] for ol in objs for o in ol], dtype=np.int64),
        names=names, stats=stats,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# distractors
# ---------------------------------------------------------------------------------------------


class _Model:
    """What the distractors are drawn from: real subjects as templates, real objects per
    relation, the words of the real names."""

    def __init__(self, real: _Real, seed: int) -> None:
        self.real = real
        F = len(real.fact_subj)
        self.subjects, self.subj_start, self.subj_deg = np.unique(
            real.fact_subj, return_index=True, return_counts=True
        )  # (S,) real subjects; their facts are fact_subj[start : start + deg]
        obj_rel = np.repeat(real.fact_rel, real.fact_nobj)  # (sum nobj,)
        order = np.argsort(obj_rel, kind="stable")
        self.rel_objs = real.objs[order]  # real objects grouped by relation
        R = len(real.relation_keys)
        self.rel_obj_count = np.bincount(obj_rel, minlength=R)
        self.rel_obj_start = np.concatenate([[0], np.cumsum(self.rel_obj_count)[:-1]])
        self.rel_keys = pa.array([_PREFIX + k for k in real.relation_keys], pa.string())
        self.rel_canon = pa.array(real.relation_keys, pa.string())
        self.entity_keys = pa.array([_PREFIX + k for k in real.entity_keys], pa.string())
        words: dict[str, int] = defaultdict(int)
        lengths = np.zeros(_MAX_NAME_WORDS + 1, dtype=np.float64)
        for name in real.names.values():
            parts = [w for w in name.split(" ") if w]
            for w in parts:
                words[w] += 1
            lengths[min(max(len(parts), 1), _MAX_NAME_WORDS)] += 1
        if not words:
            raise ValueError("the real names have no words to build distractor names from")
        vocab = sorted(words)
        self.words = pa.array(vocab, pa.string())
        counts = np.array([words[w] for w in vocab], dtype=np.float64)
        self.word_cum = np.cumsum(counts) / counts.sum()
        self.length_p = lengths / lengths.sum()
        self.n_facts = F

    def draw_names(self, rng: np.random.Generator, n: int) -> pa.Array:
        """``n`` names of 1-6 words of the real names, by their frequencies."""
        k = rng.choice(len(self.length_p), size=n, p=self.length_p)  # (n,) words per name
        u = rng.random((n, _MAX_NAME_WORDS))
        idx = np.minimum(np.searchsorted(self.word_cum, u, side="right"), len(self.words) - 1)
        cols = [self.words.take(pa.array(idx[:, j], mask=j >= k)) for j in range(_MAX_NAME_WORDS)]
        return pc.binary_join_element_wise(*cols, " ", null_handling="skip")


def _distractor_keys(ids: np.ndarray) -> pa.Array:
    """``www.freebase.com/m/0a`` + 6 characters for distractor entity ids (< 32^6)."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) and int(ids.max()) >= 32**_DIGITS:
        raise ValueError(f"{int(ids.max()) + 1} distractor entities: more than the reserved "
                         f"range holds ({32**_DIGITS})")
    head = np.frombuffer((_PREFIX + _RESERVED).encode(), dtype=np.uint8)
    width = len(head) + _DIGITS
    mat = np.empty((len(ids), width), dtype=np.uint8)
    mat[:, : len(head)] = head
    for j in range(_DIGITS):
        mat[:, width - 1 - j] = _ALPHABET[(ids >> (5 * j)) & 31]
    arr = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(ids),
                                               [None, pa.py_buffer(mat)])  # fmt: skip
    return arr.cast(pa.binary()).cast(pa.string())


@dataclass
class _Chunk:
    """One chunk of distractors: lines to write and what the realism tally needs."""

    kb_lines: pa.Array
    names_lines: pa.Array
    rel: np.ndarray  # (facts,) relation index
    degree: np.ndarray  # (subjects,)
    fact_subj: np.ndarray  # (facts,) distractor id
    subject_names: pa.Array  # (facts,) the subject's name per fact
    entity_names: pa.Array  # names of the chunk's new entities
    distractor_objects: np.ndarray  # (objects that are distractors,) ids
    objects: int
    entities: int


def _facts_of(model: _Model, templates: np.ndarray, budget: int):
    """Facts copied from the template subjects, cut after ``budget`` facts: (template index of
    each fact, degree of each kept subject)."""
    deg = model.subj_deg[templates]
    end = np.cumsum(deg)
    keep = int(np.searchsorted(end, budget, side="left")) + 1  # subjects needed to reach budget
    keep = min(keep, len(deg))
    deg = deg[:keep].copy()
    if keep and end[keep - 1] > budget:
        deg[-1] -= end[keep - 1] - budget
    starts = np.repeat(model.subj_start[templates[:keep]], deg)  # (facts,)
    within = np.arange(int(deg.sum())) - np.repeat(np.cumsum(deg) - deg, deg)
    return starts + within, deg


def _objects_of(model: _Model, spec: ScalingSpec, rng: np.random.Generator, rel: np.ndarray,
                nobj: np.ndarray, subj: np.ndarray, pool_end: int):  # fmt: skip
    """Objects of the distractor facts: ``(offsets (facts + 1,), real index or -1, distractor
    id or -1)``, each fact's objects distinct and sorted (real before distractor)."""
    slot_fact = np.repeat(np.arange(len(rel)), nobj)  # (slots,)
    slot_rel = rel[slot_fact]
    pick = (rng.random(len(slot_fact)) * model.rel_obj_count[slot_rel]).astype(np.int64)
    real = model.rel_objs[model.rel_obj_start[slot_rel] + pick]  # (slots,) of the relation
    dis = (pool_end * rng.random(len(slot_fact)) ** 2).astype(np.int64)  # early ids preferred
    use_real = (rng.random(len(slot_fact)) < spec.real_object_share) | (dis == subj[slot_fact])
    E = len(model.real.entity_keys)
    code = np.where(use_real, real, E + dis)
    packed = np.unique(slot_fact.astype(np.int64) * (E + pool_end + 1) + code)
    fact_of = packed // (E + pool_end + 1)
    code = packed - fact_of * (E + pool_end + 1)
    offsets = np.concatenate([[0], np.cumsum(np.bincount(fact_of, minlength=len(rel)))])
    return offsets, np.where(code < E, code, -1), np.where(code >= E, code - E, -1)


def _chunk(model: _Model, spec: ScalingSpec, rng: np.random.Generator, templates: np.ndarray,
           names: pa.Array | None, first_id: int, budget: int) -> _Chunk:  # fmt: skip
    """Distractor subjects ``first_id, first_id + 1, ...`` copying ``templates`` (real subject
    positions) until ``budget`` facts, named ``names`` (drawn when None), and their new
    object-only entities."""
    src, deg = _facts_of(model, templates, budget)
    n = len(deg)
    real = model.real
    rel, nobj = real.fact_rel[src], real.fact_nobj[src]
    subj = first_id + np.repeat(np.arange(n), deg)  # (facts,)
    n_only = int(round(n * spec.object_only_per_subject))
    pool_end = first_id + n + n_only
    offsets, real_obj, dis_obj = _objects_of(model, spec, rng, rel, nobj, subj, pool_end)
    names = model.draw_names(rng, n) if names is None else names.slice(0, n)
    only_names = model.draw_names(rng, n_only)
    is_real = real_obj >= 0
    order = np.empty(len(real_obj), dtype=np.int64)  # real keys first, then distractor keys
    order[is_real] = np.arange(int(is_real.sum()))
    order[~is_real] = int(is_real.sum()) + np.arange(int((~is_real).sum()))
    obj_keys = pa.concat_arrays([model.entity_keys.take(pa.array(real_obj[is_real])),
                                 _distractor_keys(dis_obj[~is_real])]).take(pa.array(order))
    obj_lists = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), obj_keys)
    kb_lines = pc.binary_join_element_wise(
        _distractor_keys(subj), model.rel_keys.take(pa.array(rel)), pc.binary_join(obj_lists, " "),
        "\t",
    )
    entity_names = pa.concat_arrays([names, only_names])
    names_lines = pc.binary_join_element_wise(
        _distractor_keys(np.arange(first_id, pool_end)), entity_names, "\t"
    )
    subject_names = names.take(pa.array(subj - first_id))
    return _Chunk(kb_lines, names_lines, rel, deg, subj, subject_names, entity_names,
                  dis_obj[~is_real], int(offsets[-1]), n + n_only)  # fmt: skip


def _homonyms(model: _Model, spec: ScalingSpec, rng: np.random.Generator):
    """``(templates, names)`` of the namesakes of ``homonym_share`` of the real kb.txt subjects
    (drawn among the named ones)."""
    real = model.real
    kb_subjects = np.unique(real.fact_subj[real.fact_in_kb])
    named = np.array([s for s in kb_subjects.tolist() if s in real.names], dtype=np.int64)
    want = min(int(round(spec.homonym_share * len(kb_subjects))), len(named))
    chosen = np.sort(rng.choice(named, size=want, replace=False)) if want else named[:0]
    copies = rng.geometric(spec.homonym_p, size=len(chosen))  # (chosen,) >= 1
    of = np.repeat(chosen, copies)  # (namesakes,) the real subject each is named after
    position = np.searchsorted(model.subjects, of)  # template = that subject ...
    other = rng.integers(0, len(model.subjects), size=len(of))  # ... or a random one
    templates = np.where(rng.random(len(of)) < spec.homonym_same_template, position, other)
    names = pa.array([real.names[s] for s in of.tolist()], pa.string())
    return templates, names


def _chunks(model: _Model, spec: ScalingSpec, budget: int):
    """Every distractor chunk in order: the namesakes, then subjects with drawn names (none
    when ``budget`` is 0)."""
    if budget <= 0:
        return
    streams = (np.random.default_rng(np.random.SeedSequence(spec.seed, spawn_key=(i,)))
               for i in range(1 << 30))  # fmt: skip
    templates, names = _homonyms(model, spec, next(streams))
    homonym_facts = int(model.subj_deg[templates].sum())
    if homonym_facts > budget:
        raise ValueError(f"scaling: {budget} distractor facts cannot hold the {homonym_facts} "
                         f"facts of the namesakes; raise the size")
    next_id = 0
    for lo in range(0, len(templates), _CHUNK_SUBJECTS):
        part = templates[lo : lo + _CHUNK_SUBJECTS]
        chunk = _chunk(model, spec, next(streams), part, names.slice(lo, len(part)), next_id,
                       budget)  # fmt: skip
        budget -= len(chunk.rel)
        next_id += chunk.entities
        yield chunk
    while budget > 0:
        rng = next(streams)
        part = rng.integers(0, len(model.subjects), size=_CHUNK_SUBJECTS)
        chunk = _chunk(model, spec, rng, part, None, next_id, budget)
        budget -= len(chunk.rel)
        next_id += chunk.entities
        yield chunk


# ---------------------------------------------------------------------------------------------
# realism
# ---------------------------------------------------------------------------------------------


class _Tally:
    """Realism figures accumulated over the real facts and the distractor chunks."""

    def __init__(self, model: _Model, dev_path: str) -> None:
        real = model.real
        self.model = model
        R = len(real.relation_keys)
        self.rel_counts = np.zeros(R, dtype=np.int64)
        self.deg_hist = np.zeros(1, dtype=np.int64)
        self.facts = self.objects = self.entities = 0
        self.used = np.zeros(0, dtype=bool)  # (distractor ids,) in a fact
        kb_facts = np.flatnonzero(real.fact_in_kb)
        self.kb_pairs = sorted({(int(real.fact_subj[f]), int(real.fact_rel[f])) for f in kb_facts})
        self.kb_names = pa.array(sorted({real.names[s] for s, _ in self.kb_pairs
                                         if s in real.names}), pa.string())  # fmt: skip
        self.kb_name_rel = pa.array(sorted({f"{real.names[s]}\t{real.relation_keys[r]}"
                                            for s, r in self.kb_pairs if s in real.names}),
                                    pa.string())  # fmt: skip
        self.matched_names: set[str] = set()
        self.matched_pairs: set[str] = set()
        rows = _read_tsv(dev_path, 4)
        self.dev = list(zip(_canonical([r[0] for r in rows], dev_path),
                            _canonical([r[1] for r in rows], dev_path)))  # fmt: skip
        e_id = {k: i for i, k in enumerate(real.entity_keys)}
        dev_pairs = set()
        self.dev_pair_of = []
        for s, r in self.dev:
            name = real.names.get(e_id.get(s, -1))
            pair = None if name is None else f"{name}\t{r}"
            self.dev_pair_of.append(pair)
            if pair is not None:
                dev_pairs.add(pair)
        self.dev_pairs = pa.array(sorted(dev_pairs), pa.string())
        self.dev_subjects: dict[str, set] = defaultdict(set)
        for f in range(len(real.fact_subj)):  # the real facts' (name, relation) pairs
            s = int(real.fact_subj[f])
            if s in real.names:
                pair = f"{real.names[s]}\t{real.relation_keys[real.fact_rel[f]]}"
                if pair in dev_pairs:
                    self.dev_subjects[pair].add(("real", s))

    def add(self, chunk: _Chunk) -> None:
        m = self.model
        self.rel_counts += np.bincount(chunk.rel, minlength=len(self.rel_counts))
        hist = np.bincount(chunk.degree)
        if len(hist) > len(self.deg_hist):
            hist[: len(self.deg_hist)] += self.deg_hist
            self.deg_hist = hist
        else:
            self.deg_hist[: len(hist)] += hist
        self.facts += len(chunk.rel)
        self.objects += chunk.objects
        self.entities += chunk.entities
        if len(self.used) < self.entities:
            self.used = np.concatenate([self.used, np.zeros(self.entities - len(self.used), bool)])
        self.used[chunk.fact_subj] = True
        self.used[chunk.distractor_objects] = True
        hit = pc.is_in(chunk.entity_names, value_set=self.kb_names)
        self.matched_names.update(pc.unique(chunk.entity_names.filter(hit)).to_pylist())
        rel_names = m.rel_canon.take(pa.array(chunk.rel))
        pairs = pc.binary_join_element_wise(chunk.subject_names, rel_names, "\t")
        hit = pc.is_in(pairs, value_set=self.kb_name_rel)
        self.matched_pairs.update(pc.unique(pairs.filter(hit)).to_pylist())
        hit = pc.is_in(pairs, value_set=self.dev_pairs).to_numpy(zero_copy_only=False)
        for pair, subj in zip(pairs.filter(pa.array(hit)).to_pylist(),
                              chunk.fact_subj[hit].tolist()):  # fmt: skip
            self.dev_subjects[pair].add(("distractor", subj))

    def realism(self, real_present: int) -> dict[str, Any]:
        real = self.model.real
        real_counts = np.bincount(real.fact_rel, minlength=len(self.rel_counts))
        p = real_counts / real_counts.sum()
        dis = None
        if self.facts:
            q = self.rel_counts / self.facts
            dis = {"share_with_real_relation": 1.0,  # drawn from the real relations only
                   "total_variation_vs_real": round(float(0.5 * np.abs(p - q).sum()), 6),
                   "relations_used": int((self.rel_counts > 0).sum())}  # fmt: skip
        kb_subjects = sorted({s for s, _ in self.kb_pairs})
        rels_of = defaultdict(list)
        for s, r in self.kb_pairs:
            rels_of[s].append(real.relation_keys[r])
        shared = [s for s in kb_subjects if real.names.get(s) in self.matched_names]
        same = [s for s in shared
                if any(f"{real.names[s]}\t{r}" in self.matched_pairs for r in rels_of[s])]
        unique = sum(1 for pair in self.dev_pair_of
                     if pair is not None and len(self.dev_subjects.get(pair, ())) == 1)
        real_deg = np.bincount(real.fact_subj)
        real_deg = real_deg[real_deg > 0]
        n_real_entities = len(real.entity_keys)
        return {
            "counts": {
                "facts": len(real.fact_subj) + self.facts, "real_facts": len(real.fact_subj),
                "real_facts_present": real_present, "distractor_facts": self.facts,
                "entities": n_real_entities + int(self.used.sum()),
                "real_entities": n_real_entities, "distractor_entities": int(self.used.sum()),
                "distractor_names": self.entities, "relations": len(real.relation_keys),
                "objects": int(real.fact_nobj.sum()) + self.objects,
                **real.stats,
            },
            "relations": dis,
            "homonyms": {
                "real_kb_subjects": len(kb_subjects),
                "named_real_kb_subjects": sum(1 for s in kb_subjects if s in real.names),
                "shared_with_distractor": len(shared),
                "share": round(len(shared) / max(len(kb_subjects), 1), 4),
                "with_same_relation_fact": len(same),
                "same_relation_share": round(len(same) / max(len(shared), 1), 4),
            },
            "degree": {"real": _degree_summary(np.bincount(real_deg)),
                       "distractor": _degree_summary(self.deg_hist) if self.facts else None},
            "ambiguity_ceiling": {
                "dev_questions": len(self.dev), "unique_name_relation": unique,
                "share": round(unique / max(len(self.dev), 1), 4),
                "gold_subject_unnamed": sum(1 for p in self.dev_pair_of if p is None),
            },
        }  # fmt: skip


def _degree_summary(hist: np.ndarray) -> dict[str, float]:
    """Facts per subject from a histogram (hist[d] = subjects with d facts)."""
    hist = hist.astype(np.int64)
    hist[0] = 0
    n = int(hist.sum())
    cum = np.cumsum(hist)
    d = np.arange(len(hist))

    def q(x: float) -> int:
        return int(np.searchsorted(cum, x * n, side="left"))

    return {"subjects": n, "mean": round(float((d * hist).sum() / max(n, 1)), 3),
            "median": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": int(d[hist > 0].max())}


# ---------------------------------------------------------------------------------------------
# the builder
# ---------------------------------------------------------------------------------------------


def build_memory(spec: ScalingSpec, sources: Sources, out_dir: str) -> dict[str, Any]:
    """Write the memory of ``spec`` into ``out_dir`` (see module docstring); returns the
    contents of ``realism.json``."""
    spec.validate()
    real = _load_real(sources, spec.with_fb15k())
    model = _Model(real, spec.seed)
    tally = _Tally(model, sources.questions_dev)
    target = spec.target_facts()
    budget = 0 if target is None else target - len(real.fact_subj)
    if budget < 0:
        raise ValueError(f"scaling: {target} facts is fewer than the {len(real.fact_subj)} "
                         "real facts")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kb_path, names_path = out / "kb.txt", out / "names.tsv"
    tmp = {p: Path(f"{p}.tmp-{os.getpid()}") for p in (kb_path, names_path)}
    real_block = real.kb_bytes + "".join(line + "\n" for line in real.extra_lines).encode()
    try:
        with open(tmp[kb_path], "wb") as kb_f, open(tmp[names_path], "wb") as names_f:
            kb_f.write(real_block)
            names_f.write(real.names_bytes)
            for chunk in _chunks(model, spec, budget):
                _write_lines(kb_f, chunk.kb_lines)
                _write_lines(names_f, chunk.names_lines)
                tally.add(chunk)
                logger.info("scaling: %d distractor facts written", tally.facts)
        for final, t in tmp.items():
            os.replace(t, final)
    finally:
        for t in tmp.values():
            t.unlink(missing_ok=True)
    for split in ("train", "dev"):
        shutil.copyfile(getattr(sources, f"questions_{split}"), out / f"questions_{split}.txt")
    with open(kb_path, "rb") as f:  # the real facts, read back from the file written
        present = hashlib.sha256(f.read(len(real_block))).digest()
    real_present = len(real.fact_subj) if present == hashlib.sha256(real_block).digest() else 0
    result = {"size": spec.size, "spec": asdict(spec), **tally.realism(real_present)}
    with open(out / "realism.json", "w") as f:
        json.dump(result, f, indent=2)
    return result


def main(argv: list[str] | None = None) -> int:
    """``python -m hmn.scaling --size 131k --data ../shared/data --out DIR [--seed 0]``"""
    import argparse
    import time

    parser = argparse.ArgumentParser(
        prog="python -m hmn.scaling",
        description="Write a memory of the real SQ-32k facts plus distractors (kb.txt, names.tsv, "
        "the real question files, realism.json).",
    )
    parser.add_argument("--size", required=True, choices=list(SIZES))
    parser.add_argument("--data", required=True, help="folder holding simplequestions/ and "
                        "fb15k-237/")  # fmt: skip
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    t0 = time.perf_counter()
    result = build_memory(ScalingSpec(size=args.size, seed=args.seed, data_dir=args.data),
                          Sources.from_data_dir(args.data), args.out)  # fmt: skip
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
