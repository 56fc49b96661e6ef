"""Peak memory of a stage: the driver plus every process it started (an embedded Ray's raylet,
workers and actors), sampled in a background thread.

PSS (proportional set size) is summed, so pages shared between processes (the Ray object store,
mapped by every worker that reads from it) count once; RSS, which counts them in every process,
is kept beside it. On a cluster driver only the driver's own node-local children are seen.
"""

from __future__ import annotations

import threading
import time

import psutil


def tree_memory() -> tuple[int, int]:
    """(PSS, RSS) bytes of this process and all its descendants."""
    me = psutil.Process()
    pss = rss = 0
    for p in [me, *me.children(recursive=True)]:
        try:
            info = p.memory_full_info()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        pss += getattr(info, "pss", info.rss)
        rss += info.rss
    return pss, rss


class PeakMemory:
    """``with PeakMemory() as pm: ...`` then ``pm.peak_pss_gb`` / ``pm.peak_rss_gb``.

    A sample reads every process's ``smaps_rollup``, which makes the kernel walk the page tables
    of each mapping (an embedded Ray maps its object store into every worker): about 0.1 s for the
    ~25 processes of a training stage on 2 cores. Samples are therefore spaced at least
    ``interval`` apart and at least ``1 / duty`` times the last sample's duration, so the watch
    never takes more than ``duty`` of a core from the work it measures."""

    def __init__(self, interval: float = 1.0, duty: float = 0.02) -> None:
        self.interval, self.duty = interval, duty
        self.peak_pss = self.peak_rss = 0
        self.samples = 0  # samples taken so far
        self._wait = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="peak-memory", daemon=True)

    def _sample(self) -> None:
        t0 = time.perf_counter()
        pss, rss = tree_memory()
        self.peak_pss, self.peak_rss = max(self.peak_pss, pss), max(self.peak_rss, rss)
        self.samples += 1
        self._wait = max(self.interval, (time.perf_counter() - t0) / self.duty)

    def _run(self) -> None:
        while not self._stop.wait(self._wait):
            self._sample()

    def __enter__(self) -> PeakMemory:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    @property
    def peak_pss_gb(self) -> float:
        return self.peak_pss / 1e9

    @property
    def peak_rss_gb(self) -> float:
        return self.peak_rss / 1e9
