"""`pipeline`: an experiment file (conf/experiments/<name>.yaml) expanded into stage runs under one parent run.

An experiment file names its steps in order; each step is one stage with its parameters::

    experiment: realign              # MLflow experiment of every run
    model: smollm2-135m              # passed to every step (a step may override it)
    steps:
      sft:    {stage: align, method: sft}
      dpo:    {stage: align, method: dpo, sft_run: "${sft}"}
      attack: {stage: attack, source_run: "${dpo}", grid: {ratio: [0.0, 0.1]}}

- ``${step}`` is the run id of an earlier step. ``grid`` expands a step into one cell per combination of its
  lists, each value passed to the stage (``grid: {ratio: [0.0, 0.1]}`` sets ``ratio``). ``each`` expands the same
  way but passes nothing: its keys only name the cell, for ``${key}`` inside values (``recipe: "nlsr-${m}"``) and
  for matching. A reference to an expanded step picks the cell that agrees with the referring cell on their
  shared keys (``attack`` with ``each: {m: [dpo, kto]}`` uses the ``align`` cell of the same ``m``); a selector
  picks one explicitly: ``${attack[task=sst2,ratio=0.1]}``.
- **Reuse**: before a cell runs, its stage config is resolved exactly as the stage would resolve it; a FINISHED,
  complete run of the same stage, made by the same code (`realign.code_version`) and with the same params
  (which hold every input run id) is reused instead of rerun. RUNNING, FAILED and KILLED runs never are.
  ``compare`` always runs: its inputs are the experiment's runs, which the pipeline itself has just changed.
- **Search steps** (``stage: search``) run a study of conf/search (``name``), with ``n_trials`` the study's size:
  the step runs only the trials the study lacks, so a pipeline called again adds none and reuses the search's
  parent run. Its other keys are the search file's overrides, ``<search step>.<option>`` (``repair.finetuned_run:
  "${attack}"``); its run id is the search's parent run, nested under the pipeline's.
- New stage runs are nested under the parent run (`pipeline/<name>`), whose `pipeline/steps.json` table lists
  every cell with its run id and whether it was reused.
"""

from __future__ import annotations

import itertools
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from realign import tracking
from realign.config import conf_dir, read_yaml
from realign.errors import RealignError
from realign.stages import base, stage_table

STEP_KEYS = ("stage", "grid", "each", "resources")  # the other keys of a step are the stage's own overrides
EXECUTORS = ("local", "ray")
RESOURCE_KEYS = ("num_cpus", "num_gpus", "memory")  # what a Ray task can ask for (memory in bytes)
SEARCH = "search"  # a step kind that is a study, not a stage: realign.stages.search
_REFERENCE = re.compile(r"\$\{([A-Za-z_][\w-]*)(?:\[([^\]]*)\])?\}")


@dataclass
class Cell:
    """One stage run to make (or reuse): a step, at one point of its grid."""

    step: str
    stage: str
    grid_values: dict[str, Any]
    overrides: dict[str, Any]  # with ${...} still unresolved
    run_id: str = ""
    reused: bool = False
    needs: list[int] = field(default_factory=list)  # indices of the cells it refers to (all earlier ones: compare)
    resources: dict[str, float] = field(default_factory=dict)  # a Ray task's num_cpus, num_gpus, memory
    status: str = "pending"  # pending | finished | reused | failed | skipped
    error: str = ""

    @property
    def label(self) -> str:
        point = ",".join(f"{k}={v}" for k, v in self.grid_values.items())
        return f"{self.step}[{point}]" if point else self.step


@dataclass
class Experiment:
    name: str
    path: Path
    experiment: str
    requested: str = ""  # --experiment on the command line
    file_experiment: str = ""  # the file's own `experiment:`
    executor: str = "local"  # the file's `executor:` (local: one cell after another; ray: a graph on a cluster)
    cells: list[Cell] = field(default_factory=list)


def pipeline_experiment(spec: Experiment) -> str:
    """Where the pipeline's runs go: --experiment, else $MLFLOW_EXPERIMENT_NAME, else the file's, else realign.

    Under `mlflow run`, the experiment it chose; the file's own yields to it, with a note.
    """
    if spec.requested or tracking.project_run_id() or os.environ.get("MLFLOW_EXPERIMENT_NAME"):
        name = tracking.experiment_name(spec.requested)
    else:
        name = spec.file_experiment or tracking.DEFAULT_EXPERIMENT
    if spec.file_experiment and spec.file_experiment != name:
        tracking.note(f"note: {spec.path.name} names experiment {spec.file_experiment!r}; its runs go to {name!r}")
    return name


