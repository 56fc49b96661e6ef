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
import json
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

from hmn.config import ConfigError, RunConfig, describe, load_config
from hmn.formats.parsed import FormatError
from pipeline.artifacts import UnsafeFileError
from pipeline.driver import STAGES, Pipeline
from pipeline.experiments import EXPERIMENTS, run_experiment
from pipeline.report import write_report
from pipeline.rundir import RunDir, RunDirError

log = logging.getLogger("pipeline.run")

#: errors whose message says what to fix (a config field, an input file and line, a locked or
#: inconsistent run directory, a refused file): printed as one line, exit status 2
USER_ERRORS = (ConfigError, FormatError, RunDirError, UnsafeFileError)


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML preset (default: the embedded smoke preset)")
    parser.add_argument("--run-dir", help="run directory: a local path, s3://BUCKET/PATH or "
                                           "gs://BUCKET/PATH (default: runs/<name>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="SECTION.FIELD=VALUE",
                        help="override a config field, converted by its type (repeatable)")
    parser.add_argument("--stages", default="",
                        help=f"comma-separated subset of {','.join(STAGES)} (with --experiment: "
                             "scaling only, in every variant asked for)")
    parser.add_argument("--force", action="store_true", help="redo stages even when they are done")
    parser.add_argument("--experiment", choices=tuple(EXPERIMENTS),
                        help="train every variant of the paper's Table 1 or 2, or of the "
                             "memory-size scaling (see pipeline/experiments.py)")
    parser.add_argument("--variants", default="",
                        help="with --experiment: comma-separated subset of variants")
    parser.add_argument("--verify", action="store_true",
                        help="check the digests of finished stages' outputs, not only their sizes, "
                             "before skipping them (a stage whose files changed is redone)")
    parser.add_argument("--help-config", action="store_true",
                        help="list every config field and exit")
    return parser


def check_stages(only: tuple[str, ...]) -> None:
    unknown = [s for s in only if s not in STAGES]
    if unknown:
        raise ConfigError(f"--stages: unknown stage(s) {unknown}; known: {', '.join(STAGES)}")


def execute(cfg: RunConfig, run: RunDir, *, force: bool = False, only: tuple[str, ...] = (),
            experiment: str | None = None, variants: tuple[str, ...] = ()
            ) -> tuple[dict | None, str | None]:
    """Run the pipeline (or `experiment`) into `run`; returns (result, Markdown table). The
    result is the run's report (what ``report.json`` holds), or the experiment's rows; both are
    None when `only` stops before the evaluate stage."""
    if experiment and run.store is not None:
        raise RunDirError(f"--experiment: needs a local run directory, not {run.location} (its "
                          f"variants link each other's stages)")
    with run.lock():  # the whole run holds the directory: a second run refuses, naming this one
        if experiment:
            result = run_experiment(experiment, cfg, run, force=force, only=variants,
                                    stages=only)
            return result, (run.root / "eval" / f"{experiment}.md").read_text()
        results = Pipeline(cfg, run, force=force, only=only).execute()
        if "evaluate" in results and run.is_done("evaluate", run.fingerprint_of("evaluate")):
            table = write_report(run, results)
            return json.loads((run.root / "report.json").read_text()), table
        return None, None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    if args.help_config:
        print("\n".join(describe()))
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
        only = tuple(s.strip() for s in args.stages.split(",") if s.strip())
        check_stages(only)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    RunDir.verify_digests = args.verify  # every run directory of this process (variants too)
    t0 = time.perf_counter()
    variants = tuple(v.strip() for v in args.variants.split(",") if v.strip())
    try:
        run = RunDir(args.run_dir or Path("runs") / cfg.name)
        log.info("run directory %s%s", run.location,
                 f" (worked in {run.root})" if run.store is not None else "")
        result, table = execute(cfg, run, force=args.force, only=only, experiment=args.experiment,
                                variants=variants)
    except USER_ERRORS as e:  # a cause the user can fix, in one line; anything else: traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.experiment:
        print("\n" + table)
        print(f"{args.experiment}: {len(result['rows'])} variants, "
              f"{time.perf_counter() - t0:.1f} s; {run.root / 'eval'}")
    elif table is not None:
        print("\n" + table + "\n")
        report_md = f"{run.location}/evaluate/report.md"
        print(f"report: {report_md}  ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
