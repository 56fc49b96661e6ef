"""The cluster path's configuration files, checked without a cloud.

* ``aws-gpu.yaml`` / ``gcp-gpu.yaml``: Ray's own launcher schema (``ray/autoscaler/ray-schema.json``
  from the installed wheel) on the file as written, then ``prepare_config`` + ``validate_config``
  (what ``ray up`` runs before it talks to the cloud: merges the provider's defaults.yaml and checks
  node types, head type, min/max workers); plus the properties we rely on: a CPU head that takes no
  tasks, a GPU worker type, pinned installs that match this checkout, token auth on every node, a
  dashboard bound to localhost, the auth token shipped by file_mounts.
* ``kuberay-rayjob.yaml``: a small JSON schema of the RayJob fields we rely on (KubeRay's CRD is
  not in any wheel), GPU limits, the shared volume on every pod, and an entrypoint that this
  checkout's ``pipeline.run`` accepts.
* ``runtime_env.yaml``: Ray's ``RuntimeEnv`` accepts it, and it points at this repository.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "cluster_configs"
LAUNCHER = ["aws-gpu.yaml", "gcp-gpu.yaml"]


def _load(name: str):
    return yaml.safe_load((CONFIGS / name).read_text())


def _ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def _pins() -> dict[str, str]:
    """Exact pins of torch and ray this checkout installs (scripts/setup.sh, pyproject.toml)."""
    setup = (ROOT / "scripts/setup.sh").read_text()
    pyproject = (ROOT / "pyproject.toml").read_text()  # (tomllib is 3.11+, the project allows 3.10)
    return {"torch": re.search(r'"torch==([^"]+)"', setup).group(1),
            "ray": re.search(r'"ray\[[^\]]*\]==([^"]+)"', pyproject).group(1)}


# ---------------------------------------------------------------- cluster launcher

@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_config_matches_rays_schema(name):
    cfg = _load(name)
    # The file as written (additionalProperties: false at the top level and per node type).
    jsonschema.validate(cfg, _ray_schema())
    # What `ray up` does before contacting the provider: merge defaults.yaml, validate again, plus
    # head_node_type / min_workers cross-checks.
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cfg))
    validate_config(prepared)
    assert prepared["head_node_type"] == cfg["head_node_type"]


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_has_a_cpu_head_and_gpu_workers(name):
    cfg = _load(name)
    types = cfg["available_node_types"]
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    gpu_types = {k: t for k, t in types.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, f"{name}: no node type with a GPU"
    for key, t in gpu_types.items():
        nc = t["node_config"]
        assert t.get("max_workers", 0) >= 1
        if cfg["provider"]["type"] == "aws":
            assert re.match(r"(g4dn|g5|g6|g6e|p3|p4d|p5)\.", nc["InstanceType"]), (key, nc)
        else:
            accel = nc.get("guestAccelerators") or []
            assert accel and accel[0]["acceleratorCount"] >= 1 or nc["machineType"].startswith(("g2-", "a2-", "a3-"))
            assert {"onHostMaintenance": "TERMINATE"} in nc["scheduling"], "GPU VMs cannot live-migrate"
    assert cfg["max_workers"] >= sum(t.get("min_workers", 0) for t in types.values())


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_installs_this_project_with_pinned_versions(name):
    cfg = _load(name)
    pins = _pins()
    setup = "\n".join(cfg["setup_commands"])
    assert f'"torch=={pins["torch"]}"' in setup
    assert f'"ray[default,train,data]=={pins["ray"]}"' in setup
    import ray

    assert ray.__version__ == pins["ray"]
    # the project from the file_mounts copy of this checkout, with the faiss of the node type:
    # the gpu extra on the GPU workers, the cpu extra on the CPU head, never both on one node
    mount = next(remote for remote, local in cfg["file_mounts"].items() if local == ".")
    head = "\n".join(cfg["head_setup_commands"])
    workers = "\n".join(cfg["worker_setup_commands"])
    assert re.search(re.escape(mount) + r'"?\[gpu\]', workers), workers
    assert re.search(re.escape(mount) + r'"?\[cpu\]', head), head
    assert "[cpu]" not in workers and "[gpu]" not in head
    assert "[cpu]" not in setup and "[gpu]" not in setup  # the commands every node runs
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^gpu\s*=\s*\["faiss-gpu', pyproject, re.M), "no gpu extra"
    assert re.search(r'^cpu\s*=\s*\["faiss-cpu', pyproject, re.M), "no cpu extra"
    assert ".venv" in cfg["rsync_exclude"]


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_keeps_the_dashboard_private_and_token_auth_on(name):
    cfg = _load(name)
    head = " ".join(cfg["head_start_ray_commands"])
    workers = " ".join(cfg["worker_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    for cmds in (head, workers):
        assert "RAY_AUTH_MODE=token ray start" in cmds
    # the token itself travels by file_mounts from `ray get-auth-token --generate`, never inline
    assert cfg["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    text = (CONFIGS / name).read_text()
    assert not re.search(r"RAY_AUTH_TOKEN=\S", text)
    assert "--ray-client-server-port" not in head or "0.0.0.0" not in head
    if cfg["provider"]["type"] == "aws":
        for rule in cfg["provider"]["security_group"]["IpPermissions"]:
            for r in rule.get("IpRanges", []):
                assert r["CidrIp"] != "0.0.0.0/0"
            assert not (rule["FromPort"] <= 8265 <= rule["ToPort"])


@pytest.mark.parametrize("name", LAUNCHER)
def test_launcher_mounts_shared_storage_for_run_dirs(name):
    setup = "\n".join(_load(name)["setup_commands"])
    assert "mount -t nfs" in setup and "/mnt/shared" in setup


# ---------------------------------------------------------------- KubeRay RayJob

_RESOURCES = {"type": "object", "required": ["requests", "limits"],
              "properties": {"requests": {"type": "object", "required": ["cpu", "memory"]},
                             "limits": {"type": "object", "required": ["cpu", "memory"]}}}
_POD = {"type": "object", "required": ["spec"], "properties": {"spec": {
    "type": "object", "required": ["containers", "volumes"],
    "properties": {"containers": {"type": "array", "minItems": 1, "items": {
        "type": "object", "required": ["name", "image", "resources", "volumeMounts"],
        "properties": {"resources": _RESOURCES}}}}}}}
RAYJOB_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "ray.io/v1"},
        "kind": {"const": "RayJob"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["entrypoint", "runtimeEnvYAML", "rayClusterSpec", "shutdownAfterJobFinishes",
                         "ttlSecondsAfterFinished"],
            "properties": {
                "entrypoint": {"type": "string", "minLength": 1},
                "runtimeEnvYAML": {"type": "string"},
                "shutdownAfterJobFinishes": {"const": True},
                "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "SidecarMode", "InteractiveMode"]},
                "rayClusterSpec": {
                    "type": "object",
                    "required": ["rayVersion", "authOptions", "headGroupSpec", "workerGroupSpecs"],
                    "properties": {
                        "rayVersion": {"type": "string"},
                        "authOptions": {"type": "object", "required": ["mode"],
                                        "properties": {"mode": {"const": "token"}}},
                        "headGroupSpec": {"type": "object", "required": ["rayStartParams", "template"],
                                          "properties": {"template": _POD,
                                                         "serviceType": {"enum": ["ClusterIP"]}}},
                        "workerGroupSpecs": {"type": "array", "minItems": 1, "items": {
                            "type": "object",
                            "required": ["groupName", "replicas", "minReplicas", "maxReplicas",
                                         "rayStartParams", "template"],
                            "properties": {"template": _POD}}},
                    },
                },
            },
        },
    },
}


def _rayjob_docs() -> tuple[dict, list[dict]]:
    docs = [d for d in yaml.safe_load_all((CONFIGS / "kuberay-rayjob.yaml").read_text()) if d]
    jobs = [d for d in docs if d.get("kind") == "RayJob"]
    assert len(jobs) == 1
    return jobs[0], docs


def _pods(job: dict) -> list[dict]:
    rcs = job["spec"]["rayClusterSpec"]
    return [rcs["headGroupSpec"]["template"]] + [g["template"] for g in rcs["workerGroupSpecs"]]


def test_rayjob_has_the_fields_we_rely_on():
    job, _ = _rayjob_docs()
    jsonschema.validate(job, RAYJOB_SCHEMA)
    rcs = job["spec"]["rayClusterSpec"]
    assert tuple(int(x) for x in rcs["rayVersion"].split(".")) >= (2, 52, 0)  # token auth exists
    assert rcs["rayVersion"] == _pins()["ray"]
    assert rcs["headGroupSpec"]["rayStartParams"].get("num-cpus") == "0"
    assert "dashboard-host" not in rcs["headGroupSpec"]["rayStartParams"] or \
        rcs["headGroupSpec"]["serviceType"] == "ClusterIP"


def test_rayjob_gpu_workers_request_gpus():
    job, _ = _rayjob_docs()
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        for c in group["template"]["spec"]["containers"]:
            assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1
            assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"]


def test_rayjob_mounts_one_shared_volume_at_the_run_dir_on_every_pod():
    job, docs = _rayjob_docs()
    claims, paths = set(), set()
    for pod in _pods(job):
        vols = {v["name"]: v for v in pod["spec"]["volumes"]}
        for c in pod["spec"]["containers"]:
            for m in c["volumeMounts"]:
                claims.add(vols[m["name"]]["persistentVolumeClaim"]["claimName"])
                paths.add(m["mountPath"])
    assert len(claims) == 1 and len(paths) == 1, (claims, paths)
    (claim,), (path,) = claims, paths
    args = shlex.split(job["spec"]["entrypoint"])
    assert args[args.index("--run-dir") + 1].startswith(path.rstrip("/") + "/")
    pvc = next(d for d in docs if d.get("kind") == "PersistentVolumeClaim" and d["metadata"]["name"] == claim)
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


def test_rayjob_entrypoint_is_a_valid_pipeline_command():
    from hmn.config import load_config

    job, _ = _rayjob_docs()
    args = shlex.split(job["spec"]["entrypoint"])
    assert args[:3] == ["python", "-m", "pipeline.run"]
    assert importlib.util.find_spec("pipeline.run") is not None
    assert (ROOT / "pipeline" / "run.py").is_file()
    config = args[args.index("--config") + 1]
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    assert (ROOT / config).is_file()
    cfg = load_config(ROOT / config, overrides)  # unknown keys / bad values raise here
    # every heavy stage on the GPU workers
    assert cfg.embed.use_gpu and cfg.memory.use_gpu and cfg.train.use_gpu and cfg.eval.use_gpu


def test_rayjob_runtime_env_agrees_with_runtime_env_yaml():
    job, _ = _rayjob_docs()
    inline = yaml.safe_load(job["spec"]["runtimeEnvYAML"])
    shared = _load("runtime_env.yaml")
    assert inline["env_vars"] == shared["env_vars"]
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**inline)


# ---------------------------------------------------------------- runtime_env.yaml

def test_runtime_env_yaml_is_a_valid_runtime_env_for_this_repo():
    env = _load("runtime_env.yaml")
    assert set(env) <= {"working_dir", "excludes", "env_vars", "pip", "uv", "py_modules", "config"}
    from ray.runtime_env import RuntimeEnv

    RuntimeEnv(**env)  # Ray's own field validation
    # `working_dir: .` is the repository root when submitted from it, as the runbooks say
    root = (ROOT / env["working_dir"]).resolve()
    assert root == ROOT
    assert (root / "pipeline" / "run.py").is_file() and (root / "hmn").is_dir()
    assert all(isinstance(v, str) for v in env["env_vars"].values())
    assert int(env["env_vars"]["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"]) > 60
    for heavy in (".venv/", ".git/", "runs/"):
        assert heavy in env["excludes"]
    assert "pip" not in env, "dependencies come from the node image / setup_commands"
