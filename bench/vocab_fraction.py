"""How much of the vocabulary pruning should keep: a ``prune.min_vocab_fraction`` sweep over
one bench project's distilled student.

    python bench/vocab_fraction.py --work /tmp/kdpipe-bench/sst2/full --fractions 0,0.46,0.55

For each fraction, runs kdpipe's prune, export and quantize steps on the project's student
(``work/student``) with that setting (all else from the project's params.yaml) into
``--out``/<fraction>, then scores the int8 folder on validation and test as bench/run.py
does and sizes it against the teacher's fp32 ONNX (the project's baseline step wrote it).
Prints a markdown table and writes bench/results/vocab_fraction_<data name>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import run as bench  # noqa: E402  (bench/run.py: project_config, machine(), write_json)
from score import score  # noqa: E402


def sweep_one(project: Path, fraction: float, out: Path, splits: dict) -> dict:
    from kdpipe.evaluation.models import folder_bytes
    from kdpipe.steps import export, prune, quantize

    cfg = bench.project_config(project, f"prune.min_vocab_fraction={fraction}",
                               "tracking.enabled=false")
    p = cfg.paths
    pruned = prune.run(cfg, p.student, p.prepared, p.soft_labels, out / "pruned")
    export.run(cfg, out / "pruned", p.prepared, out / "export")
    quantize.run(cfg, out / "export", p.prepared, out / "quantized")
    vocabulary = json.loads((out / "pruned" / prune.REPORT_FILE).read_text())["vocabulary"]
    return {"kept": vocabulary["kept"], "added_common": vocabulary["added_common"],
            "pruned_val_accuracy": pruned.metrics["val_accuracy_after"],
            "size_bytes": folder_bytes(out / "quantized"),
            **score(out / "quantized", splits)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="a bench/run.py project folder")
    parser.add_argument("--fractions", default="0,0.46,0.5,0.55,0.58")
    parser.add_argument("--out", default=None, help="scratch folder (default: WORK/vocab)")
    args = parser.parse_args()
    from kdpipe.data.prepare import read_split

    project = Path(args.work).resolve()
    out = Path(args.out) if args.out else project / "vocab"
    cfg = bench.project_config(project)
    splits = {name: read_split(cfg.paths.prepared / f"{name}.parquet")
              for name in ("validation", "test")}
    onnx_bytes = (cfg.paths.baseline / "teacher_onnx" / "model.onnx").stat().st_size
    rows = {}
    for fraction in [float(f) for f in args.fractions.split(",")]:
        rows[f"{fraction:g}"] = row = sweep_one(project, fraction, out / f"{fraction:g}", splits)
        row["teacher_onnx_over_folder"] = round(onnx_bytes / row["size_bytes"], 2)
    print("\n| min_vocab_fraction | rows kept | added | int8 val acc | int8 test acc "
          "| size MB | teacher ONNX / folder |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for fraction, r in rows.items():
        print(f"| {fraction} | {r['kept']:,} | {r['added_common']:,} | "
              f"{r['validation_accuracy']:.4f} | {r['test_accuracy']:.4f} | "
              f"{r['size_bytes'] / 1e6:.2f} | {r['teacher_onnx_over_folder']:.1f}x |")
    name = project.parent.name
    bench.write_json(bench.RESULTS / f"vocab_fraction_{name}.json",
                     {"data": name, "project": str(project), "machine": bench.machine(),
                      "teacher_onnx_fp32_bytes": onnx_bytes, "fractions": rows})


if __name__ == "__main__":
    main()
