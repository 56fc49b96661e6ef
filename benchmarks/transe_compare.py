"""TransE on FB15k-237: hmn against PyTorch-BigGraph and PyKEEN, like for like.

    .venv/bin/pip install -e '.[bench]'       # pykeen, torchbiggraph (and setuptools<81)
    .venv/bin/python benchmarks/transe_compare.py                          # full size
    .venv/bin/python benchmarks/transe_compare.py --epochs 1 --test-limit 2000   # smoke

One configuration (:class:`LikeForLike`) is translated into each system's settings
(:func:`ours_params`, :func:`pykeen_settings`, :func:`pbg_config`), and :func:`described`
reads back from each translation what it trains, so a test can check that the three are the same:

* model: TransE with the L2 distance, score -||h + r - t||_2; entities kept at norm 1 (ours
  projects the rows a batch uses, PyKEEN's ``functional.normalize`` constrainer projects them
  after every step, PBG's ``max_norm=1`` rescales rows above norm 1 when it reads them);
* loss: the margin ranking loss max(0, margin + d(pos) - d(neg)) with the same margin (ours and
  PyKEEN average it over the pairs, PBG sums it);
* negatives per positive: ``negatives`` corrupted triples per positive, half with a random head
  and half with a random tail in expectation (ours ``unif``, PyKEEN's basic sampler) or exactly
  (PBG: ``negatives / 2`` uniform entities per side, ``num_batch_negs=0``, shared by chunks of
  ``negatives / 2`` positives);
* dimension, batch size, epochs, seed, and the CPU: ``threads`` torch threads for ours and PyKEEN,
  ``threads`` Hogwild worker processes of one thread each for PBG (its only mode).

What cannot be the same: the optimiser.  PBG trains with Adagrad only (row-wise for entities);
ours uses row-sparse (lazy) Adam and PyKEEN torch's dense Adam, at ``--lr``; PBG at
``--pbg-lr``.  Their initialisations are each system's own.

Evaluation: every system's tables are exported and ranked by one function, hmn's
``link_prediction`` (filtered, train + valid + test known, both sides, ties count half), on the
test triples (the first ``--test-limit`` if given).  PBG scores an edge (lhs, rel, rhs) as
-||lhs - (rhs + t_rel)||, so it is fed (tail, rel, head): its translation t_rel is TransE's r.

Speed: training triples per second of the median epoch (each system's epoch clock: ours its
history, PyKEEN a ``post_epoch`` callback, PBG the time between the buckets its training yields,
partition I/O included, its first epoch also loading and starting its worker processes), and
over the whole training call (``..._wall``).  ``train_cpu_seconds`` adds the CPU time of this
process and of PBG's workers (steadier than wall time where other jobs share the cores).  Runs:
ours, then PyKEEN, then PBG, once each (``--systems`` picks).

Last line printed: the JSON written to ``--out`` (``triples_per_s``, ``pbg_triples_per_s``,
``pykeen_triples_per_s``, ``mrr``, ``pbg_mrr``, ``pykeen_mrr``, ``hits10``, ``pbg_hits10``,
``pykeen_hits10``, the configuration and each system's settings).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from transe_fb15k237 import SPLITS, load_splits  # noqa: E402

from hmn.transe import link_prediction, train_transe  # noqa: E402
from hmn.transe_params import TransEParams  # noqa: E402

logger = logging.getLogger("bench.transe_compare")
SYSTEMS = ("ours", "pykeen", "pbg")
BENCH_EXTRA = "pip install -e '.[bench]'"


@dataclasses.dataclass(frozen=True)
class LikeForLike:
    """The settings all three systems train with (see the module doc)."""

    dim: int = 200
    margin: float = 1.0
    negatives: int = 2  # negative triples per positive; even: PBG corrupts both sides equally
    batch_size: int = 1000
    epochs: int = 100
    threads: int = 2
    seed: int = 0
    lr: float = 0.005  # Adam: ours and PyKEEN
    pbg_lr: float = 0.1  # Adagrad: PBG

    def validate(self) -> None:
        for name in ("dim", "negatives", "batch_size", "epochs", "threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: must be an int >= 1")
        if self.negatives % 2:
            raise ValueError(f"negatives={self.negatives}: must be even (PBG corrupts head and "
                             "tail with the same number of entities)")
        for name in ("margin", "lr", "pbg_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be > 0")


def ours_params(cfg: LikeForLike) -> TransEParams:
    """hmn's TransEParams for ``cfg``."""
    params = TransEParams(dim=cfg.dim, norm=2, margin=cfg.margin, lr=cfg.lr, epochs=cfg.epochs,
                          batch_size=cfg.batch_size, negatives="unif",
                          num_negatives=cfg.negatives, shared_negatives=0, loss="margin",
                          normalize_entities=True, lr_decay=1.0, seed=cfg.seed)
    params.validate()
    return params


