from pathlib import Path

import pytest
import yaml

from kdpipe.config import Config, load_config
from kdpipe.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _no_params_file_in_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def _keys(data: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in data.items():
        if isinstance(value, dict):
            out |= _keys(value, f"{prefix}{key}.")
        else:
            out.add(f"{prefix}{key}")
    return out


def test_repo_params_yaml_is_valid_and_lists_every_setting():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    Config.model_validate(raw)
    assert _keys(raw) == _keys(Config().model_dump(mode="json"))


def test_overrides_parse_values_as_yaml_and_nest(tmp_path):
    cfg = load_config(None, ["ingest.max_length=64", "seed=1", "data.source=x.csv",
                             "ingest.normalize.lowercase=true", "data.label_names=[a, b]"])
    assert cfg.ingest.max_length == 64
    assert cfg.seed == 1
    assert cfg.data.source == "x.csv"
    assert cfg.ingest.normalize.lowercase is True
    assert cfg.data.label_names == ["a", "b"]


def test_overrides_win_over_the_file(tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("seed: 7\ningest:\n  max_length: 32\n")
    cfg = load_config(params, ["seed=9"])
    assert (cfg.seed, cfg.ingest.max_length) == (9, 32)


def test_unknown_key_in_file_is_named(tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("ingest:\n  max_lenght: 32\n")
    with pytest.raises(ConfigError, match=r"p\.yaml: ingest\.max_lenght: unknown key"):
        load_config(params)


def test_wrong_type_is_named_with_the_value(tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("ingest:\n  max_length: lots\n")
    with pytest.raises(ConfigError, match=r"ingest\.max_length: .*integer.*got 'lots'"):
        load_config(params)


def test_out_of_range_value_is_refused():
    with pytest.raises(ConfigError, match=r"ingest\.validation_fraction"):
        load_config(None, ["ingest.validation_fraction=0.9"])


def test_override_without_equals_is_refused():
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["seed"])


def test_override_below_a_value_is_refused(tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("seed: 1\n")
    with pytest.raises(ConfigError, match="seed is a value, not a section"):
        load_config(params, ["seed.x=1"])
    with pytest.raises(ConfigError, match=r"seed: Input should be a valid integer"):
        load_config(None, ["seed.x=1"])


def test_invalid_yaml_names_the_line(tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("seed: 1\ningest: [\n")
    with pytest.raises(ConfigError, match=r"p\.yaml: line \d+ not valid YAML"):
        load_config(params)


def test_missing_params_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_config(tmp_path / "nope.yaml")


def test_split_names_must_differ():
    with pytest.raises(ConfigError, match="must differ"):
        load_config(None, ["data.splits.test=train"])


def test_params_hash_changes_with_a_setting_that_shapes_the_model():
    assert Config().params_hash() == Config().params_hash()
    assert Config().params_hash() != load_config(None, ["seed=2"]).params_hash()
