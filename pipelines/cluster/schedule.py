"""Cron-style schedules of batchrank jobs on a Ray cluster, and the ``runs`` table that records them.

A schedules file (YAML)::

    address: http://127.0.0.1:8265        # the Ray job server (else --address or RAY_ADDRESS)
    runs: {uri: ~/.batchrank/runs}         # LanceDB database of the runs table (s3://... works too)
    schedules:
      - name: nightly
        cron: "30 2 * * *"                 # croniter syntax; a 6th field gives seconds
        timezone: Europe/Berlin
        job: nightly
        config: configs/demo.yaml          # relative to this file

``Scheduler.run`` submits each due occurrence through :mod:`pipelines.cluster.submit`, with these rules:

* never two runs of one schedule at once: an occurrence that falls due while the schedule's previous run
  is still pending or running on the cluster is recorded as ``SKIPPED`` and not submitted;
* after downtime, at most one catch-up: of the occurrences missed since the last recorded one, only the
  latest runs; the record counts the others in ``missed``;
* every occurrence is a row of the ``runs`` table (scheduled time, submission id, status, duration, report
  location; ``schema.RUNS_SCHEMA``), updated as the cluster reports progress. ``batchrank runs`` lists it.

The cron arithmetic (time zones, DST, ranges) is croniter's; nothing here parses cron expressions.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipelines.cluster.submit import TERMINAL, SubmitError
from pipelines.config import validation_message
from pipelines.registry import JOBS
from pipelines.schema import RUNS_SCHEMA

log = logging.getLogger("batchrank.schedule")

ACTIVE = {"SUBMITTED", "PENDING", "RUNNING"}  # a run in one of these blocks its schedule's next occurrence
MAX_COUNTED_MISSES = 100_000

class ScheduleError(ValueError):
    """A schedules file that cannot run; the message names the entry and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunsTable(_Strict):
    uri: str = Field("~/.batchrank/runs", description="LanceDB URI of the database holding the runs table")
    storage_options: dict[str, str] = Field(default_factory=dict)
    table: str = "runs"


