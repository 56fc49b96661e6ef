"""Training cost against memory size (issue 15): questions per second of the clustered reader,
exact K-MIPS and full softmax at 29k, 1M and 10.8M facts, in one run.

For each size, the same procedure and the same batches:

* **memory**: the scaling memory of that size (``hmn.scaling``: the real SQ-32k facts, plus
  FB15k-237's, plus generated distractors), ingested by the ingest stage's code; the layout the
  memory stage picks (dense up to ``memory.dense_limit_gb``, factorised beyond).
* **embeddings**: the finished ``--model-run``'s TransE rows (a ``29k`` variant of
  ``--experiment scaling``) for the entities and relations it has; every other entity and
  relation gets a row drawn from a Gaussian with the real rows' per-dimension mean and standard
  deviation (stand-ins: TransE over 10.8M facts takes about an hour on 2 cores, and a step's cost
  depends on the memory's size and the index's shape, not on what the distractors' rows mean).
  At the run's own size the run's memory and index are used as they are.
* **index**: built here by the scaling rules of ``pipeline.experiments`` (flat ~15 facts a leaf up
  to 200k facts, [C1, C2] ~100 a leaf beyond, fitted on at most 1m facts, 0.5% of the leaves read
  from 1m facts), cached with the memory under ``--work``.
* **queries**: the run's trained encoder on the real dev questions; batches of ``--batch`` in file
  order, the same at every size and for every method.
* **a step**: encode -> reader -> K-softmax over the batch union plus gold (full softmax: over
  every fact) -> backward -> Adam, as the train stage's ``hmn.training.train_epoch`` does it; each
  (size, method) starts from the trained weights and a fresh optimiser, runs ``--warmup`` steps,
  then ``--steps`` timed steps. The clustered reader's time is split into its phases.

Reported per size and method: median seconds per step, questions per second, facts read per
question (the clustered reader's with its centroid products counted), softmax size; per size the
clustered reader's recall@10 against exact on the first batch; ``step_ratio_10m_vs_29k``
(clustered). The last line is the JSON object (its arguments in it); it is also written to
``benchmarks/out/train_throughput.json``.

    python benchmarks/train_throughput.py --model-run runs/sq-scaling/experiments/scaling/29k \\
        --data ../shared/data --sizes 29k,1m,10m --work runs/throughput
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hmn.config import load_config  # noqa: E402
from hmn.index import ClusterIndex, IndexSpec, build_index_from_vectors  # noqa: E402
from hmn.kb import KeyTables, match_questions  # noqa: E402
from hmn.memory import FactMemory, FactorisedMemory, build_fact_vectors  # noqa: E402
from hmn.model import full_softmax_loss, ksoftmax_loss, make_optimizer  # noqa: E402
from hmn.readers import make_reader, recall_at_k  # noqa: E402
from hmn.training import make_batch  # noqa: E402
from pipeline.artifacts import (  # noqa: E402
    KnowledgeBase,
    load_index,
    load_memory,
    load_model,
    read_questions,
    read_vectors,
)
from pipeline.experiments import centroid_products, scaling_variants, variant_config  # noqa: E402
from pipeline.stages.memory import choose_layout  # noqa: E402

log = logging.getLogger("train_throughput")
OUT = ROOT / "benchmarks" / "out" / "train_throughput.json"


# ---------------------------------------------------------------------------------------------
# memories
# ---------------------------------------------------------------------------------------------


def size_config(size: str, data_dir: str):
    """The clustered variant's config of ``size`` (configs/sq-scaling.yaml plus the rules)."""
    base = load_config(ROOT / "configs/sq-scaling.yaml", [f"scaling.data_dir={data_dir}"])
    variant = {v.name: v for v in scaling_variants(base)}[size]
    return variant_config(base, variant)


def _generate_and_ingest(cfg, work: Path) -> Path:
    """``work/generate`` (the scaling memory's files) and ``work/ingest`` (the ingest stage's
    output), each made once."""
    from hmn.scaling import ScalingSpec, Sources, build_memory
    from pipeline.stages.ingest import IngestSources, run_ingest

    gen, ing = work / "generate", work / "ingest"
    if not (gen / "realism.json").exists():
        t = time.perf_counter()
        build_memory(ScalingSpec.from_config(cfg.scaling), Sources.from_data_dir(cfg.scaling.data_dir),
                     str(gen))
        log.info("%s: memory files written in %.0f s", cfg.scaling.size, time.perf_counter() - t)
    if not (ing / "stats.json").exists():
        t = time.perf_counter()
        tmp = work / "ingest.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        run_ingest(IngestSources(facts=[str(gen / "kb.txt")], names=[str(gen / "names.tsv")],
                                 questions={"train": [str(gen / "questions_train.txt")],
                                            "dev": [str(gen / "questions_dev.txt")]}),
                   str(tmp))
        tmp.rename(ing)
        log.info("%s: ingested in %.0f s", cfg.scaling.size, time.perf_counter() - t)
    return ing


