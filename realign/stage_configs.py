"""Each stage's config: one dataclass per stage, every option a field whose help (and choices) live on the field.

The CLI's options are made from these fields (realign.cli), `check_choices` validates every field that names its
choices, and the MLproject entries' parameters are checked against them (tests/test_cli.py). Shared parts (the model,
LoRA, training and evaluation settings) are in realign.config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from realign.config import (DEFAULT_TARGET_MODULES, AlignData, EvalSettings, LoraSettings, ModelConfig, TrainSettings,
                            _check_positive, _check_range, option)
from realign.errors import RealignError

EXPERIMENT_HELP = ("MLflow experiment of the run and of its default inputs (default: $MLFLOW_EXPERIMENT_NAME, else "
                   "realign; under `mlflow run`, the one it chose with --experiment-name)")


@dataclass
class AlignConfig:
    method: str = option("dpo", "sft | dpo | orpo | kto | simpo (default dpo)")
    recipe: str = option("", "conf/align/<recipe>.yaml (default: the method's name; nlsr-<method> for GPUs)")
    model: ModelConfig = field(default_factory=ModelConfig)
    sft_run: str = option("", "where a preference method starts: a run id or runs:/ URI of an align/sft run; "
                              "auto = the newest finished align/sft run, trained first if none; \"\" or none = the "
                              "base model")
    seed: int = option(0, "data and training seed")
    experiment: str = option("", EXPERIMENT_HELP)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: AlignData = field(default_factory=AlignData)
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def validate(self) -> None:
        if self.sft_run not in ("", "none") and self.method == "sft":
            raise RealignError("sft_run was given for method sft", "drop sft_run, or pick a preference method")
        for part in (self.model, self.lora, self.data, self.train, self.eval):
            part.validate()


@dataclass
class AttackData:
    harmful_source: str = "builtin"  # or PKU-Alignment/BeaverTails
    task_source: str = "builtin"  # or the task's hub id (sst2, ag_news, gsm8k, tatsu-lab/alpaca)


@dataclass
class AttackConfig:
    task: str = option("sst2", "sst2 | ag_news | gsm8k | alpaca (default sst2)")
    ratio: float = option(0.1, "p: share of harmful examples in the fine-tuning data, in [0, 1] (default 0.1)")
    size: int = option(100, "n: number of fine-tuning examples (default 100)")
    method: str = option("dpo", "alignment method of the default source run (default dpo)")
    source_run: str = option("", "align/expo run to attack (default: newest finished align/<method> run, trained "
                                 "if none)")
    adapter: str = option("new", "new (a fresh LoRA on the source's merged weights, default) | continue (keep "
                                 "training the source's own LoRA adapter, as NLSR does)", choices=("new", "continue"))
    recipe: str = option("default", "conf/attack/<recipe>.yaml (default; nlsr for GPUs)")
    model: ModelConfig = field(default_factory=ModelConfig)
    seed: int = option(0, "data mixing and training seed (default 0)")
    experiment: str = option("", EXPERIMENT_HELP)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: AttackData = field(default_factory=AttackData)
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def validate(self) -> None:
        if not 0.0 <= self.ratio <= 1.0:
            raise RealignError(f"ratio={self.ratio} is outside [0, 1]", "pass --ratio between 0 and 1, e.g. 0.1")
        if self.size <= 0:
            raise RealignError(f"size={self.size} must be > 0", "pass --size, the number of fine-tuning examples")
        for part in (self.model, self.lora, self.train, self.eval):
            part.validate()


@dataclass
class EvaluateConfig:
    run: str = option("", "run whose model to evaluate (align, attack, expo, fuse); omit for the base model")
    copy_to_run: bool = option(True, "also put the numbers on the evaluated run (default true; a search's report "
                                     "evaluation keeps the trial's own search-half numbers: false)")
    recipe: str = option("default", "conf/evaluate/<recipe>.yaml (default)")
    model: ModelConfig = field(default_factory=ModelConfig)
    experiment: str = option("", EXPERIMENT_HELP)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def validate(self) -> None:
        for part in (self.model, self.eval):
            part.validate()


@dataclass
class ExpoConfig:
    """Model extrapolation θ = θ_aligned + α(θ_aligned − θ_sft) of an align run (see realign/ops/expo.py)."""

    aligned_run: str = option("", "align run to extrapolate (default: newest finished align/<method> run)")
    sft_run: str = option("", "align/sft run to extrapolate from (default: the one the aligned run was trained "
                              "on, else the newest)")
    method: str = option("dpo", "alignment method of the default aligned run (default dpo)")
    # A string, not list[float], so that `--alpha 0.9`, `--alpha 0.1,0.3` and YAML `alpha: 0.9` all work.
    alpha: str = option("0.9", "α >= 0, or a list 0.1,0.3,0.5,0.9 for a sweep of child runs (default 0.9)")
    form: str = option("paper", "paper (θ_sft + (1 + α)·ΔW, default) | seed (NLSR's code: every LoRA tensor × 2α, "
                                "ΔW × 4α²)", choices=("paper", "seed"))
    recipe: str = option("default", "conf/expo/<recipe>.yaml (default)")
    model: ModelConfig = field(default_factory=ModelConfig)
    seed: int = option(0, "torch seed before evaluation (default 0)")
    experiment: str = option("", EXPERIMENT_HELP)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def alphas(self) -> list[float]:
        return parse_alphas(self.alpha)

    def validate(self) -> None:
        self.alphas()
        if self.method == "sft":
            raise RealignError("method=sft has no aligned run to extrapolate: EXPO goes from the SFT model through "
                               "an aligned one", "pass --method dpo|orpo|kto|simpo or --aligned-run <run id>")
        for part in (self.model, self.eval):
            part.validate()


def parse_alphas(value: str) -> list[float]:
    """'0.9' -> [0.9]; '0.1,0.3,0.5' -> [0.1, 0.3, 0.5]; each α finite, ≥ 0 and listed once."""
    text = str(value).strip().strip("[]")
    items = [item.strip() for item in text.split(",")]
    if not text or any(not item for item in items):
        raise RealignError(f"alpha={value!r} is not a list of numbers", "pass --alpha 0.9 or --alpha 0.1,0.3,0.5,0.9")
    alphas: list[float] = []
    for item in items:
        try:
            alpha = float(item)
        except ValueError:
            raise RealignError(f"alpha={value!r} is not a list of numbers ({item!r} is not a number)",
                               "pass --alpha 0.9 or --alpha 0.1,0.3,0.5,0.9") from None
        if not math.isfinite(alpha):
            raise RealignError(f"alpha={item} is not finite", "pass a number >= 0, e.g. --alpha 0.9")
        if alpha < 0:
            raise RealignError(f"alpha={item} is negative: α < 0 moves back towards the SFT model",
                               "pass α >= 0 (α = 0 is the aligned model itself), e.g. --alpha 0.9")
        if alpha in alphas:
            raise RealignError(f"alpha={value!r} lists {item} twice", "list each α once")
        alphas.append(alpha)
    return alphas


@dataclass
class CompareConfig:
    """Tables and dashboards from an experiment's finished runs (see realign/dashboards.py)."""

    experiment: str = option("", "MLflow experiment whose runs are compared and that holds the compare run "
                                 "(default: $MLFLOW_EXPERIMENT_NAME, else realign; under `mlflow run`, its own)")
    filter: str = option("", "MLflow search filter on top of FINISHED and complete, e.g. "
                             "\"tags.`realign.base_model` = 'smollm2-135m'\"")
    out: str = option("", "local folder for dashboard.html and tables/*.csv|md (default: only the compare run)")

    def validate(self) -> None:
        pass


