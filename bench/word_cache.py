"""What the serving word cache (``kdpipe.serving.word_cache``) gives on texts it has not seen.

    python bench/word_cache.py --data ../shared/data/sst2 \\
        student_int8=/tmp/kdpipe-bench10/sst2/full/work/quantized \\
        teacher_int8=/tmp/kdpipe-bench10/sst2/full/work/baseline/teacher_int8

bench/run.py times calls on the same 32 or 256 validation texts again and again, so there
every word is in the cache after the first call. Here each folder gets a fresh
``Predictor`` (1 thread) and goes over the test split in calls of ``--batch`` texts twice:
the first pass meets every word for the first time in that process, the second finds them
all cached; then the same without the cache. Texts per second of each pass; prints a
markdown table and writes bench/results/word_cache_<data name>.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import run as bench  # noqa: E402


def passes(folder: Path, texts: list[str], batch: int, cache: bool) -> dict:
    from kdpipe.serving.predictor import Predictor

    predictor = Predictor(folder, threads=1)
    if not cache:
        predictor.words = None
    row: dict = {"cache": cache and predictor.words is not None}
    for name in ("first_pass", "second_pass"):
        start = time.perf_counter()
        for i in range(0, len(texts), batch):
            predictor.logits(texts[i:i + batch])
        row[f"{name}_texts_per_s"] = round(len(texts) / (time.perf_counter() - start), 1)
    row["words_cached"] = len(predictor.words.words) if predictor.words is not None else 0
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="a folder with test.csv")
    parser.add_argument("--batch", type=int, default=32, help="texts per call")
    parser.add_argument("folders", nargs="+", help="NAME=exported folder")
    args = parser.parse_args(argv)
    import pandas as pd

    frame = pd.read_csv(args.data / "test.csv", keep_default_na=False)
    if "text" not in frame:
        sys.exit(f"{args.data / 'test.csv'}: no 'text' column")
    texts = [str(t) for t in frame["text"]]
    rows = {}
    for spec in args.folders:
        name, folder = spec.split("=", 1)
        rows[name] = [passes(Path(folder), texts, args.batch, cache) for cache in (True, False)]
    print(f"\n{len(texts):,} test texts, {args.batch} per call, 1 thread\n")
    print("| model | word cache | first pass texts/s | second pass texts/s | words cached |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name, pair in rows.items():
        for row in pair:
            print(f"| {name} | {'on' if row['cache'] else 'off'} | "
                  f"{row['first_pass_texts_per_s']:,.0f} | {row['second_pass_texts_per_s']:,.0f} "
                  f"| {row['words_cached']:,} |")
    doc = {"data": args.data.name, "machine": bench.machine(), "texts": len(texts),
           "batch": args.batch, "systems": rows}
    bench.write_json(Path(__file__).parent / "results" / f"word_cache_{args.data.name}.json", doc)
    return doc


if __name__ == "__main__":
    main()
