"""`realign <stage>`: one thin subcommand per stage.

Named options cover what people type most; any other config key is an override, `--train.learning_rate 1e-4`
or `train.learning_rate=1e-4` (that is also how `mlflow run -P key=value` reaches us for undeclared keys).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

import click

from realign.errors import RealignError

EXTRA_ARGS = dict(ignore_unknown_options=True, allow_extra_args=True)
EXPERIMENT_HELP = ("MLflow experiment of the run and of its default inputs (default: $MLFLOW_EXPERIMENT_NAME, "
                   "else realign; under `mlflow run`, the one it chose with --experiment-name)")


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


def _run_with_overrides(fn, named: dict[str, object], extra: list[str]) -> None:
    """Run a stage; a RealignError, or a store failure, becomes one line on stderr and exit status 2."""
    from realign import tracking

    try:
        run_id = fn(_overrides(named, extra))
    except RealignError as err:
        _fail(err)
    except Exception as err:
        if not tracking.is_store_failure(err) or os.environ.get("REALIGN_TRACEBACK"):
            raise
        _fail(tracking.store_error(err))
    click.echo(f"run {run_id}")


def _fail(err: RealignError) -> None:
    """One line and exit status 2; under `mlflow run`, its run FAILED with that line (if no stage had ended it)."""
    from realign import tracking

    tracking.fail_project_run(err)
    click.echo(f"error: {err}", err=True)
    sys.exit(2)


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
@click.option("--experiment", help=EXPERIMENT_HELP)
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
@click.option("--adapter", help="new (a fresh LoRA on the source's merged weights, default) | continue (keep "
                                "training the source's own LoRA adapter, as NLSR does)")
@click.option("--model", help="conf/model/<preset>.yaml (default smollm2-135m)")
@click.option("--recipe", help="conf/attack/<recipe>.yaml (default; nlsr for GPUs)")
@click.option("--experiment", help=EXPERIMENT_HELP)
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
@click.option("--experiment", help=EXPERIMENT_HELP)
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
@click.option("--form", help="paper (θ_sft + (1 + α)·ΔW, default) | seed (NLSR's code: every LoRA tensor × 2α, "
                             "ΔW × 4α²)")
@click.option("--model", help="conf/model/<preset>.yaml (default smollm2-135m)")
@click.option("--recipe", help="conf/expo/<recipe>.yaml (default)")
@click.option("--experiment", help=EXPERIMENT_HELP)
@click.pass_context
def expo(ctx: click.Context, **named) -> None:
    """Model extrapolation θ = θ_aligned + α(θ_aligned − θ_sft), evaluated in the same run."""
    from realign.stages.expo import run_expo

    _run_with_overrides(run_expo, named, ctx.args)


@main.command(context_settings=EXTRA_ARGS)
@click.option("--method", help="snip | wanda (default) | set_difference | actsvd | lora_actsvd")
@click.option("--model-run", "--model_run", "model_run",
              help="align or expo run whose weights are scored (default: the base model)")
@click.option("--target", help="weights (the merged model, default) | lora (the run's own LoRA A/B matrices)")
@click.option("--sparsity", help="fraction of each weight matrix selected, in (0, 1) (snip, wanda, lora_actsvd)")
@click.option("--top-q", "--top_q", "top_q", help="set_difference: top-q of the safety score, in (0, 1)")
@click.option("--top-p", "--top_p", "top_p", help="set_difference: minus the top-p of the utility score, in (0, 1)")
@click.option("--rank", help="actsvd: safety ranks r_s per matrix (--utility_rank r_u projects them off utility)")
@click.option("--nsamples", help="calibration examples per data set")
@click.option("--seed", help="calibration sampling and the sanity check's random selection (default 0)")
@click.option("--model", help="conf/model/<preset>.yaml (default smollm2-135m)")
@click.option("--recipe", help="conf/score/<recipe>.yaml (default; nlsr for GPUs)")
@click.option("--experiment", help=EXPERIMENT_HELP)
@click.pass_context
def score(ctx: click.Context, **named) -> None:
    """Safety-critical weights (SNIP, Wanda, set difference, ActSVD, NLSR's LoRA ActSVD) as masks, sanity-checked."""
    from realign.stages.score import run_score

    _run_with_overrides(run_score, named, ctx.args)


@main.command(context_settings=EXTRA_ARGS)
@click.option("--name", help="conf/experiments/<name>.yaml or a path to an experiment file (default: default)")
@click.option("--model", help="conf/model/<preset>.yaml for every step (default: the experiment file's)")
@click.option("--experiment", help="MLflow experiment of every run (default: $MLFLOW_EXPERIMENT_NAME, else the "
                                   "experiment file's, else realign; under `mlflow run`, the one it chose)")
@click.pass_context
def pipeline(ctx: click.Context, **named) -> None:
    """The whole chain of an experiment file, reusing every stage run that already ran with the same config."""
    from realign.stages.pipeline import run_pipeline

    _run_with_overrides(run_pipeline, named, ctx.args)


@main.command(context_settings=EXTRA_ARGS)
@click.option("--experiment", help="MLflow experiment whose runs are compared and that holds the compare run "
                                   "(default: $MLFLOW_EXPERIMENT_NAME, else realign; under `mlflow run`, its own)")
@click.option("--filter", "filter", help="MLflow search filter on top of FINISHED and complete, "
                                         "e.g. \"tags.`realign.base_model` = 'smollm2-135m'\"")
@click.option("--out", help="local folder for dashboard.html and tables/*.csv|md (default: only the compare run)")
@click.pass_context
def compare(ctx: click.Context, **named) -> None:
    """The seed's tables (markdown on stdout, CSV) and plotly dashboards from an experiment's runs."""
    from realign.stages.compare import run_compare

    _run_with_overrides(run_compare, named, ctx.args)


@main.command(context_settings=EXTRA_ARGS)
@click.option("--finetuned-run", "--finetuned_run", "finetuned_run", help="attack run to repair (required)")
@click.option("--reference-run", "--reference_run", "reference_run",
              help="safety reference: an align or expo run (required)")
@click.option("--mask-run", "--mask_run", "mask_run", help="score run whose region restricts the fusion (optional)")
@click.option("--method", help="restore (default) | average | task_arithmetic | ties | consensus_ta | consensus_ties")
@click.option("--granularity", help="neurons | ranks (the score run's own kind, default) | heads")
@click.option("--weights", help="w of (finetuned, reference), e.g. 1,1")
@click.option("--scale", help="λ of task arithmetic / ties / consensus, in (0, 1] (default 1)")
@click.option("--density", help="ties: fraction of each task vector kept, in (0, 1] (default 0.2)")
@click.option("--tall-lambda", "--tall_lambda", "tall_lambda", help="consensus: TALL mask λ, in (0, 1] (default 0.4)")
@click.option("--consensus-k", "--consensus_k", "consensus_k", help="consensus: masks that must agree, 1 or 2")
@click.option("--selection", help="restore: which modules get the transplant: all (default) | adaptive (NLSR's "
                                  "adaptive_mask_replace draw) | threshold (NLSR's mask_replace: similarity < tau)")
@click.option("--prune-rate", "--prune_rate", "prune_rate", help="adaptive: mean replacement probability (0.5)")
@click.option("--epsilon", help="adaptive: probability spread ε around it (default 0.2)")
@click.option("--prefer", help="adaptive: similar (the authors' code: most similar modules most likely) | "
                               "dissimilar (the paper's text, default)")
@click.option("--tau", help="threshold: replace modules whose similarity is below it (default 0.1)")
@click.option("--seed", help="adaptive: seed of the draw (default 0)")
@click.option("--model", help="conf/model/<preset>.yaml (default smollm2-135m)")
@click.option("--recipe", help="conf/fuse/<recipe>.yaml (default)")
@click.option("--experiment", help=EXPERIMENT_HELP)
@click.pass_context
def fuse(ctx: click.Context, **named) -> None:
    """Fuse an attacked model with a safety reference (inside a score run's region), evaluated in the same run."""
    from realign.stages.fuse import run_fuse

    _run_with_overrides(run_fuse, named, ctx.args)


if __name__ == "__main__":
    main()
