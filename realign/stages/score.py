"""`score` stage: the weights that carry safety, saved as masks the fuse stage pulls by run id.

Scores the weights of an align or expo run (or of the base model) with one method of `realign.ops.neurons`
(snip, wanda, set_difference, actsvd, lora_actsvd; the definitions are there) on calibration data logged as run
inputs: safety = harmful prompts with safe (refusal) responses, utility = benign instructions or a task.
`target=weights` scores the linear layers of the merged model (keys = state_dict names), `target=lora` the run's
own LoRA A/B matrices (keys = its adapter file's keys).

The run (`score/<method>`) holds `masks/<method>.safetensors` (a region file, see `realign.ops.masks`: bool masks,
or for actsvd the safety/utility bases), for element-wise methods on weights also `masks/<method>.heads.safetensors`
(each attention head's summed safety score), the selected fraction per layer and per module as metrics, a heat map
`figures/selection.html`, and the sanity check of Wei et al.: harmful score of the model, with the selected weights
zeroed (actsvd: the safety ranks removed, W − PW), and with a random selection of the same size zeroed.
Every input is checked before a model is loaded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from realign import data, models, tracking
from realign.config import resolve_stage_config
from realign.stage_configs import ScoreConfig
from realign.errors import RealignError
from realign.ops import masks
from realign.ops import neurons, selection
from realign.eval.judges import check_judge
from realign.stages.base import Input, Stage, register, run_stage
from realign.stages.evaluate import evaluate_model, generation_precision

SCORED_STAGES = ("align", "expo", "attack")  # attack: Antidote scores the attacked model
SANITY_VARIANTS = ("zeroed_selected", "zeroed_random")
TAG_SCORES_FROM = "realign.scores_from"  # the score run whose SNIP/Wanda scores this run selected from
# Settings that only choose from the scores, not what the scores are: runs differing only in these can share them.
SELECTION_ONLY = ("method", "sparsity", "top_q", "top_p", "comparison", "difference_score", "model_run")

_KEPT_SCORES: selection.ScoreMemo | None = None  # set by keep_scores(), around a search's trials


@contextlib.contextmanager
def keep_scores(budget_bytes: int):
    """Within it, the SNIP and Wanda scores a score run computes are kept in memory (up to `budget_bytes`) for the
    next score runs of the same model with the same calibration settings, which then only select from them (the run
    is tagged `realign.scores_from` with the run that computed them). A search opens it around its trials."""
    global _KEPT_SCORES
    previous, _KEPT_SCORES = _KEPT_SCORES, selection.ScoreMemo(budget_bytes)
    try:
        yield _KEPT_SCORES
    finally:
        _KEPT_SCORES = previous


def scores_key(cfg: ScoreConfig, weights: "ScoredWeights") -> str:
    """What determines a run's element-wise scores: the scored run (its artifacts never change) and every setting
    but those that only select from the scores."""
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in SELECTION_ONLY}
    return json.dumps({"scored_run": weights.run_id or "base", **settings}, sort_keys=True, default=str)


def resolve_score_config(overrides: dict[str, Any]) -> ScoreConfig:
    cfg = resolve_stage_config(ScoreConfig, "score", overrides.get("recipe") or "default", overrides)
    if cfg.method not in selection.METHODS:
        raise RealignError(f"unknown scoring method {cfg.method!r}", f"use one of: {', '.join(selection.METHODS)}")
    method = selection.METHODS[cfg.method]
    if cfg.target not in method.targets:
        other = "lora" if cfg.target == "weights" else "weights"
        raise RealignError(f"method {cfg.method} does not score target={cfg.target}",
                           f"pass --target {other}, or a method that scores {cfg.target}")
    if cfg.difference_score not in selection.ELEMENTWISE_SCORES:
        raise RealignError(f"difference_score={cfg.difference_score!r} is not one of "
                           f"{', '.join(selection.ELEMENTWISE_SCORES)}", "pass --difference_score snip or wanda")
    if cfg.data.utility != "benign" and cfg.data.utility not in data.TASKS:
        raise RealignError(f"data.utility={cfg.data.utility!r} is neither benign nor a task",
                           f"use benign or one of: {', '.join(data.TASKS)}")
    if cfg.eval.enabled:
        check_judge(cfg.eval.judge)
    return cfg


def score_settings(cfg: ScoreConfig, num_heads: int = 0, state_budget_bytes: int = 0) -> selection.ScoreSettings:
    return selection.ScoreSettings(
        sparsity=cfg.sparsity, top_q=cfg.top_q, top_p=cfg.top_p, difference_score=cfg.difference_score,
        safety_rank=cfg.rank, utility_rank=cfg.utility_rank, lora_rank_fraction=cfg.lora_rank_fraction,
        lora_sequential=cfg.lora_sequential, comparison=cfg.comparison, num_heads=num_heads, state_budget_bytes=state_budget_bytes or selection.ScoreSettings.state_budget_bytes)


@dataclass
class ScoredWeights:
    """Where the scored model comes from: base config + adapters to merge, and (target lora) the adapter scored."""

    model_cfg: Any
    merged_adapters: list[str]
    lora_dir: str | None  # target lora: the run's own adapter, loaded unmerged on top of the merged model
    run_id: str  # "" for the base model


def score_body(run: tracking.StageRun, cfg: ScoreConfig) -> None:
    """Score one run's weights (or the base model's), log the region, and check it by removing it."""
    method = selection.METHODS[cfg.method]
    run.set_name(f"score/{cfg.method}")
    run.set_tags({tracking.TAG_METHOD: cfg.method})
    weights = resolve_weights(cfg, run)
    own_answers = cfg.data.safety_source == "self"
    safety_rows = None if own_answers else safety_calibration(cfg)
    utility_rows = utility_calibration(cfg) if method.uses_utility(score_settings(cfg)) else None
    if own_answers:
        check_judge(cfg.eval.judge)
    else:
        run.log_dataset(safety_rows, name=f"score-safety-{cfg.data.safety_source}", context="calibration-safety")
    if utility_rows is not None:
        run.log_dataset(utility_rows, name=f"score-utility-{cfg.data.utility}", context="calibration-utility")

    # The heavy part starts only now, after every check passed.
    model, base_config = load_scored_model(weights)
    tokenizer = models.load_tokenizer(weights.model_cfg)
    modules = scored_modules(model, cfg, weights)
    if own_answers:
        safety_rows, kept = own_safe_answers(cfg, model, tokenizer)
        run.log_params({"data.self_answers": kept["answered"], "data.self_kept": kept["kept"]})
        run.log_dataset(safety_rows, name="score-safety-self", context="calibration-safety")
    memo = _KEPT_SCORES
    hits_before, too_big_before = (len(memo.hits), len(memo.too_big)) if memo else (0, 0)
    region, seconds, examples = score_calibrated(cfg, model, base_config, tokenizer, modules, safety_rows,
                                                 utility_rows, memo, scores_key(cfg, weights), run.run_id)
    if memo and len(memo.hits) > hits_before:
        origin = memo.hits[-1][1]
        run.set_tags({TAG_SCORES_FROM: origin})
        print(f"score/{cfg.method}: the {method.name} scores of run {origin} reused (same model and calibration); "
              "selected anew", file=sys.stderr)
    if memo and len(memo.too_big) > too_big_before:
        print(f"score/{cfg.method}: its scores exceed the {memo.budget_bytes / 2**30:.1f} GB kept across runs; "
              "every trial scores again (raise kept_scores_gb to keep them)", file=sys.stderr)
    metadata = {"realign.method": cfg.method, "realign.target": cfg.target, "realign.base_model": cfg.model.name,
                "realign.architecture": masks.architecture_id(base_config),
                "realign.source.model": weights.run_id or "base"}
    mask_path = write_region(run, cfg.method, region, metadata)
    run.log_metrics({"score_seconds": seconds, "seconds_per_sample": seconds / max(examples, 1)})
    log_selection(run, region, modules)
    if cfg.eval.enabled:
        sanity_check(run, cfg, mask_path, model, tokenizer, modules)


def score_calibrated(cfg: ScoreConfig, model, base_config, tokenizer, modules, safety_rows, utility_rows,
                     kept: selection.ScoreMemo | None = None, key: str = "", origin: str = ""):
    """(the region, seconds it took, calibration examples) of the method on these calibration rows; with `kept`,
    element-wise scores held under `key` are selected from instead of computed (and kept, from `origin`)."""
    safety = calibration_batches(tokenizer, safety_rows, cfg)
    utility = calibration_batches(tokenizer, utility_rows, cfg) if utility_rows is not None else []
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    num_heads = base_config.num_attention_heads if cfg.target == "weights" else 0
    settings = score_settings(cfg, num_heads, int(cfg.state_budget * weight_bytes))
    settings.memo, settings.memo_key, settings.memo_origin = kept, key, origin
    start = time.perf_counter()
    region = selection.score_region(cfg.method, model, modules, safety, utility, settings)
    seconds = time.perf_counter() - start
    check_region(region.tensors, region.kind, modules, f"method {cfg.method}")
    return region, seconds, neurons.count_examples(safety) + neurons.count_examples(utility)


SCORE = register(Stage(
    "score", ScoreConfig, resolve_score_config, score_body,
    inputs=(Input("model_run", "model", SCORED_STAGES, absent=("", "base")),),
    summary="Safety-critical weights (SNIP, Wanda, set difference, ActSVD, NLSR's LoRA ActSVD) as masks.",
))


def run_score(overrides: dict[str, Any]) -> str:
    """Score one run's weights (or the base model's) and log the masks; returns the run id."""
    return run_stage(SCORE, overrides)


# ---------------------------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------------------------


def resolve_weights(cfg: ScoreConfig, run: tracking.StageRun) -> ScoredWeights:
    """Check the scored run and download what rebuilds its weights; no model is loaded here."""
    if cfg.model_run in ("", "base"):
        if cfg.target == "lora":
            raise RealignError("the base model has no LoRA adapter to score",
                               "pass --model-run <align or expo run id>, or --target weights")
        return ScoredWeights(cfg.model, [], None, "")
    source = run.resolve_input(cfg.model_run, "model", SCORED_STAGES, cfg.model.name, artifact=None)
    model_cfg, adapters = run.model_of(source, cfg.model)
    if cfg.target == "weights":
        return ScoredWeights(model_cfg, adapters, None, source.run_id)
    if not adapters:
        raise RealignError(f"model run {source.run_id} holds full weights (realign.output=model), no LoRA adapter",
                           "score it with --target weights")
    return ScoredWeights(model_cfg, adapters[:-1], adapters[-1], source.run_id)


def safety_calibration(cfg: ScoreConfig):
    """Harmful prompts (Alpaca template) with their safe, refusing responses (or, for `harmful` and
    `hub-harmful`, with their harmful, compliant ones)."""
    from datasets import Dataset

    n, seed, source = cfg.nsamples, cfg.seed, cfg.data.safety_source
    if source in ("builtin", "harmful"):
        rows = data.pku_saferlhf("train", n, seed)
        # harmful: the compliant answer of each pair (Antidote scores the attacked model on harmful answers)
        pick = (lambda row: row["safer_response_id"]) if source == "builtin" else (lambda row: 1 - row["safer_response_id"])
        pairs = [(row["prompt"], row[f"response_{pick(row)}"]) for row in rows]
    else:
        from realign.data import hub

        hub_id = source.removesuffix("-harmful")
        rows = hub.load_safety_pairs(hub.SAFERLHF_ID if hub_id == "hub" else hub_id, "train", n, seed)
        column = "unsafe_response" if source.endswith("-harmful") else "safe_response"
        pairs = [(row["prompt"], row[column]) for row in rows]
    return Dataset.from_dict({"prompt": [data.format_prompt(p) for p, _ in pairs], "response": [r for _, r in pairs]})


def own_safe_answers(cfg: ScoreConfig, model, tokenizer):
    """NLSR's calibration: the scored model's own greedy answers to harmful training prompts, kept where the
    evaluation judge calls them safe; (rows, counts). Twice `nsamples` prompts are answered so that up to
    `nsamples` safe answers remain; fewer are used (and counted) when the model complies more often."""
    from datasets import Dataset

    from realign.eval import generate_responses, get_judge

    rows = data.pku_saferlhf("train", 2 * cfg.nsamples, cfg.seed)
    questions = [row["prompt"] for row in rows]
    with generation_precision(model, cfg.eval):
        answers = generate_responses(model, tokenizer, [data.format_prompt(q) for q in questions],
                                     max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size)
    judge = get_judge(cfg.eval.judge, **({"judge_path": cfg.eval.judge_path} if cfg.eval.judge_path else {}))
    flags = judge.judge(questions, answers)
    kept = [(q, a) for q, a, flagged in zip(questions, answers, flags) if not flagged and a.strip()][:cfg.nsamples]
    if not kept:
        raise RealignError(f"data.safety_source=self: the judge {cfg.eval.judge} flagged every one of the model's "
                           f"{len(questions)} answers, so no safe answer is left to calibrate on",
                           "use data.safety_source=builtin, or score a safer model")
    dataset = Dataset.from_dict({"prompt": [data.format_prompt(q) for q, _ in kept], "response": [a for _, a in kept]})
    return dataset, {"answered": len(questions), "kept": len(kept)}


def utility_calibration(cfg: ScoreConfig):
    """Benign instructions with helpful answers, or a task's training examples (Alpaca template)."""
    from datasets import Dataset

    n, seed = cfg.nsamples, cfg.seed
    if cfg.data.utility == "benign":
        rows = data.benign_instructions("train", n, seed)
        pairs = [(data.format_prompt(row["instruction"], row["input"]), row["output"]) for row in rows]
    else:
        rows = data.load_task(cfg.data.utility, "train", n, seed, source=cfg.data.utility_source)
        pairs = [data.format_task_example(cfg.data.utility, row)[:2] for row in rows]
    return Dataset.from_dict({"prompt": [p for p, _ in pairs], "response": [r for _, r in pairs]})


