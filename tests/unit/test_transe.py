"""Unit tests for hmn.transe (TransE training and filtered link prediction); no Ray."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from hmn.transe import (
    RowOptimizer,
    TransEResult,
    bernoulli_head_probs,
    bucket_schedule,
    embeddings_fingerprint,
    entity_partition,
    head_corruption_probs,
    init_relations,
    link_prediction,
    partition_bounds,
    train_bucket,
    train_transe,
)
from hmn.transe_params import TransEParams

SMALL = TransEParams(dim=16, margin=1.0, lr=0.01, epochs=30, batch_size=64, seed=3)


def grid_graph(side: int = 6) -> tuple[np.ndarray, int, int]:
    """Entities on a side x side grid; "right" and "up" move one step: exactly translational.

    Returns (triples (T, 3), num_entities, num_relations).
    """
    x, y = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    ids = (x * side + y).ravel()
    x, y = x.ravel(), y.ravel()
    right = np.stack(
        [ids[x < side - 1], np.zeros((x < side - 1).sum(), int), ids[x < side - 1] + side], 1
    )
    up = np.stack([ids[y < side - 1], np.ones((y < side - 1).sum(), int), ids[y < side - 1] + 1], 1)
    return np.concatenate([right, up]).astype(np.int64), side * side, 2


def planted_graph(E: int = 40, R: int = 3, dim: int = 8, seed: int = 0):
    """A graph with an exact TransE structure: the tail of (h, r) is the entity nearest (L1)
    to h + r for planted unit-norm entities and relations of norm 0.8; one triple per (h, r).

    Returns (triples (E * R, 3), num_entities, num_relations).
    """
    rng = np.random.default_rng(seed)
    ent = rng.standard_normal((E, dim))
    ent /= np.linalg.norm(ent, axis=1, keepdims=True)
    rel = rng.standard_normal((R, dim))
    rel *= 0.8 / np.linalg.norm(rel, axis=1, keepdims=True)
    heads = np.repeat(np.arange(E), R)
    rels = np.tile(np.arange(R), E)
    query = ent[heads] + rel[rels]  # (E * R, dim)
    tails = np.abs(query[:, None, :] - ent[None, :, :]).sum(-1).argmin(1)
    return np.stack([heads, rels, tails], 1).astype(np.int64), E, R


def random_graph(seed: int = 0, E: int = 50, R: int = 4, T: int = 400) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.integers(0, E, T), rng.integers(0, R, T), rng.integers(0, E, T)], 1)


def learn_planted_graph(params: TransEParams) -> list[float]:
    """Train on a planted graph less 12 held-out triples and check link prediction on both
    parts; returns the per-epoch losses."""
    triples, E, R = planted_graph()
    held_out = np.random.default_rng(0).permutation(len(triples))[:12]
    train = np.delete(triples, held_out, axis=0)
    result = train_transe(train, E, R, params)
    for rec in result.history:
        assert 0 <= rec["active"] <= 1
    on_train = link_prediction(
        result.entities, result.relations, train, [triples], norm=params.norm
    )
    on_held_out = link_prediction(
        result.entities, result.relations, triples[held_out], [triples], norm=params.norm
    )
    assert on_train["mrr"] > 0.8, on_train
    # Unseen triples are predicted far above chance (MRR ~0.11 for 40 entities).
    assert on_held_out["mrr"] > 0.5, on_held_out
    return [rec["loss"] for rec in result.history]


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --- training ---------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", [1, 2])
@pytest.mark.parametrize("negatives", ["unif", "bern"])
def test_loss_falls(norm, negatives):
    triples, E, R = planted_graph(E=50, R=4)
    params = dataclasses.replace(SMALL, norm=norm, negatives=negatives, epochs=20, batch_size=32)
    result = train_transe(triples, E, R, params)
    losses = [rec["loss"] for rec in result.history]
    assert len(losses) == 20
    assert [rec["epoch"] for rec in result.history] == list(range(20))
    assert np.mean(losses[-3:]) < 0.75 * np.mean(losses[:3])
    for rec in result.history:
        assert rec["seconds"] > 0 and rec["triples_per_s"] > 0 and 0 <= rec["active"] <= 1
    assert result.entities.shape == (50, 16) and result.entities.dtype == np.float32
    assert result.relations.shape == (4, 16) and result.relations.dtype == np.float32


@pytest.mark.parametrize("norm", [1, 2])
def test_translational_graph_is_learned(norm):
    learn_planted_graph(
        dataclasses.replace(SMALL, norm=norm, lr=0.02, epochs=120, batch_size=16, num_negatives=4)
    )


@pytest.mark.parametrize("norm", [1, 2])
def test_row_adagrad_learns_translational_graph(norm):
    learn_planted_graph(
        dataclasses.replace(SMALL, norm=norm, optimizer="row_adagrad", lr=0.1, epochs=120,
                            batch_size=16, num_negatives=4)
    )


def test_row_adagrad_keeps_one_sum_per_entity_row_and_steps_by_it():
    """PyTorch-BigGraph's row-wise Adagrad: an entity row's state is one float, the running sum
    of its gradients' mean square; relations keep element-wise sums (Adagrad)."""
    params = TransEParams(dim=4, lr=0.5, optimizer="row_adagrad")
    ent = torch.arange(20, dtype=torch.float32).reshape(5, 4)
    rel = torch.ones(2, 4)
    opt = RowOptimizer(params, {"entity": ent, "relation": rel})
    assert opt.moments["entity_sum"].shape == (5, 1) and opt.moments["relation_sum"].shape == (2, 4)
    assert set(opt.state_dict()) == {"step", "entity_sum", "relation_sum"}
    ids = torch.tensor([1, 3])
    rows = ent[ids].clone()
    grads = [torch.tensor([[1.0, -1.0, 3.0, 1.0], [0.0, 2.0, 0.0, 0.0]]),
             torch.tensor([[2.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])]
    total = torch.zeros(2, 1)
    for grad in grads:
        opt.begin_step()
        opt.update_rows("entity", ent, ids, ent[ids].clone(), grad)
        total += grad.square().mean(1, keepdim=True)
        rows = rows - 0.5 * grad / (total.sqrt() + 1e-10)
    torch.testing.assert_close(ent[ids], rows)
    torch.testing.assert_close(opt.moments["entity_sum"][ids], total)
    assert torch.equal(ent[[0, 2, 4]], torch.arange(20, dtype=torch.float32).reshape(5, 4)[[0, 2, 4]])
    assert float(opt.moments["entity_sum"][[0, 2, 4]].abs().sum()) == 0.0  # lazy: untouched rows
    g = torch.tensor([[3.0, 0.0, -4.0, 1.0]])
    opt.update_rows("relation", rel, torch.tensor([1]), rel[[1]].clone(), g)
    torch.testing.assert_close(rel[1], 1.0 - 0.5 * g[0] / (g[0].abs() + 1e-10))  # element-wise


@pytest.mark.parametrize("norm", [1, 2])
@pytest.mark.parametrize("negatives", ["unif", "bern"])
def test_shared_negatives_learn_translational_graph(norm, negatives):
    params = dataclasses.replace(
        SMALL,
        norm=norm,
        negatives=negatives,
        lr=0.02,
        epochs=80,
        batch_size=16,
        shared_negatives=8,
        margin=1.0 if norm == 1 else 0.5,
    )
    losses = learn_planted_graph(params)
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3])


