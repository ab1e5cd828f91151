"""Where an exported model's time goes, operator by operator (ONNX Runtime's profiler).

    python bench/ort_ops.py --data ../shared/data/sst2 /tmp/kdpipe-bench8/sst2/full/work/quantized

Runs the folder's ``model.onnx`` on the first ``--batch`` validation texts, tokenized and
grouped by length as ``Predictor.logits`` does, ``--calls`` times on one thread with ONNX
Runtime's profiling on, and sums each node's kernel time. Prints the top nodes (microseconds
per call, share of all kernel time) and writes bench/results/ort_ops_<data name>.json.
The profiler adds its own overhead, so compare shares, not absolute times, with other
benchmarks.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import pandas as pd

RESULTS = Path(__file__).parent / "results"


def profile(folder: Path, texts: list[str], calls: int) -> dict:
    from kdpipe.serving.ort import import_onnxruntime
    from kdpipe.serving.predictor import MODEL_FILE, Predictor, length_groups

    ort = import_onnxruntime()
    predictor = Predictor(folder, threads=1)
    lengths = [len(e) for e in predictor._encodings(texts)]
    feeds = [predictor._feed(predictor._encodings([texts[i] for i in group]))
             for group in length_groups(lengths, predictor.batch_size)]
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.enable_profiling = True
    with tempfile.TemporaryDirectory(prefix="kdpipe-ort-ops-") as scratch:
        options.profile_file_prefix = str(Path(scratch) / "profile")
        session = ort.InferenceSession(str(folder / MODEL_FILE), options,
                                       providers=["CPUExecutionProvider"])
        for _ in range(calls):
            for feed in feeds:
                session.run(["logits"], feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    by_node: collections.Counter = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            node = event["name"].removesuffix("_kernel_time")
            by_node[(event["args"].get("op_name", "?"), node)] += event["dur"]
    total = sum(by_node.values())
    return {"batches": [list(f["input_ids"].shape) for f in feeds], "calls": calls,
            "kernel_us_per_call": total / calls,
            "nodes": [{"op": op, "node": node, "us_per_call": us / calls, "share": us / total}
                      for (op, node), us in by_node.most_common()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a folder with validation.csv")
    parser.add_argument("folder", help="an exported or quantized folder with model.onnx")
    parser.add_argument("--batch", type=int, default=32, help="texts per call")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    texts = list(pd.read_csv(Path(args.data) / "validation.csv",
                             keep_default_na=False)["text"][: args.batch])
    report = {"data": Path(args.data).name, "folder": args.folder, "texts": len(texts),
              **profile(Path(args.folder), texts, args.calls)}
    print(f"batches {report['batches']}; kernel time {report['kernel_us_per_call']:.0f} us "
          f"per {len(texts)}-text call\n")
    print("| op | node | us per call | share |\n| --- | --- | ---: | ---: |")
    for row in report["nodes"][: args.top]:
        print(f"| {row['op']} | {row['node']} | {row['us_per_call']:.1f} | "
              f"{100 * row['share']:.1f}% |")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"ort_ops_{report['data']}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
