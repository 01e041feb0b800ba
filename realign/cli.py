"""`realign <stage>`: one thin subcommand per stage.

Named options cover what people type most; any other config key is an override, `--train.learning_rate 1e-4`
or `train.learning_rate=1e-4` (that is also how `mlflow run -P key=value` reaches us for undeclared keys).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import warnings

import click

from realign.errors import RealignError

EXTRA_ARGS = dict(ignore_unknown_options=True, allow_extra_args=True)


def _process_defaults() -> None:
    # The default path needs no hub; a stray lookup would otherwise retry for ~50 s before failing.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # A deprecation inside transformers that PEFT/torch attribute scans trigger: noise around the one line a bad
    # input gets, and nothing the user can act on.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*deprecated", category=FutureWarning)
    # MLflow's store chatter (table creation, new experiment) would bury the one line a bad input gets.
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _overrides(named: dict[str, object], extra: list[str]) -> dict[str, object]:
    from realign.config import parse_overrides

    overrides: dict[str, object] = parse_overrides(extra)
    for key, value in named.items():
        if value not in (None, ""):
            overrides[key] = value
    return overrides


def _checked(fn):
    """`fn()`; a RealignError, or a store failure, becomes one line on stderr and exit status 2."""
    from realign import tracking

    try:
        return fn()
    except RealignError as err:
        _fail(err)
    except Exception as err:
        if not tracking.is_store_failure(err) or os.environ.get("REALIGN_TRACEBACK"):
            raise
        _fail(tracking.store_error(err))


def _run_with_overrides(fn, named: dict[str, object], extra: list[str]) -> str:
    """Run a stage (one line and exit status 2 if it fails); print where its run is, and its id last."""
    from realign import tracking
    from realign.tracking import ui

    run_id = _checked(lambda: fn(_overrides(named, extra)))
    with contextlib.suppress(Exception):  # the run is done; a UI hint that cannot be made is no failure
        tracking.note(ui.runs_line(run_id))
    click.echo(f"run {run_id}")
    return run_id


REGISTER_HELP = ("also register the run's model in the MLflow Model Registry as a new version of this name "
                 "(as `realign register` does)")


def _check_model_name(name: str) -> None:
    from realign import tracking

    tracking.check_model_name(name)


def _register(run_id: str, name: str) -> None:
    from realign import tracking
    from realign.stages.register import register_run

    registered, version = _checked(lambda: register_run(run_id, name))
    tracking.note(f"registered models:/{registered}/{version} (load it with mlflow.pyfunc.load_model, serve it with "
                  f"mlflow models serve -m models:/{registered}/{version} --env-manager local)")


def _dry_run(resolve, named: dict[str, object], extra: list[str]) -> None:
    """--dry-run: resolve and check the config as the run would, print it, start nothing (no store is opened)."""
    try:
        click.echo(resolve(_overrides(named, extra)).rstrip())
    except RealignError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)


DRY_RUN_HELP = "resolve and check every option (recipe, model preset, values) and print the config; start no run"


def _fail(err: RealignError) -> None:
    """One line and exit status 2; under `mlflow run`, its run FAILED with that line (if no stage had ended it)."""
    from realign import tracking

    tracking.fail_project_run(err)
    click.echo(f"error: {err}", err=True)
    sys.exit(2)


class StageGroup(click.Group):
    """The `realign` command: its hand-written commands (pipeline) and one command per stage of the stage table,
    read when asked, so a stage registered anywhere is a command."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        from realign.stages import stage_table

        return sorted({*super().list_commands(ctx), *stage_table()})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        from realign.stages import stage_table

        if name in stage_table():
            return stage_command(stage_table().get(name))
        return super().get_command(ctx, name)


@click.group(cls=StageGroup)
@click.version_option(package_name="realign")
def main() -> None:
    """realign: align, attack, evaluate, amplify, localize and fuse LLMs, one MLflow run per stage."""
    _process_defaults()


MODEL_HELP = "conf/model/<preset>.yaml: smollm2-135m (default), tiny, llama3-8b, llama2-7b"


