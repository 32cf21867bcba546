"""The one list of batchrank's jobs: the CLI's commands, ``batchrank submit``, schedules and ``jobs/*.py`` read it.

Each job names the module whose ``run(cfg, ...)`` and ``summary(report)`` it calls, its ``jobs/<entry>.py``
entrypoint (what ``ray job submit`` runs), the tables whose tags a caller's run id must not reuse, and the
optional dependency groups (pyproject.toml) it needs beyond the core, which ``batchrank submit`` declares with it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Job:
    name: str  # the CLI command: ``batchrank <name>``, ``batchrank submit <name>``
    module: str  # the module with run(cfg, ...) and summary(report)
    entry: str  # ``python -m jobs.<entry>``
    trains: bool = False  # takes --force (retrain even when an up-to-date model exists)
    tagged_tables: tuple[str, ...] = ()  # storage.<x>_table attributes whose tags the run checks itself
    extras: tuple[str, ...] = ()  # pyproject.toml optional-dependency groups its code imports


JOBS: dict[str, Job] = {j.name: j for j in (
    Job("index", "pipelines.index.job", "index", tagged_tables=("passages_table",)),
    Job("rerank", "pipelines.rerank.job", "rerank", tagged_tables=("rankings_table",)),
    Job("nightly", "pipelines.nightly", "nightly", tagged_tables=("passages_table", "rankings_table")),
    Job("eval", "pipelines.quality.evaluate", "eval", extras=("eval",)),
    Job("train-reranker", "pipelines.quality.train_reranker", "train_reranker", trains=True, extras=("train",)),
    Job("train-biencoder", "pipelines.quality.train_biencoder", "train_biencoder", trains=True, extras=("train",)),
)}


def job(name: str) -> Job:
    """The job called ``name``; a ValueError naming the choices otherwise."""
    try:
        return JOBS[name]
    except KeyError:
        raise ValueError(f"unknown job {name!r}; use one of {', '.join(JOBS)}") from None


def require_extra(module: str, extra: str, what: str) -> None:
    """Stop a job at its start when an optional dependency group it needs is not installed, naming the fix."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ModuleNotFoundError(f"{what} needs {module}, from the optional dependency group '{extra}': "
                                  f"pip install 'batchrank[{extra}]'")
