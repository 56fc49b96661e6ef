"""benchmarks/gpu_check.py, as CI runs it: ``--device cpu --size tiny`` in a subprocess (so it
cannot rot between the GPU machines' runs), its degraded run without numpy, and its refusal of
a CUDA it does not have."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _run(args: list[str], code: str | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(SCRIPT), *args] if code is None else [sys.executable, "-c", code]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    lines = out.stdout.strip().splitlines()
    return out, json.loads(lines[-1]) if lines else {}


def test_cpu_tiny_times_every_stage_and_prints_its_json(tmp_path):
    target = tmp_path / "gpu_check_cpu.json"
    out, report = _run(["--device", "cpu", "--size", "tiny", "--out", str(target)])
    assert out.returncode == 0, out.stderr
    assert json.loads(target.read_text()) == report  # the last line is the file's object
    assert report["args"] == {"device": "cpu", "size": "tiny", "seed": 0, "threads": 0,
                              "with_cpu": False, "out": str(target)}
    assert report["torch"] == torch.__version__ and report["device_name"]
    figures = report["figures"]
    for name in ("transe_epoch_s", "kmeans_build_s", "train_step_exact_s",
                 "train_step_clustered_s", "predict_exact_s", "predict_clustered_s"):
        assert math.isfinite(figures[name]) and figures[name] > 0, name
    assert figures["kmeans_leaves"] == 16
    quality = report["quality"]
    assert 0.9 <= quality["recall10_clustered_vs_exact"] <= 1.0
    assert 0.0 <= quality["accuracy_exact"] <= 1.0
    assert "no native bfloat16" in report["bf16"]  # measured on CUDA only
    assert report["missing"] == [] and report["ray_imported"] is False


def test_without_numpy_it_says_so_and_times_the_raw_matmul_only(tmp_path):
    target = tmp_path / "no_numpy.json"
    code = ("import sys, runpy\n"
            "sys.modules['numpy'] = None; sys.modules['pyarrow'] = None  # not installed\n"
            f"sys.argv = ['gpu_check.py', '--device', 'cpu', '--out', {str(target)!r}]\n"
            f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n")
    out, report = _run([], code)
    assert out.returncode == 0, out.stderr
    assert "numpy is not installed" in out.stderr and "pip install numpy" in out.stderr
    assert report["missing"] == ["numpy", "pyarrow"] and "numpy" in report["skipped"]
    assert report["raw"]["matmul_1024_float32_s"] > 0 and "figures" not in report


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
def test_cuda_without_a_gpu_is_refused_in_the_json(tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)  # in this process: no second torch import
    assert gpu_check.main(["--device", "cuda", "--out", str(tmp_path / "x.json")]) == 2
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "sees no CUDA device" in report["error"] and not (tmp_path / "x.json").exists()
