"""Run directories on object storage: ``--run-dir s3://BUCKET/PATH`` or ``gs://BUCKET/PATH``.

`pyarrow.fs` opens the store (``FileSystem.from_uri``: ``S3FileSystem``, ``GcsFileSystem``), so
the endpoint, region and credentials come from the standard environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION``, ``AWS_PROFILE``;
``GOOGLE_APPLICATION_CREDENTIALS``) or from the URI's query (``?endpoint_override=HOST:PORT&
scheme=http&region=...``: pyarrow's own parameters). Any other scheme is refused, naming the value.

The stages read and write local files, so a run directory on a store is worked in a local cache
(`cache_dir`: ``$HMN_RUN_CACHE/<scheme>/<bucket>/<path>-<hash of the URI>``, by default under
``~/.cache/hmn/runs``), and the store holds the run:

- **publish**: a stage computes into a local staging folder as on a local run directory; its
  finished folder is uploaded to ``<uri>/<stage>/`` (after deleting what an earlier attempt left
  there) and its listing checked against the sizes just recorded; only then is the manifest
  written, one object write of ``manifest.json``, the commit point. An object store has no
  atomic rename, but an object appears whole or not at all (a PutObject, or a multipart upload
  that becomes visible when completed; pyarrow buffers an object this small and sends it at
  close), and a stage is done only when the manifest says so: the manifest was set to
  ``running`` before anything under the stage's prefix was deleted, so a kill during the upload
  leaves a stage that is not done, and the next run redoes it (uploads before the commit are
  invisible to a resume: the manifest does not list them).
- **resume**: a done stage is checked against the manifest's record by the store's listing
  (sizes; with ``--verify`` by downloading and hashing). A stage that has work to do first
  downloads the done stages it depends on (`RunDir.fetch`), each file checked against the
  blake2b digest the manifest recorded; a cache copy already checked against the same record
  (``.<stage>.synced.json``) is used as it is.
- **one writer**: the ``.run.lock`` object is a lease (owner, pid, host, start, command,
  heartbeat) renewed every `LEASE_RENEW_S` seconds; a run refuses a lease renewed less than
  `LEASE_TTL_S` seconds ago, unless its holder is a dead process of this host (a killed run,
  taken over at once). An object store has no compare-and-swap that pyarrow exposes, so a run
  writes its lease, waits `LEASE_SETTLE_S` and reads it back: of two runs starting together,
  the one whose write landed last wins and the other refuses. Before each manifest write and
  each upload the writer checks that the lease is still its own, so a run that lost it (stalled
  past the TTL while another took over) stops without committing. Readers (``pipeline.evaluate``,
  ``pipeline.answer``) refuse while a live lease is held, and check every file they download
  against the digests of the manifest they read, so they never mix two versions of a stage.
  The local cache is also flocked as a local run directory is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.rundir import (
    Hold,
    ReentrantHolds,
    RunDirError,
    RunDirLocked,
    _describe,
    _remove_quietly,
    run_lock,
    write_json_atomic,
)

log = logging.getLogger(__name__)

#: the schemes a run directory may have besides a local path (and ``file://``)
SCHEMES = ("s3", "gs")
#: the lease object of a run directory on a store (the local lock file's name)
LEASE_NAME = ".run.lock"
#: seconds between renewals of a writer's lease
LEASE_RENEW_S = 15.0
#: seconds after its last renewal at which a lease counts as abandoned (must exceed the clock
#: difference between the hosts that share a run directory)
LEASE_TTL_S = 90.0
#: seconds between writing a lease and reading it back (see the module docstring)
LEASE_SETTLE_S = 1.0
#: bytes per read when downloading
_CHUNK = 8 << 20


class StoreFileError(RunDirError):
    """A done stage's file on the store is missing or differs from what the manifest recorded;
    ``problem`` says which and how."""

    def __init__(self, problem: str):
        self.problem = problem
        super().__init__(f"{problem}; run pipeline.run again with --verify to redo the stage")


def cache_root() -> Path:
    """Where run directories on a store are cached: ``$HMN_RUN_CACHE``, else
    ``$XDG_CACHE_HOME/hmn/runs``, else ``~/.cache/hmn/runs``."""
    if os.environ.get("HMN_RUN_CACHE"):
        return Path(os.environ["HMN_RUN_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hmn" / "runs"


class Store:
    """A run directory on an object store: its URI, the pyarrow file system, the prefix-stripped
    path (``bucket/path``) and the local cache it is worked in."""

    def __init__(self, value: str):
        scheme = value.split("://", 1)[0].lower()
        if scheme not in SCHEMES:
            raise RunDirError(f"run directory {value!r}: scheme {scheme + '://'!r} is not "
                              f"supported; use a local path, s3://BUCKET/PATH or gs://BUCKET/PATH")
        try:
            fs, base = pafs.FileSystem.from_uri(value)
        except (pa.ArrowInvalid, ValueError, OSError) as e:
            raise RunDirError(f"run directory {value!r}: {e}") from None
        base = base.strip("/")
        if not base:
            raise RunDirError(f"run directory {value!r}: names no bucket ({scheme}://BUCKET/PATH)")
        self.given = value
        self.fs: pafs.FileSystem = fs
        self.base = base
        self.uri = f"{scheme}://{base}"  # without the query, which may hold settings
        digest = hashlib.blake2b(value.encode(), digest_size=4).hexdigest()
        self.cache_dir = cache_root() / scheme / f"{base}-{digest}"

    def __repr__(self) -> str:
        return f"Store({self.uri!r})"

    def path(self, rel: str = "") -> str:
        return f"{self.base}/{rel}" if rel else self.base

    # -- objects ------------------------------------------------------------------------------

    def read_bytes(self, rel: str) -> bytes | None:
        """The object ``rel`` (None when there is none)."""
        try:
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()
        except FileNotFoundError:
            return None

    def write_bytes(self, rel: str, data: bytes) -> None:
        """One object write: it appears whole or not at all (``data`` is buffered and sent at
        close, so a failed write completes no object)."""
        with self.fs.open_output_stream(self.path(rel)) as f:
            f.write(data)

    def delete(self, rel: str) -> None:
        try:
            self.fs.delete_file(self.path(rel))
        except FileNotFoundError:
            pass

    def listing(self, rel: str) -> dict[str, int]:
        """``{path relative to rel: size}`` of every object under the prefix ``rel``."""
        sel = pafs.FileSelector(self.path(rel), recursive=True, allow_not_found=True)
        start = len(self.path(rel)) + 1
        return {i.path[start:]: i.size for i in self.fs.get_file_info(sel)
                if i.type == pafs.FileType.File}

    def delete_tree(self, rel: str) -> None:
        self.fs.delete_dir_contents(self.path(rel), missing_dir_ok=True)

    # -- stages -------------------------------------------------------------------------------

    def upload_stage(self, stage: str, folder: Path, outputs: dict[str, list]) -> None:
        """Replace what is under ``<uri>/<stage>/`` by ``folder`` and check the store's listing
        against ``outputs`` (``{rel: [size, digest]}``); the caller then commits the manifest."""
        self.delete_tree(stage)
        if outputs:
            pafs.copy_files(str(folder), self.path(stage),
                            source_filesystem=pafs.LocalFileSystem(),
                            destination_filesystem=self.fs, use_threads=True)
        listing = self.listing(stage)
        for rel, (size, _) in sorted(outputs.items()):
            if listing.get(rel) != size:
                raise RunDirError(f"{self.uri}/{stage}/{rel}: the upload left "
                                  f"{listing.get(rel)} bytes of {size}")

    def download(self, rel: str, dest: Path) -> tuple[int, str]:
        """Copy the object ``rel`` to ``dest``; its size and blake2b-128 digest."""
        h, size = hashlib.blake2b(digest_size=16), 0
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self.fs.open_input_stream(self.path(rel)) as src, open(dest, "wb") as out:
            while chunk := src.read(_CHUNK):
                h.update(chunk)
                out.write(chunk)
                size += len(chunk)
        return size, h.hexdigest()

    def fetch_stage(self, stage: str, recorded: dict[str, list] | None, *,
                    force: bool = False) -> None:
        """Make ``<cache>/<stage>/`` the files the manifest recorded (``recorded``: ``{rel:
        [size, digest]}``), downloading each and checking its digest; a cache copy already
        checked against the same record is kept (unless ``force``). `StoreFileError` naming the
        file when one is missing or differs. Call under `fetch_lock`."""
        cache, marker = self.cache_dir, self.cache_dir / f".{stage}.synced.json"
        local = cache / stage
        if recorded is None:  # recorded before sizes were kept: whatever the store holds
            recorded = {rel: [size, None] for rel, size in self.listing(stage).items()}
        if not force and _read_json(marker) == recorded and all(
                (local / rel).is_file() and (local / rel).stat().st_size == size
                for rel, (size, _) in recorded.items()):
            return
        for old in cache.glob(f".{stage}.fetch-*"):  # left by a killed fetch
            shutil.rmtree(old, ignore_errors=True)
        tmp = cache / f".{stage}.fetch-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        log.info("[%s] downloading %d files from %s/%s/", stage, len(recorded), self.uri, stage)
        try:
            def one(rel: str) -> str | None:
                size, digest = recorded[rel]
                try:
                    have_size, have = self.download(f"{stage}/{rel}", tmp / rel)
                except FileNotFoundError:
                    return f"{self.uri}/{stage}/{rel} is missing"
                if have_size != size:
                    return (f"{self.uri}/{stage}/{rel} has {have_size} bytes, {size} when the "
                            f"stage finished")
                if digest is not None and have != digest:
                    return (f"{self.uri}/{stage}/{rel} has changed since the stage finished "
                            f"(digest)")
                return None

            with ThreadPoolExecutor(max_workers=8) as pool:
                problems = [p for p in pool.map(one, sorted(recorded)) if p]
            if problems:
                raise StoreFileError(problems[0])
            _remove_quietly(marker)
            if local.is_symlink() or local.is_file():
                local.unlink()
            elif local.exists():
                shutil.rmtree(local)
            os.replace(tmp, local)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        write_json_atomic(marker, recorded)

    def forget_stage(self, stage: str) -> None:
        """The cache copy of ``stage`` is no longer known to be the published one."""
        _remove_quietly(self.cache_dir / f".{stage}.synced.json")

    def mark_synced(self, stage: str, recorded: dict[str, list]) -> None:
        """The cache copy of ``stage`` is the one the manifest records (just published)."""
        write_json_atomic(self.cache_dir / f".{stage}.synced.json", recorded)

    def ray_storage(self, rel: str) -> tuple[str, pafs.FileSystem]:
        """Ray Train's ``(storage_path, storage_filesystem)`` for ``<uri>/<rel>``."""
        return self.path(rel), self.fs


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@contextmanager
def fetch_lock(cache: Path) -> Iterator[None]:
    """An exclusive flock on ``<cache>/.fetch.lock`` (blocking): evaluations side by side fetch
    into the same cache one at a time."""
    import fcntl

    cache.mkdir(parents=True, exist_ok=True)
    fd = os.open(cache / ".fetch.lock", os.O_RDWR | os.O_CREAT, 0o664)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# The lease: the run-directory lock on a store
