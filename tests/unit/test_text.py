import numpy as np

from hmn.text import Vocabulary, artificial_questions, pack, relation_words, tokenize


def test_tokenize_and_relation_words():
    assert tokenize("Where was Sasha Vujačić born?") == ["where", "was", "sasha", "vujačić", "born"]
    assert relation_words("/people/person/place_of_birth") == ["people", "person", "place", "of", "birth"]


def test_vocabulary_is_deterministic_and_counts_unknown(tmp_path):
    v1 = Vocabulary.build(["b a", "c a"])
    v2 = Vocabulary.build(["c a", "b a"])
    assert v1.words == v2.words == ("a", "b", "c")
    ids, unknown = v1.encode("a zz c")
    assert ids.tolist() == [0, 2] and unknown == 1
    v1.save(tmp_path / "v.json")
    assert Vocabulary.load(tmp_path / "v.json").words == v1.words


def test_artificial_questions_only_for_uncovered_named_facts():
    texts, ids = artificial_questions(
        np.array([0, 1, 2]), ["alpha beta", None, "gamma"],
        ["/film/film/director", "/a/b/c", "/people/person/place_of_birth"], np.array([True, False, False]))
    assert texts == ["gamma people person place of birth"]
    assert ids.tolist() == [2]


def test_pack_layout():
    tokens, offsets = pack([np.array([1, 2]), np.array([], dtype=np.int64), np.array([3])])
    assert tokens.tolist() == [1, 2, 3]
    assert offsets.tolist() == [0, 2, 2]
