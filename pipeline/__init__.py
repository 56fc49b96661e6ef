"""The HMN pipeline's Python API: the three commands as functions.

    from pipeline import run, evaluate, answer

    report = run("configs/smoke.yaml", "runs/smoke")            # python -m pipeline.run
    result = evaluate("runs/smoke", "questions_dev.txt")          # python -m pipeline.evaluate
    answers = answer("runs/smoke", ["what is the book e about"])  # python -m pipeline.answer

`run` and `evaluate` use Ray (a local one unless ``RAY_ADDRESS`` is set), `answer` does not.
Importing this package is cheap: each function imports what it needs when called, and nothing
here imports Ray.

The functions share their names with the command modules (``pipeline.run``,
``pipeline.evaluate``, ``pipeline.answer``). Importing a submodule normally sets it as an
attribute of its package, which would replace the function; this package keeps the function
(see `_Package`), so ``pipeline.run`` is always the function and the modules are reached by
``from pipeline.run import main``, ``importlib.import_module`` or ``python -m``.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Sequence
from pathlib import Path

__all__ = ["run", "evaluate", "answer"]


def run(config: str | Path | None = None, run_dir: str | Path | None = None, *,
        overrides: Sequence[str] = (), experiment: str | None = None,
        variants: Sequence[str] = (), stages: Sequence[str] = (), force: bool = False
        ) -> dict | None:
    """Run the pipeline like ``python -m pipeline.run``: `config` is a YAML preset (None: the
    embedded smoke preset), `run_dir` defaults to ``runs/<name>`` (``s3://BUCKET/PATH`` and
    ``gs://BUCKET/PATH`` are run directories on object storage: `pipeline.objectstore`),
    `overrides` are ``"section.field=value"`` strings. Returns the run's report (``report.json``), or with
    `experiment` (table1, table2, scaling) its rows; None when `stages` stops before evaluate.
    Raises `hmn.config.ConfigError` for a bad config."""
    from hmn.config import load_config
    from pipeline.run import check_stages, execute  # imports torch before Ray (see pipeline.run)
    from pipeline.rundir import RunDir

    cfg = load_config(config, list(overrides))
    only = tuple(stages)
    check_stages(only)
    result, _ = execute(cfg, RunDir(run_dir or Path("runs") / cfg.name), force=force, only=only,
                        experiment=experiment, variants=tuple(variants))
    return result


def evaluate(run_dir: str | Path, questions: str | Path, *, readers: Sequence[str] | None = None,
             output: str | Path | None = None) -> dict:
    """Score a trained run on a SimpleQuestions-format file like ``python -m pipeline.evaluate``;
    returns the JSON object it prints. `readers` default to the run's ``train.infer_reader``;
    `output` writes per-question predictions (Parquet). Raises `pipeline.evaluate.InputError`
    for a run directory or file it cannot use."""
    from pipeline.evaluate import evaluate_run

    return evaluate_run(run_dir, questions, readers, output)


def answer(run_dir: str | Path, questions: str | Sequence[str], k: int = 5,
           reader: str | None = None) -> list[dict]:
    """The top-k facts of each question (a string is one question) like
    ``python -m pipeline.answer``: one dict per question with ``unknown_words`` and ``facts``
    (score, subject key and name, relation, objects' keys and names). No Ray. Raises
    `pipeline.evaluate.InputError` for a run directory it cannot use or an empty question."""
    from pipeline.answer import answer_questions

    return answer_questions(run_dir, questions, k=k, reader=reader)


def _run_cli() -> int:
    """The ``hmn-run`` console script: ``python -m pipeline.run``'s malloc setting, then its main."""
    from hmn.alloc import single_arena_exec

    single_arena_exec()  # before torch starts threads, as in pipeline/run.py
    from pipeline.run import main

    return main()


class _Package(types.ModuleType):
    """This package's module type: importing ``pipeline.run`` (or evaluate, answer) does not
    replace the function of the same name by the module."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in __all__ and isinstance(value, types.ModuleType):
            return  # the module stays in sys.modules
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