class ScheduleEntry(_Strict):
    name: str = Field(..., pattern=r"^[A-Za-z0-9_-]+$")
    cron: str
    timezone: str = "UTC"
    job: str
    config: str
    catch_up: bool = Field(True, description="after downtime, run the latest missed occurrence once")
    pip: bool = Field(True, description="declare the project's dependencies in the job's runtime env")
    extras: list[str] = Field(default_factory=list)

    @field_validator("cron")
    @classmethod
    def _cron(cls, v: str) -> str:
        from croniter import croniter

        if not croniter.is_valid(v):
            raise ValueError("is not a valid cron expression (minute hour day-of-month month day-of-week, and an "
                             "optional 6th field of seconds), e.g. '30 2 * * *' for 02:30 every day")
        return v

    @field_validator("timezone")
    @classmethod
    def _tz(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError("is not an IANA time zone name, e.g. UTC or Europe/Berlin") from None
        return v

    @field_validator("job")
    @classmethod
    def _job(cls, v: str) -> str:
        if v not in JOBS:
            raise ValueError(f"is not a batchrank job; use one of {', '.join(JOBS)}")
        return v


class Schedules(_Strict):
    address: str | None = None
    runs: RunsTable = Field(default_factory=RunsTable)
    poll_seconds: float = Field(5.0, gt=0, description="how often the status of active runs is refreshed")
    schedules: list[ScheduleEntry]

    @model_validator(mode="after")
    def _unique(self) -> Schedules:
        names = [s.name for s in self.schedules]
        if len(set(names)) != len(names):
            raise ValueError("schedule names must be unique")
        return self


def load_schedules(path: str | os.PathLike) -> Schedules:
    """Load and validate a schedules file; config paths resolve against its folder and must exist."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ScheduleError(f"schedules file not found: {p}; pass --config with the path of a YAML file")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
        sched = Schedules.model_validate(data)
    except yaml.YAMLError as exc:
        raise ScheduleError(f"{p}: not valid YAML: {exc}") from None
    except ValidationError as exc:
        raise ScheduleError(validation_message(exc, Schedules, str(p), "schedules file")) from None
    for entry in sched.schedules:
        cfg = Path(os.path.expanduser(entry.config))
        cfg = cfg if cfg.is_absolute() else (p.parent / cfg).resolve()
        if not cfg.is_file():
            raise ScheduleError(f"{p}: schedule {entry.name!r}: config {entry.config!r} not found (looked for {cfg})")
        entry.config = str(cfg)
    if "://" not in sched.runs.uri:
        uri = os.path.expanduser(sched.runs.uri)
        sched.runs.uri = uri if os.path.isabs(uri) else str((p.parent / uri).resolve())
    return sched


def occurrence_id(entry: ScheduleEntry, when: datetime) -> str:
    """Submission id of one occurrence: ``<job>-<schedule>-<YYYYMMDD>`` for schedules that fire at most daily
    (the same id ``batchrank submit`` gives a manual run of that day), with the time added for faster ones."""
    from croniter import croniter

    it = croniter(entry.cron, when)
    step = it.get_next(datetime) - when
    fmt = "%Y%m%d" if step >= timedelta(days=1) else "%Y%m%dT%H%M" if step >= timedelta(minutes=1) else \
        "%Y%m%dT%H%M%S"
    return f"{entry.job}-{entry.name}-{when:{fmt}}"


class RunsLog:
    """The ``runs`` table (``schema.RUNS_SCHEMA``): one row per occurrence, upserted by key."""

    def __init__(self, runs: RunsTable):
        from pipelines.config import StorageConfig
        from pipelines.store import Store

        self.name = runs.table
        self.store = Store(StorageConfig(uri=runs.uri, storage_options=runs.storage_options))
        self.writes = 0

    def rows(self, schedule: str | None = None) -> list[dict[str, Any]]:
        from pipelines.store import sql_strings  # the one quoting of strings in filters (ids use it too)

        where = None
        if schedule is not None:
            if not schedule.isascii() and not _utf8(schedule):
                return []  # a lone surrogate (undecodable command-line bytes): no stored name has one
            where = f"schedule = {sql_strings([schedule])}"
        rows = self.store.scan(self.name, where=where)
        if rows is None:
            return []
        return sorted(rows.to_pylist(), key=lambda r: (r["scheduled_for"], r["key"]))

    def upsert(self, rows: list[dict[str, Any]]) -> None:
        if not rows:
            return
        data = pa.Table.from_pylist([{f: r.get(f) for f in RUNS_SCHEMA.names} for r in rows], RUNS_SCHEMA)
        if self.store.upsert(self.name, data, "key", schema=RUNS_SCHEMA).created:
            return
        self.writes += 1
        if self.writes % 50 == 0:  # a fast schedule writes often: keep the table to a few files
            self.store.optimize(self.name, cleanup_older_than=timedelta(days=1))


@dataclass
class Tick:
    """What one pass of the scheduler did (for logs and tests)."""
    submitted: list[str]
    skipped: list[str]
    updated: int


class Scheduler:
    """Submit due occurrences of every schedule; see the module docstring for the rules."""

    def __init__(self, sched: Schedules, *, address: str | None = None, now=None):
        self.sched = sched
        self.address = address or sched.address
        self.runs = RunsLog(sched.runs)
        self._now = now or (lambda: datetime.now(UTC))
        self._last: dict[str, datetime] = {}
        self._start = self._now()
        for entry in sched.schedules:  # resume after the last recorded occurrence, else start from now
            recorded = self.runs.rows(entry.name)
            if recorded:
                self._last[entry.name] = recorded[-1]["scheduled_for"]

    def due(self, entry: ScheduleEntry, now: datetime) -> tuple[datetime | None, int]:
        """The occurrence to run now (the latest one due) and how many earlier ones it stands for."""
        from croniter import croniter

        tz = ZoneInfo(entry.timezone)
        after = self._last.get(entry.name, self._start).astimezone(tz)
        it = croniter(entry.cron, after)
        first = it.get_next(datetime)
        if first > now:
            return None, 0
        latest, missed = first, 0
        while missed < MAX_COUNTED_MISSES:
            nxt = it.get_next(datetime)
            if nxt > now:
                break
            latest, missed = nxt, missed + 1
        if not entry.catch_up and latest < now - timedelta(seconds=max(self.sched.poll_seconds * 2, 60)):
            return None, missed + 1  # too late to run this one: wait for the next
        return latest, missed

    def refresh(self) -> int:
        """Update the rows of runs that were active with what the cluster says now; return how many changed."""
        from pipelines.cluster import submit

        changed = []
        for row in self.runs.rows():
            if row["status"] not in ACTIVE or not row["submission_id"]:
                continue
            try:
                st = submit.status(self.address, row["submission_id"])
            except SubmitError as exc:
                log.warning("cannot refresh run %s: %s", row["submission_id"], exc)
                continue
            new = {**row, "status": st["status"], "message": (st["message"] or "")[:2000],
                   "started_at": _ts(st["started_at"]), "finished_at": _ts(st["finished_at"]),
                   "duration_s": st["duration_s"]}
            if any(new[k] != row[k] for k in ("status", "started_at", "finished_at")):
                changed.append(new)
                if new["status"] in TERMINAL:
                    log.info("run %s of schedule %s: %s after %ss", row["submission_id"], row["schedule"],
                             new["status"], new["duration_s"])
        self.runs.upsert(changed)
        return len(changed)

    def _active(self, name: str) -> dict[str, Any] | None:
        return next((r for r in reversed(self.runs.rows(name)) if r["status"] in ACTIVE), None)

    def tick(self) -> Tick:
        """One pass: refresh active runs, then submit (or skip) every schedule's due occurrence."""
        from pipelines.cluster import submit

        updated = self.refresh()
        now = self._now()
        done = Tick([], [], updated)
        for entry in self.sched.schedules:
            when, missed = self.due(entry, now)
            if when is None:
                if missed:
                    log.info("schedule %s: %d occurrence(s) missed while down, catch_up is off", entry.name, missed)
                    self._last[entry.name] = now
                continue
            self._last[entry.name] = when
            row = {"key": f"{entry.name}@{when.astimezone(UTC).isoformat()}", "schedule": entry.name,
                   "job": entry.job, "config": entry.config, "scheduled_for": when.astimezone(UTC),
                   "timezone": entry.timezone, "missed": missed, "submitted_at": None}
            running = self._active(entry.name)
            if running is not None:
                row.update(status="SKIPPED", message=f"the previous run {running['submission_id']} is still "
                                                      f"{running['status'].lower()}")
                done.skipped.append(row["key"])
                log.info("schedule %s: %s skipped: %s", entry.name, when.isoformat(), row["message"])
            else:
                try:
                    sub = submit.submit(entry.job, entry.config, address=self.address, pip=entry.pip,
                                        extras=entry.extras, submission_id=occurrence_id(entry, when))
                    row.update(status="SUBMITTED", submission_id=sub.submission_id, run_id=sub.run_id,
                               report=sub.report, submitted_at=datetime.now(UTC),
                               message=f"caught up: {missed} earlier occurrence(s) not run" if missed else "")
                    done.submitted.append(sub.submission_id)
                    log.info("schedule %s: %s submitted as %s", entry.name, when.isoformat(), sub.submission_id)
                except (SubmitError, OSError) as exc:
                    row.update(status="NOT_SUBMITTED", message=str(exc)[:2000])
                    log.error("schedule %s: %s not submitted: %s", entry.name, when.isoformat(), exc)
            self.runs.upsert([row])
        return done

    def next_due(self) -> datetime | None:
        from croniter import croniter

        times = [croniter(e.cron, self._last.get(e.name, self._start).astimezone(ZoneInfo(e.timezone)))
                 .get_next(datetime) for e in self.sched.schedules]
        return min(times) if times else None

    def run(self, *, duration: float | None = None, once: bool = False) -> None:
        """Tick until interrupted (or for ``duration`` seconds); sleep until the next occurrence or refresh."""
        stop_at = None if duration is None else time.monotonic() + duration
        while True:
            self.tick()
            if once or (stop_at is not None and time.monotonic() >= stop_at):
                self.refresh()
                return
            nxt = self.next_due()
            wait = self.sched.poll_seconds if nxt is None else \
                min(self.sched.poll_seconds, max(0.05, (nxt - self._now()).total_seconds()))
            if stop_at is not None:
                wait = min(wait, max(0.0, stop_at - time.monotonic()))
            time.sleep(wait)


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _ts(iso: str | None) -> datetime | None:
    return datetime.fromisoformat(iso).astimezone(UTC) if iso else None


def format_runs(rows: list[dict[str, Any]]) -> str:
    """The runs as a fixed-width table, oldest first."""
    table = [("schedule", "scheduled for", "status", "duration", "submission id", "report / message")]
    for r in rows:
        when = r["scheduled_for"].astimezone(ZoneInfo(r["timezone"] or "UTC")).isoformat(timespec="seconds")
        tail = (r["report"] if r["status"] == "SUCCEEDED" else r["message"] or r["report"]) or ""
        table.append((r["schedule"], when, r["status"], f"{r['duration_s']:.1f}s" if r["duration_s"] is not None
                      else "-", r["submission_id"] or "-",
                      tail + (f" (caught up {r['missed']} missed)" if r["missed"] else "")))
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    return "\n".join("  ".join(cell.rjust(w) if i == 3 else cell.ljust(w) for i, (cell, w) in
                                enumerate(zip(row[:5], widths))) + "  " + row[5] for row in table)
