"""`fuse` stage: restore the safety an attack removed by fusing the attacked model with a safety reference.

Inputs, all by run id: `finetuned_run` (an attack run), `reference_run` (an align or expo run), optionally `mask_run`
(a score run whose `masks/` restrict the fusion to a safety-critical region). The math is in `realign.ops.merge`;
this module checks every input before any weight is loaded, then picks the form that fits the inputs:

- ``full``: θ_ft = base + the attack run's adapter chain, θ_ref = base + the reference's chain (or an expo run's
  `model/`), θ0 = the base model. Each input is materialized once as safetensors in the run's workdir, then fused
  tensor by tensor in row chunks into safetensors shards, logged with config and tokenizer as a transformers model
  dir under `model/` (`realign.output=model`): memory stays near one model, not one per input.
- ``lora``: when both adapters sit on the same merged model (equal `realign.adapter_base`) with the same LoRA config,
  `restore` transplants LoRA A/B entries (NLSR's own setting; a mask must then be a `target=lora` score), logged as a
  PEFT dir under `adapter/` with that `realign.adapter_base`. ``mode=lora`` also fuses the task-arithmetic methods
  this way, factor by factor (as PEFT's `add_weighted_adapter` does), which is not the same as fusing the weights:
  `auto` uses it for `restore` only.

NLSR's layer selection (`selection: adaptive | threshold`, for `restore`) measures per module the similarity of the fine-tuned
and reference updates inside the region, both taken from the model they were trained from (the common start of
their adapter chains, each without its own last adapter: the SFT model in the default chain, as in NLSR where both
LoRAs sit on the SFT model; the base model when they share nothing), and draws the modules to transplant
(`realign.ops.nlsr.replacement_probabilities`).

The run (`fuse/<method>/<granularity|full>`) holds the fused artifact, `changed_fraction` (entries that differ from
the fine-tuned model) overall and `changed_fraction/layer_<i>`, the evaluation of the fused model (loaded fresh from
what is logged) and, for comparison in the UI, the attacked model's own numbers as `attacked_harmful_score` and
`attacked_finetune_accuracy` when they were judged by the same judge.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from realign import models, tracking
from realign.config import ModelConfig, resolve_stage_config
from realign.stage_configs import FuseConfig
from realign.errors import RealignError
from realign.ops import masks as region_files
from realign.ops import merge as merge_ops
from realign.ops import nlsr as nlsr_ops
from realign.ops import regions as regions_ops
from realign.ops import streaming as streaming_ops
from realign.stages.base import Input, Stage, register, run_stage
from realign.stages.evaluate import evaluate_and_log

REFERENCE_STAGES = ("align", "expo")
UNALIGNED_STAGES = ("align", "expo", "attack", "fuse")  # the unaligned model of a safety vector: any model run
LORA_CONFIG_KEYS = ("r", "lora_alpha", "use_rslora", "use_dora", "fan_in_fan_out", "bias")


def resolve_fuse_config(overrides: dict[str, Any]) -> FuseConfig:
    cfg = resolve_stage_config(FuseConfig, "fuse", overrides.get("recipe") or "default", overrides)
    if cfg.method not in merge_ops.MERGE_METHODS:
        raise RealignError(f"unknown fusion method {cfg.method!r}", f"use one of: {', '.join(merge_ops.MERGE_METHODS)}")
    return cfg


def merge_params(cfg: FuseConfig) -> merge_ops.MergeParams:
    return merge_ops.MergeParams(weights=tuple(cfg.weights), scale=cfg.scale, density=cfg.density,
                                 tall_lambda=cfg.tall_lambda, consensus_k=cfg.consensus_k, dare_rate=cfg.dare_rate,
                                 dare_seed=cfg.dare_seed, gamma=cfg.gamma)


def fuse_run_name(method: str, granularity: str) -> str:
    return f"fuse/{method}/{granularity or 'full'}"


@dataclass
class FuseInputs:
    """The checked input runs, their local artifacts, the region and the chosen mode; no weights loaded."""

    finetuned: tracking.InputRun
    reference: tracking.InputRun  # antidote reads none: the finetuned run stands in (its values are never used)
    mask: tracking.InputRun | None
    finetuned_chain: list[str]  # local adapter dirs: base + these = θ_ft
    reference_chain: list[str]  # local adapter dirs (reference output "adapter")
    reference_model_dir: Path | None  # reference output "model": its full weights
    mode: str  # "full" | "lora"
    granularity: str  # "" (no region) | neurons | ranks | heads
    region: regions_ops.FusionRegion | None
    region_target: str  # "weights" | "lora" | ""
    param_order: dict[str, int] = field(default_factory=dict)  # the model's parameter order (NLSR draws in it)
    selected_heads: list[tuple[str, int]] = field(default_factory=list)
    unaligned: "WeightsInput | None" = None  # resta, safe_lora: θ_un (None = the base model)

    @property
    def reference_ids(self) -> list[str]:
        return [*self.reference.adapter_base, self.reference.run_id] if self.reference_model_dir is None else []

    @property
    def finetuned_ids(self) -> list[str]:
        return [*self.finetuned.adapter_base, self.finetuned.run_id]


@dataclass
class FuseResult:
    changed: dict[str, tuple[int, int]]
    eval_model: ModelConfig
    eval_adapters: list[str]
    artifact_dir: Path
    modules_table: dict[str, list] | None = None


def fuse_body(run: tracking.StageRun, cfg: FuseConfig) -> None:
    """Fuse an attack run with a safety reference (inside a score run's region), evaluate it, log the artifact."""
    run.set_tags({tracking.TAG_METHOD: cfg.method})
    inputs = resolve_inputs(cfg, run)
    run.set_name(fuse_run_name(cfg.method, inputs.granularity))
    task = cfg.eval.task or inputs.finetuned.tags.get(tracking.TAG_TASK, "")
    run.set_tags({tracking.TAG_TASK: task} if task else {})
    run.log_params({"fuse.mode": inputs.mode, "fuse.granularity": inputs.granularity or "full"})
    if inputs.selected_heads:
        run.log_params({"fuse.heads": len(inputs.selected_heads)})

    # The heavy part starts only now, after every check passed.
    if cfg.method == "safe_lora":
        result = fuse_safe_lora(cfg, inputs, run)
    elif inputs.mode == "lora":
        result = fuse_lora(cfg, inputs, run)
    else:
        result = fuse_full(cfg, inputs, run)
    log_changes(run, result)
    if inputs.mode == "lora":
        run.set_tags({tracking.TAG_ADAPTER_BASE: ",".join(inputs.finetuned.adapter_base),
                      tracking.TAG_OUTPUT: "adapter"})
    else:
        run.set_tags({tracking.TAG_ADAPTER_BASE: "", tracking.TAG_OUTPUT: "model"})

    if cfg.eval.enabled:
        import torch

        torch.manual_seed(cfg.seed)
        # Loaded fresh from what is about to be logged: the numbers belong to the artifact, not to memory.
        evaluation = evaluate_and_log(run, result.eval_model, result.eval_adapters, cfg.eval, task=task)
        log_attacked_numbers(run, inputs.finetuned, evaluation.identity)
    if inputs.mode == "lora":
        run.log_adapter(result.artifact_dir)
    else:
        run.log_dir(result.artifact_dir, "model")


FUSE = register(Stage(
    "fuse", FuseConfig, resolve_fuse_config, fuse_body,
    inputs=(Input("finetuned_run", "finetuned", ("attack",)),
            Input("reference_run", "reference", REFERENCE_STAGES, absent=("",)),
            Input("mask_run", "mask", ("score",), absent=("",)),
            Input("unaligned_run", "unaligned", UNALIGNED_STAGES, absent=("", "base"))),
    summary="Fuse an attacked model with a safety reference (inside a score run's region), evaluated in the same run.",
))


def run_fuse(overrides: dict[str, Any]) -> str:
    """Fuse an attack run with a safety reference (inside a score run's region); returns the fuse run's id."""
    return run_stage(FUSE, overrides)


# ---------------------------------------------------------------------------------------------------------------
# Inputs: every check before any weight is loaded
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class WeightsInput:
    """A run whose weights a fusion reads: base + `chain` (local adapter dirs), or `model_dir` (full weights)."""

    run: tracking.InputRun
    chain: list[str]
    model_dir: Path | None


def resolve_weights_input(run: tracking.StageRun, ref: str, role: str, stages: tuple[str, ...],
                          base: str) -> WeightsInput:
    """Check run `ref`, download its adapter chain or its full weights (`realign.output=model`)."""
    output = tracking.resolve_run(ref, role, stages, base).tags.get(tracking.TAG_OUTPUT, "adapter")
    source = run.resolve_input(ref, role, stages, base, artifact="model" if output == "model" else "adapter")
    if output != "model":
        return WeightsInput(source, run.adapter_chain(source), None)
    model_dir = Path(source.local_dir)
    if not (model_dir / "config.json").is_file():
        raise RealignError(f"{role} run {source.run_id} has a model/ artifact without config.json",
                           "pass a run whose stage finished and logged a full model")
    return WeightsInput(source, [], model_dir)


def resolve_inputs(cfg: FuseConfig, run: tracking.StageRun) -> FuseInputs:
    base = cfg.model.name
    finetuned = run.resolve_input(cfg.finetuned_run, "finetuned", ("attack",), base)
    mask = run.resolve_input(cfg.mask_run, "mask", ("score",), base, artifact="masks") if cfg.mask_run else None
    if mask is None and cfg.granularity:
        raise RealignError(f"granularity={cfg.granularity} needs a region", "pass --mask_run <score run id>")
    finetuned_chain = run.adapter_chain(finetuned)
    if cfg.method == "antidote":
        check_antidote_region(mask, finetuned)
        reference = WeightsInput(finetuned, finetuned_chain, None)
    else:
        reference = resolve_weights_input(run, cfg.reference_run, "reference", REFERENCE_STAGES, base)
    unaligned = None
    if cfg.method in ("resta", "safe_lora") and cfg.unaligned_run not in ("", "base"):
        unaligned = resolve_weights_input(run, cfg.unaligned_run, "unaligned", UNALIGNED_STAGES, base)

    config, param_shapes = model_layout(cfg.model)
    inputs = FuseInputs(finetuned, reference.run, mask, finetuned_chain, reference.chain, reference.model_dir,
                        mode="full", granularity="", region=None, region_target="",
                        param_order={name: i for i, name in enumerate(param_shapes)}, unaligned=unaligned)
    if mask is not None:
        load_checked_region(cfg, inputs, config, param_shapes)
    inputs.mode = choose_mode(cfg, inputs)
    return inputs


def check_antidote_region(mask: tracking.InputRun, finetuned: tracking.InputRun) -> None:
    """Antidote's region is the attacked model's own importance on harmful answers: a score run of this attack
    with harmful calibration."""
    scored = mask.tags.get(f"{tracking.TAG_SOURCE}model", "")
    if scored != finetuned.run_id:
        raise RealignError(f"mask run {mask.run_id} scored {'run ' + scored if scored else 'the base model'}, not the "
                           f"attacked run {finetuned.run_id}: Antidote prunes the attacked model's own harmful weights",
                           f"pass a score run with --model_run {finetuned.run_id} --data.safety_source harmful")
    source = mask.params.get("data.safety_source", "builtin")
    if source not in ("harmful", "hub-harmful"):
        raise RealignError(f"mask run {mask.run_id} was calibrated on data.safety_source={source} (safe answers); "
                           "Antidote ranks weights by their importance for harmful answers",
                           f"pass a score run with --model_run {finetuned.run_id} --data.safety_source harmful")


def model_layout(model_cfg: ModelConfig):
    """(transformers config, {parameter name: shape} in the model's order), from the config alone (meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    options = models.hub_options(model_cfg)
    config = AutoConfig.from_pretrained(models.resolve_model_dir(model_cfg), **options)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=options["trust_remote_code"])
    return config, {name: tuple(tensor.shape) for name, tensor in skeleton.state_dict().items()}


def load_checked_region(cfg: FuseConfig, inputs: FuseInputs, config, param_shapes: dict[str, tuple]) -> None:
    """The score run's region file for `cfg.granularity`, checked against the model: architecture, then shapes."""
    mask = inputs.mask
    folder = Path(mask.local_dir)
    score_method = mask.method
    heads = cfg.granularity == "heads"
    file = folder / (f"{score_method}.heads.safetensors" if heads else f"{score_method}.safetensors")
    if not file.is_file():
        present = ", ".join(sorted(p.name for p in folder.glob("*.safetensors"))) or "none"
        raise RealignError(f"mask run {mask.run_id} has no masks/{file.name} (it holds: {present})",
                           "pass a score run that logged it" + (", or drop --granularity heads" if heads else ""))
    try:
        tensors, metadata = region_files.load_region(file)
    except ValueError as err:
        raise RealignError(f"mask run {mask.run_id}: {err}", "pass a score run's masks") from None
    architecture = region_files.architecture_id(config)
    if metadata.get("realign.architecture") != architecture:
        raise RealignError(f"mask run {mask.run_id} was scored on architecture "
                           f"{metadata.get('realign.architecture', 'unknown')!r}, the model is {architecture!r}",
                           f"pass a score run of {cfg.model.name}")
    kind = metadata["realign.kind"]
    if cfg.granularity and kind != cfg.granularity:
        raise RealignError(f"mask run {mask.run_id}'s masks/{file.name} holds a {kind} region, not {cfg.granularity}",
                           f"pass --granularity {kind}, heads, or another score run")
    target = metadata.get("realign.target", "weights")
    inputs.granularity, inputs.region_target = kind, target if kind != "heads" else "weights"

    if kind == "heads":
        check_head_scores(tensors, config, mask.run_id)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        head_masks, inputs.selected_heads = regions_ops.head_masks(tensors, cfg.top_heads, head_dim, param_shapes)
        inputs.region = regions_ops.FusionRegion("heads", masks=head_masks)
        return
    shapes = param_shapes if target == "weights" else adapter_shapes(Path(inputs.finetuned.local_dir))
    try:
        region_files.check_region_shapes(tensors, kind, shapes)
    except ValueError as err:
        what = "the model" if target == "weights" else f"finetuned run {inputs.finetuned.run_id}'s adapter"
        raise RealignError(f"mask run {mask.run_id} does not fit {what}: {err}",
                           "pass a score run of the same model (and, for target=lora, of the same LoRA shape)") from None
    inputs.region = regions_ops.region_from_file(tensors, kind)


def check_head_scores(tensors: dict, config, run_id: str) -> None:
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    for key, scores in tensors.items():
        parts = key.split(".")
        if not (len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[2].isdigit()
                and int(parts[2]) < layers and parts[3] == "self_attn"):
            raise RealignError(f"mask run {run_id}'s head scores name {key!r}, not an attention block of the model",
                               "pass a score run of the same model")
        if scores.numel() != heads:
            raise RealignError(f"mask run {run_id} scores {scores.numel()} heads in {key}, the model has {heads}",
                               "pass a score run of the same model")


def adapter_shapes(adapter_dir: Path) -> dict[str, tuple]:
    from safetensors import safe_open

    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as handle:
        return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}


