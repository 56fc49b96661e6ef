"""A two-node Ray cluster on this machine, token auth on, for tests that submit the pipeline
through the Jobs API exactly as on a cloud cluster (test_job_submit, test_worker_node_kill; the
``cluster`` fixture in conftest.py starts one per session).

* The head is started with ``--num-cpus=0`` (the usual production layout: the head only hosts GCS,
  the dashboard, the job driver and the Ray Train controller), the worker node with 4 logical
  CPUs. Every task and actor that needs a CPU (Ray Data, the TransE task, the k-means shard
  actors, the Ray Train workers, the evaluation actor pool) can therefore only run on the worker
  node, while the job driver runs on the head.
* Token auth: a fresh token in a temp file, ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH``
  for the head, the worker and the ``ray job`` CLI.
* Nothing here touches a Ray that someone else started on this machine: the test process itself
  never imports Ray, every port is chosen free and passed explicitly, the temp dir (hence the
  ``ray_current_cluster`` address file and every socket) is private, and teardown kills only the
  processes of the sessions started here (``ray start --block`` runs each node in a session of its
  own).
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

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))

# The smoke preset made tiny: the whole job takes about a minute on 2 cores.
TINY = [
    "synthetic.entities=800", "synthetic.relations=20", "synthetic.facts=600",
    "synthetic.train_questions=500", "synthetic.dev_questions=150", "synthetic.test_questions=100",
    "embed.epochs=5", "embed.num_cpus=1", "memory.branching=[8]", "memory.iters=5",
    "reader.top_clusters=2", "train.max_epochs=2", "train.batch_size=64", "train.num_workers=2",
]
#: the settings of the ``reference_job`` fixture's job (conftest.py): the smoke preset made tiny,
#: four epochs (test_worker_node_kill kills worker nodes after epoch 0's and a later epoch's
#: checkpoints, both before the last epoch ends), two retries, the dev split only
EPOCHS = 4
JOB = [s for s in TINY if not s.startswith("train.max_epochs=")] + [
    f"train.max_epochs={EPOCHS}", f"train.patience={EPOCHS}", "train.max_failures=2",
    "eval.splits=[dev]"]
JOB_TIMEOUT_S = 240


def free_ports(n: int) -> list[int]:
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


def session_pids(sid: int) -> list[int]:
    """The live processes of session ``sid`` (zombies included until reaped)."""
    pids = []
    for pid in psutil.pids():
        try:
            if os.getsid(pid) == sid and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                pids.append(pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    return pids


def _cpus(node: dict) -> float:
    """A node's CPUs (GcsNodeInfo.resources_total, camel-cased by the dashboard)."""
    return float(node["raylet"].get("resourcesTotal", {}).get("CPU", 0))