def experiment_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise RealignError(f"experiment file {path} does not exist", "pass a path to a YAML file, or a name in "
                               f"{conf_dir() / 'experiments'}")
        return path
    path = conf_dir() / "experiments" / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in (conf_dir() / "experiments").glob("*.yaml")))
        raise RealignError(f"unknown experiment {name_or_path!r}", f"use one of: {known}, or a path to a YAML file")
    return path


def load_experiment(name_or_path: str, overrides: dict[str, Any] | None = None) -> Experiment:
    """Read and expand an experiment file; every reference is checked here, before anything runs."""
    path = experiment_path(name_or_path)
    spec = read_yaml(path)
    unknown = sorted(set(spec) - {"experiment", "model", "steps", "executor"})
    if unknown:
        raise RealignError(f"{path}: unknown key {unknown[0]!r}", "use experiment, model, executor and steps")
    executor = str(spec.get("executor") or "local")
    if executor not in EXECUTORS:
        raise RealignError(f"{path}: unknown executor {executor!r}", f"use one of: {', '.join(EXECUTORS)}")
    steps = spec.get("steps")
    if not isinstance(steps, dict) or not steps:
        raise RealignError(f"{path}: no steps", "list the stages under steps: <name>: {stage: ..., ...}")
    overrides = dict(overrides or {})
    requested = str(overrides.pop("experiment", None) or "")
    file_experiment = str(spec.get("experiment") or "")
    experiment = requested or file_experiment or tracking.DEFAULT_EXPERIMENT
    model = overrides.pop("model", None) or spec.get("model")

    # `--attack.ratio 0.2` or `attack.train.max_steps=5`: an override names the step it is for.
    step_overrides: dict[str, dict[str, Any]] = {name: {} for name in steps}
    for key, value in overrides.items():
        step, _, rest = str(key).partition(".")
        if step not in steps or not rest:
            raise RealignError(f"override {key!r} names no step of {path.name}",
                               f"prefix it with a step name: {', '.join(steps)} (e.g. {next(iter(steps))}.seed=1)")
        step_overrides[step][rest] = value

    result = Experiment(name=path.stem, path=path, experiment=experiment, requested=requested,
                        file_experiment=file_experiment, executor=executor)
    seen: dict[str, list[Cell]] = {}
    for step_name, step in steps.items():
        if not isinstance(step, dict) or step.get("stage") not in (*stage_table(), SEARCH):
            raise RealignError(f"{path}: step {step_name!r} has no known stage",
                               f"give it stage: one of {', '.join(stage_table())} or {SEARCH}")
        grid = step.get("grid") or {}
        each = step.get("each") or {}
        for key, table in (("grid", grid), ("each", each)):
            if not isinstance(table, dict) or any(not isinstance(v, list) or not v for v in table.values()):
                raise RealignError(f"{path}: step {step_name!r} has a {key} that is not lists of values",
                                   f"write {key}: {{ratio: [0.0, 0.1], size: [100]}}")
        if set(grid) & set(each):
            raise RealignError(f"{path}: step {step_name!r} names {sorted(set(grid) & set(each))[0]!r} in both "
                               "grid and each", "keep each key in one of them")
        params = {k: v for k, v in step.items() if k not in STEP_KEYS}
        resources = _resources(path, step_name, step.get("resources"))
        base = {"experiment": experiment, **({"model": model} if model else {})}
        if step["stage"] == "compare":
            base.pop("model", None)
        cells = []
        axes = {**each, **grid}  # each first: cells of one alignment method stay together
        for values in itertools.product(*axes.values()):
            grid_values = dict(zip(axes, values))
            passed = {k: v for k, v in grid_values.items() if k in grid}
            cell = Cell(step_name, step["stage"], grid_values,
                        {**base, **params, **passed, **step_overrides[step_name]}, resources=resources)
            needed = [picked for value in cell.overrides.values() for picked in _check_references(path, cell, value,
                                                                                                     seen)]
            if cell.stage == "compare":  # compare reads every run of the experiment: it waits for all of them
                cell.needs = list(range(len(result.cells)))
            else:
                cell.needs = sorted({next(i for i, c in enumerate(result.cells) if c is picked) for picked in needed})
            cells.append(cell)
        seen[step_name] = cells
        result.cells.extend(cells)
    return result


def _resources(path: Path, step: str, resources: Any) -> dict[str, float]:
    if resources is None:
        return {}
    if not isinstance(resources, dict) or any(k not in RESOURCE_KEYS for k in resources) or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 for v in resources.values()):
        raise RealignError(f"{path}: step {step!r} has resources {resources!r}",
                           f"write resources: {{num_cpus: 4, num_gpus: 1}} (keys: {', '.join(RESOURCE_KEYS)}, "
                           "numbers >= 0)")
    return {k: float(v) for k, v in resources.items()}


