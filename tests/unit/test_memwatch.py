"""pipeline.memwatch: the peak memory of the process tree a stage reports."""

import subprocess
import sys
import time

from pipeline.memwatch import PeakMemory, tree_memory


def test_peak_includes_a_child_process():
    base_pss, _ = tree_memory()
    code = "import numpy as np, time; a = np.ones(300_000_000 // 8); time.sleep(1.5)"
    with PeakMemory(interval=0.1) as pm:
        child = subprocess.Popen([sys.executable, "-c", code])
        child.wait(timeout=60)
    assert child.returncode == 0
    # the child's 300 MB array counted (PSS of the tree), and the peak is at least the baseline
    assert pm.peak_pss - base_pss > 200_000_000
    assert pm.peak_rss >= pm.peak_pss * 0.5


def test_peak_is_sampled_at_enter_and_exit():
    with PeakMemory(interval=60) as pm:
        time.sleep(0.01)
    assert pm.peak_pss_gb > 0 and pm.peak_rss_gb > 0
