"""Chaos test of the run-directory contract (issue 19): the smoke pipeline through a seeded
schedule of faults, each checked against one undisturbed run.

First one undisturbed run of the tiny smoke settings (``TINY`` of
``tests/integration/test_pipeline.py``, one training worker) into ``<work>/reference``. Then
each fault of the schedule (``--seed``; ``make_schedule``: the kinds cycle in seeded order,
each with seeded parameters) runs in a folder of its own, starting from a copy of the reference's stages before
the fault's ``start`` stage (their manifest entries kept, so only the stages from ``start`` on
run; no Ray Train or TransE checkpoints are copied):

* **kill_driver**: SIGKILL of the driver's process group, either ``at`` x the expected time of
  the run from ``start`` after its first stage starts (``moment=during``), or as soon as the
  folder of the ``start`` stage is published (``moment=publish``: between the rename and the
  manifest's ``done``, or just after it).
* **kill_worker**: SIGKILL of one Ray worker process of the run (a descendant of the driver whose
  name starts with ``ray::``, not an idle worker nor one of Ray's agents; ``pick`` chooses among
  those alive, sorted by name) at ``at`` x the expected time. The run may recover by itself.
* **concurrent_start**: once the run holds ``.run.lock`` and ``at`` x half the expected time has
  passed, the same command starts again on the same directory: it must be refused at once
  (exit 2, naming the first run's pid) while the first one runs on and finishes.
* **corrupt_output**: from a copy of the whole finished reference, one output file of stage
  ``target`` (``pick`` of its files, sorted) is truncated to ``at`` x its size, has one byte
  flipped (same size: the re-run uses ``--verify``) or is deleted. The re-run must name the
  file, redo the stage and nothing else that changes the result.
* **disk_full**: the run directory is a tmpfs mounted for the fault (``mount -t tmpfs``), shrunk
  after the copy to what the copy uses plus ``at`` x what the remaining stages wrote in the
  reference. The run must fail for lack of space (a run that fits met no full disk: not
  delivered); the tmpfs is then grown (space freed) and the same command re-run.

After the fault the run directory must be consistent (every stage the manifest calls done
matches its recorded sizes and digests), then the same command is re-run until it completes (at
most ``--reruns`` times; a run past ``--attempt-timeout`` is killed and counts as stuck). The
final run directory is compared with the reference: the ``report`` part of ``report.json`` (every
split, reader and figure), the train summary (timings and paths aside), the training history
(epoch timings aside), ``train/model.pt`` (loaded with ``weights_only=True``, every tensor
equal), and the digest of every other output file but ``stats.json`` and ``report.md`` (Parquet
files by their rows, with the run directory's path made relative: the ingest's rows name their
source file); and nothing is lost:
every stage done with its files intact, and the ingest's line accounting
(``check_ingest_accounting``: every input line accepted, rejected or skipped). Processes of a
run still alive 10 s after it ended are killed by pid and listed (``outlived_it``).

A fault is ``survived`` when the final run completes, equals the reference and met its kind's
expectation (consistent after the fault, refusal, detection); ``wrong_result`` when a completed
run differs from the reference or lost something; anything else (stuck, never completed, an
expectation not met) is neither and is listed with its details. A fault that could not be
delivered (the run ended before the kill, a disk that was not filled) is recorded and not
counted; the schedule goes on
until ``--faults`` were delivered (at most twice as many drawn). Full disks need a tmpfs mount;
where mounting is refused the kind is skipped, with the reason in the JSON.

One progress line per fault goes to the log; the last line of stdout is one JSON object (the
arguments, ``faults``, ``survived``, ``wrong_results``, per-kind counts, every fault's record). It
is written to ``benchmarks/out/chaos.json`` for a run of 30 faults or more, else to
``<work>/chaos.json``. Run it niced on a shared machine:

    nice -n 19 .venv/bin/python benchmarks/chaos.py --faults 30 --seed 0 --work runs/chaos
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("chaos")

STAGES = ("generate", "ingest", "embed", "memory", "train", "evaluate")
#: stages that run Ray workers (the only ones a worker kill can hit)
RAY_STAGES = ("embed", "memory", "train", "evaluate")
KINDS = ("kill_driver", "kill_worker", "concurrent_start", "corrupt_output", "disk_full")
#: how often each stage is the first one a fault's run does: the later ones are cheaper to
#: re-run (every run pays Ray's start, about 11 s here, and embed about 36 s)
START_WEIGHTS = {"generate": 1, "ingest": 1, "embed": 1, "memory": 2, "train": 3, "evaluate": 4}
CORRUPT_MODES = ("truncate", "flip", "delete")
#: the smoke settings: tests/integration/test_pipeline.py's TINY plus these
EXTRA_SETTINGS = ["train.num_workers=1", "train.patience=5", "ray.num_cpus=3"]
#: per-run values of the train summary in report.json (timings, the path of its Ray run)
VOLATILE_TRAIN = {"mean_epoch_seconds", "ray_run"}
#: files not compared by digest: timings (stats.json, history.json: compared without them),
#: the model (compared tensor by tensor), and report.md (the report.json figures rendered with
#: the run's path and stage times; written beside the evaluate stage's recorded outputs)
NOT_BY_DIGEST = {"train/history.json", "train/model.pt", "evaluate/report.md"}
#: JSON outputs that carry timings among their content (the index's per-level and per-iteration
#: ``seconds``): compared by a digest of the JSON without the keys in ``TIMING_KEYS``
TIMED_JSON = {"memory/index/index.json"}
TIMING_KEYS = {"seconds"}
#: Ray's own processes under the raylet, never chosen as the worker to kill
RAY_AGENTS = ("ray::IDLE", "ray::DashboardAgent", "ray::RuntimeEnvAgent")

STARTING = re.compile(r"pipeline\.rundir: \[(\w+)\] starting")


# ---------------------------------------------------------------------------------------------
# The schedule
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fault:
    """One fault of the schedule; the meaning of each field depends on ``kind`` (module doc)."""

    index: int
    kind: str
    start: str           # the first stage the fault's run does (earlier ones are copied)
    at: float            # a fraction: of the expected time, of the disk room, of the file
    moment: str = ""     # kill_driver: during | publish
    target: str = ""     # corrupt_output: the stage whose file is damaged
    pick: float = 0.0    # kill_worker, corrupt_output: which one of the candidates
    mode: str = ""       # corrupt_output: truncate | flip | delete


def make_schedule(n: int, seed: int, kinds: tuple[str, ...] = KINDS) -> list[Fault]:
    """``n`` faults drawn from ``random.Random(seed)``: the kinds in blocks of one of each, each
    block shuffled; each kind's start stages from a shuffled bag holding every stage
    ``START_WEIGHTS`` times, the damaged stages and the ways of damaging from bags of one each
    (refilled when empty): every prefix is balanced, and a longer schedule extends a shorter one."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown or not kinds:
        raise ValueError(f"kinds {list(kinds)}: unknown {unknown}; known: {', '.join(KINDS)}")
    rng = random.Random(seed)
    bags: dict[str, list[str]] = {}

    def draw_from(name: str, items: list[str]) -> str:
        if not bags.get(name):
            bags[name] = list(items)
            rng.shuffle(bags[name])
        return bags[name].pop()

    faults: list[Fault] = []
    while len(faults) < n:
        block = list(kinds)
        rng.shuffle(block)
        for kind in block[: n - len(faults)]:
            faults.append(_draw(rng, len(faults), kind, draw_from))
    return faults


