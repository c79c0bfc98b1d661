"""From an inbox drop to a promoted champion under `erasure serve`, split into waiting and work.

A fresh store (its own ERASURE_HOME) gets the given model folder as champion v1 and the given
world as reference data; `erasure serve` starts its own local Prefect server; one request file is
dropped into the inbox. Waiting = drop → the batch's attempt starts (file noticed, event,
automation, runner poll, flow-run process start); work = attempt start → promoted.

    python -m infra.serve_bench --model .erasure/bench-champion --manifest .erasure/world/manifest.jsonl \\
        --target circle --out docs/results/serve-bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from infra.batch_bench import fresh_store


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cpu_name() -> str:
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _first(history: list[dict], accept) -> float | None:
    row = next((r for r in history if accept(r.get("status"))), None)
    return datetime.fromisoformat(row["at"]).timestamp() if row else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="open_clip model folder of the first champion")
    parser.add_argument("--manifest", type=Path, required=True, help="reference manifest (the world's)")
    parser.add_argument("--target", default="circle", help="class to erase")
    parser.add_argument("--method", default="auto")
    parser.add_argument("--timeout-s", type=float, default=1800)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    from mlflow import MlflowClient

    from tasks import ledger

    with tempfile.TemporaryDirectory(prefix="serve-bench-") as home:
        settings = fresh_store(args.model, args.manifest, Path(home))
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
        log = Path(home) / "serve.log"
        started = time.time()
        process = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "--port", str(_free_port()), "--no-bridge"], env=env,
                                   stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while "Prefect UI" not in log.read_text():
                if process.poll() is not None or time.time() - started > 300:
                    raise SystemExit(f"erasure serve did not start:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
            ready = time.time()
            request = {"request_id": f"serve-bench-{args.target}", "requester": "bench@clip-erasure",
                       "target": {"kind": "class", "class_name": args.target}, "method": args.method}
            inbox = settings.home / "inbox"
            (inbox / "request.json.part").write_text(json.dumps(request))
            dropped = time.time()
            (inbox / "request.json.part").rename(inbox / "request.json")
            client = MlflowClient()
            while True:
                state = ledger.find(client, settings.experiment, request["request_id"])
                if state is not None and state.status in ledger.TERMINAL:
                    break
                if time.time() - dropped > args.timeout_s:
                    raise SystemExit(f"no outcome after {args.timeout_s:.0f} s:\n{log.read_text()[-3000:]}")
                time.sleep(1)
            work_started = _first(state.history, lambda status: status != "received")
            finished = _first(state.history, lambda status: status in ledger.TERMINAL)
            result = {"cpu": _cpu_name(), "cores": os.cpu_count(), "target": args.target,
                      "status": state.status, "model_version": state.model_version, "service_start_s": ready - started,
                      "waiting_s": work_started - dropped, "work_s": finished - work_started, "total_s": finished - dropped}
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
