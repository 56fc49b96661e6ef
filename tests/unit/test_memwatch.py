"""pipeline.memwatch: the peak memory of the process tree a stage reports."""

import subprocess
import sys
import time

from pipeline.memwatch import PeakMemory, tree_memory


def test_peak_includes_a_child_process():
    base_pss, _ = tree_memory()
    # the child holds 300 MB until told to exit; it exits only after the watch has sampled it, so
    # the test does not depend on how long a sample takes on a loaded machine
    code = ("import numpy as np, sys; a = np.ones(300_000_000 // 8); "
            "print('ready', flush=True); sys.stdin.read()")
    with PeakMemory(interval=0.05, duty=0.5) as pm:
        child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        seen = pm.samples
        deadline = time.monotonic() + 120
        while pm.samples < seen + 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        child.stdin.close()
        child.wait(timeout=60)
    assert child.returncode == 0
    assert pm.samples >= seen + 2, "the watch took no sample while the child was alive"
    # the child's 300 MB array counted (PSS of the tree), and the peak is at least the baseline
    assert pm.peak_pss - base_pss > 200_000_000
    assert pm.peak_rss >= pm.peak_pss * 0.5


def test_peak_is_sampled_at_enter_and_exit():
    with PeakMemory(interval=60) as pm:
        time.sleep(0.01)
    assert pm.peak_pss_gb > 0 and pm.peak_rss_gb > 0


def test_samples_are_spaced_so_the_watch_takes_at_most_its_duty_of_a_core(monkeypatch):
    import pipeline.memwatch as mw

    def slow_tree():  # a sample that costs 50 ms of work
        time.sleep(0.05)
        return 1, 1

    monkeypatch.setattr(mw, "tree_memory", slow_tree)
    samples = []
    real = PeakMemory._sample

    def counting(self):
        samples.append(time.perf_counter())
        real(self)

    monkeypatch.setattr(PeakMemory, "_sample", counting)
    with PeakMemory(interval=0.01, duty=0.1) as pm:
        time.sleep(1.2)
    assert pm._wait >= 0.5  # 50 ms / 10%
    gaps = [b - a for a, b in zip(samples[1:-2], samples[2:-1])]
    assert len(samples) <= 5 and all(g >= 0.5 for g in gaps)
