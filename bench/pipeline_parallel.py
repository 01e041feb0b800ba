"""The same grid run serially and on Ray, against one PostgreSQL-backed tracking server, in one process.

Prints `name: value` lines: the wall time of `realign pipeline --executor local` and of `--executor ray` on the same
grid (an SFT cell, then `--cells` independent score cells on it, then compare), each in a fresh experiment so
nothing is reused, and their ratio (serial / ray; > 1 = Ray faster). On a machine with few cores the ratio shows
the cost of Ray's workers (each imports torch and realign once) against the cells' own work; with more cores and
heavier cells (`--model smollm2-135m`) the independent cells overlap.

    .venv/bin/python bench/pipeline_parallel.py                          # tiny model, 8 cells, its own server
    .venv/bin/python bench/pipeline_parallel.py --model smollm2-135m --cells 8
    .venv/bin/python bench/pipeline_parallel.py --url http://127.0.0.1:5000   # a server already running
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TINY_STEP = {"data.num_examples": 16, "train.max_steps": 2, "train.per_device_train_batch_size": 4,
             "train.max_length": 96, "eval.enabled": False}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(folder: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen(["bash", str(REPO / "scripts" / "server.sh"), "--dir", str(folder), "--port",
                                str(port), "--pg-port", str(free_port())], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(480):
        if process.poll() is not None:
            sys.exit("scripts/server.sh exited; run it by hand to see why")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1):
                return process, url
        except OSError:
            time.sleep(0.5)
    sys.exit("the server did not answer within 4 minutes")


def grid(model: str, cells: int, experiment: str) -> dict:
    score = {"stage": "score", "model_run": "${sft}", "nsamples": 8, "data.max_length": 96, "eval.enabled": False,
             "grid": {"sparsity": [round(0.01 * (i + 1), 3) for i in range(cells)]}}
    sft = {"stage": "align", "method": "sft", **(TINY_STEP if model == "tiny" else {"eval.enabled": False})}
    return {"experiment": experiment, "model": model, "steps": {"sft": sft, "region": score,
                                                                "summary": {"stage": "compare"}}}


def timed_pipeline(path: Path, executor: str, url: str, cwd: Path) -> float:
    env = {**os.environ, "MLFLOW_TRACKING_URI": url, "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "realign.cli", "pipeline", "--name", str(path), "--executor",
                             executor], cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode:
        sys.exit(f"--executor {executor} failed:\n{result.stderr[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tiny", help="model preset of every cell (default tiny)")
    parser.add_argument("--cells", type=int, default=8, help="independent score cells in the grid (default 8)")
    parser.add_argument("--url", default="", help="a running tracking server (default: start scripts/server.sh)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        server, url = (None, args.url) if args.url else start_server(folder / "server")
        try:
            tag = uuid.uuid4().hex[:6]
            seconds = {}
            for executor in ("local", "ray"):
                path = folder / f"{executor}.yaml"
                path.write_text(yaml.safe_dump(grid(args.model, args.cells, f"bench-{executor}-{tag}"), sort_keys=False))
                seconds[executor] = timed_pipeline(path, executor, url, folder)
            print(f"cells: {args.cells + 2} ({args.cells} independent), model {args.model}, cores {os.cpu_count()}")
            print(f"serial_seconds: {seconds['local']:.1f}")
            print(f"ray_seconds: {seconds['ray']:.1f}")
            print(f"ratio_serial_over_ray: {seconds['local'] / seconds['ray']:.2f}")
        finally:
            if server is not None:
                server.send_signal(signal.SIGTERM)
                server.wait(timeout=60)


if __name__ == "__main__":
    main()
