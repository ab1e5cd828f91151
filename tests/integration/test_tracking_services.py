"""A remote MLflow store that does not answer fails the command fast, with one line, before
any step runs; URL credentials never reach MLflow params."""

import http.server
import socket
import threading
import time

import pytest
from typer.testing import CliRunner

from kdpipe import tracking
from kdpipe.cli import app
from kdpipe.errors import KdpipeError


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server():
    """A local HTTP server whose /health answers with ``status[0]``; yields (url, status)."""
    status = [200]

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 -- http.server's naming
            self.send_response(status[0])
            self.end_headers()
            self.wfile.write(b"OK")

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", status
    httpd.shutdown()
    httpd.server_close()


def test_unreachable_server_fails_fast_with_one_line_before_any_work(tmp_path, monkeypatch,
                                                                    separable_csv):
    monkeypatch.chdir(tmp_path)
    uri = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    start = time.perf_counter()
    result = CliRunner().invoke(app, ["run", "-S", f"data.source={separable_csv}",
                                      "-S", f"work_dir={tmp_path / 'w'}"])
    assert time.perf_counter() - start < 15
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) <= 3 and "Traceback" not in result.output
    assert f"MLflow tracking server {uri} is unreachable" in result.output
    assert "tracking.enabled=false" in result.output
    assert not (tmp_path / "w" / "prepared").exists()


def test_probe_retries_then_accepts_a_healthy_server(server):
    url, status = server
    status[0] = 503
    with pytest.raises(KdpipeError, match=r"HTTP 503 after 2 tries"):
        tracking.check_reachable(url, tries=2, timeout=1)
    status[0] = 200
    tracking.check_reachable(url, tries=1, timeout=1)
    assert url in tracking._reachable


def test_credentials_in_urls_are_redacted_from_params():
    params = tracking.flatten({"data": {"source": "https://alice:tok3n@example.org/d.csv"},
                               "tracking": {"uri": "http://bob:pw@127.0.0.1:5000"}})
    assert params == {"data.source": "https://***@example.org/d.csv",
                      "tracking.uri": "http://***@127.0.0.1:5000"}
    assert tracking.redact("data/reviews.csv") == "data/reviews.csv"


def test_a_uri_mlflow_exported_itself_does_not_outrank_the_next_config(tmp_path, monkeypatch,
                                                                       make_config):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = make_config(**{"work_dir": str(tmp_path / "a")})
    second = make_config(**{"work_dir": str(tmp_path / "b")})
    tracking.configure(first)  # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI
    assert tracking.tracking_uri(second).endswith(str(tmp_path / "b" / "mlflow.db"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///" + str(tmp_path / "user.db"))
    tracking.configure(second)
    assert tracking.tracking_uri(first) == "sqlite:///" + str(tmp_path / "user.db")  # the user's
