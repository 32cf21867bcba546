"""The run lock (one writer per table) and the safe defaults. No Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipelines.cluster.locks import LockBusy, RunLock
from pipelines.config import parse_config

ROOT = Path(__file__).resolve().parents[1]


def storage(tmp_path):
    return parse_config({"storage": {"uri": str(tmp_path / "db")}}).storage


def test_second_writer_is_refused_naming_the_first(tmp_path):
    with RunLock(storage(tmp_path), "passages", "index-1", job="index"):
        with pytest.raises(LockBusy) as info:
            RunLock(storage(tmp_path), "passages", "index-2", job="index").acquire()
        message = str(info.value)
        assert "run index-1 (job index, pid" in message and "index-2" in message
        assert "lock.wait_seconds" in message
        # another table is another lock
        with RunLock(storage(tmp_path), "rankings", "rerank-1", job="rerank"):
            pass
    with RunLock(storage(tmp_path), "passages", "index-3", job="index") as lock:  # released: free again
        assert lock.report["took_over"] is None
    assert (tmp_path / "db" / "_locks" / "passages.lock").is_file()  # inside the storage root


def test_a_run_refused_while_the_holder_writes_its_record_still_names_it(tmp_path):
    """The holder takes the flock, then writes its record: a run refused in between (seen under load in
    test_chaos::test_two_runs_at_once) reads again rather than name "unknown", and also skips a previous run's
    released record."""
    import fcntl

    first = RunLock(storage(tmp_path), "passages", "index-0", job="index")
    with first:
        pass  # leaves index-0's released record in the file
    holder = RunLock(storage(tmp_path), "passages", "index-1", job="index")
    fd = os.open(holder.path, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held, record not yet written

    def write_later():
        time.sleep(0.3)
        holder._fd = fd
        holder._write_local(holder.info)

    writer = threading.Thread(target=write_later)
    writer.start()
    try:
        with pytest.raises(LockBusy, match="run index-1 \\(job index"):
            RunLock(storage(tmp_path), "passages", "index-2", job="index").acquire()
    finally:
        writer.join()
        os.close(fd)


def test_waiting_writer_gets_the_lock_when_it_is_released(tmp_path):
    first = RunLock(storage(tmp_path), "passages", "index-1", job="index").acquire()
    threading.Timer(0.6, first.release).start()
    start = time.monotonic()
    with RunLock(storage(tmp_path), "passages", "index-2", job="index", wait_seconds=30) as second:
        assert 0.4 < time.monotonic() - start < 10 and second.report["waited_seconds"] > 0.4


def test_a_killed_holders_lock_is_taken_over_at_once(tmp_path):
    """SIGKILL leaves no chance to release: the kernel drops the flock, and the next run says whose it was."""
    code = ("import sys, time; sys.path.insert(0, %r)\n"
            "from pipelines.config import parse_config\nfrom pipelines.cluster.locks import RunLock\n"
            "RunLock(parse_config({'storage': {'uri': %r}}).storage, 'passages', 'index-killed', job='index')"
            ".acquire()\nprint('held', flush=True)\ntime.sleep(600)\n") % (str(ROOT), str(tmp_path / "db"))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        with pytest.raises(LockBusy, match="index-killed"):
            RunLock(storage(tmp_path), "passages", "index-2", job="index").acquire()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    with RunLock(storage(tmp_path), "passages", "index-3", job="index") as lock:
        assert lock.report["took_over"]["run_id"] == "index-killed"
        assert lock.report["took_over"]["pid"] == proc.pid
    assert json.loads((tmp_path / "db" / "_locks" / "passages.lock").read_text())["state"] == "released"


def test_safe_defaults():
    cfg = parse_config({"corpus": {"path": "x.jsonl"}, "query_log": {"path": "q.jsonl"},
                        "rerank": {"model": "some/cross-encoder"}})
    assert cfg.embed.trust_remote_code is False and cfg.rerank.trust_remote_code is False  # no remote code
    assert cfg.query_log.quarantine_raw == "fields"  # bad log lines keep only the fields batchrank reads
    assert cfg.lock.wait_seconds == 0  # a second run is refused at once, not queued silently
    for bad in ("../escape", "a/b", "..", "x y"):
        with pytest.raises(Exception, match="plain table name"):
            parse_config({"storage": {"rankings_table": bad}})
    for number in ("nan", "inf"):
        with pytest.raises(Exception):
            parse_config({"maintenance": {"version_retention_days": float(number)}})
