"""The object-store run lock is exclusive: a lease on the local S3 server (moto, with authentication, from
test_s3) changed only by conditional writes. Issue 17: (a) ``stale_seconds`` bounded from below, (b) staleness
judged without trusting any host's clock, (c) a holder that stalled and lost its lease never writes it again
and learns that it lost it; expiry just below and above the threshold, renewal, and N runs acquiring at once.
Every scenario ends with exactly one holder. No Ray. About 45 s.

moto checks a write's condition and then writes, with no lock between the two (``put_object`` in
``moto/s3/responses.py``), so two conditional writes at the same instant could both pass there (not seen in 30
trials of 8 writers, but nothing rules it out); S3 decides them atomically. So the server here lets one write
to a lock object through at a time, as S3 does.
"""

from __future__ import annotations

import io
import re
import threading
import time
from datetime import datetime, timedelta

import pytest
from test_s3 import AWS_VARS, BUCKET, S3Server

from pipelines.cluster import locks
from pipelines.cluster.locks import LockBusy, LockLost, RunLock
from pipelines.config import ConfigError, parse_config

STALE = 4.0  # s, below the config's floor (RunLock takes it): renewals every 1 s; stale after 4 ± 1 s


class LeaseServer:
    """The S3 server, writes to lock objects atomic (as on S3); ``writes`` records each write to a lock object
    (arrival on this host's monotonic clock, method, path, the run id in the body); ``delays`` holds back the
    next writes by so many seconds."""

    def __init__(self):
        self.s3 = S3Server()
        self.client = self.s3.client
        self.writes: list[tuple[float, str, str, str | None]] = []
        self.delays: list[float] = []
        inner, atomic = self.s3.server.app, threading.Lock()

        def app(environ, start_response):
            if environ["REQUEST_METHOD"] in ("PUT", "DELETE") and "/_locks/" in environ["PATH_INFO"]:
                arrived, length = time.monotonic(), environ.get("CONTENT_LENGTH")
                if length or environ.get("wsgi.input_terminated"):  # (chunked: read to its end)
                    raw = environ["wsgi.input"].read(int(length)) if length else environ["wsgi.input"].read()
                else:
                    raw = b""
                environ["wsgi.input"] = io.BytesIO(raw)
                run = re.search(rb'"run_id": "([^"]+)"', raw)
                self.writes.append((arrived, environ["REQUEST_METHOD"], environ["PATH_INFO"],
                                    run and run.group(1).decode()))
                try:
                    delay = self.delays.pop(0)
                except IndexError:
                    delay = 0.0
                time.sleep(delay)
                with atomic:
                    return list(inner(environ, start_response))
            return inner(environ, start_response)

        self.s3.server.app = app

    def storage(self, prefix: str):
        return parse_config({"storage": {"uri": f"s3://{BUCKET}/lease/{prefix}/db",
                                         "storage_options": self.s3.options()}}).storage

    def lease(self, prefix: str) -> tuple[dict | None, str | None]:
        import json

        try:
            got = self.client.get_object(Bucket=BUCKET, Key=f"lease/{prefix}/db/_locks/passages.lock.json")
        except self.client.exceptions.NoSuchKey:
            return None, None
        return json.loads(got["Body"].read()), got["ETag"]

    def last_write(self, prefix: str) -> float:
        return max(t for t, _, path, _ in self.writes if f"/lease/{prefix}/" in path)

    def writers(self, prefix: str, since: float) -> set[str | None]:
        """The runs that wrote (PUT) the lease since ``since``."""
        return {run for t, method, path, run in self.writes if f"/lease/{prefix}/" in path and t >= since
                and method == "PUT"}


@pytest.fixture(scope="module")
def srv():
    """moto keeps its state per process: start clean and leave it clean (test_s3 creates the same IAM user)."""
    from moto.moto_api._internal.models import moto_api_backend

    with pytest.MonkeyPatch.context() as mp:
        for var in AWS_VARS:
            mp.delenv(var, raising=False)
        moto_api_backend.reset()
        server = LeaseServer()
        yield server
        server.s3.close()
        moto_api_backend.reset()


def lock(st, run_id: str, **kw) -> RunLock:
    return RunLock(st, "passages", run_id, job="index", **{"stale_seconds": STALE, **kw})


def holders(*runs: RunLock) -> list[str]:
    """The runs that still hold the lease (``ensure_held`` passes)."""
    out = []
    for run in runs:
        try:
            run.ensure_held()
            out.append(run.run_id)
        except LockLost:
            pass
    return out


def die(run: RunLock) -> None:
    """The holder stops renewing without releasing (killed, or frozen for good)."""
    run._stop.set()
    run._beat.join(5)


