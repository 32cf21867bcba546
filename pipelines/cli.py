"""The ``batchrank`` command line. Imports stay lazy so that ``batchrank --help`` answers at once."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from pipelines.runs import run_job, setup_logging

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Offline two-stage ranking: index a corpus with a bi-encoder, rerank a query log with a "
                       "cross-encoder into a versioned rankings table, look rankings up.")

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="YAML config of the job")]


def _load(config: Path):
    from pipelines.config import ConfigError, load_config

    try:
        return load_config(config)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


Verbose = Annotated[bool, typer.Option("--verbose", "-v")]


@app.command()
def index(config: ConfigOpt, verbose: Verbose = False) -> None:
    """Embed the corpus and write the passages table (one atomic commit), then build the indexes."""
    raise typer.Exit(run_job("index", config, verbose))


@app.command()
def rerank(config: ConfigOpt, verbose: Verbose = False) -> None:
    """Rerank the query log: retrieve candidates, score them with the cross-encoder, publish a rankings version."""
    raise typer.Exit(run_job("rerank", config, verbose))


@app.command()
def nightly(config: ConfigOpt, verbose: Verbose = False) -> None:
    """One night: incremental reindex (only new, changed and deleted documents), table upkeep, then rerank of the
    query log with cached pair scores reused; one report, both tables tagged with the run id."""
    raise typer.Exit(run_job("nightly", config, verbose))


@app.command("train-reranker")
def train_reranker(
    config: ConfigOpt,
    force: Annotated[bool, typer.Option("--force", help="retrain even if an up-to-date reranker exists")] = False,
    verbose: Verbose = False,
) -> None:
    """Fine-tune a cross-encoder on training judgments, with hard negatives mined from passages."""
    raise typer.Exit(run_job("train-reranker", config, verbose, force=force))


@app.command("train-biencoder")
def train_biencoder(
    config: ConfigOpt,
    force: Annotated[bool, typer.Option("--force", help="retrain even if an up-to-date bi-encoder exists")] = False,
    verbose: Verbose = False,
) -> None:
    """Fine-tune the bi-encoder on training judgments (in-batch + mined hard negatives); reindex to use it."""
    raise typer.Exit(run_job("train-biencoder", config, verbose, force=force))


@app.command("eval")
def evaluate(config: ConfigOpt, verbose: Verbose = False) -> None:
    """Evaluate a BEIR collection's judged queries: every candidate source and rerank depth, quality and cost."""
    raise typer.Exit(run_job("eval", config, verbose))


