"""What ``kdpipe tune`` searches: ``tune.space`` checked against params.yaml and the steps,
the steps a trial re-runs, and each trial's settings."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel

from kdpipe.config import Config, SearchRange, parent_of, validate
from kdpipe.errors import ConfigError
from kdpipe.pipeline import STEPS, Step, step_named
from kdpipe.step_settings import check_keys

# What a trial re-runs (from the cached soft labels): fractionate when one of its settings
# is searched, then distill, whose validation accuracy is the trial's score.
TRIAL_STEPS = ("fractionate", "distill")


def covers(declared: Iterable[str], key: str) -> bool:
    """Whether a step declaring ``declared`` settings reads ``key``."""
    return any(key == d or key.startswith(d + ".") for d in declared)


def current(cfg: Config, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def check_space(cfg: Config) -> None:
    """Raise a one-line ``ConfigError`` for a ``tune.space`` key a trial cannot search."""
    if not cfg.tune.space:
        raise ConfigError("tune.space: empty; name at least one setting to search, e.g. "
                          "-S 'tune.space={distill.lr: {low: 0.0005, high: 0.008, log: true}}'")
    first_trial_step = STEPS.index(step_named(TRIAL_STEPS[0]))
    for key, spec in cfg.tune.space.items():
        where = f"tune.space: {key}"
        try:
            check_keys([key])
        except ValueError:
            raise ConfigError(f"{where}: not a setting of params.yaml") from None
        value = current(cfg, key)
        if isinstance(value, BaseModel | dict):
            raise ConfigError(f"{where}: a section; name one of its settings")
        readers = [s for s in STEPS if covers(s.settings, key)]
        before = [s.name for s in readers if STEPS.index(s) < first_trial_step]
        if before:
            raise ConfigError(f"{where}: read by {', '.join(before)}, before the transfer "
                              "set; a trial starts from the cached soft labels, so tune "
                              "searches only what fractionate, the student and distill read")
        if not any(s.name in TRIAL_STEPS for s in readers):
            raise ConfigError(f"{where}: not read by fractionate or distill (a trial's "
                              "score is the distilled student's validation accuracy)")
        if spec.choices is None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ConfigError(f"{where}: a range needs a number setting (it is "
                              f"{value!r}); give choices")


def trial_steps(cfg: Config) -> list[Step]:
    """The steps each trial runs, in order."""
    fractionate, distill = (step_named(name) for name in TRIAL_STEPS)
    searched = any(covers(fractionate.settings, key) for key in cfg.tune.space)
    return [fractionate, distill] if searched else [distill]


def suggest(trial: Any, cfg: Config) -> dict[str, Any]:
    """One value per searched setting from an Optuna ``trial``; an int setting gets ints."""
    values: dict[str, Any] = {}
    for key, spec in cfg.tune.space.items():
        if spec.choices is not None:
            values[key] = trial.suggest_categorical(key, spec.choices)
        elif isinstance(current(cfg, key), int):
            values[key] = trial.suggest_int(key, int(spec.low), int(spec.high),
                                            step=int(spec.step or 1), log=spec.log)
        else:
            values[key] = trial.suggest_float(key, spec.low, spec.high, step=spec.step,
                                              log=spec.log)
    return values


def inside(spec: SearchRange, value: Any) -> bool:
    """Whether ``value`` is one the search could suggest (params.yaml's own, trial 0)."""
    if spec.choices is not None:
        return value in spec.choices
    return isinstance(value, int | float) and spec.low <= value <= spec.high


def with_values(cfg: Config, values: dict[str, Any]) -> Config:
    """``cfg`` with ``values`` (setting -> value) set, validated like params.yaml."""
    raw = cfg.model_dump(mode="json")
    for key, value in values.items():
        node, last = parent_of(raw, key)
        node[last] = value
    return validate(raw, "tune trial")
