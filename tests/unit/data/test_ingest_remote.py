"""data.source as an object-storage or web URI: s3:// against moto's S3 server and https:// against
a local http.server, both on 127.0.0.1; every failure is one line naming the URI."""

from __future__ import annotations

import contextlib
import functools
import json
import socket
import threading
import time
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import separable_rows, write_csv
from typer.testing import CliRunner

from kdpipe.cli import app
from kdpipe.config import DataConfig
from kdpipe.data.sources import load_source
from kdpipe.errors import DataError
from kdpipe.steps import ingest

BUCKET = "kdpipe-data"
VERSIONED = "kdpipe-versioned"
ROWS = separable_rows(200)
FOLDER_ROWS = separable_rows(60, seed=1)
FAKE = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing",
        "region_name": "us-east-1"}


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server on a free loopback port, for this module."""
    import logging

    from moto.server import ThreadedMotoServer

    werkzeug = logging.getLogger("werkzeug")
    level = werkzeug.level
    werkzeug.setLevel(logging.ERROR)  # one access-log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
    werkzeug.setLevel(level)


@pytest.fixture(scope="module")
def objects(s3_endpoint, tmp_path_factory):
    """Fill the buckets: reviews.csv, a folder ds/ of split files (and a stray notes.txt),
    bad.csv (not UTF-8), reviews.xlsx, and reviews.csv again in a versioned bucket. Returns
    the client."""
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint, **FAKE)
    tmp = tmp_path_factory.mktemp("upload")
    s3.create_bucket(Bucket=BUCKET)
    s3.upload_file(str(write_csv(tmp / "reviews.csv", ROWS)), BUCKET, "reviews.csv")
    for name, part in (("train", FOLDER_ROWS[:40]), ("validation", FOLDER_ROWS[40:50]),
                       ("test", FOLDER_ROWS[50:])):
        s3.upload_file(str(write_csv(tmp / f"{name}.csv", part)), BUCKET, f"ds/{name}.csv")
    s3.put_object(Bucket=BUCKET, Key="ds/notes.txt", Body=b"not a split")
    s3.put_object(Bucket=BUCKET, Key="unl/a.csv", Body=b"text\nfirst unlabeled\n")
    s3.put_object(Bucket=BUCKET, Key="unl/b.jsonl", Body=b'{"text": "second unlabeled"}\n')
    s3.put_object(Bucket=BUCKET, Key="unl/readme.txt", Body=b"not texts")
    s3.put_object(Bucket=BUCKET, Key="bad.csv", Body=b"text,label\ngood one,pos\ncaf\xe9,neg\n")
    s3.put_object(Bucket=BUCKET, Key="reviews.xlsx", Body=b"PK\x03\x04")
    s3.create_bucket(Bucket=VERSIONED)
    s3.put_bucket_versioning(Bucket=VERSIONED,
                             VersioningConfiguration={"Status": "Enabled"})
    s3.upload_file(str(tmp / "reviews.csv"), VERSIONED, "reviews.csv")
    return s3


@pytest.fixture
def aws_env(s3_endpoint, objects, monkeypatch, tmp_path):
    """Fake credentials and the moto endpoint in the environment, nothing from ~/.aws, and no
    instance-metadata probe (it would leave 127.0.0.1)."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3",
                 "MLFLOW_S3_ENDPOINT_URL", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE["aws_secret_access_key"])
    monkeypatch.setenv("AWS_DEFAULT_REGION", FAKE["region_name"])
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")  # botocore honours HTTP(S)_PROXY
    return s3_endpoint


@pytest.fixture
def cli(tmp_path, monkeypatch, tiny_bert):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()

    def invoke(source: str):
        return runner.invoke(app, [
            "ingest", "-S", f"data.source={source}", "-S", f"teacher.checkpoint={tiny_bert}",
            "-S", "tracking.enabled=false", "-S", f"work_dir={tmp_path / 'work'}",
        ])

    return invoke


def _one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def _etag(s3, bucket: str, key: str) -> str:
    return s3.head_object(Bucket=bucket, Key=key)["ETag"].strip('"')


def test_csv_object_is_read_like_the_local_file(aws_env, objects):
    source = load_source(DataConfig(source=f"s3://{BUCKET}/reviews.csv"))
    train = source.splits["train"]
    assert list(source.splits) == ["train"]
    assert train.origin == f"s3://{BUCKET}/reviews.csv"
    assert list(zip(train.texts, train.labels, strict=True)) == ROWS
    assert source.provenance["kind"] == "object_storage"
    assert source.provenance["objects"] == [{
        "path": f"s3://{BUCKET}/reviews.csv",
        "size": objects.head_object(Bucket=BUCKET, Key="reviews.csv")["ContentLength"],
        "etag": _etag(objects, BUCKET, "reviews.csv"),
    }]


