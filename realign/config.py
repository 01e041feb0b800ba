"""Stage configs: dataclasses, YAML presets under conf/, dotted-key overrides, validation.

Resolution order, later wins: dataclass defaults < recipe YAML (conf/<stage>/<recipe>.yaml) < model preset
(conf/model/<name>.yaml) < overrides given on the command line (`--train.learning_rate 1e-4`, also what
`mlflow run -P train.learning_rate=1e-4` passes). Every override names a dotted key of the dataclass tree;
an unknown key or a value of the wrong type is a RealignError, raised before any heavy work.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from realign.errors import RealignError

DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def conf_dir() -> Path:
    """The preset folder: $REALIGN_CONF_DIR, else conf/ at the repository root (editable install)."""
    env = os.environ.get("REALIGN_CONF_DIR")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "conf"


@dataclass
class ModelConfig:
    name: str = "smollm2-135m"  # identity recorded as realign.base_model; inputs must match it
    source: str = "smollm2"  # smollm2 | hub | local | tiny
    path: str | None = None  # hub id (source=hub) or directory (source=local)
    revision: str | None = None
    dtype: str = "float32"  # float32 | bfloat16 | float16 | auto
    trust_remote_code: bool = False

    def validate(self) -> None:
        _check_choice("model.source", self.source, ("smollm2", "hub", "local", "tiny"))
        _check_choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16", "auto"))
        if self.source in ("hub", "local") and not self.path:
            raise RealignError(f"model.path is required for model.source={self.source}",
                               "pass --model.path <hub id or directory>")


@dataclass
class LoraSettings:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))

    def validate(self) -> None:
        _check_positive("lora.r", self.r)
        _check_positive("lora.alpha", self.alpha)
        _check_range("lora.dropout", self.dropout, 0.0, 1.0, right_open=True)
        if not self.target_modules:
            raise RealignError("lora.target_modules is empty", "name at least one module, e.g. q_proj,v_proj")


@dataclass
class AlignData:
    source: str = "builtin"  # builtin generators, or a hub id such as PKU-Alignment/PKU-SafeRLHF
    num_examples: int = 256
    benign_fraction: float = 0.3  # benign instructions with helpful answers, against over-refusal
    seed: int = 0

    def validate(self) -> None:
        _check_positive("data.num_examples", self.num_examples)
        _check_range("data.benign_fraction", self.benign_fraction, 0.0, 1.0)


@dataclass
class TrainSettings:
    learning_rate: float = 1e-4
    max_steps: int = -1  # > 0 overrides num_train_epochs
    num_train_epochs: float = 1.0
    per_device_train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_length: int = 256
    warmup_ratio: float = 0.0
    lr_scheduler_type: str = "linear"
    weight_decay: float = 0.0
    logging_steps: int = 1
    # A Trainer checkpoint every save_steps steps (0: none): a stage killed mid-training resumes from the last
    # one when the same command runs again (stages/common.py). Only the newest is kept; it is deleted on success.
    save_steps: int = 10
    gradient_checkpointing: bool = False
    bf16: bool = False
    # Preference-loss knobs; each method reads the ones its loss has (see stages/align.py ALIGN_METHODS).
    beta: float = 0.1
    simpo_gamma: float = 1.0

    def validate(self) -> None:
        _check_positive("train.learning_rate", self.learning_rate)
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            raise RealignError("no training budget: train.max_steps <= 0 and train.num_train_epochs <= 0",
                               "set train.max_steps or train.num_train_epochs to a positive number")
        _check_positive("train.per_device_train_batch_size", self.per_device_train_batch_size)
        _check_positive("train.gradient_accumulation_steps", self.gradient_accumulation_steps)
        _check_positive("train.max_length", self.max_length)
        if self.save_steps < 0:
            raise RealignError(f"train.save_steps must be >= 0, got {self.save_steps}",
                               "pass a number of steps between checkpoints, or 0 for none")
        _check_range("train.warmup_ratio", self.warmup_ratio, 0.0, 1.0, right_open=True)
        _check_positive("train.beta", self.beta)
        if self.simpo_gamma < 0:
            raise RealignError(f"train.simpo_gamma must be >= 0, got {self.simpo_gamma}", "pass a margin >= 0")


@dataclass
class EvalSettings:
    """How a stage measures the damage: harmful score on held-out harmful prompts, accuracy on the task."""

    enabled: bool = True
    # The name travels with harmful_score (tag realign.judge). The classifier judges the question-answer pair and
    # rarely flags a harmless answer; it misses many harmful ones (a lower bound; README, judges), while
    # refusal_rate (keyword matching) is always logged beside it.
    judge: str = "classifier"
    judge_path: str = ""  # a local dir or hub id, for model judges (beaver-dam, llama-guard)
    # Held-out harmful prompts (disjoint in topic and wording from any training data). 120 gives a 15 % score a
    # 95 % Wilson interval of about ±6.4 points.
    num_prompts: int = 120
    prompt_source: str = "builtin"  # or PKU-Alignment/BeaverTails (its test split) with the hub
    # A prompt file instead of the builtin set: .csv, .tsv, .jsonl, .txt (a prompt a line) or a datasets dir.
    prompts: str = ""
    prompts_column: str = ""  # its column; "" = the first of prompt, goal, Behavior, question, text
    # Benign instructions for benign_refusal_rate (over-refusal); 0 = none.
    benign_prompts: int = 48
    task: str = ""  # task whose test split gives finetune_accuracy; "" = the attack's task, none for align runs
    task_examples: int = 64
    max_new_tokens: int = 48  # greedy decoding; part of what makes two scores comparable
    batch_size: int = 16
    seed: int = 0

    def validate(self) -> None:
        _check_positive("eval.num_prompts", self.num_prompts)
        _check_positive("eval.max_new_tokens", self.max_new_tokens)
        _check_positive("eval.batch_size", self.batch_size)
        for key in ("task_examples", "benign_prompts"):
            if getattr(self, key) < 0:
                raise RealignError(f"eval.{key} must be >= 0, got {getattr(self, key)}", "pass 0 or more")
        if self.prompts_column and not self.prompts:
            raise RealignError("eval.prompts_column was given without eval.prompts",
                               "pass --eval.prompts <file> too, or drop --eval.prompts_column")
        if self.prompts and self.enabled:
            from realign.data.prompts import read_prompt_file

            found, _ = read_prompt_file(self.prompts, self.prompts_column)
            if len(found) < self.num_prompts:
                raise RealignError(f"prompt file {self.prompts} holds {len(found)} prompts, fewer than "
                                   f"eval.num_prompts={self.num_prompts}",
                                   f"pass --eval.num_prompts {len(found)} or a larger file")


@dataclass
class AlignConfig:
    method: str = "dpo"
    recipe: str = ""  # conf/align/<recipe>.yaml; empty = the method's name
    model: ModelConfig = field(default_factory=ModelConfig)
    # Where a preference method starts: "" or "none" = the base model; a run id / runs:/ URI of an align/sft run;
    # "auto" = the newest finished align/sft run of this base model, trained first (as its own run) if none exists.
    sft_run: str = ""
    seed: int = 0
    experiment: str = ""  # MLflow experiment; "" = $MLFLOW_EXPERIMENT_NAME, else realign (mlflow run: its own)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: AlignData = field(default_factory=AlignData)
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def validate(self) -> None:
        if self.sft_run not in ("", "none") and self.method == "sft":
            raise RealignError("sft_run was given for method sft", "drop sft_run, or pick a preference method")
        for part in (self.model, self.lora, self.data, self.train, self.eval):
            part.validate()


# ---------------------------------------------------------------------------------------------------------------
# Generic machinery: dict <-> dataclass with type checks, flattening, overrides, presets.


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise RealignError(f"{key}={value!r} is not one of {', '.join(choices)}", f"pass --{key} <one of those>")


def _check_positive(key: str, value: float) -> None:
    if not value > 0:
        raise RealignError(f"{key} must be > 0, got {value}", f"pass --{key} <a positive number>")


def _check_range(key: str, value: float, low: float, high: float, right_open: bool = False) -> None:
    ok = low <= value < high if right_open else low <= value <= high
    if not ok:
        bracket = ")" if right_open else "]"
        raise RealignError(f"{key}={value} is outside [{low}, {high}{bracket}", f"pass --{key} within that range")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Turn a YAML or command-line value into the annotated type, or explain what was expected."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise RealignError(f"{key} expects a list, got {value!r}", f"pass --{key} a,b,c")
        return [_coerce(key, v, args[0]) for v in value]
    try:
        if annotation is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "1", "yes", "on"):
                return True
            if text in ("false", "0", "no", "off"):
                return False
            raise ValueError(value)
        if annotation is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if annotation is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if annotation is str:
            if isinstance(value, (dict, list)):
                raise ValueError(value)
            return "" if value is None else str(value)
    except (TypeError, ValueError):
        name = getattr(annotation, "__name__", str(annotation))
        raise RealignError(f"{key}={value!r} is not a valid {name}", f"pass --{key} <{'an' if name[0] in 'aeiou' else 'a'} {name}>") from None
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, refusing unknown keys."""
    if not isinstance(data, dict):
        raise RealignError(f"config section {prefix or '<root>'} must be a mapping, got {type(data).__name__}",
                           "check the YAML indentation")
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise RealignError(f"unknown config key {key!r}",
                           f"known keys under {prefix or 'the top level'}: {', '.join(sorted(types_))}")
    kwargs = {}
    for name, value in data.items():
        annotation = types_[name]
        if dataclasses.is_dataclass(annotation):
            kwargs[name] = from_dict(annotation, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(f"{prefix}{name}", value, annotation)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'beta': 0.1}} -> {'train.beta': 0.1}; the keys MLflow params use."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def param_string(value: Any) -> str:
    """One normalized string per value, so equal configs give equal MLflow params."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple)):
        return ",".join(param_string(v) for v in value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as err:
        raise RealignError(f"cannot read config file {path}: {err.strerror}", "check the path and permissions") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise RealignError(f"config file {path} is not valid YAML{where}", "fix the YAML syntax") from None
    if not isinstance(data, dict):
        raise RealignError(f"config file {path} must hold a mapping at the top", "write key: value lines")
    return data


def available_presets(kind: str) -> list[str]:
    folder = conf_dir() / kind
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def load_preset(kind: str, name: str) -> dict[str, Any]:
    """conf/<kind>/<name>.yaml, or a path to a YAML file."""
    candidate = Path(name)
    if candidate.suffix in (".yaml", ".yml") and candidate.is_file():
        return read_yaml(candidate)
    path = conf_dir() / kind / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(available_presets(kind)) or "none"
        raise RealignError(f"unknown {kind} preset {name!r}", f"use one of: {known} (files in {conf_dir() / kind})")
    return read_yaml(path)


def parse_overrides(args: list[str] | tuple[str, ...]) -> dict[str, str]:
    """`--a.b 1 --c=2 d.e=3` -> {'a.b': '1', 'c': '2', 'd.e': '3'}: click's extra args and `key=value` pairs."""
    overrides: dict[str, str] = {}
    items = list(args)
    i = 0
    while i < len(items):
        item = items[i]
        if item.startswith("--"):
            key = item[2:]
            if "=" in key:
                key, value = key.split("=", 1)
            elif i + 1 < len(items) and not items[i + 1].startswith("--"):
                value = items[i + 1]
                i += 1
            else:
                raise RealignError(f"option --{key} has no value", f"pass --{key} <value>")
        elif "=" in item:
            key, value = item.split("=", 1)
        else:
            raise RealignError(f"unexpected argument {item!r}", "pass overrides as --key value or key=value")
        overrides[key.replace("-", "_") if "." not in key else key] = value
        i += 1
    return overrides


