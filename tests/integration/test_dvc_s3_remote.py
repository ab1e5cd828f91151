"""DVC with an S3 remote (#29): a data repository whose committed ``.dvc/config`` points its
default remote at S3 with an ``endpointurl`` (moto's server on loopback, as a team's MinIO
would be) is pushed at two tagged versions; a fresh clone pulls the newest, and ``kdpipe
ingest`` reads the older one, whose data is then only in the bucket, through ``data.repo`` and
``data.rev``. The S3 credentials reach dvc and kdpipe through the environment only."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import server_stack
import yaml
from conftest import separable_rows, write_csv
from typer.testing import CliRunner

from kdpipe.cli import app

pytestmark = [pytest.mark.slow, pytest.mark.services]
BIN = str(Path(sys.executable).parent)
BUCKET = "kdpipe-dvc"
REMOTE = f"s3://{BUCKET}/store"
SOURCE = "data/train.csv"
ROWS = {"v1": 60, "v2": 100}


def s3_env(root: Path) -> dict[str, str]:
    """What a user's shell holds for the remote: the keys (never in .dvc/config), nothing from
    ~/.aws, no instance-metadata lookups (169.254.169.254), loopback never through a proxy."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    no_proxy = ",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1"]))
    env.update({
        "AWS_ACCESS_KEY_ID": server_stack.ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": server_stack.SECRET_KEY,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(root / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(root / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "DVC_NO_ANALYTICS": "1",
        "NO_PROXY": no_proxy,
        "no_proxy": no_proxy,
        "PATH": BIN + os.pathsep + os.environ["PATH"],
    })
    return env


