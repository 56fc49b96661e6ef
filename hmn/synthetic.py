"""Seeded synthetic knowledge base and questions in the original SimpleQuestions / FB2M formats.

The generator writes, into one folder:

* ``kb.txt``: grouped facts ``subject<TAB>relation<TAB>obj1 obj2 ...`` with
  ``www.freebase.com/m/...`` and ``www.freebase.com/<domain>/<type>/<property>`` keys;
* ``names.tsv``: ``entity<TAB>name``;
* ``questions_{train,dev,test}.txt``: ``subject<TAB>relation<TAB>object<TAB>question``.

Realism, loosely modelled on SimpleQuestions over FB2M:

* every entity has a type (person, location, film, ...); a relation links a subject type to an
  object type, and keys look like Freebase's (``people/person/place_of_birth``); when more
  relations are asked for than the built-in catalogue holds, extra ones are made from word pools;
* subject and object popularity follow a Zipf law (exponent ``zipf_exponent``), so subject degrees
  are heavy-tailed; each (subject, relation) pair appears once; a fact has 1..``max_objects``
  objects, about 1.2 on average;
* names are 1-3 pronounceable pseudo-words from a syllable generator; a fraction
  ``name_ambiguity`` of the named entities share their name with 1-3 other entities;
* a question asks for one fact (answer = one of its objects) through one of several templates of
  its relation ("where was {name} born", "what is the place of birth of {name}", "{name}'s place of
  birth"), with random casing and punctuation. Dev/test questions ask about facts that may or may
  not have a training question; many facts have no question at all.

Everything is vectorised with numpy / pyarrow and the files are written in chunks of
``chunk_rows`` lines, so no Python list grows with the number of facts. The same spec gives
byte-identical files.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hmn.config import SyntheticConfig

logger = logging.getLogger(__name__)

__all__ = ["SyntheticSpec", "generate", "FILE_NAMES", "preset", "preset_names", "scaled_fb2m",
           "main"]

FILE_NAMES = {
    "kb": "kb.txt",
    "names": "names.tsv",
    "questions_train": "questions_train.txt",
    "questions_dev": "questions_dev.txt",
    "questions_test": "questions_test.txt",
}

_PREFIX = "www.freebase.com/"
_MID_ALPHABET = "0123456789bcdfghjklmnpqrstvwxyz_"  # Freebase mid characters
_MID_DIGITS = 6

# (type key, share of entities)
_TYPES: list[tuple[str, float]] = [
    ("people/person", 0.22),
    ("location/location", 0.10),
    ("location/country", 0.01),
    ("music/artist", 0.06),
    ("music/album", 0.05),
    ("music/release", 0.05),
    ("music/genre", 0.01),
    ("film/film", 0.08),
    ("film/film_genre", 0.01),
    ("book/written_work", 0.06),
    ("tv/tv_program", 0.04),
    ("organization/organization", 0.05),
    ("sports/sports_team", 0.03),
    ("fictional_universe/fictional_character", 0.03),
    ("biology/organism_classification", 0.03),
    ("people/profession", 0.01),
    ("language/human_language", 0.01),
    ("common/topic", 0.05),
]
_TYPE_INDEX = {t: i for i, (t, _) in enumerate(_TYPES)}
_ANY_TYPE = len(_TYPES)  # pseudo type: every entity
# relations with these subject types apply to every entity (Freebase's common/topic, namesake)
_UNIVERSAL_SUBJECT_TYPES = {"common/topic", "symbols/namesake"}

# (subject type, property, object type, relation-specific templates)
_CATALOGUE: list[tuple[str, str, str, list[str]]] = [
    (
        "people/person",
        "place_of_birth",
        "location/location",
        [
            "where was {name} born",
            "what city was {name} born in",
            "which place is {name}'s birthplace",
        ],
    ),
    (
        "people/person",
        "place_of_death",
        "location/location",
        ["where did {name} die", "in what place did {name} pass away"],
    ),
    (
        "people/person",
        "nationality",
        "location/country",
        [
            "what country is {name} from",
            "what is {name}'s nationality",
            "which nation is {name} a citizen of",
        ],
    ),
    (
        "people/person",
        "profession",
        "people/profession",
        [
            "what does {name} do for a living",
            "what is {name}'s profession",
            "what kind of work does {name} do",
        ],
    ),
    (
        "people/person",
        "languages",
        "language/human_language",
        ["what language does {name} speak", "which language is spoken by {name}"],
    ),
    (
        "people/person",
        "ethnicity",
        "common/topic",
        ["what is the ethnicity of {name}", "what ethnic group does {name} belong to"],
    ),
    (
        "music/artist",
        "genre",
        "music/genre",
        [
            "what kind of music does {name} play",
            "what genre is {name}",
            "what style of music is {name} known for",
        ],
    ),
    (
        "music/artist",
        "track",
        "music/release",
        ["name a song by {name}", "what is a track recorded by {name}"],
    ),
    (
        "music/artist",
        "origin",
        "location/location",
        ["where is {name} from", "what city did the band {name} start in"],
    ),
    (
        "music/album",
        "artist",
        "music/artist",
        ["who recorded the album {name}", "which artist released {name}"],
    ),
    (
        "music/album",
        "genre",
        "music/genre",
        ["what genre is the album {name}", "what kind of album is {name}"],
    ),
    (
        "music/release",
        "region",
        "location/location",
        ["what is a region that {name} was released in", "where was {name} released"],
    ),
    (
        "music/genre",
        "parent_genre",
        "music/genre",
        ["what is the parent genre of {name}", "{name} is a subgenre of what"],
    ),
    (
        "film/film",
        "directed_by",
        "people/person",
        ["who directed {name}", "who was the director of {name}", "{name} was directed by whom"],
    ),
    (
        "film/film",
        "genre",
        "film/film_genre",
        ["what genre is the film {name}", "what type of movie is {name}"],
    ),
    (
        "film/film",
        "country",
        "location/country",
        ["which country produced {name}", "what country is the movie {name} from"],
    ),
    (
        "film/film",
        "language",
        "language/human_language",
        ["what language is {name} in", "what is the language of the film {name}"],
    ),
    (
        "film/film",
        "written_by",
        "people/person",
        ["who wrote the screenplay for {name}", "who is the writer of the movie {name}"],
    ),
    (
        "film/film_genre",
        "films_in_this_genre",
        "film/film",
        ["name a {name} film", "what is a movie in the {name} genre"],
    ),
    (
        "book/written_work",
        "author",
        "people/person",
        ["who wrote {name}", "who is the author of {name}"],
    ),
    (
        "book/written_work",
        "subjects",
        "common/topic",
        ["what is {name} about", "what subject does the book {name} cover"],
    ),
    (
        "location/location",
        "containedby",
        "location/location",
        ["where is {name} located", "what area contains {name}", "which region is {name} in"],
    ),
    (
        "location/location",
        "time_zones",
        "common/topic",
        ["what time zone is {name} in", "which time zone does {name} use"],
    ),
    (
        "location/country",
        "capital",
        "location/location",
        ["what is the capital of {name}", "which city is the capital of {name}"],
    ),
    (
        "location/country",
        "official_language",
        "language/human_language",
        ["what language is spoken in {name}", "what is the official language of {name}"],
    ),
    (
        "tv/tv_program",
        "genre",
        "common/topic",
        ["what genre is the tv show {name}", "what kind of show is {name}"],
    ),
    (
        "tv/tv_program",
        "country_of_origin",
        "location/country",
        ["what country is the show {name} from", "where was the tv program {name} made"],
    ),
    (
        "tv/tv_program",
        "program_creator",
        "people/person",
        ["who created the tv program {name}", "who is the creator of {name}"],
    ),
    (
        "organization/organization",
        "place_founded",
        "location/location",
        ["where was {name} founded", "in which city was {name} established"],
    ),
    (
        "organization/organization",
        "founders",
        "people/person",
        ["who founded {name}", "who started the organization {name}"],
    ),
    (
        "sports/sports_team",
        "location",
        "location/location",
        ["where is {name} based", "what city does {name} play in"],
    ),
    (
        "fictional_universe/fictional_character",
        "character_created_by",
        "people/person",
        ["who created the character {name}", "who invented {name}"],
    ),
    (
        "biology/organism_classification",
        "higher_classification",
        "biology/organism_classification",
        ["what is the parent taxon of {name}", "{name} belongs to which higher classification"],
    ),
    (
        "people/profession",
        "specialization_of",
        "people/profession",
        [
            "{name} is a specialization of which profession",
            "what is the broader profession of {name}",
        ],
    ),
    (
        "language/human_language",
        "countries_spoken_in",
        "location/country",
        ["where is {name} spoken", "in which country do people speak {name}"],
    ),
    (
        "common/topic",
        "notable_types",
        "common/topic",
        ["what type of thing is {name}", "what is {name} notable as"],
    ),
    (
        "symbols/namesake",
        "named_after",
        "people/person",
        ["who was {name} named after", "what is {name} named after"],
    ),
]

# Generic templates, instantiated per relation with {p} = property words, {t} = type words.
_GENERIC_TEMPLATES = [
    "what is the {p} of {name}",
    "{name}'s {p}",
    "what {p} does {name} have",
    "which {p} is associated with {name}",
    "name the {p} of the {t} {name}",
    "what is {name}'s {p}",
    "tell me the {p} of {name}",
]
_GENERIC_PER_RELATION = 3

# Word pool for extra relations beyond the catalogue.
_PROPERTY_WORDS = (
    "award nominations member founded location date category series episodes characters producer "
    "instrument league position coach school degree field subject currency religion parent "
    "children sibling influenced notable ingredients cuisine designer manufacturer owner operator "
    "architect style material event venue sponsor partner successor predecessor editor publisher "
    "label studio distributor region district origin mascot colors motto theme setting platform "
    "engine developer"
).split()

# Syllable inventory for pseudo-word names.
_ONSETS = (
    "b c d f g h j k l m n p r s t v w z br cr dr fr gr pr tr st sh ch th bl kl pl sl"
).split() + [""]
_NUCLEI = "a e i o u a e i o ai ea ou ie".split()
_CODAS = ["", "", "", "", "n", "r", "s", "l", "m", "t", "k", "nd"]


def _knob(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class SyntheticSpec(SyntheticConfig):
    """The generator's settings: the ``synthetic`` config section (`hmn.config.SyntheticConfig`:
    sizes, objects per fact, name ambiguity, seed, with their defaults) plus knobs that only the
    generator has (not in the run config, so not in its fingerprint)."""

    name_coverage: float = _knob(0.9, "fraction of the other KB entities (besides question "
                                 "subjects and answers) that get a name")
    zipf_exponent: float = _knob(1.0, "Zipf exponent of subject / object / relation popularity")
    chunk_rows: int = _knob(100_000, "lines per write chunk (bounds the memory of the string "
                            "building; the bytes do not depend on it)")

    @classmethod
    def from_config(cls, config: SyntheticConfig, **knobs: Any) -> SyntheticSpec:
        """The spec of a ``synthetic`` config section, with the generator's knobs (defaults
        unless given)."""
        return cls(**{f.name: getattr(config, f.name) for f in fields(config)}, **knobs)

    def problems(self, questions_needed: bool = False) -> Iterator[tuple[str, str]]:
        """As the config section's, except that a split may have no question."""
        yield from super().problems(questions_needed)
        if self.chunk_rows <= 0:
            yield "chunk_rows", "must be > 0"
        if not 0.0 <= self.name_coverage <= 1.0:
            yield "name_coverage", "must be in [0, 1]"
        if self.zipf_exponent < 0:
            yield "zipf_exponent", "must be >= 0"