def pykeen_settings(cfg: LikeForLike) -> dict:
    """PyKEEN's TransE, loss, sampler and training-loop arguments for ``cfg`` (plain values)."""
    return {"model": "TransE", "embedding_dim": cfg.dim, "scoring_fct_norm": 2,
            "power_norm": False, "entity_constrainer": "normalize", "loss": "MarginRankingLoss",
            "margin": cfg.margin, "negative_sampler": "basic", "corruption_scheme": ("head", "tail"),
            "num_negs_per_pos": cfg.negatives, "batch_size": cfg.batch_size,
            "num_epochs": cfg.epochs, "optimizer": "Adam", "lr": cfg.lr,
            "random_seed": cfg.seed, "torch_threads": cfg.threads}


def pbg_config(cfg: LikeForLike, num_relations: int, paths: dict[str, str] | None = None) -> dict:
    """PyTorch-BigGraph's config dict for ``cfg``: one entity type, one static relation type per
    relation (each batch holds one relation; its translation applies to the rhs)."""
    paths = paths or {"entity_path": "", "edge_paths": [""], "checkpoint_path": ""}
    return {
        **paths,
        "entities": {"all": {"num_partitions": 1}},
        "relations": [{"name": f"r{r}", "lhs": "all", "rhs": "all", "operator": "translation"}
                      for r in range(num_relations)],
        "dimension": cfg.dim, "global_emb": False, "bias": False, "comparator": "l2",
        "max_norm": 1.0, "loss_fn": "ranking", "margin": cfg.margin,
        "num_batch_negs": 0, "num_uniform_negs": cfg.negatives // 2,
        "batch_size": cfg.batch_size, "num_epochs": cfg.epochs, "lr": cfg.pbg_lr,
        "workers": cfg.threads, "eval_fraction": 0.0, "verbose": 0,
    }


def described(system: str, settings) -> dict:
    """What a system's settings train, in one vocabulary (read back, not copied from cfg)."""
    if system == "ours":
        p: TransEParams = settings
        return {"model": f"TransE-L{p.norm}", "dim": p.dim, "loss": f"{p.loss}-ranking",
                "margin": p.margin, "unit_entities": p.normalize_entities,
                "negatives_per_positive": p.shared_negatives or p.num_negatives,
                "corrupted_sides": "head+tail" if p.negatives == "unif" else p.negatives,
                "batch_size": p.batch_size, "epochs": p.epochs, "seed": p.seed}
    if system == "pykeen":
        s = settings
        return {"model": f"{s['model']}-L{s['scoring_fct_norm']}" + ("^p" if s["power_norm"] else ""),
                "dim": s["embedding_dim"],
                "loss": "margin-ranking" if s["loss"] == "MarginRankingLoss" else s["loss"],
                "margin": s["margin"], "unit_entities": s["entity_constrainer"] == "normalize",
                "negatives_per_positive": s["num_negs_per_pos"],
                "corrupted_sides": "head+tail" if tuple(s["corruption_scheme"]) == ("head", "tail")
                else "+".join(s["corruption_scheme"]),
                "batch_size": s["batch_size"], "epochs": s["num_epochs"], "seed": s["random_seed"]}
    if system == "pbg":
        c = settings
        ops = {r["operator"] for r in c["relations"]}
        model = ("TransE-L2" if ops == {"translation"} and c["comparator"] == "l2"
                 and not c["global_emb"] and not c["bias"] else f"{ops}-{c['comparator']}")
        sides = int(not c.get("disable_lhs_negs", False)) + int(not c.get("disable_rhs_negs", False))
        return {"model": model, "dim": c["dimension"],
                "loss": "margin-ranking" if c["loss_fn"] == "ranking" else c["loss_fn"],
                "margin": c["margin"], "unit_entities": c.get("max_norm") == 1.0,
                "negatives_per_positive": sides * (c["num_uniform_negs"] + c["num_batch_negs"]),
                "corrupted_sides": "head+tail" if sides == 2 else "one",
                "batch_size": c["batch_size"], "epochs": c["num_epochs"], "seed": None}
    raise ValueError(f"system={system!r}: known {SYSTEMS}")


def _need(module: str):
    try:
        return __import__(module)
    except ImportError as err:
        raise SystemExit(f"benchmarks/transe_compare.py needs {module}: {BENCH_EXTRA} "
                         "(the 'bench' extra)") from err