def sh(*args: str, cwd: Path, env: dict[str, str]) -> str:
    done = subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, env=env,
                          timeout=300)
    if done.returncode:
        raise AssertionError(f"{' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory):
    """moto's S3 server (a process of its own) on loopback with an empty bucket."""
    for module in ("moto", "dvc_s3"):
        try:
            __import__(module)
        except ImportError:
            why = f"python package {module!r} is missing: pip install -e '.[dev]'"
            if os.environ.get("CI"):
                pytest.fail(f"CI must have it: {why}")
            pytest.skip(why)
    process, endpoint = server_stack.start_moto(tmp_path_factory.mktemp("moto"))
    try:
        server_stack.s3_client(endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        server_stack.stop(process)


@pytest.fixture(scope="module")
def data_repo(s3_endpoint, tmp_path_factory):
    """A git + DVC repository with the S3 remote in its committed config; data/train.csv at
    tag v1 (60 rows) and v2 (100 rows), each pushed. Returns the repo, its environment and,
    per tag, the file's bytes, the commit and the DVC md5."""
    root = tmp_path_factory.mktemp("dvc-s3")
    env = s3_env(root)
    repo = root / "data-repo"
    repo.mkdir()
    sh("git", "init", "-q", cwd=repo, env=env)
    sh("git", "config", "user.name", "kdpipe test", cwd=repo, env=env)
    sh("git", "config", "user.email", "test@example.com", cwd=repo, env=env)
    sh("dvc", "init", "-q", cwd=repo, env=env)
    # As a team on MinIO sets it up: remote and endpoint committed, the keys left out.
    sh("dvc", "remote", "add", "-d", "store", REMOTE, cwd=repo, env=env)
    sh("dvc", "remote", "modify", "store", "endpointurl", s3_endpoint, cwd=repo, env=env)
    versions = {}
    for tag, seed in (("v1", 0), ("v2", 1)):
        write_csv(repo / SOURCE, separable_rows(ROWS[tag], seed=seed))
        sh("dvc", "add", "-q", SOURCE, cwd=repo, env=env)
        sh("git", "add", "-A", cwd=repo, env=env)
        sh("git", "commit", "-qm", f"data {tag}", cwd=repo, env=env)
        sh("git", "tag", tag, cwd=repo, env=env)
        sh("dvc", "push", "-q", cwd=repo, env=env)
        dvc_file = yaml.safe_load((repo / f"{SOURCE}.dvc").read_text())
        versions[tag] = SimpleNamespace(
            data=(repo / SOURCE).read_bytes(), md5=dvc_file["outs"][0]["md5"],
            commit=sh("git", "rev-parse", "HEAD", cwd=repo, env=env).strip())
    return SimpleNamespace(path=repo, root=root, env=env, versions=versions)


@pytest.fixture
def aws_env(data_repo, monkeypatch, tmp_path):
    """The repo's environment for kdpipe in this process; cwd without a params.yaml."""
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in data_repo.env.items():
        if os.environ.get(name) != value:
            monkeypatch.setenv(name, value)
    monkeypatch.chdir(tmp_path)
    return data_repo.env


def clone(data_repo, folder: Path) -> Path:
    sh("git", "clone", "-q", str(data_repo.path), str(folder), cwd=folder.parent,
       env=data_repo.env)
    return folder


def ingest(repo: Path, work: Path, teacher: Path, rev: str = "v1"):
    return CliRunner().invoke(app, [
        "ingest", "-S", f"data.repo={repo}", "-S", f"data.rev={rev}",
        "-S", f"data.source={SOURCE}", "-S", f"work_dir={work}",
        "-S", "tracking.enabled=false", "-S", f"teacher.checkpoint={teacher}"])


def test_push_stores_both_versions_in_the_bucket_and_a_fresh_clone_pulls_the_newest(
        data_repo, s3_endpoint, tmp_path):
    config = (data_repo.path / ".dvc" / "config").read_text()
    assert REMOTE in config and f"endpointurl = {s3_endpoint}" in config
    assert server_stack.ACCESS_KEY not in config and server_stack.SECRET_KEY not in config
    assert not (data_repo.path / ".dvc" / "config.local").exists()

    listed = server_stack.s3_client(s3_endpoint).list_objects_v2(Bucket=BUCKET, Prefix="store/")
    keys = {item["Key"] for item in listed.get("Contents", [])}
    assert keys == {f"store/files/md5/{v.md5[:2]}/{v.md5[2:]}"
                    for v in data_repo.versions.values()}

    copy = clone(data_repo, tmp_path / "clone")
    assert not (copy / SOURCE).exists()  # git holds the .dvc file, not the data
    sh("dvc", "pull", "-q", cwd=copy, env=data_repo.env)
    assert (copy / SOURCE).read_bytes() == data_repo.versions["v2"].data


def test_ingest_reads_an_older_revision_whose_data_is_only_in_the_remote(
        data_repo, aws_env, tmp_path, tiny_bert):
    copy = clone(data_repo, tmp_path / "clone")
    shutil.rmtree(data_repo.path / ".dvc" / "cache", ignore_errors=True)
    v1 = data_repo.versions["v1"]
    local = [p for root in (data_repo.root, tmp_path) for p in root.rglob("*")
             if p.is_file() and p.stat().st_size == len(v1.data) and p.read_bytes() == v1.data]
    assert local == []  # v1's rows are in the bucket and nowhere on this disk

    result = ingest(copy, tmp_path / "work", tiny_bert)
    assert result.exit_code == 0, result.output
    prepared = tmp_path / "work" / "prepared"
    card = json.loads((prepared / "data_card.json").read_text())
    assert sum(card["rows"].values()) == ROWS["v1"]
    assert card["source"] == {"kind": "dvc", "repo": str(copy), "path": SOURCE, "rev": "v1",
                              "git_commit": v1.commit}
    import pyarrow.parquet as pq

    assert sum(pq.read_metadata(prepared / f"{name}.parquet").num_rows
               for name in ("train", "validation", "test")) == ROWS["v1"]
    # Read at the revision, not checked out: the clone is as it was.
    assert not (copy / SOURCE).exists()
    assert sh("git", "status", "--porcelain", cwd=copy, env=aws_env) == ""


@pytest.mark.parametrize("fault", ["unreachable", "forbidden"])
def test_a_bad_remote_is_one_line_naming_data_repo(
        data_repo, aws_env, tmp_path, tiny_bert, monkeypatch, fault):
    copy = clone(data_repo, tmp_path / "clone")
    moto = None
    if fault == "unreachable":
        endpoint = f"http://127.0.0.1:{server_stack.free_port()}"  # nothing listens there
    else:
        # A second S3 that checks signatures: it knows no keys, so ours are wrong there.
        monkeypatch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "0")
        (tmp_path / "moto").mkdir()
        moto, endpoint = server_stack.start_moto(tmp_path / "moto")
    try:
        # A user's own override of the team's endpoint (.dvc/config.local, not committed).
        sh("dvc", "remote", "modify", "--local", "store", "endpointurl", endpoint, cwd=copy,
           env=aws_env)
        started = time.monotonic()
        result = ingest(copy, tmp_path / "work", tiny_bert)
        seconds = time.monotonic() - started
    finally:
        if moto is not None:
            server_stack.stop(moto)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.output
    assert errors[0].startswith(f"error: data.repo '{copy}' at rev 'v1': ")
    expected = {"unreachable": f"cannot reach the DVC remote (Could not connect to the "
                               f"endpoint URL: \"{endpoint}/",
                "forbidden": "no access to the DVC remote (Forbidden); check its "
                             "credentials"}[fault]
    assert expected in errors[0], errors[0]
    assert seconds < 60  # default retries: ~8 s refused, ~2 s forbidden (minutes if it hangs)
    assert not (tmp_path / "work" / "prepared").exists()
