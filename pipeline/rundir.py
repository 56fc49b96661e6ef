"""The run directory: the contract between stages.

Each stage owns one folder under the run directory and is done when `manifest.json` records it
with the fingerprint of its config and of its inputs. A stage writes into a staging folder
(``.<stage>.tmp-<id>``) that is renamed into place only when the stage succeeds, so a killed run
never leaves a half-written output that looks finished; the next run removes stale staging
folders and redoes the unfinished stage. A re-run skips stages whose fingerprint is unchanged and
whose outputs still match the sizes (and, with ``verify_digests``, the digests) the manifest
recorded when the stage was published; a stage whose outputs changed is redone.

One process at a time writes a run directory: `RunDir.lock` holds an OS file lock
(``fcntl.flock`` on ``.run.lock``, which also holds the holder's pid, host, start time and
command) for as long as a run, a stage or a manifest update lasts. It is re-entrant within a
process, so a run and the experiment variants nested under it lock their own folders freely. A
second process refuses at once, naming the holder; readers (``pipeline.evaluate``) take the lock
shared, so they run side by side but never beside a writer. The kernel drops the lock of a process
that dies, so a killed run's lock is taken over by the next run (which logs it).

A run directory may also be a URI, ``s3://BUCKET/PATH`` or ``gs://BUCKET/PATH``
(`pipeline.objectstore`): the stages work in a local cache, each finished stage is uploaded
before its manifest entry (one object write, the commit point) says it is done, a resumed run
downloads the done stages it needs (checked against the recorded digests), and a lease object
stands in for the flock. ``file://PATH`` is the local path; any other scheme is refused.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from pipeline.memwatch import PeakMemory

log = logging.getLogger(__name__)

#: the lock file of a run directory (see `RunDir.lock`)
LOCK_NAME = ".run.lock"


class RunDirError(RuntimeError):
    """A run directory cannot be used as asked (locked, unfinished, stale); the message says why."""


class RunDirLocked(RunDirError):
    """Another process holds the run directory's lock; the message names it."""


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def _write_atomic(path: Path, data: str) -> None:
    """Write ``data`` to a temporary file beside ``path`` and rename it into place; a failed
    write (a full disk, a kill signal turned exception) leaves no temporary file behind."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(data)
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    _write_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


def write_text_atomic(path: Path, text: str) -> None:
    _write_atomic(path, text)


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()


def input_signature(paths: tuple[str, ...], cache: Path | None = None) -> list:
    """Name, size and content digest of each input file: a changed input file re-runs its stage.

    The digest (not the mtime) decides, so a copy of the same data made later (a fresh checkout of
    shared data, a restored backup) reuses the finished stages. Digests are cached in ``cache``
    (a run's ``.input-digests.json``) under (path, size, mtime), so an unchanged file is read once
    (about 1 s per GB). A directory in ``paths`` is an error naming it.
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
        if os.path.isdir(real):
            raise IsADirectoryError(f"{p}: is a directory, not a data file")
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


# ---------------------------------------------------------------------------------------------
# The run-directory lock
# ---------------------------------------------------------------------------------------------

@dataclass
class Hold:
    """A lock this process holds: what releasing it needs (`resource`), whether it is shared,
    and how many nested holds are open."""

    resource: Any
    shared: bool
    count: int


class ReentrantHolds:
    """This process's holds of one kind of lock, by key, re-entrant: the first hold of a key
    acquires the lock, nested holds count, the last one out releases it. A shared hold inside an
    exclusive one is part of it; an exclusive hold inside a shared one is refused (`RunDirError`).
    `run_lock` (a flock) and `pipeline.objectstore.store_lock` (a lease) are two of them."""

    def __init__(self) -> None:
        self._held: dict[str, Hold] = {}
        self._guard = threading.Lock()

    def get(self, key: str) -> Hold | None:
        return self._held.get(key)

    @contextmanager
    def hold(self, key: str, shared: bool, acquire: Callable[[], Any],
             release: Callable[[Hold], None], refusal: str) -> Iterator[None]:
        """Hold ``key``: ``acquire()`` (under this object's guard, so it may raise) makes the
        resource of a first hold; ``release(hold)`` ends the last. ``refusal`` is the message of
        an exclusive hold asked for inside a shared one."""
        with self._guard:
            held = self._held.get(key)
            if held is not None:
                if held.shared and not shared:
                    raise RunDirError(refusal)
                held.count += 1
            else:
                held = self._held[key] = Hold(acquire(), shared, 1)
        try:
            yield
        finally:
            with self._guard:
                held.count -= 1
                if held.count == 0:
                    del self._held[key]
                    release(held)


_HELD = ReentrantHolds()  # run_lock's: flock file descriptors by lock-file path

#: flock errors that mean "this file system has no locks" (not "someone holds it")
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS)


