import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from kdpipe import __version__, cli
from kdpipe.cli import app
from kdpipe.config import Config
from kdpipe.pipeline import STEPS


def test_params_prints_parseable_yaml_without_wrapping_long_values(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    long_path = "/data/" + "x" * 150 + ".csv"
    result = CliRunner().invoke(app, ["params", "-S", f"data.source={long_path}",
                                      "-S", "fractionate.schedule=[0.2, 1.0]"])
    assert result.exit_code == 0, result.output
    doc = yaml.safe_load(result.stdout)
    assert doc["data"]["source"] == long_path
    assert Config.model_validate(doc).fractionate.schedule == [0.2, 1.0]


def test_defaults_round_trip(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["params", "--defaults"])
    assert Config.model_validate(yaml.safe_load(result.stdout)) == Config()


def test_help_lists_every_step_and_version():
    result = CliRunner().invoke(app, ["--help"])
    for step in STEPS:
        assert step.command in result.stdout
    assert CliRunner().invoke(app, ["--version"]).stdout.strip() == f"kdpipe {__version__}"


@pytest.mark.parametrize("command", ["tune", "run", "promote"])
def test_help_paragraphs_wrap_to_a_narrow_terminal_without_stubs(command):
    """A docstring's source line breaks would survive into rich's help and, at 80 columns,
    leave a stub of a word or two after each wrapped line."""
    result = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "80"},
                                terminal_width=80)
    description = result.stdout.split("╭")[0].splitlines()[3:]  # below "Usage: ..."
    lines = [line.strip() for line in description]
    for line, following in zip(lines, lines[1:], strict=False):
        if line and following:  # inside a paragraph: a line is short only at its end
            assert len(line) > 60, (line, following)


# --- kdpipe promote / kdpipe models ------------------------------------------------------

REGISTERED = "kdpipe-student"  # registry.model_name's default


@pytest.fixture
def fake_registry(tmp_path, tmp_path_factory, monkeypatch):
    """A SQLite store holding two versions with key-metric tags (accuracy 0.81 and 0.84;
    v2 is the challenger) and no champion: promotions need no model download."""
    from mlflow import MlflowClient
    from test_registry import sqlite_store

    uri = sqlite_store(tmp_path / "mlflow.db", tmp_path_factory.getbasetemp())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    client = MlflowClient(tracking_uri=uri)
    client.create_registered_model(REGISTERED)
    for accuracy in (0.81, 0.84):
        client.create_model_version(REGISTERED, source="file:///nowhere", tags={
            "kdpipe.accuracy": str(accuracy), "kdpipe.teacher_accuracy": "0.85",
            "kdpipe.retention": str(accuracy / 0.85), "kdpipe.size_bytes": "4100000",
            "kdpipe.latency_b1_p50_ms": "0.31"})
    client.set_registered_model_alias(REGISTERED, "challenger", "2")
    return client


def champion_of(client):
    return client.get_registered_model(REGISTERED).aliases.get("champion")


def test_models_lists_versions_with_metrics_and_aliases(fake_registry, monkeypatch):
    # Wide enough for one line per version whatever terminal (or none) the tests run in:
    # the CLI's console measures its width once, when kdpipe.cli is imported.
    monkeypatch.setattr(cli, "out", Console(width=160))
    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    v1 = next(line for line in lines if "81.00%" in line)
    v2 = next(line for line in lines if "84.00%" in line)
    assert "challenger" in v2 and "challenger" not in v1
    assert "98.82%" in v2 and "4.10" in v2 and "0.31" in v2


def test_models_fits_80_columns_with_whole_headers(fake_registry, monkeypatch):
    fake_registry.set_registered_model_alias(REGISTERED, "champion", "2")
    fake_registry.set_model_version_tag(REGISTERED, "1", "kdpipe.gate", "refused")
    fake_registry.set_model_version_tag(REGISTERED, "1", "kdpipe.gate_failed",
                                        "min_teacher_retention,max_regression")
    monkeypatch.setattr(cli, "out", Console(width=80))
    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, result.stdout
    header = next(line for line in lines if "version" in line)
    for name in ("version", "aliases", "accuracy", "retention", "p50 ms", "MB", "gate",
                 "created"):
        assert name in header, header
    v2 = next(line for line in lines if line.lstrip().startswith("2 "))
    assert "challenger,champion" in v2 and "passed" not in v2  # v2's gate never ran
    v1 = lines.index(next(line for line in lines if line.lstrip().startswith("1 ")))
    gate_column = "".join(line[header.index("gate"):header.index("created")].strip()
                          for line in lines[v1:v1 + 6])
    assert gate_column.startswith("refused:min_teacher_retention,max_regression")