def _cpu_seconds() -> float:
    """CPU seconds of this process and its reaped children (PBG's worker processes)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _rate(triples: int, seconds: list[float]) -> float:
    return triples / statistics.median(seconds) if seconds else float("nan")


def train_ours(train: np.ndarray, E: int, R: int, cfg: LikeForLike) -> dict:
    torch.set_num_threads(cfg.threads)
    started = time.perf_counter()
    res = train_transe(train, E, R, ours_params(cfg))
    wall = time.perf_counter() - started
    return {"entities": res.entities, "relations": res.relations, "wall_seconds": wall,
            "epoch_seconds": [h["seconds"] for h in res.history]}


def train_pykeen(train: np.ndarray, E: int, R: int, cfg: LikeForLike) -> dict:
    _need("pykeen")
    from pykeen.losses import MarginRankingLoss
    from pykeen.models import TransE
    from pykeen.training import SLCWATrainingLoop
    from pykeen.training.callbacks import TrainingCallback
    from pykeen.triples import CoreTriplesFactory

    s = pykeen_settings(cfg)
    torch.set_num_threads(s["torch_threads"])

    class EpochClock(TrainingCallback):
        def __init__(self):
            super().__init__()
            self.marks = [time.perf_counter()]

        def post_epoch(self, epoch, epoch_loss, **kwargs):  # noqa: ARG002
            self.marks.append(time.perf_counter())

    factory = CoreTriplesFactory.create(mapped_triples=torch.from_numpy(train),
                                        num_entities=E, num_relations=R)
    model = TransE(triples_factory=factory, embedding_dim=s["embedding_dim"],
                   scoring_fct_norm=s["scoring_fct_norm"], power_norm=s["power_norm"],
                   loss=MarginRankingLoss(margin=s["margin"]), random_seed=s["random_seed"])
    loop = SLCWATrainingLoop(
        model=model, triples_factory=factory,
        optimizer=torch.optim.Adam(model.parameters(), lr=s["lr"]),
        negative_sampler=s["negative_sampler"],
        negative_sampler_kwargs={"num_negs_per_pos": s["num_negs_per_pos"],
                                 "corruption_scheme": s["corruption_scheme"]})
    clock = EpochClock()
    clock.marks[0] = started = time.perf_counter()
    loop.train(triples_factory=factory, num_epochs=s["num_epochs"], batch_size=s["batch_size"],
               use_tqdm=False, pin_memory=False, callbacks=[clock])
    wall = time.perf_counter() - started
    with torch.no_grad():
        ent = model.entity_representations[0](indices=None).cpu().numpy()
        rel = model.relation_representations[0](indices=None).cpu().numpy()
    return {"entities": np.ascontiguousarray(ent, np.float32),
            "relations": np.ascontiguousarray(rel, np.float32), "wall_seconds": wall,
            "epoch_seconds": np.diff(clock.marks).tolist()}


def _write_pbg_inputs(train: np.ndarray, E: int, root: Path) -> dict[str, str]:
    """PBG's entity count and its one edge bucket, fed (tail, rel, head) (see the module doc)."""
    from torchbiggraph.edgelist import EdgeList
    from torchbiggraph.entitylist import EntityList
    from torchbiggraph.graph_storages import EDGE_STORAGES, ENTITY_STORAGES

    paths = {"entity_path": str(root / "entities"), "edge_paths": [str(root / "edges")],
             "checkpoint_path": str(root / "checkpoints")}
    entities = ENTITY_STORAGES.make_instance(paths["entity_path"])
    entities.prepare()
    entities.save_count("all", 0, E)
    edges = EDGE_STORAGES.make_instance(paths["edge_paths"][0])
    edges.prepare()
    t = torch.from_numpy(np.ascontiguousarray(train, dtype=np.int64))
    edges.save_edges(0, 0, EdgeList(EntityList.from_tensor(t[:, 2].contiguous()),
                                     EntityList.from_tensor(t[:, 0].contiguous()),
                                     t[:, 1].contiguous()))
    return paths


