"""Where the time of a ``Predictor`` call goes: tokenization, the model on padded batches,
the model on length-grouped batches, at several batch sizes and thread counts.

    python bench/call_profile.py --data ../shared/data/sst2 \\
        student_int8=/tmp/kdpipe-bench/sst2/full/work/quantized \\
        teacher_int8=/tmp/kdpipe-bench/sst2/full/work/baseline/teacher_int8

For each folder, thread count and batch size b (the first b validation texts, as
bench/run.py times them), median milliseconds per call of:

- ``tokenize``: the Rust backend encoding the b texts (``Predictor._encodings``);
- ``model_padded``: one ONNX Runtime run on the b texts padded to the longest;
- ``model_grouped``: the runs ``Predictor.logits`` makes, texts of similar length together;
- ``call``: ``Predictor.logits`` as a user calls it (tokenize + grouped runs + gathering);

and ``padded_over_real``: tokens computed over real tokens in the padded batch. Prints a
markdown table and writes bench/results/profile_<data name>.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import run as bench  # noqa: E402

BATCHES = (1, 32, 256)


def profile(folder: Path, texts: list[str], threads: int, budget: float) -> list[dict]:
    from kdpipe.evaluation.latency import batch_of
    from kdpipe.serving.predictor import Predictor, length_groups

    predictor = Predictor(folder, threads=threads, batch_size=max(BATCHES))
    rows = []
    for size in BATCHES:
        batch = batch_of(texts, size)
        encodings = predictor._encodings(batch)
        lengths = [len(e) for e in encodings]
        padded = predictor._feed(predictor._encodings(batch))
        fresh = predictor._encodings(batch)  # _feed pads in place: one unpadded set per feed
        groups = [predictor._feed([fresh[i] for i in g])
                  for g in length_groups(lengths, predictor.batch_size)]

        def ms(call) -> float:
            return float(np.median(bench.timed(call, budget)) * 1000)

        rows.append({
            "threads": threads, "batch": size,
            "padded_over_real": max(lengths) * size / sum(lengths),
            "groups": len(groups),
            "tokenize_ms": ms(lambda b=batch: predictor._encodings(b)),
            "model_padded_ms": ms(lambda f=padded: predictor.run(f)),
            "model_grouped_ms": ms(lambda g=groups: [predictor.run(f) for f in g]),
            "call_ms": ms(lambda b=batch: predictor.logits(b)),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a folder with validation.csv")
    parser.add_argument("folders", nargs="+", help="NAME=exported folder")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--budget", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=1,
                        help="profile every folder in turn this many times and keep each "
                             "figure's median: this VM's speed drifts between minutes")
    parser.add_argument("--tag", default="", help="suffix of the results file name")
    args = parser.parse_args()
    import pandas as pd

    texts = pd.read_csv(Path(args.data) / "validation.csv", keep_default_na=False)["text"]
    texts = [str(t) for t in texts]
    runs: dict[str, list[list[dict]]] = {}
    for _ in range(args.rounds):
        for item in args.folders:
            name, _, folder = item.partition("=")
            runs.setdefault(name, []).append(
                [row for t in args.threads.split(",")
                 for row in profile(Path(folder), texts, int(t), args.budget)])
    results = {name: [median_row(rows) for rows in zip(*rounds, strict=True)]
               for name, rounds in runs.items()}
    print("\n| model | threads | batch | padded/real | groups | tokenize ms | model padded ms | "
          "model grouped ms | call ms | call texts/s |")
    print("| --- | " + "---: | " * 9)
    for name, rows in results.items():
        for r in rows:
            print(f"| {name} | {r['threads']} | {r['batch']} | {r['padded_over_real']:.2f} | "
                  f"{r['groups']} | {r['tokenize_ms']:.3f} | {r['model_padded_ms']:.3f} | "
                  f"{r['model_grouped_ms']:.3f} | {r['call_ms']:.3f} | "
                  f"{1000 * r['batch'] / r['call_ms']:,.0f} |")
    data = Path(args.data).resolve().name
    bench.write_json(bench.RESULTS / f"profile_{data}{args.tag}.json",
                     {"data": data, "machine": bench.machine(), "rounds": args.rounds,
                      "models": results})


def median_row(rows: tuple[dict, ...]) -> dict:
    """One row per (threads, batch): the rounds' median of every timed figure."""
    timed = [key for key in rows[0] if key.endswith("_ms")]
    return {**rows[0], **{key: float(np.median([r[key] for r in rows])) for key in timed}}


if __name__ == "__main__":
    main()
