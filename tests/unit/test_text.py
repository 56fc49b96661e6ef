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


def _pool_kb():
    names = ["ann smith", None, "bob", "cat stevens"]
    rels = ["/people/person/place_of_birth", "/music/artist/genre"]
    subj = np.array([0, 0, 1, 2, 3, 3])
    rel = np.array([0, 1, 0, 1, 0, 1])
    return names, rels, subj, rel


def test_artificial_pool_draws_the_paper_questions_afresh_each_epoch():
    from hmn.text import ArtificialPool

    names, rels, subj, rel = _pool_kb()
    facts = np.arange(6)
    vocab = Vocabulary.build(ArtificialPool.vocabulary_texts(facts, subj, rel, names, rels))
    pool = ArtificialPool.build(facts, subj, rel, names, rels, vocab)
    assert pool.fact_ids.tolist() == [0, 1, 3, 4, 5]  # fact 2's subject has no name
    texts, ids = artificial_questions(facts, [names[s] for s in subj], [rels[r] for r in rel],
                                      np.zeros(6, dtype=bool))
    expected = {int(f): vocab.encode(t)[0].tolist() for t, f in zip(texts, ids)}
    toks, got = pool.draw(10, seed=0, epoch=0)
    assert sorted(got.tolist()) == [0, 1, 3, 4, 5]  # all of a pool smaller than the draw
    assert {int(f): t.tolist() for t, f in zip(toks, got)} == expected
    # ranks split one draw; epochs draw afresh; the same seed and epoch draw the same
    r0, r1 = pool.draw(4, 0, 3, rank=0, world=2)[1], pool.draw(4, 0, 3, rank=1, world=2)[1]
    assert len(r0) == len(r1) == 2 and not set(r0) & set(r1)
    draws = {tuple(pool.draw(2, 0, e)[1].tolist()) for e in range(20)}
    assert len(draws) > 3
    assert pool.draw(2, 0, 7)[1].tolist() == pool.draw(2, 0, 7)[1].tolist()


def test_artificial_pool_round_trips(tmp_path):
    from hmn.text import ArtificialPool

    names, rels, subj, rel = _pool_kb()
    vocab = Vocabulary.build(ArtificialPool.vocabulary_texts(np.arange(6), subj, rel, names, rels))
    pool = ArtificialPool.build(np.arange(6), subj, rel, names, rels, vocab)
    pool.save(tmp_path / "p.npz")
    back = ArtificialPool.load(tmp_path / "p.npz")
    assert [t.tolist() for t in back.draw(5, 1, 2)[0]] == [t.tolist() for t in pool.draw(5, 1, 2)[0]]
