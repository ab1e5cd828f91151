"""The search behind ``kdpipe tune``: an Optuna study over ``tune.space`` within a budget.

Each trial re-runs distill (and fractionate, when one of its settings is searched) from the
work_dir's cached soft labels with the trial's settings, into ``work_dir/tune/trial-N``
(removed afterwards), and scores the student's validation accuracy. The first trial is
params.yaml's own settings, so a search never ends with worse ones; Optuna's TPE sampler
picks the rest, and its median pruner stops a trial after an epoch that trails the
earlier trials' median there. The study lives in ``work_dir/tune/optuna.db``: an interrupted
``kdpipe tune`` continues it when the search, its data and its other settings are the same.
The whole search is one MLflow run (``tune``) with a child run per trial.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdpipe import provenance, tracking
from kdpipe.atomic import write_json
from kdpipe.config import Config, parent_of
from kdpipe.errors import KdpipeError
from kdpipe.pipeline import STEPS, Step
from kdpipe.step_settings import subset
from kdpipe.tuning.space import check_space, current, inside, suggest, trial_steps, with_values

TUNE_DIR = "tune"
RECORD_FILE = "tune.json"
STUDY_FILE = "optuna.db"
# The curve distill logs once per epoch, and what a trial is pruned on.
EPOCH_CURVE = "eval/student_accuracy"
SCORE = "val_accuracy"  # distill's metric: the saved student's validation accuracy


@dataclass(frozen=True)
class Outcome:
    record: dict[str, Any]  # what tune.json holds
    path: Path  # tune.json
    run_id: str | None  # the MLflow run of the search

    @property
    def improved(self) -> bool:
        return bool(self.record["improved"])

    @property
    def best_settings(self) -> dict[str, Any]:
        return self.record["best"]["settings"] if self.record["best"] else {}


def tune(cfg: Config, say: Callable[[str], None]) -> Outcome:
    """Search ``cfg.tune.space`` within ``cfg.tune.minutes`` and ``cfg.tune.trials``;
    ``say`` gets one line per trial. Needs an up-to-date work_dir up to the soft labels."""
    optuna = _optuna()
    check_space(cfg)
    steps = trial_steps(cfg)
    _check_inputs(cfg, steps)
    folder = cfg.paths.root / TUNE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    name = study_name(cfg, steps)
    study = optuna.create_study(
        storage=f"sqlite:///{folder / STUDY_FILE}", study_name=name, load_if_exists=True,
        direction="maximize",
        pruner=(optuna.pruners.MedianPruner(n_startup_trials=3) if cfg.tune.pruning
                else optuna.pruners.NopPruner()))
    # 5 random trials before TPE models the space: a 20-trial budget leaves it 15. Seeded
    # past the trials a continued study has, or it would suggest their settings again.
    study.sampler = optuna.samplers.TPESampler(seed=cfg.seed + len(study.trials),
                                               n_startup_trials=5)
    done = _settle_earlier(study, optuna, say)
    if not study.trials:
        _enqueue_baseline(cfg, study, say)
    remaining = None if cfg.tune.trials is None else cfg.tune.trials - done
    objective = _objective(cfg, steps, folder, name, optuna)

    def line(study: Any, trial: Any) -> None:
        say(trial_line(trial, _best(study)))

    with tracking.pipeline_run(cfg, name="tune") as run_id:
        if remaining is None or remaining > 0:
            study.optimize(objective, n_trials=remaining, timeout=cfg.tune.minutes * 60,
                           callbacks=[line])
        record = _record(cfg, study, name, steps)
        path = folder / RECORD_FILE
        write_json(path, record)
        if run_id:
            best = record["best"] or {}
            tracking.annotate(run_id, "tune", summary(record),
                              {k: v for k, v in (("best_val_accuracy", best.get("value")),
                                                 ("baseline_val_accuracy",
                                                  (record["baseline"] or {}).get("value")),
                                                 ("trials", float(len(record["trials"]))))
                               if v is not None},
                              {"kdpipe.tune.study": name}, {"": [path]})
    return Outcome(record, path, run_id)


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise KdpipeError("kdpipe tune needs Optuna: pip install 'kdpipe[tune]'") from None
    # kdpipe prints each trial's outcome itself; Optuna's own warnings ("Trial 3 failed
    # with value None" on an interrupt) would repeat it in another format.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    return optuna


def _check_inputs(cfg: Config, steps: list[Step]) -> None:
    """The outputs a trial reads must be up to date for ``cfg``."""
    needed = {s.name for top in steps for s in provenance.upstream(top)} - {s.name for s in steps}
    for step in STEPS:
        if step.name not in needed:
            continue
        why = provenance.stale(cfg, step)
        if why is not None:
            raise KdpipeError(f"{step.name} in {cfg.work_dir} is not up to date ({why}); run "
                              "`kdpipe run` first: tune's trials start from its outputs")


def study_name(cfg: Config, steps: list[Step]) -> str:
    """Same search, data and other settings -> same study (a later tune continues it)."""
    settings = subset(cfg, [k for s in steps for k in s.settings])
    inputs = sorted({f for s in steps for f in s.folders} - {s.output for s in steps})
    blob = json.dumps({"space": cfg.tune.model_dump(mode="json")["space"],
                       "settings": _without(settings, list(cfg.tune.space)),
                       "inputs": {f: provenance.current_hash(cfg.paths, f) for f in inputs}},
                      sort_keys=True)
    return "tune-" + hashlib.sha256(blob.encode()).hexdigest()[:12]


def _without(doc: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    """``doc`` (nested settings, ``subset``'s own copy) less the searched ``keys``."""
    for key in keys:
        node, last = parent_of(doc, key, make=None)
        if node is not None:
            node.pop(last, None)
    return doc


def _settle_earlier(study: Any, optuna: Any, say: Callable[[str], None]) -> int:
    """Trials an earlier, interrupted tune left: those still marked running failed (this
    process holds the work_dir's lock, so none runs); returns how many count as done."""
    for trial in study.trials:
        if trial.state == optuna.trial.TrialState.RUNNING:
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    done = sum(t.state in finished for t in study.trials)
    if study.trials:
        best = _best(study)
        where = f"; best so far {best.value:.4f} (trial {best.number})" if best else ""
        say(f"continuing study {study.study_name}: {done} trials done{where}")
    return done


def _enqueue_baseline(cfg: Config, study: Any, say: Callable[[str], None]) -> None:
    values = {key: current(cfg, key) for key in cfg.tune.space}
    outside = [f"{key}={value}" for key, value in values.items()
               if not inside(cfg.tune.space[key], value)]
    if outside:
        say(f"params.yaml's {', '.join(outside)} lies outside tune.space, so no trial runs "
            "the current settings; the best trial is written back whatever its score")
        return
    study.enqueue_trial(values, user_attrs={"baseline": True})


def _objective(cfg: Config, steps: list[Step], folder: Path, name: str,
               optuna: Any) -> Callable[[Any], float]:
    def objective(trial: Any) -> float:
        values = suggest(trial, cfg)
        trial_cfg = with_values(cfg, values)
        out = folder / f"trial-{trial.number:03d}"
        shutil.rmtree(out, ignore_errors=True)
        folders = {f: getattr(cfg.paths, f) for s in steps for f in s.folders}
        epochs: list[float] = []
        start = time.perf_counter()
        tags = {"kdpipe.tune.study": name, "kdpipe.tune.trial": str(trial.number)}
        pruned = None
        with tracking.child_run(cfg, f"trial {trial.number}", values, tags) as run:

            def log_metric(metric: str, value: float, step: int) -> None:
                if run is not None:
                    run.log_metric(metric, value, step)
                if metric == EPOCH_CURVE:
                    epochs.append(value)
                    trial.report(value, len(epochs))
                    if trial.should_prune():
                        raise optuna.TrialPruned(f"epoch {len(epochs)}: {value:.4f}")

            try:
                for step in steps:
                    result = step.run(trial_cfg, folders, out / step.output,
                                      log_metric=log_metric)
                    folders[step.output] = out / step.output
            except optuna.TrialPruned as exc:
                pruned = exc
            finally:
                shutil.rmtree(out, ignore_errors=True)
            seconds = round(time.perf_counter() - start, 1)
            trial.set_user_attr("seconds", seconds)
            score = None if pruned else float(result.metrics[SCORE])
            if run is not None:
                run.finish({"seconds": seconds, **({SCORE: score} if score is not None else {})},
                           {"kdpipe.tune.state": "pruned" if pruned else "complete"})
        if pruned is not None:
            raise pruned
        return score

    return objective


def _best(study: Any) -> Any:
    """The best finished trial, or None before any."""
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    return max(complete, key=lambda t: (t.value, -t.number)) if complete else None


def trial_line(trial: Any, best: Any) -> str:
    settings = ", ".join(f"{k}={_short(v)}" for k, v in trial.params.items())
    seconds = trial.user_attrs.get("seconds")
    took = f", {seconds:.0f} s" if seconds is not None else ""
    first = " (params.yaml's settings)" if trial.user_attrs.get("baseline") else ""
    if trial.state.name != "COMPLETE":  # a pruned trial's value is its last epoch's
        epochs = len(trial.intermediate_values)
        return (f"trial {trial.number}{first}: {trial.state.name.lower()} after {epochs} "
                f"epoch(s){took}; {settings}")
    lead = (" — best so far" if best is not None and best.number == trial.number
            else f" (best {best.value:.4f}, trial {best.number})" if best is not None else "")
    return f"trial {trial.number}{first}: {trial.value:.4f}{lead}{took}; {settings}"


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _record(cfg: Config, study: Any, name: str, steps: list[Step]) -> dict[str, Any]:
    trials = [{"number": t.number, "state": t.state.name.lower(), "value": t.value,
               "seconds": t.user_attrs.get("seconds"), "baseline": bool(
                   t.user_attrs.get("baseline")), "settings": t.params,
               "epochs": [t.intermediate_values[k] for k in sorted(t.intermediate_values)]}
              for t in study.trials]
    best = _best(study)
    baseline = next((t for t in trials if t["baseline"] and t["state"] == "complete"), None)
    improved = best is not None and (baseline is None or best.value > baseline["value"])
    return {"study": name, "steps": [s.name for s in steps],
            "space": cfg.tune.model_dump(mode="json")["space"],
            "budget": {"minutes": cfg.tune.minutes, "trials": cfg.tune.trials},
            "trials": trials,
            "best": ({"number": best.number, "value": best.value, "settings": best.params}
                     if best is not None else None),
            "baseline": ({"number": baseline["number"], "value": baseline["value"]}
                         if baseline else None),
            "improved": improved}


def summary(record: dict[str, Any]) -> str:
    """One line: what the search found."""
    best, baseline = record["best"], record["baseline"]
    counts: dict[str, int] = {}
    for t in record["trials"]:
        counts[t["state"]] = counts.get(t["state"], 0) + 1
    done = ", ".join(f"{n} {state}" for state, n in counts.items())
    if best is None:
        return f"no trial finished ({done or 'none ran'})"
    against = (f" against {baseline['value']:.4f} for params.yaml's settings"
               if baseline else "")
    verdict = "" if record["improved"] else "; params.yaml's settings stay the best"
    return (f"{len(record['trials'])} trials ({done}): best validation accuracy "
            f"{best['value']:.4f} (trial {best['number']}){against}{verdict}")
