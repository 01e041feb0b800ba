"""`expo` stage: model extrapolation θ_expo = θ_aligned + α(θ_aligned − θ_sft) (EXPO, arXiv 2404.16792).

Inputs are two align runs by id: the aligned one (dpo, orpo, kto, simpo) and the SFT one. The math is in
`realign.ops.expo`; this module picks the exact form that fits how the aligned run was trained:

- ``lora``: the aligned adapter was trained on the merged SFT model (its `realign.adapter_base` is the SFT run's
  chain followed by the SFT run). Then θ_expo = θ_sft + (1 + α)·ΔW_aligned: the aligned adapter with lora_B × (1 + α),
  logged under `adapter/` with the same `realign.adapter_base`, so attack and evaluate use it like any align run.
- ``merged``: any other pair (e.g. both adapters trained on the base). θ_expo is computed on the merged weights of
  the two models, streamed tensor by tensor as task arithmetic (base θ_sft, λ = 1 + α; the fuse stage's streaming
  fusion, so no whole model is held in memory), and logged as a full transformers model under `model/`
  (config.json + model.safetensors + tokenizer); `realign.output` says which of the two a run holds.

`alpha` may be a list: one parent run (`expo/<method>/sweep`) with one child run per α, so the UI can plot
harmful score against α. Every input is checked before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from realign import models, tracking
from realign.config import resolve_stage_config
from realign.stage_configs import ExpoConfig
from realign.errors import RealignError
from realign.ops import expo as expo_ops
from realign.ops import streaming as streaming_ops
from realign.stages.align import ALIGN_METHODS, get_align_method
from realign.stages.base import Input, Stage, newest_or_fail, register, run_stage
from realign.stages.evaluate import evaluate_and_log

PREFERENCE_METHODS = tuple(name for name in ALIGN_METHODS if name != "sft")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def resolve_expo_config(overrides: dict[str, Any]) -> ExpoConfig:
    cfg = resolve_stage_config(ExpoConfig, "expo", overrides.get("recipe") or "default", overrides)
    get_align_method(cfg.method)
    return cfg


def expo_run_name(method: str, alpha: float) -> str:
    return f"expo/{method}/a{alpha:g}"


@dataclass
class ExpoInputs:
    """The two checked input runs and the local adapter dirs that rebuild each model from the base."""

    aligned: tracking.InputRun
    sft: tracking.InputRun
    aligned_chain: list[str]
    sft_chain: list[str]
    mode: str  # "lora" | "merged"
    aligned_state: dict = field(default_factory=dict)  # lora only: the aligned adapter's tensors
    aligned_dir: str = ""  # merged only: θ_aligned as safetensors files
    sft_dir: str = ""  # merged only: θ_sft as safetensors files

    @property
    def lineage_tags(self) -> dict[str, str]:
        return {f"{tracking.TAG_SOURCE}aligned": self.aligned.run_id, f"{tracking.TAG_SOURCE}sft": self.sft.run_id,
                tracking.TAG_METHOD: self.aligned.method}


def expo_body(run: tracking.StageRun, cfg: ExpoConfig) -> None:
    """Extrapolate the aligned run from the SFT run for one α (this run) or several (one child run per α)."""
    alphas = cfg.alphas()
    inputs = resolve_inputs(cfg, run)
    run.set_tags(inputs.lineage_tags)
    method = inputs.aligned.method
    write_input_weights(cfg, inputs, run.workdir / "inputs")  # the heavy part starts only after every check

    if len(alphas) == 1:
        run.set_name(expo_run_name(method, alphas[0]))
        extrapolate_and_log(run, cfg, inputs, alphas[0])
        return

    run.set_name(f"expo/{method}/sweep")
    run.set_tags({tracking.TAG_SWEEP: "alpha"})
    sweep: dict[str, list] = {"alpha": [], "run_id": []}
    for alpha in alphas:
        with tracking.child_run(run, expo_run_name(method, alpha)) as child:
            child.set_tags({tracking.TAG_BASE_MODEL: cfg.model.name, **inputs.lineage_tags})
            child.log_config(dataclasses.replace(cfg, alpha=f"{alpha:g}"))
            metrics = extrapolate_and_log(child, cfg, inputs, alpha)
            child.mark_complete()
        sweep["alpha"].append(alpha)
        sweep["run_id"].append(child.run_id)
        for key, value in metrics.items():
            sweep.setdefault(key, []).append(value)
    # One table with every α's numbers, next to the child runs the UI charts.
    run.log_table(sweep, "expo/sweep.json")


def _default_sft_run(cfg: ExpoConfig, train: bool) -> str:
    """The align/sft run the aligned adapter was trained on, else the newest align/sft run of the base model.

    Its own SFT parent first: extrapolating through a DPO model from an SFT model it never started from would
    mix two unrelated updates, and a newer SFT run is not a better reason to do so.
    """
    aligned = tracking.resolve_run(cfg.aligned_run, "aligned", ("align",), cfg.model.name, PREFERENCE_METHODS)
    if aligned.adapter_base:
        try:
            parent = tracking.resolve_run(aligned.adapter_base[-1], "sft", ("align",), cfg.model.name, ("sft",))
            return parent.run_id
        except RealignError:
            pass  # its start was not an sft run (or is gone): fall back to the newest one
    return _newest_sft(cfg, train)


_newest_sft = newest_or_fail("align", lambda cfg: "sft",
                             lambda cfg: "train one with `realign align --method sft`, or pass --sft-run <run id>")

EXPO = register(Stage(
    "expo", ExpoConfig, resolve_expo_config, expo_body,
    inputs=(
        Input("aligned_run", "aligned", ("align",), default=newest_or_fail(
            "align", lambda cfg: cfg.method,
            lambda cfg: f"train one with `realign align --method {cfg.method}`, or pass --aligned-run <run id>")),
        Input("sft_run", "sft", ("align",), default=_default_sft_run),
    ),
    summary="Model extrapolation θ = θ_aligned + α(θ_aligned − θ_sft), evaluated in the same run.",
))


def run_expo(overrides: dict[str, Any]) -> str:
    """Extrapolate an aligned run from an SFT run for one α (one run) or several (parent + child runs)."""
    return run_stage(EXPO, overrides)


def resolve_inputs(cfg: ExpoConfig, run: tracking.StageRun) -> ExpoInputs:
    """Find, check and download both input runs; decide lora vs merged. No model is loaded here."""
    aligned = run.resolve_input(cfg.aligned_run, "aligned", ("align",), cfg.model.name, methods=PREFERENCE_METHODS)
    sft = run.resolve_input(cfg.sft_run, "sft", ("align",), cfg.model.name, methods=("sft",))
    aligned_chain = run.adapter_chain(aligned)
    sft_chain = run.adapter_chain(sft)
    for adapter_dir, run_id in [*zip(aligned_chain, [*aligned.adapter_base, aligned.run_id]),
                                *zip(sft_chain, [*sft.adapter_base, sft.run_id])]:
        _check_adapter_files(Path(adapter_dir), run_id)

    # The aligned adapter sits on exactly the SFT model: EXPO is then a LoRA adapter of its own.
    on_sft = aligned.adapter_base == [*sft.adapter_base, sft.run_id]
    inputs = ExpoInputs(aligned, sft, aligned_chain, sft_chain, mode="lora" if on_sft else "merged")
    if cfg.form == "seed" and not on_sft:
        raise RealignError(f"form=seed scales the aligned LoRA adapter, but aligned run {aligned.run_id} was not "
                           f"trained on the SFT run {sft.run_id}: there is no adapter on θ_sft to scale",
                           "use form=paper (computed on the merged weights), or an aligned run trained on that "
                           "SFT run (realign align --method dpo --sft-run <sft run id>)")
    if inputs.mode == "lora":
        from safetensors.torch import load_file

        inputs.aligned_state = load_file(str(Path(aligned.local_dir) / "adapter_model.safetensors"))
        try:  # an adapter whose update is not B·A (DoRA, modules_to_save) cannot be extrapolated by scaling B
            expo_ops.scale_lora_update(inputs.aligned_state, 1.0)
        except ValueError as err:
            raise RealignError(f"aligned run {aligned.run_id}: {err}",
                               "extrapolate a plain LoRA adapter (no DoRA, no modules_to_save)") from None
    return inputs


def _check_adapter_files(adapter_dir: Path, run_id: str) -> None:
    missing = [name for name in ADAPTER_FILES if not (adapter_dir / name).is_file()]
    if missing:
        raise RealignError(f"run {run_id} has an adapter/ artifact without {', '.join(missing)}",
                           "pass a run whose stage finished and logged a PEFT adapter")


def write_input_weights(cfg: ExpoConfig, inputs: ExpoInputs, work: Path) -> None:
    """Merged mode: θ_aligned and θ_sft, each rebuilt once from the base and its adapter chain and saved as
    safetensors (one model in memory at a time); every α of a sweep streams from these files."""
    if inputs.mode != "merged":
        return
    inputs.aligned_dir = models.materialize_merged(cfg.model, inputs.aligned_chain, work / "aligned")
    inputs.sft_dir = models.materialize_merged(cfg.model, inputs.sft_chain, work / "sft")


def extrapolate_and_log(run: tracking.StageRun, cfg: ExpoConfig, inputs: ExpoInputs, alpha: float) -> dict[str, float]:
    """θ_expo for one α in `run`: the artifact, its lineage, its evaluation; returns the evaluation's metrics."""
    import torch

    out_dir = run.workdir / "expo"
    if inputs.mode == "lora":
        adapter_dir = write_scaled_adapter(inputs, cfg.form, alpha, out_dir / "adapter")
        run.set_tags({tracking.TAG_ADAPTER_BASE: ",".join(inputs.aligned.adapter_base),
                      tracking.TAG_OUTPUT: "adapter"})
        if cfg.form == "paper":
            factors = {"expo.lora_b_factor": expo_ops.lora_update_factor(alpha),
                       "expo.update_factor": expo_ops.lora_update_factor(alpha)}
        else:
            factors = {"expo.lora_a_factor": 2 * alpha, "expo.lora_b_factor": 2 * alpha,
                       "expo.update_factor": expo_ops.seed_update_factor(alpha)}
        run.log_params({"expo.mode": "lora", **factors})
        eval_model, eval_adapters = cfg.model, [*inputs.sft_chain, str(adapter_dir)]
    else:
        model_dir = write_merged_model(cfg, inputs, alpha, out_dir / "model")
        run.set_tags({tracking.TAG_ADAPTER_BASE: "", tracking.TAG_OUTPUT: "model"})
        run.log_params({"expo.mode": "merged"})
        eval_model, eval_adapters = dataclasses.replace(cfg.model, source="local", path=str(model_dir)), []

    metrics: dict[str, float] = {}
    if cfg.eval.enabled:
        torch.manual_seed(cfg.seed)
        # Loaded fresh from what is about to be logged: the numbers belong to the artifact, not to memory.
        metrics = evaluate_and_log(run, eval_model, eval_adapters, cfg.eval, task=cfg.eval.task).metrics
    if inputs.mode == "lora":
        run.log_adapter(adapter_dir)
    else:
        run.log_dir(model_dir, "model")
    return metrics


