"""One writer per table: a run lock that names its holder, and that a killed run cannot leave behind.

Two runs that write the same table (a colleague starts tonight's index job by hand while the scheduled one
runs) must not interleave: the second waits up to ``lock.wait_seconds`` and is then refused with a message
naming the running one (run id, job, host, pid, start time, last heartbeat).

* **Local storage** (a folder, or a mounted file system): ``<storage.uri>/_locks/<table>.lock``, held with
  ``fcntl.flock``. The kernel releases it the moment its process dies, however it dies (SIGKILL, OOM, a
  reboot), so a killed run never blocks the next night. The file keeps the last holder's details: a lock
  found in state ``held`` but not locked is a killed run's, and the next run reports that it took over.
* **Object stores** (``s3://``, ...): no file locks there, so ``<storage.uri>/_locks/<table>.lock.json`` is a
  lease: the holder rewrites it every ``stale_seconds / 4`` (a heartbeat) and a lease whose heartbeat is older
  than ``lock.stale_seconds`` is a dead run's and is taken over. Taking a lease is write-then-read-back (the
  last writer wins and the other sees it lost); S3 has no compare-and-swap through pyarrow, so two runs
  starting within the same second could both see their own write; the commit itself is still atomic
  (Lance), so the worst case is two complete runs, never a corrupt table.

Example::

    with RunLock(cfg.storage, "passages", run_id, job="index", wait_seconds=0) as lock:
        ...  # write passages
    lock.report  # {"name": "passages", "waited_seconds": 0.0, "took_over": None}
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from datetime import datetime, timezone
from typing import Any

log = logging.getLogger(__name__)
POLL_SECONDS = 0.5


class LockBusy(RuntimeError):
    """Another live run holds the lock; the message names it and the fix."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _age(stamp: str | None) -> float | None:
    try:
        return time.time() - datetime.fromisoformat(stamp).timestamp()
    except (TypeError, ValueError):
        return None


def describe(holder: dict[str, Any]) -> str:
    """'run index-... (job index, pid 123 on host-a, started 2026-..., heartbeat 3 s ago)'."""
    age = _age(holder.get("heartbeat_at"))
    beat = f", heartbeat {age:.0f} s ago" if age is not None else ""
    return (f"run {holder.get('run_id', '?')} (job {holder.get('job', '?')}, pid {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')}, started {holder.get('started_at', '?')}{beat})")