def calibration_batches(tokenizer, rows, cfg: ScoreConfig) -> list[neurons.CalibrationBatch]:
    """Prompt tokens as the model sees them at generation time, then the response and eos (the scored part).

    An example longer than data.max_length keeps its response and the end of its prompt (see `neurons.collate`)."""
    examples = []
    for prompt, response in zip(rows["prompt"], rows["response"]):
        prompt_ids = tokenizer(prompt)["input_ids"]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append((prompt_ids, response_ids))
    return neurons.collate(examples, tokenizer.pad_token_id, cfg.data.max_length, cfg.data.batch_size)


# ---------------------------------------------------------------------------------------------------------------
# The scored model
# ---------------------------------------------------------------------------------------------------------------


def load_scored_model(weights: ScoredWeights):
    """(model, the base transformers config): merged weights, with the scored LoRA adapter unmerged on top."""
    model = models.load_model(weights.model_cfg, weights.merged_adapters)
    base_config = model.config
    if weights.lora_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, weights.lora_dir)
        model.eval()
        model.requires_grad_(False)
    return model, base_config


def scored_modules(model, cfg: ScoreConfig, weights: ScoredWeights) -> list[neurons.ScoredModule]:
    modules = neurons.find_scored_modules(model, cfg.modules, cfg.target)
    if not modules:
        where = "the LoRA adapter" if cfg.target == "lora" else "the model's decoder layers"
        raise RealignError(f"{where} has no linear layer named {', '.join(cfg.modules)}",
                           "pass --modules with names the model has, e.g. q_proj,v_proj")
    if weights.lora_dir is not None:
        from safetensors import safe_open

        with safe_open(str(Path(weights.lora_dir) / "adapter_model.safetensors"), framework="pt") as handle:
            adapter_keys = set(handle.keys())
        missing = [m.key for m in modules if m.key not in adapter_keys]
        if missing:
            raise RealignError(f"LoRA layer {missing[0]} is not in the run's adapter file",
                               "score a standard PEFT LoRA adapter")
    return modules