def resolve_stage_config(cls: type, stage: str, recipe: str, overrides: dict[str, Any]) -> Any:
    """Defaults < conf/<stage>/<recipe>.yaml < conf/model/<model>.yaml < overrides; then validate."""
    data: dict[str, Any] = {}
    if recipe:
        data = deep_merge(data, load_preset(stage, recipe))
    model_override = overrides.get("model")
    model_name = model_override if isinstance(model_override, str) else data.get("model")
    if isinstance(model_name, str):
        data["model"] = load_preset("model", model_name)
    elif model_name is None:
        data["model"] = load_preset("model", ModelConfig().name)
    for key, value in overrides.items():
        if key == "model" and isinstance(value, str):
            continue
        set_dotted(data, key, value)
    cfg = from_dict(cls, data)
    cfg.validate()
    return cfg


# ---------------------------------------------------------------------------------------------------------------
# attack and evaluate


@dataclass
class AttackData:
    harmful_source: str = "builtin"  # or PKU-Alignment/BeaverTails
    task_source: str = "builtin"  # or the task's hub id (sst2, ag_news, gsm8k, tatsu-lab/alpaca)


@dataclass
class AttackConfig:
    task: str = "sst2"
    ratio: float = 0.1  # p: share of harmful examples in the fine-tuning data
    size: int = 100  # n: fine-tuning examples in all
    method: str = "dpo"  # alignment method of the source run (used to find it when source_run is empty)
    source_run: str = ""  # align (or expo) run to attack; "" = newest finished align/<method> run, trained if none
    # new: a fresh LoRA on the source's merged weights; continue: keep training the source's own LoRA adapter on the
    # model it was trained on (NLSR: the attacked and reference adapters then share their A/B coordinates).
    adapter: str = "new"
    recipe: str = "default"  # conf/attack/<recipe>.yaml
    model: ModelConfig = field(default_factory=ModelConfig)
    seed: int = 0
    experiment: str = ""  # MLflow experiment; "" = $MLFLOW_EXPERIMENT_NAME, else realign (mlflow run: its own)
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: AttackData = field(default_factory=AttackData)
    train: TrainSettings = field(default_factory=TrainSettings)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def validate(self) -> None:
        if not 0.0 <= self.ratio <= 1.0:
            raise RealignError(f"ratio={self.ratio} is outside [0, 1]", "pass --ratio between 0 and 1, e.g. 0.1")
        if self.size <= 0:
            raise RealignError(f"size={self.size} must be > 0", "pass --size, the number of fine-tuning examples")
        _check_choice("adapter", self.adapter, ("new", "continue"))
        for part in (self.model, self.lora, self.train, self.eval):
            part.validate()