def _holder(path: Path) -> dict | None:
    """The holder an exclusive lock recorded in ``path`` (None when none is recorded)."""
    try:
        text = path.read_text()
        return json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None


def _describe(info: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(info.get("started", 0))))
    return (f"pid {info.get('pid')} on host {info.get('host')}, started {started} "
            f"({info.get('command', '?')})")


def _local_lock_pids(path: Path) -> list[int]:
    """Pids of this machine's processes holding a flock on ``path`` (Linux ``/proc/locks``;
    empty elsewhere). Names the readers, which record nothing in the lock file."""
    try:
        st = os.stat(path)
        text = Path("/proc/locks").read_text()
    except OSError:
        return []
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    for line in text.splitlines():
        parts = line.split()  # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"
        if len(parts) >= 6 and "->" not in parts and parts[1] == "FLOCK" and parts[5] == want:
            pids.append(int(parts[4]))
    return sorted(set(pids))


def _alive(info: dict) -> bool:
    """False when the recorded holder was a process of this host that no longer exists (a
    killed run's record, left in the file); True otherwise (alive, or another host's)."""
    if info.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(info.get("pid", 0)), 0)
    except ProcessLookupError:
        return False
    except (OSError, ValueError):
        return True
    return True


def _refusal(root: Path, path: Path, shared: bool) -> RunDirLocked:
    info = _holder(path)
    if info is not None and _alive(info):
        what = "a run is writing it" if shared else "another run holds it"
        return RunDirLocked(f"{root}: {what}: {_describe(info)}; wait for it to finish or stop it "
                            f"(lock file {path})")
    pids = _local_lock_pids(path)
    who = f"pid {', '.join(map(str, pids))} on this host" if pids else "another process"
    return RunDirLocked(f"{root}: in use by {who} (a pipeline.evaluate reading it, or a run that "
                        f"is starting); try again when it has finished (lock file {path})")


def _open_lock_file(path: Path, shared: bool) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o664)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        if not shared:
            raise RunDirError(f"{path.parent}: cannot write its lock file ({e.strerror})") from None
        return os.open(path, os.O_RDONLY)  # a reader of a read-only run directory