def test_prefix_of_split_files_is_read_like_a_local_folder(aws_env, objects):
    source = load_source(DataConfig(source=f"s3://{BUCKET}/ds/"))
    assert {role: len(split.texts) for role, split in source.splits.items()} == \
        {"train": 40, "validation": 10, "test": 10}
    assert source.splits["validation"].origin == f"s3://{BUCKET}/ds/validation.csv"
    assert source.splits["test"].texts == [text for text, _ in FOLDER_ROWS[50:]]
    listed = {o["path"]: o["etag"] for o in source.provenance["objects"]}
    assert listed == {f"s3://{BUCKET}/ds/{n}.csv": _etag(objects, BUCKET, f"ds/{n}.csv")
                      for n in ("train", "validation", "test")}  # notes.txt not fetched


def test_a_prefix_of_unlabeled_texts_is_every_file_under_it(aws_env, objects):
    from kdpipe.data.sources import load_unlabeled

    source = load_unlabeled(DataConfig(unlabeled=f"s3://{BUCKET}/unl/"))
    split = source.splits["unlabeled"]
    assert split.texts == ["first unlabeled", "second unlabeled"]
    assert split.origin == f"s3://{BUCKET}/unl/"
    assert [o["path"] for o in source.provenance["objects"]] == [
        f"s3://{BUCKET}/unl/a.csv", f"s3://{BUCKET}/unl/b.jsonl"]


def test_versioned_bucket_records_the_version_and_can_pin_one(aws_env, objects):
    first = objects.head_object(Bucket=VERSIONED, Key="reviews.csv")["VersionId"]
    latest = load_source(DataConfig(source=f"s3://{VERSIONED}/reviews.csv"))
    assert latest.provenance["objects"][0]["version_id"] == first
    objects.put_object(Bucket=VERSIONED, Key="reviews.csv", Body=b"text,label\nnew,pos\n")
    pinned = load_source(DataConfig(source=f"s3://{VERSIONED}/reviews.csv?versionId={first}"))
    assert len(pinned.splits["train"].texts) == len(ROWS)
    assert pinned.provenance["uri"] == f"s3://{VERSIONED}/reviews.csv?versionId={first}"
    assert pinned.provenance["objects"][0]["version_id"] == first


def test_mlflow_endpoint_variable_is_the_fallback(aws_env, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", aws_env)
    source = load_source(DataConfig(source=f"s3://{BUCKET}/reviews.csv"))
    assert len(source.splits["train"].texts) == 200


def test_cli_ingest_from_s3_writes_prepared_data_and_a_card(aws_env, objects, cli, tmp_path,
                                                            make_config):
    result = cli(f"s3://{BUCKET}/reviews.csv")
    assert result.exit_code == 0, result.output
    prepared = tmp_path / "work" / "prepared"
    assert {p.name for p in prepared.glob("*.parquet")} == \
        {"train.parquet", "validation.parquet", "test.parquet", "unlabeled.parquet"}
    card = json.loads((prepared / "data_card.json").read_text())
    assert card["source"]["uri"] == f"s3://{BUCKET}/reviews.csv"
    assert card["source"]["objects"][0]["etag"] == _etag(objects, BUCKET, "reviews.csv")
    assert card["rows"] == {"train": 160, "validation": 20, "test": 20}
    local = make_config(**{"data.source": str(write_csv(tmp_path / "same.csv", ROWS)),
                           "work_dir": str(tmp_path / "local")})
    ingest.run(local, local.paths.prepared)
    local_card = json.loads((local.paths.prepared / "data_card.json").read_text())
    assert card["content_hash"] == local_card["content_hash"]


@pytest.mark.parametrize(("uri", "expected"), [
    ("s3://no-such-bucket/reviews.csv",
     ("error: s3://no-such-bucket/reviews.csv: bucket 'no-such-bucket' does not exist at "
      "http://127.0.0.1:{port}; check the bucket name and AWS_ENDPOINT_URL")),
    (f"s3://{BUCKET}/missing.csv",
     (f"error: s3://{BUCKET}/missing.csv: no such object in bucket '{BUCKET}'; check the key "
      f"(see s3://{BUCKET}/)")),
    (f"s3://{BUCKET}/empty/",
     (f"error: s3://{BUCKET}/empty/: no objects under this prefix; upload train.csv (and "
      "validation/test) there or fix the path")),
    (f"s3://{BUCKET}/bad.csv",
     (f"error: s3://{BUCKET}/bad.csv: line 3: not valid UTF-8 (byte 0xe9); save the file as "
      "UTF-8")),
    (f"s3://{BUCKET}/reviews.xlsx",
     (f"error: s3://{BUCKET}/reviews.xlsx: unknown format '.xlsx'; use .csv, .jsonl, "
      ".parquet, .tsv")),
], ids=["missing_bucket", "missing_key", "empty_prefix", "bad_utf8_row", "unknown_format"])
def test_missing_or_bad_objects_are_one_line(aws_env, cli, tmp_path, uri, expected):
    line = _one_error_line(cli(uri))
    assert line == expected.format(port=aws_env.rsplit(":", 1)[1])
    assert not (tmp_path / "work" / "prepared").exists()


@contextlib.contextmanager
def _moto_checks_credentials(endpoint: str):
    """moto accepts any credentials until told to authenticate (its /moto-api/reset-auth)."""
    def reset(value: bytes) -> None:
        request = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=value,
                                         method="POST", headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(request, timeout=10).read()

    reset(b"0")
    try:
        yield
    finally:
        reset(b"inf")


@pytest.mark.parametrize(("wrong", "code"), [("unknown_key", "InvalidAccessKeyId"),
                                             ("wrong_secret", "SignatureDoesNotMatch")])
def test_bad_credentials_are_one_line(aws_env, cli, monkeypatch, wrong, code):
    import boto3

    iam = boto3.client("iam", endpoint_url=aws_env, **FAKE)
    user = f"reader-{wrong}"
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="read", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
    }))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
    with _moto_checks_credentials(aws_env):
        # the right key passes, so what fails below fails for its credentials
        assert load_source(DataConfig(source=f"s3://{BUCKET}/reviews.csv")).splits["train"]
        if wrong == "unknown_key":
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000000")
        else:
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        line = _one_error_line(cli(f"s3://{BUCKET}/reviews.csv"))
    assert line == (
        f"error: s3://{BUCKET}/reviews.csv: access denied ({code}); check AWS_ACCESS_KEY_ID, "
        f"AWS_SECRET_ACCESS_KEY and AWS_SESSION_TOKEN, and that they may read bucket '{BUCKET}'"
    )
    assert "not-the-secret" not in line and key["SecretAccessKey"] not in line