def stage_command(stage) -> click.Command:
    """The subcommand of a stage: one option per documented field of its config (help and choices from the field),
    its shortcuts to nested keys, and any other key as an override (`--train.learning_rate 1e-4`)."""
    params: list[click.Parameter] = []
    keys: dict[str, str] = {}  # option destination -> config key
    for spec in dataclasses.fields(stage.config):
        if spec.name == "model":
            params.append(click.Option(["--model"], help=MODEL_HELP))
            keys["model"] = "model"
        elif "help" in spec.metadata:
            params.append(click.Option([*_option_names(spec.name), spec.name], help=spec.metadata["help"]))
            keys[spec.name] = spec.name
    for short, key in stage.shortcuts.items():
        params.append(click.Option([*_option_names(short), short], help=_nested_help(stage.config, key)))
        keys[short] = key

    params.append(click.Option(["--dry-run"], is_flag=True, help=DRY_RUN_HELP))
    from realign.tracking.models import REGISTERED_STAGES

    if stage.name in REGISTERED_STAGES:
        params.append(click.Option(["--register"], help=REGISTER_HELP))

    def callback(dry_run: bool, register: str | None = None, **named):
        from realign.stages.base import run_stage

        context = click.get_current_context()
        given = {keys[name]: value for name, value in named.items()}
        if dry_run:
            _dry_run(lambda overrides: _config_yaml(stage.resolve_config(overrides)), given, context.args)
            return
        if register:  # a bad name is one line before the stage runs, not after ("" = do not register)
            _checked(lambda: _check_model_name(register))
        run_id = _run_with_overrides(lambda overrides: run_stage(stage, overrides), given, context.args)
        if register:
            _register(run_id, register)

    return click.Command(stage.name, params=params, callback=callback, help=stage.summary,
                         context_settings=EXTRA_ARGS)


def _config_yaml(cfg) -> str:
    import yaml

    from realign.config import to_dict

    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)


def _option_names(name: str) -> list[str]:
    dashed = f"--{name.replace('_', '-')}"
    return [dashed, f"--{name}"] if "_" in name else [dashed]


def _nested_help(config: type, key: str) -> str:
    """The help of a nested field (eval.judge -> EvalSettings.judge)."""
    import typing

    outer, _, inner = key.partition(".")
    nested = typing.get_type_hints(config)[outer]
    return next(spec.metadata.get("help", "") for spec in dataclasses.fields(nested) if spec.name == inner)


@main.command(context_settings=EXTRA_ARGS)
@click.option("--name", help="conf/experiments/<name>.yaml or a path to an experiment file (default: default)")
@click.option("--model", help="conf/model/<preset>.yaml for every step (default: the experiment file's)")
@click.option("--experiment", help="MLflow experiment of every run (default: $MLFLOW_EXPERIMENT_NAME, else the "
                                   "experiment file's, else realign; under `mlflow run`, the one it chose)")
@click.option("--executor", type=click.Choice(["local", "ray"]),
              help="local: one cell after another in this process (default); ray: each cell a Ray task as soon as "
                   "the cells it refers to finished (needs a tracking server; pip install 'realign[ray]')")
@click.option("--address", help="--executor ray: the Ray cluster's address (default: start one on this machine)")
@click.option("--dry-run", is_flag=True, help="resolve and check every step's config and list the runs it "
                                             "would make or reuse; start no run")
@click.pass_context
def pipeline(ctx: click.Context, dry_run: bool, **named) -> None:
    """The whole chain of an experiment file, reusing every stage run that already ran with the same config."""
    from realign.stages.pipeline import plan_pipeline, run_pipeline

    if dry_run:
        _dry_run(plan_pipeline, named, ctx.args)
        return
    _run_with_overrides(run_pipeline, named, ctx.args)


@main.command(context_settings=EXTRA_ARGS)
@click.option("--name", help="conf/search/<name>.yaml or a path to a search file (default: restore-smollm2)")
@click.option("--n-trials", "n_trials", help="trials to run now (default 12); the study keeps the ones before")
@click.option("--timeout", help="stop starting trials after this many seconds")
@click.option("--storage", help="Optuna storage URL (default: beside a sqlite tracking store, else ./realign-search.db)")
@click.option("--sampler", help="nsga2 (default) | tpe | random")
@click.option("--model", help="conf/model/<preset>.yaml for every step (default: the search file's)")
@click.option("--experiment", help="MLflow experiment of every run (default as the pipeline's)")
@click.option("--dry-run", is_flag=True, help="read and check the search file and every step's config; run nothing")
@click.pass_context
def search(ctx: click.Context, dry_run: bool, **named) -> None:
    """A multi-objective study over a declared space; every trial a chain of stage runs (realign/search.py)."""
    from realign.stages.search import plan_search, run_search

    if dry_run:
        _dry_run(plan_search, named, ctx.args)
        return
    _run_with_overrides(run_search, named, ctx.args)


@main.command()
@click.option("--run", "run_ref", required=True, help="the align, expo or fuse run (id, runs:/ URI)")
@click.option("--name", required=True, help="registered model name; a new version is added if it exists")
@click.option("--dry-run", is_flag=True, help="check the name and the run reference and say what would be "
                                             "registered; open no store")
def register(run_ref: str, name: str, dry_run: bool) -> None:
    """Register a run's model in the MLflow Model Registry (transformers flavor, with the tokenizer)."""
    if dry_run:
        from realign import tracking

        def plan() -> str:
            tracking.check_model_name(name)
            if not run_ref.strip().startswith("models:/"):  # a registered version needs the store to resolve
                tracking.parse_run_ref(run_ref, "registered")
            return f"would register the model of run {run_ref} as a new version of {name}"

        _dry_run(lambda _: plan(), {}, [])
        return
    _register(run_ref, name)


if __name__ == "__main__":
    main()
