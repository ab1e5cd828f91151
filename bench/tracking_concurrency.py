"""Concurrent logging into one MLflow run, as parallel KFP tasks do: N processes at once,
each logging M steps of its own metric, against MLflow's SQLite file and against an MLflow
server on PostgreSQL with S3 artifacts (``tests/server_stack.py``, on loopback).

    python bench/tracking_concurrency.py [--processes 8] [--metrics 40]

Prints a markdown table (metrics logged, arrived, errors, seconds, the first error) and
writes ``bench/results/tracking_concurrency.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(REPO / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--metrics", type=int, default=40, help="steps each process logs")
    parser.add_argument("--results", default=str(RESULTS), help="where the JSON goes")
    args = parser.parse_args()
    import server_stack

    why = server_stack.missing()
    if why:
        sys.exit(f"tracking_concurrency: {why}")
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    rows = {}
    with tempfile.TemporaryDirectory(prefix="kdpipe-concurrency-") as scratch:
        root = Path(scratch)
        rows["sqlite"] = server_stack.concurrent_logging(
            f"sqlite:///{root / 'mlflow.db'}", args.processes, args.metrics)
        with server_stack.running_stack(root / "stack") as stack:
            rows["server"] = server_stack.concurrent_logging(
                stack.tracking_uri, args.processes, args.metrics)
    print("| backend | processes x metrics | arrived | errors | seconds | first error |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, row in rows.items():
        print(f"| {name} | {row['processes']} x {row['metrics_each']} | {row['arrived']} | "
              f"{row['errors']} | {row['seconds']} | {row['first_error'] or '-'} |")
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tracking_concurrency.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