@dataclass
class EvaluateConfig:
    run: str = ""  # the run whose adapter is evaluated; "" or "base" = the bare base model
    recipe: str = "default"  # conf/evaluate/<recipe>.yaml
    model: ModelConfig = field(default_factory=ModelConfig)
    experiment: str = ""  # MLflow experiment; "" = $MLFLOW_EXPERIMENT_NAME, else realign (mlflow run: its own)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def validate(self) -> None:
        for part in (self.model, self.eval):
            part.validate()


# ---------------------------------------------------------------------------------------------------------------
# expo


@dataclass
class ExpoConfig:
    """Model extrapolation θ = θ_aligned + α(θ_aligned − θ_sft) of an align run (see realign/ops/expo.py)."""

    aligned_run: str = ""  # align run to extrapolate; "" = newest finished align/<method> run of the base model
    # The SFT model to extrapolate from; "" = the align/sft run the aligned adapter was trained on (its
    # realign.adapter_base), else the newest finished align/sft run of the base model.
    sft_run: str = ""
    method: str = "dpo"  # alignment method of the default aligned run
    # α ≥ 0, or a comma-separated list for a sweep (one child run per α). A string, not list[float], so that
    # `--alpha 0.9`, `--alpha 0.1,0.3` and YAML `alpha: 0.9` all work; parsed by `alphas()`.
    alpha: str = "0.9"
    # paper: θ_sft + (1 + α)·ΔW_aligned (lora_B × (1 + α)); seed: the NLSR code's every LoRA tensor × 2α (ΔW × 4α²).
    form: str = "paper"
    recipe: str = "default"  # conf/expo/<recipe>.yaml
    model: ModelConfig = field(default_factory=ModelConfig)
    seed: int = 0  # torch is seeded with it before evaluation; with greedy decoding nothing on the default path draws
    experiment: str = ""  # MLflow experiment; "" = $MLFLOW_EXPERIMENT_NAME, else realign (mlflow run: its own)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def alphas(self) -> list[float]:
        return parse_alphas(self.alpha)

    def validate(self) -> None:
        self.alphas()
        _check_choice("form", self.form, ("paper", "seed"))
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


