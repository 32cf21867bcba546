"""The run protocol every job follows, in one place.

Reads top to bottom::

    start()     the section check, the run id (a caller's id refused when an earlier run used it), the report
    guarded()   the job's body, holding the table's lock when it writes one; on any failure the report gets
                status failed (refused when another run holds the lock) and the error, is finished and saved,
                is attached to the exception (``exc.batchrank_report``) and the error raised again
    run_job()   what the CLI and ``python -m jobs.<job>`` call: load the config, run, print the summary;
                exit code 0 on success, 1 on a failed run (previous table versions intact), 2 on a config error

Example::

    run = runs.start(cfg, "index", sections=("corpus",), command="batchrank index", run_id=run_id, save=save,
                     tables=(cfg.storage.passages_table,))
    return runs.guarded(run, cfg, body=lambda: _index(cfg, state), finish=lambda: _finish(cfg, state),
                        lock_table=cfg.storage.passages_table)
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.report import Timer, new_run_id, refuse_used_run_id, save_report, utcnow

log = logging.getLogger("batchrank")


@dataclass
class Run:
    """One run of a job: its id, the report being built, the stage timer, and the lock once held."""

    job: str
    run_id: str
    save: bool
    report: dict[str, Any]
    timer: Timer = field(default_factory=Timer)
    t0: float = field(default_factory=time.perf_counter)
    lock: Any = None  # the table's RunLock while the body runs (checked right before a commit)

    def elapsed(self) -> float:
        return round(time.perf_counter() - self.t0, 3)

    def mark(self, event: str) -> None:
        """The first time ``event`` happens in this run (``ray_up``, ``first_embedded_row``, ``first_scored_pair``):
        seconds since the process started (what a user waits for, Python's and the imports' start-up included) and
        since the run started, in the report's ``first``. Later calls keep the first."""
        first = self.report.setdefault("first", {})
        if event not in first:
            first[event] = {"since_process_start_s": since_process_start(), "since_run_start_s": self.elapsed()}


def since_process_start() -> float | None:
    """Seconds since this process started (None where the OS does not say)."""
    try:
        import psutil

        return round(time.time() - psutil.Process().create_time(), 2)
    except Exception:  # noqa: BLE001 - a figure for the report, never a failure
        return None


def start(cfg, job: str, *, sections: tuple[str, ...], command: str, run_id: str | None = None, save: bool = True,
          tables: tuple[str, ...] = (), **fields: Any) -> Run:
    """Check the config has the job's sections, refuse a caller's run id an earlier run used (as a report or a tag
    on one of ``tables``), and open the report (``fields`` are added to it)."""
    cfg.require(*sections, command=command)
    if run_id is not None and save and tables:  # a caller's id (a nightly checks its own once, for both tables)
        refuse_used_run_id(cfg, run_id, tables)
    run_id = run_id or new_run_id(job)
    report = {"job": job, "run_id": run_id, "status": "running", "started_at": utcnow().isoformat(), **fields}
    return Run(job=job, run_id=run_id, save=save, report=report)


def guarded(run: Run, cfg, *, body: Callable[[], None], finish: Callable[[], dict[str, Any]],
            lock_table: str | None = None, cleanup: Callable[[], None] | None = None,
            after: Callable[[], None] | None = None,
            on_saved: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run ``body`` (holding ``lock_table``'s lock when given), then ``after`` (outside the lock: upkeep that must
    not hold other runs back); return the finished report, saved unless the run says not to. ``cleanup`` runs
    once the body ended, however it ended; ``on_saved`` gets the saved report (it knows its ``report_path``). A
    failure finishes and saves the report, attaches it to the exception (the CLI prints its summary) and raises
    again."""
    try:
        if lock_table is None:
            body()
        else:
            from pipelines.cluster.locks import RunLock

            lock = RunLock(cfg.storage, lock_table, run.run_id, job=run.job, wait_seconds=cfg.lock.wait_seconds,
                           stale_seconds=cfg.lock.stale_seconds)
            with lock:
                run.report["lock"] = lock.report
                run.lock = lock
                body()
    except BaseException as exc:
        from pipelines.cluster.locks import LockBusy

        refused = isinstance(exc, LockBusy) and lock_table is not None  # this run's own lock, held by another run
        run.report.update(status="refused" if refused else "failed",
                          error=f"{type(exc).__name__}: {exc}")
        exc.batchrank_report = _saved(run, cfg, finish(), on_saved)
        raise
    finally:
        if cleanup is not None:
            cleanup()
    if after is not None:
        after()
    return _saved(run, cfg, finish(), on_saved)


def _saved(run: Run, cfg, report: dict[str, Any], on_saved=None) -> dict[str, Any]:
    report = save_report(report, cfg) if run.save else report
    if on_saved is not None:
        on_saved(report)
    return report


def setup_logging(verbose: bool = False) -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("ray", "ray.data", "sentence_transformers", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_job(name: str, config: Path, verbose: bool = False, **options: Any) -> int:
    """Shared by the CLI and ``python -m jobs.<job>``: run one job (a name of ``registry.JOBS``), print its
    summary; exit code 0 on success, 1 on a failed run (the previous table versions are intact), 2 on a config
    error."""
    import importlib

    from pipelines.config import ConfigError, load_config
    from pipelines.registry import job

    spec = job(name)
    setup_logging(verbose)
    try:
        cfg = load_config(config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    module = importlib.import_module(spec.module)
    try:
        if options.get("run_id") and not spec.tagged_tables:  # the others check their tables' tags too
            refuse_used_run_id(cfg, options["run_id"])
        report = module.run(cfg, **options)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        log.debug("%s run failed", name, exc_info=True)
        report = getattr(exc, "batchrank_report", None)
        if report is not None:
            print(module.summary(report), file=sys.stderr)
        print(f"error: {spec.name} run failed: {exc}", file=sys.stderr)
        return 1
    print(module.summary(report), flush=True)
    return 0


def job_main(name: str, argv: list[str] | None = None) -> int:
    """``python -m jobs.<entry> --config FILE``: the entrypoint given to ``ray job submit``."""
    import argparse
    import re

    from pipelines.registry import job

    spec = job(name)
    parser = argparse.ArgumentParser(prog=f"python -m jobs.{spec.entry}")
    parser.add_argument("--config", "-c", required=True, type=Path, help="YAML config of the job")
    parser.add_argument("--verbose", "-v", action="store_true")
    parser.add_argument("--run-id", help="the run id (table tags, report name); `batchrank submit` sets it")
    if spec.trains:
        parser.add_argument("--force", action="store_true", help="retrain even if an up-to-date model exists")
    args = parser.parse_args(argv)
    options: dict[str, Any] = {"force": args.force} if spec.trains else {}
    if args.run_id:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}", args.run_id):
            parser.error(f"--run-id {args.run_id!r}: use letters, digits, '_', '.' and '-' (it names table tags)")
        options["run_id"] = args.run_id
    return run_job(name, args.config, args.verbose, **options)