@dataclass
class ScoreData:
    """Calibration data: safety = harmful prompts with safe (refusal) responses; utility = task or instruction data."""

    # builtin PKU-SafeRLHF-shaped pairs; PKU-Alignment/PKU-SafeRLHF (hub); or self: the scored model's own greedy
    # answers to those harmful prompts, kept where the evaluation judge calls them safe (NLSR's calibration);
    # harmful / hub-harmful: the same prompts with the pairs' harmful answers (Antidote's calibration)
    safety_source: str = "builtin"
    utility: str = "benign"  # benign instructions with answers, or a task: sst2 | ag_news | gsm8k | alpaca
    utility_source: str = "builtin"  # for a task: builtin, hub, or the task's hub id
    max_length: int = 256  # tokens per example (prompt + response), cut at the end
    batch_size: int = 4

    def validate(self) -> None:
        if self.max_length < 2:
            raise RealignError(f"data.max_length must be >= 2, got {self.max_length}", "pass e.g. --data.max_length 256")
        _check_positive("data.batch_size", self.batch_size)


@dataclass
class ScoreConfig:
    """Safety-critical weights of a model as masks (realign/ops/neurons.py has the exact definitions)."""

    method: str = option("wanda", "snip | wanda (default) | set_difference | actsvd | lora_actsvd")
    model_run: str = option("", "align, expo or attack run whose weights are scored (default: the base model)")
    target: str = option("weights", "weights (the merged model, default) | lora (the run's own LoRA A/B matrices)",
                         choices=("weights", "lora"))
    sparsity: float = option(0.01, "fraction of each weight matrix selected, in (0, 1) (snip, wanda, lora_actsvd)")
    top_q: float = option(0.01, "set_difference: top-q of the safety score, in (0, 1)")
    top_p: float = option(0.01, "set_difference: minus the top-p of the utility score, in (0, 1)")
    difference_score: str = option("snip", "set_difference: the score both sets are ranked by",
                                   choices=("snip", "wanda"))
    rank: int = option(10, "actsvd: safety ranks r_s per matrix (at most min(d_out, d_in))")
    utility_rank: int = option(0, "actsvd: utility ranks r_u the safety ranks are projected away from (0 = none)")
    lora_rank_fraction: float = option(0.8, "lora_actsvd: directions kept per LoRA matrix, ⌊f · min(d_out, d_in)⌋")
    lora_sequential: bool = option(True, "lora_actsvd: layer by layer on the earlier layers already projected "
                                         "(NLSR's wrapper); false: every layer on the original model")
    comparison: str = option("matrix", "snip, wanda: entries compete per matrix, or per output row",
                             choices=("matrix", "row"))
    modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    nsamples: int = option(32, "calibration examples per data set")
    seed: int = option(0, "calibration sampling and the sanity check's random selection (default 0)")
    # Scoring state held at once (SNIP's gradient sums, ActSVD's Gram matrices), as a fraction of the model's weight
    # bytes: more passes over the calibration data when smaller. 0.15 keeps every method's peak resident memory
    # within 2.5x the weights on SmolLM2 (bench/score_memory.py).
    state_budget: float = 0.15
    recipe: str = option("default", "conf/score/<recipe>.yaml (default; nlsr for GPUs)")
    model: ModelConfig = field(default_factory=ModelConfig)
    experiment: str = option("", EXPERIMENT_HELP)
    data: ScoreData = field(default_factory=ScoreData)
    # The sanity check: harmful score of the model, of the model with the selected weights zeroed (ranks removed),
    # and with a random selection of the same size zeroed. eval.enabled=false skips it.
    eval: EvalSettings = field(default_factory=EvalSettings)

    def validate(self) -> None:
        for key in ("sparsity", "top_q", "top_p"):
            value = getattr(self, key)
            if not 0.0 < value < 1.0:
                raise RealignError(f"{key}={value} is outside (0, 1)",
                                   f"pass --{key} as the fraction of each weight matrix to select, e.g. 0.01")
        if self.rank < 1:
            raise RealignError(f"rank={self.rank} must be >= 1", "pass --rank, the safety ranks per matrix, e.g. 10")
        if self.utility_rank < 0:
            raise RealignError(f"utility_rank={self.utility_rank} must be >= 0", "pass 0 or more")
        if not 0.0 < self.lora_rank_fraction <= 1.0:
            raise RealignError(f"lora_rank_fraction={self.lora_rank_fraction} is outside (0, 1]",
                               "pass e.g. --lora_rank_fraction 0.8")
        _check_positive("nsamples", self.nsamples)
        _check_positive("state_budget", self.state_budget)
        if not self.modules:
            raise RealignError("modules is empty", "name at least one linear layer, e.g. q_proj,v_proj")
        for part in (self.model, self.data, self.eval):
            part.validate()


