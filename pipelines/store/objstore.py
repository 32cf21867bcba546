"""Object storage (``s3://``, ``gs://``, ...): credentials, endpoint and redaction in one place.

Every reader and writer of a URI goes through here:

- ``lance_location(uri, options)``: the URI and ``storage_options`` for LanceDB / Lance;
- ``filesystem(uri, options)``: a pyarrow filesystem and the path inside it (corpus, query logs, reports); for
  S3 it carries the credentials and endpoint and pickles with them, so Ray read tasks in other processes or on
  other nodes reach the store without any environment of their own (``ray.data`` readers take it as
  ``filesystem=``);
- ``s3_client(uri, options)``: a boto3 S3 client with the same credentials, region and endpoint, for what
  pyarrow cannot send (conditional writes: the run lock's lease); boto3 is imported only there;
- ``redact(text, options)`` / ``redact_all(obj, options)``: what is safe to print or store.

``options`` is ``storage.storage_options``, with the keys LanceDB takes (``aws_access_key_id``,
``aws_secret_access_key``, ``aws_session_token``, ``aws_region`` or ``region``, ``aws_endpoint`` or
``endpoint``, ``allow_http``, ...). For ``s3://`` what the config leaves out is taken from the usual AWS
environment variables (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
``AWS_ENDPOINT_URL``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``) key by key, as LanceDB itself does (so an
``AWS_SESSION_TOKEN`` in the environment joins keys from the config, in LanceDB too), or from ``KEY:SECRET@`` in
the URI. Without any, the libraries' own credential chains apply (instance profile, ``~/.aws``, IRSA ...).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

# canonical key (as LanceDB names it) → (other names LanceDB accepts for it, environment variables, first set wins)
_KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "aws_access_key_id": (("access_key_id",), ("AWS_ACCESS_KEY_ID",)),
    "aws_secret_access_key": (("secret_access_key",), ("AWS_SECRET_ACCESS_KEY",)),
    "aws_session_token": (("session_token", "aws_token", "token"), ("AWS_SESSION_TOKEN",)),
    "aws_region": (("region", "aws_default_region", "default_region"), ("AWS_REGION", "AWS_DEFAULT_REGION")),
    "aws_endpoint": (("endpoint", "aws_endpoint_url", "endpoint_url"),
                     ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT")),
    "allow_http": (("aws_allow_http",), ("AWS_ALLOW_HTTP",)),
}
_CANONICAL = {name: key for key, (aliases, _) in _KEYS.items() for name in (key, *aliases)}
_S3_SCHEMES = ("s3", "s3+ddb")
_SECRET_KEY = re.compile(r"secret|token|password|account_key|sas", re.IGNORECASE)  # values never shown
_SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# user:password@ after a scheme, up to the first @ (a secret with an unencoded / too; a key with an @ is over-redacted)
_USERINFO = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)[^@\s'\"]+@")


def is_uri(path: str) -> bool:
    return "://" in path


def _is_s3(uri: str) -> bool:
    return is_uri(uri) and uri.split("://", 1)[0].lower() in _S3_SCHEMES


def is_s3(uri: str) -> bool:
    """``s3://`` (or LanceDB's ``s3+ddb://``)."""
    return _is_s3(uri)


def split_credentials(uri: str) -> tuple[str, dict[str, str]]:
    """``s3://KEY:SECRET@bucket/path`` → (``s3://bucket/path``, those credentials as options); other URIs as given."""
    if not _is_s3(uri):
        return uri, {}
    scheme, rest = uri.split("://", 1)
    auth, at, tail = rest.partition("@")
    if not at or "/" in auth:
        return uri, {}
    user, _, password = auth.partition(":")
    creds = {"aws_access_key_id": unquote(user)}
    if password:
        creds["aws_secret_access_key"] = unquote(password)
    return f"{scheme}://{tail}", creds


