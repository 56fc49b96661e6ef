"""The cluster path for real: a two-node Ray cluster on this machine, token auth on, and the
pipeline submitted through the Jobs API exactly as on a cloud cluster (`ray_cluster.LocalCluster`,
the ``cluster`` fixture of conftest.py).

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
  processes of the sessions started here (``ray start --block`` runs each node in a session of its
  own).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .ray_cluster import RAY

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(RAY).exists(), reason="the ray CLI is not next to this Python"),
]


def test_requests_without_the_token_are_refused(cluster):
    assert cluster.http("/api/version")[0] == 200
    assert cluster.http("/api/version", token=None)[0] == 401
    assert cluster.http("/api/version", token="0" * 64)[0] in (401, 403)
    nodes = cluster.alive_nodes()
    assert len(nodes) == 2
    # GcsNodeInfo.resources_total, camel-cased by the dashboard
    cpus = sorted(float(n["raylet"].get("resourcesTotal", {}).get("CPU", 0)) for n in nodes)
    assert cpus == [0.0, 4.0], [n["raylet"] for n in nodes]


def test_pipeline_job_succeeds_on_two_nodes(cluster, reference_job):
    """The session's reference job (`ray_cluster.JOB`'s settings: the smoke preset made tiny,
    the dev split evaluated), submitted by the ``reference_job`` fixture of conftest.py."""
    run_dir, job_id, status, logs = (reference_job.run_dir, reference_job.job_id,
                                     reference_job.status, reference_job.logs)
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