def test_shared_negatives_skip_the_true_entity():
    # Two entities: every shared "negative" is either the true entity (skipped) or the other
    # one; with entity 1 as the only possible corruption of (0, r, 1) -> (0, r, 0) or (1, r, 1).
    triples = np.array([[0, 0, 1]])
    params = dataclasses.replace(
        SMALL, dim=4, epochs=1, batch_size=1, shared_negatives=64, negatives="unif"
    )
    result = train_transe(triples, 2, 1, params)
    # About half of the 64 draws equal the replaced entity; those pairs are never active.
    assert 0 < result.history[0]["active"] < 0.9


def test_pairwise_distance_matches_direct():
    from hmn.transe import _pairwise_distance

    gen = torch.Generator().manual_seed(0)
    queries = torch.randn(7, 5, generator=gen)
    rows = torch.randn(4, 5, generator=gen)
    for norm, p in ((1, 1), (2, 2)):
        direct = torch.linalg.vector_norm(queries[:, None, :] - rows[None], ord=p, dim=-1)
        torch.testing.assert_close(
            _pairwise_distance(queries, rows, norm), direct, atol=1e-5, rtol=0
        )


def test_lr_decay_changes_training_and_one_is_constant():
    triples = random_graph()
    base = dataclasses.replace(SMALL, epochs=4)
    same = train_transe(triples, 50, 4, dataclasses.replace(base, lr_decay=1.0))
    plain = train_transe(triples, 50, 4, base)
    np.testing.assert_array_equal(same.entities, plain.entities)
    decayed = train_transe(triples, 50, 4, dataclasses.replace(base, lr_decay=0.1))
    assert decayed.history[0]["loss"] == plain.history[0]["loss"]  # epoch 0 runs at lr
    assert not np.array_equal(decayed.entities, plain.entities)