def _draw(rng: random.Random, index: int, kind: str, draw_from) -> Fault:
    """One fault of ``kind``; ``draw_from(bag, items)`` draws from a refilled shuffled bag."""
    if kind == "corrupt_output":
        return Fault(index, kind, "", round(rng.uniform(0.0, 0.9), 3),
                     target=draw_from("target", list(STAGES)), pick=round(rng.random(), 3),
                     mode=draw_from("mode", list(CORRUPT_MODES)))
    stages = RAY_STAGES if kind == "kill_worker" else STAGES
    start = draw_from(kind, [s for s in stages for _ in range(START_WEIGHTS[s])])
    if kind == "kill_driver":
        moment = rng.choice(("during", "during", "publish"))
        return Fault(index, kind, start, round(rng.uniform(0.0, 0.85), 3), moment)
    if kind == "kill_worker":
        return Fault(index, kind, start, round(rng.uniform(0.0, 0.7), 3), pick=round(rng.random(), 3))
    if kind == "concurrent_start":
        return Fault(index, kind, start, round(rng.uniform(0.0, 0.8), 3))
    return Fault(index, kind, start, round(rng.uniform(0.05, 0.9), 3))  # disk_full


# ---------------------------------------------------------------------------------------------
# Comparing a run with the reference
# ---------------------------------------------------------------------------------------------

def _diff(a, b, path: str) -> list[str]:
    """Paths (``report.splits.dev...``) where two JSON-like values differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}.{k}: missing on one side" for k in sorted(set(a) ^ set(b), key=str)]
        for k in sorted(set(a) & set(b), key=str):
            out += _diff(a[k], b[k], f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} items != {len(b)}"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, f"{path}[{i}]")]
    if hasattr(a, "shape") or hasattr(b, "shape"):  # tensors
        import torch

        same = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b))
        return [] if same else [f"{path}: tensors differ"]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


def _parquet_digest(path: Path, roots: tuple[str, ...]) -> str:
    """Digest of a Parquet file's rows with each of ``roots`` replaced by ``<run>`` (the ingest's
    questions and rejects name their source file by its absolute path: the reference's in a
    copied stage, the fault's own in a redone one)."""
    import hashlib

    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    text = json.dumps(rows, default=repr, sort_keys=True)
    for root in roots:
        text = text.replace(root, "<run>")
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def without_keys(o, keys: set[str]):
    """A JSON-like value with every dict key in ``keys`` removed, at any depth."""
    if isinstance(o, dict):
        return {k: without_keys(v, keys) for k, v in o.items() if k not in keys}
    return [without_keys(v, keys) for v in o] if isinstance(o, list) else o


