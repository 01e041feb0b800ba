"""`realign <stage>`: one thin subcommand per stage.

Named options cover what people type most; any other config key is an override, `--train.learning_rate 1e-4`
or `train.learning_rate=1e-4` (that is also how `mlflow run -P key=value` reaches us for undeclared keys).
"""

from __future__ import annotations

import logging
import os
import sys

import click

from realign.errors import RealignError

EXTRA_ARGS = dict(ignore_unknown_options=True, allow_extra_args=True)


def _process_defaults() -> None:
    # The default path needs no hub; a stray lookup would otherwise retry for ~50 s before failing.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
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


def _run(fn, overrides: dict[str, object]) -> None:
    try:
        run_id = fn(overrides)
    except RealignError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    click.echo(f"run {run_id}")


@click.group()
@click.version_option(package_name="realign")
def main() -> None:
    """realign: align, attack, evaluate, amplify, localize and fuse LLMs, one MLflow run per stage."""
    _process_defaults()


@main.command(context_settings=EXTRA_ARGS)
@click.option("--method", help="sft | dpo | orpo | kto | simpo (default dpo)")
@click.option("--recipe", help="conf/align/<recipe>.yaml (default: the method's name; nlsr-<method> for GPUs)")
@click.option("--model", help="conf/model/<preset>.yaml: smollm2-135m (default), tiny, llama3-8b, llama2-7b")
@click.option("--sft-run", "--sft_run", "sft_run", help="run id or runs:/ URI of an align/sft run to start from")
@click.option("--experiment", help="MLflow experiment name (default realign)")
@click.pass_context
def align(ctx: click.Context, method, recipe, model, sft_run, experiment) -> None:
    """Train a safety-alignment LoRA adapter with TRL (SFT, DPO, ORPO, KTO, SimPO)."""
    from realign.stages.align import run_align

    named = dict(method=method, recipe=recipe, model=model, sft_run=sft_run, experiment=experiment)
    try:
        overrides = _overrides(named, ctx.args)
    except RealignError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(2)
    _run(run_align, overrides)


if __name__ == "__main__":
    main()