def test_entities_unit_norm_when_normalized():
    triples = random_graph()
    result = train_transe(triples, 50, 4, dataclasses.replace(SMALL, epochs=3))
    np.testing.assert_allclose(np.linalg.norm(result.entities, axis=1), 1.0, atol=1e-5)
    free = train_transe(
        triples, 50, 4, dataclasses.replace(SMALL, epochs=3, normalize_entities=False)
    )
    assert np.abs(np.linalg.norm(free.entities, axis=1) - 1.0).max() > 1e-3


def test_relations_initialised_normalised():
    params = dataclasses.replace(SMALL, epochs=2)
    result = train_transe(random_graph(), 50, 4, params, start_epoch=2)  # nothing to train
    assert result.history == []
    np.testing.assert_allclose(np.linalg.norm(result.relations, axis=1), 1.0, atol=1e-5)
    bound = 6 / np.sqrt(SMALL.dim)  # Bordes 2013, Algorithm 1: uniform(-6/sqrt(d), 6/sqrt(d))
    assert np.abs(result.entities).max() <= bound


def test_same_seed_same_result_other_seed_differs():
    triples = random_graph()
    params = dataclasses.replace(SMALL, epochs=5, num_negatives=2)
    a = train_transe(triples, 50, 4, params)
    b = train_transe(triples, 50, 4, params)
    c = train_transe(triples, 50, 4, dataclasses.replace(params, seed=4))
    np.testing.assert_array_equal(a.entities, b.entities)
    np.testing.assert_array_equal(a.relations, b.relations)
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]
    assert embeddings_fingerprint(a.entities, a.relations) == embeddings_fingerprint(
        b.entities, b.relations
    )
    assert embeddings_fingerprint(a.entities, a.relations) != embeddings_fingerprint(
        c.entities, c.relations
    )


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"shared_negatives": 16, "lr_decay": 0.3},
        {"shared_negatives": 16, "norm": 2, "margin": 0.5},
        {"optimizer": "row_adagrad", "lr": 0.1, "lr_decay": 0.3},
    ],
)
def test_resume_from_progress_checkpoint_is_exact(extra):
    triples = random_graph()
    params = dataclasses.replace(SMALL, epochs=6, **extra)
    full = train_transe(triples, 50, 4, params)

    checkpoints = {}

    def keep(info):
        checkpoints[info["epoch"]] = {
            "entities": info["entities"].copy(),
            "relations": info["relations"].copy(),
            "optimizer_state": {
                k: v.clone() if isinstance(v, torch.Tensor) else v
                for k, v in info["optimizer_state"].items()
            },
        }

    if params.lr_decay == 1.0:
        # An interrupted run: the same params, stopped after epoch 2.
        train_transe(triples, 50, 4, dataclasses.replace(params, epochs=3), progress=keep)
    else:
        # The decay schedule depends on `epochs`: checkpoint the full run itself.
        train_transe(triples, 50, 4, params, progress=lambda info: info["epoch"] < 3 and keep(info))
    assert sorted(checkpoints) == [0, 1, 2]
    saved = checkpoints[2]
    resumed = train_transe(
        triples,
        50,
        4,
        params,
        init=(saved["entities"], saved["relations"]),
        start_epoch=3,
        optimizer_state=saved["optimizer_state"],
    )
    assert [rec["epoch"] for rec in resumed.history] == [3, 4, 5]
    np.testing.assert_allclose(resumed.entities, full.entities, atol=1e-6)
    np.testing.assert_allclose(resumed.relations, full.relations, atol=1e-6)
    np.testing.assert_allclose(
        [r["loss"] for r in resumed.history], [r["loss"] for r in full.history[3:]], rtol=1e-6
    )


