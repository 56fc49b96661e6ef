import subprocess
import sys


def test_hmn_modules_do_not_import_ray():
    """hmn/ is plain numpy/torch/pyarrow/faiss: importing all of it must not import Ray."""
    code = (
        "import importlib, pkgutil, sys, hmn\n"
        "for m in pkgutil.iter_modules(hmn.__path__):\n"
        "    importlib.import_module('hmn.' + m.name)\n"
        "bad = [m for m in sys.modules if m == 'ray' or m.startswith('ray.')]\n"
        "print(len(list(pkgutil.iter_modules(hmn.__path__))))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) >= 8
