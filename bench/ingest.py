"""Benchmark the ingest step on real data folders: rows, classes, time, content hash.

    python bench/ingest.py ../shared/data/sst2 ../shared/data/ag_news

Prints a markdown table and writes bench/results/ingest.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

from kdpipe.config import load_config
from kdpipe.steps import ingest

RESULTS = Path(__file__).parent / "results"


def measure(source: str, work: Path) -> dict:
    cfg = load_config(None, [f"data.source={source}", f"work_dir={work}",
                             "tracking.enabled=false"])
    start = time.perf_counter()
    ingest.run(cfg, cfg.paths.prepared)
    seconds = time.perf_counter() - start
    card = json.loads((cfg.paths.prepared / "data_card.json").read_text())
    return {"source": source, "rows": card["rows"], "num_classes": card["num_classes"],
            "seconds": round(seconds, 2), "content_hash": card["content_hash"],
            "token_length_train": card["token_length"]["train"],
            "train_repeated_rows": card["duplicates"]["train_repeated_rows"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="+")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, source in enumerate(args.sources):
            rows.append(measure(source, Path(tmp) / str(i)))
    print("| data | train | validation | test | classes | p50 / p99 tokens | seconds |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        n, t = r["rows"], r["token_length_train"]
        print(f"| {Path(r['source']).name} | {n['train']:,} | {n['validation']:,} | "
              f"{n['test']:,} | {r['num_classes']} | {t['p50']:.0f} / {t['p99']:.0f} | "
              f"{r['seconds']:.1f} |")
    RESULTS.mkdir(exist_ok=True)
    out = {"machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
           "python": sys.version.split()[0], "results": rows}
    (RESULTS / "ingest.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
