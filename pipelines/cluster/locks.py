"""One writer per table: a run lock that names its holder, and that a killed run cannot leave behind.

Two runs that write the same table (a colleague starts tonight's index job by hand while the scheduled one
runs) must not interleave: the second waits up to ``lock.wait_seconds`` and is then refused with a message
naming the running one (run id, job, host, pid, start time, last heartbeat).

* **Local storage** (a folder, or a mounted file system): ``<storage.uri>/_locks/<table>.lock``, held with
  ``fcntl.flock``. The kernel releases it the moment its process dies, however it dies (SIGKILL, OOM, a
  reboot), so a killed run never blocks the next night. The file keeps the last holder's details: a lock
  found in state ``held`` but not locked is a killed run's, and the next run reports that it took over.
* **S3** (``s3://``, AWS or an S3-compatible store that honours conditional writes): no file locks there, so
  ``<storage.uri>/_locks/<table>.lock.json`` is a lease, changed only by compare-and-swap (boto3; pyarrow
  cannot send the conditions). Every write carries a token unique to the run, so every version has its own
  ETag:

  - *taking* it: ``PUT If-None-Match: *`` when there is none; a stale one is replaced with ``PUT If-Match:
    <the ETag read>``. Of any number of runs trying at once, exactly one write succeeds; the others get 412
    and are refused (or wait) naming the winner.
  - *renewing* it (the heartbeat, every ``stale_seconds / 4``, at most 2.5 s apart): ``PUT If-Match: <this
    run's last ETag>``. A 412 means another run has taken the lease (this one stalled past
    ``stale_seconds``): the heartbeat stops, nothing is written again, and ``ensure_held()`` raises
    ``LockLost`` naming the new holder. A write that succeeded although its answer was lost is recognised by
    the token, not mistaken for a loss.
  - *releasing* it: ``DELETE If-Match: <this run's ETag>``, once a read shows the lease is still this run's; a
    lease that has changed hands is left alone. (AWS S3 has honoured these conditions on PUT since 2024 and on
    DELETE in general-purpose buckets since September 2025.)
  - *staleness* is judged on the store's clock only: the age of a lease is the ``Date`` of the answer that
    returned it minus its ``Last-Modified``, both stamped by the store. No host's wall clock is compared with
    another's, so clock skew between hosts (or between a host and the store) does not matter. (Timing an
    unchanged ETag on the reader's own monotonic clock would ignore skew too, but a reader could then take over
    a killed run's lease only after watching it for ``stale_seconds``: with ``lock.wait_seconds: 0`` the next
    runs would be refused for ever. It is the fallback for a store that sends no ``Date``.) Both stamps
    have whole-second resolution: a lease renewed less than ``stale_seconds - 1`` s ago is always live, one
    not renewed for ``stale_seconds + 1`` s always stale (in between it depends on where the seconds fall).
    With the config's floor of ``lock.stale_seconds >= 10`` and renewals at most 2.5 s apart, a live holder
    has more than 6 s of slack for a slow store or a short stall, whatever stale_seconds another run uses.

  **Guaranteed:** at most one run holds the lease at any moment (the conditional writes decide; the store
  being S3, or one that decides them atomically as S3 does); a run that lost it never writes or deletes the lease
  again; and when a holder's ``ensure_held()`` returns it has just renewed the lease, so no other run can take
  it within the next ``stale_seconds - 1`` s of the store's clock (the smallest ``lock.stale_seconds`` the runs
  on this table use). The jobs call ``ensure_held()`` right before their commit: a run that stalled past
  ``stale_seconds`` (GC, swap, a frozen VM, a network partition) and lost the lease stops there with
  ``LockLost`` instead of committing beside the new holder. Not covered: a stall longer than that between
  ``ensure_held()`` and the commit itself (the Lance commit is still atomic, so even then the table is never
  corrupt: the worst case is two complete runs). A killed holder's lease is taken over ``stale_seconds`` (±1 s)
  after its last renewal; local locks, above, at once.
* Other object stores (``gs://``, ``az://``, ...) are refused: batchrank sends conditional writes to S3 only,
  and a lease without them is not exclusive. Use ``s3://`` or a local or mounted path for ``storage.uri``.

Example::

    with RunLock(cfg.storage, "passages", run_id, job="index", wait_seconds=0) as lock:
        ...  # write passages
        lock.ensure_held()  # raises LockLost if another run has taken the lease
        ...  # commit
    lock.report  # {"name": "passages", "waited_seconds": 0.0, "took_over": None}
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any

log = logging.getLogger(__name__)
POLL_SECONDS = 0.5
MIN_STALE_SECONDS = 10.0  # lock.stale_seconds' floor in the config
HARD_MIN_STALE_SECONDS = 2.0  # RunLock's own floor (tests use 2-3 s): one beat plus the store clock's 1 s resolution
MAX_RENEW_SECONDS = MIN_STALE_SECONDS / 4  # so that a run with the smallest stale_seconds never takes a live lease


class LockBusy(RuntimeError):
    """Another live run holds the lock; the message names it and the fix."""


class LockLost(RuntimeError):
    """This run's object-store lease was taken over by another run (it stalled past ``lock.stale_seconds``); the
    message names that run and the fix. Raised by ``RunLock.ensure_held``."""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _age(stamp: str | None) -> float | None:
    try:
        return time.time() - datetime.fromisoformat(stamp).timestamp()
    except (TypeError, ValueError):
        return None


def describe(holder: dict[str, Any]) -> str:
    """'run index-... (job index, pid 123 on host-a, started 2026-..., heartbeat 3 s ago)'. On an object store
    the heartbeat's age is the store's (``age_seconds``), not this host's clock against the holder's."""
    age = holder.get("age_seconds")
    age = _age(holder.get("heartbeat_at")) if age is None else age
    beat = f", heartbeat {age:.0f} s ago" if age is not None else ""
    return (f"run {holder.get('run_id', '?')} (job {holder.get('job', '?')}, pid {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')}, started {holder.get('started_at', '?')}{beat})")


class RunLock:
    """See the module docstring. ``acquire`` raises ``LockBusy``; ``ensure_held`` raises ``LockLost``; ``report``
    says what happened. ``stale_seconds`` below the config's floor (10 s) is for tests only."""

    def __init__(self, storage_cfg, name: str, run_id: str, *, job: str, wait_seconds: float = 0.0,
                 stale_seconds: float = 300.0):
        from pipelines.store.objstore import is_uri

        if not float(stale_seconds) >= HARD_MIN_STALE_SECONDS:
            raise ValueError(f"stale_seconds must be at least {HARD_MIN_STALE_SECONDS:.0f} s (got {stale_seconds}): "
                             f"a shorter lease can be taken while its holder is alive; set lock.stale_seconds to "
                             f"{MIN_STALE_SECONDS:.0f} or more")
        self.storage, self.name, self.run_id, self.job = storage_cfg, name, run_id, job
        self.wait_seconds, self.stale_seconds = float(wait_seconds), float(stale_seconds)
        root = storage_cfg.uri.rstrip("/")
        self.remote = is_uri(root) and not root.startswith("file://")
        folder = f"{root}/_locks" if self.remote else os.path.join(root.removeprefix("file://"), "_locks")
        self.path = f"{folder}/{name}.lock.json" if self.remote else os.path.join(folder, f"{name}.lock")
        self.folder = folder
        # a remote lease is renewed at most MAX_RENEW_SECONDS apart whatever stale_seconds (another run may use less)
        self.renew_seconds = min(self.stale_seconds / 4, MAX_RENEW_SECONDS) if self.remote else self.stale_seconds / 4
        self.info = {"run_id": run_id, "job": job, "pid": os.getpid(), "host": socket.gethostname(),
                     "started_at": _now(), "heartbeat_at": _now(), "state": "held"}
        self.report: dict[str, Any] = {"name": name, "waited_seconds": 0.0, "took_over": None}
        self._fd: int | None = None
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        # object store: the client, this run's current ETag, the holder that took the lease from this run
        self._s3 = None
        self._etag: str | None = None
        self._lost: dict[str, Any] | None = None
        self._mutex = threading.Lock()  # one conditional write at a time (heartbeat, ensure_held, release)
        self._first_seen: dict[str, float] = {}  # ETag -> this host's monotonic time (stores without a Date)

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

    def ensure_held(self) -> None:
        """Raise ``LockLost`` unless this run still holds the lock. On an object store this renews the lease (a
        conditional write), so when it returns no other run can take the lease for ``lock.stale_seconds - 1`` s
        of the store's clock: call it right before a commit. Other store errors propagate (the run cannot prove
        that it holds the lease, so it must not commit)."""
        if self.remote and self._renew():
            return
        if self._lost is not None:
            raise LockLost(self._lost_message())
        if self.remote or self._fd is None:
            raise LockLost(f"this run ({self.run_id}) does not hold the '{self.name}' lock (not acquired, or "
                           f"released)")

    @property
    def lost(self) -> dict[str, Any] | None:
        """The holder that took this run's lease (object stores), else None."""
        return self._lost

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
        try:
            if self.remote:
                self._release_remote()
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
            return self._holder_record()
        previous = self._read_local(fd)
        if previous and previous.get("state") == "held":
            self.report["took_over"] = previous
        self._fd = fd
        self._write_local(self.info)
        return None

    def _holder_record(self, patience: float = 1.0) -> dict[str, Any]:
        """The record of the run holding the flock. It writes it right after taking the lock, so a run refused in
        between reads an empty file (or the previous run's released record): read again for up to ``patience``
        seconds rather than name nobody."""
        deadline = time.monotonic() + patience
        while True:
            holder = self._read_local()
            if holder and holder.get("state") == "held":
                return holder
            if time.monotonic() >= deadline:
                return holder or {"run_id": "unknown (lock file unreadable)"}
            time.sleep(0.02)

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

    # -- S3: a lease changed only by compare-and-swap ----------------------------------------
    def _client(self):
        """(boto3 client, bucket, key), made once per lock (boto3 clients are thread-safe)."""
        if self._s3 is None:
            from pipelines.store.objstore import is_s3, s3_client

            if not is_s3(self.path):
                raise RuntimeError(
                    f"the run lock on '{self.path.split('://', 1)[0]}://' is not supported: an exclusive lease "
                    f"needs conditional writes, which batchrank sends to S3 only. Use an s3:// storage.uri (AWS "
                    f"S3 or an S3-compatible store that honours If-Match / If-None-Match) or a local or mounted "
                    f"path")
            self._s3 = s3_client(self.path, self.storage.storage_options)
        return self._s3

    def _read(self) -> tuple[dict[str, Any] | None, str | None]:
        """(the lease with ``age_seconds`` on the store's clock, its ETag), or (None, None) when there is none."""
        client, bucket, key = self._client()
        try:
            got = client.get_object(Bucket=bucket, Key=key)
        except client.exceptions.NoSuchKey:
            return None, None
        etag, body = got["ETag"], got["Body"].read()
        try:
            holder = json.loads(body.decode("utf-8"))
            holder = holder if isinstance(holder, dict) else {"run_id": "unknown (lease unreadable)"}
        except ValueError:
            holder = {"run_id": "unknown (lease unreadable)"}
        date = got["ResponseMetadata"].get("HTTPHeaders", {}).get("date")
        try:
            age = (parsedate_to_datetime(date) - got["LastModified"]).total_seconds()
        except (TypeError, ValueError):  # no Date from this store: how long this host has seen this version
            age = time.monotonic() - self._first_seen.setdefault(etag, time.monotonic())
        holder["age_seconds"] = max(0.0, age)
        return holder, etag

    def _put(self, **condition) -> str | None:
        """Write this run's lease under ``condition`` (IfNoneMatch / IfMatch); its new ETag, or None on 412/404."""
        from botocore.exceptions import ClientError

        client, bucket, key = self._client()
        body = json.dumps({**self.info, "stale_seconds": self.stale_seconds,
                           "renew_seconds": self.renew_seconds}).encode()
        try:
            return client.put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/json",
                                     **condition)["ETag"]
        except ClientError as exc:
            if _precondition_failed(exc):
                return None
            raise

    def _mine(self) -> tuple[dict[str, Any] | None, str | None]:
        """After a failed condition: the lease now, and its ETag if it is this run's own write (a write that
        succeeded but whose answer was lost, and was retried)."""
        holder, etag = self._read()
        return holder, (etag if holder is not None and holder.get("token") == self.info["token"] else None)

    def _try_remote(self) -> dict[str, Any] | None:
        self.info["token"] = f"{self.run_id}-{uuid.uuid4().hex}"
        for _ in range(3):  # the lease changed between reading and writing: look again
            holder, etag = self._read()
            if holder is not None and holder["age_seconds"] < self.stale_seconds:
                return holder
            self._etag = self._put(IfMatch=etag) if etag else self._put(IfNoneMatch="*")
            if self._etag is None:
                now, self._etag = self._mine()
                if self._etag is None:
                    if now is not None and now["age_seconds"] < self.stale_seconds:
                        return now  # another run won
                    continue
            self.report["took_over"] = holder
            return None
        return {"run_id": "unknown (the lease changed hands while this run tried to take it)"}

    def _renew(self) -> bool:
        """Renew this run's lease; False when this run does not hold it (lost: then it never writes it again)."""
        with self._mutex:
            if self._lost is not None or self._etag is None:
                return False
            self.info["heartbeat_at"] = _now()
            for _ in range(3):
                etag = self._put(IfMatch=self._etag)
                if etag is None:
                    now, etag = self._mine()
                    if etag is None:
                        self._lost, self._etag = now or {"run_id": "unknown (the lease was deleted)"}, None
                        log.error("%s", self._lost_message())
                        return False
                    if etag == self._etag:  # still this run's, but the write did not happen (409): again
                        continue
                self._etag = etag
                return True
            raise RuntimeError(f"could not renew the '{self.name}' lease: the store kept refusing the write (409)")

    def _lost_message(self) -> str:
        return (f"this run ({self.run_id}) lost the '{self.name}' lock to {describe(self._lost or {})}: it did not "
                f"renew its lease for lock.stale_seconds={self.stale_seconds:.0f} s (a stall: swap, GC, a frozen VM "
                f"or the network), so the lease was taken over. It stops before committing so that two runs never "
                f"write '{self.name}' together; rerun it once that run has finished, and raise lock.stale_seconds "
                f"if stalls this long are expected")

    def _release_remote(self) -> None:
        from botocore.exceptions import ClientError

        with self._mutex:
            etag, self._etag = self._etag, None
            if etag is None or self._lost is not None:
                return
            client, bucket, key = self._client()
            for _ in range(2):
                # read first too: a store that ignored If-Match on DELETE still never deletes another run's lease
                now, mine = self._mine()
                if mine is None:
                    if now is not None:  # not ours any more: leave it to its holder
                        log.warning("did not release the '%s' lock: it is held by %s", self.name, describe(now))
                    return
                try:
                    client.delete_object(Bucket=bucket, Key=key, IfMatch=mine)
                    return
                except ClientError as exc:
                    if not _precondition_failed(exc):
                        raise

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.renew_seconds):
            try:
                if self.remote:
                    if not self._renew():
                        return  # lost: never write the lease again; ensure_held() raises LockLost
                elif self._fd is not None:
                    self.info["heartbeat_at"] = _now()
                    self._write_local(self.info)
            except Exception as exc:  # noqa: BLE001 - a missed beat is retried; the run goes on
                log.warning("lock heartbeat for '%s' failed: %s", self.name, exc)


def _precondition_failed(exc) -> bool:
    """A conditional write that did not hold: 412, or 404 (If-Match on a lease that was deleted), or 409 (S3: a
    concurrent conditional write)."""
    code = exc.response.get("Error", {}).get("Code")
    if code:
        return code in ("PreconditionFailed", "NoSuchKey", "ConditionalRequestConflict")
    return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in (404, 409, 412)
