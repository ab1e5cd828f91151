"""Compression benchmark: prune -> export -> quantize -> evaluate one distilled student.

    python bench/compress.py --work /tmp/kb/sst2 \
        --student /tmp/kb/sst2/ablation/textcnn-kd+feature-all/student

Reuses the prepared data and fine-tuned teacher in ``--work`` (left by bench/teacher.py) and a
distilled student folder; runs kdpipe's own prune, export, quantize and evaluate steps into
``--out`` with params.yaml (snapshotted) and any -S override, then reports what issue #5 asks:
fp32 ONNX parity (max |Δlogit|, label agreement), int8 vs fp32 accuracy, the int8 folder's
size against the teacher's fp32 ONNX, and batch-1 latency of Predictor.predict (tokenization
included) next to the teacher's. Prints a markdown table and writes
bench/results/compress_<work folder name><--tag>.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
from pathlib import Path

from kdpipe.config import load_config
from kdpipe.evaluation.models import folder_bytes
from kdpipe.serving.predictor import model_path
from kdpipe.steps import baseline, evaluate, export, prune, quantize

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="work folder with prepared/ and teacher/")
    parser.add_argument("--student", required=True, help="a distill output folder")
    parser.add_argument("--out", default=None, help="where to write (default: WORK/compress)")
    parser.add_argument("--tag", default="", help="suffix of the results file name")
    parser.add_argument("--baseline", default=None,
                        help="reuse this baseline folder (a `kdpipe baseline` output for the "
                        "same teacher and data) instead of measuring the teacher again")
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    work = Path(args.work)
    out = Path(args.out) if args.out else work / "compress"
    out.mkdir(parents=True, exist_ok=True)
    params = out / "params.snapshot.yaml"
    shutil.copyfile("params.yaml", params)
    cfg = load_config(params, [f"work_dir={work}", "tracking.enabled=false", *args.overrides])
    prepared, teacher = cfg.paths.prepared, cfg.paths.teacher
    steps = {
        "prune": prune.run(cfg, Path(args.student), prepared, cfg.paths.soft_labels,
                           out / "pruned"),
        "export": export.run(cfg, out / "pruned", prepared, out / "export"),
        "quantize": quantize.run(cfg, out / "export", prepared, out / "quantized",
                                 out / "pruned"),
    }
    yardstick = Path(args.baseline) if args.baseline else out / "baseline"
    if not args.baseline:
        steps["baseline"] = baseline.run(cfg, prepared, teacher, yardstick)
    steps["evaluate"] = evaluate.run(cfg, prepared, teacher, yardstick, Path(args.student),
                                     out / "pruned", out / "quantized", out / "evaluation")
    for name, result in steps.items():
        print(f"{name}: {result.summary}")
    ev = json.loads((out / "evaluation" / "metrics.json").read_text())
    exported = json.loads((out / "export" / "export.json").read_text())
    quant = json.loads((out / "quantized" / "quantize.json").read_text())
    teacher_onnx = yardstick / "teacher_onnx" / "model.onnx"
    report = {
        "data": work.name, "machine": f"{platform.machine()}, 2 cores",
        "overrides": args.overrides, "student": args.student,
        "parity": exported["parity"],
        "accuracy": {"fp32": quant["accuracy"]["fp32"], "int8": quant["accuracy"]["int8"],
                     "kept": quant["kept"], "drop_points": round(
                         100 * (quant["accuracy"]["fp32"] - quant["accuracy"]["int8"]), 2)},
        "size": {"int8_folder_bytes": folder_bytes(out / "quantized"),
                 "int8_model_bytes": quantize.model_bytes(model_path(out / "quantized")),
                 "teacher_fp32_onnx_bytes": teacher_onnx.stat().st_size},
        "prune": steps["prune"].metrics,
        "evaluation": {name: {k: m[k] for k in ("accuracy", "macro_f1", "latency_ms",
                                                 "tokenize_ms", "throughput", "size_bytes",
                                                 "params")}
                       for name, m in ev["models"].items()},
        "threads": ev["threads"],
    }
    size = report["size"]
    size["ratio_teacher_to_int8_folder"] = round(
        size["teacher_fp32_onnx_bytes"] / size["int8_folder_bytes"], 2)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"compress_{work.name}{args.tag}.json").write_text(
        json.dumps(report, indent=2) + "\n")
    print(f"\nparity: max |Δlogit| {report['parity']['max_abs_diff']:.1e}, label agreement "
          f"{report['parity']['label_agreement']:.2%} on {report['parity']['rows']} rows")
    print(f"int8 {report['accuracy']['int8']:.4f} vs fp32 {report['accuracy']['fp32']:.4f} "
          f"({report['accuracy']['drop_points']:+.2f} points lost; kept {quant['kept']})")
    print(f"int8 folder {size['int8_folder_bytes'] / 1e6:.2f} MB; teacher fp32 ONNX "
          f"{size['teacher_fp32_onnx_bytes'] / 1e6:.1f} MB; ratio "
          f"{size['ratio_teacher_to_int8_folder']}x\n")
    print("| model | accuracy | b1 p50 ms | b1 p95 ms | b32 texts/s | size MB | params |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, m in report["evaluation"].items():
        print(f"| {name} | {m['accuracy']:.4f} | {m['latency_ms']['b1']['p50']:.3f} | "
              f"{m['latency_ms']['b1']['p95']:.3f} | {m['throughput']['b32']:,.0f} | "
              f"{m['size_bytes'] / 1e6:.2f} | {m['params']:,} |")


if __name__ == "__main__":
    main()