def _check_references(path: Path, cell: Cell, value: Any, seen: dict[str, list[Cell]]) -> list[Cell]:
    """The earlier cells `value` refers to; a reference that picks no cell, or more than one, fails here."""
    picked = []
    for match in _REFERENCE.finditer(str(value)):
        name = match.group(1)
        if name in cell.grid_values and not match.group(2):
            continue
        if name not in seen:
            raise RealignError(f"{path}: step {cell.step!r} refers to ${{{name}}}, which is no earlier step "
                               "and no grid key of its own", "refer to a step listed above it")
        picked.append(_pick(path, cell, name, match.group(2), seen[name]))
    return picked


def _pick(path: Path, cell: Cell, name: str, selector: str | None, candidates: list[Cell]) -> Cell:
    wanted: dict[str, str] = {}
    for part in filter(None, (selector or "").split(",")):
        key, _, value = part.partition("=")
        wanted[key.strip()] = value.strip()
    matches = []
    for other in candidates:
        shared = {k: v for k, v in other.grid_values.items() if k in cell.grid_values}
        if any(not _same(cell.grid_values[k], v) for k, v in shared.items()):
            continue
        if any(k not in other.grid_values or not _same(other.grid_values[k], v) for k, v in wanted.items()):
            continue
        matches.append(other)
    if len(matches) != 1:
        raise RealignError(f"{path}: ${{{name}{'[' + selector + ']' if selector else ''}}} in step {cell.step!r} "
                           f"matches {len(matches)} runs of the gridded step {name!r}, not one",
                           f"select one cell, e.g. ${{{name}[key=value]}}")
    return matches[0]


def _same(a: Any, b: Any) -> bool:
    """Grid values compare as numbers when both are numbers (ratio=0.1 selects 0.10), else as text."""
    try:
        return float(a) == float(b)
    except (TypeError, ValueError):
        return str(a) == str(b)


def _resolve_value(value: Any, cell: Cell, done: dict[str, list[Cell]], path: Path) -> Any:
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        name, selector = match.group(1), match.group(2)
        if name in cell.grid_values and not selector:
            return str(cell.grid_values[name])
        return _pick(path, cell, name, selector, done[name]).run_id

    return _REFERENCE.sub(substitute, value)


def stage_params(stage: str, overrides: dict[str, Any]) -> dict[str, str] | None:
    """The params a run of `stage` with these overrides logs, every defaulted input resolved as the stage resolves
    it; None when such a run is never reused (compare) or an input would be trained first."""
    return base.stage_params(stage_table().get(stage), overrides)


def reusable_run(stage: str, resolved: dict[str, Any], experiment: str) -> str | None:
    """A finished run of `stage` with exactly these resolved params (the pipeline's reuse rule), or None."""
    params = stage_params(stage, resolved)
    return tracking.find_reusable_run(stage, params, experiment) if params else None


def run_or_reuse(stage: str, resolved: dict[str, Any], experiment: str) -> tuple[str, bool]:
    """(run id, reused): a finished run of `stage` with exactly these resolved params, else a new run of it."""
    reusable = reusable_run(stage, resolved, experiment)
    if reusable:
        return reusable, True
    return base.run_stage(stage_table().get(stage), resolved), False


def run_cell(stage: str, resolved: dict[str, Any], experiment: str) -> tuple[str, bool]:
    """(run id, reused) of one cell: a search step's study filled, or a stage run made or reused."""
    if stage == SEARCH:
        from realign.stages.search import search

        return search(resolved, fill=True)
    return run_or_reuse(stage, resolved, experiment)


def resolve_cell(spec: Experiment, index: int) -> dict[str, Any]:
    """A cell's overrides with every ${...} replaced by the run ids of the cells it refers to (all finished)."""
    cell = spec.cells[index]
    done: dict[str, list[Cell]] = {}
    for earlier in spec.cells[:index]:
        done.setdefault(earlier.step, []).append(earlier)
    resolved = {k: _resolve_value(v, cell, done, spec.path) for k, v in cell.overrides.items()}
    resolved["experiment"] = spec.experiment
    return resolved


def check_cells(spec: Experiment) -> None:
    """Resolve every cell's stage config before anything runs, with stand-in ids for runs not made yet.

    A bad value in the last cell of a grid fails in seconds instead of after the hours the cells before it take.
    """
    done: dict[str, list[Cell]] = {}
    for index, cell in enumerate(spec.cells):
        standin = Cell(cell.step, cell.stage, cell.grid_values, cell.overrides, run_id=f"{index + 1:032x}")
        resolved = {k: _resolve_value(v, cell, done, spec.path) for k, v in cell.overrides.items()}
        try:  # the config only: its defaulted inputs may be runs an earlier cell has not made yet
            if cell.stage == SEARCH:
                from realign.stages.search import checked_search

                checked_search(resolved)
            else:
                stage_table().get(cell.stage).resolve_config(resolved)
        except RealignError as err:
            raise RealignError(f"{spec.path.name}, step {cell.label}: {err.problem}", err.fix) from None
        done.setdefault(cell.step, []).append(standin)