def _stand_in(real_keys: np.ndarray, real_rows: np.ndarray, keys: np.ndarray,
              rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Rows for ``keys``: the real row where the key has one, else a Gaussian draw with the real
    rows' per-dimension mean and std. Returns (rows, how many were real)."""
    pos = pc.index_in(pa.array(keys, pa.string()), value_set=pa.array(real_keys, pa.string()))
    real = pos.is_valid().to_numpy(zero_copy_only=False)
    idx = pos.fill_null(0).to_numpy().astype(np.int64)
    mean, std = real_rows.mean(0), real_rows.std(0)
    rows = (mean + std * rng.standard_normal((len(keys), real_rows.shape[1]))).astype(np.float32)
    rows[real] = real_rows[idx[real]]
    return rows, int(real.sum())


def build_size(size: str, cfg, model_run: Path, work: Path, seed: int):
    """(memory, index, KB keys, facts) of ``size``, built once into ``work/<size>``."""
    if size == cfg.scaling.size and (model_run / "memory" / "index").exists() and \
            json.loads((model_run / "generate" / "realism.json").read_text())["size"] == size:
        kb = KnowledgeBase.load(model_run / "ingest")
        return (load_memory(model_run / "memory"), load_index(model_run / "memory"), kb,
                "the run's own memory and index")
    d = work / size
    d.mkdir(parents=True, exist_ok=True)
    ingest = _generate_and_ingest(cfg, d)
    kb = KnowledgeBase.load(ingest)
    mem_dir = d / "memory"
    wanted = json.dumps(dataclasses.asdict(cfg.memory), sort_keys=True, default=list)
    made = mem_dir / "memory_config.json"
    if (mem_dir / "index").exists() and made.exists() and made.read_text() != wanted:
        log.info("%s: the cached index was built with other memory settings: rebuilding", size)
        shutil.rmtree(mem_dir)
    if not (mem_dir / "index").exists():
        real = KnowledgeBase.load(model_run / "ingest")
        rng = np.random.default_rng(seed)
        ent, ent_real = _stand_in(real.entity_keys, read_vectors(model_run / "embed/entities.parquet"),
                                  kb.entity_keys, rng)
        rel, rel_real = _stand_in(real.relation_keys,
                                  read_vectors(model_run / "embed/relations.parquet"),
                                  kb.relation_keys, rng)
        log.info("%s: %d of %d entity rows and %d of %d relation rows are the run's TransE rows",
                 size, ent_real, len(ent), rel_real, len(rel))
        mem_dir.mkdir(exist_ok=True)
        np.save(mem_dir / "entity_emb.npy", ent)
        np.save(mem_dir / "relation_emb.npy", rel)
        memory = _memory(kb, ent, rel, cfg)
        t = time.perf_counter()
        index = build_index_from_vectors(
            memory if isinstance(memory, FactorisedMemory) else memory.vectors,
            IndexSpec.from_config(cfg.memory),
            progress=lambda s: log.info("%s k-means %s", size, s))
        log.info("%s: index of %d leaves built in %.0f s", size, index.num_leaves,
                 time.perf_counter() - t)
        index.save(str(mem_dir / "index.tmp"))
        (mem_dir / "index.tmp").rename(mem_dir / "index")
        made.write_text(wanted)
    else:
        ent = np.load(mem_dir / "entity_emb.npy")
        rel = np.load(mem_dir / "relation_emb.npy")
        memory = _memory(kb, ent, rel, cfg)
    return memory, ClusterIndex.load(str(mem_dir / "index")), kb, \
        "scaling memory; the run's TransE rows where it has them, Gaussian stand-ins elsewhere"


def _memory(kb: KnowledgeBase, ent: np.ndarray, rel: np.ndarray, cfg):
    if choose_layout(cfg.memory, kb.num_facts, 3 * ent.shape[1]) == "dense":
        return FactMemory(torch.from_numpy(build_fact_vectors(
            ent, rel, kb.fact_subject, kb.fact_relation, kb.object_offsets, kb.object_values)))
    return FactorisedMemory(ent, rel, kb.fact_subject, kb.fact_relation, kb.object_offsets,
                            kb.object_values)


# ---------------------------------------------------------------------------------------------
# steps
# ---------------------------------------------------------------------------------------------


def dev_batches(model_run: Path, vocab, batch: int, count: int):
    """``count`` batches of the run's dev questions (file order): (token lists, gold subject key,
    gold relation key) each."""
    dev = read_questions(model_run / "ingest", "dev")
    kb = KnowledgeBase.load(model_run / "ingest")
    fact = dev["fact_id"].to_numpy()[: batch * count]
    texts = dev["question"].to_pylist()[: batch * count]
    if len(texts) < batch * count:
        raise SystemExit(f"{model_run}: {len(texts)} dev questions, fewer than {count} x {batch}")
    tokens, _ = vocab.encode_many(texts)
    subj = kb.entity_keys[kb.fact_subject[fact]]
    rel = kb.relation_keys[kb.fact_relation[fact]]
    return [(tokens[i:i + batch], subj[i:i + batch], rel[i:i + batch])
            for i in range(0, batch * count, batch)]


def gold_ids(batches, kb: KnowledgeBase) -> list[np.ndarray]:
    """Each batch's gold fact ids in ``kb`` (the real facts are in every memory)."""
    keys = KeyTables.from_facts(kb.entity_keys, kb.relation_keys, kb.fact_subject, kb.fact_relation)
    out = []
    for _, s, r in batches:
        m = match_questions(pa.array(s, pa.string()), pa.array(r, pa.string()), keys)
        if not m.found.all():
            raise SystemExit("a dev question's fact is missing from the memory")
        out.append(m.fact_id)
    return out


def _reader(method: str, memory, index, top_clusters: int, scan: str):
    """``clustered`` (the size's scan), ``clustered-exact-scan`` or ``exact``."""
    if method == "exact":
        return make_reader("exact", memory)
    reader = make_reader("clustered", memory, index, top_clusters=top_clusters,
                         scan="exact" if method == "clustered-exact-scan" else scan)
    reader.phase_seconds = {}
    return reader


def run_method(method: str, model_run: Path, memory, index, batches, golds, args,
               top_clusters: int, scan: str):
    """Warm-up plus timed steps of one method, from the trained weights and a fresh Adam."""
    model, _, _ = load_model(model_run / "train")
    model.train()
    opt = make_optimizer(model, "adam", 1e-3)
    reader = None
    if method != "full":
        reader = _reader(method, memory, index, top_clusters, scan)
    gen = torch.Generator().manual_seed(args.seed)
    seconds, touched, softmax, phases = [], [], [], []
    for i, ((tokens, _, _), gold) in enumerate(zip(batches, golds)):
        if hasattr(reader, "phase_seconds"):
            reader.phase_seconds = {}
        t0 = time.perf_counter()
        tok, off, g = make_batch(tokens, gold)
        q = model(tok, off)
        t_enc = time.perf_counter()
        if method == "full":
            out = full_softmax_loss(q, memory, g)
            read = float(memory.n)
        else:
            cands = reader.search(q.detach(), args.k, generator=gen)
            t_read = time.perf_counter()
            out = ksoftmax_loss(q, memory, cands.ids, g)
            read = float(cands.touched.float().mean())
        t_loss = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        t_back = time.perf_counter()
        opt.step()
        t1 = time.perf_counter()
        if i < args.warmup:
            continue
        seconds.append(t1 - t0)
        touched.append(read)
        softmax.append(out.softmax_size)
        ph = {"encode": t_enc - t0, "loss_forward": t_loss - (t_read if method != "full" else t_enc),
              "backward": t_back - t_loss, "adam": t1 - t_back}
        if method != "full":
            ph["reader"] = t_read - t_enc
            ph.update({f"reader_{k}": v for k, v in (getattr(reader, "phase_seconds", None) or {}).items()})
        phases.append(ph)
        log.info("%s step %d: %.3f s (%s)", method, i - args.warmup + 1, t1 - t0,
                 ", ".join(f"{k} {v:.3f}" for k, v in ph.items()))
    med = statistics.median(seconds)
    return {
        "steps": len(seconds), "step_seconds": seconds, "median_step_seconds": med,
        "questions_per_s": args.batch / med, "facts_read_per_question": float(np.mean(touched)),
        "softmax_size": float(np.mean(softmax)),
        "phase_seconds_median": {k: statistics.median(p[k] for p in phases) for k in phases[0]},
    }


def recalls(memory, index, batch, gold, model_run: Path, k: int, top_clusters: int,
            scan: str) -> dict:
    """On the first batch's trained queries: the clustered reader's recall@k against exact
    K-MIPS, and (with a compressed scan) the agreement of its top-k with the exact scan of the
    same leaves."""
    model, _, _ = load_model(model_run / "train")
    with torch.no_grad():
        tok, off, _ = make_batch(batch[0], gold)
        q = model(tok, off)
    exact = make_reader("exact", memory).search(q, k)
    approx = _reader("clustered", memory, index, top_clusters, scan).search(q, k)
    out = {"recall10_vs_exact": recall_at_k(approx, exact, k)}
    if scan != "exact":
        full = _reader("clustered-exact-scan", memory, index, top_clusters, scan).search(q, k)
        out["scan_agreement"] = recall_at_k(approx, full, k)
        out["recall10_vs_exact_exact_scan"] = recall_at_k(full, exact, k)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-run", default="runs/sq-scaling/experiments/scaling/29k")
    p.add_argument("--data", default="../shared/data")
    p.add_argument("--sizes", default="29k,1m,10m")
    p.add_argument("--methods", default="clustered,exact,full")
    p.add_argument("--work", default="runs/throughput", help="cache of the memories and indexes")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(OUT))
    p.add_argument("--prepare-only", action="store_true",
                   help="build the memories and indexes of --sizes into --work, time nothing")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    model_run, work = Path(args.model_run), Path(args.work)
    _, vocab, _ = load_model(model_run / "train")
    batches = dev_batches(model_run, vocab, args.batch, args.warmup + args.steps)
    sizes, methods = args.sizes.split(","), args.methods.split(",")
    result = {"args": vars(args), "sizes": {}}
    for size in sizes:
        cfg = size_config(size, args.data)
        t = time.perf_counter()
        memory, index, kb, source = build_size(size, cfg, model_run, work, args.seed)
        if args.prepare_only:
            log.info("%s: ready in %.0f s", size, time.perf_counter() - t)
            continue
        golds = gold_ids(batches, kb)
        top = cfg.reader.top_clusters
        leaves = index.num_leaves
        entry = {
            "facts": int(memory.n), "layout": type(memory).__name__, "source": source,
            "branching": list(cfg.memory.branching), "leaves": int(leaves), "top_clusters": top,
            "centroid_products_per_question": centroid_products(list(cfg.memory.branching), leaves),
            "prepare_seconds": time.perf_counter() - t, "methods": {},
        }
        del kb
        scan = cfg.reader.scan
        entry["scan"], entry["scan_rerank"] = scan, cfg.reader.scan_rerank
        t = time.perf_counter()
        entry.update(recalls(memory, index, batches[0], golds[0], model_run, args.k, top, scan))
        entry["recall_seconds"] = time.perf_counter() - t  # includes building compressed lists
        size_methods = list(methods)
        if scan != "exact" and "clustered" in methods:
            size_methods.insert(size_methods.index("clustered") + 1, "clustered-exact-scan")
        for method in size_methods:
            entry["methods"][method] = run_method(method, model_run, memory, index, batches, golds,
                                                  args, top, scan)
        for name in ("clustered", "clustered-exact-scan"):
            c = entry["methods"].get(name)
            if c:
                read = c["facts_read_per_question"] + entry["centroid_products_per_question"]
                c["facts_and_centroids_per_question"] = read
                c["share_of_memory"] = read / memory.n
        result["sizes"][size] = entry
        log.info("%s: %s", size, {m: round(v["median_step_seconds"], 3)
                                  for m, v in entry["methods"].items()})
        del memory, index
    if args.prepare_only:
        return 0
    first, last = sizes[0], sizes[-1]
    if "clustered" in methods and len(sizes) > 1:
        s = result["sizes"]
        result[f"step_ratio_{last}_vs_{first}"] = (
            s[last]["methods"]["clustered"]["median_step_seconds"]
            / s[first]["methods"]["clustered"]["median_step_seconds"])
    result["questions_per_s"] = {size: {m: v["questions_per_s"] for m, v in e["methods"].items()}
                                 for size, e in result["sizes"].items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
