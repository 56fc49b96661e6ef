"""The cluster path for real: a two-node Ray cluster on this machine, token auth on, and the
pipeline submitted through the Jobs API exactly as on a cloud cluster.

* The head is started with ``--num-cpus=0`` (the usual production layout: the head only hosts GCS,
  the dashboard and the job driver), the worker node with 4 logical CPUs. Every task and actor that
  needs a CPU (Ray Data, the TransE task, the k-means shard actors, the Ray Train workers, the
  evaluation actor pool) can therefore only have run on the worker node, while the job driver ran
  on the head: a finished run proves the run directory was shared between the two nodes.
* Token auth: a fresh token in a temp file, ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH``
  for the head, the worker and the ``ray job`` CLI; an unauthenticated request must be refused.
* Nothing here touches a Ray that someone else started on this machine: the test process itself
  never imports Ray, every port is chosen free and passed explicitly, the temp dir (hence the
  ``ray_current_cluster`` address file and every socket) is private, and teardown kills only the
  two process groups started here (``ray start --block`` runs each node in its own group).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))

# The smoke preset made tiny: the whole job takes about a minute on 2 cores.
TINY = [
    "synthetic.entities=800", "synthetic.relations=20", "synthetic.facts=600",
    "synthetic.train_questions=500", "synthetic.dev_questions=150", "synthetic.test_questions=100",
    "embed.epochs=5", "embed.num_cpus=1", "memory.branching=[8]", "memory.iters=5",
    "reader.top_clusters=2", "train.max_epochs=2", "train.batch_size=64", "train.num_workers=2",
]
JOB_TIMEOUT_S = 240

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(RAY).exists(), reason="the ray CLI is not next to this Python"),
]


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class LocalCluster:
    """A head and one worker node started with ``ray start --block``, each in its own process group."""

    def __init__(self, base: Path):
        # Unix socket paths live under the temp dir and must stay under ~107 characters, so the
        # temp dir is short and not under pytest's (long) tmp_path.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rayjs-", dir="/tmp"))
        self.logs = base / "node-logs"
        self.logs.mkdir()
        token_file = base / "auth_token"
        self.token = secrets.token_hex(32)  # what `ray get-auth-token --generate` writes
        token_file.write_text(self.token)
        token_file.chmod(0o600)
        (self.gcs_port, self.dashboard_port, self.client_port,
         self.head_agent_port, self.worker_agent_port) = _free_ports(5)
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH"))}
        env.update({
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token_file),
            # `python` in the job's entrypoint must be this environment's interpreter.
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONUNBUFFERED": "1",
        })
        self.env = env
        self.procs: list[subprocess.Popen] = []

    def _start(self, name: str, args: list[str]) -> None:
        out = open(self.logs / f"{name}.log", "w")
        self.procs.append(subprocess.Popen(
            [RAY, "start", "--block", "--node-ip-address=127.0.0.1", f"--temp-dir={self.temp_dir}",
             "--disable-usage-stats", *args],
            env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        out.close()

    def http(self, path: str, token: str | None = "own", timeout: float = 10.0) -> tuple[int, bytes]:
        req = urllib.request.Request(self.dashboard + path)
        if token is not None:
            req.add_header("Authorization", f"Bearer {self.token if token == 'own' else token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()

    def _wait(self, what: str, ok, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"a Ray node exited ({p.returncode}) while waiting for {what}:\n"
                                       + self.node_logs())
            try:
                if ok():
                    return
            except (OSError, ValueError):
                pass
            time.sleep(1.0)
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}:\n" + self.node_logs())

    def alive_nodes(self) -> list[dict]:
        status, body = self.http("/nodes?view=summary")
        if status != 200:
            return []
        return [n for n in json.loads(body)["data"]["summary"] if n["raylet"]["state"] == "ALIVE"]

    def start(self) -> None:
        self._start("head", [
            "--head", f"--port={self.gcs_port}", "--num-cpus=0",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
            f"--ray-client-server-port={self.client_port}",
            f"--dashboard-agent-listen-port={self.head_agent_port}",
            "--object-store-memory=200000000"])
        self._wait("the head's dashboard", lambda: self.http("/api/version")[0] == 200, 90)
        self._start("worker", [
            f"--address=127.0.0.1:{self.gcs_port}", "--num-cpus=4",
            f"--dashboard-agent-listen-port={self.worker_agent_port}",
            "--object-store-memory=300000000"])
        self._wait("the worker node to join", lambda: len(self.alive_nodes()) == 2, 90)

    def ray_cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([RAY, *args], env=self.env, cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)

    def node_logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.read_text()[-3000:]}" for p in sorted(self.logs.glob("*.log")))

    def stop(self) -> None:
        """SIGTERM each node's process group (``ray start --block`` then stops its node), SIGKILL
        whatever is left after a grace period. Only the groups started here are signalled."""
        for sig, grace in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)):
            for p in self.procs:
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and any(_group_alive(p.pid) for p in self.procs):
                time.sleep(0.5)
            if not any(_group_alive(p.pid) for p in self.procs):
                break
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("ray-cluster"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


def test_requests_without_the_token_are_refused(cluster):
    assert cluster.http("/api/version")[0] == 200
    assert cluster.http("/api/version", token=None)[0] == 401
    assert cluster.http("/api/version", token="0" * 64)[0] in (401, 403)
    nodes = cluster.alive_nodes()
    assert len(nodes) == 2
    # GcsNodeInfo.resources_total, camel-cased by the dashboard
    cpus = sorted(float(n["raylet"].get("resourcesTotal", {}).get("CPU", 0)) for n in nodes)
    assert cpus == [0.0, 4.0], [n["raylet"] for n in nodes]


def test_pipeline_job_succeeds_on_two_nodes(cluster, tmp_path):
    run_dir = tmp_path / "shared" / "runs" / "tiny"  # the "shared storage": same path on both nodes
    sub = cluster.ray_cli(
        "job", "submit", "--address", cluster.dashboard, "--no-wait",
        "--submission-id", f"hmn-test-{secrets.token_hex(4)}",
        "--working-dir", str(ROOT), "--runtime-env", str(ROOT / "cluster_configs/runtime_env.yaml"),
        "--", "python", "-m", "pipeline.run", "--config", "configs/smoke.yaml", "--run-dir", str(run_dir),
        *[a for s in TINY for a in ("--set", s)])
    assert sub.returncode == 0, sub.stdout + sub.stderr
    job_id = next(line.split("'")[1] for line in (sub.stdout + sub.stderr).splitlines()
                  if "submitted successfully" in line)

    deadline = time.monotonic() + JOB_TIMEOUT_S
    status = None
    while time.monotonic() < deadline:
        code, body = cluster.http(f"/api/jobs/{job_id}")
        status = json.loads(body)["status"] if code == 200 else None
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(2.0)
    logs = cluster.ray_cli("job", "logs", "--address", cluster.dashboard, job_id).stdout
    assert status == "SUCCEEDED", f"job {job_id}: {status}\n{logs[-6000:]}\n{cluster.node_logs()}"

    report = json.loads((run_dir / "report.json").read_text())
    dev = report["report"]["splits"]["dev"]["readers"]
    assert 0.0 <= dev["exact"]["accuracy"] <= 1.0
    assert dev["exact"]["facts_per_query"] == 600
    assert report["skipped"] == []
    md = (run_dir / "evaluate" / "report.md").read_text()
    assert "| dev (150 q) | exact |" in md
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert all(manifest["stages"][s]["status"] == "done" for s in
               ("generate", "ingest", "embed", "memory", "train", "evaluate")), manifest
    assert "joining the Ray cluster" in logs  # the driver attached to this cluster, no embedded Ray
    train = json.loads((run_dir / "train" / "stats.json").read_text())
    assert train["num_workers"] == 2