def write_scaled_adapter(inputs: ExpoInputs, form: str, alpha: float, out_dir: Path) -> Path:
    """The aligned adapter extrapolated in `form` (paper: lora_B × (1 + α); seed: A and B × 2α), as a standard
    PEFT dir with the aligned run's adapter_config.json."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    if form == "seed":
        scaled = expo_ops.scale_lora_factors(inputs.aligned_state, 2.0 * alpha)
    else:
        scaled = expo_ops.scale_lora_update(inputs.aligned_state, expo_ops.lora_update_factor(alpha))
    save_file(scaled, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(Path(inputs.aligned.local_dir) / "adapter_config.json", out_dir / "adapter_config.json")
    return out_dir


def write_merged_model(cfg: ExpoConfig, inputs: ExpoInputs, alpha: float, out_dir: Path) -> Path:
    """θ_aligned + α(θ_aligned − θ_sft) as a transformers model dir (safetensors + tokenizer), streamed."""
    with streaming_ops.WeightFiles(inputs.aligned_dir) as aligned, streaming_ops.WeightFiles(inputs.sft_dir) as sft:
        streaming_ops.stream_fusion(expo_ops.fusion_plan(alpha), streaming_ops.StreamInputs(aligned, sft, base=sft),
                                    out_dir, progress=True)
    models.copy_model_metadata(inputs.aligned_dir, out_dir)
    models.load_tokenizer(cfg.model).save_pretrained(out_dir)
    return out_dir