#: the presets of ``python -m hmn.synthetic --preset``: the ``synthetic`` sections of the run
#: configs in this folder ("fb2m" and "fb5m" name "fb2m-synthetic" and "fb5m-synthetic")
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


def preset_names() -> list[str]:
    """Names of the run configs in `CONFIG_DIR` that have a ``synthetic`` section, with the
    short names of the ``-synthetic`` ones."""
    import yaml

    names = []
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        if "synthetic" in (yaml.safe_load(path.read_text()) or {}):
            names += [path.stem, path.stem.removesuffix("-synthetic")]
    return sorted(set(names))


def preset(name: str) -> SyntheticSpec:
    """The spec of run config ``configs/<name>.yaml`` (or ``configs/<name>-synthetic.yaml``)."""
    from hmn.config import load_config

    if name not in preset_names():
        raise ValueError(f"unknown synthetic preset {name!r}; known: {preset_names()}")
    path = CONFIG_DIR / f"{name}-synthetic.yaml"
    if not path.is_file():
        path = CONFIG_DIR / f"{name}.yaml"
    return SyntheticSpec.from_config(load_config(path).synthetic)


# ---------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------


def _zipf_weights(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """Popularity weights ``1 / rank^exponent`` with ranks randomly assigned to the n items."""
    rank = rng.permutation(n).astype(np.float64) + 1.0
    return rank**-exponent


class _TypedSampler:
    """Draws entities of a given type with Zipf popularity (entities are contiguous per type)."""

    def __init__(self, type_start: np.ndarray, type_end: np.ndarray, weights: np.ndarray):
        self.start, self.end = type_start, type_end
        self.cum = np.cumsum(weights)  # (E,)
        self.lo = np.where(type_start > 0, self.cum[np.maximum(type_start - 1, 0)], 0.0)
        self.lo[type_start == 0] = 0.0
        self.hi = self.cum[np.maximum(type_end - 1, 0)]

    def sample(self, rng: np.random.Generator, types: np.ndarray) -> np.ndarray:
        target = self.lo[types] + rng.random(len(types)) * (self.hi[types] - self.lo[types])
        idx = np.searchsorted(self.cum, target, side="right")
        return np.clip(idx, self.start[types], self.end[types] - 1).astype(np.int64)


def _word_pool(rng: np.random.Generator, size: int) -> pa.Array:
    """``size`` distinct capitalised pseudo-words of 1-3 syllables."""
    onsets, nuclei, codas = (pa.array(x, pa.string()) for x in (_ONSETS, _NUCLEI, _CODAS))
    words = pa.array([], pa.string())
    for _ in range(20):
        n = 3 * size + 64
        n_syll = rng.choice(3, size=n, p=[0.15, 0.55, 0.30]) + 1
        parts = []
        for s in range(3):
            syll = pc.binary_join_element_wise(
                onsets.take(pa.array(rng.integers(0, len(_ONSETS), n))),
                nuclei.take(pa.array(rng.integers(0, len(_NUCLEI), n))),
                codas.take(pa.array(rng.integers(0, len(_CODAS), n))),
                "",
            )
            parts.append(pc.if_else(pa.array(n_syll > s), syll, pa.scalar(None, pa.string())))
        cand = pc.binary_join_element_wise(*parts, "", null_handling="skip")
        cand = cand.filter(pc.greater_equal(pc.utf8_length(cand), 3))
        words = pc.unique(pa.concat_arrays([words, cand]))
        if len(words) >= size:
            return pc.utf8_capitalize(words.slice(0, size))
    raise RuntimeError(f"could not generate {size} distinct pseudo-words")


def _mid_codes(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` distinct random integers in [0, 32^6), in random order."""
    space = len(_MID_ALPHABET) ** _MID_DIGITS
    if n > space // 4:
        raise ValueError(f"synthetic.entities={n}: more than the mid space allows ({space // 4})")
    codes = np.empty(0, dtype=np.int64)
    while len(codes) < n:
        cand = np.concatenate([codes, rng.integers(0, space, int(n * 1.05) + 16)])
        _, first = np.unique(cand, return_index=True)
        codes = cand[np.sort(first)]
    return codes[:n]


def _mid_keys(codes: np.ndarray) -> pa.Array:
    """``www.freebase.com/m/0xxxxxx`` keys for mid codes."""
    alphabet = pa.array(list(_MID_ALPHABET), pa.string())
    digits = [
        alphabet.take(pa.array((codes >> (5 * (_MID_DIGITS - 1 - k))) & 31))
        for k in range(_MID_DIGITS)
    ]
    return pc.binary_join_element_wise(f"{_PREFIX}m/0", *digits, "")


def _write_lines(f, lines: pa.Array) -> None:
    """Write a string array as newline-terminated lines, straight from its data buffer."""
    arr = pc.binary_join_element_wise(lines, "", "\n")
    if arr.null_count:
        raise RuntimeError("internal error: null line")
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[
        arr.offset : arr.offset + len(arr) + 1
    ]
    f.write(memoryview(arr.buffers()[2])[int(offsets[0]) : int(offsets[-1])])


def _relations(rng: np.random.Generator, n: int, type_words: dict[str, str]):
    """Pick ``n`` relations: the catalogue (a seeded subset if n is smaller), then generated ones.

    Returns (keys, subject type index, object type index, templates per relation).
    """
    catalogue = list(_CATALOGUE)
    types_known = [t for t, _ in _TYPES]
    if n < len(catalogue):
        chosen = np.sort(rng.choice(len(catalogue), size=n, replace=False))
        catalogue = [catalogue[i] for i in chosen]
    keys, subj_t, obj_t, templates = [], [], [], []
    for s_type, prop, o_type, special in catalogue:
        keys.append(f"{s_type}/{prop}")
        subj_t.append(_ANY_TYPE if s_type in _UNIVERSAL_SUBJECT_TYPES else _TYPE_INDEX[s_type])
        obj_t.append(_TYPE_INDEX[o_type])
        templates.append(list(special))
    seen = set(keys)
    attempts = 0
    while len(keys) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise ValueError(
                f"synthetic.relations={n}: could not make that many distinct relations"
            )
        share = np.array([w for _, w in _TYPES])
        s_i, o_i = (int(x) for x in rng.choice(len(_TYPES), size=2, p=share / share.sum()))
        w = rng.choice(len(_PROPERTY_WORDS), size=2, replace=False)
        prop = _PROPERTY_WORDS[w[0]]
        if rng.random() < 0.7:
            prop = f"{prop}_{_PROPERTY_WORDS[w[1]]}"
        key = f"{types_known[s_i]}/{prop}"
        if key in seen:
            # disambiguate like Freebase's numbered properties
            key = f"{key}_{attempts}"
            if key in seen:
                continue
        seen.add(key)
        keys.append(key)
        subj_t.append(s_i)
        obj_t.append(o_i)
        templates.append([])
    # add generic templates with the property and type words of each relation
    for r, key in enumerate(keys):
        parts = key.split("/")
        p_words = parts[-1].replace("_", " ")
        t_words = type_words.get("/".join(parts[:-1]), parts[-2].replace("_", " "))
        picks = rng.choice(len(_GENERIC_TEMPLATES), size=_GENERIC_PER_RELATION, replace=False)
        for g in np.sort(picks):
            templates[r].append(
                _GENERIC_TEMPLATES[g].replace("{p}", p_words).replace("{t}", t_words)
            )
    return keys, np.array(subj_t), np.array(obj_t), templates


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------


class _Streams(NamedTuple):
    """One independent random stream per part of the generator (spawned from the seed), so that
    each part's draws do not depend on the others'."""

    relations: np.random.Generator
    entities: np.random.Generator
    facts: np.random.Generator
    objects: np.random.Generator
    questions: np.random.Generator
    names: np.random.Generator
    text: np.random.Generator
    mids: np.random.Generator


@dataclass
class _KB:
    """The generated knowledge base, as arrays: F facts, E entities, R relations."""

    rel_keys: list[str]  # (R,) relation keys without the prefix
    rel_templates: list[list[str]]  # (R,) question templates with a {name} slot
    fact_subj: np.ndarray  # (F,) subject entity of each fact
    fact_rel: np.ndarray  # (F,) relation of each fact
    objs: np.ndarray  # (total objects,) object entities, grouped by fact
    obj_offsets: np.ndarray  # (F + 1,) objects of fact i: objs[obj_offsets[i]:obj_offsets[i+1]]


@dataclass
class _Questions:
    """Per split (train, dev, test): the asked fact and the answer of each question."""

    facts: dict[str, np.ndarray]
    answers: dict[str, np.ndarray]
    has_train: np.ndarray  # (F,) bool: the fact has a training question


def generate(spec: SyntheticSpec, out_dir: str) -> dict:
    """Write a synthetic KB and questions into ``out_dir`` (see module docstring).

    Each file is written under a temporary name and renamed into place. Returns
    ``{"files": {"kb": path, "names": path, "questions_train": ..., "questions_dev": ...,
    "questions_test": ...}, "stats": {...}, "spec": {...}}``.
    """
    spec.validate()
    rng = _Streams(*(np.random.default_rng(s) for s in np.random.SeedSequence(spec.seed).spawn(8)))
    kb = _knowledge_base(spec, rng)
    E = spec.entities
    in_kb = np.zeros(E, dtype=bool)
    in_kb[kb.fact_subj] = True
    in_kb[kb.objs] = True
    questions = _questions(rng.questions, spec, kb)
    named = in_kb & (rng.names.random(E) < spec.name_coverage)
    for split, facts in questions.facts.items():  # every question's subject and answer
        named[kb.fact_subj[facts]] = True
        named[questions.answers[split]] = True
    name_words, n_shared = _entity_names(rng.names, E, named, spec.name_ambiguity)
    files = _write_files(spec, rng, kb, questions, named, name_words, out_dir)
    stats = _stats(spec, kb, questions, in_kb, named, n_shared)
    logger.info("synthetic KB written to %s: %s", out_dir, stats)
    return {"files": files, "stats": stats, "spec": asdict(spec)}


def _knowledge_base(spec: SyntheticSpec, rng: _Streams) -> _KB:
    """Relations, entity types, facts (unique subject, relation pairs) and their objects."""
    E = spec.entities
    type_words = {t: t.split("/")[-1].replace("_", " ") for t, _ in _TYPES}
    rel_keys, rel_subj_t, rel_obj_t, rel_templates = _relations(
        rng.relations, spec.relations, type_words
    )
    type_start, type_end, type_count = _entity_types(rng.entities, E, rel_subj_t, rel_obj_t)
    sampler = _TypedSampler(type_start, type_end, _zipf_weights(rng.entities, E, spec.zipf_exponent))
    rel_p = _zipf_weights(rng.relations, len(rel_keys), spec.zipf_exponent)
    uniform = _TypedSampler(type_start, type_end, np.ones(E))
    capacity = int(type_count[rel_subj_t].sum())  # distinct (subject, relation) pairs possible
    if spec.facts > 0.7 * capacity:
        raise ValueError(
            f"synthetic.facts={spec.facts}: at most {int(0.7 * capacity)} distinct (subject, "
            f"relation) pairs fit {E} entities and {len(rel_keys)} relations; raise entities or "
            f"relations"
        )
    fact_subj, fact_rel = _fact_pairs(rng.facts, spec.facts, rel_subj_t, rel_p / rel_p.sum(),
                                      sampler, uniform)
    objs, obj_offsets = _objects(rng.objects, spec, fact_subj, rel_obj_t[fact_rel], sampler)
    return _KB(rel_keys, rel_templates, fact_subj, fact_rel, objs, obj_offsets)


def _entity_types(
    rng: np.random.Generator, E: int, rel_subj_t: np.ndarray, rel_obj_t: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Entities are contiguous per type: (start, end, count) of each type, plus the pseudo type
    ``_ANY_TYPE`` spanning all E. Every type a relation uses gets at least 2 entities, the rest
    in proportion to the type's share."""
    used_types = np.unique(np.concatenate([rel_subj_t, rel_obj_t]))
    used_types = used_types[used_types != _ANY_TYPE]
    if E < 2 * len(used_types):
        raise ValueError(
            f"synthetic.entities={E}: need at least {2 * len(used_types)} for "
            f"{len(used_types)} entity types"
        )
    share = np.array([_TYPES[t][1] for t in used_types])
    counts_used = 2 + rng.multinomial(E - 2 * len(used_types), share / share.sum())
    type_count = np.zeros(len(_TYPES) + 1, dtype=np.int64)
    type_count[used_types] = counts_used
    type_end = np.cumsum(type_count)
    type_start = type_end - type_count
    type_start[_ANY_TYPE], type_end[_ANY_TYPE], type_count[_ANY_TYPE] = 0, E, E
    return type_start, type_end, type_count


def _fact_pairs(
    rng: np.random.Generator,
    F: int,
    rel_subj_t: np.ndarray,
    rel_p: np.ndarray,
    sampler: _TypedSampler,
    uniform: _TypedSampler,
) -> tuple[np.ndarray, np.ndarray]:
    """(subject, relation) of F distinct facts: relations drawn with probabilities ``rel_p``,
    subjects of the relation's subject type by popularity; near saturation, uniform draws fill
    the remaining pairs."""
    R = len(rel_subj_t)
    pair_codes = np.empty(0, dtype=np.int64)
    for round_ in range(200):
        need = F - len(pair_codes)
        if need <= 0:
            break
        m = int(need * 1.3) + 16
        rel = rng.choice(R, size=m, p=rel_p if round_ < 20 else None)
        subj = (sampler if round_ < 20 else uniform).sample(rng, rel_subj_t[rel])
        cand = np.concatenate([pair_codes, subj * R + rel])
        _, first = np.unique(cand, return_index=True)
        pair_codes = cand[np.sort(first)]
    if len(pair_codes) < F:
        raise ValueError(
            f"synthetic.facts={F}: only {len(pair_codes)} distinct pairs found; lower "
            f"zipf_exponent or raise entities/relations"
        )
    pair_codes = pair_codes[:F]
    return pair_codes // R, pair_codes % R


def _objects(
    rng: np.random.Generator,
    spec: SyntheticSpec,
    fact_subj: np.ndarray,
    fact_obj_type: np.ndarray,
    sampler: _TypedSampler,
) -> tuple[np.ndarray, np.ndarray]:
    """1..max_objects objects per fact, P(k) ~ objects_decay^(k-1), of the relation's object
    type, none equal to the subject or repeated within the fact (as far as re-draws manage;
    never leaving a fact without an object). Returns (objects grouped by fact, offsets (F + 1,))."""
    F = len(fact_subj)
    k_p = spec.objects_decay ** np.arange(spec.max_objects)
    n_obj = rng.choice(spec.max_objects, size=F, p=k_p / k_p.sum()) + 1
    obj_fact = np.repeat(np.arange(F), n_obj)  # (total,)
    obj_types = fact_obj_type[obj_fact]
    objs = sampler.sample(rng, obj_types)
    for _ in range(5):  # re-draw objects equal to the subject or repeated within their fact
        bad = _bad_objects(obj_fact, objs, fact_subj, spec.max_objects)
        if not bad.any():
            break
        objs[bad] = sampler.sample(rng, obj_types[bad])
    bad = _bad_objects(obj_fact, objs, fact_subj, spec.max_objects)
    first_slot = np.r_[True, obj_fact[1:] != obj_fact[:-1]]
    keep = ~bad | first_slot  # never leave a fact without an object
    obj_fact, objs = obj_fact[keep], objs[keep]
    obj_offsets = np.zeros(F + 1, dtype=np.int64)
    np.cumsum(np.bincount(obj_fact, minlength=F), out=obj_offsets[1:])
    return objs, obj_offsets


def _questions(rng: np.random.Generator, spec: SyntheticSpec, kb: _KB) -> _Questions:
    """The fact each question asks and its answer (one of the fact's objects). Training
    questions ask distinct facts while there are enough; a dev/test question asks, with
    probability 1/2, a fact that has a training question."""
    F = len(kb.fact_subj)
    Qt = spec.train_questions
    if Qt <= F:
        train_facts = rng.choice(F, size=Qt, replace=False)
    else:
        train_facts = rng.integers(0, F, Qt)
    has_train = np.zeros(F, dtype=bool)
    has_train[train_facts] = True
    with_train, without_train = np.flatnonzero(has_train), np.flatnonzero(~has_train)

    def eval_facts(n: int) -> np.ndarray:
        """Half from facts with a training question, half from the others (when both exist)."""
        if n == 0:
            return np.empty(0, dtype=np.int64)
        use_seen = rng.random(n) < 0.5
        if not len(with_train):
            use_seen[:] = False
        if not len(without_train):
            use_seen[:] = True
        out = np.empty(n, dtype=np.int64)
        n_seen = int(use_seen.sum())
        if n_seen:
            out[use_seen] = with_train[rng.integers(0, len(with_train), n_seen)]
        if n - n_seen:
            out[~use_seen] = without_train[rng.integers(0, len(without_train), n - n_seen)]
        return out

    facts = {"train": train_facts, "dev": eval_facts(spec.dev_questions),
             "test": eval_facts(spec.test_questions)}  # fmt: skip
    answers = {}
    n_obj = np.diff(kb.obj_offsets)
    for split, f in facts.items():
        slot = (rng.random(len(f)) * n_obj[f]).astype(np.int64)
        answers[split] = kb.objs[kb.obj_offsets[f] + slot]
    return _Questions(facts, answers, has_train)


def _write_files(
    spec: SyntheticSpec,
    rng: _Streams,
    kb: _KB,
    questions: _Questions,
    named: np.ndarray,
    name_words: dict[str, Any],
    out_dir: str,
) -> dict[str, str]:
    """Write kb.txt, names.tsv and the question files, ``spec.chunk_rows`` lines at a time.
    Every random draw of the text happens before the first chunk, so the bytes do not depend on
    ``chunk_rows``."""
    E, F, step = spec.entities, len(kb.fact_subj), spec.chunk_rows
    mid_codes = _mid_codes(rng.mids, E)
    rel_key_arr = pa.array([_PREFIX + k for k in kb.rel_keys], pa.string())
    word_pool = name_words["pool"]
    names_order = np.flatnonzero(named)
    names_order = names_order[rng.text.permutation(len(names_order))]
    # per question: template choice, lower-case, first-letter upper-case, punctuation
    split_u = {split: rng.text.random((len(f), 4)) for split, f in questions.facts.items()}
    templates = _TemplateTable(kb.rel_templates)

    def entity_names(ids: np.ndarray) -> pa.Array:
        cols = [
            word_pool.take(pa.array(name_words[k][ids], mask=name_words[k][ids] < 0))
            for k in ("w0", "w1", "w2")
        ]
        return pc.binary_join_element_wise(*cols, " ", null_handling="skip")

    def kb_chunks():
        off = kb.obj_offsets
        for lo in range(0, F, step):
            hi = min(lo + step, F)
            obj_lists = pa.ListArray.from_arrays(
                pa.array((off[lo : hi + 1] - off[lo]).astype(np.int32)),
                _mid_keys(mid_codes[kb.objs[off[lo] : off[hi]]]),
            )
            yield pc.binary_join_element_wise(
                _mid_keys(mid_codes[kb.fact_subj[lo:hi]]),
                rel_key_arr.take(pa.array(kb.fact_rel[lo:hi])),
                pc.binary_join(obj_lists, " "),
                "\t",
            )

    def names_chunks():
        for lo in range(0, len(names_order), step):
            ids = names_order[lo : lo + step]
            yield pc.binary_join_element_wise(_mid_keys(mid_codes[ids]), entity_names(ids), "\t")

    def question_chunks(facts: np.ndarray, answers: np.ndarray, u_all: np.ndarray):
        for lo in range(0, len(facts), step):
            f, ans, u = facts[lo : lo + step], answers[lo : lo + step], u_all[lo : lo + step]
            rel = kb.fact_rel[f]
            q = templates.fill(rel, u[:, 0], entity_names(kb.fact_subj[f]))
            yield pc.binary_join_element_wise(
                _mid_keys(mid_codes[kb.fact_subj[f]]),
                rel_key_arr.take(pa.array(rel)),
                _mid_keys(mid_codes[ans]),
                _vary_surface(q, u[:, 1:]),
                "\t",
            )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {k: str(out / v) for k, v in FILE_NAMES.items()}
    _write_atomic(files["kb"], kb_chunks())
    _write_atomic(files["names"], names_chunks())
    for split in ("train", "dev", "test"):
        chunks = question_chunks(questions.facts[split], questions.answers[split], split_u[split])
        _write_atomic(files[f"questions_{split}"], chunks)
    return files


class _TemplateTable:
    """Every relation's question templates, cut at their ``{name}`` slot."""

    def __init__(self, rel_templates: list[list[str]]) -> None:
        self.count = np.array([len(t) for t in rel_templates])  # (R,)
        self.offset = np.concatenate([[0], np.cumsum(self.count)[:-1]])  # (R,)
        flat = [t for ts in rel_templates for t in ts]
        self.prefix = pa.array([t.split("{name}")[0] for t in flat], pa.string())
        self.suffix = pa.array([t.split("{name}")[1] for t in flat], pa.string())

    def fill(self, rel: np.ndarray, u: np.ndarray, names: pa.Array) -> pa.Array:
        """Questions about ``names`` through a template of relation ``rel`` each, picked by the
        uniform draws ``u``."""
        tmpl = pa.array(self.offset[rel] + (u * self.count[rel]).astype(np.int64))
        return pc.binary_join_element_wise(self.prefix.take(tmpl), names, self.suffix.take(tmpl), "")


def _stats(
    spec: SyntheticSpec,
    kb: _KB,
    questions: _Questions,
    in_kb: np.ndarray,
    named: np.ndarray,
    n_shared: int,
) -> dict[str, Any]:
    """Counts describing the generated data (logged and returned by :func:`generate`)."""
    E, F = spec.entities, len(kb.fact_subj)
    any_question = np.zeros(F, dtype=bool)
    for facts in questions.facts.values():
        any_question[facts] = True
    degree = np.bincount(kb.fact_subj, minlength=E)
    has_train = questions.has_train
    return {
        "entities": int(E),
        "entities_in_kb": int(in_kb.sum()),
        "relations": len(kb.rel_keys),
        "facts": int(F),
        "objects": int(len(kb.objs)),
        "objects_per_fact": float(len(kb.objs) / F),
        "max_subject_degree": int(degree.max()),
        "named_entities": int(named.sum()),
        "entities_with_shared_name": int(n_shared),
        "templates": sum(len(t) for t in kb.rel_templates),
        "questions": {s: int(len(f)) for s, f in questions.facts.items()},
        "facts_with_train_question": int(has_train.sum()),
        "facts_without_question": int((~any_question).sum()),
        "eval_questions_with_train_fact": int(
            has_train[questions.facts["dev"]].sum() + has_train[questions.facts["test"]].sum()
        ),
    }


def _bad_objects(
    obj_fact: np.ndarray, objs: np.ndarray, fact_subj: np.ndarray, max_objects: int
) -> np.ndarray:
    """Objects equal to their fact's subject or repeating an earlier object of the same fact
    (``obj_fact`` is sorted, at most ``max_objects`` objects per fact)."""
    bad = objs == fact_subj[obj_fact]
    for k in range(1, max_objects):
        bad[k:] |= (obj_fact[k:] == obj_fact[:-k]) & (objs[k:] == objs[:-k])
    return bad


def _entity_names(
    rng: np.random.Generator, E: int, named: np.ndarray, ambiguity: float
) -> tuple[dict[str, np.ndarray], int]:
    """Word indices (w0, w1, w2; -1 = absent) of a name for every entity; distinct names except
    for a fraction ``ambiguity`` of the named entities, which form groups of 2-4 entities sharing
    one name. Returns the index arrays plus the word pool (key "pool"), and the number of named
    entities whose name is shared."""
    W = int(np.clip(E // 2, 500, 100_000))
    pool = _word_pool(rng, W)
    n_words = rng.choice(3, size=E, p=[0.2, 0.5, 0.3]) + 1
    words = np.full((E, 3), -1, dtype=np.int64)
    todo = np.arange(E)
    for _ in range(50):
        k = len(todo)
        if not k:
            break
        draw = rng.integers(0, W, size=(k, 3))
        draw[np.arange(3)[None, :] >= n_words[todo][:, None]] = -1
        words[todo] = draw
        codes = ((words[:, 0] + 1) * (W + 1) + (words[:, 1] + 1)) * (W + 1) + (words[:, 2] + 1)
        _, first = np.unique(codes, return_index=True)
        is_first = np.zeros(E, dtype=bool)
        is_first[first] = True
        todo = np.flatnonzero(~is_first)
        n_words[todo] = np.minimum(n_words[todo] + 1, 3)
    named_ids = np.flatnonzero(named)
    n_shared = 0
    m = min(int(round(ambiguity * len(named_ids))), len(named_ids))  # entities in shared groups
    if m >= 2:
        members = rng.permutation(named_ids)[:m]
        # groups of 2-4 entities sharing the name of their first member
        ends = np.cumsum(rng.integers(2, 5, size=m // 2 + 1))
        ends = ends[ends < m]
        starts = np.concatenate([[0], ends])
        if m - starts[-1] == 1:  # a last group of one joins the previous group
            starts = starts[:-1]
        group = np.searchsorted(starts, np.arange(m), side="right") - 1
        words[members] = words[members[starts[group]]]
        codes = ((words[named_ids, 0] + 1) * (W + 1) + (words[named_ids, 1] + 1)) * (W + 1) + (
            words[named_ids, 2] + 1
        )
        _, inverse, counts = np.unique(codes, return_inverse=True, return_counts=True)
        n_shared = int((counts[inverse] > 1).sum())
    return {"w0": words[:, 0], "w1": words[:, 1], "w2": words[:, 2], "pool": pool}, n_shared


def _vary_surface(q: pa.Array, u: np.ndarray) -> pa.Array:
    """Random casing (all lower-case, first letter upper-case) and final punctuation, from
    uniform draws ``u`` of shape (n, 3)."""
    q = pc.if_else(pa.array(u[:, 0] < 0.55), pc.utf8_lower(q), q)
    first_upper = pc.binary_join_element_wise(
        pc.utf8_upper(pc.utf8_slice_codeunits(q, 0, 1)), pc.utf8_slice_codeunits(q, 1), ""
    )
    q = pc.if_else(pa.array(u[:, 1] < 0.5), first_upper, q)
    u = u[:, 2]
    punct = np.where(u < 0.45, "?", np.where(u < 0.5, " ?", np.where(u < 0.55, ".", "")))
    return pc.binary_join_element_wise(q, pa.array(punct, pa.string()), "")


def _write_atomic(path: str, chunks) -> None:
    """Write line chunks to ``path`` through a temporary file renamed into place."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            for lines in chunks:
                _write_lines(f, lines)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def scaled_fb2m(facts: int) -> SyntheticSpec:
    """The "fb2m" preset scaled to ``facts`` grouped facts: entities in proportion (about 0.2 per
    fact), relations with the square root of the scale (at least 40), questions in proportion."""
    from dataclasses import replace

    base = preset("fb2m")
    scale = facts / base.facts
    return replace(
        base,
        facts=facts,
        entities=max(600, round(base.entities * scale)),
        relations=max(40, min(base.relations, round(base.relations * scale**0.5))),
        train_questions=max(10, round(base.train_questions * min(1.0, scale))),
        dev_questions=max(10, round(base.dev_questions * min(1.0, scale))),
        test_questions=max(10, round(base.test_questions * min(1.0, scale))),
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m hmn.synthetic [--preset fb2m] [--facts N] ... --out DIR``"""
    import argparse
    import json
    import time
    from dataclasses import replace

    parser = argparse.ArgumentParser(
        prog="python -m hmn.synthetic",
        description="Write a seeded synthetic KB (kb.txt, names.tsv, questions_*.txt) in the "
        "FB2M / SimpleQuestions formats.",
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--preset", default=None, choices=preset_names(),
        help="starting parameters: the synthetic section of configs/<preset>.yaml (default: "
        "fb2m scaled to --facts, or smoke without --facts)",
    )  # fmt: skip
    for f in fields(SyntheticSpec):
        parser.add_argument(
            f"--{f.name.replace('_', '-')}", dest=f.name, type=type(f.default), default=None,
            help=f"{f.metadata['help']} (preset value if unset)",
        )  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.preset is None and args.facts is not None:
        spec = scaled_fb2m(args.facts)
    else:
        spec = preset(args.preset or "smoke")
    overrides = {f.name: getattr(args, f.name) for f in fields(SyntheticSpec)}
    spec = replace(spec, **{k: v for k, v in overrides.items() if v is not None})
    t0 = time.perf_counter()
    result = generate(spec, args.out)
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