@app.command()
def lookup(
    config: ConfigOpt,
    queries: Annotated[list[str] | None, typer.Argument(help="one or more queries")] = None,
    from_file: Annotated[Path | None, typer.Option("--file", "-f", help="queries, one per line ('-': stdin)")] = None,
    n: Annotated[int, typer.Option("-n", min=1, help="documents shown per query")] = 10,
    at: Annotated[str | None, typer.Option("--at", help="a rankings version number or run-id tag")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object per query")] = False,
) -> None:
    """Print the precomputed ranking of each query; exit code 1 if any query has none."""
    setup_logging()
    cfg = _load(config)
    texts = list(queries or [])
    if from_file is not None:
        try:
            stream = sys.stdin if str(from_file) == "-" else from_file.open(encoding="utf-8")
            texts += [line.rstrip("\n") for line in stream if line.strip()]
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            typer.echo(f"error: cannot read --file {from_file}: {why}; pass a UTF-8 text file with one query per "
                       "line ('-' reads standard input)", err=True)
            raise typer.Exit(2) from None
    if not texts:
        typer.echo("error: no query given; pass queries as arguments or with --file", err=True)
        raise typer.Exit(2)
    from pipelines.lookup import Rankings
    from pipelines.store import StoreError

    try:
        rankings = Rankings(cfg, version=at)  # a number or a tag; a bad one is a one-line error
        results = rankings.lookup_many(texts, n=n)
    except (StoreError, ValueError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    for text, ranking in zip(texts, results):
        if as_json:
            body = {"found": True, **ranking.to_dict()} if ranking else {"query": text, "found": False}
            typer.echo(json.dumps(body, ensure_ascii=False, default=str))
        elif ranking is None:
            typer.echo(f"no precomputed ranking for this query: {text!r}", err=True)
        else:
            shown = repr(ranking.normalized) if ranking.normalized == ranking.query else \
                f"{ranking.query!r} → {ranking.normalized!r}"
            typer.echo(f"{shown}  (seen {ranking.count:,}x, run {ranking.run_id}, "
                       f"{ranking.candidates} candidates scored)")
            for rank, hit in enumerate(ranking.hits, 1):
                title = (hit.title or hit.text or "")[:90]
                typer.echo(f"{rank:>3}. {hit.score:.4f}  [{hit.id}] (retrieval #{hit.retrieval_rank}) {title}")
            for note in ranking.notes:
                typer.echo(f"  note: {note}")
    raise typer.Exit(1 if any(r is None for r in results) else 0)


@app.command()
def search(
    query: Annotated[str, typer.Argument(help="text to search for")],
    config: ConfigOpt,
    k: Annotated[int, typer.Option("-k", min=1, help="number of results")] = 10,
    source: Annotated[str, typer.Option("--source", help="vector, fts (BM25) or hybrid (both, fused as "
                                                          "retrieve.hybrid_fusion says)")] = "vector",
    exact: Annotated[bool, typer.Option("--exact", help="exact search, bypassing the ANN index")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON lines")] = False,
) -> None:
    """Search passages for one query (to look at results)."""
    setup_logging()
    if source not in ("vector", "fts", "hybrid"):  # before the model loads
        typer.echo(f"error: --source {source!r}: use vector, fts or hybrid", err=True)
        raise typer.Exit(2)
    cfg = _load(config)
    from pipelines.search import search as do_search
    from pipelines.store import StoreError

    try:
        hits = do_search(cfg, query, k=k, source=source, exact=exact)
    except (StoreError, ValueError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    for rank, hit in enumerate(hits, 1):
        if as_json:
            typer.echo(json.dumps({"rank": rank, **hit}, ensure_ascii=False, default=str))
        else:
            title = (hit.get("title") or hit.get("text") or "")[:100]
            typer.echo(f"{rank:>3}. {hit['score']:.4f}  [{hit['id']}] {title}")


AddressOpt = Annotated[str | None, typer.Option("--address", help="Ray job server (dashboard) address, e.g. "
                                                 "http://127.0.0.1:8265; default: $RAY_ADDRESS")]


def _fail(exc: Exception, code: int = 1):
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(code)


@app.command()
def submit(
    job: Annotated[str, typer.Argument(help="index, rerank, nightly, eval, train-reranker or train-biencoder")],
    config: ConfigOpt,
    address: AddressOpt = None,
    wait: Annotated[bool, typer.Option("--wait", help="stream the job's logs until it ends; exit 1 unless it "
                                                      "succeeded")] = False,
    submission_id: Annotated[str | None, typer.Option("--submission-id", help="default: <job>-<config "
                                                                              "name>-<YYYYMMDD>")] = None,
    force: Annotated[bool, typer.Option("--force", help="submit even if this submission id was already used "
                                                        "(the id gets a -2, -3, ... suffix)")] = False,
    working_dir: Annotated[Path | None, typer.Option("--working-dir", help="project folder to upload (default: "
                                                                           "this checkout)")] = None,
    pip: Annotated[bool, typer.Option("--pip/--no-pip", help="declare the project's dependencies in the job's "
                                                             "runtime env (--no-pip: the cluster's image has "
                                                             "them)")] = True,
    extra: Annotated[list[str] | None, typer.Option("--extra", help="also declare an optional dependency group "
                                                                    "of pyproject.toml (e.g. models)")] = None,
) -> None:
    """Submit a job to a Ray cluster (Ray's job submission API): `python -m jobs.<job> --config ...` with the project
    as working dir and its dependencies declared."""
    setup_logging()
    from pipelines.cluster import submit as sub_mod

    try:
        sub = sub_mod.submit(job, config, address=address, submission_id=submission_id, working_dir=working_dir,
                             pip=pip, extras=extra or [], force=force)
    except sub_mod.SubmitError as exc:
        raise _fail(exc, 2) from None
    up = sub.upload
    size = f"{up['files']:,} files, {up['bytes'] / 2**20:.1f} MiB" if up.get("files") is not None else "not measured"
    typer.echo(f"submitted {sub.submission_id}\n  entrypoint: {sub.entrypoint}\n  upload: {size}\n  report: "
               f"{sub.report}\n  logs: batchrank jobs logs {sub.submission_id}")
    if wait:
        final = sub_mod.logs(sub.address, sub.submission_id, follow=True)
        typer.echo(f"{sub.submission_id}: {final}")
        raise typer.Exit(0 if final == "SUCCEEDED" else 1)


jobs_app = typer.Typer(no_args_is_help=True, help="Jobs on a Ray cluster: status, logs, stop, list.")
app.add_typer(jobs_app, name="jobs")
IdArg = Annotated[str, typer.Argument(help="submission id")]


@jobs_app.command("status")
def jobs_status(submission_id: IdArg, address: AddressOpt = None,
                as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Status, times and report location of a submitted job."""
    from pipelines.cluster import submit as sub_mod

    try:
        st = sub_mod.status(address, submission_id)
    except sub_mod.SubmitError as exc:
        raise _fail(exc) from None
    if as_json:
        typer.echo(json.dumps(st, default=str))
        return
    meta = st.pop("metadata")
    for key, value in st.items():
        if value is not None:
            typer.echo(f"{key}: {value}")
    if meta.get("batchrank_report"):
        typer.echo(f"report: {meta['batchrank_report']}")


@jobs_app.command("logs")
def jobs_logs(submission_id: IdArg, address: AddressOpt = None,
              follow: Annotated[bool, typer.Option("--follow/--no-follow", "-f")] = True) -> None:
    """Print a job's logs, following them until the job ends (--no-follow: what there is now)."""
    from pipelines.cluster import submit as sub_mod

    try:
        sub_mod.logs(address, submission_id, follow=follow)
    except sub_mod.SubmitError as exc:
        raise _fail(exc) from None


@jobs_app.command("stop")
def jobs_stop(submission_id: IdArg, address: AddressOpt = None) -> None:
    """Ask the cluster to stop a job (its tables keep their previous versions)."""
    from pipelines.cluster import submit as sub_mod

    try:
        stopped = sub_mod.stop(address, submission_id)
    except sub_mod.SubmitError as exc:
        raise _fail(exc) from None
    typer.echo(f"{submission_id}: {'stop requested' if stopped else 'already finished'}")


@jobs_app.command("list")
def jobs_list(address: AddressOpt = None) -> None:
    """batchrank's jobs on the cluster, newest first."""
    from pipelines.cluster import submit as sub_mod

    try:
        rows = sub_mod.list_jobs(address)
    except sub_mod.SubmitError as exc:
        raise _fail(exc) from None
    for r in rows:
        typer.echo(f"{r['submission_id']:<40} {r['status']:<10} {r['job']:<15} {r['started_at']}  {r['report']}")


ScheduleOpt = Annotated[Path, typer.Option("--config", "-c", help="YAML schedules file")]


@app.command()
def schedule(
    config: ScheduleOpt,
    address: AddressOpt = None,
    once: Annotated[bool, typer.Option("--once", help="submit what is due now, then exit (for system cron)")] = False,
    duration: Annotated[float | None, typer.Option("--for", help="run this many seconds, then exit")] = None,
) -> None:
    """Run the schedules of a schedules file: submit each due run to the cluster, never two runs of one schedule at
    once, at most one catch-up after downtime; every run is recorded in the runs table."""
    setup_logging()
    from pipelines.cluster.schedule import ScheduleError, Scheduler, load_schedules

    try:
        scheduler = Scheduler(load_schedules(config), address=address)
    except ScheduleError as exc:
        raise _fail(exc, 2) from None
    try:
        scheduler.run(once=once, duration=duration)
    except KeyboardInterrupt:
        typer.echo("scheduler stopped; runs already submitted keep running on the cluster", err=True)


@app.command()
def runs(
    config: ScheduleOpt,
    name: Annotated[str | None, typer.Option("--schedule", help="only this schedule")] = None,
    n: Annotated[int, typer.Option("-n", min=1, help="the latest N runs")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per run")] = False,
) -> None:
    """List the runs the scheduler recorded: scheduled time, submission id, status, duration, report."""
    from pipelines.cluster.schedule import ACTIVE, RunsLog, ScheduleError, Scheduler, format_runs, load_schedules
    from pipelines.cluster.submit import SubmitError

    try:
        sched = load_schedules(config)
    except ScheduleError as exc:
        raise _fail(exc, 2) from None
    log = RunsLog(sched.runs)
    if any(r["status"] in ACTIVE for r in log.rows(name)):  # ask the cluster how the active runs are doing
        try:
            Scheduler(sched).refresh()
        except (SubmitError, OSError) as exc:
            typer.echo(f"note: statuses as last recorded; the cluster did not answer: {exc}", err=True)
    rows = log.rows(name)[-n:]
    if as_json:
        for r in rows:
            typer.echo(json.dumps(r, default=str))
    else:
        known = [e.name for e in sched.schedules]
        typer.echo(format_runs(rows) if rows else "no runs recorded yet" if name is None or name in known else
                   f"no runs recorded for schedule {name!r} (the schedules file has: {', '.join(known) or 'none'})")


@app.callback(invoke_without_command=True)
def main(version: Annotated[bool | None, typer.Option("--version", help="print the version")] = None) -> None:
    if version:
        from pipelines import __version__

        typer.echo(__version__)
        raise typer.Exit()


if __name__ == "__main__":
    app()
