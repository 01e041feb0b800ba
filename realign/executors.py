"""Pipeline cells as Ray tasks: `realign pipeline --executor ray [--address ADDR]`.

The driver (the process that holds the `pipeline/<name>` parent run) walks the experiment's cells as a graph: a
cell is submitted as soon as every cell it refers to has finished, with the resources its step asks for
(`resources: {num_cpus: 4, num_gpus: 1}`; one CPU otherwise). The reuse rule is checked by the driver first, so a
reused cell costs no task. Workers log to the same tracking server (the driver passes MLFLOW_TRACKING_URI and the
REALIGN_* settings in the task's environment) and nest their runs under the driver's parent run.

A failed cell (an error in its stage, or its worker killed) marks every cell that depends on it as skipped, one line
each naming the failed cell; the independent cells finish, and then the parent run fails. A killed worker's run
is marked FAILED at once (its process is gone), so the next call reruns that cell and reuses the others.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from realign import tracking
from realign.errors import RealignError

FILE_STORES = ("sqlite:", "file:")


def check_ray(uri: str) -> None:
    """One line, before anything runs, where Ray cannot run this pipeline: no Ray, or a store only this machine's
    processes can open (a SQLite file, an mlruns folder)."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise RealignError("--executor ray needs Ray, which is not installed",
                           "pip install 'realign[ray]' (or use --executor local)") from None
    if uri.startswith(FILE_STORES) or "://" not in uri:
        raise RealignError(f"--executor ray needs a tracking server, and the store is {uri}",
                           "start one (bash scripts/server.sh) and set MLFLOW_TRACKING_URI=http://127.0.0.1:5000")


def worker_environment() -> dict[str, str]:
    """The settings a worker needs to log where the driver does and to read what it reads."""
    names = [n for n in os.environ if n.startswith(("REALIGN_", "MLFLOW_", "HF_"))]
    return {n: os.environ[n] for n in names} | {"MLFLOW_TRACKING_URI": tracking.tracking_uri()}


def run_cell_task(stage: str, resolved: dict[str, Any], experiment: str, parent_id: str) -> tuple[str, bool, str]:
    """In a Ray worker: (run id, reused, error line) of one cell; an error is returned as its one line, so the
    driver reports it as the stage would."""
    from realign.stages.pipeline import run_cell

    tracking.open_store()
    try:
        with tracking.nested_under(parent_id):
            run_id, reused = run_cell(stage, resolved, experiment)
        return run_id, reused, ""
    except RealignError as err:
        return "", False, err.problem
    except Exception as err:  # the stage's run is FAILED with its traceback; the driver needs one line
        return "", False, f"{type(err).__name__}: {err}".splitlines()[0]


def run_on_ray(spec, parent_id: str, address: str = "") -> None:
    """Run every cell of `spec` (a realign.stages.pipeline.Experiment) on Ray, setting each cell's run id and status."""
    import ray

    from realign.stages.pipeline import SEARCH, reusable_run, resolve_cell, report_cell, _progress

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # offline clusters: no usage report
    if not ray.is_initialized():
        if address:
            ray.init(address=address)
        else:  # a cluster of this machine only, reachable on loopback
            ray.init(include_dashboard=False, _node_ip_address="127.0.0.1")
    task = ray.remote(max_retries=0)(run_cell_task)
    env = {"env_vars": worker_environment()}
    cells, total, started = spec.cells, len(spec.cells), time.monotonic()
    running: dict[Any, int] = {}
    experiment_id = tracking.client().get_run(parent_id).info.experiment_id

    def settle(index: int) -> None:
        """Skip the pending cells that need a failed or skipped one, transitively."""
        for later, cell in enumerate(cells):
            if cell.status == "pending" and index in cell.needs:
                cell.status = "skipped"
                cell.error = f"it needs {cells[index].label} ({cells[index].status})"
                _progress(f"[{later + 1}/{total}] {cell.label}: skipped, {cell.error}")
                settle(later)

    def fail(index: int, error: str) -> None:
        cells[index].status, cells[index].error = "failed", error
        print(f"[{index + 1}/{total}] {cells[index].label}: failed: {error}", file=sys.stderr, flush=True)
        settle(index)

    while True:
        for index, cell in enumerate(cells):
            if cell.status != "pending" or index in running.values():
                continue
            if any(cells[n].status not in ("finished", "reused") for n in cell.needs):
                continue
            resolved = resolve_cell(spec, index)
            try:
                reused = reusable_run(cell.stage, resolved, spec.experiment) if cell.stage != SEARCH else None
            except RealignError as err:  # an input run that does not exist, of the wrong stage, ...
                fail(index, err.problem)
                continue
            if reused:
                cell.run_id, cell.reused, cell.status = reused, True, "reused"
                report_cell(cell, index, total, started)
                continue
            options = {"num_cpus": cell.resources.get("num_cpus", 1), "num_gpus": cell.resources.get("num_gpus", 0),
                       "runtime_env": env}
            if "memory" in cell.resources:
                options["memory"] = cell.resources["memory"]
            running[task.options(**options).remote(cell.stage, resolved, spec.experiment, parent_id)] = index
            _progress(f"[{index + 1}/{total}] {cell.label} ({cell.stage}) submitted ...")
        if not running:
            break
        ready, _ = ray.wait(list(running), num_returns=1)
        index = running.pop(ready[0])
        cell = cells[index]
        try:
            cell.run_id, cell.reused, cell.error = ray.get(ready[0])
        except (ray.exceptions.RayError, OSError) as err:  # the worker died (killed, out of memory)
            cell.error = f"its Ray worker died ({type(err).__name__})"
            tracking.mark_dead_runs(experiment_id)  # its run is RUNNING with a dead process: FAILED now
        if cell.error:
            fail(index, cell.error)
        else:
            cell.status = "reused" if cell.reused else "finished"
            report_cell(cell, index, total, started)
