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
