"""The smoke pipeline with ``--run-dir s3://...`` on a real S3-protocol server on the loopback
address (moto's server mode: `s3_server` in tests/conftest.py): killed during training, resumed
from the store by a run with an empty cache (another machine), and the same report, model,
batch evaluation and answers as the same run on a local directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch

from .cli_runs import KILL_SETTINGS, finish, run_cli


def _cli(run_dir: str, cache: Path) -> subprocess.Popen:
    """The CLI run with the driver-kill tests' settings (those of ``reference_run``), its run
    cache in ``cache``."""
    return run_cli(run_dir, KILL_SETTINGS, {"HMN_RUN_CACHE": str(cache)})


@pytest.fixture(scope="module")
def runs(s3_server, reference_run, tmp_path_factory):
    """The smoke run on s3://BUCKET/runs/smoke, killed (SIGKILL of its process group) once its
    first training checkpoint is on the store, then resumed with another cache; and the same
    run on a local directory (the session's ``reference_run``: the same command and settings)."""
    tmp = tmp_path_factory.mktemp("object-store")
    bucket = f"hmn-{uuid.uuid4().hex[:12]}"
    fs = pafs.S3FileSystem(endpoint_override=s3_server, allow_bucket_creation=True)
    fs.create_dir(bucket)
    uri, base = f"s3://{bucket}/runs/smoke", f"{bucket}/runs/smoke"
    seconds = {}

    t0 = time.perf_counter()
    p = _cli(uri, tmp / "cache-a")
    deadline = time.time() + 600
    ckpts = pafs.FileSelector(f"{base}/train_ray", recursive=True, allow_not_found=True)
    while time.time() < deadline:
        if p.poll() is not None:
            pytest.fail("the run ended before it could be killed:\n" + p.stdout.read()[-3000:])
        if any("/checkpoint_" in i.path for i in fs.get_file_info(ckpts)):
            break
        time.sleep(0.5)
    os.killpg(p.pid, signal.SIGKILL)
    killed_out = p.communicate()[0]
    seconds["killed"] = time.perf_counter() - t0
    killed_manifest = json.loads(fs.open_input_stream(f"{base}/manifest.json").read())

    t0 = time.perf_counter()
    resumed_out = finish(_cli(uri, tmp / "cache-b"))
    seconds["resumed"] = time.perf_counter() - t0
    print("object-store smoke runs, seconds:", {k: round(v, 1) for k, v in seconds.items()})
    return SimpleNamespace(tmp=tmp, fs=fs, uri=uri, base=base, local=reference_run,
                           killed_out=killed_out, killed_manifest=killed_manifest,
                           resumed_out=resumed_out)


def _read(r, rel: str) -> bytes:
    with r.fs.open_input_stream(f"{r.base}/{rel}") as f:
        return f.read()


@pytest.mark.slow
def test_killed_run_on_s3_resumes_from_the_store_with_the_local_report(runs):
    r = runs
    stages = r.killed_manifest["stages"]
    assert all(stages[s]["status"] == "done" for s in ("generate", "ingest", "embed", "memory"))
    assert stages["train"]["status"] == "running" and "evaluate" not in stages
    out = r.resumed_out
    assert "[ingest] done already" in out           # finished stages are not redone
    assert "[memory] downloading" in out            # ... but fetched from the store
    assert "resuming at epoch" in out               # training restarts from its S3 checkpoint
    assert "taking over the lease" in out           # the killed run's lease

    manifest = json.loads(_read(r, "manifest.json"))
    for name, e in manifest["stages"].items():      # every stage published, as recorded
        assert e["status"] == "done", name
        listing = {i.path[len(r.base) + len(name) + 2:]: i.size for i in r.fs.get_file_info(
            pafs.FileSelector(f"{r.base}/{name}", recursive=True)) if i.type == pafs.FileType.File}
        assert {k: v[0] for k, v in e["outputs"].items()}.items() <= listing.items(), name
    assert r.fs.get_file_info(f"{r.base}/.run.lock").type == pafs.FileType.NotFound  # released

    # the stages before training wrote the data files the local run's wrote (their JSON files
    # hold timings; ingest's question tables name their source files, in each run's own
    # directory): what the two runs' training and evaluation are compared on is the same
    done_locally = json.loads((r.local / "manifest.json").read_text())["stages"]
    for name in ("generate", "embed", "memory"):
        differ = sorted(f for f, record in manifest["stages"][name]["outputs"].items()
                        if not f.endswith(".json") and done_locally[name]["outputs"].get(f) != record)
        assert not differ, (name, differ)
    local = json.loads((r.local / "report.json").read_text())
    remote = json.loads(_read(r, "report.json"))
    assert remote["report"] == local["report"]      # every split, reader and figure
    for k in ("epochs", "best_epoch", "best_dev_accuracy", "train_questions", "vocabulary"):
        assert remote["train"][k] == local["train"][k], k
    assert remote["train"]["ray_run"].startswith(f"{r.uri}/train_ray/hmn-")
    assert b"| dev (150 q) | exact |" in _read(r, "evaluate/report.md")
    ma = torch.load(r.local / "train" / "model.pt", weights_only=True)["model"]
    (r.tmp / "model.pt").write_bytes(_read(r, "train/model.pt"))
    mb = torch.load(r.tmp / "model.pt", weights_only=True)["model"]
    for k in ma:
        assert np.array_equal(ma[k].numpy(), mb[k].numpy()), k


@pytest.mark.slow
def test_evaluate_and_answer_read_a_run_on_s3(runs, ray_local, monkeypatch):
    """``pipeline.evaluate`` and ``pipeline.answer`` with the URI: downloaded into their own
    cache, the same results as on the local run directory."""
    from pipeline import answer, evaluate

    r = runs
    monkeypatch.setenv("HMN_RUN_CACHE", str(r.tmp / "cache-reader"))
    dev = r.local / "generate" / "questions_dev.txt"
    a, b = evaluate(r.local, dev), evaluate(r.uri, dev)
    assert b.pop("run_dir") == r.uri and a.pop("run_dir") == str(r.local)
    assert a == b and a["questions"] == 150
    questions = [line.split("\t")[3] for line in dev.read_text().splitlines()[:20]]
    assert answer(r.uri, questions, k=3) == answer(r.local, questions, k=3)