def choose_mode(cfg: FuseConfig, inputs: FuseInputs) -> str:
    """lora when both adapters sit on the same merged model with the same LoRA config (and the region, if any,
    is over LoRA entries); `auto` picks it for restore only; full otherwise. safe_lora projects the attacked
    adapter's own factors (lora); resta adds a safety vector of full weights (full)."""
    if cfg.method == "safe_lora":
        return safe_lora_mode(cfg, inputs)
    if cfg.method == "resta" and cfg.mode == "lora":
        raise RealignError("resta adds θ_ref − θ_un to full weights; lora mode cannot hold it", "pass --mode auto or full")
    reason = lora_ineligibility(inputs)
    if inputs.region_target == "lora":
        if reason:
            raise RealignError(f"mask run {inputs.mask.run_id} marks LoRA A/B entries, but {reason}",
                               "pass a score run with --target weights")
        if cfg.mode == "full":
            raise RealignError(f"mask run {inputs.mask.run_id} marks LoRA A/B entries, which full mode cannot use",
                               "drop --mode full, or pass a score run with --target weights")
        return "lora"
    if cfg.mode == "lora":
        if reason:
            raise RealignError(f"mode=lora needs adapters on one base model, but {reason}", "pass --mode full or auto")
        if inputs.region is not None:
            raise RealignError(f"mask run {inputs.mask.run_id} marks merged weights, which lora mode cannot use",
                               "pass --mode full or auto, or a score run with --target lora")
        return "lora"
    if cfg.mode == "auto" and cfg.method == "restore" and inputs.region is None and not reason:
        return "lora"
    return "full"


