"""TransE on FB15k-237: filtered link prediction against published numbers, speed against PyKEEN.

    .venv/bin/python benchmarks/transe_fb15k237.py [--set field=value ...] [--threads 2]
        [--valid-every 5] [--valid-limit 5000] [--pykeen-batches 20] [--no-pykeen]
        [--speed-only] [--no-test] [--data ../shared/data/fb15k-237]
        [--ray-workers W --partitions P] [--compare NAME:field=value,...] [--out FILE]

With ``--valid-every n`` the filtered MRR on the first ``--valid-limit`` valid triples is measured
every n epochs and after the last; the test set is ranked with the tables of the best of these
(model selection on validation, as published results do).

Trains ``hmn.transe.train_transe`` on train.txt (``head<TAB>relation<TAB>tail``) with the
configuration ``CHOSEN`` below overridden by ``--set`` (converted by the dataclass field types), then
ranks test.txt in the filtered setting (train + valid + test as known triples). Published TransE
on FB15k-237: filtered MRR 0.29-0.33, Hits@10 0.47-0.52 (LibKGE: MRR 0.313, Hits@10 0.497).

Speed: positive triples per second over one epoch, ours (median over the trained epochs) beside
PyKEEN's ``TransE`` trained by its ``SLCWATrainingLoop`` for one epoch with the same dimension,
norm, loss (``MarginRankingLoss``, or ``NSSALoss`` for the self-adversarial loss), Adam learning rate, batch size, number of negatives per positive
(PyKEEN draws them per triple with its Bernoulli or basic sampler; ours may share them across a
batch, see ``TransEParams.shared_negatives``), CPU and torch threads. ``--pykeen-batches n``
times only PyKEEN's batches 2..n+1 of the epoch (for configurations where a whole epoch is slow).

``--ray-workers W --partitions P`` trains with the embed stage's Ray Train loop instead
(``pipeline.stages.embed.train_transe_on_ray``: W gloo workers over P PyTorch-BigGraph entity
partitions), to check that the partitioned design keeps the quality; it has no validation curve,
so the last epoch is tested.

``--compare NAME:field=value,...`` (repeatable) trains each variant of the configuration after it
in the same run, on the same data, threads and evaluation (e.g. the row-wise Adagrad optimiser
against Adam); their results are the JSON's ``variants``.

Last printed line: one JSON object with ``mrr``, ``hits10``, ``triples_per_s``,
``pykeen_triples_per_s``, the resolved config and the wall times.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hmn.transe import (  # noqa: E402
    TransEResult,
    embeddings_fingerprint,
    head_corruption_probs,
    link_prediction,
    train_transe,
)
from hmn.transe_params import TransEParams  # noqa: E402

logger = logging.getLogger("transe_fb15k237")
SPLITS = ("train", "valid", "test")

# The configuration that reaches the published numbers on this 2-core budget (``--set`` overrides
# it field by field; ``--set loss=margin ...`` gives back the Bordes 2013 loss). RotatE's TransE
# (Sun et al. 2019): self-adversarial negative sampling, gamma = margin; here 200-d, L2, 256
# negatives shared by a batch (one matmul), no entity normalisation, Adam 0.01 decaying to 0.001.
CHOSEN = {
    "dim": 200,
    "norm": 2,
    "loss": "self_adversarial",
    "adversarial_temperature": 1.0,
    "margin": 6.0,
    "shared_negatives": 256,
    "normalize_entities": False,
    "batch_size": 1024,
    "lr": 0.01,
    "lr_decay": 0.1,
    "epochs": 40,
    "negatives": "bern",
    "num_negatives": 1,
    "seed": 0,
}


def load_splits(data: Path) -> tuple[dict[str, np.ndarray], int, int]:
    """(T, 3) int64 id arrays per split; ids in order of first appearance over the splits."""
    entities: dict[str, int] = {}
    relations: dict[str, int] = {}
    out = {}
    for split in SPLITS:
        rows = []
        path = data / f"{split}.txt"
        with open(path) as handle:
            for number, line in enumerate(handle, 1):
                parts = line.rstrip("\n").split("\t")
                if len(parts) != 3:
                    raise ValueError(f"{path}:{number}: expected head<TAB>relation<TAB>tail")
                h, r, t = parts
                rows.append(
                    (
                        entities.setdefault(h, len(entities)),
                        relations.setdefault(r, len(relations)),
                        entities.setdefault(t, len(entities)),
                    )
                )
        out[split] = np.array(rows, dtype=np.int64).reshape(-1, 3)
    return out, len(entities), len(relations)


def parse_overrides(pairs: list[str]) -> dict:
    """``field=value`` strings converted by the TransEParams field types; unknown fields fail."""
    types = {f.name: f.type for f in dataclasses.fields(TransEParams)}
    out = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or name not in types:
            raise SystemExit(f"--set {pair!r}: expected field=value, fields: {sorted(types)}")
        kind = str(types[name])
        if kind == "bool":
            if value.lower() not in ("true", "false", "1", "0"):
                raise SystemExit(f"--set {pair!r}: expected a bool")
            out[name] = value.lower() in ("true", "1")
        elif kind == "int":
            out[name] = int(value)
        elif kind == "float":
            out[name] = float(value)
        else:
            out[name] = value
    return out


def pykeen_speed(
    train: np.ndarray, num_entities: int, num_relations: int, params: TransEParams, batches: int
) -> dict:
    """PyKEEN TransE, one epoch (or ``batches`` timed batches) with the matching settings."""
    from pykeen.losses import MarginRankingLoss, NSSALoss
    from pykeen.models import TransE
    from pykeen.training import SLCWATrainingLoop
    from pykeen.training.callbacks import TrainingCallback
    from pykeen.triples import CoreTriplesFactory

    class Stop(Exception):
        pass

    class Clock(TrainingCallback):
        def __init__(self):
            super().__init__()
            self.batch_times: list[float] = []

        def post_batch(self, epoch, batch, **kwargs):  # noqa: ARG002
            self.batch_times.append(time.perf_counter())
            if batches and len(self.batch_times) > batches:
                raise Stop

    factory = CoreTriplesFactory.create(
        mapped_triples=torch.from_numpy(train),
        num_entities=num_entities,
        num_relations=num_relations,
    )
    model = TransE(
        triples_factory=factory,
        embedding_dim=params.dim,
        scoring_fct_norm=params.norm,
        loss=(
            MarginRankingLoss(margin=params.margin)
            if params.loss == "margin"
            else NSSALoss(
                margin=params.margin, adversarial_temperature=params.adversarial_temperature
            )
        ),
        random_seed=params.seed,
    )
    negatives = params.shared_negatives or params.num_negatives
    loop = SLCWATrainingLoop(
        model=model,
        triples_factory=factory,
        optimizer=torch.optim.Adam(model.parameters(), lr=params.lr),
        negative_sampler="bernoulli" if params.negatives == "bern" else "basic",
        negative_sampler_kwargs={"num_negs_per_pos": negatives},
    )
    clock = Clock()
    started = time.perf_counter()
    try:
        loop.train(
            triples_factory=factory,
            num_epochs=1,
            batch_size=params.batch_size,
            use_tqdm=False,
            pin_memory=False,
            callbacks=[clock],
        )
    except Stop:
        pass
    ended = time.perf_counter()
    if batches:
        seconds = clock.batch_times[-1] - clock.batch_times[0]
        triples = (len(clock.batch_times) - 1) * params.batch_size
    else:
        seconds, triples = ended - started, train.shape[0]
    return {
        "pykeen_triples_per_s": triples / seconds,
        "pykeen_seconds": seconds,
        "pykeen_timed_triples": triples,
        "pykeen_negatives_per_positive": negatives,
    }


def train_on_ray(
    train: np.ndarray, num_entities: int, num_relations: int, params: TransEParams, args
) -> TransEResult:
    """The embed stage's Ray Train loop (pipeline.stages.embed) on the FB15k-237 triples."""
    import tempfile

    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from hmn.config import EmbedConfig
    from pipeline.stages.embed import train_transe_on_ray

    cfg = EmbedConfig(
        **dataclasses.asdict(params),
        num_workers=args.ray_workers,
        num_partitions=args.partitions,
        num_cpus=args.threads,
        max_failures=0,
    )
    cfg.validate()
    p_head = head_corruption_probs(train, num_relations, params.negatives)
    with tempfile.TemporaryDirectory() as tmp:
        kb = Path(tmp, "ingest", "kb")
        kb.mkdir(parents=True)
        pq.write_table(
            pa.table(
                {
                    "fact_id": pa.array(np.arange(len(train))),
                    "subject_id": pa.array(train[:, 0]),
                    "relation_id": pa.array(train[:, 1]),
                    "object_ids": pa.array(train[:, 2:3].tolist(), pa.list_(pa.int64())),
                }
            ),
            kb / "facts.parquet",
        )
        ray.init(
            num_cpus=max(4, args.ray_workers * args.threads + 2),
            include_dashboard=False,
            log_to_driver=False,
        )
        try:
            ent, rel, history = train_transe_on_ray(
                cfg, Path(tmp, "ingest"), num_entities, num_relations, p_head, Path(tmp, "shared")
            )
        finally:
            ray.shutdown()
    return TransEResult(entities=ent, relations=rel, history=history)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--set", action="append", default=[], help="TransEParams field=value")
    parser.add_argument(
        "--compare",
        action="append",
        default=[],
        metavar="NAME:field=value,...",
        help="also train this variant of the configuration (e.g. "
        "row_adagrad:optimizer=row_adagrad,lr=0.3), after it in the same run; its results go "
        "to the JSON's 'variants'",
    )
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/fb15k-237")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--valid-every", type=int, default=5, help="epochs between valid evals")
    parser.add_argument("--valid-limit", type=int, default=5000, help="valid triples per eval")
    parser.add_argument("--pykeen-batches", type=int, default=20, help="0 = the whole epoch")
    parser.add_argument("--no-pykeen", action="store_true")
    parser.add_argument("--speed-only", action="store_true", help="one epoch, no evaluation")
    parser.add_argument("--no-test", action="store_true", help="skip the test evaluation")
    parser.add_argument(
        "--ray-workers",
        type=int,
        default=-1,
        help=">= 0: train with the embed stage's Ray Train loop (PyTorch-BigGraph "
        "partitions; 0 = local mode) instead of train_transe; no validation",
    )
    parser.add_argument(
        "--partitions", type=int, default=1, help="entity partitions (--ray-workers)"
    )
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)

    given = parse_overrides(args.set)
    overrides = {**CHOSEN, **given}
    if args.speed_only:
        overrides["epochs"] = given.get("epochs", 1)
        args.valid_every = 0
    params = TransEParams(**overrides)
    params.validate()
    variants = {}
    for spec in args.compare:
        name, sep, pairs = spec.partition(":")
        if not sep or not name:
            raise SystemExit(f"--compare {spec!r}: expected NAME:field=value,...")
        variants[name] = dataclasses.replace(params, **parse_overrides(pairs.split(",")))
        variants[name].validate()
    ids, num_entities, num_relations = load_splits(args.data)
    logger.info(
        "E=%d R=%d %s %s threads=%d",
        num_entities,
        num_relations,
        {split: len(arr) for split, arr in ids.items()},
        params,
        torch.get_num_threads(),
    )
    out = run_config(params, ids, num_entities, num_relations, args)
    if variants:
        out["variants"] = {
            name: run_config(variant, ids, num_entities, num_relations, args)
            for name, variant in variants.items()
        }
    out["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    out["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    line = json.dumps(out)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(line + "\n")
    print(line, flush=True)


def run_config(
    params: TransEParams, ids: dict, num_entities: int, num_relations: int, args
) -> dict:
    """Train ``params`` (validation curve, model selection), rank the test set and, unless
    ``--no-pykeen``, time PyKEEN on the same configuration; the benchmark's JSON fields."""
    known = [ids[split] for split in SPLITS]
    valid = ids["valid"][: args.valid_limit]
    valid_curve = []
    best: dict = {}  # the tables of the epoch with the best validation MRR

    def progress(info: dict) -> None:
        epoch = info["epoch"]
        logger.info(
            "epoch %d loss %.4f active %.3f %.2fs %.0f triples/s",
            epoch,
            info["loss"],
            info["active"],
            info["seconds"],
            info["triples_per_s"],
        )
        last = epoch == params.epochs - 1
        if args.valid_every and ((epoch + 1) % args.valid_every == 0 or last):
            entities = info["entities"].copy()
            if params.normalize_entities:  # as train_transe leaves them after the last epoch
                entities /= np.maximum(np.linalg.norm(entities, axis=1, keepdims=True), 1e-12)
            metrics = link_prediction(entities, info["relations"], valid, known, norm=params.norm)
            valid_curve.append(
                {"epoch": epoch + 1, "mrr": round(metrics["mrr"], 4), "hits10": metrics["hits10"]}
            )
            logger.info("valid@%d (%d triples) %s", epoch + 1, len(valid), valid_curve[-1])
            if metrics["mrr"] > best.get("mrr", -1.0):
                best.update(
                    mrr=metrics["mrr"],
                    epoch=epoch + 1,
                    entities=entities,
                    relations=info["relations"].copy(),
                )

    started = time.perf_counter()
    if args.ray_workers >= 0:
        result = train_on_ray(ids["train"], num_entities, num_relations, params, args)
    else:
        result = train_transe(ids["train"], num_entities, num_relations, params, progress=progress)
    train_seconds = time.perf_counter() - started
    epoch_rates = [rec["triples_per_s"] for rec in result.history]
    out: dict = {
        "config": dataclasses.asdict(params),
        "trainer": (
            f"ray_train(workers={args.ray_workers}, partitions={args.partitions})"
            if args.ray_workers >= 0
            else "train_transe"
        ),
        "threads": torch.get_num_threads(),
        "train_seconds": round(train_seconds, 1),
        "epoch_seconds_mean": round(float(np.mean([r["seconds"] for r in result.history])), 3),
        "valid_curve": valid_curve,
        "fingerprint": embeddings_fingerprint(result.entities, result.relations),
    }
    # Model selection on validation MRR: test the best validated epoch (the last one if none).
    entities, relations = result.entities, result.relations
    if best:
        entities, relations = best["entities"], best["relations"]
        out["selected_epoch"] = best["epoch"]
        out["selected_valid_mrr"] = round(best["mrr"], 4)
    if not (args.speed_only or args.no_test):
        started = time.perf_counter()
        metrics = link_prediction(entities, relations, ids["test"], known, norm=params.norm)
        out["eval_seconds"] = round(time.perf_counter() - started, 1)
        out["test"] = {k: round(v, 4) if isinstance(v, float) else v for k, v in metrics.items()}
        logger.info("test %s", out["test"])
    if not args.no_pykeen:
        speed = pykeen_speed(ids["train"], num_entities, num_relations, params, args.pykeen_batches)
        out.update({k: round(v, 1) if isinstance(v, float) else v for k, v in speed.items()})
    pykeen_rate = out.pop("pykeen_triples_per_s", None)
    return {
        "mrr": out.get("test", {}).get("mrr"),
        "hits10": out.get("test", {}).get("hits10"),
        # The median epoch: on a shared machine single epochs are slowed by other jobs.
        "triples_per_s": round(float(np.median(epoch_rates))),
        "triples_per_s_mean": round(float(np.mean(epoch_rates))),
        "pykeen_triples_per_s": None if pykeen_rate is None else round(pykeen_rate),
        **out,
    }


if __name__ == "__main__":
    main()
