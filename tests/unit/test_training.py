import numpy as np
import torch

from hmn.memory import FactMemory
from hmn.model import BowEncoder
from hmn.readers import ExactReader
from hmn.training import EarlyStopping, accuracy, correct, iterate_batches, predict, train_epoch


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
