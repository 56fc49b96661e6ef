"""The smoke pipeline with ``--run-dir s3://...`` on a real S3-protocol server on the loopback
address (moto's server mode: `s3_server` in tests/conftest.py): killed during training, resumed
from the store by a run with an empty cache (another machine), and the same report, model,
batch evaluation and answers as the same run on a local directory."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.fs as pafs
import pytest
import torch

from tests.integration.test_pipeline import TINY

ROOT = Path(__file__).resolve().parents[2]
#: the CLI runs' settings: those of the local kill-and-resume test, with TransE in the driver
#: (Ray Train's local mode: no worker group to start, about 20 s less a run on 2 cores)
SETTINGS = TINY + ["embed.num_workers=0", "train.num_workers=1", "train.max_epochs=5",
                   "train.patience=5", "ray.num_cpus=3"]


def _cli(run_dir: str, cache: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["HMN_RUN_CACHE"] = str(cache)
    cmd = [sys.executable, "-m", "pipeline.run", "--run-dir", run_dir]
    for s in SETTINGS:
        cmd += ["--set", s]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(p: subprocess.Popen) -> str:
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]
    return out


@pytest.fixture(scope="module")
def runs(s3_server, tmp_path_factory):
    """The smoke run on s3://BUCKET/runs/smoke, killed (SIGKILL of its process group) once its
    first training checkpoint is on the store, then resumed with another cache; and the same
    run on a local directory."""
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
    resumed_out = _finish(_cli(uri, tmp / "cache-b"))
    seconds["resumed"] = time.perf_counter() - t0

    # The local run starts from a copy of the store's generate to memory stages (as the local
    # kill-and-resume test starts from a copy): what is compared is training and evaluation,
    # killed and resumed through the store, against the same on a local directory.
    t0 = time.perf_counter()
    local = tmp / "local"
    upstream = ("generate", "ingest", "embed", "memory")
    for stage in upstream:
        (local / stage).mkdir(parents=True)
        pafs.copy_files(f"{base}/{stage}", str(local / stage), source_filesystem=fs,
                        destination_filesystem=pafs.LocalFileSystem())
    manifest = json.loads(fs.open_input_stream(f"{base}/manifest.json").read())
    manifest["stages"] = {k: v for k, v in manifest["stages"].items() if k in upstream}
    (local / "manifest.json").write_text(json.dumps(manifest))
    local_out = _finish(_cli(str(local), tmp / "cache-local"))
    assert "[memory] done already" in local_out and "[train] starting" in local_out
    seconds["local"] = time.perf_counter() - t0
    print("object-store smoke runs, seconds:", {k: round(v, 1) for k, v in seconds.items()})
    return SimpleNamespace(tmp=tmp, fs=fs, uri=uri, base=base, local=local,
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
