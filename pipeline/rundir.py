"""The run directory: the contract between stages.

Each stage owns one folder under the run directory and is done when `manifest.json` records it
with the fingerprint of its config and of its inputs. A stage writes into a staging folder
(``.<stage>.tmp-<id>``) that is renamed into place only when the stage succeeds, so a killed run
never leaves a half-written output that looks finished; the next run removes stale staging
folders and redoes the unfinished stage. A re-run skips stages whose fingerprint is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.memwatch import PeakMemory

log = logging.getLogger(__name__)


def write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


def input_signature(paths: tuple[str, ...], cache: Path | None = None) -> list:
    """Name, size and content digest of each input file: a changed input file re-runs its stage.

    The digest (not the mtime) decides, so a copy of the same data made later (a fresh checkout of
    shared data, a restored backup) reuses the finished stages. Digests are cached in ``cache``
    (a run's ``.input-digests.json``) under (path, size, mtime), so an unchanged file is read once
    (about 1 s per GB).
    """
    known = {}
    if cache is not None and cache.exists():
        try:
            known = json.loads(cache.read_text())
        except ValueError:
            known = {}
    sig, changed = [], False
    for p in paths:
        real = os.path.realpath(p)
        if not os.path.exists(real):
            sig.append([real, None, None])
            continue
        st = os.stat(real)
        entry = known.get(real)
        if not entry or entry["size"] != st.st_size or entry["mtime_ns"] != st.st_mtime_ns:
            if st.st_size > (1 << 30):
                log.info("hashing %s (%.1f GB) for the stage fingerprints", p, st.st_size / 2**30)
            entry = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "digest": _digest(real)}
            known[real], changed = entry, True
        sig.append([real, st.st_size, entry["digest"]])
    if cache is not None and changed:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(cache, known)
    return sig


@dataclass
class StageResult:
    name: str
    skipped: bool
    seconds: float
    stats: dict


class RunDir:
    """A run directory with its manifest."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.manifest_path = self.root / "manifest.json"

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def input_signature(self, paths: tuple[str, ...]) -> list:
        """`input_signature` of ``paths`` with this run's digest cache (``.input-digests.json``)."""
        return input_signature(paths, self.root / ".input-digests.json")

    def manifest(self) -> dict:
        if not self.manifest_path.exists():
            return {"stages": {}}
        return json.loads(self.manifest_path.read_text())

    def entry(self, stage: str) -> dict | None:
        return self.manifest()["stages"].get(stage)

    def is_done(self, stage: str, fingerprint: str) -> bool:
        e = self.entry(stage)
        return bool(e and e.get("status") == "done" and e.get("fingerprint") == fingerprint
                    and self.stage_dir(stage).is_dir())

    def fingerprint_of(self, stage: str) -> str:
        e = self.entry(stage)
        if not e or e.get("status") != "done":
            raise RuntimeError(f"stage {stage!r} has not finished in {self.root}")
        return e["fingerprint"]

    def _record(self, stage: str, entry: dict) -> None:
        m = self.manifest()
        m["stages"][stage] = entry
        write_json_atomic(self.manifest_path, m)

    def clean_staging(self, stage: str) -> None:
        for p in self.root.glob(f".{stage}.tmp-*"):
            log.info("removing staging folder %s left by an interrupted run", p.name)
            shutil.rmtree(p, ignore_errors=True)

    def run_stage(
        self, stage: str, fingerprint: str, fn: Callable[[Path], dict], *, force: bool = False
    ) -> StageResult:
        """Run `fn(staging_dir) -> stats` unless done with this fingerprint; publish atomically."""
        if not force and self.is_done(stage, fingerprint):
            e = self.entry(stage) or {}
            log.info("[%s] done already (fingerprint %s), skipping", stage, fingerprint)
            return StageResult(stage, True, float(e.get("seconds", 0.0)), e.get("stats", {}))
        self.clean_staging(stage)
        staging = self.root / f".{stage}.tmp-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        self._record(stage, {"status": "running", "fingerprint": fingerprint, "started": time.time()})
        log.info("[%s] starting", stage)
        t0 = time.perf_counter()
        try:
            with PeakMemory() as mem:
                stats = fn(staging) or {}
        except BaseException:
            self._record(stage, {"status": "failed", "fingerprint": fingerprint})
            raise
        seconds = time.perf_counter() - t0
        stats = dict(stats)
        write_json_atomic(staging / "stats.json", stats)
        final = self.stage_dir(stage)
        if final.is_symlink():  # a stage linked from another run (experiments) is replaced, not followed
            final.unlink()
        if final.exists():
            old = self.root / f".{stage}.tmp-old-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
            os.replace(staging, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, final)
        self._record(stage, {"status": "done", "fingerprint": fingerprint, "seconds": seconds,
                             "peak_pss_gb": round(mem.peak_pss_gb, 3),
                             "peak_rss_gb": round(mem.peak_rss_gb, 3),
                             "finished": time.time(), "stats": _summary(stats)})
        log.info("[%s] done in %.1f s, peak memory %.2f GB (PSS of the process tree)", stage, seconds,
                 mem.peak_pss_gb)
        return StageResult(stage, False, seconds, stats)


def _summary(stats: dict) -> dict:
    """The scalar part of a stage's stats, for the manifest (the full record is stats.json)."""
    return {k: v for k, v in stats.items() if isinstance(v, (int, float, str, bool))}
