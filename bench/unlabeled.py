"""Unlabeled in-domain texts as transfer data (data.unlabeled), measured honestly: half of a
data set's training rows keep their labels, the other half become unlabeled texts.

    python bench/unlabeled.py --data ../shared/data/ag_news

In one work_dir: ``kdpipe run --to distill`` on the labelled half alone, then the same with
``data.unlabeled`` set to the other half's texts. The teacher is fine-tuned once, on the
labelled half (new unlabeled texts leave it up to date); the second run labels the new texts
and distils from the larger transfer set. Per run: the distilled student's validation and
test accuracy, and the seconds of soft_labels, fractionate and distill (what the unlabeled
texts add). Prints a table and writes ``bench/results/unlabeled_<data>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import run as bench  # noqa: E402

# bench/run.py's teacher schedule, so the teacher is trained as in the other benchmarks.
SETTINGS = ["tracking.enabled=false", *bench.BENCH_SETTINGS]
TIMED = ("soft_labels", "fractionate", "distill")


def make_halves(data: Path, folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """``folder``/labelled/{train,validation,test}.csv (train: a stratified half of the
    source's) and ``folder``/unlabeled.csv (the other half's texts, no label column)."""
    import pandas as pd

    labelled = folder / "labelled"
    labelled.mkdir(parents=True, exist_ok=True)
    train = pd.read_csv(data / "train.csv", keep_default_na=False)
    half = train.groupby("label").sample(frac=0.5, random_state=seed)
    rest = train.drop(half.index)
    for name, frame in (("train", half.sort_index()),
                        *((s, pd.read_csv(data / f"{s}.csv", keep_default_na=False))
                          for s in ("validation", "test"))):
        _write(labelled / f"{name}.csv", frame.to_csv(index=False))
    unlabeled = folder / "unlabeled.csv"
    _write(unlabeled, rest[["text"]].to_csv(index=False))
    return labelled, unlabeled


def _write(path: Path, text: str) -> None:
    # Unchanged files keep their time: a new one would make ingest, and all after it, stale.
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def kdpipe_run(project: Path, settings: list[str]) -> dict[str, float]:
    """``kdpipe run --to distill`` in ``project``; the seconds each timed step took (0 when
    kept)."""
    command = [str(Path(bench.BIN) / "kdpipe"), "run", "--to", "distill",
               *[w for s in settings for w in ("-S", s)]]
    started = time.time()
    done = subprocess.run(command, cwd=project, text=True)
    if done.returncode != 0:
        raise SystemExit(f"kdpipe run failed in {project} (exit {done.returncode})")
    seconds = {}
    for step in TIMED:  # a step kept up to date wrote no metrics file in this run
        path = project / "work" / "metrics" / f"{step}.json"
        ran = path.stat().st_mtime >= started
        seconds[step] = round(json.loads(path.read_text())["seconds"], 1) if ran else 0.0
    return seconds


def student_scores(student_dir: Path, prepared_dir: Path) -> dict[str, float]:
    """Validation and test accuracy of a distilled (unpruned) student folder."""
    import torch

    from kdpipe.data.prepare import read_split
    from kdpipe.models.students import load_student, load_student_tokenizer
    from kdpipe.serving.padding import pad_ids

    model, tokenizer = load_student(student_dir), load_student_tokenizer(student_dir)
    out = {}
    for split in ("validation", "test"):
        rows = read_split(prepared_dir / f"{split}.parquet")
        ids = tokenizer(rows.texts, truncation=True, max_length=128)["input_ids"]
        predicted = []
        with torch.inference_mode():
            for i in range(0, len(ids), 256):
                batch, mask = pad_ids(ids[i:i + 256], tokenizer.pad_token_id)
                logits = model(torch.from_numpy(batch),
                               torch.from_numpy(mask.astype(np.int64))).logits
                predicted.append(logits.argmax(1).numpy())
        out[f"{split}_accuracy"] = float((np.concatenate(predicted) ==
                                          np.asarray(rows.labels)).mean())
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a folder of train/validation/test.csv")
    parser.add_argument("--work", default="/tmp/kdpipe-bench/unlabeled")
    parser.add_argument("--results", default=str(bench.RESULTS))
    args = parser.parse_args(argv)
    os.environ.update(DVC_NO_ANALYTICS="1", MLFLOW_DISABLE_TELEMETRY="true")
    data = Path(args.data).resolve()
    root = Path(args.work).resolve() / data.name
    labelled, unlabeled = make_halves(data, root / "data")
    project = root / "project"
    project.mkdir(parents=True, exist_ok=True)
    base = [f"data.source={labelled}", f"soft_labels.cache_dir={root / 'cache'}", *SETTINGS]
    rows = {}
    for name, extra in (("labelled half", []), ("+ other half unlabeled",
                                                 [f"data.unlabeled={unlabeled}"])):
        seconds = kdpipe_run(project, base + extra)
        card = json.loads((project / "work" / "prepared" / "data_card.json").read_text())
        rows[name] = {"train_rows": card["rows"]["train"],
                      "unlabeled_rows": (card.get("unlabeled") or {}).get("rows", 0),
                      "seconds": seconds,
                      **student_scores(project / "work" / "student",
                                       project / "work" / "prepared")}
        print(f"[unlabeled] {name}: {json.dumps(rows[name])}", flush=True)
    doc = {"data": data.name, "machine": bench.machine(), "settings": SETTINGS, "rows": rows}
    bench.write_json(Path(args.results) / f"unlabeled_{data.name}.json", doc)
    print("\n| transfer data | labelled rows | unlabeled rows | val acc | test acc | "
          "soft_labels s | distill s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['train_rows']:,} | {r['unlabeled_rows']:,} | "
              f"{r['validation_accuracy']:.4f} | {r['test_accuracy']:.4f} | "
              f"{r['seconds']['soft_labels']:.0f} | {r['seconds']['distill']:.0f} |")
    return doc


if __name__ == "__main__":
    main()
