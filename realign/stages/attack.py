"""`attack` stage: harmful fine-tuning of an aligned model, then its damage measured in the same run.

The fine-tuning data is a downstream task mixed with harmful data: ⌊p·n⌋ unsafe BeaverTails-schema answers plus
n − ⌊p·n⌋ task examples, shuffled with the seed, in the Alpaca prompt format (p = `ratio`, n = `size`; p = 0 is the
clean setting). The aligned weights (base + the source run's adapter chain, merged and saved) are loaded fresh
from disk and a new LoRA is trained on them with TRL's SFTTrainer, loss on the responses only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from realign import data, distributed, models, tracking
from realign.config import resolve_stage_config
from realign.stage_configs import AttackConfig
from realign.errors import RealignError
from realign.stages.base import Input, Stage, inherited_overrides, newest_or_train, register, run_stage
from realign.stages.common import plan_checkpoints, train_lora, trainer_arguments
from realign.data.tasks import check_task
from realign.stages.evaluate import evaluate_and_log

SOURCE_STAGES = ("align", "expo")


def resolve_attack_config(overrides: dict[str, Any]) -> AttackConfig:
    cfg = resolve_stage_config(AttackConfig, "attack", overrides.get("recipe") or "default", overrides)
    check_task(cfg.task)
    from realign.stages.align import get_align_method

    get_align_method(cfg.method)
    return cfg


def attack_run_name(cfg: AttackConfig, source_method: str) -> str:
    return f"attack/{source_method}/{cfg.task}/p{cfg.ratio:g}/n{cfg.size}"


def _train_source(cfg: AttackConfig) -> str:
    """The aligned run an attack starts from, trained first (with its SFT run) when there is none."""
    from realign.stages.align import run_align

    return run_align({**inherited_overrides(cfg), "method": cfg.method, "sft_run": "auto"}, new_run=True)


def attack_body(run: tracking.StageRun, cfg: AttackConfig) -> None:
    """Fine-tune an aligned model on task + harmful data, evaluate it, log the attacked adapter."""
    run.set_tags({tracking.TAG_TASK: cfg.task})
    # The mixture first: a ratio or size it cannot satisfy fails before any model is loaded.
    train_set, counts = data.mix_attack_dataset(cfg.task, cfg.size, cfg.ratio, cfg.seed,
                                                harmful_source=cfg.data.harmful_source,
                                                task_source=cfg.data.task_source)
    source = run.resolve_input(cfg.source_run, "aligned", SOURCE_STAGES, cfg.model.name,
                               artifact=None if cfg.adapter == "continue" else "adapter")
    if cfg.adapter == "continue":
        check_continuable(cfg, source, run)
    run.set_name(attack_run_name(cfg, source.method))
    # A continued adapter sits where its source's did; a new one on top of the source's whole chain.
    adapter_base = source.adapter_base if cfg.adapter == "continue" else [*source.adapter_base, source.run_id]
    run.set_tags({tracking.TAG_METHOD: source.method, tracking.TAG_ADAPTER_BASE: ",".join(adapter_base),
                  **({tracking.TAG_ADAPTER_INIT: source.run_id} if cfg.adapter == "continue" else {})})
    run.log_params({"mix.harmful": counts["harmful"], "mix.task": counts["task"], "mix.total": counts["total"]})
    run.log_dataset(train_set, name=f"attack-{cfg.task}-p{cfg.ratio:g}-n{cfg.size}", context="training")

    source_chain = run.adapter_chain(source)
    start_chain = source_chain[:-1] if cfg.adapter == "continue" else source_chain
    # One merged copy, written by the main process; the others of an accelerate launch read it.
    start_dir = distributed.agree(lambda: models.materialize_merged(cfg.model, start_chain,
                                                                    run.workdir / "aligned"))
    init = source_chain[-1] if cfg.adapter == "continue" else None
    adapter_dir = train_attack_adapter(cfg, start_dir, train_set, run, init_adapter=init)

    if cfg.eval.enabled and run.is_main:  # under accelerate launch, one process evaluates
        evaluate_and_log(run, cfg.model, [*start_chain, str(adapter_dir)], cfg.eval,
                         task=cfg.eval.task or cfg.task)
    run.log_adapter(adapter_dir)


ATTACK = register(Stage(
    "attack", AttackConfig, resolve_attack_config, attack_body,
    inputs=(Input("source_run", "aligned", SOURCE_STAGES,
                  default=newest_or_train("align", lambda cfg: cfg.method, _train_source), trains=True),),
    summary="Harmful fine-tuning: a task mixed with harmful data, then harmful score and fine-tune accuracy.",
))


def run_attack(overrides: dict[str, Any]) -> str:
    """Fine-tune an aligned model on task + harmful data; returns the attack run's id."""
    return run_stage(ATTACK, overrides)


def check_continuable(cfg: AttackConfig, source: tracking.InputRun, run: tracking.StageRun) -> None:
    """`adapter: continue` needs a source whose output is a plain LoRA adapter with the LoRA config asked for."""
    import json

    if source.tags.get(tracking.TAG_OUTPUT) == "model":
        raise RealignError(f"attack.adapter=continue needs a LoRA adapter, but {source.stage} run {source.run_id} "
                           "logged merged full weights (model/)",
                           "attack it with adapter=new, or continue an align run (or an expo run in lora mode)")
    source.local_dir = tracking.download_artifact(source.run_id, "adapter", run.workdir / "input-aligned", "aligned")
    config = json.loads((Path(source.local_dir) / "adapter_config.json").read_text())
    if config.get("peft_type", "LORA") != "LORA" or config.get("use_dora"):
        raise RealignError(f"attack.adapter=continue needs a plain LoRA adapter; run {source.run_id} holds "
                           f"{'DoRA' if config.get('use_dora') else config.get('peft_type')}",
                           "attack it with adapter=new")
    theirs = (int(config.get("r", 0)), int(config.get("lora_alpha", 0)), sorted(_targets(config)))
    mine = (cfg.lora.r, cfg.lora.alpha, sorted(cfg.lora.target_modules))
    if theirs != mine:
        raise RealignError(f"attack.adapter=continue keeps run {source.run_id}'s LoRA (r={theirs[0]}, "
                           f"alpha={theirs[1]}, targets {','.join(theirs[2])}), but this config asks for r={mine[0]}, "
                           f"alpha={mine[1]}, targets {','.join(mine[2])}",
                           f"drop the lora overrides or pass --lora.r {theirs[0]} --lora.alpha {theirs[1]} "
                           f"--lora.target_modules {','.join(theirs[2])}")


def _targets(config: dict) -> list[str]:
    targets = config.get("target_modules") or []
    return [targets] if isinstance(targets, str) else list(targets)


def train_attack_adapter(cfg: AttackConfig, start_dir: str, train_set, run: tracking.StageRun,
                         init_adapter: str | None = None):
    """SFT on the mixture, loss on the responses only: a fresh LoRA on the aligned weights, or (`init_adapter`)
    the source's own adapter trained further on the weights it was trained on."""
    from trl import SFTConfig, SFTTrainer

    checkpoints = plan_checkpoints(run, cfg)
    args = SFTConfig(**trainer_arguments(cfg.train, cfg.seed, checkpoints.folder), completion_only_loss=True)
    return train_lora(run, start_dir, cfg.model, cfg.lora, SFTTrainer, args, train_set, cfg.seed, what="attack",
                      checkpoints=checkpoints, init_adapter=init_adapter)
