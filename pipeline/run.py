"""``python -m pipeline.run [--config FILE] [--run-dir DIR] [--set section.field=value ...]``

Runs every stage of the HMN pipeline into one run directory:

    generate (synthetic data only) -> ingest -> embed -> memory -> train -> evaluate

With no arguments it uses the embedded default (the smoke preset: a seeded synthetic knowledge
base in the original SimpleQuestions / FB2M formats) on a local Ray started here. When
``RAY_ADDRESS`` is set (as it is inside ``ray job submit``) it joins that cluster instead. Stages
whose fingerprint (their config plus their inputs' fingerprints) is unchanged are skipped, so the
same command resumes a killed run and a repeated run does nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __name__ == "__main__":  # before any import that starts threads: see hmn.alloc
    from hmn.alloc import single_arena_exec

    single_arena_exec()

# torch must be loaded before Ray connects: inside a Jobs-API driver, importing torch after
# ray.init() intermittently fails with "Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so"
# (reproduced on a two-node local cluster with `import ray; ray.init(); import torch`).
import torch  # noqa: F401  isort: skip

from hmn.config import ConfigError, RunConfig, describe, dump_config, fingerprint, load_config
from pipeline.rundir import RunDir, StageResult, write_json_atomic, write_text_atomic

log = logging.getLogger("pipeline.run")

STAGES = ("generate", "ingest", "embed", "memory", "train", "evaluate")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)


def init_ray(cfg: RunConfig) -> None:
    """Join the cluster RAY_ADDRESS names, or start an embedded local Ray."""
    import ray

    if ray.is_initialized():
        return
    ctx_kw = dict(log_to_driver=True, configure_logging=False)
    if os.environ.get("RAY_ADDRESS"):
        log.info("joining the Ray cluster at %s", os.environ["RAY_ADDRESS"])
        ray.init(**ctx_kw)
    else:
        # More logical CPUs than cores: Train withholds worker CPUs from Ray Data, and a 2-CPU
        # cluster with two workers plus a dataset can hang (RAY_NOTES 5).
        num_cpus = cfg.ray.num_cpus or max(4, os.cpu_count() or 1)
        log.info("starting an embedded local Ray with %d logical CPUs", num_cpus)
        # The dashboard hosts the State API; without it Ray Train's placement-group cleaner logs
        # "Failed to query Ray Train Controller actor state" dozens of times (RAY_NOTES 5).
        ray.init(num_cpus=num_cpus, **ctx_kw)
    import ray.data

    dctx = ray.data.DataContext.get_current()
    dctx.execution_options.preserve_order = True  # deterministic order, hence resumable results
    dctx.enable_progress_bars = sys.stderr.isatty()


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


def _input_signature(paths: tuple[str, ...], cache: Path | None = None) -> list:
    """Name, size and content digest of each input file: a changed input file re-runs ingest.

    The digest (not the mtime) decides, so a copy of the same data made later (a fresh checkout of
    shared data, a restored backup) reuses the finished stages. Digests are cached in ``cache``
    under (path, size, mtime), so an unchanged file is read once (about 1 s per GB).
    """
    known = {}
    if cache is not None and cache.exists():
        try:
            known = json.loads(cache.read_text())
        except ValueError:
            known = {}
    sig, changed = [], False
    for p in paths:
        real = os.path.realpath(p)
        if not os.path.exists(real):
            sig.append([real, None, None])
            continue
        st = os.stat(real)
        entry = known.get(real)
        if not entry or entry["size"] != st.st_size or entry["mtime_ns"] != st.st_mtime_ns:
            if st.st_size > (1 << 30):
                log.info("hashing %s (%.1f GB) for the stage fingerprints", p, st.st_size / 2**30)
            entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "digest": _digest(real)}
            known[real], changed = entry, True
        sig.append([real, st.st_size, entry["digest"]])
    if cache is not None and changed:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cache, known)
    return sig


@dataclass
class Pipeline:
    cfg: RunConfig
    run: RunDir
    force: bool = False
    only: tuple[str, ...] = ()
    results: dict[str, StageResult] = field(default_factory=dict)

    def _stage(self, name: str, fp: str, fn) -> StageResult:
        force = self.force and (not self.only or name in self.only)
        if self.only and name not in self.only:
            if not self.run.is_done(name, fp):
                raise RuntimeError(f"stage {name!r} is needed by {self.only} but is not done with this "
                                   f"config; run it too (--stages)")
            r = StageResult(name, True, 0.0, {})
        else:
            def with_ray(out: Path) -> dict:
                init_ray(self.cfg)  # started only when some stage has work to do
                return fn(out)

            r = self.run.run_stage(name, fp, with_ray, force=force)
        self.results[name] = r
        return r

    def raw_sources(self):
        from pipeline.stages.ingest import IngestSources

        d = self.cfg.data
        if d.source == "synthetic":
            raw = self.run.stage_dir("generate")
            q = {"train": [str(raw / "questions_train.txt")], "dev": [str(raw / "questions_dev.txt")]}
            if self.cfg.synthetic.test_questions:
                q["test"] = [str(raw / "questions_test.txt")]
            return IngestSources(facts=[str(raw / "kb.txt")], names=[str(raw / "names.tsv")], questions=q)
        q = {"train": list(d.questions_train), "dev": list(d.questions_dev)}
        if d.questions_test:
            q["test"] = list(d.questions_test)
        relations = list(d.rdf_relations)
        if d.rdf_relations_file:
            from pipeline.stages.ingest import read_relation_list

            relations += read_relation_list(d.rdf_relations_file)
        return IngestSources(facts=list(d.facts), names=list(d.names), questions=q,
                             facts_format=d.facts_format, names_format=d.names_format,
                             questions_format=d.questions_format, rdf_relations=relations,
                             rdf_names=d.rdf_names, rdf_language=d.rdf_language)

    def execute(self, until: str | None = None) -> dict[str, StageResult]:
        """Run the stages in order; `until` stops after that stage (default: the last stage of
        `only`, so that `--stages ingest` does not ask for the stages after it)."""
        if until is not None and until not in STAGES:
            raise ValueError(f"until={until!r}: unknown stage; known: {', '.join(STAGES)}")
        if self.only:
            last = max(self.only, key=STAGES.index)
            until = last if until is None else min(until, last, key=STAGES.index)
        cfg, run = self.cfg, self.run
        write_text_atomic(run.root / "config.resolved.yaml", dump_config(cfg))

        # generate: synthetic data in the original file formats
        if cfg.data.source == "synthetic":
            from hmn.synthetic import SyntheticSpec, generate

            spec = SyntheticSpec(**cfg.synthetic.__dict__)
            fp_gen = fingerprint("generate", cfg.synthetic)
            self._stage("generate", fp_gen, lambda out: generate(spec, str(out))["stats"])
            upstream = fp_gen
        else:
            d = cfg.data
            extra = (d.rdf_relations_file,) if d.rdf_relations_file else ()
            upstream = fingerprint("files", _input_signature(
                d.facts + d.names + d.questions_train + d.questions_dev + d.questions_test + extra,
                run.root / ".input-digests.json"))
        if until == "generate":  # (no generate stage for data.source=files)
            return self.results

        # ingest (Ray Data)
        from pipeline.stages.ingest import run_ingest

        sources = self.raw_sources()
        fp_ingest = fingerprint("ingest", cfg.ingest, cfg.data, upstream)
        self._stage("ingest", fp_ingest, lambda out: run_ingest(
            sources, str(out), max_reject_rate=cfg.ingest.max_reject_rate, chunk_lines=cfg.ingest.chunk_lines))
        if until == "ingest":
            return self.results

        # embed (TransE in a Ray task, or user embeddings)
        from pipeline.stages.embed import run_embed

        embed_inputs = _input_signature(tuple(p for p in (cfg.embed.entities_file, cfg.embed.relations_file) if p),
                                        run.root / ".input-digests.json")
        fp_embed = fingerprint("embed", cfg.embed, fp_ingest, embed_inputs)
        self._stage("embed", fp_embed, lambda out: run_embed(
            cfg.embed, run.stage_dir("ingest"), out, run.root / ".embed-checkpoint" / fp_embed))
        embed_fp = self._embeddings_fingerprint()
        if until == "embed":
            return self.results

        # memory (fact vectors + spherical k-means on Ray actors)
        from pipeline.stages.memory import run_memory

        fp_memory = fingerprint("memory", cfg.memory, fp_embed)
        self._stage("memory", fp_memory, lambda out: run_memory(
            cfg.memory, run.stage_dir("ingest"), run.stage_dir("embed"), embed_fp, out))
        if until == "memory":
            return self.results

        # train (Ray Train)
        from pipeline.stages.train import run_train

        fp_train = fingerprint("train", cfg.train, cfg.reader, fp_memory, fp_ingest)
        fps = {"ingest": fp_ingest, "embeddings": embed_fp, "memory": fp_memory, "train": fp_train}
        self._stage("train", fp_train, lambda out: run_train(
            cfg.train, cfg.reader, run.stage_dir("ingest"), run.stage_dir("memory"), out,
            run.root / "train_ray", f"hmn-{fp_train}", fps, force=self.force))
        if until == "train":
            return self.results

        # evaluate (Ray Data actors)
        from pipeline.stages.evaluate import run_evaluate

        fp_eval = fingerprint("evaluate", cfg.eval, cfg.reader, fp_train)
        self._stage("evaluate", fp_eval, lambda out: run_evaluate(cfg.eval, cfg.reader, run.root, out))
        return self.results

    def _embeddings_fingerprint(self) -> str:
        stats = json.loads((self.run.stage_dir("embed") / "stats.json").read_text())
        return stats["fingerprint"]


def write_report(run: RunDir, results: dict[str, StageResult]) -> str:
    from pipeline.stages.evaluate import results_table

    report = json.loads((run.stage_dir("evaluate") / "report.json").read_text())
    train_stats = json.loads((run.stage_dir("train") / "stats.json").read_text())
    manifest = run.manifest()["stages"]
    times = {s: float(manifest.get(s, {}).get("seconds", 0.0)) for s in STAGES if s in manifest}
    peaks = {s: manifest[s].get("peak_pss_gb") for s in STAGES if s in manifest}
    table = results_table(report, train_stats, times, peaks)
    text = f"# HMN run report: {run.root.name}\n\nRun directory: `{run.root}`\n\n{table}\n"
    write_text_atomic(run.stage_dir("evaluate") / "report.md", text)
    full = {"report": report, "stage_seconds": times, "stage_peak_pss_gb": peaks,
            "skipped": [n for n, r in results.items() if r.skipped],
            "train": {k: v for k, v in train_stats.items() if k != "history"}}
    write_text_atomic(run.root / "report.json", json.dumps(full, indent=2, default=str))
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML preset (default: the embedded smoke preset)")
    parser.add_argument("--run-dir", help="run directory (default: runs/<name>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a config field, converted by its type (repeatable)")
    parser.add_argument("--stages", default="", help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--force", action="store_true", help="redo stages even when they are done")
    parser.add_argument("--experiment", choices=("table1", "table2"),
                        help="train every variant of the paper's Table 1 or 2 (see pipeline/experiments.py)")
    parser.add_argument("--variants", default="", help="with --experiment: comma-separated subset of variants")
    parser.add_argument("--help-config", action="store_true", help="list every config field and exit")
    args = parser.parse_args(argv)
    setup_logging()
    if args.help_config:
        print("\n".join(describe()))
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
        only = tuple(s.strip() for s in args.stages.split(",") if s.strip())
        unknown = [s for s in only if s not in STAGES]
        if unknown:
            raise ConfigError(f"--stages: unknown stage(s) {unknown}; known: {', '.join(STAGES)}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    run = RunDir(args.run_dir or Path("runs") / cfg.name)
    log.info("run directory %s", run.root)
    t0 = time.perf_counter()
    if args.experiment:
        from pipeline.experiments import run_experiment

        variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
        result = run_experiment(args.experiment, cfg, run, force=args.force, only=variants)
        print("\n" + (run.root / "eval" / f"{args.experiment}.md").read_text())
        print(f"{args.experiment}: {len(result['rows'])} variants, {time.perf_counter() - t0:.1f} s; "
              f"{run.root / 'eval'}")
        return 0
    results = Pipeline(cfg, run, force=args.force, only=only).execute()
    if "evaluate" in results and run.is_done("evaluate", run.fingerprint_of("evaluate")):
        table = write_report(run, results)
        print("\n" + table + "\n")
        print(f"report: {run.stage_dir('evaluate') / 'report.md'}  ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
