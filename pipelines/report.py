"""Run reports: progress while a job runs, a short human summary and a JSON report at the end."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

log = logging.getLogger("batchrank")


def new_run_id(job: str) -> str:
    """``<job>-<UTC time>-<6 hex>``: sortable, unique, usable as a LanceDB tag."""
    return f"{job}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


def utcnow() -> datetime:
    return datetime.now(UTC)


class Progress:
    """Progress of a long stage: a tqdm bar on a terminal; elsewhere (Ray job logs, CI) a plain line every
    ``every`` seconds, also while nothing arrives (actors loading models), so a long job never looks hung."""

    def __init__(self, label: str, unit: str = "rows", every: float = 15.0):
        self.label, self.unit, self.every = label, unit, every
        self.count = 0
        self.extra: dict[str, int] = {}
        self.start = time.perf_counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(desc=label, unit=f" {unit}", file=sys.stderr)
        else:
            threading.Thread(target=self._heartbeat, daemon=True).start()

    def update(self, n: int, **extra: int) -> None:
        with self._lock:
            self.count += n
            for k, v in extra.items():
                self.extra[k] = self.extra.get(k, 0) + v
        if self._bar is not None:
            self._bar.update(n)
            if self.extra:
                self._bar.set_postfix(self.extra, refresh=False)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.every):
            self._line()

    def _line(self) -> None:
        with self._lock:
            elapsed = time.perf_counter() - self.start
            rate = self.count / elapsed if elapsed > 0 else 0.0
            extra = "".join(f", {v:,} {k}" for k, v in self.extra.items())
            sys.stderr.write(f"{self.label}: {self.count:,} {self.unit}{extra} "
                             f"[{elapsed:,.0f}s, {rate:,.1f} {self.unit}/s]\n")
            sys.stderr.flush()

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        if self._bar is not None:
            self._bar.close()
        else:
            self._line()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Timer:
    """Named wall-clock sections: ``with timer("commit"): ...`` then ``timer.seconds``."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)


def nodes_line(nodes: dict[str, dict[str, int]], unit: str) -> str | None:
    """``  nodes: embed 2 (10.0.0.5/1a2b3c4d 120, ...)`` when work ran on more than one Ray node, else None."""
    parts = [f"{stage} on {len(counts)} ({', '.join(f'{n} {c:,}' for n, c in counts.items())} {unit})"
             for stage, counts in nodes.items() if len(counts) > 1]
    return "  nodes: " + "; ".join(parts) if parts else None


def firsts_line(report: dict[str, Any]) -> str | None:
    """The run's first events (``Run.mark``) in seconds since the process started, in order: the fixed cost a
    user waits through before the first row comes out."""
    first = {k: v["since_process_start_s"] for k, v in (report.get("first") or {}).items()
             if v.get("since_process_start_s") is not None}
    if not first:
        return None
    ordered = sorted(first.items(), key=lambda kv: kv[1])
    return "  since process start: " + ", ".join(f"{k.replace('_', ' ')} {v:.1f}s" for k, v in ordered)


def redact_uri(uri: str) -> str:
    """Drop credentials from a URI before it is printed or stored (``s3://KEY:SECRET@bucket`` → ``s3://***@bucket``)."""
    from pipelines.store.objstore import redact

    return redact(uri)


def write_report(report: dict[str, Any], folder: str, storage_options: dict[str, str] | None = None) -> str:
    """Write ``<folder>/<run_id>.json`` (local folder or any pyarrow-supported URI, reached with
    ``storage.storage_options``); return its location (without credentials)."""
    body = json.dumps(report, indent=2, default=str, sort_keys=False)
    name = f"{report['run_id']}.json"
    if "://" in folder:
        from pipelines.store.objstore import filesystem

        fs, path = filesystem(folder, storage_options)
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(f"{path.rstrip('/')}/{name}") as out:  # one PUT on S3: whole or absent
            out.write(body.encode())
        return redact_uri(f"{folder.rstrip('/')}/{name}")
    Path(folder).mkdir(parents=True, exist_ok=True)
    target = Path(folder) / name
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(body + "\n", encoding="utf-8")
    os.replace(tmp, target)  # a report is never half-written
    return str(target)


def default_report_dir(storage_uri: str, configured: str | None) -> str:
    return configured or f"{storage_uri.rstrip('/')}/_reports"


def refuse_used_run_id(cfg, run_id: str, tables: tuple[str, ...] = ()) -> None:
    """Before any work: refuse a run id (given by the caller, e.g. ``--run-id``) that an earlier run already used,
    as a report or as a tag on one of ``tables``: its commit would land and then fail on the existing tag, and its
    report would overwrite the earlier one. Raises ``ConfigError`` (exit 2) naming the fix."""
    from pipelines.config import ConfigError

    where = []
    folder = default_report_dir(cfg.storage.uri, cfg.report.dir)
    name = f"{folder.rstrip('/')}/{run_id}.json"
    try:
        if "://" in folder:
            import pyarrow.fs as pafs

            from pipelines.store.objstore import filesystem

            fs, path = filesystem(name, cfg.storage.storage_options)
            exists = fs.get_file_info(path).type != pafs.FileType.NotFound
        else:
            exists = Path(name).exists()
    except OSError:
        exists = False
    if exists:
        where.append(f"its report {redact_uri(name)}")
    if tables:
        from pipelines.store import Store

        store = Store(cfg.storage)
        for table_name in tables:
            if run_id in store.tags(table_name):  # no tags when the table does not exist
                where.append(f"a tag on table '{table_name}'")
    if where:
        raise ConfigError(f"run id {run_id!r} was already used ({', '.join(where)}): a run id names one run's "
                          "report and table tags; give this run a new id (or leave --run-id out for a fresh one). "
                          "Nothing was done")


def save_report(report: dict[str, Any], cfg) -> dict[str, Any]:
    """Write the run report where the config says; a report that cannot be written is logged, never fatal
    (``report_path`` is then None), so that a storage failure still ends with a summary. Credentials (in URIs,
    error messages) are redacted from the report first, in place: neither the file nor the printed summary has them."""
    from pipelines.store.objstore import redact, redact_all

    options = cfg.storage.storage_options
    redact_all(report, options)
    try:
        report["report_path"] = write_report(report, default_report_dir(cfg.storage.uri, cfg.report.dir), options)
    except Exception as exc:  # noqa: BLE001 - whatever broke storage must not hide the run's own outcome
        log.error("could not write the run report: %s", redact(str(exc), options))
        report["report_path"] = None
    return report
