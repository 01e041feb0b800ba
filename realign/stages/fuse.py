"""`fuse` stage: restore the safety an attack removed by fusing the attacked model with a safety reference.

Inputs, all by run id: `finetuned_run` (an attack run), `reference_run` (an align or expo run), optionally `mask_run`
(a score run whose `masks/` restrict the fusion to a safety-critical region). The math is in `realign.ops.merge`;
`realign.stages.fuse_inputs` checks every input before any weight is loaded and picks the form that fits them:

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

The field's other post-hoc repairs are methods of the same registry: `resta` (θ_un from `unaligned_run`, default
the base model; optional DARE), `antidote` (no reference: the region of a harmful-data score of the attacked run is
set to zero), `safe_lora` (the attacked adapter's B projected in the least aligned modules; `fuse_safe_lora`) and
`safemerge` (a safety LoRA from `safety_run` merged per factor into the modules below τ; `fuse_safemerge`).

The run (`fuse/<method>/<granularity|full>`) holds the fused artifact, `changed_fraction` (entries that differ from
the fine-tuned model) overall and `changed_fraction/layer_<i>`, the evaluation of the fused model (loaded fresh from
what is logged) and, for comparison in the UI, the attacked model's own numbers as `attacked_harmful_score` and
`attacked_finetune_accuracy` when they were judged by the same judge.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from realign import models, tracking
from realign.config import ModelConfig, resolve_stage_config
from realign.stage_configs import FuseConfig
from realign.errors import RealignError
from realign.ops import merge as merge_ops
from realign.ops import nlsr as nlsr_ops
from realign.ops import regions as regions_ops
from realign.ops import streaming as streaming_ops
from realign.stages.base import Input, Stage, register, run_stage
from realign.stages.evaluate import evaluate_and_log
from realign.stages.fuse_inputs import (REFERENCE_STAGES, SAFETY_STAGES, UNALIGNED_STAGES, FuseInputs,
                                        resolve_inputs)


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
    elif cfg.method == "safemerge":
        result = fuse_safemerge(cfg, inputs, run)
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
            Input("unaligned_run", "unaligned", UNALIGNED_STAGES, absent=("", "base")),
            Input("safety_run", "safety", SAFETY_STAGES, absent=("",))),
    summary="Fuse an attacked model with a safety reference (inside a score run's region), evaluated in the same run.",
))


def run_fuse(overrides: dict[str, Any]) -> str:
    """Fuse an attack run with a safety reference (inside a score run's region); returns the fuse run's id."""
    return run_stage(FUSE, overrides)


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


def alignment_similarities(cfg: FuseConfig, inputs: FuseInputs, run: tracking.StageRun, state: dict,
                           modules: list[str], desc: str) -> tuple[list[float], dict]:
    """Per attacked LoRA module, Safe LoRA's similarity of its update to C = V Vᵀ/‖V‖_F (V = W_ref − W_un, read
    tensor by tensor from the materialized full weights); returns (similarities, {module: C·B})."""
    import torch
    from tqdm.auto import tqdm

    from realign.ops import safe_lora as safe_lora_ops

    reference_dir = reference_weights_dir(cfg, inputs, run.workdir)
    projected, similarities = {}, []
    with streaming_ops.WeightFiles(reference_dir) as ref_files, \
            streaming_ops.WeightFiles(unaligned_dir(cfg, inputs, run.workdir)) as un_files:
        for module in tqdm(modules, desc=desc, unit="module"):
            weight = module.removeprefix("base_model.model.") + ".weight"
            if weight not in ref_files.file_of or weight not in un_files.file_of:
                raise RealignError(f"the adapter adapts {weight}, which the reference or unaligned weights lack",
                                   "pass runs of the same model")
            alignment = ref_files.read(weight).to(torch.float32) - un_files.read(weight).to(torch.float32)
            a, b = state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"]
            projected[module] = safe_lora_ops.projected_b(b, alignment)
            similarities.append(safe_lora_ops.update_similarity(a, b, projected[module]))
    return similarities, projected


def _write_adapter(run: tracking.StageRun, fused: dict, config: dict) -> Path:
    from safetensors.torch import save_file

    out_dir = run.workdir / "fused" / "adapter"
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(fused, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out_dir


def fuse_safe_lora(cfg: FuseConfig, inputs: FuseInputs, run: tracking.StageRun) -> FuseResult:
    """Safe LoRA: B → C·B in the modules `select_modules` picks by similarity, as a PEFT dir."""
    from safetensors.torch import load_file

    from realign.ops import safe_lora as safe_lora_ops

    ft_dir = Path(inputs.finetuned.local_dir)
    state = load_file(str(ft_dir / "adapter_model.safetensors"))
    modules = sorted(nlsr_ops.lora_module_names(state), key=lambda m: _model_position(inputs, m))
    similarities, projected = alignment_similarities(cfg, inputs, run, state, modules, "safe_lora")
    chosen = safe_lora_ops.select_modules(similarities, cfg.safe_lora_select, cfg.safe_lora_tau, cfg.safe_lora_layers)
    fused = dict(state)
    for module, replace in zip(modules, chosen):
        if replace:
            name = f"{module}.lora_B.weight"
            fused[name] = projected[module].to(state[name].dtype).contiguous()
    changed = {name: (int((fused[name] != tensor).sum()), tensor.numel()) for name, tensor in state.items()}
    out_dir = _write_adapter(run, fused, json.loads((ft_dir / "adapter_config.json").read_text()))
    table = {"module": modules, "similarity": similarities, "probability": [float(c) for c in chosen],
             "replaced": chosen}
    return FuseResult(changed, cfg.model, [*inputs.finetuned_chain[:-1], str(out_dir)], out_dir, table)


def fuse_safemerge(cfg: FuseConfig, inputs: FuseInputs, run: tracking.StageRun) -> FuseResult:
    """SafeMERGE: the safety LoRA merged per factor (weights safemerge_weights) into the modules whose similarity is
    below safemerge_tau, the attacked update kept elsewhere; a PEFT dir of scale 1 (lora_alpha = r), as PEFT's
    add_weighted_adapter writes it."""
    from safetensors.torch import load_file

    from realign.ops import safemerge as safemerge_ops

    ft_dir, safety_dir = Path(inputs.finetuned.local_dir), Path(inputs.safety.local_dir)
    state = load_file(str(ft_dir / "adapter_model.safetensors"))
    safety_state = load_file(str(safety_dir / "adapter_model.safetensors"))
    ft_config = json.loads((ft_dir / "adapter_config.json").read_text())
    safety_config = json.loads((safety_dir / "adapter_config.json").read_text())
    modules = sorted(nlsr_ops.lora_module_names(state), key=lambda m: _model_position(inputs, m))
    missing = [m for m in modules if f"{m}.lora_A.weight" not in safety_state]
    if missing:
        raise RealignError(f"the safety adapter has no LoRA factors for {missing[0]}",
                           "pass a safety run trained with the attack's LoRA target modules")
    similarities, _ = alignment_similarities(cfg, inputs, run, state, modules, "safemerge")
    chosen = safemerge_ops.selected_modules(similarities, cfg.safemerge_tau)
    ft_scale = float(ft_config["lora_alpha"]) / float(ft_config["r"])
    safety_scale = float(safety_config["lora_alpha"]) / float(safety_config["r"])
    fused = dict(state)
    for module, merge in zip(modules, chosen):
        a_name, b_name = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
        a, b = safemerge_ops.merged_factors(
            safemerge_ops.LoraFactors(state[a_name], state[b_name], ft_scale),
            safemerge_ops.LoraFactors(safety_state[a_name], safety_state[b_name], safety_scale),
            tuple(cfg.safemerge_weights) if merge else (1.0, 0.0), module, cfg.dare_rate, cfg.dare_seed)
        fused[a_name], fused[b_name] = a.to(state[a_name].dtype).contiguous(), b.to(state[b_name].dtype).contiguous()
    # Changed: the modules whose update B·A differs from the attacked one (a kept module is only rescaled: the
    # new adapter's scale is 1, its factors carry √s each).
    changed = {}
    for module, merge in zip(modules, chosen):
        for part in ("A", "B"):
            name = f"{module}.lora_{part}.weight"
            changed[name] = (state[name].numel() if merge or cfg.dare_rate else 0, state[name].numel())
    out_dir = _write_adapter(run, fused, {**ft_config, "lora_alpha": ft_config["r"]})
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