def check_region(tensors: dict, kind: str, modules: list[neurons.ScoredModule], what: str) -> None:
    """Every mask or basis must fit a scored weight of this model: else one line, before anything uses it."""
    shapes = {m.key: tuple(m.weight.shape) for m in modules}
    try:
        masks.check_region_shapes(tensors, kind, shapes)
    except ValueError as err:
        raise RealignError(f"{what}: {err}", "the region was made for another model; score this model") from None
    if kind == "neurons":
        missing = sorted(set(shapes) - set(tensors))
        if missing:
            raise RealignError(f"{what}: no mask for {missing[0]}", "score every weight of the model")


# ---------------------------------------------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------------------------------------------


def write_region(run: tracking.StageRun, method: str, region: selection.Selection, metadata: dict[str, str]) -> Path:
    """masks/<method>.safetensors (+ masks/<method>.heads.safetensors) in the run; the local path of the first."""
    folder = run.workdir / "masks"
    path = masks.save_region(folder / f"{method}.safetensors", region.tensors, region.kind, metadata)
    if region.heads:
        masks.save_region(folder / f"{method}.heads.safetensors", region.heads, "heads", metadata)
    run.log_dir(folder, "masks")
    return path


def selection_table(region: selection.Selection, modules: list[neurons.ScoredModule]) -> dict[tuple[int, str], float]:
    """(layer, module kind) -> fraction selected (neurons: entries; ranks: ranks of min(d_out, d_in))."""
    return {(m.layer, m.kind): region.selected[m.key] / max(region.totals[m.key], 1) for m in modules}


