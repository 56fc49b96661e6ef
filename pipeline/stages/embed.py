"""Embed stage: TransE entity and relation vectors for the memory.

Either reads user-supplied embeddings (``key<TAB>v1 ... vd`` text files, keys normalised like the
knowledge base's) or trains TransE on the ingested facts inside one Ray task. Training writes a
checkpoint every few epochs beside the run directory's staging area, so a killed run resumes its
TransE schedule rather than restarting it.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import numpy as np
import ray

from hmn.config import EmbedConfig
from hmn.embedding_files import align_embeddings, read_embeddings
from hmn.transe import TransEParams, embeddings_fingerprint, link_prediction, train_transe
from pipeline.artifacts import KnowledgeBase, write_vectors

log = logging.getLogger(__name__)


def transe_params(cfg: EmbedConfig) -> TransEParams:
    return TransEParams(dim=cfg.dim, norm=cfg.norm, margin=cfg.margin, lr=cfg.lr, epochs=cfg.epochs,
                        batch_size=cfg.batch_size, negatives=cfg.negatives,
                        num_negatives=cfg.num_negatives, seed=cfg.seed)


def _train_task(triples: np.ndarray, num_entities: int, num_relations: int, cfg: EmbedConfig,
                checkpoint: str) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """Runs inside a Ray task: TransE with a checkpoint (tables + Adam state) every few epochs.

    A checkpoint left by a killed run is resumed exactly (same random draws, same optimiser
    moments), so the resumed embeddings equal those of an uninterrupted run.
    """
    import torch

    torch.set_num_threads(cfg.num_cpus)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    params = transe_params(cfg)
    init, start, history, opt_state = None, 0, [], None
    if os.path.exists(checkpoint):
        state = torch.load(checkpoint, weights_only=False)
        init, start = (state["entities"], state["relations"]), state["epoch"]
        history, opt_state = state["history"], state["optimizer_state"]
        log.info("TransE: resuming from the checkpoint at epoch %d", start)
    if start >= cfg.epochs:
        return init[0], init[1], history
    every = max(1, cfg.epochs // 10)

    def progress(h: dict) -> None:
        record = {k: v for k, v in h.items() if k not in ("entities", "relations", "optimizer_state")}
        history.append(record)
        epoch = record["epoch"] + 1
        if epoch % every == 0 or epoch == cfg.epochs:
            log.info("TransE epoch %d/%d loss %.4f (%.0f triples/s)", epoch, cfg.epochs,
                     record["loss"], record.get("triples_per_s", 0.0))
            tmp = checkpoint + ".tmp"
            torch.save({"entities": h["entities"].copy(), "relations": h["relations"].copy(),
                        "optimizer_state": h["optimizer_state"], "epoch": epoch, "history": list(history)}, tmp)
            os.replace(tmp, checkpoint)

    res = train_transe(triples, num_entities, num_relations, params, init=init, start_epoch=start,
                       progress=progress, optimizer_state=opt_state)
    return res.entities, res.relations, history


def run_embed(cfg: EmbedConfig, ingest_dir: Path, out: Path, checkpoint_dir: Path) -> dict:
    kb = KnowledgeBase.load(ingest_dir)
    E, R = len(kb.entity_keys), len(kb.relation_keys)
    stats: dict = {"entities": E, "relations": R}
    if cfg.entities_file:
        ent, missing_e = _load(cfg, cfg.entities_file, cfg.entities_keys, kb.entity_keys, cfg.seed, "entity")
        rel, missing_r = _load(cfg, cfg.relations_file, cfg.relations_keys, kb.relation_keys, cfg.seed + 1,
                               "relation")
        stats.update(source="files", format=cfg.format, missing_policy=cfg.missing,
                     missing_entities=missing_e, missing_relations=missing_r)
    else:
        triples = kb.triples()
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        ckpt = str(checkpoint_dir / "transe.pt")
        task = ray.remote(num_cpus=cfg.num_cpus)(_train_task)
        log.info("TransE on %d triples, %d entities, %d relations, %d epochs", len(triples), E, R, cfg.epochs)
        ent, rel, history = ray.get(task.remote(triples, E, R, cfg, ckpt))
        # Link prediction on a sample of the training triples: a sanity figure, not a benchmark.
        rng = np.random.default_rng(cfg.seed)
        sample = triples[rng.choice(len(triples), size=min(1000, len(triples)), replace=False)]
        lp = link_prediction(ent, rel, sample, [triples], norm=cfg.norm)
        stats.update(source="transe", triples=len(triples), history=history,
                     train_sample_mrr=lp["mrr"], train_sample_hits10=lp["hits10"],
                     final_loss=float(history[-1]["loss"]) if history else None)
    if not (np.isfinite(ent).all() and np.isfinite(rel).all()):
        raise ValueError("embed: the embeddings contain NaN or Inf")
    write_vectors(out / "entities.parquet", ent)
    write_vectors(out / "relations.parquet", rel)
    stats["fingerprint"] = embeddings_fingerprint(ent, rel)
    stats["dim"] = int(ent.shape[1])
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return stats


def _load(cfg: EmbedConfig, path: str, keys_path: str, kb_keys: np.ndarray, seed: int,
          what: str) -> tuple[np.ndarray, int]:
    """Rows of an embedding file in knowledge-base id order; missing keys per `embed.missing`."""
    keys, vectors = read_embeddings(path, fmt=cfg.format, keys_path=keys_path or None, expected_dim=cfg.dim)
    aligned, missing = align_embeddings(list(kb_keys), keys, vectors, policy=cfg.missing, seed=seed,
                                        what=what, source=path)
    if missing:
        log.warning("%s: %d %s keys of the knowledge base had no embedding; initialised (embed.missing=init)",
                    path, missing, what)
    return aligned, missing
