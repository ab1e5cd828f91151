"""``submit``: create a run of the kdpipe DAG on a Kubeflow Pipelines endpoint.

Credentials come from the environment only, never from files in the repository:

- ``KF_PIPELINES_TOKEN``: a bearer token made outside kdpipe (an OIDC id token, or
  ``gcloud auth print-access-token`` for an IAP-protected endpoint);
- ``KF_PIPELINES_SA_TOKEN_PATH``: a Kubernetes service-account token file (the projected
  token inside a cluster pod), re-read on every request as kfp does;
- neither: no authentication (``kubectl port-forward`` to ml-pipeline-ui, a dev cluster).

The host is checked first with a few quick attempts, so a wrong or unreachable endpoint
fails in seconds with one line, before anything is compiled.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from kdpipe.config import Config
from kdpipe.errors import KdpipeError

TOKEN_ENV = "KF_PIPELINES_TOKEN"
SA_TOKEN_ENV = "KF_PIPELINES_SA_TOKEN_PATH"  # kfp.client.KF_PIPELINES_SA_TOKEN_ENV
HEALTHZ = "/apis/v2beta1/healthz"


@dataclass(frozen=True)
class Submission:
    """A run created on the endpoint: its id, where to watch it, and its experiment."""

    run_id: str
    url: str
    experiment: str


def submit(host: str, experiment: str, cfg: Config, *, run_name: str | None = None,
           enable_caching: bool | None = None, namespace: str | None = None,
           attempts: int = 3, timeout: float = 5.0) -> Submission:
    """Compile the DAG with ``cfg`` as its parameters and start it on ``host`` (e.g.
    ``http://localhost:8080``, or ``https://kubeflow.example.com/pipeline``) in
    ``experiment``.

    ``enable_caching`` None follows ``kfp.enable_caching``; False reruns every task (the
    DAG is compiled so: kfp's own switch misses the tasks inside loops and conditions).
    ``cfg.kfp`` gives the images and the pipeline root. Raises ``KdpipeError`` (one line)
    when the host is unreachable after ``attempts`` tries of ``timeout`` seconds, refuses
    the credentials, or is not a KFP API, and when ``cfg`` cannot work on a cluster.
    """
    from kdpipe.kfp.pipeline import compile_pipeline, pipeline_arguments, quiet_kfp

    host = _checked_host(host)
    token = _token()
    check_reachable(host, token, attempts=attempts, timeout=timeout)
    check_cluster_config(cfg)
    if enable_caching is not None:
        cfg = cfg.model_copy(update={"kfp": cfg.kfp.model_copy(
            update={"enable_caching": enable_caching})})
    arguments = pipeline_arguments(cfg)
    with tempfile.TemporaryDirectory(prefix="kdpipe-submit-") as tmp, quiet_kfp(), \
            _api_errors(host), contextlib.redirect_stdout(io.StringIO()):
        # kfp prints "Run details: <link>" itself; the caller prints the Submission.
        package = compile_pipeline(Path(tmp) / "kdpipe.yaml", cfg)
        result = _client(host, token, namespace).create_run_from_pipeline_package(
            str(package), arguments=arguments, run_name=run_name, experiment_name=experiment,
            namespace=namespace, pipeline_root=cfg.kfp.pipeline_root,
            enable_caching=cfg.kfp.enable_caching)
    return Submission(result.run_id, f"{host}/#/runs/details/{result.run_id}", experiment)


def check_reachable(host: str, token: str | None = None, *, attempts: int = 3,
                    timeout: float = 5.0) -> None:
    """GET the endpoint's healthz, retrying connection failures and 5xx answers
    (``attempts`` tries, backing off 0.5 s, 1 s, ...); anything else fails at once."""
    url = host + HEALTHZ
    # No proxy from the environment: kfp.Client does not use one either, so a check that
    # went through a proxy could pass while the client then fails.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    problem = ""
    for attempt in range(max(1, attempts)):
        if attempt:
            time.sleep(0.5 * 2 ** (attempt - 1))
        try:
            with opener.open(urllib.request.Request(url, headers=headers),
                             timeout=timeout) as response:
                _check_json(host, response.read(65536))
                return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                raise KdpipeError(_refusal(host, exc.code, exc.reason)) from None
            problem = f"HTTP {exc.code} {exc.reason}"
        except (urllib.error.URLError, OSError) as exc:
            problem = _reason(exc)
    raise KdpipeError(f"KFP host {host} unreachable after {max(1, attempts)} attempts: "
                      f"{problem}")


def check_cluster_config(cfg: Config) -> None:
    """Settings that cannot work inside cluster pods, as one-line errors."""
    uri = cfg.tracking.uri
    # With kfp.secrets.mlflow the pods get MLFLOW_TRACKING_URI from the Secret, which wins.
    if cfg.tracking.enabled and not cfg.kfp.secrets.mlflow and (
            not uri or uri.startswith(("sqlite:", "file:")) or "://" not in uri):
        got = repr(uri) if uri else "null, a SQLite file inside each pod, lost with it"
        raise KdpipeError(f"tracking.uri: a cluster run needs an MLflow server its pods can "
                          f"reach (got {got}); set -S tracking.uri=http://HOST:5000 or "
                          "-S kfp.secrets.mlflow=SECRET, or -S tracking.enabled=false")
    fixes = {"data.source": "upload it to object storage and give its s3://, gs:// or "
                            "https:// URI",
             "teacher.checkpoint": "give a hub id, or build an image that holds the folder "
                                   "and give its path there"}
    for key, value in (("data.source", cfg.data.source),
                       ("teacher.checkpoint", cfg.teacher.checkpoint)):
        if value not in ("demo", "default") and "://" not in value and \
                Path(value).expanduser().exists():
            raise KdpipeError(f"{key}: {value} is a path on this machine, which the pods do "
                              f"not have; {fixes[key]}")


def _checked_host(host: str) -> str:
    host = host.strip().rstrip("/")
    if not host.startswith(("http://", "https://")):
        raise KdpipeError(f"KFP host {host!r}: give the scheme, e.g. http://localhost:8080")
    return host


def _token() -> str | None:
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token:
        return token
    path = os.environ.get(SA_TOKEN_ENV)
    if not path:
        return None
    try:
        return Path(path).read_text(encoding="utf-8").strip() or None
    except OSError as exc:
        raise KdpipeError(f"{SA_TOKEN_ENV}={path}: cannot read the token: "
                          f"{exc.strerror or exc}") from None


def _client(host: str, token: str | None, namespace: str | None) -> object:
    import kfp
    from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

    # The service-account token rotates: let kfp re-read the file rather than pass a copy.
    if token and not os.environ.get(TOKEN_ENV) and os.environ.get(SA_TOKEN_ENV):
        return kfp.Client(host=host, credentials=ServiceAccountTokenVolumeCredentials(),
                          namespace=namespace or "kubeflow")
    return kfp.Client(host=host, existing_token=token, namespace=namespace or "kubeflow")


@contextlib.contextmanager
def _api_errors(host: str):
    """kfp's API and transport errors as one line naming the host."""
    from kfp_server_api.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        yield
    except ApiException as exc:
        detail = _first_line(exc.body or "") if isinstance(exc.body, str) else ""
        raise KdpipeError(f"KFP host {host}: HTTP {exc.status} {exc.reason}"
                          + (f": {detail}" if detail else "")) from None
    except HTTPError as exc:
        raise KdpipeError(f"KFP host {host}: {_first_line(str(exc))}") from None


def _check_json(host: str, body: bytes) -> None:
    try:
        json.loads(body or b"{}")
    except ValueError:
        raise KdpipeError(f"KFP host {host}: {HEALTHZ} answered with something other than "
                          f"JSON (a login page? set {TOKEN_ENV})") from None


def _refusal(host: str, code: int, reason: str) -> str:
    if code in (401, 403):
        return (f"KFP host {host}: HTTP {code} {reason}: not authorised; set {TOKEN_ENV} "
                f"(a bearer token) or {SA_TOKEN_ENV} (a service-account token file)")
    if code == 404:
        return (f"KFP host {host}: no Kubeflow Pipelines API at {HEALTHZ} (HTTP 404); behind "
                "the Kubeflow dashboard the host usually ends in /pipeline")
    return f"KFP host {host}: {HEALTHZ} answered HTTP {code} {reason}"


def _reason(exc: BaseException) -> str:
    reason = getattr(exc, "reason", exc)
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return _first_line(str(reason)) or type(exc).__name__


def _first_line(text: str) -> str:
    text = text.strip()
    return text.splitlines()[0][:300] if text else ""
