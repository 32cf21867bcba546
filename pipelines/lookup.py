"""Lookup: the precomputed ranking of a query, with document titles and texts joined from ``passages``.

The query is normalised by the rules stored with the rankings (the ones the log was counted
with), hashed to its ``query_id`` and fetched through the table's ``query_id`` index. Documents
come from the ``passages`` version the ranking was computed on (the current one if that version
was cleaned up). Open a ``Rankings`` once and look up many times: table handles are reused.

Example::

    rankings = Rankings(cfg)
    hit = rankings.lookup("Vitamin D and bone density")      # a Ranking, or None
    many = rankings.lookup_many(["q1", "q2"])                  # one round trip for all
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

from pipelines import schema as S
from pipelines.rerank.query_log import normalize, query_id

_ROW_COLUMNS = [S.QUERY_ID, S.QUERY, S.COUNT, S.LAST_SEEN, S.DOC_IDS, S.SCORES, S.RETRIEVAL_SCORES, S.RETRIEVAL_RANKS,
                S.CANDIDATES, S.RUN_ID, S.BI_ENCODER, S.CROSS_ENCODER, S.PASSAGES_VERSION, S.RANKED_AT]
IN_CHUNK = 500  # ids per ``IN (...)`` filter


@dataclass
class Hit:
    id: str
    score: float
    retrieval_score: float
    retrieval_rank: int
    title: str | None = None
    text: str | None = None  # the passage's text: the one that earned the score
    passage_id: str | None = None
    passage_start: int | None = None  # character offsets of the passage into the document's text
    passage_end: int | None = None


@dataclass
class Ranking:
    query: str
    normalized: str
    query_id: str
    count: int
    hits: list[Hit]
    candidates: int
    run_id: str
    cross_encoder: str
    bi_encoder: str
    passages_version: int
    ranked_at: datetime
    last_seen: datetime
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Rankings:
    """A handle on the rankings table (latest version, or ``version``: a number or a run-id tag)."""

    def __init__(self, cfg, *, version: int | str | None = None, with_documents: bool = True):
        from pipelines.store import Store

        self.cfg, self.store = cfg, Store(cfg.storage)
        self.table = self._open(version)
        self.version = self.table.version
        self.with_documents = with_documents
        first = self.store.scan(self.table, [S.NORMALIZER], limit=1)
        self.rules = json.loads(first[S.NORMALIZER][0].as_py()) if first.num_rows else {}
        self._passages: dict[int, Any] = {}

    def _open(self, version: int | str | None):
        """The rankings table at ``version``; a version or tag it does not have is a ``LookupVersionError`` that
        says whether it never existed or was cleaned up, and what there is instead."""
        latest = self.store.rankings()
        if version is None:
            return latest
        if isinstance(version, str) and re.fullmatch(r"[0-9]+", version):
            version = int(version)
        name = f"'{self.store.cfg.rankings_table}'"
        if isinstance(version, int):
            kept = self.store.versions(latest)
            if version not in kept:
                gone = 1 <= version < latest.version
                raise LookupVersionError(
                    f"{name} version {version} {'was cleaned up' if gone else 'does not exist'} (versions kept: "
                    f"{_spans(kept)}); pass one of those to --at, or a run-id tag: "
                    f"{_tag_hint(self.store.tags(latest))}")
            return self.store.rankings(version)
        if not isinstance(version, str) or not version.strip():
            raise LookupVersionError(f"--at is empty; pass a version number of {name} (latest: {latest.version}) "
                                     f"or a run-id tag: {_tag_hint(self.store.tags(latest))}")
        tags = self.store.tags(latest)
        if version not in tags:
            from pipelines.store import run_tag_time

            number = re.fullmatch(r"[vV]([0-9]+)", version)
            made = run_tag_time(version)
            if number:
                kept = set(self.store.versions(latest))
                why = (f"no tag {version!r}: for version {int(number[1])} pass --at {int(number[1])} (a plain number)"
                       if int(number[1]) in kept else
                       f"no tag {version!r} (and version {int(number[1])} is not kept either: {_spans(sorted(kept))})")
            elif made is not None:
                days = self.cfg.maintenance.run_tag_retention_days
                why = (f"no run tag {version!r}: no run of that id published rankings here, or its tag was dropped "
                       f"(batchrank drops run tags after maintenance.run_tag_retention_days={days:g} days, and then "
                       "the version itself may be cleaned up)" if days is not None else
                       f"no run tag {version!r}: no run of that id published rankings here")
            else:
                why = f"no tag {version!r}"
            raise LookupVersionError(f"{name} has {why}; --at takes a version number (latest: {latest.version}) or "
                                     f"a run-id tag: {_tag_hint(tags)}")
        return self.store.rankings(version)

    def lookup(self, query: str, *, n: int | None = None) -> Ranking | None:
        """The ranking of one query, or None when the query has no precomputed ranking."""
        return self.lookup_many([query], n=n)[0]

    def lookup_many(self, queries: list[str], *, n: int | None = None) -> list[Ranking | None]:
        """Rankings in the order of ``queries`` (None for each miss): one table query per 500 distinct queries."""
        normalized = [normalize(q, self.rules) if isinstance(q, str) else "" for q in queries]
        ids = sorted({query_id(t) for t in normalized if t})
        columns = _ROW_COLUMNS + [c for c in (S.PASSAGE_IDS, S.PASSAGE_STARTS, S.PASSAGE_ENDS)
                                  if c in self.table.schema.names]  # absent from an older release's table
        found = self.store.rows_by_id(self.table, ids, columns, key=S.QUERY_ID, chunk=IN_CHUNK)
        rows = {r[S.QUERY_ID]: r for r in found.to_pylist()}
        docs = self._documents(rows.values(), n) if self.with_documents else {}
        out: list[Ranking | None] = []
        for original, norm in zip(queries, normalized):
            row = rows.get(query_id(norm)) if norm else None
            if row is None or row[S.QUERY] != norm:  # != guards against a hash collision
                out.append(None)
                continue
            out.append(self._ranking(original, row, docs.get(row[S.PASSAGES_VERSION], ({}, [])), n))
        return out

    def _ranking(self, original: str, row: dict[str, Any], docs, n: int | None) -> Ranking:
        texts, notes = docs
        keep = slice(0, n)
        n_docs = len(row[S.DOC_IDS])
        pids, starts, ends = (row.get(c) or [None] * n_docs for c in (S.PASSAGE_IDS, S.PASSAGE_STARTS, S.PASSAGE_ENDS))
        hits = [Hit(d, s, rs, rr, *texts.get(p or d, (None, None)), passage_id=p, passage_start=a, passage_end=b)
                for d, s, rs, rr, p, a, b in zip(row[S.DOC_IDS][keep], row[S.SCORES][keep],
                                                 row[S.RETRIEVAL_SCORES][keep], row[S.RETRIEVAL_RANKS][keep],
                                                 pids[keep], starts[keep], ends[keep])]
        return Ranking(original, row[S.QUERY], row[S.QUERY_ID], row[S.COUNT], hits, row[S.CANDIDATES], row[S.RUN_ID],
                       row[S.CROSS_ENCODER], row[S.BI_ENCODER], row[S.PASSAGES_VERSION], row[S.RANKED_AT],
                       row[S.LAST_SEEN], list(notes))

    def _documents(self, rows, n: int | None) -> dict[int, tuple[dict[str, tuple], list[str]]]:
        """``{passages version: ({passage id: (title, text)}, notes)}`` for the passages that earned the ranked
        documents' scores (document ids for a ranking without passage ids)."""
        wanted: dict[int, set[str]] = {}
        for row in rows:
            pids = row.get(S.PASSAGE_IDS) or [None] * len(row[S.DOC_IDS])
            wanted.setdefault(row[S.PASSAGES_VERSION], set()).update(
                p or d for p, d in zip(pids[:n], row[S.DOC_IDS][:n]))
        out = {}
        for version, doc_ids in wanted.items():
            table, notes = self._passages_at(version)
            key = S.PASSAGE_ID if S.PASSAGE_ID in table.schema.names else S.ID
            found = self.store.rows_by_id(table, doc_ids, [key, S.TITLE, S.TEXT], key=key, chunk=IN_CHUNK)
            texts = {r[key]: (r[S.TITLE], r[S.TEXT]) for r in found.to_pylist()}
            missing = len(doc_ids) - len(texts)
            if missing:
                notes = [*notes, f"{missing} ranked document(s) no longer in passages"]
            out[version] = (texts, notes)
        return out

    def _passages_at(self, version: int):
        if version not in self._passages:
            notes: list[str] = []
            try:
                table = self.store.passages(version)
            except Exception:  # that version was cleaned up: join the current documents instead
                table = self.store.passages()
                notes.append(f"passages v{version} is gone; documents joined from v{table.version}")
            self._passages[version] = (table, notes)
        return self._passages[version]


class LookupVersionError(ValueError):
    """``--at`` names a version or tag the rankings table does not have; the message says what it has."""


def _spans(versions: list[int]) -> str:
    """``[1, 2, 3, 7, 9, 10]`` → ``1-3, 7, 9-10``."""
    spans: list[list[int]] = []
    for v in versions:
        if spans and v == spans[-1][1] + 1:
            spans[-1][1] = v
        else:
            spans.append([v, v])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans) or "none"


def _tag_hint(tags: dict[str, int], shown: int = 5) -> str:
    """The newest few of a table's ``{tag: version}`` (read leases left out), for error messages."""
    from pipelines.store import LEASE_PREFIX

    tags = sorted(((v, tag) for tag, v in tags.items() if not tag.startswith(LEASE_PREFIX)), reverse=True)
    if not tags:
        return "this table has none"
    more = f", and {len(tags) - shown} older" if len(tags) > shown else ""
    return ", ".join(f"{tag} (v{v})" for v, tag in tags[:shown]) + more


def lookup(cfg, query: str, *, n: int | None = None) -> Ranking | None:
    """One-off lookup (opens the tables each call; keep a ``Rankings`` for many lookups)."""
    return Rankings(cfg).lookup(query, n=n)
