"""What every part of the store shares: its error, the quoting of strings in filters, batchrank's run tags.

* ``StoreError``: a storage state a job must not write over; the message says what to do.
* ``sql_strings``: the one quoting of user or corpus values in a LanceDB filter.
* ``run_tag_time``: when batchrank made a run tag (``<job>-<UTC time>-<hex>``, or a ``lease-`` on one).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

LEASE_PREFIX = "lease-"
_RUN_TAG = re.compile(r"^(?:lease-)?[a-z][a-z_-]*-(\d{8}T\d{6}Z)-[0-9a-f]{6}$")
# a run id batchrank generated (``new_run_id``), by the jobs that stage: matched whole, never as a prefix
RUN_ID_PATTERN = r"(?:index|rerank|nightly|eval)-\d{8}T\d{6}Z-[0-9a-f]{6}"


class StoreError(RuntimeError):
    """A storage state that the job must not write over; the message says what to do."""


def sql_strings(values) -> str:
    """SQL string literals for a filter (``id IN (...)``): every value a user or a corpus supplies goes through
    here, so that quotes, backslashes and NUL stay data (LanceDB filters are DataFusion SQL: '' escapes ')."""
    return ", ".join("'" + v.replace("'", "''") + "'" for v in values)


def run_tag_time(tag: str) -> datetime | None:
    """When batchrank made a run tag (``<job>-<UTC time>-<hex>`` or a lease on one); None for any other tag."""
    m = _RUN_TAG.match(tag)
    return datetime.strptime(m.group(1), "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC) if m else None
