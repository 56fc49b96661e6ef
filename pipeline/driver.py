"""The pipeline driver: the table of stages, their fingerprints, and the loop that runs them.

    generate (synthetic and scaling data only) -> ingest -> embed -> memory -> train -> evaluate

Each row of `STAGE_TABLE` names a stage, the config sections and upstream fingerprints that make
its fingerprint, the input files whose content it also hashes, and how to run it. A stage whose
fingerprint is unchanged (and whose outputs still match the manifest) is skipped
(`pipeline.rundir`), so the same call resumes a killed run and a repeated run does nothing. Ray
starts (or is joined) only when some stage has work to do. `Pipeline.execute` holds the run
directory's lock; `check_evaluable` is what ``pipeline.evaluate`` asks of a run before reading it.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hmn.config import ConfigError, RunConfig, dump_config, fingerprint
from pipeline.rundir import (
    RunDir,
    RunDirError,
    StageResult,
    input_signature,
)
from pipeline.tracking import (
    Tracker,
    config_params,
    report_figures,
    stage_figures,
    start_tracking,
)

log = logging.getLogger(__name__)

#: Maps input file paths to what a fingerprint hashes for them (`pipeline.rundir.input_signature`).
Signature = Callable[[tuple[str, ...]], list]


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


# ---------------------------------------------------------------------------------------------
# How each stage runs: (pipeline, staging folder, fingerprints so far) -> stats
# ---------------------------------------------------------------------------------------------

def generates(cfg: RunConfig) -> bool:
    """The generate stage runs for synthetic data and for the scaling memories."""
    return cfg.data.source in ("synthetic", "scaling")


def scaling_files(cfg: RunConfig) -> tuple[str, ...]:
    """The real files a data.source=scaling generate stage reads (their content makes its
    fingerprint)."""
    from hmn.scaling import ScalingSpec, Sources

    sources = Sources.from_data_dir(cfg.scaling.data_dir)
    return sources.files(ScalingSpec.from_config(cfg.scaling).with_fb15k())


def data_files(cfg: RunConfig) -> tuple[str, ...]:
    """Every input file of a data.source=files run (their content makes ingest's fingerprint)."""
    d = cfg.data
    extra = (d.rdf_relations_file,) if d.rdf_relations_file else ()
    return d.facts + d.names + d.questions_train + d.questions_dev + d.questions_test + extra


def embedding_files(cfg: RunConfig) -> tuple[str, ...]:
    """The user's embedding files, if any (their content is part of embed's fingerprint)."""
    return tuple(p for p in (cfg.embed.entities_file, cfg.embed.relations_file) if p)


def ingest_sources(cfg: RunConfig, run: RunDir):
    """The ingest stage's `IngestSources`: the generated files, or the files the config names."""
    from pipeline.stages.ingest import IngestSources

    d = cfg.data
    if generates(cfg):
        raw = run.stage_dir("generate")
        q = {"train": [str(raw / "questions_train.txt")], "dev": [str(raw / "questions_dev.txt")]}
        if cfg.data.source == "synthetic" and cfg.synthetic.test_questions:
            q["test"] = [str(raw / "questions_test.txt")]
        return IngestSources(facts=[str(raw / "kb.txt")], names=[str(raw / "names.tsv")],
                             questions=q)
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


def _run_generate(p: Pipeline, out: Path, fps: dict[str, str]) -> dict:
    if p.cfg.data.source == "scaling":
        from hmn.scaling import ScalingSpec, Sources, build_memory

        sc = p.cfg.scaling
        realism = build_memory(ScalingSpec.from_config(sc), Sources.from_data_dir(sc.data_dir),
                               str(out))
        return {"size": sc.size, **realism["counts"],
                "ambiguity_ceiling": realism["ambiguity_ceiling"]["share"]}
    from hmn.synthetic import SyntheticSpec, generate

    return generate(SyntheticSpec.from_config(p.cfg.synthetic), str(out))["stats"]


def _run_ingest(p: Pipeline, out: Path, fps: dict[str, str]) -> dict:
    from pipeline.stages.ingest import run_ingest

    return run_ingest(ingest_sources(p.cfg, p.run), str(out),
                      max_reject_rate=p.cfg.ingest.max_reject_rate,
                      chunk_lines=p.cfg.ingest.chunk_lines)


def _run_embed(p: Pipeline, out: Path, fps: dict[str, str]) -> dict:
    from pipeline.stages.embed import run_embed

    return run_embed(p.cfg.embed, p.run.stage_dir("ingest"), out,
                     p.run.root / ".embed-checkpoint" / fps["embed"], tracking=p.tracker.target)


def _run_memory(p: Pipeline, out: Path, fps: dict[str, str]) -> dict:
    from pipeline.stages.memory import run_memory

    return run_memory(p.cfg.memory, p.run.stage_dir("ingest"), p.run.stage_dir("embed"),
                      p.embeddings_fingerprint(), out)


def input_file_fields(cfg: RunConfig) -> list[tuple[str, str]]:
    """``(field, path)`` of every input file the config names for the stages to read."""
    d, fields = cfg.data, []
    if d.source == "files":
        for name in ("facts", "names", "questions_train", "questions_dev", "questions_test"):
            fields += [(f"data.{name}", path) for path in getattr(d, name)]
    for name, path in (("data.rdf_relations_file", d.rdf_relations_file),
                       ("embed.entities_file", cfg.embed.entities_file),
                       ("embed.relations_file", cfg.embed.relations_file),
                       ("train.artificial_fixed_from", cfg.train.artificial_fixed_from)):
        if path:
            fields.append((name, path))
    return fields


def check_input_files(cfg: RunConfig) -> None:
    """`ConfigError` naming the field of an input file that is a directory (before any stage
    hashes or reads it; a missing file is reported by the stage that reads it)."""
    for name, path in input_file_fields(cfg):
        if os.path.isdir(path):
            raise ConfigError(f"{name}: {path!r} is a directory, not a file")


def memory_facts(run: RunDir) -> int:
    """N, the facts in the run's memory (the ingest stage's count)."""
    stats = json.loads((run.stage_dir("ingest") / "stats.json").read_text())
    return int(stats["totals"]["facts"])


def check_k(fields: dict[str, int], facts: int) -> None:
    """`ConfigError` for a candidate count above the memory's N facts: a reader would return
    fewer candidates than asked (the readers clamp), so results would silently mean less."""
    for name, k in fields.items():
        if k > facts:
            raise ConfigError(f"{name}={k}: more than the {facts} facts in the memory; "
                              f"set it to at most {facts}")


def _run_train(p: Pipeline, out: Path, fps: dict[str, str]) -> dict:
    from pipeline.stages.train import run_train

    check_k({"reader.k": p.cfg.reader.k}, memory_facts(p.run))
    carried = {"ingest": fps["ingest"], "embeddings": p.embeddings_fingerprint(),
               "memory": fps["memory"], "train": fps["train"]}
    return run_train(p.cfg.train, p.cfg.reader, p.run.stage_dir("ingest"),
                     p.run.stage_dir("memory"), out, p.run.train_storage(),
                     f"hmn-{fps['train']}", carried, force=p.force, tracking=p.tracker.target)


def _run_evaluate(p: Pipeline, out: Path, fps: dict[str, str]) -> dict:
    from pipeline.stages.score import run_evaluate

    check_k({"reader.k": p.cfg.reader.k, "eval.recall_k": p.cfg.eval.recall_k},
            memory_facts(p.run))
    return run_evaluate(p.cfg.eval, p.cfg.reader, p.run.root, out)


# ---------------------------------------------------------------------------------------------
# The stage table and the fingerprints
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Stage:
    """One row of the stage table.

    Its fingerprint hashes, in this order: the stage's name, the `sections` of the RunConfig, the
    fingerprints of the `upstream` stages, and the signature of its `input_files` (when given).
    """

    name: str
    sections: tuple[str, ...]
    upstream: tuple[str, ...]
    run: Callable[[Pipeline, Path, dict[str, str]], dict]
    input_files: Callable[[RunConfig], tuple[str, ...]] | None = None


STAGE_TABLE: tuple[Stage, ...] = (
    Stage("generate", ("synthetic",), (), _run_generate),
    Stage("ingest", ("ingest", "data"), ("generate",), _run_ingest),
    Stage("embed", ("embed",), ("ingest",), _run_embed, input_files=embedding_files),
    Stage("memory", ("memory",), ("embed",), _run_memory),
    Stage("train", ("train", "reader"), ("memory", "ingest"), _run_train),
    Stage("evaluate", ("eval", "reader"), ("train",), _run_evaluate),
)
STAGES = tuple(s.name for s in STAGE_TABLE)


def upstream_stages(name: str) -> tuple[str, ...]:
    """Every stage ``name`` depends on, directly or not, in table order: what it may read from
    the run directory (the evaluate stage reads ingest, memory and train)."""
    rows = {s.name: s for s in STAGE_TABLE}
    todo, seen = list(rows[name].upstream), set()
    while todo:
        u = todo.pop()
        if u not in seen:
            seen.add(u)
            todo.extend(rows[u].upstream)
    return tuple(s for s in STAGES if s in seen)


def stage_fingerprint(stage: Stage, cfg: RunConfig, fps: dict[str, str],
                      signature: Signature = input_signature,
                      files_token: str | None = None) -> str:
    """The fingerprint of `stage` under `cfg`, given the fingerprints of the stages before it.

    With data.source=files the generate slot holds the fingerprint of the data files
    (``fingerprint("files", signature(data_files))``), which ingest hashes as its upstream;
    `files_token`, when given, stands in for it (without reading the files). With
    data.source=scaling the generate stage hashes the ``scaling`` section and the signature of
    the real files it reads (`scaling_files`), for which `files_token` stands in when given.
    """
    if stage.name == "generate" and cfg.data.source == "files":
        if files_token is not None:
            return files_token
        return fingerprint("files", signature(data_files(cfg)))
    if stage.name == "generate" and cfg.data.source == "scaling":
        files = files_token if files_token is not None else signature(scaling_files(cfg))
        return fingerprint("generate", "scaling", cfg.scaling, files)
    parts = [getattr(cfg, s) for s in stage.sections] + [fps[u] for u in stage.upstream]
    if stage.input_files is not None:
        parts.append(signature(stage.input_files(cfg)))
    return fingerprint(stage.name, *parts)


def stage_fingerprints(cfg: RunConfig, signature: Signature = input_signature, *,
                       files_token: str | None = None) -> dict[str, str]:
    """The fingerprint of every stage in the table, the generate slot included (see
    `stage_fingerprint`)."""
    fps: dict[str, str] = {}
    for stage in STAGE_TABLE:
        fps[stage.name] = stage_fingerprint(stage, cfg, fps, signature, files_token)
    return fps


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------

@dataclass
class Pipeline:
    cfg: RunConfig
    run: RunDir
    force: bool = False
    only: tuple[str, ...] = ()
    results: dict[str, StageResult] = field(default_factory=dict)
    #: the tracked run of the current `execute` (`pipeline.tracking`; a no-op without tracking)
    tracker: Tracker = field(default_factory=Tracker, repr=False)

    def _stage(self, name: str, fp: str, fn: Callable[[Path], dict]) -> StageResult:
        force = self.force and (not self.only or name in self.only)
        if self.only and name not in self.only:
            reason = self.run.stale_reason(name, fp)
            if reason is not None:
                raise RuntimeError(f"stage {name!r} is needed by {self.only} but is not done "
                                   f"with this config ({reason}); run it too (--stages)")
            r = StageResult(name, True, 0.0, {})
        else:
            def with_ray(out: Path) -> dict:
                self.run.fetch(*upstream_stages(name))  # a run directory on a store: download
                init_ray(self.cfg)  # started only when some stage has work to do
                return fn(out)

            r = self.run.run_stage(name, fp, with_ray, force=force)
        self.results[name] = r
        return r

    def _last_stage(self, until: str | None) -> str | None:
        """The last stage to run: `until`, or the last stage of `only` if that comes earlier."""
        if until is not None and until not in STAGES:
            raise ValueError(f"until={until!r}: unknown stage; known: {', '.join(STAGES)}")
        if self.only:
            last = max(self.only, key=STAGES.index)
            until = last if until is None else min(until, last, key=STAGES.index)
        return until

    def execute(self, until: str | None = None) -> dict[str, StageResult]:
        """Run the stages in order; `until` stops after that stage (default: the last stage of
        `only`, so that `--stages ingest` does not ask for the stages after it)."""
        until = self._last_stage(until)
        check_input_files(self.cfg)
        with self.run.lock():  # one writer per run directory (re-entrant: experiments nest)
            self.run.write_text("config.resolved.yaml", dump_config(self.cfg))
            self.tracker = start_tracking(self.cfg.tracking, self.run.root, self.cfg.name)
            try:
                self.tracker.log_params(config_params(self.cfg, {}, self.run.root))
                fps: dict[str, str] = {}
                for stage in STAGE_TABLE:
                    fps[stage.name] = stage_fingerprint(stage, self.cfg, fps,
                                                        self.run.input_signature)
                    if stage.name != "generate" or generates(self.cfg):
                        self._stage(stage.name, fps[stage.name],
                                    lambda out, stage=stage: stage.run(self, out, fps))
                        self._track_stage(stage.name, fps[stage.name])
                    if stage.name == until:
                        break
            except BaseException:
                self.tracker.close(failed=True)
                self.tracker = Tracker()
                raise
            self.tracker.close()
            self.tracker = Tracker()
        return self.results

    def _track_stage(self, name: str, fp: str) -> None:
        """Log a stage's fingerprint and manifest figures (seconds, peak memory, scalar stats),
        and after the evaluate stage the report's figures."""
        self.tracker.log_params({f"fingerprint.{name}": fp})
        self.tracker.log_metrics(stage_figures(name, self.run.entry(name)))
        report = self.run.stage_dir("evaluate") / "report.json"
        if name == "evaluate" and report.is_file():
            self.tracker.log_metrics(report_figures(json.loads(report.read_text())))

    def embeddings_fingerprint(self) -> str:
        """The fingerprint of the vectors the embed stage wrote (carried into index and model)."""
        stats = json.loads((self.run.stage_dir("embed") / "stats.json").read_text())
        return stats["fingerprint"]


# ---------------------------------------------------------------------------------------------
# What evaluating a finished run asks of it
# ---------------------------------------------------------------------------------------------

#: the stages whose outputs ``pipeline.evaluate`` reads
EVALUATED_STAGES = ("ingest", "memory", "train")


def check_evaluable(run: RunDir, cfg: RunConfig, model_fingerprints: dict) -> None:
    """`RunDirError` naming the stage when ``run`` is not a consistent finished run for ``cfg``
    (its ``config.resolved.yaml``): a stage evaluation reads is not done, its outputs no longer
    match the manifest (sizes; digests too with ``run.verify_digests``), a stage was done with
    other settings than ``cfg`` (the fingerprints recomputed from ``cfg`` and the recorded
    upstream fingerprints; stages that hash input files are not recomputed), or the model
    (``model_fingerprints``, what ``train/model.pt`` records) was trained against other stages
    than the manifest's. A re-training that was killed leaves the train stage "running" and the
    new settings in config.resolved.yaml: refused, where the old model would have been scored."""
    stages = run.manifest()["stages"]
    for name in EVALUATED_STAGES:
        e = stages.get(name)
        if not e or e.get("status") != "done":
            status = "not run" if not e else f"{e.get('status')!r}"
            raise RunDirError(f"{run.location}: stage {name!r} is {status}, not done: its outputs are "
                              f"not this run's; finish the run (python -m pipeline.run) first")
        problem = run.output_problem(name, e)
        if problem is not None:
            raise RunDirError(f"{run.location}: stage {name!r}: {problem}; re-run pipeline.run to "
                              f"redo it")
    fps = {name: e["fingerprint"] for name, e in stages.items() if "fingerprint" in e}
    for stage in STAGE_TABLE:
        if stage.name not in fps or stage.name == "generate" or stage.input_files is not None:
            continue  # the generate slot and embed's user files hash files: not recomputed
        if not all(u in fps for u in stage.upstream):
            continue
        want = stage_fingerprint(stage, cfg, fps)
        if want != fps[stage.name]:
            raise RunDirError(f"{run.location}: stage {stage.name!r} was done with other settings than "
                              f"config.resolved.yaml (fingerprint {fps[stage.name]}, the config "
                              f"gives {want}): an interrupted re-run? finish it with pipeline.run")
        if stage.name == "train":
            break
    for name in ("ingest", "memory", "train"):
        have = model_fingerprints.get(name)
        if have is not None and have != fps[name]:
            raise RunDirError(f"{run.location}: train/model.pt was trained against another {name!r} "
                              f"stage (fingerprint {have}) than the manifest's ({fps[name]}); "
                              f"re-run the train stage")
