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
                  help="Offline two-stage ranking: index a corpus into LanceDB with a bi-encoder, search it.")

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


def run_index(config: Path, verbose: bool = False) -> int:
    """Shared by ``batchrank index`` and ``python -m jobs.index``: exit code 0 on success."""
    setup_logging(verbose)
    cfg = _load(config)
    from pipelines.index import run, summary

    try:
        report = run(cfg)
    except Exception as exc:  # the job fails loudly, after which the previous table version is intact
        logging.getLogger("batchrank").debug("index run failed", exc_info=True)
        report = getattr(exc, "batchrank_report", None)
        if report is not None:
            typer.echo(summary(report), err=True)
        typer.echo(f"error: index run failed: {exc}", err=True)
        return 1
    typer.echo(summary(report))
    return 0


@app.command()
def index(config: ConfigOpt, verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    """Embed the corpus and write the passages table (one atomic commit), then build the indexes."""
    raise typer.Exit(run_index(config, verbose))


@app.command()
def search(
    query: Annotated[str, typer.Argument(help="text to search for")],
    config: ConfigOpt,
    k: Annotated[int, typer.Option("-k", min=1, help="number of results")] = 10,
    hybrid: Annotated[bool, typer.Option("--hybrid", help="vector + full text, fused by reciprocal rank")] = False,
    exact: Annotated[bool, typer.Option("--exact", help="exact search, bypassing the ANN index")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON lines")] = False,
) -> None:
    """Search passages for one query (to look at results)."""
    setup_logging()
    cfg = _load(config)
    from pipelines.search import search as do_search
    from pipelines.store import StoreError

    try:
        hits = do_search(cfg, query, k=k, hybrid=hybrid, exact=exact)
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
