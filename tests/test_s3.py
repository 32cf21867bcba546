"""Object storage: the index and rerank jobs with their tables, corpus, query log and run reports on s3://.

The S3 endpoint is a moto server started here (in a thread, on a free port) with authentication on: every
request must be signed with the keys of an IAM user it knows, so a request that did not get the credentials
(a Ray worker, a read task, a LanceDB connection) fails instead of passing unnoticed. Ray starts with no AWS_*
variables in its environment: actors and read tasks reach S3 with what the config (or the filesystem object
shipped to them) carries. Also: a failpoint before each job's commit leaves the previous version readable on
S3 and a rerun completes without duplicates; Lance commits a manifest with a conditional PUT (If-None-Match),
which turns a concurrent writer's commit into a retry instead of a lost write; no credentials in reports, logs
or errors.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.request
from urllib.parse import quote

import pyarrow as pa
import pytest
from conftest import as_passages, good_docs

from pipelines import schema as S
from pipelines.config import parse_config
from pipelines.faults import InjectedFailure
from pipelines.index import job as index
from pipelines.rerank import job as rerank
from pipelines.store import Store

BUCKET, REGION = "batchrank-test", "us-east-1"
AWS_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_DEFAULT_REGION",
            "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT", "AWS_ALLOW_HTTP", "AWS_PROFILE")
QUERIES = ["cell protein", "Cancer  Risk", "vitamin study", "brain data", "gene model", "protein gene"]


class S3Server:
    """A moto S3 endpoint: ``endpoint``, the IAM user's ``key_id``/``secret``, a signed boto3 ``client``; ``puts``
    records (path, If-None-Match header, status) of every PUT; a function in ``before_put`` runs before a PUT is
    handled (to let another writer in at exactly that moment)."""

    def __init__(self):
        import boto3
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server

        app = DomainDispatcherApplication(create_backend_app)
        self.puts: list[tuple[str, str | None, int]] = []
        self.before_put = None

        def recording(environ, start_response):
            if environ["REQUEST_METHOD"] != "PUT":
                return app(environ, start_response)
            path = environ["PATH_INFO"]
            if self.before_put is not None:
                self.before_put(path)

            def respond(status, headers, *exc_info):
                self.puts.append((path, environ.get("HTTP_IF_NONE_MATCH"), int(status.split()[0])))
                return start_response(status, headers, *exc_info)

            return app(environ, respond)

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self.server = make_server("127.0.0.1", 0, recording, threaded=True, request_handler=MotoRequestHandler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        boot = {"endpoint_url": self.endpoint, "region_name": REGION, "aws_access_key_id": "bootstrap",
                "aws_secret_access_key": "bootstrap"}
        iam = boto3.client("iam", **boot)
        iam.create_user(UserName="batchrank")
        iam.put_user_policy(UserName="batchrank", PolicyName="s3", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="batchrank")["AccessKey"]
        self.key_id, self.secret = key["AccessKeyId"], key["SecretAccessKey"]
        self.client = boto3.client("s3", **{**boot, "aws_access_key_id": self.key_id,
                                            "aws_secret_access_key": self.secret})
        self.client.create_bucket(Bucket=BUCKET)
        self._auth("0")  # from now on every request must be signed by a known key

    def _auth(self, after_requests: str) -> None:
        urllib.request.urlopen(urllib.request.Request(f"{self.endpoint}/moto-api/reset-auth",
                                                      data=after_requests.encode(), method="POST",
                                                      headers={"Content-Type": "text/plain"})).read()

    def options(self, **extra) -> dict:
        """``storage.storage_options`` as a user writes them (LanceDB's names, a YAML boolean)."""
        return {"aws_access_key_id": self.key_id, "aws_secret_access_key": self.secret, "endpoint": self.endpoint,
                "region": REGION, "allow_http": True, **extra}

    def put_jsonl(self, key: str, rows: list) -> str:
        body = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
        self.client.put_object(Bucket=BUCKET, Key=key, Body=body.encode())
        return f"s3://{BUCKET}/{key}"

    def read(self, uri: str) -> str:
        key = uri.removeprefix(f"s3://{BUCKET}/")
        return self.client.get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()

    def keys(self, prefix: str) -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def close(self) -> None:
        self._auth("inf")
        self.server.shutdown()


@pytest.fixture(scope="module", autouse=True)
def s3():
    """The S3 endpoint, with no AWS_* variables in this process (so neither in the Ray started after it)."""
    with pytest.MonkeyPatch.context() as mp:
        for var in AWS_VARS:
            mp.delenv(var, raising=False)
        server = S3Server()
        yield server
        server.close()


def config(s3: S3Server, prefix: str, model: str, **sections):
    data = {"storage": {"uri": f"s3://{BUCKET}/{prefix}/db", "storage_options": s3.options()},
            "embed": {"model": model, "actors": 1, "batch_size": 8, "rows_per_call": 16},
            "corpus": {"path": f"s3://{BUCKET}/{prefix}/in/docs.jsonl", "rows_per_block": 16}, **sections}
    return parse_config(data)


@pytest.fixture(scope="module")
def indexed(s3, ray_per_module, tiny_model):
    """A passages table on S3 from a first index run (20 documents and a bad line, from a corpus file on S3)."""
    s3.put_jsonl("jobs/in/docs.jsonl", [*good_docs(20), '{"_id": "broken'])
    cfg = config(s3, "jobs", tiny_model)
    return cfg, index.run(cfg)


def _no_secret(s3: S3Server, *texts: str) -> None:
    for text in texts:
        assert s3.secret not in text


def test_index_job_on_s3_commits_atomically(s3, indexed, monkeypatch, caplog):
    cfg, first = indexed
    assert first["status"] == "succeeded" and first["storage"] == f"s3://{BUCKET}/jobs/db"
    assert first["rows"] == {"read": 21, "written": 20, "unchanged": 0, "delete_markers": 0, "quarantined": 1,
                             "reconciled": True}
    assert first["report_path"] == f"s3://{BUCKET}/jobs/db/_reports/{first['run_id']}.json"  # default report.dir
    saved = s3.read(first["report_path"])
    assert json.loads(saved)["rows"]["written"] == 20
    assert any(k.startswith("jobs/db/passages.lance/_versions/") for k in s3.keys("jobs/db/"))
    store = Store(cfg.storage)
    before = store.passages().version
    assert [q["reason_code"] for q in store.quarantine(first["run_id"]).to_pylist()] == ["bad_json"]

    docs = good_docs(25)
    docs[3]["text"] = "a changed abstract"
    s3.put_jsonl("jobs/in/docs.jsonl", docs)
    monkeypatch.setenv("BATCHRANK_FAILPOINTS", "before_commit")
    caplog.set_level(logging.INFO)
    with pytest.raises(InjectedFailure) as info:
        index.run(cfg)
    failed = info.value.batchrank_report
    assert failed["status"] == "failed" and json.loads(s3.read(failed["report_path"]))["status"] == "failed"
    table = Store(cfg.storage).passages()  # a new connection: what any reader of the bucket sees
    assert table.version == before and table.count_rows() == 20
    assert table.search().where("id = 'd3'").to_arrow()["text"][0].as_py() == good_docs(4)[3]["text"]
    assert [n for n in store.table_names() if n.startswith("_staging")] == ["_staging-passages"]  # kept, invisible

    monkeypatch.delenv("BATCHRANK_FAILPOINTS")
    again = index.run(cfg)
    assert again["rows"]["written"] == 6 and again["rows"]["unchanged"] == 19  # 5 new, 1 changed
    assert again["rows"]["resumed_from_killed_run"] == 6  # staged by the failed run: not embedded again
    assert not [n for n in store.table_names() if n.startswith("_staging")]
    table = Store(cfg.storage).passages()
    ids = table.to_arrow()["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 25 and table.version > before
    assert Store(cfg.storage).passages(version=first["run_id"]).count_rows() == 20  # the old version, by its tag
    _no_secret(s3, caplog.text, saved, s3.read(failed["report_path"]), s3.read(again["report_path"]),
               index.summary(again), repr(cfg))


def test_rerank_job_on_s3_commits_atomically(s3, indexed, tiny_cross_encoder, monkeypatch):
    from pipelines.lookup import Rankings

    cfg, _ = indexed
    rows = [{"query": q, "timestamp": f"2026-11-2{i % 5}T10:00:00Z"} for i in range(18) for q in [QUERIES[i % 6]]]
    s3.put_jsonl("jobs/logs/day1.jsonl", rows[:9])
    s3.put_jsonl("jobs/logs/day2.jsonl", [*rows[9:], {"query": "no time"}])
    rcfg = config(s3, "jobs", cfg.embed.model, query_log={"path": f"s3://{BUCKET}/jobs/logs/"},  # a folder
                  retrieve={"k": 8}, rerank={"model": tiny_cross_encoder, "top_n": 5, "actors": 1, "batch_size": 16})
    first = rerank.run(rcfg)  # retrieve and score actors open passages and the pair cache on S3
    assert first["status"] == "succeeded"
    assert first["queries"]["selected"] == first["queries"]["ranked"] == 6
    assert first["query_log"]["lines_read"] == 19 and first["query_log"]["lines_quarantined"] == 1
    assert json.loads(s3.read(first["report_path"]))["run_id"] == first["run_id"]
    store = Store(rcfg.storage)
    before = store.rankings().version

    monkeypatch.setenv("BATCHRANK_FAILPOINTS", "before_commit")
    with pytest.raises(InjectedFailure):
        rerank.run(rcfg)  # every ranking carried over, staged, then the run dies before the commit
    table = Store(rcfg.storage).rankings()
    assert table.version == before and table.count_rows() == 6
    assert Rankings(rcfg).lookup("cancer risk").run_id == first["run_id"]
    assert not [n for n in store.table_names() if n.startswith("_staging")]

    monkeypatch.delenv("BATCHRANK_FAILPOINTS")
    again = rerank.run(rcfg)
    assert again["status"] == "succeeded" and again["queries"]["carried_over"] == 6
    table = Store(rcfg.storage).rankings()
    ids = table.to_arrow()["query_id"].to_pylist()
    assert len(ids) == len(set(ids)) == 6 and table.version > before
    assert Store(rcfg.storage).rankings(first["run_id"]).count_rows() == 6
    assert Rankings(rcfg).lookup("Cancer risk").run_id == again["run_id"]
    _no_secret(s3, s3.read(again["report_path"]), rerank.summary(again))


def test_ray_read_tasks_get_the_filesystem(s3, ray_per_module, tiny_model):
    """Corpus globs and Lance datasets on S3 read by Ray tasks in other processes, whose environment has no
    credentials: the pyarrow filesystem (or Lance's storage options) travels with the task."""
    import lance

    from pipelines.index.corpus import read_corpus
    from pipelines.index.validate import RowSpec
    from pipelines.store.objstore import lance_location

    s3.put_jsonl("reads/in/a.jsonl", good_docs(10))
    s3.put_jsonl("reads/in/b.jsonl", [*good_docs(5, start=10), "not json"])
    s3.put_jsonl("reads/other/c.jsonl", good_docs(3, start=50))
    cfg = config(s3, "reads", tiny_model)
    cfg.corpus.path = f"s3://{BUCKET}/reads/in/*.jsonl"

    def where(batch: pa.Table) -> pa.Table:
        return batch.append_column("pid", pa.array([os.getpid()] * batch.num_rows)).append_column(
            "aws_env", pa.array([any(v in os.environ for v in AWS_VARS)] * batch.num_rows))

    ds = read_corpus(cfg.corpus, RowSpec.from_config(cfg), storage_options=cfg.storage.storage_options)
    rows = ds.map_batches(where, batch_format="pyarrow").take_all()
    assert len(rows) == 16 and sum(r["reason_code"] == "bad_json" for r in rows) == 1
    assert {r["source"] for r in rows} == {f"{BUCKET}/reads/in/a.jsonl", f"{BUCKET}/reads/in/b.jsonl"}
    assert os.getpid() not in {r["pid"] for r in rows} and not any(r["aws_env"] for r in rows)

    uri, options = lance_location(f"s3://{BUCKET}/reads/docs.lance", cfg.storage.storage_options)
    s3.puts.clear()
    lance.write_dataset(pa.table({"_id": ["x1", "x2"], "text": ["alpha", "beta"]}), uri, storage_options=options)
    manifests = [inm for p, inm, _ in s3.puts if "/reads/docs.lance/_versions/" in p]
    assert manifests == ["*"]  # pylance commits with a conditional PUT too (the tables go through LanceDB's Lance)
    cfg.corpus.path, cfg.corpus.format = f"s3://{BUCKET}/reads/docs.lance", "lance"
    rows = read_corpus(cfg.corpus, RowSpec.from_config(cfg), storage_options=cfg.storage.storage_options).take_all()
    assert sorted(r["id"] for r in rows) == ["x1", "x2"]


def test_credentials_from_the_aws_environment(s3, tiny_model, monkeypatch, tmp_path):
    """No storage_options: tables, corpus, query log and reports reach S3 with AWS_* variables, which Ray
    workers receive too; keys in the config win over the environment's."""
    from pipelines.cluster.runtime import worker_env
    from pipelines.index.corpus import read_local
    from pipelines.report import write_report
    from pipelines.rerank.query_log import read_query_log
    from pipelines.store.objstore import s3_options

    for var, value in {"AWS_ACCESS_KEY_ID": s3.key_id, "AWS_SECRET_ACCESS_KEY": s3.secret,
                       "AWS_ENDPOINT_URL": s3.endpoint, "AWS_DEFAULT_REGION": REGION}.items():
        monkeypatch.setenv(var, value)
    s3.put_jsonl("env/in/docs.jsonl", good_docs(4))
    s3.put_jsonl("env/logs/q.jsonl", [{"query": "Gene Model", "timestamp": 1764000000}] * 2)
    cfg = parse_config({"storage": {"uri": f"s3://{BUCKET}/env/db"},
                        "corpus": {"path": f"s3://{BUCKET}/env/in/docs.jsonl"},
                        "query_log": {"path": f"s3://{BUCKET}/env/logs/*.jsonl"}, "embed": {"model": tiny_model}})
    assert s3_options(cfg.storage.uri) == {"aws_access_key_id": s3.key_id, "aws_secret_access_key": s3.secret,
                                           "aws_endpoint": s3.endpoint, "aws_region": REGION, "allow_http": "true"}
    db = Store(cfg.storage).db
    db.create_table("t", data=pa.table({"a": [1, 2]}))
    assert Store(cfg.storage).open("t").count_rows() == 2
    assert sum(b.num_rows for b in read_local(cfg)) == 4
    assert read_query_log(cfg.query_log).selected["query"].to_pylist() == ["gene model"]
    path = write_report({"run_id": "env-test"}, f"s3://{BUCKET}/env/db/_reports")
    assert json.loads(s3.read(path)) == {"run_id": "env-test"}
    env = worker_env()  # what actors get in their runtime_env: the endpoint, never a credential (issue 17, item 11)
    assert env["AWS_ENDPOINT_URL"] == s3.endpoint
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} & set(env)
    assert s3.secret not in json.dumps(env)

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")  # refused: the credentials are really used
    with pytest.raises(OSError):
        read_query_log(cfg.query_log)
    cfg.storage.storage_options = s3.options()  # the config's keys win over the environment's
    assert read_query_log(cfg.query_log, storage_options=cfg.storage.storage_options).counts["lines_read"] == 2
    assert Store(cfg.storage).open("t").count_rows() == 2


def test_two_batchrank_commits_racing_on_s3_both_land_once(s3, tiny_model):
    """Two index commits (``Store.commit_passages``, batchrank's own: a merge_insert of a staging table, tagged)
    race for the same table version: Lance writes each manifest with ``If-None-Match: *``, moto refuses the loser's
    with 412, and the loser's commit is retried on top of the winner's. Both runs' documents land, each id once,
    each run's tag on its own version; nothing either wrote is lost."""
    cfg = config(s3, "race", tiny_model)
    store_a, store_b = Store(cfg.storage), Store(cfg.storage)
    schema = S.passages_schema({}, 2)

    def staged(store, run_id, ids):
        rows = pa.table({S.ID: ids, S.TITLE: [""] * len(ids), S.TEXT: [f"text {i}" for i in ids],
                         S.VECTOR: pa.array([[1.0, 0.0]] * len(ids), pa.list_(pa.float32(), 2)),
                         S.CONTENT_HASH: [f"h-{i}-{run_id}" for i in ids], S.MODEL: ["m"] * len(ids),
                         S.EMBEDDED_AT: pa.array([None] * len(ids), S.TIMESTAMP), S.RUN_ID: [run_id] * len(ids)})
        rows = as_passages(rows, cfg.passage_settings)
        table = store.stage(cfg.storage.passages_table, run_id, schema)
        table.add(rows)
        return table

    store_a.commit_passages(staged(store_a, "run-0", ["d0", "d1"]), "run-0")
    a = staged(store_a, "run-a", ["d1", "a1"])  # d1 changed by run a
    b = staged(store_b, "run-b", ["b1", "b2"])
    manifests = f"/{BUCKET}/race/db/{cfg.storage.passages_table}.lance/_versions/"

    def let_a_commit_first(path: str) -> None:  # B is about to PUT its manifest: A commits now, taking the version
        if path.startswith(manifests) and s3.before_put is not None:
            s3.before_put = None
            store_a.commit_passages(a, "run-a")

    s3.puts.clear()
    s3.before_put = let_a_commit_first
    version_b = store_b.commit_passages(b, "run-b")
    refused = [p for p, inm, status in s3.puts if p.startswith(manifests) and status == 412]
    assert len(refused) == 1 and all(inm == "*" for p, inm, _ in s3.puts if p.startswith(manifests))
    table = Store(cfg.storage).passages()  # a fresh reader
    ids = table.to_arrow()[S.ID].to_pylist()
    assert sorted(ids) == ["a1", "b1", "b2", "d0", "d1"]  # each id once, both runs' rows
    assert table.search().where("id = 'd1'").to_arrow()[S.RUN_ID][0].as_py() == "run-a"
    tags = table.tags.list()
    assert tags["run-b"]["version"] == version_b == table.version and tags["run-a"]["version"] == version_b - 1


def test_credentials_never_printed(s3, tiny_model):
    from pipelines.index.corpus import expand_paths
    from pipelines.report import redact_uri
    from pipelines.store.objstore import lance_location, redact, redact_all, split_credentials

    uri = f"s3://{s3.key_id}:{quote(s3.secret, safe='')}@{BUCKET}/x/db"  # a secret in a URI is percent-encoded
    assert redact_uri(uri) == f"s3://***@{BUCKET}/x/db"
    assert redact_uri(f"s3://{s3.key_id}:{s3.secret}@{BUCKET}/x/db") == f"s3://***@{BUCKET}/x/db"  # or not
    assert lance_location(uri, {"allow_http": "true"}) == (
        f"s3://{BUCKET}/x/db", {"aws_access_key_id": s3.key_id, "aws_secret_access_key": s3.secret,
                                "allow_http": "true"})
    assert split_credentials(f"gs://{BUCKET}/x") == (f"gs://{BUCKET}/x", {})
    options = s3.options()
    assert redact(f"failed: secret {s3.secret} at {uri}", options) == f"failed: secret *** at s3://***@{BUCKET}/x/db"
    report = redact_all({"error": f"x {s3.secret}", "paths": [uri], "n": 1}, options)
    assert report == {"error": "x ***", "paths": [f"s3://***@{BUCKET}/x/db"], "n": 1}
    with pytest.raises(FileNotFoundError) as info:
        expand_paths(uri.replace("/x/db", "/none/*.jsonl"), {"endpoint": s3.endpoint, "region": REGION})
    assert str(info.value) == f"corpus.path pattern 's3://***@{BUCKET}/none/*.jsonl' matched no files; check the path"
    cfg = config(s3, "x", tiny_model)
    assert s3.secret not in repr(cfg) and s3.secret not in str(cfg.storage)
    assert cfg.storage.storage_options["allow_http"] == "true"  # a YAML boolean, as LanceDB takes it


def test_run_lock_on_an_object_store(s3):
    """No flock on S3: a lease rewritten by heartbeats. A live one refuses a second run; one whose heartbeat is
    older than lock.stale_seconds (a killed run's) is taken over."""
    from pipelines.cluster.locks import LockBusy, RunLock
    from pipelines.config import parse_config

    st = parse_config({"storage": {"uri": f"s3://{BUCKET}/locks/db", "storage_options": s3.options()}}).storage
    first = RunLock(st, "passages", "index-1", job="index", stale_seconds=60).acquire()
    with pytest.raises(LockBusy, match="run index-1"):
        RunLock(st, "passages", "index-2", job="index", stale_seconds=60).acquire()
    first._stop.set()  # the holder dies: no more heartbeats, no release
    time.sleep(2.2)
    with RunLock(st, "passages", "index-3", job="index", stale_seconds=2) as lock:
        assert lock.report["took_over"]["run_id"] == "index-1"
        assert "locks/db/_locks/passages.lock.json" in s3.keys("locks/db/_locks")
    assert "locks/db/_locks/passages.lock.json" not in s3.keys("locks/db/_locks")  # released


def test_a_run_whose_lease_another_run_took_does_not_commit(s3, ray_per_module, tiny_model, monkeypatch):
    """The lease is checked right before the commit: a run that lost it (it stalled, and another run took the
    table over) fails with LockLost naming that run, and publishes nothing."""
    from pipelines.cluster.locks import LockLost

    s3.put_jsonl("lost/in/docs.jsonl", good_docs(12))
    cfg = config(s3, "lost", tiny_model)
    index.run(cfg)
    before = Store(cfg.storage).passages().version
    s3.put_jsonl("lost/in/docs.jsonl", good_docs(15))
    real = index.maybe_fail

    def another_run_takes_the_lease(point: str) -> None:
        if point == "before_commit":  # as if this run had stalled past lock.stale_seconds and run B took over
            s3.client.put_object(Bucket=BUCKET, Key="lost/db/_locks/passages.lock.json", Body=json.dumps(
                {"run_id": "index-20261206T000000Z-b0b0b0", "job": "index", "pid": 1, "host": "elsewhere",
                 "token": "run-b", "state": "held"}).encode())
        real(point)

    monkeypatch.setattr(index, "maybe_fail", another_run_takes_the_lease)
    with pytest.raises(LockLost, match="index-20261206T000000Z-b0b0b0"):
        index.run(cfg)
    assert Store(cfg.storage).passages().version == before and Store(cfg.storage).passages().count_rows() == 12
    lease = json.loads(s3.client.get_object(Bucket=BUCKET, Key="lost/db/_locks/passages.lock.json")["Body"].read())
    assert lease["token"] == "run-b"  # the run that lost the lease left run B's lease alone
