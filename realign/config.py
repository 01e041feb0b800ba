"""Stage configs: dataclasses, YAML presets under conf/, dotted-key overrides, validation.

Resolution order, later wins: dataclass defaults < recipe YAML (conf/<stage>/<recipe>.yaml) < model preset
(conf/model/<name>.yaml) < overrides given on the command line (`--train.learning_rate 1e-4`, also what
`mlflow run -P train.learning_rate=1e-4` passes). Every override names a dotted key of the dataclass tree;
an unknown key or a value of the wrong type is a RealignError, raised before any heavy work.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from realign.errors import RealignError

DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def option(default: Any, help: str, choices: tuple[str, ...] = (), factory: Any = None) -> Any:
    """A config field with its help text (the CLI option's) and, when it has a fixed set, its choices."""
    metadata = {"help": help, "choices": tuple(choices)}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


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
    judge: str = option("classifier", "classifier (default) | keyword | beaver-dam | llama-guard")
    judge_path: str = option("", "local dir or hub id of a model judge (beaver-dam, llama-guard)")
    # Held-out harmful prompts (disjoint in topic and wording from any training data). 120 gives a 15 % score a
    # 95 % Wilson interval of about ±6.4 points.
    num_prompts: int = 120
    prompt_source: str = "builtin"  # or PKU-Alignment/BeaverTails (its test split) with the hub
    # A prompt file instead of the builtin set: .csv, .tsv, .jsonl, .txt (a prompt a line) or a datasets dir.
    prompts: str = ""
    prompts_column: str = ""  # its column; "" = the first of prompt, goal, Behavior, question, text
    # Benign instructions for benign_refusal_rate (over-refusal); 0 = none.
    benign_prompts: int = 48
    task: str = option("", "task whose test split gives finetune_accuracy (default: the attack's task; none for "
                           "align runs)")
    task_examples: int = 64
    # Half of the chosen prompts, split by prompt id (even / odd last hex digit of SHA-256): `search` for choosing
    # settings, `report` for the numbers reported about the chosen ones; `all` (default) keeps every prompt.
    prompt_split: str = option("all", "all (default) | search | report: the half of the prompts, by prompt id",
                               choices=("all", "search", "report"))
    max_new_tokens: int = 48  # greedy decoding; part of what makes two scores comparable
    # Rows per generation batch: only speed (rows that end leave the batch; the text is the same for any size).
    # 64 generates 1.9x faster than 16 on 2 CPU cores (SmolLM2, 120 prompts, 48 tokens: 27 s against 53 s).
    batch_size: int = 64
    # Generation under bf16 autocast (the weights stay as loaded): part of the decoding label, so scores made both
    # ways are never compared as one. bench/eval_precision.py measures its speed and its paired effect on scores.
    bf16: bool = option(False, "generate under bf16 autocast: about 2x faster on a CPU with AVX512-BF16; a "
                               "different decoding, recorded in realign.decoding")
    seed: int = 0

    def validate(self) -> None:
        from realign.data.tasks import check_task
        from realign.eval.judges import check_judge

        check_judge(self.judge)
        check_task(self.task)
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


# ---------------------------------------------------------------------------------------------------------------
# Options: help and choices live on the field (the CLI and the checks read them)


def check_choices(cfg: Any, prefix: str = "") -> None:
    """Every field that names its choices holds one of them (nested configs too)."""
    for spec in dataclasses.fields(cfg):
        value = getattr(cfg, spec.name)
        if dataclasses.is_dataclass(value):
            check_choices(value, f"{prefix}{spec.name}.")
        elif spec.metadata.get("choices"):
            _check_choice(f"{prefix}{spec.name}", value, spec.metadata["choices"])


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


def field_type(cls: type, dotted: str) -> Any:
    """The annotation of option `dotted` (eval.judge: the nested field) of config class `cls`, None when it has none."""
    head, _, rest = dotted.partition(".")
    types = _field_types(cls)
    if head not in types:
        return None
    if not rest:
        return types[head]
    return field_type(types[head], rest) if dataclasses.is_dataclass(types[head]) else None


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
    has_model = "model" in {spec.name for spec in dataclasses.fields(cls)}
    model_override = overrides.get("model")
    model_name = model_override if isinstance(model_override, str) else data.get("model")
    if has_model and isinstance(model_name, str):
        data["model"] = load_preset("model", model_name)
    elif has_model and model_name is None:
        data["model"] = load_preset("model", ModelConfig().name)
    for key, value in overrides.items():
        if key == "model" and isinstance(value, str):
            continue
        set_dotted(data, key, value)
    cfg = from_dict(cls, data)
    check_choices(cfg)
    cfg.validate()
    return cfg