def safe_lora_mode(cfg: FuseConfig, inputs: FuseInputs) -> str:
    """Safe LoRA projects the attacked LoRA update: the attack must have one, of plain A/B factors, and no region."""
    ft = inputs.finetuned
    if cfg.mode == "full":
        raise RealignError("safe_lora projects the attacked adapter's LoRA factors, which full mode cannot",
                           "pass --mode auto or lora")
    if inputs.region is not None:
        raise RealignError("safe_lora chooses its layers by similarity and takes no region", "drop --mask_run")
    config_file = Path(ft.local_dir) / "adapter_config.json"
    if not config_file.is_file():
        raise RealignError(f"finetuned run {ft.run_id} has no LoRA adapter (a full-weight attack)",
                           "Safe LoRA needs a LoRA attack: pass an attack run trained with LoRA")
    if json.loads(config_file.read_text()).get("use_dora"):
        raise RealignError(f"finetuned run {ft.run_id}'s adapter is DoRA, not a plain A/B update",
                           "pass an attack run trained with plain LoRA")
    return "lora"


def lora_ineligibility(inputs: FuseInputs) -> str:
    """Why the two adapters cannot be fused entry by entry, or "" when they can."""
    ft, ref = inputs.finetuned, inputs.reference
    if inputs.reference_model_dir is not None:
        return f"reference run {ref.run_id} holds full weights"
    if ft.adapter_base != ref.adapter_base:
        return (f"the finetuned adapter sits on runs [{', '.join(ft.adapter_base)}] and the reference on "
                f"[{', '.join(ref.adapter_base)}]")
    ft_config = json.loads((Path(ft.local_dir) / "adapter_config.json").read_text())
    ref_config = json.loads((Path(ref.local_dir) / "adapter_config.json").read_text())
    for key in LORA_CONFIG_KEYS:
        if ft_config.get(key) != ref_config.get(key):
            return f"their LoRA {key} differs ({ft_config.get(key)} vs {ref_config.get(key)})"
    if sorted(ft_config.get("target_modules") or []) != sorted(ref_config.get("target_modules") or []):
        return "their LoRA target_modules differ"
    if ft_config.get("use_dora"):
        return "DoRA adapters are not plain A/B updates"
    ft_root, ref_root = tracking.adapter_root(ft.run_id), tracking.adapter_root(ref.run_id)
    if ft_root != ref_root:
        return (f"the finetuned adapter descends from run {ft_root} and the reference's from run {ref_root}: their "
                "A/B coordinates are unrelated (an attack with --adapter continue keeps its source's)")
    return ""


