"""Distillation ablation: each student x loss mix, then fractionation strategies.

    python bench/teacher.py --data ../shared/data/sst2 ...     # first: teacher + soft labels
    python bench/ablation.py --data ../shared/data/sst2 --students textcnn,bilstm

Reuses the prepared data, fine-tuned teacher and soft labels that bench/teacher.py left in
``--work``/<data name>, so every row distils from the same teacher. For each student and loss
mix it runs fractionate (strategy all) + distill; then, on the best student, each
fractionation strategy with plain KD. Prints a markdown table (validation accuracy, % of the
teacher's accuracy, training time) and writes bench/results/ablation_<data name>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from kdpipe.config import Config, load_config  # noqa: E402
from kdpipe.steps import distill, fractionate  # noqa: E402

RESULTS = Path(__file__).parent / "results"

# Loss mixes compared; the rest of `distill` stays at params.yaml's values.
VARIANTS = {
    "hard": lambda epochs: [f"distill.hard_label_epochs={epochs}"],
    "kd": lambda epochs: [],
    "kd+feature": lambda epochs: ["distill.feature.weight=0.5", "distill.feature.kind=cosine"],
    "kd+crd": lambda epochs: ["distill.crd.weight=0.1"],
    "kd+ema": lambda epochs: ["distill.ema.weight=0.5"],
    # Tang et al. (2019): MSE between logits plus cross-entropy on the gold labels, no KL.
    "mse": lambda epochs: ["distill.logit_mse=1.0", "distill.alpha=0.0"],
    "kd+feature-mlp": lambda epochs: ["distill.feature.weight=0.5", "distill.feature.kind=cosine",
                                      "distill.feature.projection=mlp"],
    "kd+srrd": lambda epochs: ["distill.srrd.weight=0.5"],
    "kd+mutual": lambda epochs: ["distill.mutual.weight=0.5"],
    # transformer student only (it has layers and attention maps to match)
    "kd+hidden+attention": lambda epochs: ["distill.hidden.weight=1.0",
                                           "distill.attention.weight=1.0"],
}
LAYERED = {"kd+hidden+attention"}  # variants only the transformer student can run
# A student initialised from teacher layers needs a fine-tuning learning rate.
STUDENT_SETTINGS = {
    "textcnn": [],
    "bilstm": [],
    "transformer": ["distill.lr=5e-5", "distill.batch_size=32", "distill.warmup_ratio=0.1"],
}
STRATEGIES = {
    "all": [],
    "random 50%": ["fractionate.strategy=random"],
    "entropy 50%": ["fractionate.strategy=entropy"],
    "margin 50%": ["fractionate.strategy=margin"],
    "class_balanced": ["fractionate.strategy=class_balanced"],
    "dynamic 50/30/100": ["fractionate.strategy=dynamic"],
    "domain 50%": ["fractionate.strategy=domain"],
    "domain knn 50%": ["fractionate.strategy=domain", "fractionate.domain_score=knn"],
    "dynamic by domain": ["fractionate.strategy=dynamic", "fractionate.schedule_by=domain"],
}
SEEDS = (43, 44)  # the extra seeds of rows within CLOSE of the best
CLOSE = 0.01


def distil(cfg: Config, name: str) -> dict:
    work = cfg.paths.root / "ablation" / name.replace(" ", "_").replace("/", "-")
    start = time.perf_counter()
    fractionate.run(cfg, cfg.paths.soft_labels, cfg.paths.prepared, work / "fractions")
    result = distill.run(cfg, cfg.paths.prepared, cfg.paths.soft_labels, work / "fractions",
                         cfg.paths.teacher, work / "student")
    from unlabeled import student_scores

    test = student_scores(work / "student", cfg.paths.prepared)["test_accuracy"]
    return {"val_accuracy": result.metrics["val_accuracy"],
            "test_accuracy": round(test, 4),
            "val_macro_f1": result.metrics["val_macro_f1"],
            "epochs_run": result.metrics["epochs_run"],
            "params": int(result.metrics["params"]),
            "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--work", default="/tmp/kb")
    parser.add_argument("--students", default="textcnn,bilstm,transformer")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--transformer-epochs", type=int, default=2)
    parser.add_argument("--tag", default="", help="suffix of the results file name")
    parser.add_argument("--resume", action="store_true",
                        help="keep the rows already in bench/results/ablation_<data>.json")
    parser.add_argument("--seeds", action="store_true",
                        help=f"then run each row within {CLOSE:.0%} of the best again with "
                        f"seeds {SEEDS} (mean and spread in the table)")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    name = Path(args.data).name
    result_name = name + args.tag
    base = [f"data.source={args.data}", f"work_dir={args.work}/{name}",
            f"soft_labels.cache_dir={args.work}/cache", "tracking.enabled=false",
            *args.overrides]
    teacher = json.loads((Path(args.work) / name / "teacher" / "training.json").read_text())
    teacher_acc = max(e["accuracy"] for e in teacher["evaluations"])
    # Snapshot params.yaml: a long run must not pick up edits made while it runs.
    params = Path(args.work) / "params.snapshot.yaml"
    params.write_text(Path("params.yaml").read_text() if Path("params.yaml").exists() else "")
    rows = previous_rows(result_name) if args.resume else []

    def record(student: str, variant: str, strategy: str, settings: list[str],
               seed: int | None = None) -> dict:
        done = [r for r in rows if (r["student"], r["variant"], r["strategy"],
                                    r.get("seed")) == (student, variant, strategy, seed)]
        if done:
            return done[0]
        epochs = args.transformer_epochs if student == "transformer" else args.epochs
        seeded = [] if seed is None else [f"seed={seed}"]
        cfg = load_config(params, [*base, f"student.arch={student}", f"distill.epochs={epochs}",
                                 *STUDENT_SETTINGS[student], *VARIANTS[variant](epochs),
                                 *settings, *seeded])
        label = f"{student}-{variant}-{strategy}" + ("" if seed is None else f"-seed{seed}")
        row = {"student": student, "variant": variant, "strategy": strategy,
               "epochs": epochs, **({} if seed is None else {"seed": seed}),
               **distil(cfg, label)}
        row["pct_of_teacher"] = round(100 * row["val_accuracy"] / teacher_acc, 2)
        rows.append(row)
        print(f"{student:12s} {variant:11s} {strategy:18s} acc {row['val_accuracy']:.4f} "
              f"({row['pct_of_teacher']:.1f}% of teacher) {row['seconds']:.0f} s", flush=True)
        save(args, result_name, teacher_acc, rows)
        return row

    for student in args.students.split(","):
        for variant in args.variants.split(","):
            if variant not in LAYERED or student == "transformer":
                record(student, variant, "all", [])
    best = max((r for r in rows if r["variant"] != "hard"), key=lambda r: r["val_accuracy"])
    for strategy in args.strategies.split(","):
        if strategy != "all":
            record(best["student"], best["variant"], strategy, STRATEGIES[strategy])
    if args.seeds:
        top = max(r["val_accuracy"] for r in rows)
        for r in [r for r in rows if "seed" not in r and top - r["val_accuracy"] <= CLOSE]:
            for seed in SEEDS:
                record(r["student"], r["variant"], r["strategy"], STRATEGIES[r["strategy"]],
                       seed)
    print_table(rows, teacher_acc)


def previous_rows(name: str) -> list[dict]:
    path = RESULTS / f"ablation_{name}.json"
    return json.loads(path.read_text())["rows"] if path.exists() else []


def save(args: argparse.Namespace, name: str, teacher_acc: float, rows: list[dict]) -> None:
    RESULTS.mkdir(exist_ok=True)
    out = {"data": name, "machine": f"{platform.machine()}, 2 cores",
           "teacher_val_accuracy": teacher_acc, "epochs": args.epochs,
           "transformer_epochs": args.transformer_epochs, "overrides": args.overrides,
           "rows": rows}
    (RESULTS / f"ablation_{name}.json").write_text(json.dumps(out, indent=2) + "\n")


def print_table(rows: list[dict], teacher_acc: float) -> None:
    """One line per setting: the first seed's row, and where other seeds ran, the mean and
    the spread (max - min) of all of them."""
    print(f"\nteacher validation accuracy: {teacher_acc:.4f}\n")
    print("| student | loss | fractionation | val acc | seeds: mean (spread) | test acc "
          "| % of teacher | macro-F1 | epochs run | params | seconds |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in (r for r in rows if "seed" not in r):
        same = [o["val_accuracy"] for o in rows
                if (o["student"], o["variant"], o["strategy"]) ==
                (r["student"], r["variant"], r["strategy"])]
        seeds = (f"{sum(same) / len(same):.4f} ({max(same) - min(same):.4f}, n={len(same)})"
                 if len(same) > 1 else "–")
        test = f"{r['test_accuracy']:.4f}" if "test_accuracy" in r else "–"
        print(f"| {r['student']} | {r['variant']} | {r['strategy']} | {r['val_accuracy']:.4f} "
              f"| {seeds} | {test} | {r['pct_of_teacher']:.1f} | {r['val_macro_f1']:.4f} "
              f"| {r['epochs_run']:.0f}{'/' + str(r['epochs']) if 'epochs' in r else ''} "
              f"| {r['params']:,} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