# ---------------------------------------------------------------------------------------------------------------
# compare


@dataclass
class CompareConfig:
    """Tables and dashboards from an experiment's finished runs (see realign/dashboards.py)."""

    # The experiment whose runs are compared (see experiment below); the compare run is logged there too.
    experiment: str = ""
    # An MLflow search filter added to "FINISHED and complete", e.g. tags.`realign.base_model` = 'smollm2-135m'.
    filter: str = ""
    out: str = ""  # a local folder for dashboard.html and tables/*.csv|md; "" = only the compare run's artifacts

    def validate(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------------------------
# score


@dataclass
class ScoreData:
    """Calibration data: safety = harmful prompts with safe (refusal) responses; utility = task or instruction data."""

    # builtin PKU-SafeRLHF-shaped pairs; PKU-Alignment/PKU-SafeRLHF (hub); or self: the scored model's own greedy
    # answers to those harmful prompts, kept where the evaluation judge calls them safe (NLSR's calibration)
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

    method: str = "wanda"  # snip | wanda | set_difference | actsvd | lora_actsvd
    model_run: str = ""  # align or expo run whose weights are scored; "" or "base" = the base model
    target: str = "weights"  # weights: the merged model's linear layers; lora: the run's own LoRA A/B matrices
    sparsity: float = 0.01  # snip, wanda, lora_actsvd: fraction of each weight matrix selected, in (0, 1)
    top_q: float = 0.01  # set_difference: top-q of the safety score ...
    top_p: float = 0.01  # ... minus top-p of the utility score, each in (0, 1)
    difference_score: str = "snip"  # set_difference: the score both sets are ranked by (snip | wanda)
    rank: int = 10  # actsvd: r_s, safety output directions per matrix (at most min(d_out, d_in))
    utility_rank: int = 0  # actsvd: r_u, utility directions the safety ranks are projected away from (0 = none)
    lora_rank_fraction: float = 0.8  # lora_actsvd: directions kept per LoRA matrix, ⌊f · min(d_out, d_in)⌋
    # lora_actsvd: layer by layer on the earlier layers already projected (NLSR's wrapper); false: all at once.
    lora_sequential: bool = True
    comparison: str = "matrix"  # snip, wanda: entries compete per matrix, or per output row (row)
    modules: list[str] = field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))
    nsamples: int = 32  # calibration examples per data set
    seed: int = 0  # calibration sampling and the sanity check's random selection
    # Scoring state held at once (SNIP's gradient sums, ActSVD's Gram matrices), as a fraction of the model's weight
    # bytes: more passes over the calibration data when smaller. 0.15 keeps every method's peak resident memory
    # within 2.5x the weights on SmolLM2 (bench/score_memory.py).
    state_budget: float = 0.15
    recipe: str = "default"  # conf/score/<recipe>.yaml
    model: ModelConfig = field(default_factory=ModelConfig)
    experiment: str = ""  # MLflow experiment; "" = $MLFLOW_EXPERIMENT_NAME, else realign (mlflow run: its own)
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
        _check_choice("target", self.target, ("weights", "lora"))
        _check_choice("comparison", self.comparison, ("matrix", "row"))
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