class RunLock:
    """See the module docstring. ``acquire`` raises ``LockBusy``; ``report`` says what happened."""

    def __init__(self, storage_cfg, name: str, run_id: str, *, job: str, wait_seconds: float = 0.0,
                 stale_seconds: float = 300.0):
        from pipelines.objstore import is_uri

        self.storage, self.name, self.run_id, self.job = storage_cfg, name, run_id, job
        self.wait_seconds, self.stale_seconds = float(wait_seconds), float(stale_seconds)
        root = storage_cfg.uri.rstrip("/")
        self.remote = is_uri(root) and not root.startswith("file://")
        folder = f"{root}/_locks" if self.remote else os.path.join(root.removeprefix("file://"), "_locks")
        self.path = f"{folder}/{name}.lock.json" if self.remote else os.path.join(folder, f"{name}.lock")
        self.folder = folder
        self.info = {"run_id": run_id, "job": job, "pid": os.getpid(), "host": socket.gethostname(),
                     "started_at": _now(), "heartbeat_at": _now(), "state": "held"}
        self.report: dict[str, Any] = {"name": name, "waited_seconds": 0.0, "took_over": None}
        self._fd: int | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    # -- public -------------------------------------------------------------------------
    def acquire(self) -> RunLock:
        start = time.monotonic()
        while True:
            holder = self._try_remote() if self.remote else self._try_local()
            if holder is None:
                break
            waited = time.monotonic() - start
            if waited >= self.wait_seconds:
                raise LockBusy(
                    f"'{self.name}' is being written by {describe(holder)}; this run ({self.run_id}) was refused "
                    f"after waiting {waited:.0f} s so that the two cannot interleave. Let that run finish (or stop "
                    f"it), or set lock.wait_seconds to wait for it. A killed run's lock frees itself"
                    + ("" if not self.remote else f" after lock.stale_seconds={self.stale_seconds:.0f} s"))
            time.sleep(min(POLL_SECONDS, max(0.05, self.wait_seconds - waited)))
        self.report["waited_seconds"] = round(time.monotonic() - start, 2)
        if self.report["took_over"]:
            log.warning("took over the '%s' lock of %s, which ended without releasing it (killed?)", self.name,
                        describe(self.report["took_over"]))
        self._beat = threading.Thread(target=self._heartbeat, name="batchrank-lock", daemon=True)
        self._beat.start()
        return self

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        try:
            if self.remote:
                fs, path = self._fs()
                if (self._read_remote(fs, path) or {}).get("token") == self.info.get("token"):
                    fs.delete_file(path)
            elif self._fd is not None:
                self._write_local({**self.info, "state": "released", "released_at": _now()})
                import fcntl

                fcntl.flock(self._fd, fcntl.LOCK_UN)
                os.close(self._fd)
                self._fd = None
        except Exception as exc:  # noqa: BLE001 - a lock that outlives its run frees itself; never fail the run
            log.warning("could not release the '%s' lock: %s", self.name, exc)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # -- local: flock ---------------------------------------------------------------------
    def _try_local(self) -> dict[str, Any] | None:
        import fcntl

        os.makedirs(self.folder, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return self._read_local() or {"run_id": "unknown (lock file unreadable)"}
        previous = self._read_local(fd)
        if previous and previous.get("state") == "held":
            self.report["took_over"] = previous
        self._fd = fd
        self._write_local(self.info)
        return None

    def _read_local(self, fd: int | None = None) -> dict[str, Any] | None:
        try:
            if fd is None:
                with open(self.path, encoding="utf-8") as fh:
                    text = fh.read()
            else:
                os.lseek(fd, 0, os.SEEK_SET)
                text = os.read(fd, 1 << 16).decode("utf-8", "replace")
            return json.loads(text) if text.strip() else None
        except (OSError, ValueError):
            return None

    def _write_local(self, info: dict[str, Any]) -> None:
        data = json.dumps(info).encode()
        os.lseek(self._fd, 0, os.SEEK_SET)
        os.ftruncate(self._fd, 0)
        os.write(self._fd, data)
        os.fsync(self._fd)

    # -- object store: a lease with heartbeats -------------------------------------------------
    def _fs(self):
        from pipelines.objstore import filesystem

        return filesystem(self.path, self.storage.storage_options)

    @staticmethod
    def _read_remote(fs, path: str) -> dict[str, Any] | None:
        try:
            with fs.open_input_stream(path) as fh:
                return json.loads(fh.read().decode("utf-8"))
        except (FileNotFoundError, OSError, ValueError):
            return None

    def _write_remote(self, fs, path: str, info: dict[str, Any]) -> None:
        with fs.open_output_stream(path) as fh:
            fh.write(json.dumps(info).encode())

    def _try_remote(self) -> dict[str, Any] | None:
        fs, path = self._fs()
        holder = self._read_remote(fs, path)
        if holder is not None:
            age = _age(holder.get("heartbeat_at"))
            if age is not None and age < self.stale_seconds:
                return holder
            self.report["took_over"] = holder
        self.info["token"] = f"{self.run_id}-{os.getpid()}-{time.time_ns()}"
        self._write_remote(fs, path, self.info)
        time.sleep(POLL_SECONDS)  # another run that wrote at the same moment: the last write wins
        now = self._read_remote(fs, path)
        if (now or {}).get("token") != self.info["token"]:
            self.report["took_over"] = None
            return now or {"run_id": "unknown"}
        return None

    def _heartbeat(self) -> None:
        every = max(1.0, self.stale_seconds / 4)
        while not self._stop.wait(every):
            try:
                self.info["heartbeat_at"] = _now()
                if self.remote:
                    fs, path = self._fs()
                    self._write_remote(fs, path, self.info)
                elif self._fd is not None:
                    self._write_local(self.info)
            except Exception as exc:  # noqa: BLE001 - a missed beat is retried; the run goes on
                log.warning("lock heartbeat for '%s' failed: %s", self.name, exc)
