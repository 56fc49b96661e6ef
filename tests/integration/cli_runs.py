"""The tiny smoke settings of the integration tests, and ``python -m pipeline.run`` as a child
process for the tests that SIGKILL a run's driver (test_pipeline on a local directory,
test_object_store on S3). Both compare the resumed run with one undisturbed run of the same
settings, made once per session: the ``reference_run`` fixture of conftest.py."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

TINY = [
    "synthetic.entities=800", "synthetic.relations=20", "synthetic.facts=600",
    "synthetic.train_questions=500", "synthetic.dev_questions=150", "synthetic.test_questions=100",
    "embed.epochs=10", "embed.num_cpus=1", "memory.branching=[8]", "memory.iters=8",
    "reader.top_clusters=2", "train.max_epochs=4", "train.batch_size=64",
]

#: the driver-kill tests' settings: TransE in the driver (Ray Train's local mode: no worker
#: group to start, about 20 s less a run on 2 cores), one Ray Train worker for the reader (local
#: mode persists no checkpoint to resume from), five epochs: a kill after the first checkpoint
#: leaves epochs to resume
KILL_SETTINGS = TINY + ["embed.num_workers=0", "train.num_workers=1", "train.max_epochs=5",
                        "train.patience=5", "ray.num_cpus=3"]

#: the stages before training
UPSTREAM = ("generate", "ingest", "embed", "memory")


def run_cli(run_dir: str | Path, settings: list[str] = KILL_SETTINGS,
            env: dict[str, str] | None = None) -> subprocess.Popen:
    """``python -m pipeline.run --run-dir RUN_DIR --set ...`` in a session (process group) of its
    own, with an embedded Ray (``RAY_ADDRESS`` removed); stdout and stderr in one pipe."""
    full_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    full_env.update(env or {})
    cmd = [sys.executable, "-m", "pipeline.run", "--run-dir", str(run_dir)]
    for s in settings:
        cmd += ["--set", s]
    return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def finish(p: subprocess.Popen, timeout: float = 600) -> str:
    """The run's output, once it has exited with status 0."""
    out, _ = p.communicate(timeout=timeout)
    assert p.returncode == 0, out[-3000:]
    return out


def copy_upstream(src: Path, dst: Path) -> None:
    """``dst`` starts from a copy of ``src``'s finished stages before training, their manifest
    entries (hence fingerprints) kept, so a run into ``dst`` skips them: what is tested is a
    kill during training, and only training and evaluation run again."""
    dst.mkdir(parents=True)
    for stage in UPSTREAM:
        shutil.copytree(src / stage, dst / stage)
    manifest = json.loads((src / "manifest.json").read_text())
    manifest["stages"] = {k: v for k, v in manifest["stages"].items() if k in UPSTREAM}
    (dst / "manifest.json").write_text(json.dumps(manifest))