def test_resume_from_result_and_init_is_used():
    triples = random_graph()
    first = train_transe(triples, 50, 4, dataclasses.replace(SMALL, epochs=4))

    def resume(epochs: int, **kwargs):
        params = dataclasses.replace(SMALL, epochs=epochs)
        init = (first.entities, first.relations)
        return train_transe(triples, 50, 4, params, init=init, start_epoch=4, **kwargs)

    resumed = resume(8, optimizer_state=first.optimizer_state)
    # Continues where the first run stopped rather than from a fresh initialisation.
    assert resumed.history[0]["loss"] < first.history[0]["loss"]
    done = resume(4)
    assert done.history == []
    np.testing.assert_array_equal(done.entities, first.entities)


def test_bernoulli_probabilities():
    # Relation 0 is 1-to-N (head 0 -> tails 1, 2, 3): tph = 3, hpt = 1 -> corrupt head 3/4.
    # Relation 1 is N-to-1 (heads 1, 2 -> tail 0): tph = 1, hpt = 2 -> 1/3. Relation 2 unused.
    triples = np.array([[0, 0, 1], [0, 0, 2], [0, 0, 3], [1, 1, 0], [2, 1, 0]])
    np.testing.assert_allclose(bernoulli_head_probs(triples, 3), [0.75, 1 / 3, 0.5])
    np.testing.assert_array_equal(
        head_corruption_probs(triples, 3, "bern"), bernoulli_head_probs(triples, 3)
    )
    np.testing.assert_array_equal(head_corruption_probs(triples, 3, "unif"), [0.5, 0.5, 0.5])


# --- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("dim", 0, "transe.dim=0: must be > 0"),
        ("epochs", -1, "transe.epochs=-1: must be > 0"),
        ("batch_size", 2.5, "transe.batch_size=2.5: must be an int"),
        ("num_negatives", 0, "transe.num_negatives=0: must be > 0"),
        ("shared_negatives", -1, "transe.shared_negatives=-1: must be an int >= 0"),
        ("shared_negatives", 2.0, "transe.shared_negatives=2.0: must be an int >= 0"),
        ("lr_decay", 0.0, "transe.lr_decay=0.0: must be in (0, 1]"),
        ("lr_decay", 1.5, "transe.lr_decay=1.5: must be in (0, 1]"),
        ("norm", 3, "transe.norm=3"),
        ("margin", 0.0, "transe.margin=0.0"),
        ("margin", float("nan"), "transe.margin=nan"),
        ("lr", -1.0, "transe.lr=-1.0"),
        ("negatives", "hard", "transe.negatives='hard'"),
        ("normalize_entities", "yes", "transe.normalize_entities='yes'"),
        ("seed", -1, "transe.seed=-1"),
        ("loss", "bce", "transe.loss='bce'"),
        ("adversarial_temperature", -1.0, "transe.adversarial_temperature=-1.0"),
        ("optimizer", "sgd", "transe.optimizer='sgd': must be one of"),
    ],
)
def test_params_validation(field, value, message):
    params = dataclasses.replace(TransEParams(), **{field: value})
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        params.validate()
    with pytest.raises(ValueError, match=field):
        train_transe(random_graph(), 50, 4, params)


def test_shared_negatives_need_one_per_triple_negative():
    params = TransEParams(shared_negatives=64, num_negatives=4)
    with pytest.raises(
        ValueError, match=r"transe\.num_negatives=4: must be 1 when transe\.shared_negatives=64"
    ):
        params.validate()


def test_default_params_are_valid():
    TransEParams().validate()