def _json_digest_without_timings(path: Path) -> str:
    """Digest of a JSON file's content with every key in ``TIMING_KEYS`` removed, at any depth."""
    import hashlib

    text = json.dumps(without_keys(json.loads(path.read_text()), TIMING_KEYS), sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def snapshot(run: Path, reference: str | None = None) -> dict:
    """What a finished run is compared by: report, train summary, history, model, file digests
    (Parquet files by their rows, with paths into ``run`` or the ``reference`` it was copied
    from made relative); ``root`` names the run."""
    from pipeline.artifacts import load_torch_file
    from pipeline.rundir import output_record

    roots = tuple(str(Path(r).resolve()) for r in (run, reference) if r)
    report = json.loads((run / "report.json").read_text())
    history = json.loads((run / "train" / "history.json").read_text())
    files = {}
    for stage in STAGES:
        folder = run / stage
        if folder.is_dir():
            for rel, (_, digest) in output_record(folder).items():
                name = f"{stage}/{rel}"
                if rel == "stats.json" or name in NOT_BY_DIGEST:
                    continue
                if rel.endswith(".parquet"):
                    files[name] = _parquet_digest(folder / rel, roots)
                elif name in TIMED_JSON:
                    files[name] = _json_digest_without_timings(folder / rel)
                else:
                    files[name] = digest
    return {
        "report": report["report"],
        "train": {k: v for k, v in report.get("train", {}).items() if k not in VOLATILE_TRAIN},
        "history": [{k: v for k, v in h.items() if k != "epoch_seconds"} for h in history],
        "model": load_torch_file(run / "train" / "model.pt", what="the train stage"),
        "files": files,
        "root": roots[0],
    }


def compare(ref: dict, got: dict) -> list[str]:
    """Every difference of snapshot ``got`` from the reference's (empty: equal)."""
    return [d for key in ("report", "train", "history", "model", "files")
            for d in _diff(ref.get(key), got.get(key), key)]


def integrity(run: Path, *, require_all: bool = False) -> list[str]:
    """Problems of the run directory as the contract sees them: a manifest that does not parse,
    a stage called done whose files differ from the recorded sizes and digests, and with
    ``require_all`` a stage not done."""
    from pipeline.rundir import RunDir

    try:
        rd = RunDir(run)
        stages = rd.manifest()["stages"]
    except (OSError, ValueError, KeyError) as e:
        return [f"manifest: {e}"]
    problems = []
    for stage in STAGES:
        e = stages.get(stage)
        if not e or e.get("status") != "done":
            if require_all:
                problems.append(f"{stage}: not done ({(e or {}).get('status')})")
            continue
        if not (run / stage).is_dir():
            problems.append(f"{stage}: done, but its folder is missing")
            continue
        p = rd.output_problem(stage, e, digests=True)
        if p:
            problems.append(f"{stage}: done, but {p}")
    return problems


def lost(run: Path) -> list[str]:
    """Nothing lost: every stage done with its files intact, and the ingest's line accounting."""
    from tests.integration.test_pipeline import check_ingest_accounting

    problems = integrity(run, require_all=True)
    try:
        check_ingest_accounting(run / "ingest")
    except (AssertionError, OSError, ValueError, KeyError) as e:
        problems.append(f"ingest accounting: {type(e).__name__} {e}"[:300])
    return problems


def judge(record: dict, ref: dict | None, run: Path) -> None:
    """Set ``record['outcome']`` (survived | wrong_result | stuck | failed) and its details."""
    attempts = record["attempts"]
    completed = bool(attempts) and attempts[-1]["rc"] == 0
    if completed and ref is not None:
        try:
            diffs = compare(ref, snapshot(run, ref.get("root"))) + lost(run)
        except (OSError, ValueError, KeyError) as e:
            diffs = [f"reading the finished run: {type(e).__name__} {e}"]
        if diffs:
            record["outcome"], record["differences"] = "wrong_result", diffs[:20]
            return
    if any(a["timed_out"] for a in attempts):
        record["outcome"] = "stuck"
    elif not completed:
        record["outcome"] = "failed"
        record["problems"] = record.get("problems", []) + [
            f"not completed after {len(attempts)} runs (last rc {attempts[-1]['rc'] if attempts else None})"]
    elif record.get("problems"):
        record["outcome"] = "failed"
    else:
        record["outcome"] = "survived"


def tally(records: list[dict]) -> dict:
    """The counts: faults (delivered), survived, wrong_results, per kind, and the others."""
    done = [r for r in records if r.get("delivered")]
    by_kind = {}
    for r in done:
        k = by_kind.setdefault(r["kind"], {"faults": 0, "survived": 0, "wrong_results": 0})
        k["faults"] += 1
        k["survived"] += r["outcome"] == "survived"
        k["wrong_results"] += r["outcome"] == "wrong_result"
    return {
        "faults": len(done),
        "survived": sum(r["outcome"] == "survived" for r in done),
        "wrong_results": sum(r["outcome"] == "wrong_result" for r in done),
        "by_kind": by_kind,
        "neither": [{"index": r["index"], "kind": r["kind"], "outcome": r["outcome"],
                     "problems": r.get("problems", [])}
                    for r in done if r["outcome"] not in ("survived", "wrong_result")],
        "not_delivered": [r["index"] for r in records if not r.get("delivered")],
    }


# ---------------------------------------------------------------------------------------------
# Running the pipeline
# ---------------------------------------------------------------------------------------------

def pipeline_command(run: Path, *, verify: bool = False) -> list[str]:
    from tests.integration.test_pipeline import TINY

    cmd = [sys.executable, "-m", "pipeline.run", "--run-dir", str(run)]
    for s in TINY + EXTRA_SETTINGS:
        cmd += ["--set", s]
    return cmd + (["--verify"] if verify else [])


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Attempt:
    """One ``pipeline.run`` process in a session of its own, its log, and every descendant seen
    (pid -> start time), so that what outlives it can be found and ended by pid."""

    def __init__(self, cmd: list[str], log_path: Path):
        self.log_path = log_path
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.t0 = time.monotonic()
        self.family: dict[int, float] = {}
        self.text = ""
        self._offset = 0
        self.first_start: float | None = None  # when its first stage started (monotonic)
        self._last_family = 0.0

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def read(self) -> None:
        with open(self.log_path, "rb") as f:
            f.seek(self._offset)
            new = f.read()
        self._offset += len(new)
        self.text += new.decode(errors="replace")
        if self.first_start is None and STARTING.search(self.text):
            self.first_start = time.monotonic()

    def stages_started(self) -> list[str]:
        return STARTING.findall(self.text)

    def descendants(self) -> list:
        import psutil

        try:
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return []
        for k in kids:
            try:
                self.family.setdefault(k.pid, k.create_time())
            except psutil.Error:
                pass
        self._last_family = time.monotonic()
        return kids

    def tick(self) -> None:
        self.read()
        if time.monotonic() - self._last_family > 1.0:
            self.descendants()

    def kill_group(self) -> None:
        self.descendants()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def reap(self, grace: float = 10.0) -> list[str]:
        """Wait for the process; then for its descendants to end by themselves for up to
        ``grace`` seconds; SIGKILL (by pid, start time checked) those left. Returns their names."""
        import psutil

        self.proc.wait()
        self._log.close()
        self.read()
        left = []
        deadline = time.monotonic() + grace
        while True:
            left = []
            for pid, created in self.family.items():
                try:
                    p = psutil.Process(pid)
                    if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                        left.append(p)
                except psutil.Error:
                    pass
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        names = []
        for p in left:
            try:
                names.append(" ".join(p.cmdline())[:80] or p.name())
                p.kill()
            except psutil.Error:
                pass
        return names


def run_attempt(cmd: list[str], log_path: Path, timeout: float, act=None) -> tuple[dict, Attempt]:
    """Run ``cmd`` to its end (or ``timeout``: the group is killed); ``act(attempt)`` is called
    every 50 ms while it runs (the fault's hook). Returns the attempt's record."""
    a = Attempt(cmd, log_path)
    timed_out = False
    while a.proc.poll() is None:
        a.tick()
        if act is not None:
            act(a)
        if a.elapsed() > timeout:
            timed_out = True
            a.kill_group()
            break
        time.sleep(0.05)
    orphans = a.reap()
    rec = {"rc": a.proc.returncode, "seconds": round(a.elapsed(), 1), "timed_out": timed_out,
           "stages_run": a.stages_started(), "outlived_it": orphans,
           "log": str(log_path)}
    if a.proc.returncode not in (0, None):
        tail = [ln for ln in a.text.splitlines() if ln.strip()][-3:]
        rec["tail"] = [ln[-300:] for ln in tail]
    return rec, a


# ---------------------------------------------------------------------------------------------
# The faults
# ---------------------------------------------------------------------------------------------

@dataclass
class Context:
    """What every fault needs: the reference, its stage times, the limits."""

    reference: Path
    ref_snapshot: dict
    seconds: dict[str, float]  # the reference's seconds per stage
    attempt_timeout: float
    reruns: int

    def expected(self, start: str) -> float:
        """Expected seconds of a run from ``start``: its stages, plus Ray's start (about what
        the reference's generate took, as Ray starts inside the first stage with work)."""
        i = STAGES.index(start)
        ray_start = self.seconds["generate"] if i > 0 else 0.0
        return ray_start + sum(self.seconds[s] for s in STAGES[i:])


def prepare(reference: Path, run: Path, start: str) -> None:
    """``run`` as the reference was before ``start`` ran: the earlier stages' folders and
    manifest entries, the resolved config ("" copies every stage and the report)."""
    run.mkdir(parents=True, exist_ok=True)
    keep = STAGES if not start else STAGES[: STAGES.index(start)]
    for stage in keep:
        shutil.copytree(reference / stage, run / stage)
    manifest = json.loads((reference / "manifest.json").read_text())
    manifest["stages"] = {k: v for k, v in manifest["stages"].items() if k in keep}
    (run / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    shutil.copy(reference / "config.resolved.yaml", run / "config.resolved.yaml")
    if not start:
        shutil.copy(reference / "report.json", run / "report.json")


def _lock_holder(run: Path) -> int | None:
    try:
        return int(json.loads((run / ".run.lock").read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def disturb_kill_driver(ctx: Context, f: Fault, run: Path, fdir: Path, rec: dict) -> dict:
    """kill_driver: SIGKILL of the run's process group, after a delay or at a publication."""
    delay = f.at * ctx.expected(f.start)
    shot = {}

    def act(a: Attempt) -> None:
        if shot or a.first_start is None:
            return
        if f.moment == "publish":
            if not (run / f.start).is_dir():
                return
        elif time.monotonic() - a.first_start < delay:
            return
        a.kill_group()
        seen = a.stages_started()
        shot.update(at_s=round(a.elapsed(), 1), stage=seen[-1] if seen else None)

    first, _ = run_attempt(pipeline_command(run), fdir / "run-0.log", ctx.attempt_timeout, act)
    rec["delivered"] = bool(shot)
    rec["fault"] = shot
    if shot:
        entry = _manifest_entry(run, f.start)
        shot["manifest_status_of_start"] = entry.get("status")
    return first


def disturb_kill_worker(ctx: Context, f: Fault, run: Path, fdir: Path, rec: dict) -> dict:
    """kill_worker: SIGKILL of one busy Ray worker of the run, after a delay."""
    import psutil

    delay = f.at * ctx.expected(f.start)
    shot = {}

    def act(a: Attempt) -> None:
        if shot or a.first_start is None or time.monotonic() - a.first_start < delay:
            return
        victims = []
        for p in a.descendants():
            try:
                name = " ".join(p.cmdline()).strip()
            except psutil.Error:  # gone meanwhile
                continue
            if name.startswith("ray::") and not name.startswith(RAY_AGENTS):
                victims.append((name, p.pid))
        if not victims:
            return
        victims.sort()
        name, pid = victims[min(int(f.pick * len(victims)), len(victims) - 1)]
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        seen = a.stages_started()
        shot.update(at_s=round(a.elapsed(), 1), stage=seen[-1] if seen else None,
                    victim=name[:80], candidates=len(victims))

    first, _ = run_attempt(pipeline_command(run), fdir / "run-0.log", ctx.attempt_timeout, act)
    rec["delivered"] = bool(shot)
    rec["fault"] = shot
    return first


def disturb_concurrent(ctx: Context, f: Fault, run: Path, fdir: Path, rec: dict) -> dict:
    """concurrent_start: the same command again while the run holds the lock."""
    delay = f.at * 0.5 * ctx.expected(f.start)
    shot = {}
    state = {}

    def act(a: Attempt) -> None:
        if shot:
            return
        if "locked" not in state:
            if _lock_holder(run) == a.proc.pid:
                state["locked"] = time.monotonic()
            return
        if time.monotonic() - state["locked"] < delay or a.proc.poll() is not None:
            return
        t0 = time.monotonic()
        try:
            out = subprocess.run(pipeline_command(run), cwd=ROOT, env=_env(), capture_output=True,
                                 text=True, timeout=120)
            rc, text = out.returncode, out.stdout + out.stderr
        except subprocess.TimeoutExpired as e:
            rc, text = None, f"still running after {e.timeout} s (killed)"
        (fdir / "second.log").write_text(text)
        shot.update(at_s=round(a.elapsed(), 1), holder=a.proc.pid, second_rc=rc,
                    second_seconds=round(time.monotonic() - t0, 1),
                    names_holder=re.search(rf"\bpid {a.proc.pid}\b", text) is not None,
                    first_still_running=a.proc.poll() is None,
                    second_error=next((ln for ln in text.splitlines() if ln.startswith("error:")),
                                      "")[:300])

    first, _ = run_attempt(pipeline_command(run), fdir / "run-0.log", ctx.attempt_timeout, act)
    rec["fault"] = shot
    refused = bool(shot) and shot["second_rc"] == 2 and shot["names_holder"]
    # a second start that found the first one finished (a race at its very end) met no lock
    rec["delivered"] = refused or (bool(shot) and (shot["first_still_running"]
                                                   or shot["second_rc"] != 0))
    if rec["delivered"] and not refused:
        rec.setdefault("problems", []).append(
            f"the second start was not refused naming pid {shot['holder']}: rc "
            f"{shot['second_rc']}, {shot['second_error'] or 'no error line'}")
    return first


def disturb_corrupt(ctx: Context, f: Fault, run: Path, fdir: Path, rec: dict) -> dict:
    """corrupt_output: damage one file of a finished stage, then run (``--verify`` after a
    flipped byte, which keeps the size)."""
    outputs = _manifest_entry(run, f.target).get("outputs", {})
    names = sorted(outputs)
    rel = names[min(int(f.pick * len(names)), len(names) - 1)]
    path = run / f.target / rel
    size = path.stat().st_size
    if f.mode == "truncate":
        with open(path, "r+b") as fh:
            fh.truncate(int(f.at * size))
    elif f.mode == "flip":
        offset = min(int(f.at * size), size - 1)
        with open(path, "r+b") as fh:
            fh.seek(offset)
            byte = fh.read(1)
            fh.seek(offset)
            fh.write(bytes([byte[0] ^ 0xFF]))
    else:
        path.unlink()
    rec["delivered"] = True
    rec["fault"] = {"file": f"{f.target}/{rel}", "bytes": size}
    first, a = run_attempt(pipeline_command(run, verify=f.mode == "flip"), fdir / "run-0.log",
                           ctx.attempt_timeout)
    named = f"output {f.target}/{rel}" in a.text and "redoing the stage" in a.text
    rec["fault"]["detected"] = named
    if not named:
        rec.setdefault("problems", []).append(
            f"the re-run did not name {f.target}/{rel} and redo {f.target}")
    return first


def disturb_disk_full(ctx: Context, f: Fault, run: Path, fdir: Path, rec: dict) -> dict:
    """disk_full: the run as it is (the tmpfs is the fault); delivered when it ran out of space
    (a run that fitted met no full disk)."""
    first, a = run_attempt(pipeline_command(run), fdir / "run-0.log", ctx.attempt_timeout)
    enospc = "No space left on device" in a.text or "ENOSPC" in a.text
    rec["delivered"] = enospc
    rec["fault"].update(rc=first["rc"], out_of_space=enospc,
                        used_after=_used(run.parent))
    return first


def _allocated(path: Path) -> int:
    """Bytes a tree takes on disk (blocks, as tmpfs counts them)."""
    if not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_blocks * 512
    return sum(p.lstat().st_blocks * 512 for p in path.rglob("*")) + 4096


def _mount(args: list[str]) -> str | None:
    """Run ``mount``/``umount``; None on success, else its error."""
    out = subprocess.run(args, capture_output=True, text=True)
    return None if out.returncode == 0 else (out.stderr.strip() or f"rc {out.returncode}")


def tmpfs_available(work: Path) -> str | None:
    """None when a small tmpfs can be mounted here, else why not."""
    probe = work / ".tmpfs-probe"
    probe.mkdir(parents=True, exist_ok=True)
    try:
        err = _mount(["mount", "-t", "tmpfs", "-o", "size=1m", "chaos-probe", str(probe)])
    except OSError as e:
        err = f"mount: {e.strerror}"
    if err is None:
        _mount(["umount", str(probe)])
    probe.rmdir()
    return err


def disk_full_room(ctx: Context, f: Fault) -> tuple[int, int]:
    """(bytes the copied stages take, bytes the remaining stages wrote in the reference), as
    the reference's disk blocks count them."""
    i = STAGES.index(f.start)
    copied = sum(_allocated(ctx.reference / s) for s in STAGES[:i])
    rest = sum(_allocated(ctx.reference / s) for s in STAGES[i:])
    rest += _allocated(ctx.reference / "train_ray") if i <= STAGES.index("train") else 0
    rest += _allocated(ctx.reference / ".embed-checkpoint") if i <= STAGES.index("embed") else 0
    return copied, rest


def _used(mount: Path) -> int:
    st = os.statvfs(mount)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def run_fault(ctx: Context, f: Fault, work: Path) -> dict:
    """Deliver fault ``f``, re-run until complete, judge; returns its record."""
    fdir = work / f"f{f.index:02d}-{f.kind}"
    shutil.rmtree(fdir, ignore_errors=True)
    fdir.mkdir(parents=True)
    rec = {**{k: v for k, v in asdict(f).items() if k in ("index", "kind", "at") or v},
           "attempts": []}
    t0 = time.monotonic()
    mnt = fdir / "mnt" if f.kind == "disk_full" else None
    run = (mnt / "run") if mnt is not None else fdir / "run"
    try:
        if mnt is not None:  # room for the copy first; then the copy's usage plus `at` x rest
            copied, rest = disk_full_room(ctx, f)
            roomy = 4 * (copied + rest) + 2**20
            mnt.mkdir()
            err = _mount(["mount", "-t", "tmpfs", "-o", f"size={roomy}", f"chaos-f{f.index}",
                          str(mnt)])
            if err:
                raise RuntimeError(f"mount: {err}")
        prepare(ctx.reference, run, f.start)
        if mnt is not None:
            used = _used(mnt)
            size = used + int(f.at * rest)
            err = _mount(["mount", "-o", f"remount,size={size}", str(mnt)])
            if err:
                raise RuntimeError(f"remount: {err}")
            rec["fault"] = {"tmpfs_bytes": size, "used_bytes": used, "rest_bytes": rest}
        disturb = {"kill_driver": disturb_kill_driver, "kill_worker": disturb_kill_worker,
                   "concurrent_start": disturb_concurrent, "corrupt_output": disturb_corrupt,
                   "disk_full": disturb_disk_full}[f.kind]
        first = disturb(ctx, f, run, fdir, rec)
        rec["attempts"].append(first)
        if f.kind != "corrupt_output":
            broken = integrity(run)
            rec["consistent_after_fault"] = not broken
            if broken:
                rec.setdefault("problems", []).extend(f"after the fault: {b}" for b in broken)
        if mnt is not None:  # space is freed: the tmpfs grows to four times what the run needs
            err = _mount(["mount", "-o", f"remount,size={roomy}", str(mnt)])
            if err:
                raise RuntimeError(f"remount: {err}")
        for i in range(ctx.reruns):
            if rec["attempts"][-1]["rc"] == 0:
                break
            again, _ = run_attempt(pipeline_command(run), fdir / f"run-{i + 1}.log",
                                   ctx.attempt_timeout)
            rec["attempts"].append(again)
        judge(rec, ctx.ref_snapshot, run)
    except Exception as e:  # the harness's own trouble: recorded, the schedule goes on
        rec.setdefault("delivered", False)
        rec["outcome"] = "harness_error"
        rec.setdefault("problems", []).append(f"{type(e).__name__}: {e}"[:300])
    finally:
        if mnt is not None and mnt.is_dir():
            if _mount(["umount", str(mnt)]) is not None:
                _mount(["umount", "-l", str(mnt)])
    rec["seconds"] = round(time.monotonic() - t0, 1)
    return rec


def _manifest_entry(run: Path, stage: str) -> dict:
    try:
        return json.loads((run / "manifest.json").read_text())["stages"].get(stage) or {}
    except (OSError, ValueError, KeyError):
        return {}


# ---------------------------------------------------------------------------------------------
# main

def rejudge(result: dict, work: Path, redeliver=None) -> dict:
    """Judge again, with this file's comparison, every wrong result of a finished chaos
    ``result`` whose run folder is still in ``work`` (kept: only survived faults are removed);
    one whose folder is gone (a disk_full fault's tmpfs) is delivered again by
    ``redeliver(index)`` (a new record), or left as judged without it. Each changed record keeps
    its first verdict in ``first_judgement``; the counts are recomputed and the result lists the
    re-judged fault indices under ``rejudged``, the delivered-again ones under ``redelivered``."""
    ref = snapshot(work / "reference")
    judged, again = [], []
    for i, rec in enumerate(result["records"]):
        if rec.get("outcome") != "wrong_result":
            continue
        run = work / f"f{rec['index']:02d}-{rec['kind']}" / "run"
        first = {"outcome": rec["outcome"], "differences": rec.get("differences", [])}
        if run.is_dir():
            rec.pop("outcome")
            rec.pop("differences", None)
            judge(rec, ref, run)
            judged.append(rec["index"])
        elif redeliver is not None:
            rec = result["records"][i] = redeliver(rec["index"])
            again.append(rec["index"])
        else:
            continue
        rec["first_judgement"] = first
        log.info("judged again %s (first: %s)", describe(rec), first["differences"][:3])
    counts = tally(result["records"])
    result.update({k: counts[k] for k in ("faults", "survived", "wrong_results", "by_kind",
                                          "neither", "not_delivered")})
    result["rejudged"] = sorted(set(result.get("rejudged", [])) | set(judged))
    result["redelivered"] = sorted(set(result.get("redelivered", [])) | set(again))
    return result

# ---------------------------------------------------------------------------------------------

def build_reference(work: Path, timeout: float) -> tuple[Path, float]:
    """The undisturbed run (re-used when already finished: a re-run with ``--verify`` checks it
    and skips every stage)."""
    ref = work / "reference"
    rec, _ = run_attempt(pipeline_command(ref, verify=True), work / "reference.log", timeout)
    if rec["rc"] != 0:
        raise SystemExit(f"the reference run failed (rc {rec['rc']}); see {work / 'reference.log'}")
    return ref, rec["seconds"]


def describe(r: dict) -> str:
    where = r.get("fault", {})
    bits = [f"start={r['start']}" if r.get("start") else "", f"at={r['at']}",
            r.get("moment", ""), r.get("mode", ""), f"target={r['target']}" if r.get("target") else "",
            f"in {where['stage']}" if where.get("stage") else "",
            where.get("victim", "").split(" ")[0], where.get("file", "")]
    runs = len(r["attempts"])
    return (f"fault {r['index']:2d} {r['kind']:<16} {' '.join(b for b in bits if b)}: "
            f"{r['outcome'] if r.get('delivered') else 'not delivered'} "
            f"({runs} run{'s' * (runs != 1)}, {r['seconds']:.0f} s)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--faults", type=int, default=30, help="faults to deliver")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset of kinds")
    p.add_argument("--work", default="runs/chaos", help="folder of the reference and the faults")
    p.add_argument("--reruns", type=int, default=3, help="re-runs after a fault, at most")
    p.add_argument("--attempt-timeout", type=float, default=0,
                   help="seconds before a run counts as stuck (0: 4x the reference, >= 300)")
    p.add_argument("--keep", action="store_true", help="keep the folders of survived faults")
    p.add_argument("--out", default="", help="JSON output (default: benchmarks/out/chaos.json "
                                             "for 30 faults or more, else <work>/chaos.json)")
    p.add_argument("--rejudge", default="", metavar="JSON",
                   help="judge the wrong results of this finished run's JSON again with the "
                        "current comparison (their folders in --work; a fault whose folder is "
                        "gone is delivered again) and rewrite it")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s: %(message)s")
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    skipped = {}
    if "disk_full" in kinds:
        why = tmpfs_available(work)
        if why is not None:
            skipped["disk_full"] = f"cannot mount a tmpfs here: {why}"
            kinds = tuple(k for k in kinds if k != "disk_full")
    t0 = time.monotonic()
    ref, ref_seconds = build_reference(work, 1800)
    manifest = json.loads((ref / "manifest.json").read_text())
    seconds = {s: float(manifest["stages"][s]["seconds"]) for s in STAGES}
    timeout = args.attempt_timeout or max(300.0, 4 * sum(seconds.values()))
    ctx = Context(ref, snapshot(ref), seconds, timeout, args.reruns)
    base = lost(ref)
    if base:
        raise SystemExit(f"the reference itself is not whole: {base}")
    log.info("reference: %s (%.0f s to check; stages %s)", ref, ref_seconds,
             {s: round(v, 1) for s, v in seconds.items()})
    if args.rejudge:  # the schedule of the finished run: its --seed, --faults and kinds
        path = Path(args.rejudge)
        result = json.loads(path.read_text())
        a = result["args"]
        schedule = {f.index: f for f in make_schedule(2 * a["faults"], a["seed"],
                                                      tuple(a["kinds"]))}
        result = rejudge(result, work, lambda i: run_fault(ctx, schedule[i], work))
        path.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps({k: v for k, v in result.items() if k != "records"}))
        return 0 if result["survived"] == result["faults"] and not result["wrong_results"] else 1
    records = []
    for f in make_schedule(2 * args.faults, args.seed, kinds):
        if sum(bool(r.get("delivered")) for r in records) >= args.faults:
            break
        rec = run_fault(ctx, f, work)
        records.append(rec)
        log.info("%s", describe(rec))
        if rec.get("outcome") == "survived" and not args.keep:
            shutil.rmtree(work / f"f{f.index:02d}-{f.kind}", ignore_errors=True)
    counts = tally(records)
    result = {"benchmark": "chaos", "args": {**vars(args), "kinds": list(kinds)},
              "faults": counts["faults"], "survived": counts["survived"],
              "wrong_results": counts["wrong_results"], "by_kind": counts["by_kind"],
              "neither": counts["neither"], "not_delivered": counts["not_delivered"],
              "skipped_kinds": skipped,
              "reference": {"stage_seconds": {s: round(v, 1) for s, v in seconds.items()},
                            "attempt_timeout_s": timeout},
              "seconds": round(time.monotonic() - t0, 1), "records": records}
    out = Path(args.out) if args.out else (
        ROOT / "benchmarks" / "out" / "chaos.json" if args.faults >= 30 else work / "chaos.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    log.info("wrote %s", out)
    print(json.dumps(result))
    return 0 if counts["survived"] == counts["faults"] and not counts["wrong_results"] else 1


if __name__ == "__main__":
    sys.exit(main())
