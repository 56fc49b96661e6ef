"""Question text: tokenisation, the vocabulary, and the paper's artificial questions.

The encoder is a bag of words (Chandar et al. 2016, section 4), so a question is just the list of
its word ids. Words never seen in training are dropped at encoding time and counted.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

_WORD = re.compile(r"\w+", re.UNICODE)


def tokenize(text: str) -> list[str]:
    """Lower-cased word tokens; punctuation separates words (``"born?"`` -> ``["born"]``)."""
    return _WORD.findall(text.lower())


def relation_words(relation_key: str) -> list[str]:
    """Words of a relation path, e.g. ``/people/person/place_of_birth`` ->
    ``people person place of birth`` (the relation half of an artificial question)."""
    return tokenize(relation_key.replace("/", " ").replace("_", " ").replace(".", " "))


@dataclass(frozen=True)
class Vocabulary:
    words: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {w: i for i, w in enumerate(self.words)})

    def __len__(self) -> int:
        return len(self.words)

    @classmethod
    def build(cls, texts: Iterable[str], min_count: int = 1) -> Vocabulary:
        counts: Counter[str] = Counter()
        for t in texts:
            counts.update(tokenize(t))
        # Sorted for determinism: the same questions always give the same ids.
        return cls(tuple(sorted(w for w, c in counts.items() if c >= min_count)))

    def encode(self, text: str) -> tuple[np.ndarray, int]:
        """Word ids of `text` (int64) and how many of its tokens were unknown."""
        index = self._index  # type: ignore[attr-defined]
        ids, unknown = [], 0
        for w in tokenize(text):
            i = index.get(w)
            if i is None:
                unknown += 1
            else:
                ids.append(i)
        return np.asarray(ids, dtype=np.int64), unknown

    def encode_many(self, texts: Sequence[str]) -> tuple[list[np.ndarray], np.ndarray]:
        """Word ids per text and unknown-token counts (B,)."""
        out, unknown = [], np.zeros(len(texts), dtype=np.int64)
        for i, t in enumerate(texts):
            ids, unknown[i] = self.encode(t)
            out.append(ids)
        return out, unknown

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"words": list(self.words)}))

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        return cls(tuple(json.loads(Path(path).read_text())["words"]))


def artificial_questions(
    fact_ids: np.ndarray,
    subject_names: Sequence[str | None],
    relation_keys: Sequence[str],
    covered: np.ndarray,
) -> tuple[list[str], np.ndarray]:
    """The paper's artificial questions: subject name plus the words of the relation path.

    One question for every fact that has no natural training question (``covered[i]`` is False)
    and whose subject has a name. Arguments are aligned per fact: `subject_names[i]` and
    `relation_keys[i]` belong to fact `fact_ids[i]`. Returns (texts, their fact ids).
    """
    texts: list[str] = []
    ids: list[int] = []
    for fid, name, rel, cov in zip(fact_ids.tolist(), subject_names, relation_keys, covered.tolist()):
        if cov or not name:
            continue
        texts.append(f"{name} {' '.join(relation_words(rel))}")
        ids.append(fid)
    return texts, np.asarray(ids, dtype=np.int64)


def pack(token_lists: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Flatten ragged word-id lists into the (tokens, offsets) layout of `torch.nn.EmbeddingBag`."""
    lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=len(token_lists))
    offsets = np.zeros(len(token_lists), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1], out=offsets[1:])
    tokens = np.concatenate(token_lists).astype(np.int64) if len(token_lists) else np.zeros(0, np.int64)
    return tokens, offsets