def plan_pipeline(overrides: dict[str, Any]) -> str:
    """What `realign pipeline --dry-run` prints: the experiment file, then one line per cell (step, grid point,
    stage), every cell's config checked as the run would check it; no store is opened."""
    overrides = dict(overrides)
    for key in ("executor", "address"):
        overrides.pop(key, None)
    spec = load_experiment(str(overrides.pop("name", None) or "default"), overrides)
    check_cells(spec)
    lines = [f"{spec.path} ({len(spec.cells)} cells)"]
    lines += [f"  {index:>3}. {cell.label} ({cell.stage})" for index, cell in enumerate(spec.cells, start=1)]
    return "\n".join(lines)


def run_pipeline(overrides: dict[str, Any]) -> str:
    """Run (or reuse) every cell of an experiment file; returns the parent run's id.

    `executor=local` (default): one cell after another in this process, the first failure stops the pipeline.
    `executor=ray` (`address` of a cluster, else a local one): realign.executors submits each cell as a Ray task as
    soon as the cells it refers to have finished.
    """
    overrides = dict(overrides)
    name = str(overrides.pop("name", None) or "default")
    executor = str(overrides.pop("executor", None) or "")
    address = str(overrides.pop("address", None) or "")
    spec = load_experiment(name, overrides)
    executor = executor or spec.executor
    if executor not in EXECUTORS:
        raise RealignError(f"unknown executor {executor!r}", f"use one of: {', '.join(EXECUTORS)}")
    if executor == "ray":
        from realign.executors import check_ray

        check_ray(tracking.tracking_uri())
    elif address:
        raise RealignError("--address is a Ray cluster's address, and the executor is local",
                           "add --executor ray, or drop --address")
    tags = {tracking.TAG_STAGE: "pipeline", tracking.TAG_PIPELINE: str(spec.path.name)}
    tracking.open_store()
    spec.experiment = pipeline_experiment(spec)
    with tracking.parent_run(f"pipeline/{spec.name}", spec.experiment, tags) as parent_id:
        check_cells(spec)  # a bad value in any cell fails the parent run before the first stage starts
        started = time.monotonic()
        if executor == "ray":
            from realign.executors import run_on_ray

            run_on_ray(spec, parent_id, address)
        else:
            run_serially(spec)
        tracking.log_parent_table(parent_id, {
            "step": [c.step for c in spec.cells], "stage": [c.stage for c in spec.cells],
            "grid": [",".join(f"{k}={v}" for k, v in c.grid_values.items()) for c in spec.cells],
            "run_id": [c.run_id for c in spec.cells], "reused": [c.reused for c in spec.cells],
            "status": [c.status for c in spec.cells], "error": [c.error for c in spec.cells],
        }, "pipeline/steps.json")
        failed = [c for c in spec.cells if c.status == "failed"]
        if failed:
            skipped = sum(c.status == "skipped" for c in spec.cells)
            raise RealignError(f"pipeline {spec.name}: {len(failed)} cells failed ({failed[0].label}: "
                               f"{failed[0].error}), {skipped} skipped", "fix the failed cells and run the pipeline "
                               "again: the finished cells are reused")
        reused = sum(c.reused for c in spec.cells)
        _progress(f"pipeline {spec.name}: {len(spec.cells)} steps, {reused} reused, "
                  f"{time.monotonic() - started:.0f} s")
        return parent_id


def run_serially(spec: Experiment) -> None:
    """Today's pipeline: every cell in file order, in this process; the first failure raises."""
    started = time.monotonic()
    total = len(spec.cells)
    for index, cell in enumerate(spec.cells):
        resolved = resolve_cell(spec, index)
        _progress(f"[{index + 1}/{total}] {cell.label} ({cell.stage}) ...")
        cell.run_id, cell.reused = run_cell(cell.stage, resolved, spec.experiment)
        cell.status = "reused" if cell.reused else "finished"
        report_cell(cell, index, total, started)


def report_cell(cell: Cell, index: int, total: int, started: float) -> None:
    if cell.reused:
        _progress(f"[{index + 1}/{total}] {cell.label}: reused run {cell.run_id}")
    else:
        _progress(f"[{index + 1}/{total}] {cell.label}: run {cell.run_id} "
                  f"({time.monotonic() - started:.0f} s so far)")


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