def test_promote_refused_by_the_gate_exits_2_and_says_why(fake_registry):
    result = CliRunner().invoke(app, ["promote", "-S", "registry.gate.min_accuracy=0.9"],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert "min_accuracy" in result.stdout and "FAIL" in result.stdout
    assert "v2 not promoted, no champion: accuracy 84.00% < minimum 90.00%" in result.stdout
    assert champion_of(fake_registry) is None


def test_promote_through_the_gate_then_forced_rollback(fake_registry):
    passed = CliRunner().invoke(app, ["promote"], env={"COLUMNS": "200"})
    assert passed.exit_code == 0, passed.output
    assert "v2 promoted to champion" in passed.stdout and "no champion yet" in passed.stdout
    assert champion_of(fake_registry) == 2
    # v1 fails min_accuracy, and (no prepared data here) cannot be compared with v2: forced.
    forced = CliRunner().invoke(app, ["promote", "--version", "1", "--force", "-S",
                                      "registry.gate.min_accuracy=0.9"],
                                env={"COLUMNS": "200"})
    assert forced.exit_code == 0, forced.output
    assert "v1 FORCED to champion past the gate" in forced.stdout
    assert champion_of(fake_registry) == 1
    tags = fake_registry.get_model_version(REGISTERED, "1").tags
    assert tags["kdpipe.forced_promotion"] == "true" and tags["kdpipe.gate"] == "refused"
    again = CliRunner().invoke(app, ["promote", "--version", "1"])
    assert again.exit_code == 0 and "v1 already is the champion" in again.stdout


def test_a_dry_run_shows_the_gate_and_changes_nothing_and_rollback_returns(fake_registry):
    dry = CliRunner().invoke(app, ["promote", "--dry-run"], env={"COLUMNS": "200"})
    assert dry.exit_code == 0, dry.output
    assert "dry run: v2 would be promoted; nothing was changed" in dry.stdout
    assert "min_teacher_retention" in dry.stdout and "95.00%" in dry.stdout  # the default
    assert champion_of(fake_registry) is None
    assert "kdpipe.gate" not in fake_registry.get_model_version(REGISTERED, "2").tags
    refused = CliRunner().invoke(app, ["promote", "--dry-run", "-S",
                                       "registry.gate.min_accuracy=0.9"])
    assert refused.exit_code == 2 and "would not be promoted" in refused.stdout

    assert CliRunner().invoke(app, ["promote"]).exit_code == 0
    none_before = CliRunner().invoke(app, ["rollback"], env={"COLUMNS": "300"})
    assert none_before.exit_code == 1 and "has no previous champion" in none_before.stderr
    forced = CliRunner().invoke(app, ["promote", "--version", "1", "--force"])
    assert forced.exit_code == 0 and champion_of(fake_registry) == 1
    back = CliRunner().invoke(app, ["rollback"], env={"COLUMNS": "200"})
    assert back.exit_code == 0, back.output
    assert "champion rolled back from v1 to v2" in back.stdout
    assert champion_of(fake_registry) == 2
    assert fake_registry.get_model_version(REGISTERED, "2").tags[
        "kdpipe.rolled_back_from"] == "1"
    undo = CliRunner().invoke(app, ["rollback"])
    assert undo.exit_code == 0 and champion_of(fake_registry) == 1


def test_models_shows_a_versions_gate_checks(fake_registry, monkeypatch):
    monkeypatch.setattr(cli, "out", Console(width=80))
    never = CliRunner().invoke(app, ["models", "--version", "1"])
    assert never.exit_code == 0 and "the gate has not run on it" in never.stdout
    refused = CliRunner().invoke(app, ["promote", "--version", "1", "-S",
                                       "registry.gate.min_accuracy=0.82"])
    assert refused.exit_code == 2, refused.output
    shown = CliRunner().invoke(app, ["models", "--version", "1", "-S",
                                     "registry.gate.min_accuracy=0.82"])
    assert shown.exit_code == 0, shown.output
    lines = shown.stdout.splitlines()
    assert "v1: gate refused" in lines[0]
    row = next(line for line in lines if line.startswith("min_accuracy"))
    assert "81.00%" in row and "82.00%" in row and "FAIL" in row
    assert any(line.startswith("min_teacher_retention") and "95.00%" in line
               and "pass" in line for line in lines)
    missing = CliRunner().invoke(app, ["models", "--version", "9"], env={"COLUMNS": "300"})
    assert missing.exit_code == 1 and "has no version 9" in missing.stderr


def test_a_gate_that_checks_no_quality_is_a_loud_warning(fake_registry):
    result = CliRunner().invoke(app, ["promote", "--dry-run", "-S",
                                      "registry.gate.min_teacher_retention=0"],
                                env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output
    assert "warning: the promotion gate checks no quality" in result.stderr


def test_compare_puts_versions_side_by_side_by_number_alias_or_run(fake_registry,
                                                                   monkeypatch):
    monkeypatch.setattr(cli, "out", Console(width=80))
    run_id = fake_registry.get_model_version(REGISTERED, "1").run_id
    refs = ["v1", "challenger"] if run_id is None else [run_id, "challenger"]
    result = CliRunner().invoke(app, ["compare", *refs])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    header = next(line for line in lines if "v1" in line and "v2" in line)
    assert header.index("v1") < header.index("v2")
    accuracy = next(line for line in lines if line.startswith("accuracy"))
    assert "81.00%" in accuracy and "84.00% *" in accuracy
    assert "challenger" in next(line for line in lines if line.startswith("aliases"))
    for bad, message in ((["compare", "v1"], "needs two or more"),
                         (["compare", "v1", "v9"], "version 9"),
                         (["compare", "v1", "latest"], "not a version number, alias")):
        refused = CliRunner().invoke(app, bad, env={"COLUMNS": "300"})
        assert refused.exit_code == 1 and message in refused.stderr, refused.output


@pytest.mark.parametrize("args,message", [
    (["promote", "--version", "7"], "error: version 7 of registered model 'kdpipe-student': "
                                    "not found in sqlite:///"),
    (["models", "-S", "registry.model_name=nope"], "error: registered model 'nope': not found"),
])
def test_registry_errors_are_one_line_exit_1(fake_registry, args, message):
    result = CliRunner().invoke(app, args, env={"COLUMNS": "300"})
    assert result.exit_code == 1
    assert result.stderr.startswith(message) and result.stderr.count("\n") == 1
    assert "Traceback" not in result.output


@pytest.mark.parametrize("content,message", [
    (None, "does not exist; nothing is registered there"),
    ("garbage", "cannot be opened: (sqlite3.DatabaseError) file is not a database"),
])
def test_missing_or_broken_store_is_one_line_exit_1(tmp_path, monkeypatch, content, message):
    monkeypatch.chdir(tmp_path)
    db = tmp_path / "mlflow.db"
    if content is not None:
        db.write_text(content)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    for command in (["models"], ["promote"]):
        result = CliRunner().invoke(app, command, env={"COLUMNS": "300"})
        assert result.exit_code == 1
        assert result.stderr.startswith(f"error: MLflow store sqlite:///{db}")
        assert message in result.stderr and result.stderr.count("\n") == 1
    assert db.exists() == (content is not None)  # listing never creates a store


def test_promote_help_documents_exit_codes():
    result = CliRunner().invoke(app, ["promote", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "2 the gate refused" in result.stdout and "--force" in result.stdout


def test_tunes_run_line_repeats_the_settings_every_trial_had():
    # `kdpipe tune --no-write -S student.arch=fast` found a better lr: the command it prints
    # must train the same kind of student, so the -S given to every trial comes first.
    line = cli._run_command(None, ["student.arch=fast", "distill.lr=0.1",
                                   "tune.space={distill.lr: {low: 0.001, high: 0.1}}"],
                            {"distill.lr": 0.004, "distill.epochs": 2})
    assert line == "kdpipe run -S student.arch=fast -S distill.lr=0.004 -S distill.epochs=2"
    assert cli._run_command(cli.Path("p.yaml"), None, {"distill.T": 3.0}) == \
        "kdpipe run --params p.yaml -S distill.T=3.0"


def test_run_to_a_step_stops_there(tmp_path, monkeypatch, tiny_bert, separable_csv):
    monkeypatch.chdir(tmp_path)
    settings = ["-S", f"teacher.checkpoint={tiny_bert}", "-S", f"data.source={separable_csv}",
                "-S", "tracking.enabled=false", "-S", f"work_dir={tmp_path / 'work'}"]
    result = CliRunner().invoke(app, ["run", "--to", "ingest", *settings])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "work" / "prepared" / "train.parquet").is_file()
    assert not (tmp_path / "work" / "teacher").exists()
    assert "step 1/1" in result.output
    again = CliRunner().invoke(app, ["run", "--to", "ingest", *settings])
    assert "every step to ingest is up to date" in again.output
    for args, message in ((["--from", "distill", "--to", "ingest"],
                           "--from distill comes after --to ingest"),
                          (["--to", "nope"], "--to nope: no such step")):
        bad = CliRunner().invoke(app, ["run", *args, *settings])
        assert bad.exit_code == 1 and message in bad.output, bad.output
