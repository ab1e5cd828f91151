"""The demo pipeline against each tracking backend: MLflow's local SQLite store, and an MLflow
server on PostgreSQL with its artifacts in S3 (moto's server), started on loopback by
``tests/server_stack.py``.

    python bench/tracking_stack.py [--rounds 1]

Each round runs ``kdpipe run`` on the demo data in a fresh work folder per backend (the
teacher is fine-tuned each time: nothing is cached between runs) and times the whole command.
Prints a markdown table and writes ``bench/results/tracking_stack.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
sys.path.insert(0, str(REPO / "tests"))


def run_pipeline(work: Path, env: dict[str, str]) -> dict:
    """``kdpipe run`` in ``work``; its seconds and exit code."""
    work.mkdir(parents=True)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "kdpipe", "run", "-S", f"work_dir={work}"],
                          cwd=work, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        print(done.stdout[-2000:], done.stderr[-2000:], file=sys.stderr)
    return {"seconds": round(seconds, 1), "exit_code": done.returncode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1, help="runs per backend")
    parser.add_argument("--results", default=str(RESULTS), help="where the JSON goes")
    args = parser.parse_args()
    import server_stack

    why = server_stack.missing()
    if why:
        sys.exit(f"tracking_stack: {why}")
    base = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1"}
    base.pop("MLFLOW_TRACKING_URI", None)
    rows: dict[str, list[dict]] = {"sqlite": [], "server": []}
    with tempfile.TemporaryDirectory(prefix="kdpipe-stack-bench-") as scratch:
        root = Path(scratch)
        with server_stack.running_stack(root / "stack") as stack:
            for i in range(args.rounds):
                rows["sqlite"].append(run_pipeline(root / f"sqlite{i}", base))
                rows["server"].append(run_pipeline(
                    root / f"server{i}", {**base, "MLFLOW_TRACKING_URI": stack.tracking_uri}))
    doc = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
           "command": "kdpipe run (demo data)", "rounds": rows}
    print("| backend | runs | seconds (each) | exit codes |\n| --- | --- | --- | --- |")
    for name, label in (("sqlite", "SQLite file (default)"),
                        ("server", "MLflow server, PostgreSQL + S3 (moto)")):
        runs = rows[name]
        print(f"| {label} | {len(runs)} | {', '.join(str(r['seconds']) for r in runs)} | "
              f"{', '.join(str(r['exit_code']) for r in runs)} |")
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tracking_stack.json").write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