# ---------------------------------------------------------------------------------------------------------------
# Fusion
# ---------------------------------------------------------------------------------------------------------------


def fuse_lora(cfg: FuseConfig, inputs: FuseInputs, run: tracking.StageRun) -> FuseResult:
    """Fuse the two adapters' A/B tensors (θ0 = the zero update of their shared base) into a PEFT dir."""
    from safetensors.torch import load_file, save_file

    ft_dir, ref_dir = Path(inputs.finetuned.local_dir), Path(inputs.reference.local_dir)
    ft_state = load_file(str(ft_dir / "adapter_model.safetensors"))
    ref_state = load_file(str(ref_dir / "adapter_model.safetensors"))
    plan = merge_ops.FusionPlan(merge_ops.get_merge_method(cfg.method), merge_params(cfg), inputs.region)
    table = None
    if cfg.method == "restore" and cfg.selection != "all":
        modules = sorted(nlsr_ops.lora_module_names(ft_state), key=lambda m: _model_position(inputs, m))
        similarities = nlsr_ops.lora_update_similarities(ft_state, ref_state, modules, inputs.region)
        table, chosen = _adaptive_selection(cfg, modules, similarities)
        plan.replaced = frozenset(f"{m}.lora_{part}.weight" for m in chosen for part in ("A", "B"))
    try:
        fused, changed = merge_ops.fuse_state_dicts(plan, None, ft_state, ref_state)
    except ValueError as err:
        raise RealignError(f"the finetuned and reference adapters do not match: {err}",
                           "pass --mode full to fuse their merged weights") from None
    out_dir = run.workdir / "fused" / "adapter"
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(fused, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(ft_dir / "adapter_config.json", out_dir / "adapter_config.json")
    return FuseResult(changed, cfg.model, [*inputs.finetuned_chain[:-1], str(out_dir)], out_dir, table)


def fuse_safe_lora(cfg: FuseConfig, inputs: FuseInputs, run: tracking.StageRun) -> FuseResult:
    """Safe LoRA: per attacked LoRA module the similarity of its update to C = V Vᵀ/‖V‖_F (V = W_ref − W_un, read
    tensor by tensor from the materialized full weights), then B → C·B in the selected modules, as a PEFT dir."""
    import torch
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    from realign.ops import safe_lora as safe_lora_ops

    ft_dir = Path(inputs.finetuned.local_dir)
    state = load_file(str(ft_dir / "adapter_model.safetensors"))
    modules = sorted(nlsr_ops.lora_module_names(state), key=lambda m: _model_position(inputs, m))
    reference_dir = reference_weights_dir(cfg, inputs, run.workdir)
    projected, similarities = {}, []
    with streaming_ops.WeightFiles(reference_dir) as ref_files, \
            streaming_ops.WeightFiles(unaligned_dir(cfg, inputs, run.workdir)) as un_files:
        for module in tqdm(modules, desc="safe_lora", unit="module"):
            weight = module.removeprefix("base_model.model.") + ".weight"
            if weight not in ref_files.file_of or weight not in un_files.file_of:
                raise RealignError(f"the adapter adapts {weight}, which the reference or unaligned weights lack",
                                   "pass runs of the same model")
            alignment = ref_files.read(weight).to(torch.float32) - un_files.read(weight).to(torch.float32)
            a, b = state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"]
            projected[module] = safe_lora_ops.projected_b(b, alignment)
            similarities.append(safe_lora_ops.update_similarity(a, b, projected[module]))
    chosen = safe_lora_ops.select_modules(similarities, cfg.safe_lora_select, cfg.safe_lora_tau, cfg.safe_lora_layers)
    fused = dict(state)
    for module, replace in zip(modules, chosen):
        if replace:
            name = f"{module}.lora_B.weight"
            fused[name] = projected[module].to(state[name].dtype).contiguous()
    changed = {name: (int((fused[name] != tensor).sum()), tensor.numel()) for name, tensor in state.items()}
    out_dir = run.workdir / "fused" / "adapter"
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(fused, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    shutil.copyfile(ft_dir / "adapter_config.json", out_dir / "adapter_config.json")
    table = {"module": modules, "similarity": similarities, "probability": [float(c) for c in chosen],
             "replaced": chosen}
    return FuseResult(changed, cfg.model, [*inputs.finetuned_chain[:-1], str(out_dir)], out_dir, table)


def fuse_full(cfg: FuseConfig, inputs: FuseInputs, run: tracking.StageRun) -> FuseResult:
    """Materialize each input once as safetensors, then fuse them tensor by tensor into a transformers model dir."""
    method = merge_ops.get_merge_method(cfg.method)
    work = run.workdir
    finetuned_dir = weights_dir(cfg.model, inputs.finetuned_chain, work / "finetuned")
    if inputs.reference is inputs.finetuned:  # antidote: nothing is read from a reference
        reference_dir = finetuned_dir
    else:
        reference_dir = reference_weights_dir(cfg, inputs, work)
    base_dir = None
    if method.kind == "task_arithmetic":
        base_dir = weights_dir(cfg.model, [], work / "base")
    elif method.kind == "resta":
        base_dir = unaligned_dir(cfg, inputs, work)
    plan = merge_ops.FusionPlan(method, merge_params(cfg), inputs.region)
    out_dir = work / "fused" / "model"
    table = None
    with streaming_ops.WeightFiles(finetuned_dir) as ft_files, streaming_ops.WeightFiles(reference_dir) as ref_files:
        if cfg.method == "restore" and cfg.selection != "all":
            anchor_dir = weights_dir(cfg.model, common_chain(inputs), work / "anchor")
            names = adaptive_candidates(inputs, ft_files.names)
            with streaming_ops.WeightFiles(anchor_dir) as anchor_files:
                similarities = streaming_ops.stream_similarities(names, ft_files, ref_files, anchor_files, inputs.region,
                                                             progress=True)
            table, chosen = _adaptive_selection(cfg, names, similarities)
            plan.replaced = frozenset(chosen)
        base_files = streaming_ops.WeightFiles(base_dir) if base_dir is not None else None
        try:
            changed = streaming_ops.stream_fusion(plan, streaming_ops.StreamInputs(ft_files, ref_files, base_files), out_dir,
                                              progress=True)
        except ValueError as err:
            raise RealignError(f"the finetuned and reference weights do not match: {err}",
                               "pass runs of the same model") from None
        finally:
            if base_files is not None:
                base_files.close()
    models.copy_model_metadata(finetuned_dir, out_dir)
    models.load_tokenizer(cfg.model).save_pretrained(out_dir)
    eval_model = dataclasses.replace(cfg.model, source="local", path=str(out_dir))
    return FuseResult(changed, eval_model, [], out_dir, table)


def unaligned_dir(cfg: FuseConfig, inputs: FuseInputs, work: Path) -> str:
    """θ_un as a local safetensors dir: the unaligned run's weights, or the base model's."""
    if inputs.unaligned is None:
        return weights_dir(cfg.model, [], work / "base")
    if inputs.unaligned.model_dir is not None:
        return str(inputs.unaligned.model_dir)
    return weights_dir(cfg.model, inputs.unaligned.chain, work / "unaligned")


def reference_weights_dir(cfg: FuseConfig, inputs: FuseInputs, work: Path) -> str:
    return str(inputs.reference_model_dir) if inputs.reference_model_dir is not None else \
        weights_dir(cfg.model, inputs.reference_chain, work / "reference")


def weights_dir(model_cfg: ModelConfig, adapters: list[str], out_dir: Path) -> str:
    """A local dir of safetensors weights for base + `adapters` (merged and saved once; the base's own dir when
    there is nothing to merge and it is local)."""
    if not adapters:
        directory = models.resolve_model_dir(model_cfg)
        if Path(directory).is_dir() and any(Path(directory).glob("*.safetensors")):
            return directory
        model = models.load_model(model_cfg, device="cpu")  # a hub id: saved once as local safetensors
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out_dir, safe_serialization=True)
        del model
        return str(out_dir)
    return models.materialize_merged(model_cfg, adapters, out_dir)


def common_chain(inputs: FuseInputs) -> list[str]:
    """Local adapter dirs of the model both were trained from: the longest common start of the two adapter chains,
    each without its own last adapter. NLSR measures the two updates from there (the SFT model, for an attack on
    DPO-on-SFT and a reference that is that DPO run or its EXPO); a reference that is itself an ancestor of the
    attacked model still has an update of its own."""
    common: list[str] = []
    pairs = zip(inputs.finetuned_ids[:-1], inputs.reference_ids[:-1])
    for position, (ft_id, ref_id) in enumerate(pairs):
        if ft_id != ref_id:
            break
        common.append(inputs.finetuned_chain[position])
    return common


def adaptive_candidates(inputs: FuseInputs, names: list[str]) -> list[str]:
    """The modules NLSR's selection draws among, in the model's order: the region's parameters, or without a
    region every 2-D weight of the decoder layers (the linear layers LoRA adapts)."""
    if inputs.region is not None:
        candidates = [name for name in names if inputs.region.covers(name)]
    else:
        layout = inputs.param_order
        candidates = [name for name in names if regions_ops.layer_of(name) is not None and name.endswith(".weight")
                      and name in layout and not name.endswith("layernorm.weight")]
    return sorted(candidates, key=lambda name: inputs.param_order.get(name, len(inputs.param_order)))


def _model_position(inputs: FuseInputs, lora_module: str) -> int:
    """A LoRA module's place in the model (PEFT names it base_model.model.<module>)."""
    weight = lora_module.removeprefix("base_model.model.") + ".weight"
    return inputs.param_order.get(weight, len(inputs.param_order))


def _adaptive_selection(cfg: FuseConfig, modules: list[str], similarities: list[float]):
    """The modules restore transplants into: NLSR's seeded draw (adaptive) or its threshold rule (threshold)."""
    if cfg.selection == "threshold":
        replaced = nlsr_ops.below_threshold(similarities, cfg.tau)
        probabilities = replaced.double()
    else:
        probabilities = nlsr_ops.replacement_probabilities(similarities, cfg.prune_rate, cfg.epsilon,
                                                            prefer=cfg.prefer)
        replaced = nlsr_ops.sample_replaced(probabilities, cfg.seed)
    table = {"module": list(modules), "similarity": [float(s) for s in similarities],
             "probability": [float(p) for p in probabilities], "replaced": [bool(r) for r in replaced]}
    return table, [m for m, r in zip(modules, replaced.tolist()) if r]


# ---------------------------------------------------------------------------------------------------------------
# Logging
# ---------------------------------------------------------------------------------------------------------------


def log_changes(run: tracking.StageRun, result: FuseResult) -> None:
    """changed_fraction overall and per layer, its figure, and NLSR's per-module draw when there was one."""
    overall, per_layer = regions_ops.changed_fractions(result.changed)
    metrics = {"changed_fraction": overall, **{f"changed_fraction/layer_{i}": f for i, f in per_layer.items()}}
    if result.modules_table is not None:
        replaced = sum(result.modules_table["replaced"])
        metrics["replaced_modules"] = replaced
        metrics["replaced_module_fraction"] = replaced / max(len(result.modules_table["replaced"]), 1)
        run.log_table(result.modules_table, "fuse/modules.json")
        run.log_figure(similarity_figure(result.modules_table), "figures/similarities.html")
    run.log_metrics(metrics)
    if per_layer:
        import plotly.graph_objects as go

        figure = go.Figure(go.Bar(x=list(per_layer), y=[100 * f for f in per_layer.values()]))
        figure.update_layout(title="Weights changed by the fusion, per layer", xaxis_title="layer",
                             yaxis_title="changed (% of the layer's entries)")
        run.log_figure(figure, "figures/changed_fraction.html")


def similarity_figure(table: dict[str, list]):
    """Each module's similarity of the attacked and reference updates (in the model's order), replaced or kept."""
    import plotly.graph_objects as go

    figure = go.Figure()
    for replaced, name, color in ((True, "replaced", "#c0392b"), (False, "kept", "#7f8c8d")):
        picked = [i for i, r in enumerate(table["replaced"]) if r == replaced]
        figure.add_trace(go.Scatter(
            x=picked, y=[table["similarity"][i] for i in picked], mode="markers", name=name,
            marker={"color": color, "size": 7}, text=[table["module"][i] for i in picked],
            customdata=[table["probability"][i] for i in picked],
            hovertemplate="%{text}<br>similarity=%{y:.4f}<br>p(replace)=%{customdata:.3f}<extra>%{fullData.name}</extra>"))
    figure.update_layout(title="Similarity of the attacked and reference updates per module (inside the region)",
                         xaxis_title="module (model order)", yaxis_title="cosine similarity", template="plotly_white",
                         showlegend=True)
    return figure


def log_attacked_numbers(run: tracking.StageRun, finetuned: tracking.InputRun, identity: dict[str, str]) -> None:
    """The attacked model's own numbers (with their intervals) next to the fused model's, when they were measured
    alike: the same judge (name, content, threshold), prompt set and decoding."""
    if any(finetuned.tags.get(key, "") != identity.get(key, "") for key in tracking.SCORE_IDENTITY_TAGS):
        return
    numbers = tracking.run_metrics(finetuned.run_id)
    picked = {f"attacked_{key}": value for key, value in numbers.items()
              if key.split("_ci95_")[0].removesuffix("_n") in ("harmful_score", "finetune_accuracy", "refusal_rate")}
    if picked:
        run.log_metrics(picked)
