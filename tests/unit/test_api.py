"""The Python API (`from pipeline import run, evaluate, answer`) and the packaging metadata."""

import importlib
import inspect
import subprocess
import sys
import tomllib
from pathlib import Path

import pipeline

ROOT = Path(__file__).resolve().parents[2]


def test_import_pipeline_and_its_api_does_not_import_ray():
    code = (
        "import sys\n"
        "import pipeline\n"
        "from pipeline import run, evaluate, answer\n"
        "cheap = 'torch' not in sys.modules\n"
        "import pipeline.answer  # answering needs no Ray either\n"
        "bad = [m for m in sys.modules if m == 'ray' or m.startswith('ray.')]\n"
        "print(cheap, bad)\n"
        "sys.exit(0 if cheap and not bad else 1)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr


def test_api_functions_have_the_documented_signatures():
    assert pipeline.__all__ == ["run", "evaluate", "answer"]
    params = {f: list(inspect.signature(getattr(pipeline, f)).parameters) for f in pipeline.__all__}
    assert params["run"][:2] == ["config", "run_dir"] and "overrides" in params["run"]
    assert "experiment" in params["run"]
    assert params["evaluate"][:2] == ["run_dir", "questions"] and "readers" in params["evaluate"]
    assert params["answer"] == ["run_dir", "questions", "k", "reader"]
    assert inspect.signature(pipeline.answer).parameters["k"].default == 5


def test_importing_the_command_modules_keeps_the_api_functions():
    # importing a submodule sets it on its package, so pipeline.run would become the module
    for name in ("run", "evaluate", "answer"):
        assert callable(importlib.import_module(f"pipeline.{name}").main)
    from pipeline import answer, evaluate, run

    assert all(inspect.isfunction(f) for f in (run, evaluate, answer))
    assert all(inspect.isfunction(getattr(pipeline, n)) for n in ("run", "evaluate", "answer"))


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_console_scripts_point_at_the_commands():
    scripts = _pyproject()["project"]["scripts"]
    assert set(scripts) == {"hmn-run", "hmn-evaluate", "hmn-answer"}
    targets = {}
    for name, target in scripts.items():
        module, attr = target.split(":")
        targets[name] = getattr(importlib.import_module(module), attr)
        assert callable(targets[name]), name
    assert targets["hmn-evaluate"] is sys.modules["pipeline.evaluate"].main
    assert targets["hmn-answer"] is sys.modules["pipeline.answer"].main
    assert "pipeline.run" in inspect.getsource(targets["hmn-run"])


def test_requires_python_covers_the_code():
    project = _pyproject()
    assert project["project"]["requires-python"] == ">=3.11"  # hashlib.file_digest
    assert project["tool"]["ruff"]["target-version"] == "py311"
