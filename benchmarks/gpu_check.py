"""Every heavy stage's core on one device, without Ray: a TransE epoch, a k-means index build,
exact and clustered training steps and an evaluation pass, each timed on ``--device``.

    python benchmarks/gpu_check.py --device cuda --size small --with-cpu   # a GPU machine
    python benchmarks/gpu_check.py --device cpu --size tiny                # CI (tests/unit/test_gpu_check.py)

The memory is made in this process from a hand-made random knowledge base (numpy only: no
pyarrow, no files): E entities, R relations, N facts (distinct (subject, relation) pairs with one
to three objects), TransE trained on its triples (`hmn.transe`), fact vectors
``[E[s]; R[r]; mean E[o]]`` (`hmn.memory`), the cluster index (`hmn.index`), and one question
per fact, the words of its subject and its relation, trained with `hmn.training.train_epoch`
through the exact and the clustered readers and scored with `hmn.training.predict`.

Figures (seconds, on the device; CUDA work is synchronised before every clock read):
* ``transe_epoch_s``: the second of two TransE epochs (the first warms the kernels up);
* ``kmeans_build_s``: `hmn.index.build_index_from_vectors` on the device;
* ``train_step_exact_s`` / ``train_step_clustered_s``: mean step of ``steps`` K-softmax steps
  after one warm-up step;
* ``predict_exact_s`` / ``predict_clustered_s``: one evaluation pass over ``eval_questions``;
* on CUDA with bfloat16 (`hmn.devices.bf16_pays`): the same k-means and exact pass with bfloat16
  matmuls (``memory.kmeans_precision=bfloat16``, ``eval.exact_precision=bfloat16``), and their
  effect: objective ratio, top-1 agreement and recall@10 against float32.

``--with-cpu`` (with ``--device cuda``) runs the same stages on the CPU in the same process
afterwards: ``cpu`` holds its figures and ``speedup`` each CPU time over the GPU's.

What it needs: torch and numpy (hmn). Without numpy it says so, times the raw float32 (and
bfloat16) matmul only and still prints its JSON; pyarrow and Ray are never imported. Last line
printed: one JSON object (device name, torch version, every figure, the arguments), also written
to ``benchmarks/out/gpu_check_<device>.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: N facts, E entities, R relations, TransE dim d (facts are 3d wide), index branching,
#: k-means iterations, training steps, questions scored, clustered leaves read, batch sizes
SIZES = {
    "tiny": dict(facts=2000, entities=1500, relations=12, dim=16, branching=(16,), iters=8,
                 steps=4, eval_questions=512, top_clusters=4, transe_batch=256, batch=128),
    "small": dict(facts=200_000, entities=100_000, relations=500, dim=64, branching=(64, 16),
                  iters=10, steps=50, eval_questions=8192, top_clusters=16, transe_batch=4096,
                  batch=128),
}


def log(*parts) -> None:
    print(*parts, file=sys.stderr, flush=True)


def missing_modules() -> list[str]:
    """The modules of the check's stack that are not installed (torch is required)."""
    return [m for m in ("numpy", "pyarrow") if importlib.util.find_spec(m) is None]


class Clock:
    """Wall seconds on ``device``: CUDA work queued before each read is waited for."""

    def __init__(self, torch, device):
        self.torch, self.device = torch, device

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def __call__(self, fn):
        """(fn(), seconds)."""
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        return out, time.perf_counter() - t0


