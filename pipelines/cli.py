"""The ``batchrank`` command line. Imports stay lazy so that ``batchrank --help`` answers at once."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Offline two-stage ranking: index a corpus with a bi-encoder, rerank a query log with a "
                       "cross-encoder into a versioned rankings table, look rankings up.")

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="YAML config of the job")]


def setup_logging(verbose: bool = False) -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("ray", "ray.data", "sentence_transformers", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load(config: Path):
    from pipelines.config import ConfigError, load_config

    try:
        return load_config(config)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)


def run_job(job: str, config: Path, verbose: bool = False, **options) -> int:
    """Shared by the CLI and ``python -m jobs.<job>``: run one job, print its summary; exit code 0 on success.

    ``job`` is ``index``, ``rerank``, ``nightly``, ``train``, ``train-biencoder`` or ``eval``. Config errors exit 2; failed runs exit 1, after which
    the previous table versions are intact.
    """
    import importlib

    from pipelines.config import ConfigError

    setup_logging(verbose)
    cfg = _load(config)
    module = importlib.import_module({"index": "pipelines.index", "rerank": "pipelines.rerank",
                                      "train": "pipelines.train", "eval": "pipelines.evaluate",
                                      "train-biencoder": "pipelines.train_biencoder",
                                      "nightly": "pipelines.nightly"}[job])
    try:
        report = module.run(cfg, **options)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        return 2
    except Exception as exc:
        logging.getLogger("batchrank").debug("%s run failed", job, exc_info=True)
        report = getattr(exc, "batchrank_report", None)
        if report is not None:
            typer.echo(module.summary(report), err=True)
        typer.echo(f"error: {job} run failed: {exc}", err=True)
        return 1
    typer.echo(module.summary(report))
    return 0


def run_index(config: Path, verbose: bool = False) -> int:
    return run_job("index", config, verbose)


def job_main(job: str, argv: list[str] | None = None) -> int:
    """``python -m jobs.<job> --config FILE``: the entrypoint given to ``ray job submit``."""
    import argparse

    module = {"index": "jobs.index", "rerank": "jobs.rerank", "train": "jobs.train_reranker", "eval": "jobs.eval",
              "train-biencoder": "jobs.train_biencoder", "nightly": "jobs.nightly"}[job]
    parser = argparse.ArgumentParser(prog=f"python -m {module}")
    parser.add_argument("--config", "-c", required=True, type=Path, help="YAML config of the job")
    parser.add_argument("--verbose", "-v", action="store_true")
    trains = job in ("train", "train-biencoder")
    if trains:
        parser.add_argument("--force", action="store_true", help="retrain even if an up-to-date model exists")
    args = parser.parse_args(argv)
    options = {"force": args.force} if trains else {}
    return run_job(job, args.config, args.verbose, **options)


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
    raise typer.Exit(run_job("train", config, verbose, force=force))


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
        stream = sys.stdin if str(from_file) == "-" else from_file.open(encoding="utf-8")
        texts += [line.rstrip("\n") for line in stream if line.strip()]
    if not texts:
        typer.echo("error: no query given; pass queries as arguments or with --file", err=True)
        raise typer.Exit(2)
    from pipelines.lookup import Rankings
    from pipelines.store import StoreError

    try:
        rankings = Rankings(cfg, version=int(at) if at and at.isdigit() else at)
        results = rankings.lookup_many(texts, n=n)
    except (StoreError, ValueError) as exc:
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
    source: Annotated[str, typer.Option("--source", help="vector, fts (BM25) or hybrid (both, fused by reciprocal "
                                                          "rank)")] = "vector",
    exact: Annotated[bool, typer.Option("--exact", help="exact search, bypassing the ANN index")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON lines")] = False,
) -> None:
    """Search passages for one query (to look at results)."""
    setup_logging()
    cfg = _load(config)
    from pipelines.search import search as do_search
    from pipelines.store import StoreError

    try:
        hits = do_search(cfg, query, k=k, source=source, exact=exact)
    except (StoreError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    for rank, hit in enumerate(hits, 1):
        if as_json:
            typer.echo(json.dumps({"rank": rank, **hit}, ensure_ascii=False, default=str))
        else:
            title = (hit.get("title") or hit.get("text") or "")[:100]
            typer.echo(f"{rank:>3}. {hit['score']:.4f}  [{hit['id']}] {title}")


@app.callback(invoke_without_command=True)
def main(version: Annotated[bool | None, typer.Option("--version", help="print the version")] = None) -> None:
    if version:
        from pipelines import __version__

        typer.echo(__version__)
        raise typer.Exit()


if __name__ == "__main__":
    app()
