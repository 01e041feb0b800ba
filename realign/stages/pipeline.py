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

STEP_KEYS = ("stage", "grid", "each")  # the other keys of a step are the stage's own overrides
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
    unknown = sorted(set(spec) - {"experiment", "model", "steps"})
    if unknown:
        raise RealignError(f"{path}: unknown key {unknown[0]!r}", "use experiment, model and steps")
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
                        file_experiment=file_experiment)
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
        base = {"experiment": experiment, **({"model": model} if model else {})}
        if step["stage"] == "compare":
            base.pop("model", None)
        cells = []
        axes = {**each, **grid}  # each first: cells of one alignment method stay together
        for values in itertools.product(*axes.values()):
            grid_values = dict(zip(axes, values))
            passed = {k: v for k, v in grid_values.items() if k in grid}
            cell = Cell(step_name, step["stage"], grid_values,
                        {**base, **params, **passed, **step_overrides[step_name]})
            for value in cell.overrides.values():
                _check_references(path, cell, value, seen)
            cells.append(cell)
        seen[step_name] = cells
        result.cells.extend(cells)
    return result


def _check_references(path: Path, cell: Cell, value: Any, seen: dict[str, list[Cell]]) -> None:
    for match in _REFERENCE.finditer(str(value)):
        name = match.group(1)
        if name in cell.grid_values and not match.group(2):
            continue
        if name not in seen:
            raise RealignError(f"{path}: step {cell.step!r} refers to ${{{name}}}, which is no earlier step "
                               "and no grid key of its own", "refer to a step listed above it")
        _pick(path, cell, name, match.group(2), seen[name])


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


def run_or_reuse(stage: str, resolved: dict[str, Any], experiment: str) -> tuple[str, bool]:
    """(run id, reused): a finished run of `stage` with exactly these resolved params, else a new run of it."""
    params = stage_params(stage, resolved)
    reusable = tracking.find_reusable_run(stage, params, experiment) if params else None
    if reusable:
        return reusable, True
    return base.run_stage(stage_table().get(stage), resolved), False


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
    spec = load_experiment(str(overrides.pop("name", None) or "default"), overrides)
    check_cells(spec)
    lines = [f"{spec.path} ({len(spec.cells)} cells)"]
    lines += [f"  {index:>3}. {cell.label} ({cell.stage})" for index, cell in enumerate(spec.cells, start=1)]
    return "\n".join(lines)


def run_pipeline(overrides: dict[str, Any]) -> str:
    """Run (or reuse) every cell of an experiment file in order; returns the parent run's id."""
    overrides = dict(overrides)
    name = str(overrides.pop("name", None) or "default")
    spec = load_experiment(name, overrides)
    tags = {tracking.TAG_STAGE: "pipeline", tracking.TAG_PIPELINE: str(spec.path.name)}
    tracking.open_store()
    spec.experiment = pipeline_experiment(spec)
    with tracking.parent_run(f"pipeline/{spec.name}", spec.experiment, tags) as parent_id:
        check_cells(spec)  # a bad value in any cell fails the parent run before the first stage starts
        done: dict[str, list[Cell]] = {}
        started = time.monotonic()
        total = len(spec.cells)
        for index, cell in enumerate(spec.cells, start=1):
            resolved = {k: _resolve_value(v, cell, done, spec.path) for k, v in cell.overrides.items()}
            resolved["experiment"] = spec.experiment
            _progress(f"[{index}/{total}] {cell.label} ({cell.stage}) ...")
            if cell.stage == SEARCH:
                from realign.stages.search import search

                cell.run_id, cell.reused = search(resolved, fill=True)
            else:
                cell.run_id, cell.reused = run_or_reuse(cell.stage, resolved, spec.experiment)
            if cell.reused:
                _progress(f"[{index}/{total}] {cell.label}: reused run {cell.run_id}")
            else:
                _progress(f"[{index}/{total}] {cell.label}: run {cell.run_id} "
                          f"({time.monotonic() - started:.0f} s so far, {total - index} to go)")
            done.setdefault(cell.step, []).append(cell)
        tracking.log_parent_table(parent_id, {
            "step": [c.step for c in spec.cells], "stage": [c.stage for c in spec.cells],
            "grid": [",".join(f"{k}={v}" for k, v in c.grid_values.items()) for c in spec.cells],
            "run_id": [c.run_id for c in spec.cells], "reused": [c.reused for c in spec.cells],
        }, "pipeline/steps.json")
        reused = sum(c.reused for c in spec.cells)
        _progress(f"pipeline {spec.name}: {total} steps, {reused} reused, {time.monotonic() - started:.0f} s")
        return parent_id


def _progress(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
