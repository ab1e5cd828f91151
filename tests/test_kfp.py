"""The Kubeflow Pipelines adapter: the compiled DAG, the checked-in YAML, submitting to an
endpoint (a fake one on 127.0.0.1), and the whole DAG run locally by kfp.local."""

import glob
import http.server
import json
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from kdpipe.config import Config, load_config, validate
from kdpipe.errors import ConfigError, KdpipeError
from kdpipe.kfp import adapter
from kdpipe.kfp.pipeline import compile_pipeline, params_text
from kdpipe.kfp.submit import check_cluster_config, submit

REPO = Path(__file__).resolve().parents[1]
COMPONENTS = {"ingest", "teacher", "baseline", "plan-shards", "soft-label-shard",
              "merge-soft-labels", "fractionate", "distill", "prune", "export", "quantize", "evaluate", "gate",
              "register"}
GPU_TASKS = {"teacher", "soft-label-shard", "export"}
CLUSTER_TRACKING = {"tracking": {"uri": "http://mlflow.example:5000"}}


# ---------------------------------------------------------------- the compiled DAG


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    """The compiled DAG as a dict, after a strict parse into KFP's PipelineSpec message."""
    from google.protobuf import json_format
    from kfp.pipeline_spec import pipeline_spec_pb2

    out = compile_pipeline(tmp_path_factory.mktemp("kfp") / "kdpipe.yaml", Config())
    doc = yaml.safe_load(out.read_text())
    json_format.ParseDict(doc, pipeline_spec_pb2.PipelineSpec())  # unknown fields raise
    return doc


def tasks(spec):
    """{task name: (task spec, its container)} over the root DAG and every sub-DAG."""
    executors = spec["deploymentSpec"]["executors"]
    found = {}
    for component in [spec["root"], *spec["components"].values()]:
        for name, task in component.get("dag", {}).get("tasks", {}).items():
            label = spec["components"][task["componentRef"]["name"]].get("executorLabel")
            if label:
                found[name] = (task, executors[label]["container"])
    return found


def test_the_dag_has_one_task_per_component_and_step(spec):
    assert set(tasks(spec)) == COMPONENTS
    assert spec["pipelineInfo"]["name"] == "kdpipe"


def test_gpu_tasks_ask_for_one_nvidia_gpu_and_run_the_gpu_image(spec):
    with_gpu = set()
    for name, (_, container) in tasks(spec).items():
        accelerator = container.get("resources", {}).get("accelerator")
        if accelerator:
            with_gpu.add(name)
            assert accelerator["resourceType"] == "nvidia.com/gpu"
            assert accelerator["resourceCount"] == "1"
        image = "gpu_image" if name in GPU_TASKS else "cpu_image"
        assert container["image"] == f"{{{{$.inputs.parameters['pipelinechannel--{image}']}}}}"
    assert with_gpu == GPU_TASKS


def test_every_task_requests_cpu_and_memory(spec):
    for name, (_, container) in tasks(spec).items():
        resources = container["resources"]
        assert resources["resourceCpuRequest"] and resources["resourceMemoryRequest"], name


def test_tasks_install_nothing_at_start(spec):
    for name, (_, container) in tasks(spec).items():
        command = " ".join(container["command"])
        assert "pip install" not in command, name
        assert "python3 -m kfp.dsl.executor_main" in command, name


def test_register_runs_only_under_the_gate_and_is_never_cached(spec):
    found = tasks(spec)
    root = spec["root"]["dag"]["tasks"]
    condition = next(t for t in root.values() if "condition" in t.get("triggerPolicy", {}))
    assert "pipelinechannel--gate-Output" in condition["triggerPolicy"]["condition"]
    inner = spec["components"][condition["componentRef"]["name"]]["dag"]["tasks"]
    assert set(inner) == {"register"}
    assert found["register"][0]["cachingOptions"].get("enableCache", False) is False
    cached = {n for n, (task, _) in found.items() if task["cachingOptions"].get("enableCache")}
    assert cached == COMPONENTS - {"register"}


def test_soft_labels_fan_out_over_the_shard_plan_and_are_collected(spec):
    root = spec["root"]["dag"]["tasks"]
    loop = next(t for t in root.values() if "parameterIterator" in t)
    assert set(loop["dependentTasks"]) == {"plan-shards", "ingest", "teacher"}
    merge = root["merge-soft-labels"]["inputs"]["artifacts"]["shards"]
    assert merge["taskOutputArtifact"]["producerTask"] == next(
        n for n, t in root.items() if "parameterIterator" in t)


