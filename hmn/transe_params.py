"""TransE's settings, declared once: the type, default, help text and check of each.

`hmn.transe` trains with a `TransEParams`; `hmn.config.EmbedConfig` extends it with the embed
stage's own settings, so each TransE setting reaches the config files, ``--set`` overrides and
``--help-config`` from this one declaration. The defaults are the pipeline's (configs/smoke.yaml).
This module imports neither torch nor numpy, so that `hmn.config` stays cheap to import.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from numbers import Integral
from typing import Any

NORMS = (1, 2)
NEGATIVE_SAMPLERS = ("unif", "bern")
LOSSES = ("margin", "self_adversarial")
OPTIMIZERS = ("adam", "row_adagrad")


def _setting(default: Any, help: str, stable: bool = False) -> Any:
    """A setting; ``stable``: it counts in stage fingerprints only when it differs from its
    default (`hmn.config.fingerprint`), so adding it redoes no finished stage."""
    return field(default=default, metadata={"help": help, **({"stable": True} if stable else {})})


def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@dataclass(frozen=True)
class TransEParams:
    """Hyperparameters of one TransE training run.

    Attributes:
        dim: embedding dimension d.
        norm: distance of the score ``d(h + r, t)``: 1 = L1, 2 = L2.
        margin: margin of the ranking loss (Bordes 2013, eq. 1). Its scale follows the norm:
            L1 distances between unit vectors in 200-d reach ~28 and margins 4-8 work best on
            FB15k-237 (1 leaves few active pairs there); for L2 (distances <= ~3) use ~1.
        lr: the optimiser's learning rate.
        epochs: total epochs; a resumed run trains epochs ``start_epoch .. epochs - 1``.
        batch_size: positive triples per batch.
        negatives: "unif" (corrupt head or tail with probability 1/2) or "bern" (Wang et al.
            2014: corrupt the head with probability tph / (tph + hpt) of the triple's relation).
        num_negatives: corrupted triples per positive triple (k), each with its own random
            entity. Must stay 1 when ``shared_negatives`` is used.
        shared_negatives: if > 0, the number N of random entities drawn once per batch and
            shared by all its positives: each positive (h, r, t) is compared with the N
            corrupted triples that replace its head (or its tail, by unif / bern) with each of
            them. The B x N distances are one matrix product (L2) or one ``cdist`` (L1). On
            FB15k-237 (1 loaded core) N = 256 cost ~2x one per-triple negative an epoch with
            L2 and ~7x with L1 (``cdist`` backward); on 5-10 epochs it did not yet beat one
            negative per epoch of wall time. A shared entity equal to the replaced true
            entity is skipped. 0 keeps the per-triple sampling of ``num_negatives``.
        loss: "margin" (Bordes 2013, eq. 1) or "self_adversarial" (Sun et al. 2019, RotatE,
            eq. 5): ``-log sigmoid(margin - d_pos) - sum_j w_j log sigmoid(d_neg_j - margin)``,
            the two halves averaged, with ``w = softmax(adversarial_temperature * (margin -
            d_neg))`` over a positive's negatives, held constant in the gradient. ``margin``
            is then RotatE's gamma.
        adversarial_temperature: alpha of the self-adversarial weights; 0 weighs all the
            negatives of a positive equally (their mean).
        normalize_entities: project entity rows to unit L2 norm before they are used in a batch,
            and all rows at the end of training (Bordes 2013).
        lr_decay: ratio of the last epoch's learning rate to ``lr``; the rate decays
            geometrically per epoch, ``lr * lr_decay ** (epoch / (epochs - 1))``. 1 = constant.
        optimizer: "adam" (lazy Adam: two moments per element, 3 floats of state and rows per
            entity element) or "row_adagrad" (PyTorch-BigGraph's row-wise Adagrad for the
            entity table: one accumulated mean squared gradient per entity row, so an entity
            costs d + 1 floats instead of 3d; element-wise Adagrad for the small relation
            table). ``lr_decay`` applies to both.
        seed: seeds the initialisation, shuffles and negative samples.
    """

    dim: int = _setting(200, "TransE dimension (the paper: 200, so facts are 600-d)")
    norm: int = _setting(1, "TransE distance: 1 (L1) or 2 (L2)")
    margin: float = _setting(1.0, "margin of the ranking loss")
    lr: float = _setting(0.01, "learning rate")
    epochs: int = _setting(30, "TransE epochs")
    batch_size: int = _setting(1024, "triples per step")
    negatives: str = _setting("bern", "negative sampling: 'unif' or 'bern'")
    num_negatives: int = _setting(1, "negative triples per positive")
    shared_negatives: int = _setting(
        0,
        "if > 0: random entities shared by a batch's positives as their "
        "negatives (one matmul for L2); 0 = num_negatives per triple",
    )
    loss: str = _setting(
        "margin", "'margin' (Bordes 2013) or 'self_adversarial' (RotatE, Sun 2019; margin = gamma)"
    )
    adversarial_temperature: float = _setting(1.0, "alpha of the self-adversarial negative weights")
    normalize_entities: bool = _setting(
        True, "project entity rows to unit norm before use (Bordes 2013)"
    )
    lr_decay: float = _setting(
        1.0, "ratio of the last epoch's learning rate to lr (geometric per epoch)"
    )
    optimizer: str = _setting(
        "adam", "'adam' (lazy Adam) or 'row_adagrad' (PyTorch-BigGraph's row-wise Adagrad for "
        "entities: d + 1 floats an entity instead of 3d)", stable=True
    )
    seed: int = _setting(0, "seed")

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first offending setting: ``transe.<name>=<value>``."""
        self.check_settings("transe", ValueError)

    def check_settings(self, section: str, error: type[ValueError]) -> None:
        """Raise ``error("<section>.<name>=<value>: <why>")`` for the first invalid setting."""
        for name, why in self._problems(section):
            raise error(f"{section}.{name}={getattr(self, name)!r}: {why}")

    def _problems(self, section: str) -> Iterator[tuple[str, str]]:
        """(setting, why) of each invalid setting, in a fixed order; lazily, so that a check
        runs only when the ones before it passed."""
        for name in ("dim", "epochs", "batch_size", "num_negatives"):
            value = getattr(self, name)
            if not _is_int(value):
                yield name, "must be an int"
            elif value <= 0:
                yield name, "must be > 0"
        if not _is_int(self.shared_negatives) or self.shared_negatives < 0:
            yield "shared_negatives", "must be an int >= 0"
        if self.shared_negatives > 0 and self.num_negatives != 1:
            yield "num_negatives", (
                f"must be 1 when {section}.shared_negatives={self.shared_negatives} > 0"
            )
        if not (_is_finite(self.lr_decay) and 0 < self.lr_decay <= 1):
            yield "lr_decay", "must be in (0, 1]"
        if self.norm not in NORMS:
            yield "norm", f"must be one of {NORMS}"
        if not (_is_finite(self.margin) and self.margin > 0):
            yield "margin", "must be a finite number > 0"
        if not (_is_finite(self.lr) and self.lr > 0):
            yield "lr", "must be a finite number > 0"
        if self.negatives not in NEGATIVE_SAMPLERS:
            yield "negatives", f"must be one of {NEGATIVE_SAMPLERS}"
        if self.loss not in LOSSES:
            yield "loss", f"must be one of {LOSSES}"
        if self.optimizer not in OPTIMIZERS:
            yield "optimizer", f"must be one of {OPTIMIZERS}"
        if not (_is_finite(self.adversarial_temperature) and self.adversarial_temperature >= 0):
            yield "adversarial_temperature", "must be a finite number >= 0"
        if not isinstance(self.normalize_entities, bool):
            yield "normalize_entities", "must be a bool"
        if not _is_int(self.seed):
            yield "seed", "must be an int"
        elif self.seed < 0:
            yield "seed", "must be >= 0"


def optimizer_slots(params: TransEParams, table: str) -> dict[str, int]:
    """Per-row state of the optimiser for ``table`` ("entity" or "relation"): slot name -> floats
    a row. Adam: moments ``m`` and ``v`` of d floats each. Row-wise Adagrad: ``sum``, one float a
    row for the entities (PyTorch-BigGraph), d a row for the small relation table (element-wise
    Adagrad, as PyTorch-BigGraph does for relation parameters)."""
    d = params.dim
    if params.optimizer == "adam":
        return {"m": d, "v": d}
    return {"sum": 1 if table == "entity" else d}


def entity_row_floats(params: TransEParams) -> int:
    """float32 values stored per entity: its row plus the optimiser's state of it."""
    return params.dim + sum(optimizer_slots(params, "entity").values())