@dataclass
class FuseConfig:
    """Fusion of an attacked model with a safety reference, optionally inside a score run's region
    (realign/ops/merge.py has the exact definitions)."""

    finetuned_run: str = option("", "attack run to repair (required)")
    reference_run: str = option("", "safety reference: an align or expo run (required; antidote reads none)")
    mask_run: str = option("", "score run whose region restricts the fusion (optional; antidote: required)")
    unaligned_run: str = option("", "resta, safe_lora: the unaligned model of the safety vector θ_ref − θ_un: "
                                    "any run, or base (default: the base model)")
    safety_run: str = option("", "safemerge: the safety LoRA merged into the straying modules, a run whose adapter "
                                 "sits on the attacked adapter's base with its rank and targets (required there)")
    method: str = option("restore", "restore (default) | average | task_arithmetic | ties | consensus_ta | "
                                    "consensus_ties | resta | antidote | safe_lora | safemerge")
    granularity: str = option("", "neurons | ranks (the score run's own kind, default) | heads",
                              choices=("", "neurons", "ranks", "heads"))
    top_heads: float = option(0.1, "heads: fraction of all attention heads (by summed safety score) in the region")
    weights: list[float] = option(None, "w of (finetuned, reference), e.g. 1,1", factory=lambda: [1.0, 1.0])
    scale: float = option(1.0, "λ of task arithmetic / ties / consensus, in (0, 1] (default 1)")
    density: float = option(0.2, "ties: fraction of each task vector kept, in (0, 1] (default 0.2)")
    tall_lambda: float = option(0.4, "consensus: TALL mask λ, in (0, 1] (default 0.4)")
    consensus_k: int = option(2, "consensus: masks that must agree, 1 or 2")
    selection: str = option("all", "restore: which modules get the transplant: all (default) | adaptive (NLSR's "
                                   "adaptive_mask_replace draw) | threshold (NLSR's mask_replace: similarity < tau)",
                            choices=("all", "adaptive", "threshold"))
    prune_rate: float = option(0.5, "adaptive: mean replacement probability (0.5)")
    epsilon: float = option(0.2, "adaptive: probability spread ε around it (default 0.2)")
    prefer: str = option("dissimilar", "adaptive: similar (the authors' code: most similar modules most likely) | "
                                       "dissimilar (the paper's text, default)", choices=("similar", "dissimilar"))
    tau: float = option(0.1, "threshold: replace modules whose similarity is below it (default 0.1)")
    seed: int = option(0, "adaptive: seed of the draw (default 0)")
    gamma: float = option(1.0, "resta: scale γ of the safety vector, > 0 (default 1: aligned +1, unaligned −1)")
    dare_rate: float = option(0.0, "DARE drop rate p in [0, 1) for resta and the task-arithmetic methods (0 = off)")
    dare_seed: int = option(0, "DARE: seed of the drop (default 0)")
    safe_lora_select: str = option("count", "safe_lora: project the safe_lora_layers least similar modules (count, "
                                            "default, as the authors' code) or those with similarity <= "
                                            "safe_lora_tau (threshold)", choices=("threshold", "count"))
    safe_lora_tau: float = option(0.5, "safe_lora, select=threshold: similarity threshold τ in [-1, 1] (default 0.5)")
    safe_lora_layers: int = option(10, "safe_lora, select=count: modules projected (default 10)")
    safemerge_tau: float = option(0.35, "safemerge: merge the modules whose similarity is below τ, in [-1, 1] "
                                        "(default 0.35, the authors' code's)")
    safemerge_weights: list[float] = option(None, "safemerge: (w_finetuned, w_safety) in the merged modules "
                                                  "(default 0.8,0.2, the authors' code's)",
                                            factory=lambda: [0.8, 0.2])
    mode: str = option("auto", "auto (default) | lora (fuse the adapters' A/B tensors) | full (merged weights)",
                       choices=("auto", "lora", "full"))
    recipe: str = option("default", "conf/fuse/<recipe>.yaml (default)")
    model: ModelConfig = field(default_factory=ModelConfig)
    experiment: str = option("", EXPERIMENT_HELP)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def validate(self) -> None:
        if not self.finetuned_run:
            raise RealignError("finetuned_run is required", "pass --finetuned_run <run id>")
        if self.method == "antidote":
            if not self.mask_run:
                raise RealignError("antidote zeroes a region and needs one",
                                   "pass --mask_run <score run of the attacked model with data.safety_source=harmful>")
            if self.reference_run:
                raise RealignError("antidote reads no reference (it sets the region to zero)", "drop --reference_run")
        elif not self.reference_run:
            raise RealignError("reference_run is required", "pass --reference_run <run id>")
        if self.unaligned_run and self.method not in ("resta", "safe_lora", "safemerge"):
            raise RealignError(f"unaligned_run is read by resta, safe_lora and safemerge, not {self.method}",
                               "drop --unaligned_run, or pass --method resta | safe_lora | safemerge")
        if self.method == "safemerge" and not self.safety_run:
            raise RealignError("safemerge merges a safety LoRA and needs one",
                               "pass --safety_run <run with a LoRA adapter on the attack's base, e.g. the aligned "
                               "adapter an --adapter continue attack started from>")
        if self.safety_run and self.method != "safemerge":
            raise RealignError(f"safety_run is read by safemerge, not {self.method}",
                               "drop --safety_run, or pass --method safemerge")
        if self.method == "safemerge":
            if not (math.isfinite(self.safemerge_tau) and -1.0 <= self.safemerge_tau <= 1.0):
                raise RealignError(f"safemerge_tau={self.safemerge_tau} is outside [-1, 1] (a cosine similarity)",
                                   "pass e.g. --safemerge_tau 0.35")
            weights = self.safemerge_weights
            if len(weights) != 2 or any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
                raise RealignError(f"safemerge_weights={weights} must be two numbers >= 0 (finetuned, safety), not "
                                   "both 0", "pass --safemerge_weights 0.8,0.2")
        if not (math.isfinite(self.gamma) and self.gamma > 0):
            raise RealignError(f"gamma={self.gamma} must be > 0", "pass e.g. --gamma 0.5")
        if not (math.isfinite(self.dare_rate) and 0.0 <= self.dare_rate < 1.0):
            raise RealignError(f"dare_rate={self.dare_rate} is outside [0, 1)", "pass e.g. --dare_rate 0.3, or 0 for none")
        if self.dare_rate and self.method in ("restore", "antidote", "safe_lora"):
            raise RealignError(f"dare_rate drops task-vector entries; {self.method} has no task vector to drop",
                               "drop --dare_rate, or use resta or a task-arithmetic method")
        if not (math.isfinite(self.safe_lora_tau) and -1.0 <= self.safe_lora_tau <= 1.0):
            raise RealignError(f"safe_lora_tau={self.safe_lora_tau} is outside [-1, 1] (a cosine similarity)",
                               "pass e.g. --safe_lora_tau 0.5")
        if self.safe_lora_layers < 0:
            raise RealignError(f"safe_lora_layers={self.safe_lora_layers} must be >= 0", "pass e.g. --safe_lora_layers 10")
        for key in ("scale", "density", "tall_lambda", "top_heads"):
            value = getattr(self, key)
            if not (math.isfinite(value) and 0.0 < value <= 1.0):
                raise RealignError(f"{key}={value} is outside (0, 1]", f"pass --{key} within (0, 1]")
        if len(self.weights) != 2 or any(not math.isfinite(w) or w < 0 for w in self.weights) or sum(self.weights) <= 0:
            raise RealignError(f"weights={self.weights} must be two numbers >= 0 (finetuned, reference), not both 0",
                               "pass --weights 1,1")
        if not 1 <= self.consensus_k <= 2:
            raise RealignError(f"consensus_k={self.consensus_k} is outside [1, 2] (two models are fused)",
                               "pass --consensus_k 1 or 2")
        if not (math.isfinite(self.tau) and -1.0 <= self.tau <= 1.0):
            raise RealignError(f"tau={self.tau} is outside [-1, 1] (a cosine similarity)", "pass e.g. --tau 0.1")
        if self.selection != "all" and self.method != "restore":
            raise RealignError(f"selection={self.selection} chooses modules for restore, not {self.method}",
                               "drop --selection, or pass --method restore")
        _check_range("prune_rate", self.prune_rate, 0.0, 1.0)
        if not (math.isfinite(self.epsilon) and 0.0 <= self.epsilon <= min(self.prune_rate, 1.0 - self.prune_rate)):
            raise RealignError(f"epsilon={self.epsilon} must be in [0, min(prune_rate, 1 − prune_rate)] = "
                               f"[0, {min(self.prune_rate, 1.0 - self.prune_rate):g}]",
                               "pass a smaller --epsilon, e.g. 0.2 with --prune_rate 0.5")
        for part in (self.model, self.eval):
            part.validate()