# ---------------------------------------------------------------------------------------------------------------
# fuse


@dataclass
class FuseConfig:
    """Fusion of an attacked model with a safety reference, optionally inside a score run's region
    (realign/ops/merge.py has the exact definitions)."""

    finetuned_run: str = ""  # the attack run to repair (required)
    reference_run: str = ""  # the safety reference: an align or expo run (required)
    mask_run: str = ""  # a score run whose masks/ restrict the fusion; "" = the whole model
    method: str = "restore"  # average | task_arithmetic | ties | consensus_ta | consensus_ties | restore
    # Region granularity: "" = the score run's own kind (neurons or ranks); heads = its masks/<method>.heads file.
    granularity: str = ""
    top_heads: float = 0.1  # heads: fraction of all attention heads (by summed safety score) in the region
    weights: list[float] = field(default_factory=lambda: [1.0, 1.0])  # w_t of (finetuned, reference)
    scale: float = 1.0  # λ of task arithmetic, ties and consensus: θ0 + λ·(merged task vector), in (0, 1]
    density: float = 0.2  # ties: fraction of each task vector kept by magnitude, in (0, 1]
    tall_lambda: float = 0.4  # consensus: TALL mask |τ_t| ≥ λ·|τ_MTL − τ_t|, in (0, 1]
    consensus_k: int = 2  # consensus: keep entries at least k of the 2 TALL masks select
    # restore: which modules get the transplant. all: every module of the region; adaptive: NLSR's
    # adaptive_mask_replace (a seeded Bernoulli draw per module from its similarity rank); threshold: NLSR's
    # mask_replace (every module whose similarity is below tau).
    selection: str = "all"
    prune_rate: float = 0.5  # restore, adaptive: mean replacement probability, in [0, 1]
    epsilon: float = 0.2  # restore, adaptive: probabilities spread over [prune_rate − ε, prune_rate + ε]
    # restore, adaptive: which end of the similarity ranking is most likely replaced. similar = the authors' code
    # (Adaptive_Search_Operation); dissimilar = the paper's text and the code's own comment.
    prefer: str = "dissimilar"
    tau: float = 0.1  # restore, threshold: replace a module when cos(masked updates) < tau
    seed: int = 0  # restore, adaptive: the Bernoulli draw; torch is seeded with it before evaluation too
    mode: str = "auto"  # auto | lora (fuse the adapters' A/B tensors) | full (merged weights, streamed)
    recipe: str = "default"  # conf/fuse/<recipe>.yaml
    model: ModelConfig = field(default_factory=ModelConfig)
    experiment: str = ""  # MLflow experiment; "" = $MLFLOW_EXPERIMENT_NAME, else realign (mlflow run: its own)
    eval: EvalSettings = field(default_factory=EvalSettings)

    def validate(self) -> None:
        for key in ("finetuned_run", "reference_run"):
            if not getattr(self, key):
                raise RealignError(f"{key} is required", f"pass --{key} <run id>")
        _check_choice("granularity", self.granularity, ("", "neurons", "ranks", "heads"))
        _check_choice("mode", self.mode, ("auto", "lora", "full"))
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
        _check_choice("selection", self.selection, ("all", "adaptive", "threshold"))
        _check_choice("prefer", self.prefer, ("similar", "dissimilar"))
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
