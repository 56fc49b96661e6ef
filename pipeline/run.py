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
import logging
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # before any import that starts threads: see hmn.alloc
    from hmn.alloc import single_arena_exec

    single_arena_exec()

# torch must be loaded before Ray connects: inside a Jobs-API driver, importing torch after
# ray.init() intermittently fails with "Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so"
# (reproduced on a two-node local cluster with `import ray; ray.init(); import torch`).
import torch  # noqa: F401  isort: skip

from hmn.config import ConfigError, describe, load_config
from pipeline.driver import STAGES, Pipeline
from pipeline.experiments import EXPERIMENTS, run_experiment
from pipeline.report import write_report
from pipeline.rundir import RunDir

log = logging.getLogger("pipeline.run")


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML preset (default: the embedded smoke preset)")
    parser.add_argument("--run-dir", help="run directory (default: runs/<name>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.FIELD=VALUE",
                        help="override a config field, converted by its type (repeatable)")
    parser.add_argument("--stages", default="",
                        help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--force", action="store_true", help="redo stages even when they are done")
    parser.add_argument("--experiment", choices=tuple(EXPERIMENTS),
                        help="train every variant of the paper's Table 1 or 2, or of the "
                             "memory-size scaling (see pipeline/experiments.py)")
    parser.add_argument("--variants", default="",
                        help="with --experiment: comma-separated subset of variants")
    parser.add_argument("--help-config", action="store_true",
                        help="list every config field and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
        variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
        result = run_experiment(args.experiment, cfg, run, force=args.force, only=variants)
        print("\n" + (run.root / "eval" / f"{args.experiment}.md").read_text())
        print(f"{args.experiment}: {len(result['rows'])} variants, "
              f"{time.perf_counter() - t0:.1f} s; {run.root / 'eval'}")
        return 0
    results = Pipeline(cfg, run, force=args.force, only=only).execute()
    if "evaluate" in results and run.is_done("evaluate", run.fingerprint_of("evaluate")):
        table = write_report(run, results)
        print("\n" + table + "\n")
        report_md = run.stage_dir("evaluate") / "report.md"
        print(f"report: {report_md}  ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
