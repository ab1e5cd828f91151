import yaml
from typer.testing import CliRunner

from kdpipe import __version__
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