def test_triples_validation_names_offending_row():
    triples = random_graph()
    bad = triples.copy()
    bad[7, 2] = 50
    with pytest.raises(ValueError, match=r"triples\[7\]"):
        train_transe(bad, 50, 4, SMALL)
    bad = triples.copy()
    bad[11, 1] = -1
    with pytest.raises(ValueError, match=r"triples\[11\]"):
        train_transe(bad, 50, 4, SMALL)
    with pytest.raises(ValueError, match="T = 0"):
        train_transe(np.empty((0, 3), np.int64), 50, 4, SMALL)
    with pytest.raises(ValueError, match="shape"):
        train_transe(triples[:, :2], 50, 4, SMALL)
    with pytest.raises(ValueError, match="integer"):
        train_transe(triples.astype(float), 50, 4, SMALL)
    with pytest.raises(ValueError, match="num_entities"):
        train_transe(triples, 0, 4, SMALL)
    with pytest.raises(ValueError, match="start_epoch"):
        train_transe(triples, 50, 4, SMALL, start_epoch=SMALL.epochs + 1)
    with pytest.raises(ValueError, match="init"):
        train_transe(triples, 50, 4, SMALL, init=(np.zeros((50, 8)), np.zeros((4, 16))))
    with pytest.raises(ValueError, match="optimizer_state: missing"):
        train_transe(triples, 50, 4, SMALL, optimizer_state={"step": 1})
    state = train_transe(triples, 50, 4, dataclasses.replace(SMALL, epochs=1)).optimizer_state
    state["entity_m"] = state["entity_m"][:3]
    with pytest.raises(ValueError, match=r"optimizer_state\['entity_m'\]: shape \(3, 16\)"):
        train_transe(triples, 50, 4, SMALL, optimizer_state=state)


# --- link prediction --------------------------------------------------------------------------

# 1-d embeddings: entities at 0, 1, 3, 7; relation 0 translates by 1, relation 1 by 3.
HAND_ENTITIES = np.array([[0.0], [1.0], [3.0], [7.0]], np.float32)
HAND_RELATIONS = np.array([[1.0], [3.0]], np.float32)
HAND_TEST = np.array([[0, 0, 2], [1, 1, 3]])
HAND_TRAIN = np.array([[0, 0, 1], [2, 0, 2], [1, 1, 2]])


@pytest.mark.parametrize("norm", [1, 2])
@pytest.mark.parametrize("batch_size", [1, 256])
def test_link_prediction_hand_ranks(norm, batch_size):
    # (0, r0, 2), tail query 0 + 1 = 1, distances [1, 0, 2, 6], target 2: entities 0 and 1
    #   are closer, 1 is filtered by (0, r0, 1) -> rank 2.
    # (0, r0, 2), head query 3 - 1 = 2, distances [2, 1, 1, 5], target 0: entities 1 and 2 are
    #   closer, 2 is filtered by (2, r0, 2) -> rank 2.
    # (1, r1, 3), tail query 1 + 3 = 4, distances [4, 3, 1, 3], target 3: entity 2 is closer but
    #   filtered by (1, r1, 2); entity 1 ties -> rank 1 + 0.5 = 1.5.
    # (1, r1, 3), head query 7 - 3 = 4, same distances, target 1: entity 2 closer, entity 3
    #   ties -> rank 2.5.
    ranks = np.array([2.0, 2.0, 1.5, 2.5])
    metrics = link_prediction(
        HAND_ENTITIES,
        HAND_RELATIONS,
        HAND_TEST,
        [HAND_TRAIN, HAND_TEST],
        norm=norm,
        batch_size=batch_size,
    )
    assert metrics["count"] == 2
    assert metrics["mrr"] == pytest.approx(np.mean(1 / ranks))
    assert metrics["mean_rank"] == pytest.approx(ranks.mean())
    assert metrics["hits1"] == 0.0
    assert metrics["hits3"] == 1.0 and metrics["hits10"] == 1.0
    assert metrics["mrr_tail"] == pytest.approx(np.mean(1 / ranks[[0, 2]]))
    assert metrics["mrr_head"] == pytest.approx(np.mean(1 / ranks[[1, 3]]))


def test_link_prediction_raw_when_nothing_else_known():
    # Only the test triples are known: nothing else is filtered.
    # Ranks: (0, r0, 2) tail 3, head 3; (1, r1, 3) tail 2.5, head 2.5.
    ranks = np.array([3.0, 3.0, 2.5, 2.5])
    metrics = link_prediction(HAND_ENTITIES, HAND_RELATIONS, HAND_TEST, [HAND_TEST])
    assert metrics["mrr"] == pytest.approx(np.mean(1 / ranks))
    assert metrics["mean_rank"] == pytest.approx(ranks.mean())
    # The test triple's own target is never counted, whether or not it is in `known`.
    assert link_prediction(HAND_ENTITIES, HAND_RELATIONS, HAND_TEST, [])["mrr"] == metrics["mrr"]


