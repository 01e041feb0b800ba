"""Inputs of the `fuse` stage: every check before any weight is loaded (the run ids, their artifacts, the region
against the model, and which form, full weights or LoRA factors, the fusion takes)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from realign import models, tracking
from realign.config import ModelConfig
from realign.errors import RealignError
from realign.ops import masks as region_files
from realign.ops import regions as regions_ops
from realign.stage_configs import FuseConfig

REFERENCE_STAGES = ("align", "expo")
UNALIGNED_STAGES = ("align", "expo", "attack", "fuse")  # the unaligned model of a safety vector: any model run
SAFETY_STAGES = ("align", "attack", "fuse")  # safemerge's safety LoRA: any run that logged an adapter
LORA_CONFIG_KEYS = ("r", "lora_alpha", "use_rslora", "use_dora", "fan_in_fan_out", "bias")


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
    unaligned: "WeightsInput | None" = None  # resta, safe_lora, safemerge: θ_un (None = the base model)
    safety: tracking.InputRun | None = None  # safemerge: the safety LoRA

    @property
    def reference_ids(self) -> list[str]:
        return [*self.reference.adapter_base, self.reference.run_id] if self.reference_model_dir is None else []

    @property
    def finetuned_ids(self) -> list[str]:
        return [*self.finetuned.adapter_base, self.finetuned.run_id]




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
    if cfg.method in ("resta", "safe_lora", "safemerge") and cfg.unaligned_run not in ("", "base"):
        unaligned = resolve_weights_input(run, cfg.unaligned_run, "unaligned", UNALIGNED_STAGES, base)
    safety = run.resolve_input(cfg.safety_run, "safety", SAFETY_STAGES, base) if cfg.safety_run else None

    config, param_shapes = model_layout(cfg.model)
    inputs = FuseInputs(finetuned, reference.run, mask, finetuned_chain, reference.chain, reference.model_dir,
                        mode="full", granularity="", region=None, region_target="",
                        param_order={name: i for i, name in enumerate(param_shapes)}, unaligned=unaligned,
                        safety=safety)
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
    if cfg.method in ("safe_lora", "safemerge"):
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
    """Safe LoRA and SafeMERGE rework the attacked LoRA update: the attack must have one, of plain A/B factors, and
    no region; SafeMERGE's safety LoRA must share its base, rank and targets."""
    ft = inputs.finetuned
    if cfg.mode == "full":
        raise RealignError(f"{cfg.method} works on the attacked adapter's LoRA factors, which full mode cannot",
                           "pass --mode auto or lora")
    if inputs.region is not None:
        raise RealignError(f"{cfg.method} chooses its layers by similarity and takes no region", "drop --mask_run")
    ft_config = plain_lora_config(ft, "finetuned", "an attack run trained with LoRA")
    if cfg.method == "safemerge":
        safety = inputs.safety
        safety_config = plain_lora_config(safety, "safety", "a run that logged a LoRA adapter")
        if safety.adapter_base != ft.adapter_base:
            raise RealignError(f"the safety adapter sits on runs [{', '.join(safety.adapter_base)}] and the attacked "
                               f"one on [{', '.join(ft.adapter_base)}]: SafeMERGE merges two LoRAs of one base",
                               "pass a safety run trained on the attack's base (e.g. the aligned adapter an "
                               "--adapter continue attack started from)")
        for key in ("r", "target_modules", "rank_pattern"):
            mine, theirs = ft_config.get(key), safety_config.get(key)
            if key == "target_modules":
                mine, theirs = sorted(mine or []), sorted(theirs or [])
            if (mine or None) != (theirs or None):
                raise RealignError(f"the safety adapter's LoRA {key} ({theirs}) differs from the attacked one's "
                                   f"({mine})", "pass a safety run trained with the attack's LoRA settings")
    return "lora"


def plain_lora_config(source: tracking.InputRun, role: str, wanted: str) -> dict:
    """A run's adapter_config.json, checked to be a plain LoRA (A/B factors, the usual α/r scale)."""
    config_file = Path(source.local_dir) / "adapter_config.json"
    if not config_file.is_file():
        raise RealignError(f"{role} run {source.run_id} has no LoRA adapter (full weights)", f"pass {wanted}")
    config = json.loads(config_file.read_text())
    for key, what in (("use_dora", "DoRA"), ("use_rslora", "rsLoRA"), ("alpha_pattern", "a per-module alpha")):
        if config.get(key):
            raise RealignError(f"{role} run {source.run_id}'s adapter uses {what}, not a plain α/r LoRA update",
                               f"pass {wanted} with plain LoRA")
    return config


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
