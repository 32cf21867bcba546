"""Failpoints for crash tests: ``BATCHRANK_FAILPOINTS=before_commit`` makes a run die there.

Named points sit where a real crash would hurt most (mid-run, before and after a commit); tests
set the variable to prove that a failed run leaves the previous table version intact.
``point:hang`` instead prints a line and blocks, so that a test can kill the process for real
(SIGKILL) at exactly that point.
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
        if action == "hang":
            sys.stderr.write(f"failpoint '{point}' reached: hanging until killed\n")
            sys.stderr.flush()
            while True:
                time.sleep(3600)
        raise InjectedFailure(f"failpoint '{point}' triggered (BATCHRANK_FAILPOINTS)")