def test_link_prediction_perfect_embeddings():
    triples, E, R = grid_graph(4)
    # Exact grid coordinates: h + r == t, every true answer at distance 0.
    coords = np.stack(np.meshgrid(np.arange(4), np.arange(4), indexing="ij"), -1)
    entities = coords.reshape(-1, 2).astype(np.float32) * 10
    relations = np.array([[10.0, 0.0], [0.0, 10.0]], np.float32)
    for norm in (1, 2):
        metrics = link_prediction(entities, relations, triples, [triples], norm=norm)
        assert metrics["mrr"] == 1.0 and metrics["hits1"] == 1.0 and metrics["mean_rank"] == 1.0
        assert metrics["count"] == len(triples)


def test_link_prediction_validation():
    with pytest.raises(ValueError, match="norm"):
        link_prediction(HAND_ENTITIES, HAND_RELATIONS, HAND_TEST, [], norm=3)
    with pytest.raises(ValueError, match="batch_size"):
        link_prediction(HAND_ENTITIES, HAND_RELATIONS, HAND_TEST, [], batch_size=0)
    with pytest.raises(ValueError, match=r"test\[1\]"):
        link_prediction(HAND_ENTITIES, HAND_RELATIONS, np.array([[0, 0, 1], [0, 2, 1]]), [])
    with pytest.raises(ValueError, match=r"known\[0\]\[0\]"):
        link_prediction(HAND_ENTITIES, HAND_RELATIONS, HAND_TEST, [np.array([[9, 0, 0]])])
    with pytest.raises(ValueError, match="relations"):
        link_prediction(HAND_ENTITIES, np.zeros((2, 3), np.float32), HAND_TEST, [])
    with pytest.raises(ValueError, match="non-finite"):
        link_prediction(HAND_ENTITIES * np.nan, HAND_RELATIONS, HAND_TEST, [])


# --- fingerprint ------------------------------------------------------------------------------


def test_fingerprint_depends_on_values_and_shapes():
    rng = np.random.default_rng(0)
    ent = rng.standard_normal((6, 4)).astype(np.float32)
    rel = rng.standard_normal((2, 4)).astype(np.float32)
    base = embeddings_fingerprint(ent, rel)
    assert isinstance(base, str) and len(base) == 16
    assert base == embeddings_fingerprint(ent.copy(), rel.astype(np.float64))
    changed = ent.copy()
    changed[3, 1] += 1e-3
    assert embeddings_fingerprint(changed, rel) != base
    assert embeddings_fingerprint(ent.reshape(4, 6), rel) != base
    assert embeddings_fingerprint(ent, rel[:1]) != base


def test_result_type():
    result = train_transe(random_graph(), 50, 4, dataclasses.replace(SMALL, epochs=1))
    assert isinstance(result, TransEResult)
    state = result.optimizer_state
    assert sorted(state) == ["entity_m", "entity_v", "relation_m", "relation_v", "step"]
    assert state["step"] == 7  # 400 triples in batches of 64
    assert state["entity_m"].shape == (50, 16) and np.abs(state["entity_v"]).max() > 0


# --- self-adversarial loss -----------------------------------------------------------------------


@pytest.mark.parametrize("shared", [0, 8])
def test_self_adversarial_loss_learns_translational_graph(shared):
    params = dataclasses.replace(
        SMALL, norm=2, loss="self_adversarial", margin=2.0, lr=0.02, epochs=80, batch_size=16,
        shared_negatives=shared, num_negatives=1 if shared else 4, normalize_entities=False,
    )
    losses = learn_planted_graph(params)
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])


# --- partitioned training (PyTorch-BigGraph buckets) ------------------------------------------


