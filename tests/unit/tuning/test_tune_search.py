"""A trial of ``kdpipe tune``: its settings reach the step, an epoch below the earlier trials'
median prunes it, its folder goes; and tune refuses a work_dir whose soft labels are not
up to date."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pytest

from kdpipe.config import Config
from kdpipe.errors import KdpipeError
from kdpipe.step_result import StepResult
from kdpipe.tuning.search import EPOCH_CURVE, _objective, summary, trial_line, tune


@dataclass
class FakeDistill:
    """Stands in for distill: logs one accuracy per epoch from ``curves`` (by the trial's
    lr) and writes a file into its output folder."""

    curves: dict[float, list[float]]
    seen: list[tuple[float, Path]] = field(default_factory=list)
    folders: tuple[str, ...] = ("prepared",)
    output: str = "student"

    def run(self, cfg, folders, out_dir, log_metric=None):
        self.seen.append((cfg.distill.lr, Path(out_dir)))
        Path(out_dir).mkdir(parents=True)
        (Path(out_dir) / "model.bin").write_bytes(b"x")
        for epoch, accuracy in enumerate(self.curves[cfg.distill.lr]):
            log_metric(EPOCH_CURVE, accuracy, epoch * 10)
        return StepResult("distill", Path(out_dir), {"val_accuracy": max(
            self.curves[cfg.distill.lr])}, [], "")


def test_trials_get_their_settings_and_a_trailing_epoch_prunes_one(tmp_path):
    cfg = Config(work_dir=tmp_path, tracking={"enabled": False},
                 tune={"space": {"distill.lr": {"choices": [0.1, 0.2, 0.3, 0.4]}}})
    step = FakeDistill({0.1: [0.70, 0.80], 0.2: [0.72, 0.90], 0.3: [0.74, 0.85],
                        0.4: [0.30, 0.95]})
    study = optuna.create_study(direction="maximize",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=3))
    for lr in (0.1, 0.2, 0.3, 0.4):
        study.enqueue_trial({"distill.lr": lr})
    study.optimize(_objective(cfg, [step], tmp_path / "tune", "s", optuna), n_trials=4)

    assert [lr for lr, _ in step.seen] == [0.1, 0.2, 0.3, 0.4]
    states = [t.state.name for t in study.trials]
    # 0.30 at the first epoch trails the median of the earlier trials' (0.72): stopped
    # there, though its second epoch would have been the best.
    assert states == ["COMPLETE", "COMPLETE", "COMPLETE", "PRUNED"]
    assert [t.value for t in study.trials[:3]] == [0.80, 0.90, 0.85]
    assert study.trials[3].intermediate_values == {1: 0.30}
    assert all(not out.exists() for _, out in step.seen)  # each trial's folder is removed
    assert all(t.user_attrs["seconds"] >= 0 for t in study.trials)
    best = study.best_trial
    assert trial_line(study.trials[1], best).startswith("trial 1: 0.9000 — best so far")
    assert trial_line(study.trials[3], best).startswith("trial 3: pruned after 1 epoch(s)")


def test_tune_refuses_a_work_dir_without_soft_labels(tmp_path):
    cfg = Config(work_dir=tmp_path / "work", tracking={"enabled": False})
    with pytest.raises(KdpipeError, match=r"ingest in .* is not up to date \(no record of a "
                       r"finished run in this work_dir\); run `kdpipe run` first"):
        tune(cfg, print)


def test_the_summary_compares_the_best_with_the_params_files_own_settings():
    record = {"trials": [{"state": "complete"}, {"state": "complete"}, {"state": "pruned"}],
              "best": {"number": 1, "value": 0.9}, "baseline": {"number": 0, "value": 0.8},
              "improved": True}
    assert summary(record) == ("3 trials (2 complete, 1 pruned): best validation accuracy "
                               "0.9000 (trial 1) against 0.8000 for params.yaml's settings")
    record.update(best={"number": 0, "value": 0.8}, improved=False)
    assert summary(record).endswith("; params.yaml's settings stay the best")
