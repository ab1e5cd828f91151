"""The Kubeflow Pipelines adapter: the compiled DAG, the checked-in YAML, submitting to an
endpoint (a fake one on 127.0.0.1), and the whole DAG run locally by kfp.local."""

import http.server
import json
import re
import socket
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from kdpipe.config import Config, load_config, validate
from kdpipe.errors import ConfigError, KdpipeError
from kdpipe.kfp import adapter
from kdpipe.kfp.pipeline import compile_pipeline
from kdpipe.kfp.submit import check_cluster_config, submit
from kdpipe.pipeline import STEPS

REPO = Path(__file__).resolve().parents[2]
COMPONENTS = {"ingest", "teacher", "baseline", "plan-shards", "soft-label-shard",
              "merge-soft-labels", "fractionate", "distill", "prune", "export", "quantize",
              "evaluate", "gate",
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
    doc, platform = compiled(out)
    json_format.ParseDict(doc, pipeline_spec_pb2.PipelineSpec())  # unknown fields raise
    json_format.ParseDict(platform, pipeline_spec_pb2.PlatformSpec())
    return doc


def compiled(path):
    """The compiled file's two documents: the pipeline spec and its platform spec (the
    Kubernetes wiring)."""
    docs = list(yaml.safe_load_all(Path(path).read_text()))
    assert len(docs) == 2, "expected the pipeline spec and a platform spec"
    return docs[0], docs[1]


def tasks(spec, stubs=False):
    """{task name: (task spec, its container)} over the root DAG and every sub-DAG; the
    backend's own PVC tasks (image argostub/...) only with ``stubs``."""
    executors = spec["deploymentSpec"]["executors"]
    found = {}
    for component in [spec["root"], *spec["components"].values()]:
        for name, task in component.get("dag", {}).get("tasks", {}).items():
            label = spec["components"][task["componentRef"]["name"]].get("executorLabel")
            if label:
                container = executors[label]["container"]
                if stubs or not container["image"].startswith("argostub/"):
                    found[name] = (task, container)
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


def test_parameters_default_to_each_steps_own_settings(tmp_path):
    cfg = validate({"seed": 7, "kfp": {"cpu_image": "r.example/kdpipe@sha256:ab"}}, "t")
    doc, _ = compiled(compile_pipeline(tmp_path / "p.yaml", cfg))
    inputs = doc["root"]["inputDefinitions"]["parameters"]
    assert set(inputs) == {f"settings_{s.name}" for s in STEPS} | {"cpu_image", "gpu_image"}
    teacher = json.loads(inputs["settings_teacher"]["defaultValue"])
    assert list(teacher) == ["seed", "tracking", "ingest", "teacher"]  # params.yaml's order
    assert teacher["seed"] == 7 and teacher["ingest"] == {"max_length": 128}
    assert adapter.load_settings(inputs["settings_teacher"]["defaultValue"], "teacher") \
        .teacher == cfg.teacher
    assert inputs["cpu_image"]["defaultValue"] == "r.example/kdpipe@sha256:ab"
    assert inputs["gpu_image"]["defaultValue"] == cfg.kfp.gpu_image


def task_inputs(doc):
    """{task: its resolved parameter inputs}: a pipeline parameter's default, a constant,
    or the name of the task output it takes (what KFP's cache key is made of, with the
    input artifacts)."""
    defaults = {name: p.get("defaultValue")
                for name, p in doc["root"]["inputDefinitions"]["parameters"].items()}
    resolved = {}
    for component in [doc["root"], *doc["components"].values()]:
        for name, task in component.get("dag", {}).get("tasks", {}).items():
            values = {}
            for key, given in task.get("inputs", {}).get("parameters", {}).items():
                source = given.get("componentInputParameter", "")
                source = source.removeprefix("pipelinechannel--")
                values[key] = defaults.get(source, source) if source else json.dumps(given)
            artifacts = task.get("inputs", {}).get("artifacts", {})
            resolved[name] = (values, sorted(artifacts))
    return resolved


def test_a_distill_setting_changes_only_the_inputs_of_the_tasks_that_read_it(tmp_path):
    """KFP's cache key of a task is its component, image and inputs: a distill-only change
    must leave ingest, teacher, baseline and the soft-label tasks' inputs byte-identical, as
    `dvc repro` leaves those stages alone; distill and prune (which fine-tunes with distill's
    settings) change, and every later task follows through its changed input artifacts."""
    before = task_inputs(compiled(compile_pipeline(tmp_path / "a.yaml", Config()))[0])
    after = task_inputs(compiled(compile_pipeline(tmp_path / "b.yaml", load_config(
        None, ["distill.temperature=3.0", "distill.lr=0.001"])))[0])
    assert set(before) == set(after)
    same = {name for name in before if before[name] == after[name]}
    assert {"ingest", "teacher", "baseline", "plan-shards", "soft-label-shard",
            "merge-soft-labels", "fractionate", "export", "quantize", "evaluate"} <= same
    assert {"distill", "prune"}.isdisjoint(same)
    # What follows distill takes its output: a new student means new inputs there.
    assert "student" in after["prune"][1] and "pruned" in after["export"][1]


def test_a_change_to_where_things_go_changes_no_step_settings(tmp_path):
    before = json.loads(json.dumps(compile_inputs(tmp_path / "a.yaml", Config())))
    after = compile_inputs(tmp_path / "b.yaml", load_config(None, [
        "work_dir=/elsewhere", "kfp.cpu_image=r.example/k@sha256:cd", "kfp.retries.attempts=1"]))
    changed = {name for name in before if before[name] != after[name]}
    # Register (never cached) also reads work_dir: the default MLflow store lives there.
    assert changed == {"cpu_image", "settings_register"}


def compile_inputs(path, cfg):
    doc, _ = compiled(compile_pipeline(path, cfg))
    return {name: p.get("defaultValue")
            for name, p in doc["root"]["inputDefinitions"]["parameters"].items()}


def test_the_checked_in_pipeline_is_what_params_yaml_compiles_to(tmp_path):
    fresh = compile_pipeline(tmp_path / "kdpipe.yaml", load_config(REPO / "params.yaml"))
    assert (REPO / "pipelines" / "kdpipe.yaml").read_text() == fresh.read_text(), (
        "pipelines/kdpipe.yaml is stale: run `kdpipe compile` and commit it")


# ---------------------------------------------------------------- the adapter


def test_settings_round_trip_as_json_and_parse_as_yaml():
    cfg = validate({"seed": 3, "soft_labels": {"shards": 4}}, "t")
    text = adapter.settings_text(cfg, "soft_labels")
    assert set(json.loads(text)) == {"seed", "tracking", "ingest", "soft_labels"}
    loaded = adapter.load_settings(text, "soft_labels")
    assert loaded.soft_labels == cfg.soft_labels and loaded.seed == 3
    assert adapter.load_settings("seed: 3\nsoft_labels:\n  shards: 4\n", "x").soft_labels \
        == cfg.soft_labels
    assert adapter.shard_indices(text) == [0, 1, 2, 3]


@pytest.mark.parametrize("text, message", [
    ("seed: [1", "not valid YAML"),
    ("- a\n- b\n", "expected a mapping"),
    ('{"sead": 1}', "sead: unknown key"),
])
def test_bad_settings_are_one_line_config_errors(text, message):
    with pytest.raises(ConfigError, match=message) as info:
        adapter.load_settings(text, "teacher")
    assert "\n" not in str(info.value) and "task 'teacher'" in str(info.value)


def test_a_step_error_ends_the_task_with_one_recorded_line(tmp_path, monkeypatch, capsys):
    errors = tmp_path / "errors.txt"
    monkeypatch.setenv(adapter.ERRORS_ENV, str(errors))

    def broken(cfg, log):
        raise KdpipeError("data.csv: no such file")

    with pytest.raises(SystemExit) as info:
        adapter.run_tracked("ingest", adapter.settings_text(
            validate({"tracking": {"enabled": False}}), "ingest"), broken)
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
    sent = adapter.load_settings(parameters["settings_distill"], "distill")
    assert sent.seed == 5
    assert parameters["gpu_image"] == "r.example/g:1"
    assert parameters["cpu_image"] == cfg.kfp.cpu_image
    # With a platform spec, kfp.Client sends both documents, the Kubernetes wiring too.
    spec, platform = body["pipeline_spec"]["pipeline_spec"], body["pipeline_spec"]["platform_spec"]
    assert spec["pipelineInfo"]["name"] == "kdpipe"
    assert "exec-teacher" in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
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
def kfp_leftovers(tmp_path, monkeypatch):
    """kfp.local leaves a tmp.* folder per task (``mktemp -d``) and a kfp-workspace-* folder
    in the system's temp folder unless told otherwise; run_local must leave none (its tasks'
    temp folders live in its scratch folder). The "system" temp folder is this test's own,
    so another xdist worker's kfp run cannot show up in it."""
    system_tmp = tmp_path / "system-tmp"
    system_tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(system_tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    return lambda: {p.name for p in system_tmp.iterdir()
                    if p.name.startswith(("tmp.", "kfp-workspace-"))}


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
    # kdpipe's provenance records: the DAG's outputs carry Kubeflow's lineage instead.
    return {f for f in found
            if f != "mlflow.db" and not f.startswith(("mlartifacts/", "provenance/"))}


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
    dag = CliRunner().invoke(app, ["run", "--runner", "kfp-local",
                                   "-p", str(tmp_path / "kfp.yaml")])
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
    # The DAG's parent run, named by the register task for the outcome.
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.info.run_name.endswith(" · v1 champion"), parent.info.run_name
    assert parent.data.tags["kdpipe.outcome"] == "champion"
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


# ---------------------------------------------------------------- the cluster wiring


def executors(platform):
    return platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def label(doc, task):
    """The executor label of ``task`` (a root- or sub-DAG task)."""
    for component in [doc["root"], *doc["components"].values()]:
        found = component.get("dag", {}).get("tasks", {}).get(task)
        if found:
            return doc["components"][found["componentRef"]["name"]]["executorLabel"]
    raise KeyError(task)


@pytest.fixture(scope="module")
def wired(tmp_path_factory):
    """The DAG compiled with every cluster setting given."""
    cfg = validate({**CLUSTER_TRACKING, "kfp": {
        "secrets": {"mlflow": "mlflow-creds", "storage": "s3-creds"},
        "node_selector": {"pool": "ml"}, "gpu_node_selector": {"gpu": "t4"},
        "tolerations": [{"key": "dedicated", "value": "ml", "effect": "NoSchedule"}],
        "image_pull_secrets": ["regcred"], "shm_size": "4Gi",
        "retries": {"attempts": 2, "backoff": "2m", "max_backoff": "1h"},
        "timeouts": {"teacher": 7200}}})
    return compiled(compile_pipeline(tmp_path_factory.mktemp("w") / "k.yaml", cfg))


def test_secrets_reach_every_task_as_optional_env_vars_by_name_only(wired):
    from kdpipe.kfp.cluster import MLFLOW_KEYS, STORAGE_KEYS

    doc, platform = wired
    for task in COMPONENTS:
        given = {s["secretName"]: s for s in executors(platform)[label(doc, task)]["secretAsEnv"]}
        assert set(given) == {"mlflow-creds", "s3-creds"}, task
        for name, keys in (("mlflow-creds", MLFLOW_KEYS), ("s3-creds", STORAGE_KEYS)):
            assert given[name]["optional"] is True
            assert {(k["secretKey"], k["envVar"]) for k in given[name]["keyToEnv"]} == {
                (key, key) for key in keys}
    # Names only: no value of a credential is anywhere in the file.
    assert "AKIA" not in json.dumps(platform)


def test_scheduling_pull_secrets_timeouts_and_shm_follow_the_settings(wired):
    doc, platform = wired
    for task in COMPONENTS:
        spec = executors(platform)[label(doc, task)]
        gpu = task in GPU_TASKS
        assert spec["nodeSelector"]["labels"] == ({"pool": "ml", "gpu": "t4"} if gpu
                                                  else {"pool": "ml"}), task
        keys = {t.get("key") for t in spec["tolerations"]}
        assert keys == ({"dedicated", "nvidia.com/gpu"} if gpu else {"dedicated"}), task
        assert [s["secretName"] for s in spec["imagePullSecret"]] == ["regcred"]
        shm = [m for m in spec.get("emptyDirMounts", []) if m["mountPath"] == "/dev/shm"]
        assert shm == ([{"volumeName": "dshm", "mountPath": "/dev/shm", "medium": "Memory",
                         "sizeLimit": "4Gi"}] if gpu else []), task
    timeouts = {task: int(executors(platform)[label(doc, task)]["activeDeadlineSeconds"])
                for task in ("teacher", "distill", "gate")}
    assert timeouts == {"teacher": 7200, "distill": 43200, "gate": 1800}


def test_the_long_tasks_are_retried_with_backoff(wired):
    doc, _ = wired
    retried = {name: task["retryPolicy"] for name, (task, _) in tasks(doc).items()
               if "retryPolicy" in task}
    assert set(retried) == {"teacher", "soft-label-shard", "distill"}
    assert all(policy == {"maxRetryCount": 2, "backoffDuration": "120s", "backoffFactor": 2.0,
                          "backoffMaxDuration": "3600s"} for policy in retried.values())


def test_a_checkpoint_volume_is_made_per_run_mounted_where_the_steps_resume_and_deleted(wired):
    doc, platform = wired
    stubs = tasks(doc, stubs=True)
    assert {"createpvc", "deletepvc"} <= set(stubs)
    assert stubs["createpvc"][0]["inputs"]["parameters"]["size"]["runtimeValue"] == {
        "constant": "20Gi"}
    assert sorted(stubs["deletepvc"][0]["dependentTasks"]) == ["createpvc", "distill"]
    for task in ("teacher", "distill"):
        (mount,) = executors(platform)[label(doc, task)]["pvcMount"]
        assert mount["mountPath"] == "/kdpipe/checkpoints"
        assert mount["taskOutputParameter"]["producerTask"] == "createpvc"
        given = stubs[task][0]["inputs"]["parameters"]["checkpoint_root"]
        assert given["runtimeValue"]["constant"] == "/kdpipe/checkpoints"
    mounted = {t for t in COMPONENTS if "pvcMount" in executors(platform).get(label(doc, t), {})}
    assert mounted == {"teacher", "distill"}


def test_an_existing_claim_is_mounted_and_left_alone(tmp_path):
    cfg = validate({**CLUSTER_TRACKING, "kfp": {"checkpoints": {"claim": "kdpipe-state"}}})
    doc, platform = compiled(compile_pipeline(tmp_path / "c.yaml", cfg))
    assert not {"createpvc", "deletepvc"} & set(tasks(doc, stubs=True))
    (mount,) = executors(platform)[label(doc, "distill")]["pvcMount"]
    assert mount["constant"] == "kdpipe-state"
    off = validate({**CLUSTER_TRACKING, "kfp": {"checkpoints": {"enabled": False}}})
    doc, platform = compiled(compile_pipeline(tmp_path / "o.yaml", off))
    assert "pvcMount" not in executors(platform)[label(doc, "distill")]
    assert tasks(doc)["distill"][0]["inputs"]["parameters"]["checkpoint_root"][
        "runtimeValue"]["constant"] == ""


def test_a_retried_task_resumes_from_the_volume_and_other_runs_get_their_own(tmp_path):
    """What a retry sees: the same settings and input URIs give the same folder under the
    volume; another run's inputs (other URIs) give another folder."""
    from kdpipe.kfp.adapter import _checkpoints

    uris = ["s3://root/run-1/teacher/teacher"]
    with _checkpoints(True, str(tmp_path), "distill", "{}", uris) as first:
        first.mkdir(parents=True)
        (first / "state.json").write_text("{}")
    with _checkpoints(True, str(tmp_path), "distill", "{}", uris) as retried:
        assert retried == first and (retried / "state.json").is_file()
    with _checkpoints(True, str(tmp_path), "distill", "{}", ["s3://root/run-2/t"]) as other:
        assert other != first and other.parent == tmp_path
    with _checkpoints(True, "", "distill", "{}", uris) as scratch:
        assert tmp_path not in scratch.parents
    with _checkpoints(False, str(tmp_path), "prune", "{}", uris) as none:
        assert none is None


def test_local_paths_are_refused_for_a_cluster_run(tmp_path):
    csv = tmp_path / "reviews.csv"
    csv.write_text("text,label\na,b\n")
    with pytest.raises(KdpipeError, match="data.source: .* is a path on this machine"):
        check_cluster_config(validate({**CLUSTER_TRACKING, "data": {"source": str(csv)}}))
    with pytest.raises(KdpipeError, match="teacher.checkpoint: .* give a hub id"):
        check_cluster_config(validate({**CLUSTER_TRACKING,
                                       "teacher": {"checkpoint": str(tmp_path)}}))
    check_cluster_config(validate({**CLUSTER_TRACKING,
                                   "data": {"source": "s3://bucket/reviews.csv"}}))
    # The MLflow Secret brings the tracking URI: no -S tracking.uri needed then.
    check_cluster_config(validate({"kfp": {"secrets": {"mlflow": "mlflow-creds"}}}))


# ---------------------------------------------------------------- components/, for reuse


def test_the_checked_in_components_are_what_params_yaml_compiles_to(tmp_path):
    from kdpipe.kfp.catalog import NAMES, write_components

    write_components(load_config(REPO / "params.yaml"), tmp_path / "components")
    fresh = {p.relative_to(tmp_path / "components").as_posix(): p.read_text()
             for p in (tmp_path / "components").rglob("*") if p.is_file()}
    ours = {p.relative_to(REPO / "components").as_posix(): p.read_text()
            for p in (REPO / "components").rglob("*") if p.is_file()}
    assert set(fresh) == {"README.md"} | {f"{n}/{f}" for n in NAMES
                                          for f in ("component.yaml", "README.md")}
    stale = sorted(name for name in fresh if ours.get(name) != fresh[name])
    assert not stale, f"components/ is stale ({stale}): run `kdpipe compile` and commit it"


def test_a_component_readme_documents_every_input_and_output():
    from kdpipe.kfp.catalog import NAMES

    for name in NAMES:
        text = (REPO / "components" / name / "README.md").read_text()
        spec = yaml.safe_load((REPO / "components" / name / "component.yaml").read_text())
        component = next(iter(spec["components"].values()))
        for side in ("inputDefinitions", "outputDefinitions"):
            for kind in ("parameters", "artifacts"):
                for arg in component.get(side, {}).get(kind, {}):
                    row = next(line for line in text.splitlines() if line.startswith(f"| `{arg}`"))
                    assert not row.rstrip().endswith("|  |"), f"{name}: {arg} undocumented"
        assert "requests" in text and "load_component_from_file" in text


@pytest.mark.slow
def test_a_user_pipeline_reuses_the_ingest_component_from_its_file(tmp_path, tiny_bert,
                                                                    monkeypatch):
    """As a user would: load components/ingest/component.yaml into a pipeline of one's own
    and run it (kfp.local, in a subprocess with this Python)."""
    from kfp import components, dsl, local

    from kdpipe.kfp.adapter import settings_text
    from kdpipe.kfp.pipeline import quiet_kfp

    # The task's `mktemp -d` goes here, not to /tmp, where other tests look for leftovers.
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    ingest = components.load_component_from_file(str(REPO / "components" / "ingest" /
                                                     "component.yaml"))
    cfg = validate(tiny_settings(tmp_path, tiny_bert, "demo", tracking={"enabled": False}))

    @dsl.pipeline(name="mine")
    def mine(settings: str) -> dsl.Dataset:
        return ingest(settings=settings).outputs["prepared"]

    with quiet_kfp():
        local.init(runner=local.SubprocessRunner(use_venv=False),
                   pipeline_root=str(tmp_path / "root"),
                   workspace_root=str(tmp_path / "workspace"), raise_on_error=True)
        task = mine(settings=settings_text(cfg, "ingest"))
    prepared = Path(task.output.path)
    assert {"train.parquet", "labels.json", "data_card.json"} <= {
        p.name for p in prepared.iterdir()}
    assert json.loads((prepared / "labels.json").read_text())["names"]