def random_kb(size: dict, seed: int):
    """(subject (N,), relation (N,), object offsets (N + 1,), objects, triples (T, 3)): N distinct
    (subject, relation) pairs with 1-3 objects each."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n, ne, nr = size["facts"], size["entities"], size["relations"]
    pairs = np.unique(rng.integers(0, ne * nr, size=2 * n))  # distinct subject * R + relation
    pairs = rng.permutation(pairs)[:n]
    subject, relation = pairs // nr, pairs % nr
    counts = rng.integers(1, 4, size=subject.size)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    objects = rng.integers(0, ne, size=int(offsets[-1]))
    triples = np.stack([np.repeat(subject, counts), np.repeat(relation, counts), objects], 1)
    return subject, relation, offsets, objects, triples


def time_transe(torch, clock, device, size, triples, seed):
    from hmn.transe import train_transe
    from hmn.transe_params import TransEParams

    params = TransEParams(dim=size["dim"], epochs=2, batch_size=size["transe_batch"], seed=seed)
    result, _ = clock(lambda: train_transe(triples, size["entities"], size["relations"], params,
                                           device=device))
    last = result.history[-1]
    return result, {"transe_epoch_s": last["seconds"],
                    "transe_triples_per_s": last["triples_per_s"],
                    "transe_loss": last["loss"]}


def time_kmeans(clock, device, size, vectors, precision="float32"):
    from hmn.index import build_index_from_vectors

    index, seconds = clock(lambda: build_index_from_vectors(
        vectors, branching=size["branching"], iters=size["iters"], seed=0, precision=precision,
        device=device))
    objective = index.stats["levels"][0]["kmeans"][-1]["objective"]  # level 0, last iteration
    return index, seconds, objective


def questions(np, subject, relation, num_entities):
    """One question per fact: the word of its subject and of its relation; gold = the fact."""
    tokens = [np.array([s, num_entities + r], dtype=np.int64) for s, r in zip(subject, relation)]
    return tokens, np.arange(len(tokens), dtype=np.int64)


def time_training(torch, clock, device, size, memory, reader, tokens, gold, seed):
    """Mean seconds of a K-softmax step after one warm-up step, and the model trained."""
    import numpy as np

    from hmn.model import BowEncoder, make_optimizer
    from hmn.training import iterate_batches, train_epoch

    torch.manual_seed(seed)
    vocab = int(max(int(t.max()) for t in tokens)) + 1
    model = BowEncoder(vocab, memory.d).to(device)
    opt = make_optimizer(model, "adam", 0.01)
    gen = torch.Generator(device=device).manual_seed(seed)

    def batches():
        rng = np.random.default_rng(seed)
        return iterate_batches(tokens, gold, size["batch"], shuffle=True, generator=rng,
                               device=device)

    train_epoch(model, batches(), memory, reader, opt, k=10, generator=gen, max_steps=1)
    stats, seconds = clock(lambda: train_epoch(model, batches(), memory, reader, opt, k=10,
                                               generator=gen, max_steps=size["steps"]))
    return model, seconds / max(stats.steps, 1), stats


def time_predict(clock, device, model, reader, tokens, gold):
    from hmn.training import predict

    preds, seconds = clock(lambda: predict(model, reader, tokens, k=10, batch_size=512,
                                           device=device))
    return preds, seconds, float((preds.fact_ids == gold).mean())


def recall(np, approx, exact, k=10) -> float:
    a, e = approx.candidates[:, :k], exact.candidates[:, :k]
    return float(np.mean([len(set(x) & set(y)) / k for x, y in zip(a.tolist(), e.tolist())]))


def check_stages(torch, device, args, size) -> dict:
    """Every stage on ``device``; the figures and the quality checks."""
    import numpy as np

    from hmn.devices import bf16_pays
    from hmn.exact_bf16 import BF16ExactReader
    from hmn.memory import FactMemory, build_fact_vectors
    from hmn.readers import ClusteredReader, ExactReader

    clock = Clock(torch, device)
    subject, relation, offsets, objects, triples = random_kb(size, args.seed)
    transe, fig = time_transe(torch, clock, device, size, triples, args.seed)
    vectors = build_fact_vectors(transe.entities, transe.relations, subject, relation, offsets,
                                 objects)  # (N, 3d) float32, host memory
    host = torch.from_numpy(vectors)
    index, fig["kmeans_build_s"], objective = time_kmeans(clock, device, size, host)
    fig["kmeans_leaves"] = index.num_leaves
    memory = FactMemory(host.to(device))
    exact = ExactReader(memory)
    clustered = ClusteredReader(memory, index, top_clusters=size["top_clusters"])
    tokens, gold = questions(np, subject, relation, size["entities"])
    models = {}
    for name, reader in (("exact", exact), ("clustered", clustered)):
        models[name], fig[f"train_step_{name}_s"], stats = time_training(
            torch, clock, device, size, memory, reader, tokens, gold, args.seed)
        fig[f"train_{name}_loss"] = stats.loss
    model = models["exact"]  # scored by both readers
    sample = np.random.default_rng(args.seed).choice(len(tokens), size["eval_questions"],
                                                     replace=len(tokens) < size["eval_questions"])
    ev_tokens, ev_gold = [tokens[i] for i in sample], gold[sample]
    p_exact, fig["predict_exact_s"], acc_exact = time_predict(clock, device, model, exact,
                                                              ev_tokens, ev_gold)
    p_clus, fig["predict_clustered_s"], acc_clus = time_predict(clock, device, model, clustered,
                                                                ev_tokens, ev_gold)
    quality = {"accuracy_exact": acc_exact, "accuracy_clustered": acc_clus,
               "recall10_clustered_vs_exact": recall(np, p_clus, p_exact),
               "kmeans_objective_level0": objective}
    if not bf16_pays(device):
        return {"figures": fig, "quality": quality,
                "bf16": f"not measured: no native bfloat16 on {device.type}"}
    _, kmeans_bf16_s, objective_bf16 = time_kmeans(clock, device, size, host, "bfloat16")
    p_bf16, predict_bf16_s, acc_bf16 = time_predict(clock, device, model,
                                                    BF16ExactReader(memory), ev_tokens, ev_gold)
    bf16 = {"kmeans_build_s": kmeans_bf16_s, "kmeans_objective_ratio": objective_bf16 / objective,
            "predict_exact_s": predict_bf16_s, "accuracy_exact": acc_bf16,
            "top1_agreement_vs_float32": float((p_bf16.fact_ids == p_exact.fact_ids).mean()),
            "recall10_vs_float32": recall(np, p_bf16, p_exact)}
    return {"figures": fig, "quality": quality, "bf16": bf16}


def raw_matmul(torch, device, n: int) -> dict:
    """Seconds of an (n, n) x (n, n) matmul, float32 (and bfloat16 on CUDA)."""
    clock = Clock(torch, device)
    a = torch.randn(n, n, device=device)
    out = {}
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    for dtype in dtypes:
        x = a.to(dtype)
        clock(lambda x=x: x @ x)  # warm-up
        out[f"matmul_{n}_{str(dtype).split('.')[-1]}_s"] = clock(lambda x=x: x @ x)[1]
    return out


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--size", choices=tuple(SIZES), default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--with-cpu", action="store_true",
                    help="also run every stage on the CPU, for the GPU / CPU ratios")
    ap.add_argument("--out", default="", help="JSON file (default benchmarks/out/"
                                              "gpu_check_<device>.json)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    report: dict = {"benchmark": "gpu_check", "args": vars(args), "python": platform.python_version()}
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "out" / f"gpu_check_{args.device}.json"
    if importlib.util.find_spec("torch") is None:
        report["error"] = "torch is not installed: pip install torch (the CUDA wheel on a GPU)"
        print(json.dumps(report))
        return 2
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    missing = missing_modules()
    report.update({"torch": torch.__version__, "cuda": torch.version.cuda,
                   "threads": torch.get_num_threads(), "missing": missing})
    if args.device == "cuda" and not torch.cuda.is_available():
        report["error"] = f"--device cuda: torch {torch.__version__} sees no CUDA device"
        log(report["error"])
        print(json.dumps(report))
        return 2
    device = torch.device(args.device)
    from hmn.devices import device_name  # torch only

    report["device_name"] = device_name(device)
    torch.ones(1, device=device).sum().item()  # the CUDA context before any clock
    report["raw"] = raw_matmul(torch, device, 4096 if args.size == "small" else 1024)
    if "numpy" in missing:
        log("gpu_check: numpy is not installed, and hmn (TransE, k-means, training) needs it: "
            "pip install numpy. Only the raw torch matmuls were timed.")
        report["skipped"] = "every stage: numpy is not installed (pip install numpy)"
    else:
        size = SIZES[args.size]
        report["kb"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in size.items()}
        t0 = time.perf_counter()
        report.update(check_stages(torch, device, args, size))
        report["total_s"] = time.perf_counter() - t0
        if args.with_cpu and device.type != "cpu":
            cpu = check_stages(torch, torch.device("cpu"), args, size)
            report["cpu"] = {"figures": cpu["figures"], "quality": cpu["quality"]}
            report["speedup"] = {k: cpu["figures"][k] / v for k, v in report["figures"].items()
                                 if k.endswith("_s") and v > 0}
    if "pyarrow" in missing:
        log("gpu_check: pyarrow is not installed: not needed here, but the pipeline needs it")
    report["ray_imported"] = "ray" in sys.modules
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
