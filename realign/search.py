"""`realign search`: a multi-objective Optuna study over a declared space, every trial a chain of stage runs.

A search file (conf/search/<name>.yaml) names:

    study: restore-smollm2                # the Optuna study (and the parent run search/<study>)
    experiment: realign                   # where the runs go (default as the pipeline's)
    model: smollm2-135m
    steps:                                # run in order for every trial; ${step} = that trial's run of step
      region: {stage: score, model_run: "newest:expo", method: wanda}
      repair: {stage: fuse, finetuned_run: "newest:attack", reference_run: "newest:expo", mask_run: "${region}"}
    space:                                # <step>.<option>: its range or choices
      region.sparsity: {type: log-float, low: 0.001, high: 0.05}
      repair.selection: {type: categorical, choices: [all, adaptive]}
      repair.prune_rate: {type: float, low: 0.2, high: 0.8, when: {repair.selection: [adaptive]}}
    objectives: [{metric: harmful_score, direction: minimize}, {metric: finetune_accuracy, direction: maximize}]
    sampler: nsga2                        # nsga2 (default) | tpe | random
    seed: 0
    kept_scores_gb: 2                     # SNIP/Wanda scores kept in memory across trials (0: recompute each trial)

`newest:<stage>[/<method>]` is the newest finished run of that stage (and method) of the model in the experiment.
Parameter types: float, log-float, int, categorical; `when` samples a parameter only where the named, earlier
parameters took one of the listed values (Optuna's define-by-run conditional spaces).

Trials that score the same model with the same calibration settings and differ only in what they select (the
sparsity) share the SNIP or Wanda scores: the first computes them, the others select from them in memory (their
score runs carry `realign.scores_from`). A model whose scores exceed `kept_scores_gb` is scored in every trial.

Honest selection: every trial is evaluated on the `search` half of the held-out prompts (`eval.prompt_split`);
the Pareto-optimal trials are then evaluated again on the `report` half, logged on the trial's last run as
`report_<metric>` (and on the parent's `search/pareto.json`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from realign.config import conf_dir, read_yaml
from realign.errors import RealignError

PARAM_TYPES = ("float", "log-float", "int", "categorical")
SAMPLERS = ("nsga2", "tpe", "random")
DIRECTIONS = ("minimize", "maximize")
SPEC_KEYS = ("study", "experiment", "model", "steps", "space", "objectives", "sampler", "seed", "kept_scores_gb")
STEP_REFERENCE = re.compile(r"\$\{([A-Za-z_][\w-]*)\}")
_NEWEST = re.compile(r"^newest:([a-z]+)(?:/([\w-]+))?$")


@dataclass(frozen=True)
class Param:
    """One searched option: `step.key` (key may be dotted: eval.judge), its type and range or choices."""

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    choices: tuple = ()
    when: dict[str, tuple] = field(default_factory=dict)

    @property
    def step(self) -> str:
        return self.name.split(".", 1)[0]

    @property
    def key(self) -> str:
        return self.name.split(".", 1)[1]

    def suggest(self, trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high))
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.kind == "log-float")

    def applies(self, values: dict[str, Any]) -> bool:
        return all(name in values and values[name] in allowed for name, allowed in self.when.items())


@dataclass
class SearchSpec:
    study: str
    path: Path
    experiment: str
    model: str
    steps: dict[str, dict[str, Any]]
    space: list[Param]
    objectives: list[tuple[str, str]]  # (metric, direction)
    sampler: str = "nsga2"
    seed: int = 0
    kept_scores_gb: float = 2.0


def search_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise RealignError(f"search file {path} does not exist", "pass a YAML file or a name in conf/search")
        return path
    path = conf_dir() / "search" / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in (conf_dir() / "search").glob("*.yaml"))) or "none"
        raise RealignError(f"unknown search {name_or_path!r}", f"use one of: {known}, or a path to a YAML file")
    return path


def load_search(name_or_path: str, overrides: dict[str, Any] | None = None) -> SearchSpec:
    """Read and check a search file; every problem is one line here, before any trial runs."""
    from realign.stages import stage_table

    path = search_path(name_or_path)
    raw = read_yaml(path)
    where = path.name
    unknown = sorted(set(raw) - set(SPEC_KEYS))
    if unknown:
        raise RealignError(f"{where}: unknown key {unknown[0]!r}", f"use {', '.join(SPEC_KEYS)}")
    steps = raw.get("steps")
    if not isinstance(steps, dict) or not steps:
        raise RealignError(f"{where}: no steps", "name the stages a trial runs under steps: <name>: {stage: ...}")
    overrides = dict(overrides or {})
    for step_name, step in steps.items():
        if not isinstance(step, dict) or step.get("stage") not in stage_table() or step["stage"] in ("pipeline",
                                                                                                    "compare"):
            raise RealignError(f"{where}: step {step_name!r} names no stage a trial can run",
                               "use stage: score, fuse, expo, attack or align")
        for value in step.values():
            for ref in STEP_REFERENCE.findall(str(value)):
                if ref not in steps or list(steps).index(ref) >= list(steps).index(step_name):
                    raise RealignError(f"{where}: step {step_name!r} refers to ${{{ref}}}, not an earlier step",
                                       f"use one of the steps before it: {', '.join(list(steps)[:list(steps).index(step_name)]) or 'none'}")
    for key, value in list(overrides.items()):
        step, _, rest = str(key).partition(".")
        if key in ("experiment", "model", "seed", "sampler", "kept_scores_gb"):
            continue
        if step not in steps or not rest:
            raise RealignError(f"override {key!r} names no step of {where}", f"prefix it with one of: {', '.join(steps)}")
        steps[step] = {**steps[step], rest: value}
        del overrides[key]
    space = [_param(where, name, spec, steps) for name, spec in (raw.get("space") or {}).items()]
    if not space:
        raise RealignError(f"{where}: the space is empty", "name at least one <step>.<option> under space:")
    names = [p.name for p in space]
    for param in space:
        for other in param.when:
            if other not in names[:names.index(param.name)]:
                raise RealignError(f"{where}: {param.name} is sampled when {other!r}, not a parameter listed before it",
                                   "list the parameter it depends on first")
    objectives = []
    for item in raw.get("objectives") or [{"metric": "harmful_score", "direction": "minimize"},
                                          {"metric": "finetune_accuracy", "direction": "maximize"}]:
        if not isinstance(item, dict) or item.get("direction") not in DIRECTIONS or not item.get("metric"):
            raise RealignError(f"{where}: objective {item!r} needs a metric and a direction",
                               "write {metric: harmful_score, direction: minimize}")
        objectives.append((str(item["metric"]), str(item["direction"])))
    sampler = str(overrides.get("sampler") or raw.get("sampler") or "nsga2")
    if sampler not in SAMPLERS:
        raise RealignError(f"{where}: unknown sampler {sampler!r}", f"use one of: {', '.join(SAMPLERS)}")
    kept_scores_gb = overrides.get("kept_scores_gb", raw.get("kept_scores_gb", 2.0))
    if not isinstance(kept_scores_gb, (int, float)) or isinstance(kept_scores_gb, bool) or kept_scores_gb < 0:
        raise RealignError(f"{where}: kept_scores_gb={kept_scores_gb!r} is not a number >= 0",
                           "write the memory for scores kept across trials in GB, e.g. 2 (0: none kept)")
    return SearchSpec(study=str(raw.get("study") or path.stem), path=path,
                      experiment=str(overrides.get("experiment") or raw.get("experiment") or ""),
                      model=str(overrides.get("model") or raw.get("model") or ""), steps=steps, space=space,
                      objectives=objectives, sampler=sampler, seed=int(overrides.get("seed", raw.get("seed", 0))),
                      kept_scores_gb=float(kept_scores_gb))


def _param(where: str, name: str, spec: Any, steps: dict[str, dict]) -> Param:
    from realign.config import field_type
    from realign.stages import stage_table

    step, _, key = str(name).partition(".")
    if step not in steps or not key:
        raise RealignError(f"{where}: parameter {name!r} names no step", f"write <step>.<option>, a step of: {', '.join(steps)}")
    config = stage_table().get(steps[step]["stage"]).config
    if field_type(config, key) is None:
        raise RealignError(f"{where}: {steps[step]['stage']} has no option {key!r} (parameter {name})",
                           f"see `realign {steps[step]['stage']} --help`")
    if not isinstance(spec, dict) or spec.get("type") not in PARAM_TYPES:
        raise RealignError(f"{where}: parameter {name} needs a type", f"use type: {' | '.join(PARAM_TYPES)}")
    when = {str(k): tuple(v if isinstance(v, list) else [v]) for k, v in (spec.get("when") or {}).items()}
    if spec["type"] == "categorical":
        choices = tuple(spec.get("choices") or ())
        if not choices:
            raise RealignError(f"{where}: parameter {name} has no choices", "list them: choices: [a, b]")
        return Param(name, "categorical", choices=choices, when=when)
    try:
        low, high = float(spec["low"]), float(spec["high"])
    except (KeyError, TypeError, ValueError):
        raise RealignError(f"{where}: parameter {name} needs numbers low and high", "write low: 0.1, high: 0.9") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise RealignError(f"{where}: parameter {name} has an empty range [{low:g}, {high:g}]", "pass low < high")
    if spec["type"] == "log-float" and low <= 0:
        raise RealignError(f"{where}: log-float parameter {name} needs low > 0, got {low:g}", "pass low > 0")
    return Param(name, spec["type"], low=low, high=high, when=when)


def resolve_newest(value: Any, model: str, experiment: str) -> Any:
    """`newest:<stage>[/<method>]` → the newest finished run's id; anything else unchanged."""
    from realign import tracking

    match = _NEWEST.match(value) if isinstance(value, str) else None
    if not match:
        return value
    stage, method = match.group(1), match.group(2)
    run_id = tracking.latest_run(stage, model, method, experiment=experiment, note_elsewhere=False)
    if run_id is None:
        raise RealignError(f"{value}: no finished {stage}{'/' + method if method else ''} run of {model} in "
                           f"experiment {tracking.experiment_name(experiment)}",
                           "run the pipeline first (realign pipeline), or pass the run id")
    return run_id