def s3_options(uri: str, options: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The storage options for ``uri`` as LanceDB takes them: the configured ones (names made canonical), and for
    ``s3://`` what they leave out from the URI's ``KEY:SECRET@`` and the AWS environment variables. An ``http://``
    endpoint implies ``allow_http``."""
    given = {str(k): str(v) for k, v in (options or {}).items()}
    if not _is_s3(uri):
        return given
    out = {k: v for k, v in given.items() if k.lower() not in _CANONICAL}  # timeouts, ...: passed as they are
    found = split_credentials(uri)[1]
    found.update({_CANONICAL[k.lower()]: v for k, v in given.items() if k.lower() in _CANONICAL})
    for key, (_, env_names) in _KEYS.items():
        if key in found:
            continue
        value = next((os.environ[n] for n in env_names if os.environ.get(n)), None)
        if value:
            found[key] = value
    if found.get("aws_endpoint", "").lower().startswith("http://"):
        found.setdefault("allow_http", "true")
    return {**out, **found}


def lance_location(uri: str, options: Mapping[str, Any] | None = None) -> tuple[str, dict[str, str] | None]:
    """``(uri, storage_options)`` for ``lancedb.connect`` / ``lance.dataset``: credentials out of the URI, into
    the options (None when there are none)."""
    return split_credentials(uri)[0], s3_options(uri, options) or None


def filesystem(uri: str, options: Mapping[str, Any] | None = None):
    """``(pyarrow filesystem, path inside it)`` for a local path or a URI. ``s3://`` gets an ``S3FileSystem`` with
    the credentials, region and endpoint of ``s3_options``; other schemes pyarrow's own resolution."""
    import pyarrow.fs as pafs

    if not is_uri(uri):
        return pafs.LocalFileSystem(), uri
    if not _is_s3(uri):
        return pafs.FileSystem.from_uri(uri)
    opts, path = s3_options(uri, options), _s3_path(uri)
    endpoint, region = opts.get("aws_endpoint"), opts.get("aws_region")
    if not endpoint and not region:  # as pyarrow's from_uri does: the bucket's own region
        region = _bucket_region(path.split("/", 1)[0])
    kwargs = {"access_key": opts.get("aws_access_key_id"), "secret_key": opts.get("aws_secret_access_key"),
              "session_token": opts.get("aws_session_token"), "region": region, "endpoint_override": endpoint}
    if endpoint and not is_uri(endpoint):  # host:port
        kwargs["scheme"] = "http" if _true(opts.get("allow_http")) else "https"
    if _true(opts.get("aws_virtual_hosted_style_request") or opts.get("virtual_hosted_style_request")):
        kwargs["force_virtual_addressing"] = True
    return pafs.S3FileSystem(**{k: v for k, v in kwargs.items() if v}), path


def s3_client(uri: str, options: Mapping[str, Any] | None = None):
    """``(boto3 S3 client, bucket, key)`` for an ``s3://`` URI, with the credentials, region and endpoint that
    ``filesystem`` resolves (``s3_options``; without keys, boto3's own credential chain). Short timeouts and few
    retries: its callers (the lock's heartbeat) must not hang. For conditional writes (``IfMatch`` /
    ``IfNoneMatch``), which pyarrow cannot send. Clients are thread-safe and made once per store and keys."""
    if not _is_s3(uri):
        raise ValueError(f"not an s3:// URI: {redact(uri, options)}")
    bucket, _, key = _s3_path(uri).partition("/")
    return _boto3_client(tuple(sorted(s3_options(uri, options).items())), bucket), bucket, key


@functools.lru_cache(maxsize=16)
def _boto3_client(options: tuple[tuple[str, str], ...], bucket: str):
    import boto3
    from botocore.config import Config

    opts = dict(options)
    endpoint, region = opts.get("aws_endpoint"), opts.get("aws_region")
    if not endpoint and not region:  # as filesystem() does: the bucket's own region
        region = _bucket_region(bucket)
    if endpoint and not is_uri(endpoint):  # host:port
        endpoint = ("http://" if _true(opts.get("allow_http")) else "https://") + endpoint
    virtual = _true(opts.get("aws_virtual_hosted_style_request") or opts.get("virtual_hosted_style_request"))
    # path-style on a custom endpoint, as LanceDB and pyarrow do; boto3's default (virtual on AWS) otherwise
    style = "virtual" if virtual else ("path" if endpoint else "auto")
    config = Config(connect_timeout=5, read_timeout=10, retries={"max_attempts": 3, "mode": "standard"},
                    s3={"addressing_style": style})
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint or None, region_name=region or None, config=config,
        aws_access_key_id=opts.get("aws_access_key_id"), aws_secret_access_key=opts.get("aws_secret_access_key"),
        aws_session_token=opts.get("aws_session_token"))


def filesystem_paths(uris: list[str], options: Mapping[str, Any] | None = None):
    """``(filesystem, paths inside it)`` for inputs on one store, as Ray Data readers take them (``filesystem=``,
    shipped to every read task with its credentials); ``(None, uris)`` for local paths (Ray resolves those)."""
    if not uris or not is_uri(uris[0]):
        return None, list(uris)
    fs = filesystem(uris[0], options)[0]
    return fs, [_s3_path(u) if _is_s3(u) else filesystem(u, options)[1] for u in uris]


def _s3_path(uri: str) -> str:
    """``s3://[KEY:SECRET@]bucket/key/`` → ``bucket/key``, as pyarrow's ``from_uri`` gives it."""
    return split_credentials(uri)[0].split("://", 1)[1].rstrip("/")


@functools.lru_cache(maxsize=64)
def _bucket_region(bucket: str) -> str | None:
    import pyarrow.fs as pafs

    try:
        return pafs.resolve_s3_region(bucket)
    except OSError:
        return None


def redact(text: str, options: Mapping[str, Any] | None = None) -> str:
    """``text`` without credentials: ``user:password@`` in URIs becomes ``***@``, and the values of secret options
    (of ``options`` and of the AWS environment variables) ``***``."""
    text = _USERINFO.sub(r"\1***@", text)
    for value in _secrets(options):
        text = text.replace(value, "***")
    return text


def redact_all(obj: Any, options: Mapping[str, Any] | None = None) -> Any:
    """``redact`` every string in a structure of dicts and lists (changed in place); returns ``obj``."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            obj[k] = redact(v, options) if isinstance(v, str) else redact_all(v, options)
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            obj[i] = redact(v, options) if isinstance(v, str) else redact_all(v, options)
    return obj


def _secrets(options: Mapping[str, Any] | None) -> list[str]:
    values = {str(v) for k, v in (options or {}).items() if _SECRET_KEY.search(str(k))}
    values |= {os.environ[n] for n in _SECRET_ENV if os.environ.get(n)}
    return sorted((v for v in values if len(v) >= 6), key=len, reverse=True)  # longest first; short ones are no keys


def _true(value: str | None) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")
