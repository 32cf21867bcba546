"""Submitting batchrank jobs to a Ray cluster through Ray's job submission API (what ``ray job submit`` uses).

A submission is ``python -m jobs.<job> --config <config> --run-id <run id>`` run in a runtime environment
built from the project: its folder as the working dir (``.git``, virtual environments, caches, local
tables and datasets the config does not read are excluded, so uploads stay small), the project's
dependencies declared as ``pip`` packages (the core, plus the optional groups the job needs and those asked
for; installed on top of the cluster's environment: packages the cluster already has are not installed
again), and the worker environment variables batchrank sets.

The default submission id is ``<job>-<config name>-<YYYYMMDD>``: a second submission of the same night's
run is refused by the cluster, unless forced (the id then gets a ``-2``, ``-3``, ... suffix).

Example::

    sub = submit("nightly", "configs/demo.yaml", address="http://127.0.0.1:8265")
    sub.submission_id   # 'nightly-demo-20261130'
    wait(sub.address, sub.submission_id)
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
import time
import tomllib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pipelines.cluster.runtime import CREDENTIAL_ENV  # never sent in a job's runtime_env
from pipelines.registry import JOBS

log = logging.getLogger("batchrank.submit")

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# Never part of a job's upload (gitignore syntax, relative to the project folder). Ray also applies the
# project's .gitignore and .rayignore.
EXCLUDES = [
    ".git", ".venv", "venv", ".env", "env", "**/__pycache__", "*.pyc", ".pytest_cache", ".mypy_cache",
    ".ruff_cache", ".ipynb_checkpoints", ".batchrank", "*.egg-info", "build", "dist", "*.lance", "lancedb",
    "eval-report", "benchmarks/results", "models",
]
DATA_DIRS = ("data",)  # dataset folders: only what the config reads from them is uploaded
METADATA_PREFIX = "batchrank_"
AGENT_RETRIES = 6  # "No available agent to submit job": the head's job agent is not up yet (about a minute)


class SubmitError(RuntimeError):
    """A submission that cannot go ahead; the message says why and what to do."""


@dataclass
class Submission:
    submission_id: str
    job: str
    address: str | None
    entrypoint: str
    run_id: str
    report: str | None  # where the job's run report will be written
    runtime_env: dict[str, Any] = field(repr=False)
    upload: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)


def client(address: str | None):
    """A job submission client for ``address`` (else ``RAY_API_SERVER_ADDRESS`` / ``RAY_ADDRESS``, as Ray's
    own CLI resolves it). Connection errors name the fix."""
    from ray.job_submission import JobSubmissionClient

    _quiet_ray()
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise SubmitError("no cluster address: pass --address http://<head>:8265 (the Ray dashboard; through "
                          "`ray dashboard cluster.yaml` it is http://127.0.0.1:8265) or set RAY_ADDRESS")
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise SubmitError(f"cannot reach the Ray job server at {address}: {exc}; is the cluster up (`ray status`) "
                          "and is this the dashboard address (port 8265)?") from None


def _quiet_ray() -> None:
    """Keep Ray's packaging chatter (a line per ignored file) out of the submitter's output: Ray sets its loggers'
    levels when imported, so they are lowered here, after the import."""
    for name in list(logging.root.manager.loggerDict):
        if name == "ray" or name.startswith("ray."):
            logging.getLogger(name).setLevel(logging.WARNING)
    # Ray notes that it now skips .git and .venv by default; batchrank excludes them (and more) anyway.
    logging.getLogger("ray._private.runtime_env.working_dir").setLevel(logging.ERROR)


def project_root(start: Path | None = None) -> Path:
    """The batchrank project folder: the one holding ``pyproject.toml`` and ``jobs/`` (this checkout)."""
    for folder in [p for s in (start, Path.cwd(), Path(__file__).resolve().parent) if s for p in (s, *s.parents)]:
        if (folder / "pyproject.toml").is_file() and (folder / "jobs").is_dir() and (folder / "pipelines").is_dir():
            return folder.resolve()
    raise SubmitError("cannot find the batchrank project folder (pyproject.toml, jobs/, pipelines/); run from the "
                      "checkout or pass --working-dir")


def default_submission_id(job: str, config: Path, day: datetime | None = None) -> str:
    """``<job>-<config name>-<YYYYMMDD>`` (local date): one nightly run per config and day."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", Path(config).stem).strip("-") or "config"
    return f"{job}-{stem}-{(day or datetime.now().astimezone()):%Y%m%d}"