class Stall:
    """Stands in for a holder's stop event: its heartbeat freezes at the next beat until ``resume()``, then beats
    at once and goes on as before."""

    def __init__(self, stop: threading.Event):
        self.stop, self.gate = stop, threading.Event()

    def wait(self, timeout=None) -> bool:
        if not self.gate.is_set():
            self.gate.wait()
            return self.stop.is_set()
        return self.stop.wait(timeout)

    def set(self) -> None:
        self.stop.set()
        self.gate.set()

    def is_set(self) -> bool:
        return self.stop.is_set()

    def resume(self) -> None:
        self.gate.set()


def test_a_stale_seconds_is_bounded_below_and_a_live_lease_is_renewed_never_taken(srv):
    """(a) lock.stale_seconds below the renewal period let a second run take a live lease (0.5 s: 6 of 8 tries).
    The config now refuses anything under 10 s, naming the fix, and RunLock anything under 2 s; at a short
    period a live lease is renewed (a new ETag each time) and eight tries over a whole period never take it."""
    for bad in (0.5, 9.5):
        with pytest.raises(ConfigError, match=r"lock\.stale_seconds must be at least 10 seconds.*set "
                                              r"lock\.stale_seconds to 10 or more"):
            parse_config({"lock": {"stale_seconds": bad}})
    assert parse_config({"lock": {"stale_seconds": 10}}).lock.stale_seconds == 10
    st = srv.storage("a")
    with pytest.raises(ValueError, match="stale_seconds must be at least 2"):
        lock(st, "index-short", stale_seconds=0.5)
    assert lock(st, "index-x", stale_seconds=300).renew_seconds == 2.5  # never slower than a 10 s reader needs

    holder = lock(st, "index-A").acquire()
    start = time.monotonic()
    try:
        etags = set()
        for i in range(8):
            time.sleep(0.5)
            with pytest.raises(LockBusy, match="run index-A"):
                lock(st, f"index-B{i}").acquire()
            lease, etag = srv.lease("a")
            assert lease["run_id"] == "index-A"
            etags.add(etag)
        assert len(etags) >= 3, etags  # renewed every second over 4 s
        assert srv.writers("a", start) <= {"index-A"}  # no other run ever wrote the live lease
        assert holders(holder) == ["index-A"]
    finally:
        holder.release()
    assert srv.lease("a") == (None, None)  # released: deleted


class _SkewedTime:
    def __init__(self, offset: float):
        self.offset = offset

    def time(self) -> float:
        return time.time() + self.offset

    def __getattr__(self, name):
        return getattr(time, name)


