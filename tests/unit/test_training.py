import numpy as np
import torch

from hmn.memory import FactMemory
from hmn.model import BowEncoder
from hmn.readers import Candidates, ExactReader
from hmn.training import (
    EarlyStopping,
    accuracy,
    correct,
    iterate_batches,
    make_batch,
    predict,
    train_epoch,
)


def _toy(n_facts=50, d=16, seed=0):
    """Question i about fact i: its words are [i, n_facts + relation]; separable by design."""
    rng = np.random.default_rng(seed)
    memory = torch.from_numpy(rng.standard_normal((n_facts, d)).astype(np.float32))
    tokens = [np.array([i, n_facts + i % 5]) for i in range(n_facts)]
    gold = np.arange(n_facts)
    return memory, tokens, gold


def test_loss_falls_and_accuracy_rises_with_ksoftmax():
    torch.manual_seed(0)
    memory, tokens, gold = _toy()
    model = BowEncoder(60, 16, init_std=0.01)
    reader = ExactReader(FactMemory(memory))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    subj = np.arange(50)
    rel = np.zeros(50, dtype=np.int64)
    before = accuracy(predict(model, reader, tokens, k=5).fact_ids, gold, subj, rel)
    losses = []
    for epoch in range(15):
        batches = iterate_batches(tokens, gold, 16, shuffle=True, generator=np.random.default_rng(epoch))
        stats = train_epoch(model, batches, memory, reader, opt, loss="ksoftmax", k=5)
        losses.append(stats.loss)
        assert stats.softmax_size <= 16 * 5 + 16
        assert stats.facts_touched == 50
    after = accuracy(predict(model, reader, tokens, k=5).fact_ids, gold, subj, rel)
    assert losses[-1] < losses[0] * 0.5
    assert after > max(0.9, before)


class _FixedReader:
    """A reader stub that gives each query of the batch its own fixed candidate set."""

    def __init__(self, ids: list[list[int]]):
        self.ids = torch.tensor(ids)

    def search(self, queries, k, generator=None):
        b = queries.shape[0]
        return Candidates(self.ids[:b, :k], torch.zeros(b, k), torch.full((b,), 7))


def test_training_step_softmaxes_over_the_union_of_the_batch():
    """One K-softmax step on a batch whose queries have different candidate sets: the loss and
    the update are those of each query's softmax over ALL the batch's candidates plus the gold
    facts, computed here by hand with numpy."""
    rng = np.random.default_rng(1)
    memory = rng.standard_normal((10, 4)).astype(np.float32)
    cands = [[1, 2], [3, 4]]  # disjoint candidate sets
    gold = np.array([0, 4])
    model = BowEncoder(2, 4, init_std=0.5)
    w0 = model.words.weight.detach().numpy().astype(np.float64).copy()  # (2, D): question b = word b
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    batch = make_batch([np.array([0]), np.array([1])], gold)
    stats = train_epoch(model, [batch], torch.from_numpy(memory), _FixedReader(cands), opt,
                        loss="ksoftmax", k=2)
    union = [0, 1, 2, 3, 4]  # both queries' candidates plus both gold facts
    m_u = memory[union].astype(np.float64)  # (U, D)
    nll, grad = [], np.zeros_like(w0)
    for b in range(2):
        s = m_u @ w0[b]  # (U,)
        p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
        nll.append(-np.log(p[union.index(gold[b])]))
        p[union.index(gold[b])] -= 1.0
        grad[b] = p @ m_u / 2
    assert stats.softmax_size == len(union) and stats.steps == 1 and stats.facts_touched == 7
    assert abs(stats.loss - np.mean(nll)) < 1e-5
    np.testing.assert_allclose(model.words.weight.detach().numpy(), w0 - grad, rtol=1e-4, atol=1e-6)


def test_full_softmax_trains_too():
    torch.manual_seed(0)
    memory, tokens, gold = _toy()
    model = BowEncoder(60, 16)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    first = train_epoch(model, iterate_batches(tokens, gold, 16, shuffle=False), memory, None, opt, loss="full")
    for _ in range(10):
        last = train_epoch(model, iterate_batches(tokens, gold, 16, shuffle=False), memory, None, opt, loss="full")
    assert last.loss < first.loss
    assert first.softmax_size == 50


def test_accuracy_uses_subject_and_relation():
    subj = np.array([0, 0, 1])
    rel = np.array([0, 0, 1])  # facts 0 and 1 share (subject, relation)
    assert accuracy(np.array([1, 2, -1]), np.array([0, 2, 2]), subj, rel) == 2 / 3
    assert accuracy(np.array([], np.int64), np.array([], np.int64), subj, rel) == 0.0


def test_correct_needs_the_gold_subject_and_the_gold_relation():
    """A prediction is right only when its fact has both the gold subject and the gold relation:
    a fact sharing only one of them, or neither, is wrong (SimpleQuestions criterion)."""
    # fact:          0  1  2  3  4
    subj = np.array([0, 0, 0, 1, 1])
    rel = np.array([0, 0, 1, 0, 1])
    gold = np.zeros(5, dtype=np.int64)  # every question's gold fact is fact 0 = (s0, r0)
    pred = np.array([0, 1, 2, 3, 4])  # itself, both shared, subject only, relation only, neither
    assert correct(pred, gold, subj, rel).tolist() == [True, True, False, False, False]
    assert accuracy(pred, gold, subj, rel) == 2 / 5
    # the same cases with the gold fact in the other position (gold 4 = (s1, r1))
    gold4 = np.full(5, 4)
    assert correct(pred, gold4, subj, rel).tolist() == [False, False, False, False, True]


def test_a_question_without_gold_fact_is_never_correct():
    subj = np.array([0, 1, 2])
    rel = np.array([0, 0, 2])  # fact 2 is the last one: gold -1 must not be read as fact 2
    hit = correct(np.array([2, 1, 2, -1]), np.array([-1, 1, 2, -1]), subj, rel)
    assert hit.tolist() == [False, True, True, False]
    assert accuracy(np.array([2, 1]), np.array([-1, 1]), subj, rel) == 0.5


def test_early_stopping_after_patience_falling_epochs():
    s = EarlyStopping(patience=3)
    for epoch, acc in enumerate([0.1, 0.3, 0.2, 0.25, 0.29]):
        s.update(epoch, acc)
    assert s.best == 0.3 and s.best_epoch == 1 and s.should_stop
    s2 = EarlyStopping(patience=3)
    s2.load_state_dict(s.state_dict())
    assert s2.should_stop and s2.history == s.history