def declared_dependencies(root: Path, extras: list[str] = ()) -> list[str]:
    """The project's ``[project.dependencies]`` (and the given extras), without Ray: the cluster's Ray is the one
    the job runs under, and a second Ray in the job's environment is not supported by Ray."""
    meta = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    deps = list(meta.get("dependencies", []))
    optional = meta.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise SubmitError(f"unknown extra {extra!r}; pyproject.toml defines {', '.join(sorted(optional))}")
        deps += optional[extra]
    return [d for d in dict.fromkeys(deps) if re.split(r"[\s\[<>=!~;]", d, maxsplit=1)[0].lower() != "ray"]


def excludes_for(root: Path, inputs: list[str]) -> list[str]:
    """EXCLUDES, plus every dataset entry under ``data/`` that none of the config's local inputs lies in."""
    out = list(EXCLUDES)
    resolved = [Path(p).resolve() for p in inputs if "://" not in p]
    for name in DATA_DIRS:
        folder = root / name
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            entry = entry.resolve()
            if not any(p == entry or entry in p.parents for p in resolved):
                out.append(f"{name}/{entry.name}")
    return out


def upload_size(root: Path, excludes: list[str]) -> dict[str, Any]:
    """Files and bytes Ray will upload: walked with Ray's own exclusion rules (excludes, .gitignore,
    .rayignore). Ray's limit is 512 MiB per package."""
    seen = {"files": 0, "bytes": 0}

    def add(path: Path) -> None:
        if path.is_file():
            seen["files"] += 1
            seen["bytes"] += path.stat().st_size

    try:  # Ray's own walker (a private API): the count then matches what Ray uploads exactly
        from ray._private.runtime_env import packaging

        _quiet_ray()
        packaging._dir_travel(root, [packaging._get_excludes(root, excludes)], add, include_gitignore=True)
    except (ImportError, AttributeError, TypeError) as exc:
        log.debug("upload size not measured: %s", exc)
        return {"files": None, "bytes": None}
    return seen


def _config_inputs(cfg) -> list[str]:
    paths: list[str] = []
    for section, attr in (("corpus", "path"), ("query_log", "path")):
        value = getattr(getattr(cfg, section), attr) if getattr(cfg, section) is not None else None
        paths += value if isinstance(value, list) else [value] if value else []
    for name in (cfg.embed.model, cfg.rerank.model if cfg.rerank else None):
        if name and os.path.exists(name):
            paths.append(name)
    for section in ("train", "train_biencoder"):
        t = getattr(cfg, section)
        if t is not None:
            paths += [t.queries, t.qrels]
    if cfg.eval is not None:
        paths += [p for p in (cfg.eval.collection, cfg.eval.queries, cfg.eval.qrels) if p]
    return paths


def _check_portable(config: Path) -> None:
    """Refuse settings that only make sense on this machine: a relative storage URI would resolve inside the
    job's temporary copy of the working dir on the cluster and vanish with it."""
    import yaml

    raw = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    uri = str((raw.get("storage") or {}).get("uri", "./lancedb"))
    if "://" not in uri and not uri.startswith(("/", "~", "$")):
        raise SubmitError(f"{config}: storage.uri is the relative path {uri!r}; on the cluster it would resolve "
                          "inside the job's temporary working dir and be lost when the job ends. Set it to an "
                          "absolute path shared by the nodes or an object-store URI (s3://bucket/prefix)")