def test_the_teacher_is_measured_beside_the_soft_labels_and_feeds_evaluate(spec):
    root = spec["root"]["dag"]["tasks"]
    assert set(root["baseline"]["dependentTasks"]) == {"ingest", "teacher"}
    given = root["evaluate"]["inputs"]["artifacts"]["baseline"]["taskOutputArtifact"]
    assert given == {"producerTask": "baseline", "outputArtifactKey": "baseline"}


def test_parameters_default_to_the_params_compiled_with(tmp_path):
    cfg = validate({"seed": 7, "kfp": {"cpu_image": "r.example/kdpipe@sha256:ab"}}, "t")
    doc = yaml.safe_load(compile_pipeline(tmp_path / "p.yaml", cfg).read_text())
    inputs = doc["root"]["inputDefinitions"]["parameters"]
    assert adapter.load_params(inputs["params"]["defaultValue"]) == cfg
    assert inputs["cpu_image"]["defaultValue"] == "r.example/kdpipe@sha256:ab"
    assert inputs["gpu_image"]["defaultValue"] == cfg.kfp.gpu_image


def test_the_checked_in_pipeline_is_what_params_yaml_compiles_to(tmp_path):
    fresh = compile_pipeline(tmp_path / "kdpipe.yaml", load_config(REPO / "params.yaml"))
    assert (REPO / "pipelines" / "kdpipe.yaml").read_text() == fresh.read_text(), (
        "pipelines/kdpipe.yaml is stale: run `kdpipe compile` and commit it")


# ---------------------------------------------------------------- the adapter


def test_params_round_trip_as_json_and_parse_as_yaml():
    cfg = validate({"seed": 3, "soft_labels": {"shards": 4}}, "t")
    assert adapter.load_params(params_text(cfg)) == cfg
    assert adapter.load_params("seed: 3\nsoft_labels:\n  shards: 4\n") == cfg
    assert adapter.shard_indices(params_text(cfg)) == [0, 1, 2, 3]


@pytest.mark.parametrize("text, message", [
    ("seed: [1", "not valid YAML"),
    ("- a\n- b\n", "expected a mapping"),
    ('{"sead": 1}', "sead: unknown key"),
])
def test_bad_params_are_one_line_config_errors(text, message):
    with pytest.raises(ConfigError, match=message) as info:
        adapter.load_params(text)
    assert "\n" not in str(info.value)


def test_a_step_error_ends_the_task_with_one_recorded_line(tmp_path, monkeypatch, capsys):
    errors = tmp_path / "errors.txt"
    monkeypatch.setenv(adapter.ERRORS_ENV, str(errors))

    def broken(cfg, log):
        raise KdpipeError("data.csv: no such file")

    with pytest.raises(SystemExit) as info:
        adapter.run_step("ingest", params_text(validate({"tracking": {"enabled": False}})),
                         broken)
    assert info.value.code == 1
    assert errors.read_text() == "ingest: data.csv: no such file\n"
    assert capsys.readouterr().err == "error: ingest: data.csv: no such file\n"


# ---------------------------------------------------------------- submit


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreachable_host_fails_fast_with_one_line_before_any_work(monkeypatch):
    import kdpipe.kfp.pipeline as pipeline

    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled before the host was checked")

    monkeypatch.setattr(pipeline, "compile_pipeline", no_compiling)
    host = f"http://127.0.0.1:{closed_port()}"
    start = time.monotonic()
    with pytest.raises(KdpipeError) as info:
        submit(host, "kdpipe", validate(CLUSTER_TRACKING))
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert "\n" not in message
    assert message == f"KFP host {host} unreachable after 3 attempts: Connection refused"