@pytest.mark.parametrize("E,P", [(10, 1), (10, 3), (7, 7), (2_150_000, 8)])
def test_partitions_cover_ids_in_order(E, P):
    bounds = partition_bounds(E, P)
    assert bounds[0] == 0 and bounds[-1] == E and len(bounds) == P + 1
    sizes = np.diff(bounds)
    assert sizes.min() >= 1 and sizes.max() - sizes.min() <= 1
    ids = np.array([0, E - 1, E // 2])
    part = entity_partition(ids, bounds)
    assert ((bounds[part] <= ids) & (ids < bounds[part + 1])).all()


def test_partition_count_is_checked():
    with pytest.raises(ValueError, match="num_partitions=0"):
        partition_bounds(10, 0)
    with pytest.raises(ValueError, match="num_partitions=11"):
        partition_bounds(10, 11)


@pytest.mark.parametrize("P,W", [(1, 1), (1, 2), (4, 2), (5, 2), (8, 3)])
def test_bucket_schedule_rounds_are_disjoint_and_cover_every_bucket(P, W):
    rounds = bucket_schedule(P, W, seed=0, epoch=3)
    seen = [b for round_ in rounds for b in round_ if b is not None]
    assert sorted(seen) == [(i, j) for i in range(P) for j in range(P)]
    for round_ in rounds:
        assert len(round_) == W and any(b is not None for b in round_)
        parts = [p for b in round_ if b is not None for p in set(b)]
        assert len(parts) == len(set(parts)), round_
    assert rounds == bucket_schedule(P, W, seed=0, epoch=3)  # the same on every worker
    if P >= 2 * W:
        assert len(rounds) <= 2 * P * P // W  # mostly full rounds


@pytest.mark.parametrize("P,W", [(4, 1), (8, 2)])
def test_bucket_schedule_keeps_a_partition_between_a_workers_rounds(P, W):
    """Most of a worker's consecutive buckets share a partition (kept in memory, not reloaded)."""
    rounds = bucket_schedule(P, W, seed=1, epoch=0)
    kept = total = 0
    for w in range(W):
        mine = [round_[w] for round_ in rounds if round_[w] is not None]
        kept += sum(not set(a).isdisjoint(b) for a, b in zip(mine, mine[1:]))
        total += len(mine) - 1
    assert kept >= 0.6 * total, (kept, total)


def test_partitioned_training_learns_translational_graph():
    """Buckets trained one at a time over two partitions, as the Ray workers do."""
    triples, E, R = planted_graph(E=40, R=3)
    params = dataclasses.replace(SMALL, lr=0.02, batch_size=16, num_negatives=4)
    P = 2
    bounds = partition_bounds(E, P)
    rng = np.random.default_rng(0)
    ent = torch.from_numpy(rng.uniform(-0.4, 0.4, (E, 16)).astype(np.float32))
    rel = torch.from_numpy(init_relations(R, 16, 0))
    moments = {k: torch.zeros(E, 16) for k in ("entity_m", "entity_v")}
    moments.update({k: torch.zeros(R, 16) for k in ("relation_m", "relation_v")})
    p_head = torch.full((R,), 0.5)
    hp, tp = entity_partition(triples[:, 0], bounds), entity_partition(triples[:, 2], bounds)
    first = last = None
    for epoch in range(60):
        for round_ in bucket_schedule(P, 1, 0, epoch):
            ((i, j),) = round_
            rows = np.concatenate([np.arange(bounds[i], bounds[i + 1])]
                                  + ([np.arange(bounds[j], bounds[j + 1])] if i != j else []))
            local = np.full(E, -1)
            local[rows] = np.arange(len(rows))
            mine = triples[(hp == i) & (tp == j)]
            bucket = np.stack([local[mine[:, 0]], mine[:, 1], local[mine[:, 2]]], 1)
            table = ent[rows].clone()
            held = {k: (v[rows].clone() if k.startswith("entity") else v) for k, v in moments.items()}
            opt = RowOptimizer(params, {"entity": table, "relation": rel}, held)
            stats = train_bucket(bucket, table, rel, opt, p_head, params, (0, epoch, i * P + j))
            assert stats["triples"] == len(bucket)
            ent[rows] = table
            for k in ("entity_m", "entity_v"):
                moments[k][rows] = held[k]
            if stats["triples"]:
                loss = stats["loss_sum"] / stats["pairs"]
                first = loss if first is None else first
                last = loss
    assert last < 0.5 * first
    ent = ent / ent.norm(dim=1, keepdim=True)
    assert link_prediction(ent.numpy(), rel.numpy(), triples, [triples])["mrr"] > 0.7


def test_row_optimizer_checks_given_moments():
    params = TransEParams(dim=4)
    table = torch.zeros(5, 4)
    with pytest.raises(ValueError, match=r"moments\['entity_m'\]: shape \(3, 4\)"):
        RowOptimizer(params, {"entity": table}, {"entity_m": torch.zeros(3, 4)})
    row_wise = TransEParams(dim=4, optimizer="row_adagrad")
    with pytest.raises(ValueError, match=r"moments\['entity_sum'\]: shape \(5, 4\), expected \(5, 1\)"):
        RowOptimizer(row_wise, {"entity": table}, {"entity_sum": torch.zeros(5, 4)})