def prepare(job: str, config: str | os.PathLike, *, address: str | None = None, submission_id: str | None = None,
            working_dir: str | os.PathLike | None = None, pip: bool = True, extras: list[str] = (),
            env: dict[str, str] | None = None, run_id: str | None = None) -> Submission:
    """Build (without sending) the submission of ``job`` with ``config``."""
    from pipelines.cluster.runtime import worker_env
    from pipelines.config import ConfigError, load_config
    from pipelines.report import default_report_dir, new_run_id, redact_uri

    if job not in JOBS:
        raise SubmitError(f"unknown job {job!r}; use one of {', '.join(JOBS)}")
    entry = JOBS[job].entry
    config = Path(config).resolve()
    try:
        cfg = load_config(config)
    except ConfigError as exc:
        raise SubmitError(str(exc)) from None
    _check_portable(config)
    root = Path(working_dir).resolve() if working_dir else project_root(config.parent)
    if not (root / "jobs" / f"{entry}.py").is_file():
        raise SubmitError(f"{root} has no jobs/{entry}.py; pass --working-dir with the batchrank project folder")
    if root not in config.parents:
        raise SubmitError(f"the config {config} is outside the project folder {root}, which is what the job "
                          f"receives; move it under {root / 'configs'} (or pass --working-dir with a folder "
                          "that holds both)")
    run_id = run_id or new_run_id(job)
    rel = config.relative_to(root).as_posix()
    entrypoint = f"python -m jobs.{entry} --config {rel} --run-id {run_id}"
    excludes = excludes_for(root, _config_inputs(cfg))
    # The submitter's own credentials stay here: job info is readable on the dashboard, and the cluster's nodes
    # bring theirs (an instance profile, IRSA, or the config's storage_options).
    if secret := sorted(set(env or {}) & set(CREDENTIAL_ENV)):
        raise SubmitError(f"{', '.join(secret)} may not travel in a job's runtime_env (Ray shows it to anyone who "
                          "can reach the cluster): give the cluster's nodes their own credentials (instance "
                          "profile, IRSA, the nodes' environment)")
    env_vars = {k: v for k, v in worker_env().items() if k not in CREDENTIAL_ENV}
    runtime_env: dict[str, Any] = {"working_dir": str(root), "excludes": excludes,
                                   "env_vars": {**env_vars, **(env or {})}}
    if pip:  # the core, the job's own groups (eval: matplotlib; training: datasets, accelerate), then --extra ones
        groups = list(dict.fromkeys([*JOBS[job].extras, *extras]))
        runtime_env["pip"] = {"packages": declared_dependencies(root, groups), "pip_check": False}
    report = f"{default_report_dir(cfg.storage.uri, cfg.report.dir).rstrip('/')}/{run_id}.json"
    metadata = {f"{METADATA_PREFIX}job": job, f"{METADATA_PREFIX}config": rel, f"{METADATA_PREFIX}run_id": run_id,
                f"{METADATA_PREFIX}report": redact_uri(report)}
    return Submission(submission_id or default_submission_id(job, config), job, address, entrypoint, run_id,
                      redact_uri(report), runtime_env, upload_size(root, excludes), metadata)


def send(sub: Submission, *, force: bool = False, extra_metadata: dict[str, str] | None = None) -> Submission:
    """Submit to the cluster. An id the cluster already knows is refused with a message naming the earlier run,
    unless ``force``, which picks the next free ``<id>-N``."""
    c = client(sub.address)
    base, n = sub.submission_id, 1
    while True:
        existing = _info(c, sub.submission_id)
        if existing is None:
            break
        if not force:
            raise SubmitError(
                f"a job with submission id {sub.submission_id} was already submitted to this cluster "
                f"(status {_status_name(existing.status)}, started {_when(existing.start_time)}): this run was already "
                f"submitted today. See it with `batchrank jobs status {sub.submission_id}` and `batchrank jobs "
                f"logs {sub.submission_id}`; pass --force to submit another run (as {base}-{n + 1}), or "
                "--submission-id to name it")
        n += 1
        sub.submission_id = f"{base}-{n}"
    metadata = {**sub.metadata, **(extra_metadata or {})}
    for attempt in range(AGENT_RETRIES + 1):
        try:
            c.submit_job(entrypoint=sub.entrypoint, submission_id=sub.submission_id, runtime_env=sub.runtime_env,
                         metadata=metadata)
            break
        except RuntimeError as exc:
            if "already exists" in str(exc):  # another submitter won the race for this id
                raise SubmitError(f"a job with submission id {sub.submission_id} was submitted at the same time by "
                                  f"someone else; see `batchrank jobs status {sub.submission_id}`") from None
            if "No available agent" in str(exc) and attempt < AGENT_RETRIES:  # a cluster still starting up
                time.sleep(min(2.0 * (attempt + 1), 10.0))
                continue
            raise SubmitError(f"the cluster refused the job: {exc}") from None
    sub.metadata = metadata
    log.info("submitted %s as %s: %s", sub.job, sub.submission_id, sub.entrypoint)
    return sub