# ---------------------------------------------------------------------------------------------

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, ValueError):
        return True
    return True


def _live(info: dict, now: float) -> bool:
    """A lease renewed less than `LEASE_TTL_S` ago whose holder is not a dead process of this
    host."""
    if info.get("host") == socket.gethostname() and not _pid_alive(int(info.get("pid", 0))):
        return False
    return now - float(info.get("heartbeat", 0)) < LEASE_TTL_S


class Lease:
    """A writer's lease on a run directory on a store (see the module docstring)."""

    def __init__(self, store: Store):
        self.store = store
        self.owner = uuid.uuid4().hex
        self.started = time.time()
        self.lost: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def holder(self) -> dict | None:
        data = self.store.read_bytes(LEASE_NAME)
        try:
            return json.loads(data) if data else None
        except ValueError:
            return None

    def _refusal(self, info: dict, what: str) -> RunDirLocked:
        age = time.time() - float(info.get("heartbeat", 0))
        return RunDirLocked(f"{self.store.uri}: {what}: {_describe(info)}, lease renewed "
                            f"{age:.0f} s ago (abandoned after {LEASE_TTL_S:.0f} s); wait for it "
                            f"to finish or stop it (lease {self.store.uri}/{LEASE_NAME})")

    def _write(self) -> None:
        me = {"owner": self.owner, "pid": os.getpid(), "host": socket.gethostname(),
              "started": self.started, "heartbeat": time.time(),
              "command": " ".join([os.path.basename(sys.argv[0] or "python"),
                                   *sys.argv[1:]])[:300]}
        self.store.write_bytes(LEASE_NAME, json.dumps(me).encode())

    def check_no_writer(self) -> None:
        """For a reader: `RunDirLocked` naming the writer while a live lease is held."""
        info = self.holder()
        if info is not None and _live(info, time.time()):
            raise self._refusal(info, "a run is writing it")

    def acquire(self) -> None:
        info = self.holder()
        if info is not None and _live(info, time.time()):
            raise self._refusal(info, "another run holds it")
        if info is not None:
            log.warning("%s: taking over the lease of %s, which ended without releasing it",
                        self.store.uri, _describe(info))
        self._write()
        time.sleep(LEASE_SETTLE_S)
        info = self.holder()
        if info is None or info.get("owner") != self.owner:
            raise self._refusal(info or {}, "another run took it at the same time")
        self._thread = threading.Thread(target=self._renew, name="run-dir-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(LEASE_RENEW_S):
            try:
                info = self.holder()
                if info is None or info.get("owner") != self.owner:
                    self.lost = info or {}
                    log.error("%s: lost the run directory's lease (now %s)", self.store.uri,
                              _describe(info) if info else "none")
                    return
                self._write()
            except OSError as e:  # a network error: the next renewal tries again
                log.warning("%s: renewing the lease failed (%s)", self.store.uri, e)

    def check(self) -> None:
        """`RunDirLocked` unless this lease is still the store's (before every commit)."""
        info = self.lost if self.lost is not None else self.holder()
        if info is None or info.get("owner") != self.owner:
            raise RunDirLocked(f"{self.store.uri}: this run no longer holds the run directory's "
                               f"lease ({_describe(info) if info else 'no lease'} holds it); "
                               f"stopping without writing the manifest")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            info = self.holder()
            if info is not None and info.get("owner") == self.owner:
                self.store.delete(LEASE_NAME)
        except OSError as e:
            log.warning("%s: could not remove the lease (%s); it expires after %.0f s",
                        self.store.uri, e, LEASE_TTL_S)


_LEASES = ReentrantHolds()  # store_lock's leases by store URI (a reader's only checked for a writer)


@contextmanager
def store_lock(store: Store, *, shared: bool = False) -> Iterator[None]:
    """The lock of a run directory on a store: its local cache's flock (`run_lock`) and the
    store's lease (exclusive), or for a reader the check that no live lease is held. Re-entrant
    within this process, as `run_lock`."""
    def acquire() -> Lease:
        lease = Lease(store)
        try:
            if shared:
                lease.check_no_writer()
            else:
                lease.acquire()
        except OSError as e:  # no such bucket, no credentials, no endpoint
            raise RunDirError(f"{store.uri}: cannot use the store: {e}") from None
        return lease

    def release(held: Hold) -> None:
        if not held.shared:
            held.resource.release()

    with run_lock(store.cache_dir, shared=shared):
        with _LEASES.hold(store.uri, shared, acquire, release,
                          f"{store.uri}: this process reads it and cannot also write it"):
            yield


def check_lease(store: Store) -> None:
    """`RunDirLocked` unless this process holds ``store``'s lease, exclusive and still its own."""
    held = _LEASES.get(store.uri)
    if held is None or held.shared:
        raise RunDirError(f"{store.uri}: written without holding its lease")
    held.resource.check()