def _ragged(token_lists: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(offsets (n+1,), values) of ragged int32 word-id lists."""
    lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=len(token_lists))
    offsets = np.zeros(len(token_lists) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = (np.concatenate(token_lists).astype(np.int32) if len(token_lists)
              else np.zeros(0, np.int32))
    return offsets, values


@dataclass(frozen=True)
class ArtificialPool:
    """Artificial questions drawn afresh each epoch from a pool of facts (memories of millions of
    facts, where one question for every fact in every epoch would make an epoch millions of
    questions long). A pool fact's question is the same as :func:`artificial_questions`' (its
    subject's name, then its relation's words), kept as word ids: the ids of each subject name
    and each relation, joined when drawn, so the pool costs a few bytes per fact.

    ``fact_ids``, ``subject``, ``relation``: (P,) the pool's facts and their subject and relation
    ids; ``name_offsets`` (E+1,) / ``name_tokens`` and ``rel_offsets`` (R+1,) / ``rel_tokens``:
    ragged word ids of each entity's name (empty for entities no pool fact has as subject) and of
    each relation's words."""

    fact_ids: np.ndarray
    subject: np.ndarray
    relation: np.ndarray
    name_offsets: np.ndarray
    name_tokens: np.ndarray
    rel_offsets: np.ndarray
    rel_tokens: np.ndarray

    def __len__(self) -> int:
        return len(self.fact_ids)

    @staticmethod
    def vocabulary_texts(fact_ids: np.ndarray, fact_subject: np.ndarray, fact_relation: np.ndarray,
                         entity_names: Sequence[str | None], relation_keys: Sequence[str]) -> list[str]:
        """The words a pool of ``fact_ids`` can draw (its subjects' names and its relations'
        words), as texts for :meth:`Vocabulary.build`."""
        subjects = np.unique(fact_subject[fact_ids])
        relations = np.unique(fact_relation[fact_ids])
        return ([entity_names[s] for s in subjects.tolist() if entity_names[s]]
                + [" ".join(relation_words(relation_keys[r])) for r in relations.tolist()])

    @classmethod
    def build(cls, fact_ids: np.ndarray, fact_subject: np.ndarray, fact_relation: np.ndarray,
              entity_names: Sequence[str | None], relation_keys: Sequence[str],
              vocab: Vocabulary) -> ArtificialPool:
        """The pool of ``fact_ids`` (facts whose subject has no name are left out, as in
        :func:`artificial_questions`), encoded with ``vocab``."""
        fact_ids = np.asarray(fact_ids, dtype=np.int64)
        named = np.fromiter((bool(entity_names[s]) for s in fact_subject[fact_ids].tolist()),
                            dtype=bool, count=fact_ids.size)
        fact_ids = fact_ids[named]
        subject, relation = fact_subject[fact_ids], fact_relation[fact_ids]
        names: list[np.ndarray] = [np.zeros(0, np.int64)] * len(entity_names)
        for s in np.unique(subject).tolist():
            names[s] = vocab.encode(entity_names[s])[0]
        rels = [vocab.encode(" ".join(relation_words(k)))[0] for k in relation_keys]
        (no, nt), (ro, rt) = _ragged(names), _ragged(rels)
        return cls(fact_ids, subject.astype(np.int64), relation.astype(np.int64), no, nt, ro, rt)

    def draw(self, n: int, seed: int, epoch: int, rank: int = 0, world: int = 1
             ) -> tuple[list[np.ndarray], np.ndarray]:
        """Epoch ``epoch``'s questions for ``rank`` of ``world``: a seeded sample of ``n`` pool
        facts (all when the pool is smaller), the same on every rank, split rank by rank, in a
        random order. Returns (word-id lists, fact ids)."""
        rng = np.random.default_rng([seed, 0xA27, epoch])
        pick = rng.choice(len(self), size=min(n, len(self)), replace=False)[rank::world]
        out = []
        for s, r in zip(self.subject[pick].tolist(), self.relation[pick].tolist()):
            out.append(np.concatenate([self.name_tokens[self.name_offsets[s]:self.name_offsets[s + 1]],
                                       self.rel_tokens[self.rel_offsets[r]:self.rel_offsets[r + 1]]]
                                      ).astype(np.int64))
        return out, self.fact_ids[pick]

    def save(self, path: str | Path) -> None:
        np.savez(path, **{f: getattr(self, f) for f in self.__dataclass_fields__})

    @classmethod
    def load(cls, path: str | Path) -> ArtificialPool:
        with np.load(path) as z:
            return cls(**{f: z[f] for f in cls.__dataclass_fields__})
