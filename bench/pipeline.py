"""The default pipeline's wall time on this machine, then the same command again (every stage reused).

Runs `realign pipeline --name <experiment>` twice in a fresh tracking store (a temp dir, or --workdir), each as
its own process, as a user would. Prints `name: value` lines:
  first_run_s (goal <= 900 on 2 cores for the default), second_run_s, second_over_first (goal <= 0.05),
  stage_runs_first, stage_runs_second_new (goal 0: nothing rerun but compare).

    .venv/bin/python bench/pipeline.py                      # the offline default chain on SmolLM2 (tens of minutes)
    .venv/bin/python bench/pipeline.py --name my-experiment.yaml --workdir /tmp/bench-pipeline
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run_pipeline(name: str, workdir: Path) -> float:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}", "HF_HUB_OFFLINE": "1"}
    env.pop("MLFLOW_RUN_ID", None)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "realign.cli", "pipeline", "--name", name], cwd=workdir, env=env,
                   check=True)
    return time.perf_counter() - started


def stage_run_count(workdir: Path) -> int:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    return sum(1 for run in runs if run.data.tags.get("realign.stage") not in (None, "pipeline", "compare"))


def stage_seconds(workdir: Path) -> dict[str, float]:
    """Wall seconds of each stage run (by run name), from MLflow's own start and end times."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    seconds: dict[str, float] = {}
    for run in mlflow.search_runs(search_all_experiments=True, output_format="list"):
        if run.data.tags.get("realign.stage") in (None, "pipeline") or not run.info.end_time:
            continue
        name = run.data.tags.get("mlflow.runName", run.info.run_id)
        seconds[name] = seconds.get(name, 0.0) + (run.info.end_time - run.info.start_time) / 1000
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="default", help="conf/experiments/<name>.yaml or a path to one")
    parser.add_argument("--workdir", help="where the tracking store goes (default: a fresh temp dir)")
    args = parser.parse_args()
    name = str(Path(args.name).resolve()) if args.name.endswith((".yaml", ".yml")) else args.name
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="realign-bench-pipeline-"))
    workdir.mkdir(parents=True, exist_ok=True)

    first = run_pipeline(name, workdir)
    runs_first = stage_run_count(workdir)
    for stage_name, seconds in sorted(stage_seconds(workdir).items(), key=lambda item: -item[1]):
        print(f"stage_s[{stage_name}]: {seconds:.1f}", flush=True)
    second = run_pipeline(name, workdir)
    runs_second = stage_run_count(workdir)
    print(f"first_run_s: {first:.1f}")
    print(f"second_run_s: {second:.1f}")
    print(f"second_over_first: {second / first:.3f}")
    print(f"stage_runs_first: {runs_first}")
    print(f"stage_runs_second_new: {runs_second - runs_first}")
    print(f"workdir: {workdir}")


if __name__ == "__main__":
    main()