def train_pbg(train: np.ndarray, E: int, R: int, cfg: LikeForLike) -> dict:
    _need("pkg_resources")  # torchbiggraph 1.0.0 imports it: setuptools<81 (the bench extra)
    _need("torchbiggraph")
    from torchbiggraph.checkpoint_manager import CheckpointManager
    from torchbiggraph.config import parse_config
    from torchbiggraph.train import train_and_report_stats

    with tempfile.TemporaryDirectory(prefix="pbg-") as tmp:
        paths = _write_pbg_inputs(train, E, Path(tmp))
        config = parse_config(pbg_config(cfg, R, paths))
        marks = [time.perf_counter()]
        for _ in train_and_report_stats(config):  # one bucket per epoch (one partition)
            marks.append(time.perf_counter())
        wall = marks[-1] - marks[0]
        manager = CheckpointManager(config.checkpoint_path)
        ent, _ = manager.read("all", 0)
        state, _ = manager.read_model()
    rel = np.zeros((R, cfg.dim), np.float32)
    found = 0
    for name, tensor in state.items():
        m = re.fullmatch(r"(?:.*\.)?rhs_operators\.(\d+)\.translation", name)
        if m:
            rel[int(m.group(1))] = tensor.numpy()
            found += 1
    if found != R:
        raise RuntimeError(f"PBG checkpoint: {found} relation translations, expected {R}: "
                           f"{sorted(state)[:8]}")
    torch.set_num_threads(cfg.threads)  # PBG's pool sets the parent's threads to 1
    return {"entities": np.ascontiguousarray(ent.numpy(), np.float32), "relations": rel,
            "wall_seconds": wall, "epoch_seconds": np.diff(marks).tolist()}


TRAINERS = {"ours": train_ours, "pykeen": train_pykeen, "pbg": train_pbg}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    defaults = LikeForLike()
    for f in dataclasses.fields(LikeForLike):
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)),
                        default=getattr(defaults, f.name))
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/fb15k-237")
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS)
    ap.add_argument("--test-limit", type=int, default=0, help="rank the first n test triples (0: all)")
    ap.add_argument("--out", type=Path, default=None,
                    help="default benchmarks/out/transe_compare.json "
                         "(transe_compare_smoke.json when --epochs <= 2)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(message)s")
    for name in ("torchbiggraph", "pykeen"):
        logging.getLogger(name).setLevel(logging.WARNING)
    cfg = LikeForLike(**{f.name: getattr(args, f.name) for f in dataclasses.fields(LikeForLike)})
    cfg.validate()
    smoke = cfg.epochs <= 2
    out_path = args.out or Path(f"benchmarks/out/transe_compare{'_smoke' if smoke else ''}.json")
    ids, E, R = load_splits(args.data)
    known = [ids[split] for split in SPLITS]
    test = ids["test"][: args.test_limit] if args.test_limit else ids["test"]
    settings = {"ours": ours_params(cfg), "pykeen": pykeen_settings(cfg),
                "pbg": pbg_config(cfg, R)}
    result: dict = {"config": dataclasses.asdict(cfg), "smoke": smoke, "data": str(args.data),
                    "entities": E, "relations": R, "train_triples": int(len(ids["train"])),
                    "test_triples": int(len(test)), "systems": args.systems,
                    "like_for_like": {s: described(s, settings[s]) for s in SYSTEMS},
                    "settings": {"ours": dataclasses.asdict(settings["ours"]),
                                 "pykeen": {k: v for k, v in settings["pykeen"].items()},
                                 "pbg": {k: v for k, v in settings["pbg"].items()
                                         if k != "relations"}}}
    for system in args.systems:
        logger.info("training %s: %s", system, result["like_for_like"][system])
        cpu0 = _cpu_seconds()
        run = TRAINERS[system](ids["train"], E, R, cfg)
        train_cpu = _cpu_seconds() - cpu0
        torch.set_num_threads(cfg.threads)
        started = time.perf_counter()
        metrics = link_prediction(run["entities"], run["relations"], test, known, norm=2)
        prefix = "" if system == "ours" else f"{system}_"
        n_train = len(ids["train"])
        result.update({
            f"{prefix}triples_per_s": _rate(n_train, run["epoch_seconds"]),
            f"{prefix}triples_per_s_wall": n_train * cfg.epochs / run["wall_seconds"],
            f"{prefix}mrr": metrics["mrr"], f"{prefix}hits10": metrics["hits10"],
        })
        result[f"{system}_run"] = {"epoch_seconds": run["epoch_seconds"],
                                   "train_wall_seconds": run["wall_seconds"],
                                   "train_cpu_seconds": train_cpu,
                                   "eval_seconds": time.perf_counter() - started,
                                   "test": metrics, "load_avg": list(os.getloadavg())}
        logger.info("%s: %.0f triples/s, MRR %.4f, Hits@10 %.4f", system,
                    result[f"{prefix}triples_per_s"], metrics["mrr"], metrics["hits10"])
    out_path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result)
    out_path.write_text(text + "\n")
    print(text, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