def test_no_credentials_at_all_is_one_line(aws_env, cli, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    line = _one_error_line(cli(f"s3://{BUCKET}/reviews.csv"))
    assert line.startswith(f"error: s3://{BUCKET}/reviews.csv: no AWS credentials found; set "
                           "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_endpoint_fails_within_seconds(aws_env, cli, monkeypatch):
    port = _closed_port()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    started = time.monotonic()
    line = _one_error_line(cli(f"s3://{BUCKET}/reviews.csv"))
    assert time.monotonic() - started < 10  # botocore's defaults take minutes
    assert line.startswith(f"error: s3://{BUCKET}/reviews.csv: cannot reach "
                           f"http://127.0.0.1:{port}; check AWS_ENDPOINT_URL")


def test_gs_without_gcsfs_says_which_extra_to_install(tmp_path):
    with contextlib.suppress(ImportError):
        import gcsfs  # noqa: F401

        pytest.skip("gcsfs is installed here")
    with pytest.raises(DataError) as caught:
        load_source(DataConfig(source="gs://bucket/reviews.csv"))
    assert str(caught.value) == ("gs://bucket/reviews.csv: reading gs:// needs gcsfs, which is "
                                 "not installed; pip install 'kdpipe[gcs]'")
    # The CLI prints it whole: rich would read [gcs] as markup and drop it.
    from typer.testing import CliRunner

    from kdpipe.cli import app

    result = CliRunner().invoke(app, ["ingest", "-S", "data.source=gs://bucket/reviews.csv",
                                      "-S", "tracking.enabled=false",
                                      "-S", f"work_dir={tmp_path / 'work'}"])
    assert result.exit_code == 1
    assert "pip install 'kdpipe[gcs]'" in result.output


@pytest.fixture(scope="module")
def web_root(tmp_path_factory):
    """A local http.server serving reviews.csv; yields (base URL, folder)."""
    folder = tmp_path_factory.mktemp("www")
    write_csv(folder / "reviews.csv", ROWS)

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):  # no access log on stderr
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0),
                                 functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", folder
    server.shutdown()
    server.server_close()
    thread.join()


def test_http_file_is_read_and_credentials_in_the_url_are_not_recorded(web_root):
    base, folder = web_root
    host = base.removeprefix("http://")
    source = load_source(DataConfig(source=f"http://user:hunter2@{host}/reviews.csv?sig=s3cret"))
    train = source.splits["train"]
    assert list(zip(train.texts, train.labels, strict=True)) == ROWS
    shown = f"http://{host}/reviews.csv?<query hidden>"
    assert train.origin == shown
    assert source.provenance["uri"] == shown
    assert source.provenance["objects"][0]["size"] == (folder / "reviews.csv").stat().st_size
    assert "hunter2" not in json.dumps(source.provenance)
    assert "s3cret" not in json.dumps(source.provenance)


def test_http_missing_file_is_one_line_without_the_password(web_root):
    base, _ = web_root
    host = base.removeprefix("http://")
    with pytest.raises(DataError) as caught:
        load_source(DataConfig(source=f"http://user:hunter2@{host}/missing.csv"))
    assert str(caught.value) == (f"http://{host}/missing.csv: not found on the server "
                                 "(HTTP 404); check the URL")


def test_http_unreachable_host_is_one_line():
    port = _closed_port()
    with pytest.raises(DataError, match=rf"^http://127\.0\.0\.1:{port}/r\.csv: cannot reach "
                                        rf"http://127\.0\.0\.1:{port}; check the address"):
        load_source(DataConfig(source=f"http://127.0.0.1:{port}/r.csv"))