def log_selection(run: tracking.StageRun, region: selection.Selection, modules: list[neurons.ScoredModule]) -> None:
    """Selected fraction per layer, per module kind and overall, the count, and a layers × modules heat map."""
    import plotly.graph_objects as go

    metrics: dict[str, float] = {}
    for group, key_of in (("layer", lambda m: f"layer_{m.layer}"), ("module", lambda m: m.kind)):
        selected: dict[str, int] = {}
        totals: dict[str, int] = {}
        for m in modules:
            selected[key_of(m)] = selected.get(key_of(m), 0) + region.selected[m.key]
            totals[key_of(m)] = totals.get(key_of(m), 0) + region.totals[m.key]
        metrics.update({f"selected_fraction/{name}": selected[name] / max(totals[name], 1) for name in selected})
    count, total = sum(region.selected.values()), sum(region.totals.values())
    metrics.update({"selected_count": count, "selected_fraction": count / max(total, 1)})
    run.log_metrics(metrics)

    table = selection_table(region, modules)
    layers = sorted({m.layer for m in modules})
    kinds = list(dict.fromkeys(m.kind for m in modules))
    unit = "ranks" if region.kind == "ranks" else "weights"
    figure = go.Figure(go.Heatmap(
        z=[[table.get((layer, kind)) for kind in kinds] for layer in layers], x=kinds, y=layers,
        colorscale="Reds", colorbar={"title": f"selected {unit}"},
        hovertemplate="layer %{y} %{x}: %{z:.4f}<extra></extra>"))
    figure.update_layout(title=f"Selected fraction of each weight's {unit}", xaxis_title="module",
                         yaxis_title="layer")
    run.log_figure(figure, "figures/selection.html")


