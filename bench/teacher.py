"""Benchmark the teacher and soft-label steps on a real data folder.

    python bench/teacher.py --data ../shared/data/sst2 -S teacher.lr=8e-5

Runs ingest -> teacher -> soft_labels with kdpipe's own step functions (any -S override
applies), then measures, in the same process:
- teacher fine-tuning: seconds per epoch, validation accuracy / macro-F1 per evaluation;
- soft-label throughput on a sample of train texts: length-sorted dynamic batches against
  naive batches padded to max_length, same model, batch size and threads;
- the full soft-label step (cache miss), then a rerun (cache hit).
Prints a markdown table and writes bench/results/teacher_<data folder name>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from kdpipe.config import load_config
from kdpipe.data.prepare import read_split
from kdpipe.steps import ingest, soft_labels, teacher

RESULTS = Path(__file__).parent / "results"


def padded_vs_sorted(cfg, sample: int) -> dict:
    """Texts/s of the trained teacher over ``sample`` train texts, both batching schemes."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kdpipe.serving.padding import length_sorted_batches, token_counts

    texts = read_split(cfg.paths.prepared / "train.parquet").texts
    rng = np.random.default_rng(0)
    texts = [texts[i] for i in rng.choice(len(texts), size=min(sample, len(texts)),
                                          replace=False)]
    tokenizer = AutoTokenizer.from_pretrained(cfg.paths.teacher)
    model = AutoModelForSequenceClassification.from_pretrained(cfg.paths.teacher).eval()
    size, max_length = cfg.soft_labels.batch_size, cfg.ingest.max_length
    out = {}
    with torch.inference_mode():
        start = time.perf_counter()
        for i in range(0, len(texts), size):
            batch = tokenizer(texts[i:i + size], padding="max_length", truncation=True,
                              max_length=max_length, return_tensors="pt")
            model(**batch)
        out["naive_padded_texts_per_s"] = len(texts) / (time.perf_counter() - start)
        start = time.perf_counter()
        for index in length_sorted_batches(token_counts(tokenizer, texts, max_length), size):
            batch = tokenizer([texts[j] for j in index], padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt")
            model(**batch)
        out["length_sorted_texts_per_s"] = len(texts) / (time.perf_counter() - start)
    out["speedup"] = out["length_sorted_texts_per_s"] / out["naive_padded_texts_per_s"]
    out["sample"] = len(texts)
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--work", default="/tmp/kdpipe-bench")
    parser.add_argument("--sample", type=int, default=4096,
                        help="train texts for the padded-vs-sorted comparison")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    name = Path(args.data).name
    cfg = load_config(None, [f"data.source={args.data}", f"work_dir={args.work}/{name}",
                             f"soft_labels.cache_dir={args.work}/cache",
                             "tracking.enabled=false", *args.overrides])
    paths = cfg.paths
    steps = {}
    start = time.perf_counter()
    ingest.run(cfg, paths.prepared)
    steps["ingest"] = time.perf_counter() - start
    start = time.perf_counter()
    taught = teacher.run(cfg, paths.prepared, paths.teacher, paths.teacher_checkpoints)
    steps["teacher"] = time.perf_counter() - start
    report = json.loads((paths.teacher / "training.json").read_text())
    start = time.perf_counter()
    labelled = soft_labels.run(cfg, paths.teacher, paths.prepared, paths.soft_labels)
    steps["soft_labels"] = time.perf_counter() - start
    start = time.perf_counter()
    again = soft_labels.run(cfg, paths.teacher, paths.prepared, paths.soft_labels)
    steps["soft_labels_cache_hit"] = time.perf_counter() - start
    assert again.metrics["cache_hit"] == 1.0, "second soft-label run was not a cache hit"
    batching = padded_vs_sorted(cfg, args.sample)
    epochs = max(taught.metrics["epochs_run"], 1e-9)
    result = {
        "data": name,
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
        "overrides": args.overrides,
        "teacher": {
            "checkpoint": cfg.teacher.checkpoint,
            "val_accuracy": taught.metrics["val_accuracy"],
            "val_macro_f1": taught.metrics["val_macro_f1"],
            "epochs_run": taught.metrics["epochs_run"],
            "seconds_per_epoch": round(taught.metrics["train_seconds"] / epochs, 1),
            "train_texts_per_second": taught.metrics["texts_per_second"],
            "evaluations": report["evaluations"],
        },
        "soft_labels": {
            "texts_per_second": labelled.metrics["texts_per_second"],
            "teacher_val_accuracy": labelled.metrics["teacher_val_accuracy"],
            "cache_hit_seconds": round(steps["soft_labels_cache_hit"], 3),
            "batching": batching,
        },
        "step_seconds": {k: round(v, 1) for k, v in steps.items()},
    }
    t, s = result["teacher"], result["soft_labels"]
    print("| data | teacher val acc | F1 | epochs | s / epoch | soft labels texts/s | "
          "sorted vs padded (texts/s) | cache hit s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| {name} | {t['val_accuracy']:.4f} | {t['val_macro_f1']:.4f} | "
          f"{t['epochs_run']:.2f} | {t['seconds_per_epoch']:.0f} | {s['texts_per_second']:.0f} | "
          f"{batching['length_sorted_texts_per_s']:.0f} vs "
          f"{batching['naive_padded_texts_per_s']:.0f}"
          f" ({batching['speedup']:.1f}x) | {s['cache_hit_seconds']:.2f} |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"teacher_{name}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
