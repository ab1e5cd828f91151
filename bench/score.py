"""Validation and test accuracy of exported folders on one project's prepared data.

    python bench/score.py --work /tmp/kdpipe-bench14/sst2/full/work --tag _bilstm \\
        textcnn_int8=/tmp/kdpipe-bench14/sst2/full/work/quantized h80=/tmp/kx80/out/quantized

For students distilled and compressed beside a benchmark project (bench/ablation.py,
bench/compress.py), whose reports give validation accuracy only: scores each ``NAME=folder``
(an ONNX folder ``Predictor`` opens) on the project's validation and test splits, as
bench/run.py scores its systems. Prints a markdown table and writes
bench/results/score_<data name><--tag>.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import run as bench  # noqa: E402  (bench/run.py: machine(), write_json, RESULTS)


def score(folder: Path, splits: dict) -> dict[str, float]:
    from kdpipe.evaluation.models import onnx_folder

    model = onnx_folder(folder.name, folder, 1, 64)
    out = {}
    for name, split in splits.items():
        out[f"{name}_accuracy"], out[f"{name}_macro_f1"] = bench.quality(model, split)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", required=True, help="a project's work folder (prepared/)")
    parser.add_argument("folders", nargs="+", help="NAME=exported folder")
    parser.add_argument("--tag", default="", help="suffix of the results file name")
    parser.add_argument("--name", default=None, help="data name in the results file name "
                        "(default: a bench/run.py project's, <root>/<name>/full/work)")
    args = parser.parse_args()
    from kdpipe.data.prepare import read_split

    prepared = Path(args.work) / "prepared"
    splits = {name: read_split(prepared / f"{name}.parquet") for name in ("validation", "test")
              if (prepared / f"{name}.parquet").exists()}
    results = {}
    for item in args.folders:
        name, _, folder = item.partition("=")
        results[name] = {"folder": folder, **score(Path(folder), splits)}
    print("\n| model | " + " | ".join(f"{s} acc | {s} F1" for s in splits) + " |")
    print("| --- | " + "---: | " * (2 * len(splits)))
    for name, r in results.items():
        print(f"| {name} | " + " | ".join(
            f"{r[f'{s}_accuracy']:.4f} | {r[f'{s}_macro_f1']:.4f}" for s in splits) + " |")
    data = args.name or Path(args.work).resolve().parents[1].name
    bench.write_json(bench.RESULTS / f"score_{data}{args.tag}.json",
                     {"data": data, "work": args.work, "machine": bench.machine(),
                      "models": results})


if __name__ == "__main__":
    main()