# ---------------------------------------------------------------------------------------------------------------
# Sanity check
# ---------------------------------------------------------------------------------------------------------------


def sanity_check(run: tracking.StageRun, cfg: ScoreConfig, mask_path: Path, model, tokenizer,
                 modules: list[neurons.ScoredModule]) -> dict[str, float]:
    """Harmful score of the model as scored, with the region removed, and with a random region of the same size.

    The region is read back from the file just written (what fuse reads). Neurons: the selected entries are zeroed,
    against as many random entries of each matrix; ranks: W − PW with P = (I − U_u U_uᵀ) U_s U_sᵀ, against a random
    orthonormal projection of the same rank. Each removal is undone before the next, so the model ends as it began.
    """
    import torch

    tensors, metadata = masks.load_region(mask_path)
    kind = metadata["realign.kind"]
    check_region(tensors, kind, modules, f"mask {mask_path.name}")
    generator = torch.Generator().manual_seed(cfg.seed)

    baseline = evaluate_model(model, tokenizer, cfg.eval)
    run.set_tags(baseline.identity)
    run.log_table(baseline.table, "eval/generations.json")
    numbers = dict(baseline.metrics)
    for variant in SANITY_VARIANTS:
        undo = [remove(scored.weight) for scored, remove in _removals(tensors, kind, modules, variant, generator)]
        try:
            result = evaluate_model(model, tokenizer, cfg.eval)
        finally:
            for restore in undo:
                restore()
        run.log_table(result.table, f"eval/{variant}.json")
        for name in ("harmful_score", "refusal_rate", "benign_refusal_rate"):
            for key, value in result.metrics.items():
                if key == name or key.startswith(f"{name}_ci95_") or key == f"{name}_n":
                    numbers[key.replace(name, f"{name}_{variant}", 1)] = value
    run.log_metrics(numbers)
    return numbers


def _removals(tensors: dict, kind: str, modules: list[neurons.ScoredModule], variant: str, generator):
    """(module, remove) pairs: `remove(weight)` takes the region (or a random one of the same size) out of the
    weight in place and returns its undo."""
    for scored in modules:
        if kind == "neurons":
            mask = tensors[scored.key]
            if variant == "zeroed_random":
                mask = selection.random_like_mask(mask, generator)
            yield scored, lambda w, m=mask: selection.zero_masked(w, m)
        else:
            safety_basis = tensors[f"{scored.key}{masks.BASIS_SEPARATOR}safety"]
            utility_basis = tensors[f"{scored.key}{masks.BASIS_SEPARATOR}utility"]
            if variant == "zeroed_random":
                rank = masks.projection_rank(safety_basis, utility_basis)
                basis = selection.random_basis(safety_basis.shape[0], rank, generator)
                yield scored, lambda w, b=basis: selection.remove_rank_region(w, b, b)
            else:
                left = masks.projection_factor(safety_basis, utility_basis)
                yield scored, lambda w, lf=left, b=safety_basis: selection.remove_rank_region(w, lf, b)