def _kill_session(node: subprocess.Popen, timeout: float = 10.0) -> list[int]:
    """SIGKILL every process of the session ``node`` (a ``ray start --block`` started in a
    session of its own) leads, until none is left or ``timeout`` has passed, and reap ``node``;
    the pids still alive then (none, normally)."""
    deadline = time.monotonic() + timeout
    while (pids := session_pids(node.pid)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    try:
        node.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    return pids


class LocalCluster:
    """A head and worker nodes started with ``ray start --block``, each in its own process group."""

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
        self.gcs_port, self.dashboard_port, self.client_port, self.head_agent_port = free_ports(4)
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
        self.procs: list[subprocess.Popen] = []   # the nodes that should be alive
        self.killed: list[subprocess.Popen] = []  # the nodes killed on purpose (kill_worker)
        self.workers = 0

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        out = open(self.logs / f"{name}.log", "w")
        proc = subprocess.Popen(
            [RAY, "start", "--block", "--node-ip-address=127.0.0.1", f"--temp-dir={self.temp_dir}",
             "--disable-usage-stats", *args],
            env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        out.close()
        self.procs.append(proc)
        return proc

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
        self.start_worker()

    def start_worker(self) -> None:
        """Start a worker node with 4 logical CPUs (again after `kill_worker`: a replacement, as
        an autoscaler or KubeRay would start) and wait until the cluster counts it alive (a new
        node id with CPUs: a killed node stays "alive" until the GCS misses its health checks,
        and the head, without CPUs, may be listed only after its dashboard is up)."""
        before = {n["raylet"]["nodeId"] for n in self.alive_nodes()}
        self.workers += 1
        name = "worker" if self.workers == 1 else f"worker-{self.workers}"
        self._start(name, [
            f"--address=127.0.0.1:{self.gcs_port}", "--num-cpus=4",
            f"--dashboard-agent-listen-port={free_ports(1)[0]}",
            "--object-store-memory=300000000"])
        self._wait(f"{name} to join", lambda: any(
            n["raylet"]["nodeId"] not in before and _cpus(n) > 0 for n in self.alive_nodes()), 90)

    def kill_worker(self) -> None:
        """SIGKILL every process of the (last started) worker node at once: a node lost, nothing
        shut down cleanly. That is its whole session, not only its process group: the raylet
        starts each worker process (the Ray Train workers among them) in a group of its own."""
        worker = self.procs[-1]
        self.procs.remove(worker)
        self.killed.append(worker)
        pids = _kill_session(worker)
        if pids:
            raise RuntimeError(f"processes {pids} of the killed worker node are still alive")

    def ray_cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([RAY, *args], env=self.env, cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)

    def submit(self, run_dir: Path, overrides: list[str], env_vars: dict[str, str] | None = None) -> str:
        """Submit ``python -m pipeline.run`` on the smoke preset with ``overrides`` into
        ``run_dir``, with cluster_configs/runtime_env.yaml (plus ``env_vars``); the job's id."""
        runtime_env = ROOT / "cluster_configs/runtime_env.yaml"
        if env_vars:
            spec = yaml.safe_load(runtime_env.read_text())
            spec["env_vars"] = {**spec.get("env_vars", {}), **env_vars}
            runtime_env = self.logs.parent / f"runtime_env-{secrets.token_hex(4)}.yaml"
            runtime_env.write_text(yaml.safe_dump(spec))
        sub = self.ray_cli(
            "job", "submit", "--address", self.dashboard, "--no-wait",
            "--submission-id", f"hmn-test-{secrets.token_hex(4)}",
            "--working-dir", str(ROOT), "--runtime-env", str(runtime_env),
            "--", "python", "-m", "pipeline.run", "--config", "configs/smoke.yaml",
            "--run-dir", str(run_dir), *[a for s in overrides for a in ("--set", s)])
        if sub.returncode != 0:
            raise RuntimeError(f"ray job submit failed:\n{sub.stdout}{sub.stderr}")
        return next(line.split("'")[1] for line in (sub.stdout + sub.stderr).splitlines()
                    if "submitted successfully" in line)

    def job_status(self, job_id: str) -> str | None:
        code, body = self.http(f"/api/jobs/{job_id}")
        return json.loads(body)["status"] if code == 200 else None

    def wait_job(self, job_id: str, timeout: float = JOB_TIMEOUT_S) -> str | None:
        """The job's final status (SUCCEEDED, FAILED, STOPPED), or its status at the timeout."""
        deadline = time.monotonic() + timeout
        status = None
        while time.monotonic() < deadline:
            status = self.job_status(job_id)
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            time.sleep(2.0)
        return status

    def job_logs(self, job_id: str) -> str:
        return self.ray_cli("job", "logs", "--address", self.dashboard, job_id).stdout

    def node_logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.read_text()[-3000:]}" for p in sorted(self.logs.glob("*.log")))

    def stop(self) -> None:
        """SIGKILL every process of every node started here (its whole session, as `kill_worker`
        does) and reap them: nothing here needs a clean shutdown, and on SIGTERM ``ray start
        --block`` (Ray 2.60) left the head's GCS and the raylet running for over 20 s (measured:
        every teardown waited out its grace period). Only the sessions started here are
        signalled."""
        for node in self.procs + self.killed:
            _kill_session(node)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