class FakeKfp(http.server.BaseHTTPRequestHandler):
    """Just enough of the KFP v2beta1 REST API for kfp.Client to create a run."""

    status = 200
    seen: list = []

    def log_message(self, *args):
        pass

    def reply(self, body, status=None):
        data = json.dumps(body).encode()
        self.send_response(status or self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.seen.append(("GET", self.path, self.headers.get("Authorization"), None))
        if self.status != 200:
            return self.reply({"error": "no"}, self.status)
        if self.path.startswith("/apis/v2beta1/healthz"):
            return self.reply({"multi_user": False})
        if self.path.startswith("/apis/v2beta1/experiments"):
            return self.reply({})  # no experiment of that name yet
        self.reply({"error": "not found"}, 404)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append(("POST", self.path, self.headers.get("Authorization"), body))
        if self.path == "/apis/v2beta1/experiments":
            return self.reply({"experiment_id": "exp-1", "display_name": body["display_name"]})
        if self.path == "/apis/v2beta1/runs":
            return self.reply({"run_id": "run-1", "display_name": body["display_name"]})
        self.reply({"error": "not found"}, 404)


@pytest.fixture
def fake_kfp(monkeypatch, tmp_path):
    class Handler(FakeKfp):
        seen = []

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.delenv("KF_PIPELINES_SA_TOKEN_PATH", raising=False)
    monkeypatch.setenv("KF_PIPELINES_TOKEN", "secret-token")
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.config/kfp/context.json of the user's
    yield f"http://127.0.0.1:{server.server_address[1]}", Handler
    server.shutdown()
    server.server_close()


def test_submit_creates_a_run_with_the_params_images_and_caching(fake_kfp):
    host, handler = fake_kfp
    cfg = validate({**CLUSTER_TRACKING, "seed": 5, "kfp": {"gpu_image": "r.example/g:1"}})
    run = submit(host, "distil", cfg, run_name="try-1", enable_caching=False)
    assert (run.run_id, run.experiment) == ("run-1", "distil")
    assert run.url == f"{host}/#/runs/details/run-1"
    assert {auth for _, _, auth, _ in handler.seen} == {"Bearer secret-token"}
    (experiment,) = [b for m, p, _, b in handler.seen if p == "/apis/v2beta1/experiments"]
    assert experiment["display_name"] == "distil"
    (body,) = [b for m, p, _, b in handler.seen if p == "/apis/v2beta1/runs"]
    assert body["display_name"] == "try-1"
    assert body["experiment_id"] == "exp-1"
    parameters = body["runtime_config"]["parameters"]
    sent = adapter.load_params(parameters["params"])
    assert sent.seed == 5 and sent.kfp.enable_caching is False  # the run's switch, recorded
    assert parameters["gpu_image"] == "r.example/g:1"
    assert parameters["cpu_image"] == cfg.kfp.cpu_image
    spec = body["pipeline_spec"]
    assert spec["pipelineInfo"]["name"] == "kdpipe"
    assert not any(t[0].get("cachingOptions", {}).get("enableCache") for t in tasks(spec).values())


def test_refused_credentials_are_one_line_naming_the_variables(fake_kfp):
    host, handler = fake_kfp
    handler.status = 401
    with pytest.raises(KdpipeError, match="not authorised; set KF_PIPELINES_TOKEN") as info:
        submit(host, "kdpipe", validate(CLUSTER_TRACKING))
    assert "\n" not in str(info.value)
    assert len(handler.seen) == 1  # no retries: a 4xx will not change


@pytest.mark.parametrize("tracking", [{}, {"uri": "sqlite:///work/mlflow.db"}])
def test_a_tracking_store_pods_cannot_share_is_refused(tracking):
    with pytest.raises(KdpipeError, match="tracking.uri: a cluster run needs an MLflow server"):
        check_cluster_config(validate({"tracking": tracking}))
    check_cluster_config(validate({"tracking": {**tracking, "enabled": False}}))


def test_a_host_without_scheme_is_refused():
    with pytest.raises(KdpipeError, match="give the scheme"):
        submit("localhost:8080", "kdpipe", validate(CLUSTER_TRACKING))


# ---------------------------------------------------------------- the DAG, run locally


@pytest.fixture
def kfp_leftovers():
    """kfp.local leaves a /tmp/tmp.* folder per task and /tmp/kfp-workspace-* on failure;
    run_local must leave none (its tasks' temp folders live in its scratch folder)."""
    pattern = ["/tmp/tmp.*", "/tmp/kfp-workspace-*"]
    before = {path for p in pattern for path in glob.glob(p)}
    yield lambda: {path for p in pattern for path in glob.glob(p)} - before
    for path in {path for p in pattern for path in glob.glob(p)} - before:
        shutil.rmtree(path, ignore_errors=True)


def tiny_settings(root: Path, teacher: Path, csv: Path | str, **extra) -> dict:
    return {"work_dir": str(root / "work"), "data": {"source": str(csv)},
            "teacher": {"checkpoint": str(teacher), "max_steps": 2},
            "ingest": {"max_length": 32}, "distill": {"epochs": 1, "min_steps": 0},
            "soft_labels": {"cache_dir": str(root / "cache"), "batch_size": 16},
            "evaluate": {"models": ["teacher", "quantized"], "latency_repeats": 1,
                         "latency_warmup": 0}, **extra}


def files(folder: Path) -> set[str]:
    """Files under ``folder``, but the MLflow store's (its runs differ by design)."""
    found = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    return {f for f in found if f != "mlflow.db" and not f.startswith("mlartifacts/")}


@pytest.mark.slow
def test_the_local_dag_makes_what_kdpipe_run_makes_and_registers(
        tmp_path, tiny_bert, monkeypatch, kfp_leftovers):
    import mlflow
    from typer.testing import CliRunner

    from kdpipe.cli import app
    from kdpipe.kfp.pipeline import STEP_COMPONENTS
    from kdpipe.pipeline import STEPS

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # The demo data set shipped with kdpipe, as `make run` uses it.
    settings = tiny_settings(tmp_path / "kfp", tiny_bert, "demo",
                             soft_labels={"cache_dir": str(tmp_path / "kfp" / "c"),
                                          "batch_size": 16, "shards": 2},
                             tracking={"uri": uri, "experiment": "kfp"})
    kfp_cfg = validate(settings)
    (tmp_path / "kfp.yaml").write_text(yaml.safe_dump(settings))
    dag = CliRunner().invoke(app, ["run", "--runner", "kfp-local", "-p", str(tmp_path / "kfp.yaml")])
    assert dag.exit_code == 0, dag.output
    assert "registered: yes" in dag.output
    log = kfp_cfg.paths.root / "kfp-local.log"
    assert "Task 'register' finished with status" in re.sub(r"\x1b\[[0-9;]*m", "",
                                                            log.read_text())

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_settings(
        tmp_path / "cli", tiny_bert, "demo",
        tracking={"uri": f"sqlite:///{tmp_path}/cli.db", "experiment": "cli"})))
    result = CliRunner().invoke(app, ["run", "-p", str(params)])
    assert result.exit_code == 0, result.output

    kfp_work, cli_work = tmp_path / "kfp" / "work", tmp_path / "cli" / "work"
    ours = files(kfp_work)
    # Steps the DAG has and `kdpipe run` does not (yet): their folders and metrics.
    only_dag = set(STEP_COMPONENTS) - {step.name for step in STEPS}
    folders = {"evaluate": "evaluation", "register": "register"}
    extra = {f for f in ours if f.split("/")[0] in {folders[s] for s in only_dag}
             or f in {f"metrics/{s}.json" for s in only_dag}} | {"kfp-local.log"}
    assert ours - extra == files(cli_work)
    assert {"evaluation/metrics.json", "register/register.json"} <= ours
    for name in ("train.parquet", "validation.parquet", "test.parquet", "labels.json"):
        assert (kfp_work / "prepared" / name).read_bytes() == \
            (cli_work / "prepared" / name).read_bytes(), name
    card = [json.loads((w / "prepared" / "data_card.json").read_text())["content_hash"]
            for w in (kfp_work, cli_work)]
    assert card[0] == card[1]
    # Sharded in the DAG, whole in `kdpipe run`: the same numbers (up to the float rounding
    # that thread counts may bring to two separately trained teachers).
    for name in ("train_logits", "validation_features"):
        np.testing.assert_allclose(np.load(kfp_work / "soft_labels" / f"{name}.npy"),
                                   np.load(cli_work / "soft_labels" / f"{name}.npy"), atol=1e-4)

    client = mlflow.MlflowClient(tracking_uri=uri)
    version = client.get_model_version_by_alias(kfp_cfg.registry.model_name, "champion")
    assert int(version.version) == 1
    runs = client.search_runs([client.get_experiment_by_name("kfp").experiment_id])
    parent = next(r for r in runs if r.info.run_name == "kfp-local")
    children = {r.info.run_name for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert children == set(STEP_COMPONENTS)
    assert not list(kfp_work.glob(".kfp-local-*"))
    assert kfp_leftovers() == set()


@pytest.mark.slow
def test_a_failing_step_ends_the_local_run_with_its_one_line(tmp_path, tiny_bert,
                                                             kfp_leftovers):
    from kdpipe.kfp.local import run_local

    cfg = validate(tiny_settings(tmp_path, tiny_bert, tmp_path / "missing.csv",
                                 tracking={"enabled": False}))
    with pytest.raises(KdpipeError) as info:
        run_local(cfg)
    message = str(info.value)
    assert message.startswith("kfp-local: ingest: ") and "missing.csv" in message
    assert "\n" not in message
    assert not list(Path(cfg.work_dir).glob(".kfp-local-*"))
    assert kfp_leftovers() == set()