def _skewed_datetime(offset: float):
    class Skewed(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.now(tz) + timedelta(seconds=offset)

    return Skewed


def test_b_clock_skew_between_hosts_does_not_matter(srv, monkeypatch):
    """(b) Staleness compared the holder's wall clock with the reader's: a 400 s skew let a second run take a live
    lease. Now only the store's clock counts. Holder 400 s behind and reader 400 s ahead: the live lease is never
    taken, and the refusal gives its age on the store's clock; a reader 400 s behind still takes a dead lease."""
    st = srv.storage("b")
    monkeypatch.setattr(locks, "datetime", _skewed_datetime(-400))  # the holder stamps its heartbeats
    monkeypatch.setattr(locks, "time", _SkewedTime(+400))  # the reader reads its own clock
    holder = lock(st, "index-A").acquire()
    start = time.monotonic()
    try:
        for i in range(6):
            time.sleep(0.5)
            with pytest.raises(LockBusy, match="run index-A") as info:
                lock(st, f"index-B{i}").acquire()
            assert srv.writers("b", start) <= {"index-A"}  # no other run ever wrote the live lease
            age = re.search(r"heartbeat (\d+) s ago", str(info.value))
            assert age and int(age.group(1)) < STALE, str(info.value)  # the store's age, not 400 or 800 s
        monkeypatch.setattr(locks, "datetime", datetime)
        monkeypatch.setattr(locks, "time", _SkewedTime(-400))  # now the reader's clock is 400 s behind
        time.sleep(1.0)  # the holder renews with true stamps, then dies
        die(holder)
        with lock(st, "index-C", wait_seconds=8) as taker:
            assert taker.report["took_over"]["run_id"] == "index-A"
            assert taker.report["waited_seconds"] < STALE + 2.5
            assert holders(holder, taker) == ["index-C"]
    finally:
        holder.release()
    assert srv.lease("b") == (None, None)


def test_c_a_stalled_holder_that_lost_its_lease_never_writes_it_again(srv):
    """(c) Run A stalled past stale_seconds and B took the lease; A's next beat overwrote B's lease, A's release
    deleted it, and C acquired while B ran. Now A's beat is a conditional write that fails: A stops renewing,
    ensure_held() raises LockLost naming B, A's release leaves B's lease alone, C is refused naming B."""
    st = srv.storage("c")
    a = lock(st, "index-A").acquire()
    stall = Stall(a._stop)
    a._stop = stall  # A's heartbeat freezes (swap, GC, a frozen VM)
    b = lock(st, "index-B", wait_seconds=10).acquire()  # takes it once A's lease is stale on the store's clock
    try:
        assert b.report["took_over"]["run_id"] == "index-A"
        stall.resume()  # A wakes up and beats at once
        time.sleep(1.0)
        lease, _ = srv.lease("c")
        assert lease["run_id"] == "index-B", lease  # A did not overwrite B's lease
        with pytest.raises(LockLost, match=r"index-A\) lost the 'passages' lock to run index-B .*stops before "
                                           r"committing.*lock\.stale_seconds"):
            a.ensure_held()
        a.release()
        assert srv.lease("c")[0]["run_id"] == "index-B"  # A's release did not delete it
        with pytest.raises(LockBusy, match="run index-B"):
            lock(st, "index-C").acquire()
        time.sleep(1.0)
        assert srv.lease("c")[0]["run_id"] == "index-B"  # and A never wrote again
        assert holders(a, b) == ["index-B"]
    finally:
        a.release()
        b.release()
    assert srv.lease("c") == (None, None)


def test_expiry_just_below_and_just_above_the_threshold(srv):
    """A dead holder's lease, tried every 0.2 s: refused while its age on the store's clock (whole seconds, the
    age each refusal reports) is below stale_seconds, up to stale_seconds - 1; taken as soon as it reaches
    stale_seconds; in real time never before stale_seconds - 1 s after the last renewal."""
    st = srv.storage("t")
    holder = lock(st, "index-A").acquire()
    try:
        time.sleep(1.5)
        die(holder)
        last, ages, deadline = srv.last_write("t"), [], time.monotonic() + 3 * STALE
        while True:
            try:
                taker = lock(st, "index-B").acquire()
                break
            except LockBusy as exc:
                ages.append(int(re.search(r"heartbeat (\d+) s ago", str(exc)).group(1)))
            assert time.monotonic() < deadline, ages
            time.sleep(0.2)
        took = time.monotonic() - last
        try:
            assert taker.report["took_over"]["run_id"] == "index-A"
            assert taker.report["took_over"]["age_seconds"] >= STALE  # just above: taken once stale
            assert max(ages) < STALE and max(ages) >= STALE - 2, ages  # just below: refused while live
            assert ages == sorted(ages) and took >= STALE - 1, (ages, took)
            assert holders(holder, taker) == ["index-B"]
        finally:
            taker.release()
    finally:
        holder.release()
    assert srv.lease("t") == (None, None)


def _race(st, names: list[str], srv) -> tuple[list[RunLock], list[str]]:
    """All of ``names`` acquire at once; each one's write is held back 0.6 s more than the previous one's (so a
    write-then-read-back lease would see every run's own write)."""
    srv.delays[:] = [0.3 + 0.6 * i for i in range(len(names))]
    runs = [lock(st, n) for n in names]
    won, refused, barrier = [], [], threading.Barrier(len(runs))

    def go(run):
        barrier.wait()
        try:
            run.acquire()
            won.append(run)
        except LockBusy as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=go, args=(r,)) for r in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    srv.delays.clear()
    return won, refused


def test_n_runs_acquiring_at_once_exactly_one_holds(srv):
    """Five runs take a free lease at once, then five take over a dead holder's stale lease at once: each time
    exactly one wins, and the others are refused naming it."""
    st = srv.storage("n")
    won, refused = _race(st, [f"index-{i}" for i in range(5)], srv)
    try:
        assert len(won) == 1 and len(refused) == 4, [w.run_id for w in won]
        first = won[0]
        assert all(f"run {first.run_id} " in m for m in refused), refused
        assert srv.lease("n")[0]["run_id"] == first.run_id
        die(first)
        time.sleep(max(0.0, srv.last_write("n") + STALE + 1.2 - time.monotonic()))
        won2, refused2 = _race(st, [f"index-take-{i}" for i in range(5)], srv)
        try:
            assert len(won2) == 1 and len(refused2) == 4, [w.run_id for w in won2]
            assert won2[0].report["took_over"]["run_id"] == first.run_id
            assert all(f"run {won2[0].run_id} " in m for m in refused2), refused2
            assert holders(first, *won2) == [won2[0].run_id]
        finally:
            first.release()  # the dead holder's release leaves the new holder's lease alone
            assert srv.lease("n")[0]["run_id"] == won2[0].run_id
            for w in won2:
                w.release()
    finally:
        for w in won:
            w.release()
    assert srv.lease("n") == (None, None)
