"""Failpoints for crash tests: ``BATCHRANK_FAILPOINTS=before_commit`` makes a run die there.

Named points sit where a real crash would hurt most (mid-run, before and after a commit); tests
set the variable to prove that a failed run leaves the previous table version intact.
``point:hang`` instead prints a line and blocks, so that a test can kill the process for real
(SIGKILL) at exactly that point; ``point:sleep=0.5`` slows every pass through it (a run long enough
to kill a worker in the middle of).

``BATCHRANK_WORK_LOG=<file>`` makes the model stages append one line per model call (``embed <pid> <rows> <unix time>``,
``score <pid> <pairs> <unix time>``), so that a chaos test can count the work a killed run did and a rerun did again.
"""

from __future__ import annotations

import os
import sys
import time


class InjectedFailure(RuntimeError):
    pass


def maybe_fail(point: str) -> None:
    for item in os.environ.get("BATCHRANK_FAILPOINTS", "").split(","):
        name, _, action = item.strip().partition(":")
        if name != point:
            continue
        if action.startswith("sleep="):
            time.sleep(float(action.split("=", 1)[1]))
            return
        if action == "hang":
            sys.stderr.write(f"failpoint '{point}' reached: hanging until killed\n")
            sys.stderr.flush()
            while True:
                time.sleep(3600)
        raise InjectedFailure(f"failpoint '{point}' triggered (BATCHRANK_FAILPOINTS)")


def record(kind: str, rows: int) -> None:
    path = os.environ.get("BATCHRANK_WORK_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as fh:  # one short append per call: whole lines across processes
            fh.write(f"{kind} {os.getpid()} {rows} {time.time():.3f}\n")