def submit(job: str, config: str | os.PathLike, *, force: bool = False, **kwargs) -> Submission:
    """``prepare`` then ``send``."""
    return send(prepare(job, config, **kwargs), force=force)


def _info(c, submission_id: str):
    try:
        return c.get_job_info(submission_id)
    except RuntimeError as exc:
        if "does not exist" in str(exc) or "404" in str(exc) or "Not Found" in str(exc):
            return None
        raise


def _status_name(value) -> str:
    return str(getattr(value, "value", value))


def _when(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000).astimezone().isoformat(timespec="seconds") if ms else "not yet"


def status(address: str | None, submission_id: str) -> dict[str, Any]:
    """The job's status and times as a plain dict (``None`` values for what is not known yet)."""
    info = _info(client(address), submission_id)
    if info is None:
        raise SubmitError(f"no job {submission_id} on this cluster; `batchrank jobs list` shows the submitted jobs")
    start, end = info.start_time, info.end_time
    return {"submission_id": submission_id, "status": _status_name(info.status),
            "message": info.message, "entrypoint": info.entrypoint,
            "started_at": _when(start) if start else None, "finished_at": _when(end) if end else None,
            "duration_s": round((end - start) / 1000, 1) if start and end else None,
            "metadata": info.metadata or {}}


def list_jobs(address: str | None) -> list[dict[str, Any]]:
    """batchrank's jobs on the cluster, newest first."""
    jobs = [j for j in client(address).list_jobs() if (j.metadata or {}).get(f"{METADATA_PREFIX}job")]
    jobs.sort(key=lambda j: j.start_time or 0, reverse=True)
    return [{"submission_id": j.submission_id, "status": _status_name(j.status), "job": j.metadata[f"{METADATA_PREFIX}job"],
             "config": j.metadata.get(f"{METADATA_PREFIX}config"), "started_at": _when(j.start_time),
             "report": j.metadata.get(f"{METADATA_PREFIX}report")} for j in jobs]


def stop(address: str | None, submission_id: str) -> bool:
    c = client(address)
    if _info(c, submission_id) is None:
        raise SubmitError(f"no job {submission_id} on this cluster")
    return c.stop_job(submission_id)


def logs(address: str | None, submission_id: str, *, follow: bool = True, out=None) -> str:
    """Print the job's logs; with ``follow``, stream them until the job ends. Returns the final status."""
    out = out or sys.stdout
    c = client(address)
    if _info(c, submission_id) is None:
        raise SubmitError(f"no job {submission_id} on this cluster")
    if not follow:
        out.write(c.get_job_logs(submission_id))
        out.flush()
        return _status_name(c.get_job_status(submission_id))

    async def tail() -> None:
        async for chunk in c.tail_job_logs(submission_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())
    return wait(address, submission_id, poll=0.5, client_=c)


def wait(address: str | None, submission_id: str, *, timeout: float | None = None, poll: float = 2.0,
         client_=None) -> str:
    """Block until the job ends (or ``timeout`` seconds); return its status."""
    c = client_ or client(address)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        state = _status_name(c.get_job_status(submission_id))
        if state in TERMINAL or (deadline is not None and time.monotonic() > deadline):
            return state
        time.sleep(poll)
