"""`align` stage: safety alignment of a base model with a LoRA adapter, through TRL's trainers.

Preference methods may start from an align/sft run: its adapter is merged into the base and the merged weights
are saved and loaded fresh from disk before the new adapter is trained (a LoRA trained on a model merged
in-process by another trainer changed nothing at inference here). The run records that chain in the
`realign.adapter_base` tag, so later stages rebuild the same starting weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from realign import data, distributed, models, tracking
from realign.config import resolve_stage_config
from realign.stage_configs import AlignConfig
from realign.registry import Registry
from realign.stages.base import Input, Stage, inherited_overrides, newest_or_train, register, run_stage
from realign.stages.common import plan_checkpoints, train_lora, trainer_arguments
from realign.stages.evaluate import evaluate_and_log


@dataclass(frozen=True)
class AlignMethod:
    """One alignment loss: which dataset format it trains on and how to build its TRL trainer."""

    name: str
    data_format: str  # "prompt_completion" | "preference" | "unpaired" (see realign.data.alignment_dataset)
    build: Callable[[AlignConfig, dict[str, Any]], tuple[type, Any]]  # -> (trainer class, trainer config)
    uses: tuple[str, ...] = ()  # method knobs read from cfg.train, recorded for the reader


def _sft(cfg: AlignConfig, common: dict[str, Any]):
    from trl import SFTConfig, SFTTrainer

    # Loss on the response tokens only: the prompt is the user's request, not something to imitate.
    return SFTTrainer, SFTConfig(**common, completion_only_loss=True)


def _dpo(cfg: AlignConfig, common: dict[str, Any]):
    from trl import DPOConfig, DPOTrainer

    return DPOTrainer, DPOConfig(**common, beta=cfg.train.beta)


def _orpo(cfg: AlignConfig, common: dict[str, Any]):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    return ORPOTrainer, ORPOConfig(**common, beta=cfg.train.beta)


def _kto(cfg: AlignConfig, common: dict[str, Any]):
    from trl import KTOConfig, KTOTrainer

    return KTOTrainer, KTOConfig(**common, beta=cfg.train.beta)


def _simpo(cfg: AlignConfig, common: dict[str, Any]):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    # SimPO is CPO's loss_type="simpo" without the behaviour-cloning term (cpo_alpha=0).
    return CPOTrainer, CPOConfig(**common, loss_type="simpo", cpo_alpha=0.0, beta=cfg.train.beta,
                                 simpo_gamma=cfg.train.simpo_gamma)


ALIGN_METHODS: Registry[AlignMethod] = Registry("align method")
for _method in (
    AlignMethod("sft", "prompt_completion", _sft),
    AlignMethod("dpo", "preference", _dpo, uses=("beta",)),
    AlignMethod("orpo", "preference", _orpo, uses=("beta",)),
    AlignMethod("kto", "unpaired", _kto, uses=("beta",)),
    AlignMethod("simpo", "preference", _simpo, uses=("beta", "simpo_gamma")),
):
    ALIGN_METHODS.register(_method.name, _method)


def get_align_method(name: str) -> AlignMethod:
    return ALIGN_METHODS.get(name)


def resolve_align_config(overrides: dict[str, Any]) -> AlignConfig:
    method = overrides.get("method") or "dpo"
    if method not in ALIGN_METHODS and not overrides.get("recipe"):
        get_align_method(method)  # raises the one-line error before a preset lookup can confuse it
    recipe = overrides.get("recipe") or method
    cfg = resolve_stage_config(AlignConfig, "align", recipe, overrides)
    get_align_method(cfg.method)
    return cfg


def _train_sft(cfg: AlignConfig) -> str:
    """The SFT run a preference method starts from, trained first when there is none (its budget comes from
    conf/align/sft.yaml; the model and seed from the caller)."""
    return run_align({**inherited_overrides(cfg), "method": "sft", "recipe": "sft"}, new_run=True)


def align_body(run: tracking.StageRun, cfg: AlignConfig) -> None:
    """Train one alignment adapter (on the merged SFT model when sft_run names one), evaluate it, log it."""
    method = get_align_method(cfg.method)
    run.set_name(f"align/{cfg.method}")
    run.set_tags({tracking.TAG_METHOD: cfg.method})

    # Inputs first, so a bad run id fails in seconds, not after loading models.
    base_adapters: list[str] = []
    adapter_base_ids: list[str] = []
    if cfg.sft_run not in ("", "none"):
        sft = run.resolve_input(cfg.sft_run, "sft", ("align",), cfg.model.name, methods=("sft",))
        base_adapters = run.adapter_chain(sft)
        adapter_base_ids = [*sft.adapter_base, sft.run_id]
    run.set_tags({tracking.TAG_ADAPTER_BASE: ",".join(adapter_base_ids)})
    models.resolve_model_dir(cfg.model)  # a missing model path fails here, before data and training

    train_set = data.alignment_dataset(method.data_format, cfg.data.num_examples, cfg.data.seed,
                                       benign_fraction=cfg.data.benign_fraction, source=cfg.data.source)
    run.log_dataset(train_set, name=f"align-{method.data_format}-{cfg.data.source}", context="training",
                    hub_path=None if cfg.data.source == "builtin" else cfg.data.source)

    # One merged copy, written by the main process; the others of an accelerate launch read it (one machine,
    # or a workdir on a shared filesystem).
    start_dir = distributed.agree(
        lambda: models.materialize_merged(cfg.model, base_adapters, run.workdir / "start"))
    adapter_dir = train_adapter(cfg, method, start_dir, train_set, run)

    if cfg.eval.enabled and run.is_main:  # under accelerate launch, one process evaluates
        evaluate_and_log(run, cfg.model, [*base_adapters, str(adapter_dir)], cfg.eval)
    run.log_adapter(adapter_dir)


ALIGN = register(Stage(
    "align", AlignConfig, resolve_align_config, align_body,
    inputs=(Input("sft_run", "sft", ("align",), default=newest_or_train("align", lambda cfg: "sft", _train_sft),
                  default_on=("auto",), absent=("", "none"), trains=True),),
    summary="Train a safety-alignment LoRA adapter with TRL (SFT, DPO, ORPO, KTO, SimPO).",
))


def run_align(overrides: dict[str, Any], new_run: bool = False) -> str:
    """Train one alignment adapter; returns the run id."""
    return run_stage(ALIGN, overrides, new_run=new_run)


def train_adapter(cfg: AlignConfig, method: AlignMethod, start_dir: str, train_set, run: tracking.StageRun):
    """Fit a fresh LoRA on the weights in `start_dir` with the method's TRL trainer; returns the adapter dir."""
    checkpoints = plan_checkpoints(run, cfg)
    common = trainer_arguments(cfg.train, cfg.seed, checkpoints.folder)
    trainer_cls, trainer_config = method.build(cfg, common)
    return train_lora(run, start_dir, cfg.model, cfg.lora, trainer_cls, trainer_config, train_set, cfg.seed,
                      what=cfg.method, checkpoints=checkpoints)
