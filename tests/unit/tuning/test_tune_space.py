"""tune.space: which settings a trial can search, what each trial re-runs, and the values it
gets."""

from __future__ import annotations

import optuna
import pytest

from kdpipe.config import Config, SearchRange, load_config
from kdpipe.errors import ConfigError
from kdpipe.tuning.space import check_space, inside, suggest, trial_steps, with_values


def space(**ranges: dict) -> Config:
    return Config(tune={"space": {key.replace("__", "."): spec for key, spec in ranges.items()}})


def test_the_default_space_is_searchable_and_each_trial_is_one_distill():
    cfg = Config()
    check_space(cfg)
    assert [s.name for s in trial_steps(cfg)] == ["distill"]
    # params.yaml's defaults lie inside it, so the first trial can run them.
    assert all(inside(spec, value) for spec, value in (
        (cfg.tune.space["distill.lr"], cfg.distill.lr),
        (cfg.tune.space["distill.temperature"], cfg.distill.temperature),
        (cfg.tune.space["distill.epochs"], cfg.distill.epochs),
        (cfg.tune.space["student.dropout"], cfg.student.dropout)))


def test_a_fractionate_setting_makes_each_trial_re_run_fractionate_too():
    cfg = space(fractionate__fraction={"low": 0.2, "high": 1.0}, distill__lr={"low": 1e-4,
                                                                               "high": 1e-2})
    check_space(cfg)
    assert [s.name for s in trial_steps(cfg)] == ["fractionate", "distill"]


@pytest.mark.parametrize(("key", "spec", "message"), [
    ("distill.lrr", {"low": 1, "high": 2}, "tune.space: distill.lrr: not a setting"),
    ("distill.feature", {"choices": [1]}, "tune.space: distill.feature: a section"),
    ("ingest.max_length", {"choices": [64, 128]}, "read by ingest, teacher, baseline"),
    ("seed", {"choices": [1, 2]}, "read by ingest"),
    ("prune.unstructured_sparsity", {"low": 0.1, "high": 0.5},
     "not read by fractionate or distill"),
    ("fractionate.include_augmented", {"low": 0, "high": 1}, "give choices"),
    ("student.arch", {"low": 0, "high": 1}, "give choices"),
])
def test_a_setting_a_trial_cannot_search_is_named_in_one_line(key, spec, message):
    cfg = Config(tune={"space": {key: spec}})
    with pytest.raises(ConfigError, match=message) as caught:
        check_space(cfg)
    assert "\n" not in str(caught.value)


def test_an_empty_space_says_how_to_name_one():
    with pytest.raises(ConfigError, match="tune.space: empty"):
        check_space(Config(tune={"space": {}}))


@pytest.mark.parametrize(("spec", "message"), [
    ({"low": 2, "high": 1}, "low \\(2\\) must be below high \\(1\\)"),
    ({"low": 1}, "give choices, or both low and high"),
    ({"choices": [1], "low": 0}, "not both"),
    ({"low": 0, "high": 1, "log": True}, "log needs low > 0"),
    ({"choices": []}, "at least 1"),
])
def test_a_bad_range_is_refused_when_params_load(spec, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"tune.space={{distill.lr: {spec}}}".replace("'", "")])


def test_suggestions_keep_each_settings_type():
    cfg = space(distill__epochs={"low": 1, "high": 4}, distill__lr={"low": 1e-4, "high": 1e-2,
                                                                     "log": True},
                distill__temperature={"choices": [1.0, 4.0]})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(5):
        values = suggest(study.ask(), cfg)
        assert isinstance(values["distill.epochs"], int) and 1 <= values["distill.epochs"] <= 4
        assert 1e-4 <= values["distill.lr"] <= 1e-2
        assert values["distill.temperature"] in (1.0, 4.0)
        trial_cfg = with_values(cfg, values)
        assert trial_cfg.distill.epochs == values["distill.epochs"]
        assert trial_cfg.distill.lr == values["distill.lr"]
        assert trial_cfg.distill.batch_size == cfg.distill.batch_size  # the rest as it was


def test_a_trial_value_the_schema_refuses_is_a_config_error():
    with pytest.raises(ConfigError, match="distill.alpha"):
        with_values(Config(), {"distill.alpha": 1.5})


def test_inside_reads_ranges_and_choices():
    assert inside(SearchRange(low=1, high=4), 4) and not inside(SearchRange(low=1, high=4), 5)
    assert inside(SearchRange(choices=["a", "b"]), "b")
    assert not inside(SearchRange(choices=["a", "b"]), "c")
