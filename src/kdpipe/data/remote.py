"""Read ``data.source`` from object storage or the web: ``s3://``, ``gs://``, ``http(s)://``.

A URI names one file (CSV, TSV, JSONL, Parquet) or, for s3:// and gs://, a prefix holding
train/validation/test split files, exactly as a local file or folder would. The objects are
downloaded with fsspec into a temporary folder and read there by the local reader
(``read_local``, i.e. ``sources._load_path``). Downloading, rather than opening each object
through fsspec, keeps one reader for local and remote data, so both give byte-identical
prepared splits and the same row/line errors (the readers decode whole files and pyarrow wants
a seekable file); distillation sets are small enough that a copy in ``$TMPDIR`` costs little.

Credentials and the endpoint come only from the standard environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``,
``AWS_ENDPOINT_URL[_S3]``, which botocore reads itself; ``MLFLOW_S3_ENDPOINT_URL`` as a
fallback endpoint; gcsfs's Google defaults for gs://). Every URI shown in an error or in the
data card goes through ``redact`` first.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable
from fnmatch import fnmatchcase as fnmatch
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from kdpipe.config import DataConfig
from kdpipe.data.readers import FORMATS, Source
from kdpipe.errors import DataError

SCHEMES = ("s3", "gs", "gcs", "http", "https")
# botocore's defaults (60 s connect timeout, up to 5 attempts with backoff) turn an unreachable
# endpoint into minutes of silence; these fail in seconds and still ride out one blip.
CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 60
MAX_ATTEMPTS = 2
_DENIED_CODES = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
                 "InvalidToken", "AllAccessDisabled", "403", "401"}


def is_remote(source: str) -> bool:
    """True when ``source`` is a URI this module reads (s3://, gs://, http(s)://)."""
    return "://" in source and urlsplit(source).scheme.lower() in SCHEMES


def redact(uri: str) -> str:
    """``uri`` without user:password@, nor an http(s) query (pre-signed URLs carry keys there;
    an s3:// query is only ``versionId=``)."""
    parts = urlsplit(uri)
    netloc = parts.netloc.rpartition("@")[2]
    query = parts.query
    if query and parts.scheme.lower() not in ("s3", "gs", "gcs"):
        query = "<query hidden>"
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def load_remote(cfg: DataConfig, read_local: Callable[[Path, DataConfig], Source],
                every_file: bool = False) -> Source:
    """Download what ``cfg.source`` names and read it with ``read_local``; provenance lists
    each object's path, size, ETag and version id (where the store keeps versions). Of a
    prefix, the split files only, or with ``every_file`` each file of a known format."""
    shown = redact(cfg.source)
    scheme = urlsplit(cfg.source).scheme.lower()
    fs, path = _filesystem(cfg.source, scheme, shown)
    with tempfile.TemporaryDirectory(prefix="kdpipe-remote-") as tmp:
        try:
            local, names, objects = _download(fs, path, scheme, Path(tmp), cfg, shown,
                                              every_file)
        except DataError:
            raise
        except Exception as exc:  # s3fs, gcsfs, aiohttp and botocore each raise their own types
            raise DataError(_explain(exc, fs, path, scheme, shown, cfg.source)) from None
        try:
            source = read_local(local, cfg)
        except DataError as exc:
            raise DataError(_rename(str(exc), names)) from None
    for split in source.splits.values():
        split.origin = _rename(split.origin, names)
    source.provenance = {"kind": "object_storage", "uri": shown, "objects": objects}
    return source


def _filesystem(uri: str, scheme: str, shown: str) -> tuple[Any, str]:
    import fsspec

    # A fresh instance each time: fsspec's instance cache would otherwise keep the credentials
    # and endpoint of the first call (and we change its retry count below).
    options: dict[str, Any] = {"skip_instance_cache": True}
    if scheme == "s3":
        options["config_kwargs"] = {
            "connect_timeout": CONNECT_TIMEOUT_S, "read_timeout": READ_TIMEOUT_S,
            "retries": {"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
        }
        # s3://bucket/key?versionId=... pins one version; s3fs accepts that only when asked to
        options["version_aware"] = "versionId=" in urlsplit(uri).query
        endpoint = _s3_endpoint()
        if endpoint and not _aws_endpoint():  # botocore reads AWS_ENDPOINT_URL* itself
            options["endpoint_url"] = endpoint
    elif scheme in ("http", "https"):
        import aiohttp

        options["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(
            total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=READ_TIMEOUT_S)}
    try:
        fs, path = fsspec.core.url_to_fs(uri, **options)
    except ImportError:
        if scheme in ("gs", "gcs"):
            raise DataError(
                f"{shown}: reading gs:// needs gcsfs, which is not installed; "
                "pip install 'kdpipe[gcs]'"
            ) from None
        raise
    if scheme == "s3":
        fs.retries = MAX_ATTEMPTS  # s3fs's own retry loop, on top of botocore's (default 5)
    return fs, path


def _aws_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _s3_endpoint() -> str | None:
    return _aws_endpoint() or os.environ.get("MLFLOW_S3_ENDPOINT_URL")


def _download(fs: Any, path: str, scheme: str, dest: Path, cfg: DataConfig,
              shown: str, every_file: bool = False,
              ) -> tuple[Path, dict[str, str], list[dict[str, Any]]]:
    """Copy the file, or the split files under the prefix, into ``dest``.

    Returns the local path to read, {local path: URI shown to the user}, and provenance."""
    info = fs.info(path)
    if info.get("type") != "directory":
        local = dest / (PurePosixPath(urlsplit(path).path).name or "source")
        if local.suffix.lower() not in FORMATS:  # say so before downloading it
            known = ", ".join(sorted(FORMATS))
            folders = "; folders of split files need s3:// or gs://" if scheme.startswith(
                "http") else ""
            raise DataError(f"{shown}: unknown format {local.suffix or '(no extension)'!r}; "
                            f"use {known}{folders}")
        fs.get_file(path, str(local))  # get() would glob-expand a "?" or "[" in the key
        return local, {str(local): shown}, [_describe(info, scheme)]
    # Only the split files: a prefix may hold much else, and _load_path looks at nothing more.
    # An empty or split-less prefix is reported by read_local ("no train.csv ... file").
    patterns = (["*"] if every_file  # as _load_path globs
                else [f"{name}.*" for name in cfg.splits.model_dump().values()])
    wanted = [
        entry["name"] for entry in fs.ls(path, detail=True)
        if entry.get("type") == "file"
        and PurePosixPath(entry["name"]).suffix.lower() in FORMATS
        and any(fnmatch(PurePosixPath(entry["name"]).name, p) for p in patterns)
    ]
    fs.invalidate_cache()  # listings carry no version id; info() below asks for it per object
    renames = {str(dest): shown}
    objects = []
    for remote in wanted:
        local = dest / PurePosixPath(remote).name
        fs.get_file(remote, str(local))
        renames[str(local)] = f"{shown.rstrip('/')}/{local.name}"
        objects.append(_describe(fs.info(remote), scheme))
    return dest, renames, objects


def _describe(info: dict[str, Any], scheme: str) -> dict[str, Any]:
    name = info["name"]
    entry: dict[str, Any] = {
        "path": redact(name) if scheme in ("http", "https") else f"{scheme}://{name}",
        "size": info.get("size"),
    }
    etag = info.get("ETag") or info.get("etag")
    if etag:
        entry["etag"] = str(etag).strip('"')
    version = info.get("VersionId") or info.get("generation")
    if version:
        entry["version_id"] = str(version)
    return entry


def _rename(text: str, names: dict[str, str]) -> str:
    """Put the remote URIs back where the temporary local paths appear in ``text``."""
    for local in sorted(names, key=len, reverse=True):
        text = text.replace(local, names[local])
    return text


def _explain(exc: BaseException, fs: Any, path: str, scheme: str, shown: str,
             uri: str) -> str:
    """One line naming ``shown``, what went wrong, and the fix where there is an obvious one."""
    chain = _chain(exc)
    kinds = {type(e).__name__ for e in chain}
    codes = {_code(e) for e in chain} - {None}
    store = "the server" if scheme in ("http", "https") else f"bucket {path.split('/')[0]!r}"
    if "NoCredentialsError" in kinds:
        return (f"{shown}: no AWS credentials found; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or give the pod an IAM role)")
    if codes & _DENIED_CODES or any(isinstance(e, PermissionError) for e in chain):
        code = _denial_code(fs, path, scheme, codes)
        return f"{shown}: access denied ({code}); {_credentials_hint(scheme, store)}"
    # Before "not found": fsspec's HTTP info() reports a refused connection as FileNotFoundError.
    if _is_unreachable(chain, kinds):
        return f"{shown}: cannot reach {_where(scheme, uri)}; {_reach_hint(scheme)}"
    if any(isinstance(e, FileNotFoundError) for e in chain) or codes & {"404", "NoSuchKey",
                                                                        "NoSuchBucket"}:
        return _not_found(fs, path, scheme, shown, codes)
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    first = re.sub(r"[a-z0-9+.-]+://[^\s'\"]+", lambda m: redact(m.group()), first)
    return f"{shown}: reading failed ({type(exc).__name__}: {first[:200]})"


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def _code(exc: BaseException) -> str | None:
    """The S3 error code of a botocore ClientError, or the status of an aiohttp error."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return response.get("Error", {}).get("Code")
    status = getattr(exc, "status", None)
    return str(status) if isinstance(status, int) else None


def _denial_code(fs: Any, path: str, scheme: str, codes: set[str]) -> str:
    """The store's reason for a refusal. A HEAD response has no body, so S3 answers a bad key
    with a bare 403; one LIST, which does carry a body, names it (InvalidAccessKeyId, ...)."""
    named = sorted(codes & _DENIED_CODES - {"401", "403"})
    if named or scheme != "s3":
        return (named or sorted(codes & _DENIED_CODES) or ["403"])[0]
    try:
        fs.call_s3("list_objects_v2", Bucket=path.split("/")[0], MaxKeys=1)
    except Exception as exc:  # the refusal we expect; anything else leaves the bare 403
        named = sorted({_code(e) for e in _chain(exc)} & _DENIED_CODES - {"401", "403"})
    return (named or ["403"])[0]


def _not_found(fs: Any, path: str, scheme: str, shown: str, codes: set[str]) -> str:
    if scheme in ("http", "https"):
        return f"{shown}: not found on the server (HTTP 404); check the URL"
    bucket, _, key = path.partition("/")
    if "NoSuchBucket" in codes or not key or not _exists(fs, bucket):
        return (f"{shown}: bucket {bucket!r} does not exist at {_where(scheme, shown)}; "
                f"check the bucket name{' and AWS_ENDPOINT_URL' if scheme == 's3' else ''}")
    listing = f"{scheme}://{bucket}/{key.rpartition('/')[0]}"
    if PurePosixPath(key).suffix:
        return f"{shown}: no such object in bucket {bucket!r}; check the key (see {listing})"
    return (f"{shown}: no objects under this prefix; upload train.csv (and validation/test) "
            "there or fix the path")


def _exists(fs: Any, bucket: str) -> bool:
    try:
        return bool(fs.exists(bucket))
    except Exception:  # a probe only: on doubt, report the key rather than the bucket
        return True


def _is_unreachable(chain: list[BaseException], kinds: set[str]) -> bool:
    network = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError",
               "ConnectionClosedError", "ClientConnectorError", "ServerTimeoutError",
               "ClientOSError", "ServerDisconnectedError"}
    return bool(kinds & network) or any(
        isinstance(e, (TimeoutError, ConnectionError)) for e in chain
    )


def _where(scheme: str, uri: str) -> str:
    if scheme == "s3":
        endpoint = _s3_endpoint()
        return redact(endpoint) if endpoint else "the AWS S3 endpoint"
    if scheme in ("gs", "gcs"):
        return "Google Cloud Storage"
    return redact(f"{scheme}://{urlsplit(uri).netloc}")


def _reach_hint(scheme: str) -> str:
    if scheme == "s3":
        return ("check AWS_ENDPOINT_URL (e.g. http://minio.example:9000) and that the pod "
                "can reach it")
    return "check the address and that this machine can reach it"


def _credentials_hint(scheme: str, store: str) -> str:
    if scheme == "s3":
        return ("check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN, and "
                f"that they may read {store}")
    if scheme in ("gs", "gcs"):
        return f"check GOOGLE_APPLICATION_CREDENTIALS and that it may read {store}"
    return "the URL needs credentials this machine does not have"
