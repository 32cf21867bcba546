"""Failpoints for crash tests: ``BATCHRANK_FAILPOINTS=before_commit`` makes a run die there.

Named points sit where a real crash would hurt most (before and after a commit); tests set
the variable to prove that a failed run leaves the previous table version intact.
"""

from __future__ import annotations

import os


class InjectedFailure(RuntimeError):
    pass


def maybe_fail(point: str) -> None:
    active = {p.strip() for p in os.environ.get("BATCHRANK_FAILPOINTS", "").split(",") if p.strip()}
    if point in active:
        raise InjectedFailure(f"failpoint '{point}' triggered (BATCHRANK_FAILPOINTS)")