def _acquire(root: Path, shared: bool) -> int | None:
    """The lock file's descriptor, flocked (None where the file system has no locks)."""
    path = root / LOCK_NAME
    try:
        fd = _open_lock_file(path, shared)
    except OSError as e:
        if shared:  # nothing can write a run directory whose lock file cannot be made
            log.warning("%s: no lock file (%s); reading it unlocked", root, e.strerror)
            return None
        raise
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise _refusal(root, path, shared) from None
    except OSError as e:
        os.close(fd)
        if e.errno not in _NO_LOCKS:
            raise
        log.warning("%s: the file system has no file locks (%s); running without a run-directory "
                    "lock: make sure no other run uses this directory", root, e.strerror)
        return None
    if not shared:
        stale = _holder(path)
        if stale is not None:
            log.warning("%s: taking over the lock of %s, which ended without releasing it",
                        root, _describe(stale))
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
              "command": " ".join([os.path.basename(sys.argv[0] or "python"), *sys.argv[1:]])[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        _remove_stale_temporaries(root)
    return fd


def _release(held: Hold) -> None:
    fd = held.resource
    if fd is None:
        return
    try:
        if not held.shared:
            os.ftruncate(fd, 0)  # an empty lock file: no holder
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _remove_stale_temporaries(root: Path) -> None:
    """Temporary files of atomic writes (``.manifest.json.tmp-*`` ...) that a killed process
    left in ``root``; only the lock holder may remove them. Staging folders are the stages' own
    (`RunDir.clean_staging`)."""
    for p in root.glob(".*.tmp-*"):
        if p.is_file() and not p.is_symlink():
            log.info("removing %s left by an interrupted write", p.name)
            _remove_quietly(p)


@contextmanager
def run_lock(root: str | Path, *, shared: bool = False) -> Iterator[None]:
    """Hold the lock of run directory ``root`` (see the module docstring): exclusive for a
    writer, shared for a reader; re-entrant within this process (a shared hold inside an
    exclusive one is part of it). Raises `RunDirLocked`, naming the holder, when another
    process holds it in a conflicting mode."""
    root = Path(root).resolve()
    with _HELD.hold(str(root / LOCK_NAME), shared, lambda: _acquire(root, shared), _release,
                    f"{root}: this process reads it (shared lock) and cannot also write it"):
        yield


def output_record(folder: Path) -> dict[str, list]:
    """``{path relative to folder: [size in bytes, blake2b-128 digest]}`` of every file under
    ``folder`` (what the manifest records of a published stage)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            out[p.relative_to(folder).as_posix()] = [p.stat().st_size, _digest(str(p))]
    return out


#: ``scheme://`` at the start of a run directory's name: a URI, not a local path
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


def is_store_uri(value: str | Path) -> bool:
    """Whether a run directory's name is a URI of an object store (any ``scheme://`` but
    ``file://``; an unsupported scheme is refused when the `RunDir` is made)."""
    m = _URI.match(value) if isinstance(value, str) else None
    return m is not None and m.group(1).lower() != "file"


def local_run_path(value: str | Path) -> Path:
    """The local path a run directory's name means (``file://PATH`` is PATH)."""
    if isinstance(value, str) and value.lower().startswith("file://"):
        return Path(unquote(urlparse(value).path))
    return Path(value)


@dataclass(frozen=True)
class RayStorage:
    """Where Ray Train keeps a run's checkpoints: ``RunConfig(storage_path=path,
    storage_filesystem=filesystem)``; ``uri`` names it (a local path, or ``s3://...``)."""

    path: str
    filesystem: Any = None  # a pyarrow.fs.FileSystem for a store; None for a local path
    uri: str = ""

    @classmethod
    def local(cls, path: str | Path) -> RayStorage:
        return cls(str(path), None, str(path))

    def run_uri(self, name: str) -> str:
        return f"{self.uri or self.path}/{name}"

    def remove(self, name: str) -> None:
        """Delete the Ray Train run ``name`` (``--force`` restarts training from scratch)."""
        if self.filesystem is None:
            shutil.rmtree(Path(self.path) / name, ignore_errors=True)
        else:
            self.filesystem.delete_dir_contents(f"{self.path}/{name}", missing_dir_ok=True)


@dataclass
class StageResult:
    name: str
    skipped: bool
    seconds: float
    stats: dict


class RunDir:
    """A run directory with its manifest."""

    #: check the digests of a stage's outputs, not only their sizes, before calling it done.
    #: ``pipeline.run --verify`` sets it for every run directory of the process (an
    #: experiment's variants included); an instance may override it.
    verify_digests: bool = False

    def __init__(self, root: str | Path):
        #: the object store holding the run (`pipeline.objectstore.Store`), None for a local
        #: run directory; ``root`` is then the local cache the stages work in
        self.store = None
        if is_store_uri(root):
            from pipeline.objectstore import Store

            self.store = Store(str(root))
            root = self.store.cache_dir
        root = local_run_path(root)
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.manifest_path = self.root / "manifest.json"
        #: the run directory as users name it: the store's URI, or the local path
        self.location = self.store.uri if self.store is not None else str(self.root)
        self._said_unverified: set[str] = set()
        self._verified: dict[str, dict] = {}  # stages downloaded and checked (store, --verify)

    def stage_dir(self, stage: str) -> Path:
        return self.root / stage

    def lock(self, *, shared: bool = False):
        """`run_lock` of this run directory (a context manager); on a store, its lease too
        (`pipeline.objectstore.store_lock`)."""
        if self.store is not None:
            from pipeline.objectstore import store_lock

            return store_lock(self.store, shared=shared)
        return run_lock(self.root, shared=shared)

    def write_text(self, rel: str, text: str) -> None:
        """Write ``rel`` (a file outside the stages' folders, such as ``config.resolved.yaml``,
        or one added to a published stage's folder, such as ``evaluate/report.md``) atomically;
        on a store, upload it too. Call under the lock."""
        write_text_atomic(self.root / rel, text)
        if self.store is not None:
            from pipeline.objectstore import check_lease

            check_lease(self.store)
            self.store.write_bytes(rel, text.encode())

    def train_storage(self) -> RayStorage:
        """Ray Train's storage of the train stage: ``<run dir>/train_ray``."""
        if self.store is None:
            return RayStorage.local(self.root / "train_ray")
        path, fs = self.store.ray_storage("train_ray")
        return RayStorage(path, fs, f"{self.store.uri}/train_ray")

    def fetch(self, *stages: str) -> None:
        """On a store: make the cache hold the published files of each done stage of
        ``stages`` (downloaded and checked against the manifest's digests where the cache does
        not already hold them); a stage not done is left alone. Nothing on a local run
        directory."""
        if self.store is None:
            return
        from pipeline.objectstore import fetch_lock

        entries = self.manifest()["stages"]
        with fetch_lock(self.root):
            for stage in stages:
                e = entries.get(stage)
                if e and e.get("status") == "done":
                    self.store.fetch_stage(stage, e.get("outputs"))

    def input_signature(self, paths: tuple[str, ...]) -> list:
        """`input_signature` of ``paths`` with this run's digest cache (``.input-digests.json``)."""
        return input_signature(paths, self.root / ".input-digests.json")

    def snapshot(self, stages: tuple[str, ...]) -> None:
        """On a store, for a reader: copy the manifest (as read once), ``config.resolved.yaml``
        and the files of the done stages among ``stages`` into the cache (each checked against
        that manifest's digests), and remove the cache's copy of the others, so the cache is a
        local run directory that says what the store said. Nothing on a local run directory."""
        if self.store is None:
            return
        from pipeline.objectstore import fetch_lock

        m = self.manifest()
        with fetch_lock(self.root):
            config = self.store.read_bytes("config.resolved.yaml")
            if config is None:
                _remove_quietly(self.root / "config.resolved.yaml")
            else:
                write_text_atomic(self.root / "config.resolved.yaml", config.decode())
            for stage in stages:
                e = m["stages"].get(stage)
                if e and e.get("status") == "done":
                    self.store.fetch_stage(stage, e.get("outputs"))
                else:
                    self.store.forget_stage(stage)
                    shutil.rmtree(self.stage_dir(stage), ignore_errors=True)
            write_json_atomic(self.manifest_path, m)

    def manifest(self) -> dict:
        if self.store is not None:
            text = self.store.read_bytes("manifest.json")
            where = f"{self.location}/manifest.json"
        else:
            text = self.manifest_path.read_bytes() if self.manifest_path.exists() else None
            where = str(self.manifest_path)
        if text is None:
            return {"stages": {}}
        try:
            m = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise RunDirError(f"{where}: not a valid manifest ({e}); restore it or "
                              f"start a new run directory") from None
        if not isinstance(m, dict) or not isinstance(m.get("stages"), dict):
            raise RunDirError(f"{where}: not a valid manifest (no 'stages' mapping)")
        return m

    def entry(self, stage: str) -> dict | None:
        return self.manifest()["stages"].get(stage)

    def output_problem(self, stage: str, entry: dict | None = None,
                       digests: bool | None = None) -> str | None:
        """Why ``stage``'s files no longer match what the manifest recorded when it was published
        (a missing file, another size, with ``digests`` another digest), naming the file; None
        when they match. A stage recorded before sizes were kept is not verified (logged once)."""
        entry = entry if entry is not None else (self.entry(stage) or {})
        recorded = entry.get("outputs")
        if recorded is None:
            if stage not in self._said_unverified:
                self._said_unverified.add(stage)
                log.info("[%s] recorded before output sizes were kept: its files are not verified",
                         stage)
            return None
        check_digests = self.verify_digests if digests is None else digests
        if self.store is not None:
            return self._store_output_problem(stage, recorded, check_digests)
        folder = self.stage_dir(stage)
        for rel, (size, digest) in sorted(recorded.items()):
            p = folder / rel
            if not p.is_file():
                return f"output {stage}/{rel} is missing"
            have = p.stat().st_size
            if have != size:
                return f"output {stage}/{rel} has {have} bytes, {size} when the stage finished"
            if check_digests and _digest(str(p)) != digest:
                return f"output {stage}/{rel} has changed since the stage finished (digest)"
        return None

    def _store_output_problem(self, stage: str, recorded: dict, digests: bool) -> str | None:
        """`output_problem` on a store: its listing against the recorded sizes; with
        ``digests`` each file downloaded into the cache and hashed (once per record)."""
        listing = self.store.listing(stage)
        for rel, (size, _) in sorted(recorded.items()):
            if rel not in listing:
                return f"output {stage}/{rel} is missing from {self.location}"
            if listing[rel] != size:
                return (f"output {stage}/{rel} has {listing[rel]} bytes in {self.location}, "
                        f"{size} when the stage finished")
        if digests and self._verified.get(stage) != recorded:
            from pipeline.objectstore import StoreFileError, fetch_lock

            try:
                with fetch_lock(self.root):
                    self.store.fetch_stage(stage, recorded, force=True)
            except StoreFileError as e:
                return e.problem
            self._verified[stage] = recorded
        return None

    def stale_reason(self, stage: str, fingerprint: str, *, digests: bool | None = None) -> str | None:
        """Why ``stage`` is not done with ``fingerprint`` (None when it is): not run, not
        finished, done with other settings or inputs, or outputs that no longer match."""
        e = self.entry(stage)
        if not e:
            return "not run yet"
        if e.get("status") != "done":
            return f"its last run is {e.get('status')!r}, not done"
        if e.get("fingerprint") != fingerprint:
            return f"done with other settings or inputs (fingerprint {e.get('fingerprint')})"
        if self.store is None and not self.stage_dir(stage).is_dir():
            return f"its folder {stage}/ is missing"
        return self.output_problem(stage, e, digests)

    def is_done(self, stage: str, fingerprint: str) -> bool:
        return self.stale_reason(stage, fingerprint) is None

    def fingerprint_of(self, stage: str) -> str:
        e = self.entry(stage)
        if not e or e.get("status") != "done":
            raise RuntimeError(f"stage {stage!r} has not finished in {self.location}")
        return e["fingerprint"]

    def _record(self, stage: str, entry: dict) -> None:
        with self.lock():  # the read-modify-write of the manifest under the run's lock
            m = self.manifest()
            m["stages"][stage] = entry
            if self.store is not None:  # one object write: the commit point on a store
                from pipeline.objectstore import check_lease

                check_lease(self.store)
                self.store.write_bytes("manifest.json",
                                       json.dumps(m, indent=2, sort_keys=True, default=str).encode())
            write_json_atomic(self.manifest_path, m)  # on a store, the cache's copy

    def clean_staging(self, stage: str) -> None:
        with self.lock():  # only the holder may remove staging folders: they may be live
            for p in self.root.glob(f".{stage}.tmp-*"):
                log.info("removing staging folder %s left by an interrupted run", p.name)
                shutil.rmtree(p, ignore_errors=True)

    def run_stage(
        self, stage: str, fingerprint: str, fn: Callable[[Path], dict], *, force: bool = False
    ) -> StageResult:
        """Run `fn(staging_dir) -> stats` unless done with this fingerprint and its outputs still
        match the manifest; publish atomically, recording each output's size and digest. Holds
        the run's lock throughout."""
        with self.lock():
            return self._run_stage(stage, fingerprint, fn, force)

    def _run_stage(self, stage: str, fingerprint: str, fn: Callable[[Path], dict],
                   force: bool) -> StageResult:
        if not force:
            reason = self.stale_reason(stage, fingerprint)
            e = self.entry(stage) or {}
            if reason is None:
                log.info("[%s] done already (fingerprint %s), skipping", stage, fingerprint)
                return StageResult(stage, True, float(e.get("seconds", 0.0)), e.get("stats", {}))
            if e.get("status") == "done" and e.get("fingerprint") == fingerprint:
                log.warning("[%s] %s: redoing the stage", stage, reason)
        self.clean_staging(stage)
        staging = self.root / f".{stage}.tmp-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
        self._record(stage, {"status": "running", "fingerprint": fingerprint, "started": time.time()})
        if self.store is not None:
            self.store.forget_stage(stage)  # the cache's copy is about to change
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
        outputs = output_record(staging)
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
        if self.store is not None:  # uploaded before the manifest says done (the commit point)
            from pipeline.objectstore import check_lease

            check_lease(self.store)
            self.store.upload_stage(stage, final, outputs)
        self._record(stage, {"status": "done", "fingerprint": fingerprint, "seconds": seconds,
                             "peak_pss_gb": round(mem.peak_pss_gb, 3),
                             "peak_rss_gb": round(mem.peak_rss_gb, 3),
                             "finished": time.time(), "stats": _summary(stats),
                             "outputs": outputs})
        if self.store is not None:
            self.store.mark_synced(stage, outputs)
        log.info("[%s] done in %.1f s, peak memory %.2f GB (PSS of the process tree)", stage, seconds,
                 mem.peak_pss_gb)
        return StageResult(stage, False, seconds, stats)


def _summary(stats: dict) -> dict:
    """The scalar part of a stage's stats, for the manifest (the full record is stats.json)."""
    return {k: v for k, v in stats.items() if isinstance(v, (int, float, str, bool))}
