"""Student shape sweep: accuracy against speed for a few TextCNN shapes.

    python bench/shapes.py --work /tmp/kdpipe-bench/sst2/full/work \\
        --shapes 128x100x345,96x100x345,128x64x345,64x64x234

Each shape is EMBEDDINGxFILTERSxWIDTHS (``345``: filter widths 3, 4, 5). Reuses the
prepared data, teacher and soft labels a bench/run.py project left in ``--work``; for each
shape runs kdpipe's fractionate, distill, prune, export and quantize steps (params.yaml
of that project + the shape + ``-S`` overrides) and times the int8 folder's
``Predictor`` as bench/run.py does (same texts, threads and timing). Prints a markdown
table and writes bench/results/shapes_<data name>[_<tag>].json.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import run as bench

from kdpipe.config import load_config
from kdpipe.data.prepare import read_split
from kdpipe.evaluation.models import folder_bytes, onnx_folder
from kdpipe.steps import distill, export, fractionate, prune, quantize
from kdpipe.threads import torch_threads


def parse_shape(text: str) -> list[str]:
    embedding, filters, widths = text.split("x")
    return [f"student.embedding_dim={int(embedding)}",
            f"student.textcnn.num_filters={int(filters)}",
            f"student.textcnn.filter_sizes=[{','.join(widths)}]"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="a bench/run.py project's work folder")
    parser.add_argument("--shapes", default="128x100x345,96x100x345,128x64x345,64x64x234")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--budget", type=float, default=6.0)
    parser.add_argument("-S", "--set", dest="overrides", action="append", default=[])
    parser.add_argument("--tag", default="", help="suffix of the result file and folders "
                        "(for a sweep with other -S settings)")
    args = parser.parse_args()
    tag = f"_{args.tag}" if args.tag else ""
    work = Path(args.work).resolve()
    params = work.parent / "params.yaml"
    data = Path(load_config(params).data.source).name
    prepared = work / "prepared"
    val = read_split(prepared / "validation.parquet")
    rows = []
    for shape in args.shapes.split(","):
        cfg = load_config(params, [f"work_dir={work}", "student.arch=textcnn",
                                   *parse_shape(shape), *args.overrides])
        out = work.parent.parent / f"shapes{tag}" / shape
        start = time.perf_counter()
        fractionate.run(cfg, cfg.paths.soft_labels, prepared, out / "fractions")
        trained = distill.run(cfg, prepared, cfg.paths.soft_labels, out / "fractions",
                              cfg.paths.teacher, out / "student")
        seconds = time.perf_counter() - start
        prune.run(cfg, out / "student", prepared, cfg.paths.soft_labels, out / "pruned")
        export.run(cfg, out / "pruned", prepared, out / "export")
        quantize.run(cfg, out / "export", prepared, out / "quantized", out / "pruned")
        with torch_threads(args.threads):
            model = onnx_folder("student_int8", out / "quantized", args.threads, 256)
            record = bench.measure(model, val, None, args.budget)
        row = {"shape": shape, "params": int(trained.metrics["params"]),
               "val_accuracy_fp32": trained.metrics["val_accuracy"],
               "val_accuracy_int8": record["accuracy"],
               "latency_b1_p50_ms": record["latency_b1_p50_ms"],
               "throughput_b32": record["throughput_b32"],
               "throughput_b256": record["throughput_b256"],
               "size_bytes": folder_bytes(out / "quantized"),
               "train_seconds": round(seconds, 1)}
        rows.append(row)
        print(f"[shapes] {row}", flush=True)
        bench.write_json(bench.RESULTS / f"shapes_{data}{tag}.json",
                         {"data": data, "machine": bench.machine(), "threads": args.threads,
                          "overrides": args.overrides, "rows": rows})
    print("\n| shape (emb x filters x widths) | params | val acc fp32 | val acc int8 | "
          "b1 p50 ms | b32 texts/s | b256 texts/s | folder MB | train s |")
    print("| --- | " + "---: | " * 8)
    for r in rows:
        print(f"| {r['shape']} | {r['params']:,} | {r['val_accuracy_fp32']:.4f} | "
              f"{r['val_accuracy_int8']:.4f} | {r['latency_b1_p50_ms']:.3f} | "
              f"{r['throughput_b32']:,.0f} | {r['throughput_b256']:,.0f} | "
              f"{r['size_bytes'] / 1e6:.2f} | {r['train_seconds']:.0f} |")


if __name__ == "__main__":
    main()
