"""A stage is declared once (`Stage`); one runner (`run_stage`) owns the life of its run.

The runner: open the run (or take the one `mlflow run` opened) → resolve the config (recipe, model preset,
overrides; validated) → resolve and default every input (an empty `aligned_run` becomes the newest finished align
run; `sft_run: auto` trains one first when there is none) and write the ids actually used into the config → tag the
base model and log the resolved config → the stage's body (load, train or fuse, evaluate, log artifacts) → mark the
run complete → FINISHED, or FAILED with the one-line error (tracking.stage_run).

`resolved_config(stage, overrides, train=False)` is the same resolution without a run: what the pipeline compares
with finished runs to decide reuse, so a reused run is one made from the inputs that would be used now. A default
that would have to train a run raises `NeedsTraining`: nothing made from it can exist yet.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from realign import tracking
from realign.config import flatten, param_string, to_dict
from realign.errors import RealignError
from realign.registry import Registry


class NeedsTraining(Exception):
    """A defaulted input does not exist yet and would be trained first (raised when `train=False`)."""


@dataclass(frozen=True)
class Input:
    """A run the stage takes by id from a config field.

    `default(cfg, train)` gives the run id when the field holds one of `default_on` (e.g. "" or "auto"); values in
    `absent` mean no input (e.g. "" or "base" for the base model). The body resolves and downloads the run.
    """

    field: str
    role: str  # realign.source.<role>
    stages: tuple[str, ...]
    default: Callable[[Any, bool], str] | None = None
    default_on: tuple[str, ...] = ("",)
    absent: tuple[str, ...] = ()
    # The default may train the input first (a run of its own): then it is resolved before this stage's run opens,
    # so the input's run comes first and a failure there is that run's, not this one's.
    trains: bool = False


@dataclass(frozen=True)
class Stage:
    """One stage: its name, how its config is resolved, its inputs and its body (given the open run and the
    resolved config). `reusable`: the pipeline may reuse a finished run of the same resolved config."""

    name: str
    config: type  # the config dataclass: its fields (help, choices) make the CLI options
    resolve_config: Callable[[dict[str, Any]], Any]
    body: Callable[..., None]  # body(run, cfg), or body(run, cfg, prepared) for a stage with `prepare`
    inputs: tuple[Input, ...] = ()
    reusable: bool = True
    # Work done before the run opens (compare searches the runs it compares: nothing to compare opens no run).
    prepare: Callable[[Any], Any] | None = None
    run_name: str = ""  # a fixed run name; else the body names the run
    summary: str = ""
    # Short CLI options that set a nested key (e.g. evaluate's --judge sets eval.judge).
    shortcuts: dict[str, str] = field(default_factory=dict)


STAGES: Registry[Stage] = Registry("stage")


def register(stage: Stage) -> Stage:
    return STAGES.register(stage.name, stage)


def resolved_config(stage: Stage, overrides: dict[str, Any], train: bool = False) -> Any:
    """The stage's config from `overrides`, with every defaulted input replaced by the run id it resolves to.

    With `train=False` a default that would train a run first raises NeedsTraining.
    """
    return _fill_inputs(stage, stage.resolve_config(overrides), train, only_training=None)


def _fill_inputs(stage: Stage, cfg: Any, train: bool, only_training: bool | None) -> Any:
    """Replace defaulted input fields by run ids: all of them, or only those whose default may train
    (`only_training=True`) or only the others (False)."""
    for spec in stage.inputs:
        value = str(getattr(cfg, spec.field) or "")
        if value in spec.absent or spec.default is None or value not in spec.default_on:
            continue
        if only_training is not None and spec.trains != only_training:
            continue
        setattr(cfg, spec.field, spec.default(cfg, train))
    return cfg


def stage_params(stage: Stage, overrides: dict[str, Any]) -> dict[str, str] | None:
    """The params a run of `stage` with these overrides logs, inputs resolved; None when it is never reused or
    when an input would be trained first (no finished run can have been made from it)."""
    if not stage.reusable:
        return None
    try:
        cfg = resolved_config(stage, overrides, train=False)
    except NeedsTraining:
        return None
    data = to_dict(cfg)
    if "experiment" in data:
        data["experiment"] = tracking.experiment_name(str(overrides.get("experiment") or ""))
    return {key: param_string(value) for key, value in flatten(data).items()}


def run_stage(stage: Stage, overrides: dict[str, Any], new_run: bool = False) -> str:
    """Run `stage` with `overrides` as one MLflow run (see the module docstring); returns its id.

    `new_run=True` for an input a stage trains first: a run of its own even under `mlflow run`.
    """
    experiment = str(overrides.get("experiment") or "")
    trained = _inputs_trained_first(stage, overrides)
    prepared = None
    if stage.prepare is not None:  # resolved and prepared before the run opens: a failure there opens none
        prepared = stage.prepare(resolved_config(stage, {**overrides, **trained}, train=True))
    with tracking.stage_run(stage.name, experiment=experiment, new_run=new_run,
                            run_name=stage.run_name or None) as run:
        cfg = resolved_config(stage, {**overrides, **trained}, train=True)
        model = getattr(cfg, "model", None)
        if model is not None:
            run.set_tags({tracking.TAG_BASE_MODEL: model.name})
        run.log_config(cfg)
        if stage.prepare is None:
            stage.body(run, cfg)
        else:
            stage.body(run, cfg, prepared)
        run.mark_complete()
        return run.run_id


def _inputs_trained_first(stage: Stage, overrides: dict[str, Any]) -> dict[str, str]:
    """The ids of the inputs whose default trains them, resolved (and trained) before the stage's run opens.

    A config that does not resolve is left to the stage's run, which reports it and is marked FAILED.
    """
    if not any(spec.trains for spec in stage.inputs):
        return {}
    try:
        cfg = stage.resolve_config(overrides)
    except RealignError:
        return {}
    before = {spec.field: getattr(cfg, spec.field) for spec in stage.inputs if spec.trains}
    _fill_inputs(stage, cfg, train=True, only_training=True)
    return {name: getattr(cfg, name) for name, value in before.items() if getattr(cfg, name) != value}


# ---------------------------------------------------------------------------------------------------------------
# Defaults shared by the stages
# ---------------------------------------------------------------------------------------------------------------


def newest_or_fail(stage: str, method_of: Callable[[Any], str | None], fix: Callable[[Any], str]):
    """A default: the newest finished run of `stage` (and method) of the base model, else one line saying how
    to make one (and, when the `realign` experiment has one, where it is)."""
    def default(cfg, train: bool) -> str:
        method = method_of(cfg)
        run_id = tracking.latest_run(stage, cfg.model.name, method, experiment=cfg.experiment, note_elsewhere=False)
        if run_id is None:
            what = f"{stage}/{method}" if method else stage
            hint = tracking.elsewhere_hint(stage, cfg.model.name, method, cfg.experiment)
            raise RealignError(f"no finished {what} run of {cfg.model.name} in experiment "
                               f"{tracking.experiment_name(cfg.experiment)}",
                               fix(cfg) + (f"; {hint.split('; ', 1)[1]}" if hint else ""))
        return run_id

    return default


def newest_or_train(stage: str, method_of: Callable[[Any], str | None], train_one: Callable[[Any], str]):
    """A default: the newest finished run of `stage` (and method) of the base model, else `train_one(cfg)` (a run
    of its own), or NeedsTraining when training is not allowed."""
    def default(cfg, train: bool) -> str:
        run_id = tracking.latest_run(stage, cfg.model.name, method_of(cfg), experiment=cfg.experiment,
                                     note_elsewhere=train)
        if run_id is not None:
            return run_id
        if not train:
            raise NeedsTraining(stage)
        return train_one(cfg)

    return default


def inherited_overrides(cfg) -> dict[str, Any]:
    """What an input trained on the way takes from the stage that needs it: the model preset and the seed (its
    budget comes from its own recipe)."""
    from dataclasses import asdict

    return {"model": cfg.model.name, **{f"model.{k}": v for k, v in asdict(cfg.model).items() if k != "name"},
            "experiment": cfg.experiment, "seed": cfg.seed}
