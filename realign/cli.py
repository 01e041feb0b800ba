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
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
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


def _run_with_overrides(fn, named: dict[str, object], extra: list[str]) -> None:
    """Run a stage; a RealignError becomes one line on stderr and exit status 2."""
    try:
        run_id = fn(_overrides(named, extra))
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
    _run_with_overrides(run_align, named, ctx.args)


@main.command(context_settings=EXTRA_ARGS)
@click.option("--ratio", help="p: share of harmful examples in the fine-tuning data, in [0, 1] (default 0.1)")
@click.option("--size", help="n: number of fine-tuning examples (default 100)")
@click.option("--task", help="sst2 | ag_news | gsm8k | alpaca (default sst2)")
@click.option("--source-run", "--source_run", "source_run",
              help="align/expo run to attack (default: newest finished align/<method> run, trained if none)")
@click.option("--method", help="alignment method of the default source run (default dpo)")
@click.option("--seed", help="data mixing and training seed (default 0)")
@click.option("--model", help="conf/model/<preset>.yaml (default smollm2-135m)")
@click.option("--recipe", help="conf/attack/<recipe>.yaml (default; nlsr for GPUs)")
@click.option("--experiment", help="MLflow experiment name (default realign)")
@click.pass_context
def attack(ctx: click.Context, **named) -> None:
    """Harmful fine-tuning: a task mixed with harmful data, then harmful score and fine-tune accuracy."""
    from realign.stages.attack import run_attack

    _run_with_overrides(run_attack, named, ctx.args)


@main.command(context_settings=EXTRA_ARGS)
@click.option("--run", "run", help="run whose adapter to evaluate (align, attack, expo, fuse); omit for the base model")
@click.option("--judge", help="classifier (default) | keyword | beaver-dam | llama-guard")
@click.option("--judge-path", "--judge_path", "judge_path", help="local dir or hub id of a model judge")
@click.option("--task", help="task for finetune_accuracy (default: the evaluated run's task)")
@click.option("--model", help="conf/model/<preset>.yaml (default smollm2-135m)")
@click.option("--experiment", help="MLflow experiment name (default realign)")
@click.pass_context
def evaluate(ctx: click.Context, **named) -> None:
    """Harmful score (judged), refusal rate and fine-tune accuracy of a run's model, or of the base."""
    from realign.stages.evaluate import run_evaluate

    # Short options for the keys people set most; they live under eval.* in the config.
    for key in ("judge", "judge_path", "task"):
        named[f"eval.{key}"] = named.pop(key)
    _run_with_overrides(run_evaluate, named, ctx.args)


@main.command(context_settings=EXTRA_ARGS)
@click.option("--aligned-run", "--aligned_run", "aligned_run",
              help="align run to extrapolate (default: newest finished align/<method> run)")
@click.option("--sft-run", "--sft_run", "sft_run",
              help="align/sft run to extrapolate from (default: the one the aligned run was trained on)")
@click.option("--alpha", help="α >= 0, or a list 0.1,0.3,0.5,0.9 for a sweep of child runs (default 0.9)")
@click.option("--method", help="alignment method of the default aligned run (default dpo)")
@click.option("--seed", help="torch seed before evaluation (default 0)")
@click.option("--model", help="conf/model/<preset>.yaml (default smollm2-135m)")
@click.option("--recipe", help="conf/expo/<recipe>.yaml (default)")
@click.option("--experiment", help="MLflow experiment name (default realign)")
@click.pass_context
def expo(ctx: click.Context, **named) -> None:
    """Model extrapolation θ = θ_aligned + α(θ_aligned − θ_sft), evaluated in the same run."""
    from realign.stages.expo import run_expo

    _run_with_overrides(run_expo, named, ctx.args)


if __name__ == "__main__":
    main()
