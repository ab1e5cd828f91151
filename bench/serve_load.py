"""A registered kdpipe model under load and abuse, served by `mlflow models serve` on loopback.

    python bench/serve_load.py            # the demo pipeline's champion, built first
    python bench/serve_load.py --model-uri models:/kdpipe-student@champion \\
        --tracking-uri sqlite:///work/mlflow.db          # a model registered already

The model: with ``--model-uri``, that one (and ``--tracking-uri``, the store that resolves
it). Without, ``kdpipe run`` on the demo data (params.yaml as it is) in a temporary folder
(``--demo-dir`` keeps it, and a later run reuses it), about three minutes on 2 cores, and
its champion: the quickest self-contained way to the model ``make run`` registers. The
server: ``mlflow models serve --env-manager local`` (this environment, ``--workers``
uvicorn workers) on 127.0.0.1, a free port.

1. Load: ``--clients`` threads, each with one keep-alive connection, send ``--requests``
   requests in all, half of one text each, then half of 32 texts each (demo texts, in
   turn), as ``{"inputs": {"text": [...]}}``. Per phase: errors (anything but a 200 with
   one prediction per text), latency p50/p99 (client side, request sent to answer read)
   and requests and texts per second. The clients share the machine with the server.
2. At the limits (``kdpipe.serving.pyfunc_model.Limits`` as this checkout and environment
   set them; the server inherits the environment, but a model registered by another kdpipe
   version carries its own defaults): the most texts a request may hold, one text of the
   most characters allowed, and the most texts of the most characters (the costliest
   request the limits let through); each must be answered (200).
3. Abuse: 10,000 texts, a 1 MB text, a number and nested values in place of a text, and a
   body of ``--big-body-mb`` MB, once as one text and once as many short texts; last, that
   one-text body from ``--clients`` clients at once. Each must be a 4xx with a one-line
   message.

Parts 2 and 3 send one case at a time, each followed by a normal request that must be
answered; per case: status (of the slowest answer), message, seconds, and the server's
memory after and at its highest while the case ran (sampled every 20 ms).

Server memory: RSS of the ``mlflow models serve`` process and its children (the uvicorn
server and its workers), summed (psutil, else /proc/<pid>/status), before and after each
part. Prints a table and writes ``bench/results/serve_load.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO / "tests"))
import run as bench  # noqa: E402  (bench/run.py: machine(), write_json)
from server_stack import free_port, stop  # noqa: E402  (loopback helpers of the tests)

OUT = REPO / "bench" / "results" / "serve_load.json"
BIN = Path(sys.executable).parent
START_LIMIT_S = 300
REQUEST_TIMEOUT_S = 120
MESSAGE_CHARS = 300  # of each refusal's message, kept in the JSON


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-uri", default=None,
                        help="a registered model (default: build the demo champion)")
    parser.add_argument("--tracking-uri", default=None,
                        help="the store that resolves --model-uri (default: "
                             "MLFLOW_TRACKING_URI)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=10_000,
                        help="requests in all, half of 1 text, half of 32")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers")
    parser.add_argument("--big-body-mb", type=float, default=20.0,
                        help="size of the big-body abuse cases")
    parser.add_argument("--demo-dir", type=Path, default=None,
                        help="where the demo project is built and kept (reused when its "
                             "work/mlflow.db exists; default: a temporary folder)")
    parser.add_argument("--out", type=Path, default=OUT, help="where the JSON goes")
    args = parser.parse_args(argv)
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    with tempfile.TemporaryDirectory(prefix="kdpipe-serve-load-") as scratch:
        root = Path(scratch)
        model_uri, tracking_uri, built = args.model_uri, args.tracking_uri, None
        if model_uri is None:
            model_uri, tracking_uri, built = demo_champion(args.demo_dir or root / "demo")
        tracking_uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        texts = demo_texts()
        with serving(model_uri, tracking_uri, args.workers, root) as (base, process):
            doc = {"model_uri": model_uri, "built": built, "machine": bench.machine(),
                   "clients": args.clients, "requests": args.requests,
                   "workers": args.workers, "limits": limits(),
                   # Other work on the machine shows here (1-minute load averages).
                   "loadavg_1m": {"start": os.getloadavg()[0]},
                   "rss_mb": {"start": rss_mb(process.pid)},
                   "server_processes": process_table(process.pid)}
            doc["phases"] = {}
            for batch in (1, 32):
                count = args.requests // 2
                doc["phases"][f"b{batch}"] = load(base, texts, batch, count, args.clients)
                doc["rss_mb"][f"after_b{batch}"] = rss_mb(process.pid)
                doc["loadavg_1m"][f"after_b{batch}"] = os.getloadavg()[0]
            doc["at_limits"] = {name: probe(base, process.pid, body, texts)
                                for name, body in at_limit_bodies(texts, doc["limits"])}
            doc["abuse"] = {name: probe(base, process.pid, body, texts)
                            for name, body in abuse_bodies(args.big_body_mb)}
            name, body = f"{args.big_body_mb:g}mb_one_text_x{args.clients}_at_once", (
                invocation(["x" * int(args.big_body_mb * 1_000_000)]))
            doc["abuse"][name] = probe(base, process.pid, body, texts, args.clients)
            doc["rss_mb"]["end"] = rss_mb(process.pid)
            doc["loadavg_1m"]["end"] = os.getloadavg()[0]
            doc["server_alive"] = process.poll() is None
    print_tables(doc)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    bench.write_json(args.out, doc)
    return doc


def demo_champion(folder: Path) -> tuple[str, str, dict]:
    """``kdpipe run`` on the demo data in ``folder`` (params.yaml of this checkout, SQLite
    store in its work folder), unless its store exists already; (the champion's URI, the
    store's URI, what was run)."""
    import yaml

    folder = folder.resolve()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    name = params["registry"]["model_name"]
    store = folder / "work" / "mlflow.db"
    if store.exists():
        return f"models:/{name}@champion", f"sqlite:///{store}", {"reused": str(folder)}
    folder.mkdir(parents=True, exist_ok=True)
    command = [str(BIN / "kdpipe"), "run", "--params", str(REPO / "params.yaml"),
               "-S", f"work_dir={folder / 'work'}"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    start = time.perf_counter()
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"serve_load: `kdpipe run` failed ({done.returncode}):\n"
                 f"{done.stderr[-3000:]}")
    return (f"models:/{name}@champion", f"sqlite:///{store}",
            {"command": "kdpipe run (demo data, params.yaml)",
             "seconds": round(time.perf_counter() - start, 1)})


def demo_texts() -> list[str]:
    """The texts of the demo data set that ships with kdpipe (test split)."""
    import csv

    import kdpipe

    with open(Path(kdpipe.__file__).parent / "demo" / "test.csv", encoding="utf-8") as handle:
        return [row["text"] for row in csv.DictReader(handle)]


def limits() -> dict[str, int]:
    from kdpipe.serving.pyfunc_model import Limits

    found = Limits.from_environment()
    return {"max_texts": found.max_texts, "max_chars": found.max_chars}


@contextlib.contextmanager
def serving(model_uri: str, tracking_uri: str | None, workers: int,
            folder: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """``mlflow models serve`` on a free loopback port for the block; (base URL, the
    process, leader of its own process group)."""
    port = free_port()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true",
           # `mlflow models serve` starts `uvicorn` from PATH.
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
    log = folder / "serve.log"
    with open(log, "w") as handle:
        process = subprocess.Popen(
            [str(BIN / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(port), "--workers", str(workers)],
            stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            cwd=folder)
    base = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_LIMIT_S
        while not answers_ping(base):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow models serve did not answer /ping (exit "
                                   f"{process.poll()}):\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield base, process
    finally:
        stop(process)


def answers_ping(base: str) -> bool:
    connection = http.client.HTTPConnection(base, timeout=2)
    try:
        return request(connection, "GET", "/ping")[0] == 200
    except (OSError, http.client.HTTPException):
        return False
    finally:
        connection.close()


def request(connection: http.client.HTTPConnection, method: str, path: str,
            body: bytes | None = None) -> tuple[int, bytes]:
    """One request on ``connection`` (reconnected by http.client if the server closed it);
    status and body."""
    connection.request(method, path, body=body,
                       headers={"Content-Type": "application/json"} if body else {})
    response = connection.getresponse()
    return response.status, response.read()


def invocation(texts: list[Any]) -> bytes:
    return json.dumps({"inputs": {"text": texts}}).encode()


def load(base: str, texts: list[str], batch: int, count: int, clients: int) -> dict[str, Any]:
    """``count`` requests of ``batch`` texts from ``clients`` threads; errors, latency and
    throughput."""
    bodies = [invocation([texts[(i * batch + j) % len(texts)] for j in range(batch)])
              for i in range(min(count, len(texts)))]
    latencies: list[float] = []
    errors: list[str] = []
    counter = iter(range(count))
    lock = threading.Lock()

    def client() -> None:
        connection = http.client.HTTPConnection(base, timeout=REQUEST_TIMEOUT_S)
        mine: list[float] = []
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                break
            start = time.perf_counter()
            try:
                status, raw = request(connection, "POST", "/invocations",
                                      bodies[i % len(bodies)])
                rows = json.loads(raw).get("predictions") if status == 200 else None
                if rows is None or len(rows) != batch:
                    errors.append(f"{status}: {raw[:200]!r}")
            except (OSError, http.client.HTTPException, ValueError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                connection.close()
            mine.append(time.perf_counter() - start)
        connection.close()
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    ms = sorted(1000 * s for s in latencies)
    return {"batch": batch, "requests": count, "errors": len(errors),
            "first_error": errors[0] if errors else None, "seconds": round(seconds, 2),
            "p50_ms": round(percentile(ms, 50), 2), "p99_ms": round(percentile(ms, 99), 2),
            "mean_ms": round(statistics.fmean(ms), 2) if ms else 0.0,
            "requests_per_s": round(count / seconds, 1),
            "texts_per_s": round(count * batch / seconds, 1)}


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (0 for none)."""
    if not sorted_values:
        return 0.0
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


def abuse_bodies(big_body_mb: float) -> Iterator[tuple[str, bytes]]:
    """(case name, request body) of each abuse case; the big ones made only when sent."""
    size = int(big_body_mb * 1_000_000)
    yield "10k_texts", invocation(["fine"] * 10_000)
    yield "1mb_text", invocation(["word " * 200_000])
    yield "number", json.dumps({"dataframe_records": [{"text": 5}]}).encode()
    yield "nested_list_dict", invocation([["a", "b"], {"x": 1}])
    yield "dict_in_a_cell", json.dumps(
        {"dataframe_split": {"columns": ["text"], "data": [[{"x": 1}]]}}).encode()
    yield f"{big_body_mb:g}mb_one_text", invocation(["x" * size])
    short = "a short text of some words "  # 27 characters, 31 bytes as a JSON item
    yield f"{big_body_mb:g}mb_many_texts", invocation([short] * (size // 31))


def at_limit_bodies(texts: list[str], limits: dict[str, int]) -> Iterator[tuple[str, bytes]]:
    """Requests the limits let through, the largest of their kind: as many demo texts as
    allowed; one text (demo texts joined) of as many characters as allowed; as many such
    texts as allowed, the largest request of all, in ASCII and with one accented letter
    first (a text that is not plain ASCII skips the word cache: the tokenizer reads it all)."""
    count, chars = limits["max_texts"], limits["max_chars"]
    yield f"{count}_texts", invocation([texts[i % len(texts)] for i in range(count)])
    joined = " ".join(texts)
    longest = (joined * (chars // len(joined) + 1))[:chars]
    yield f"{chars}_chars", invocation([longest])
    yield f"{count}x{chars}_chars", invocation([longest] * count)
    yield f"{count}x{chars}_chars_not_ascii", invocation(["é" + longest[1:]] * count)


def probe(base: str, pid: int, body: bytes, texts: list[str],
          senders: int = 1) -> dict[str, Any]:
    """``body`` sent by ``senders`` clients at once (server memory sampled meanwhile), then a
    normal request; status and message of the slowest answer."""
    answers: list[tuple[float, int, bytes]] = []

    def send() -> None:
        connection = http.client.HTTPConnection(base, timeout=REQUEST_TIMEOUT_S)
        start = time.perf_counter()
        try:
            status, raw = request(connection, "POST", "/invocations", body)
        except (OSError, http.client.HTTPException) as exc:
            status, raw = 0, f"{type(exc).__name__}: {exc}".encode()
        finally:
            connection.close()
        answers.append((time.perf_counter() - start, status, raw))

    threads = [threading.Thread(target=send) for _ in range(senders)]
    with RssPeak(pid) as peak:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    seconds, status, raw = max(answers, key=lambda answer: answer[0])
    statuses = sorted({answer[1] for answer in answers})
    message = one_message(raw) if status != 200 else ""
    return {"body_bytes": len(body), "senders": senders, "status": status,
            "statuses": statuses, "refused": all(400 <= s < 500 for s in statuses),
            "message": message[:MESSAGE_CHARS], "message_chars": len(message),
            "one_line": "\n" not in message, "seconds": round(seconds, 3),
            "rss_mb_peak": peak.peak_mb, "rss_mb_after": rss_mb(pid),
            "normal_request_after": normal_status(base, texts[:2])}


def normal_status(base: str, texts: list[str]) -> int:
    """Status of a request of ``texts`` (0: no answer)."""
    connection = http.client.HTTPConnection(base, timeout=REQUEST_TIMEOUT_S)
    try:
        return request(connection, "POST", "/invocations", invocation(texts))[0]
    except (OSError, http.client.HTTPException):
        return 0
    finally:
        connection.close()


def one_message(raw: bytes) -> str:
    """The ``message`` of a JSON error answer, else the answer as text."""
    try:
        answer = json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")
    if isinstance(answer, dict) and "message" in answer:
        return str(answer["message"])
    return raw.decode(errors="replace")


class RssPeak:
    """The highest ``rss_mb(pid)`` seen every 20 ms while the block runs."""

    def __init__(self, pid: int) -> None:
        self.pid, self.peak_mb = pid, rss_mb(pid)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, rss_mb(self.pid))

    def _sample(self) -> None:
        while not self._done.wait(0.02):
            self.peak_mb = max(self.peak_mb, rss_mb(self.pid))


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and its descendants, in MB (10^6 bytes)."""
    try:
        import psutil
    except ImportError:
        return round(sum(_vm_rss_kb(p) for p in [pid, *_descendants(pid)]) / 1000, 1)
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += process.memory_info().rss
    return round(total / 1e6, 1)


def process_table(pid: int) -> list[dict[str, Any]]:
    """``pid`` and its descendants: pid, command (first words) and RSS in MB each."""
    rows = []
    for one in [pid, *_descendants(pid)]:
        with contextlib.suppress(OSError):
            words = Path(f"/proc/{one}/cmdline").read_bytes().decode().split("\0")
            command = " ".join([Path(words[0]).name, *words[1:4]]).strip()
            rows.append({"pid": one, "command": command[:80],
                         "rss_mb": round(_vm_rss_kb(one) / 1000, 1)})
    return rows


def _vm_rss_kb(pid: int) -> int:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return next((int(line.split()[1]) * 1024 // 1000 for line in status.splitlines()
                 if line.startswith("VmRSS:")), 0)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def print_tables(doc: dict[str, Any]) -> None:
    print(f"\n{doc['model_uri']}: {doc['clients']} clients, {doc['requests']:,} requests, "
          f"{doc['workers']} uvicorn worker(s); limits {doc['limits']}\n")
    print("| phase | requests | errors | p50 ms | p99 ms | requests/s | texts/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, row in doc["phases"].items():
        print(f"| {name} | {row['requests']:,} | {row['errors']} | {row['p50_ms']} | "
              f"{row['p99_ms']} | {row['requests_per_s']:,} | {row['texts_per_s']:,} |")
    print("\n| request | body MB | status | seconds | server MB peak | after | then | message |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for part in ("at_limits", "abuse"):
        for name, row in doc[part].items():
            message = row["message"][:90] if row["status"] != 200 else ""
            print(f"| {name} | {row['body_bytes'] / 1e6:.2f} | {row['status']} | "
                  f"{row['seconds']} | {row['rss_mb_peak']} | {row['rss_mb_after']} | "
                  f"{row['normal_request_after']} | {message} |")
    print("\nserver RSS MB: " + ", ".join(f"{k} {v}" for k, v in doc["rss_mb"].items()))
    print("load average (1 min): " + ", ".join(f"{k} {v:.2f}"
                                              for k, v in doc["loadavg_1m"].items()))
    print("at start: " + "; ".join(f"{p['command']} {p['rss_mb']}"
                                   for p in doc["server_processes"]))


if __name__ == "__main__":
    main()
