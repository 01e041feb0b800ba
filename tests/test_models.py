"""Model sources (tiny, local, hub, smollm2), adapter merging and materializing, LoRA helpers."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # set before huggingface_hub reads it: a stray hub lookup must fail fast

import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from realign import models
from realign.errors import RealignError

USER_CACHE = os.environ.get("REALIGN_CACHE")  # the smollm2 test reuses the real cache, not a temporary one
PROMPT = "Below is an instruction that describes a task.\n\n### Instruction:\nWhat is the capital of France?"


def model_cfg(source="tiny", path=None, name=None, dtype="float32"):
    return SimpleNamespace(
        name=name or source, source=source, path=path, revision=None, dtype=dtype, trust_remote_code=False
    )


TINY = model_cfg("tiny")


@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("realign-cache")


@pytest.fixture(autouse=True)
def use_tiny_cache(tiny_cache, monkeypatch):
    monkeypatch.setenv("REALIGN_CACHE", str(tiny_cache))


@pytest.fixture(scope="module")
def tiny_dir(tiny_cache):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("REALIGN_CACHE", str(tiny_cache))
        return Path(models.resolve_model_dir(TINY))


@pytest.fixture(scope="module")
def prompt_ids(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir)(PROMPT, return_tensors="pt").input_ids


def logits_of(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


def make_adapter(base_dir, out_dir, seed, input_ids):
    """A LoRA adapter with non-zero lora_B (fresh LoRA is a no-op); returns its dir and the PEFT model's logits."""
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    peft_model = get_peft_model(base, models.lora_config(r=4, alpha=8, dropout=0.0, target_modules=None))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    peft_model.eval()
    peft_model.save_pretrained(out_dir)
    return Path(out_dir), logits_of(peft_model, input_ids)


@pytest.fixture(scope="module")
def adapters(tiny_dir, prompt_ids, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    first = make_adapter(tiny_dir, root / "first", seed=1, input_ids=prompt_ids)
    second = make_adapter(tiny_dir, root / "second", seed=2, input_ids=prompt_ids)
    return first, second


# --- tiny -------------------------------------------------------------------------------------------------------


def test_tiny_build_is_deterministic_and_cached(tmp_path, monkeypatch):
    built_dirs = []
    for cache_name in ("a", "b"):
        monkeypatch.setenv("REALIGN_CACHE", str(tmp_path / cache_name))
        torch.manual_seed(123)
        built_dirs.append(Path(models.resolve_model_dir(TINY)))
        # Building seeds a private RNG state: the caller's random stream continues as if nothing happened.
        after_build = torch.rand(3)
        torch.manual_seed(123)
        assert torch.equal(after_build, torch.rand(3))
    first, second = built_dirs
    assert first.name.startswith("tiny-") and first.name == second.name
    first_weights, second_weights = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert first_weights.keys() == second_weights.keys()
    for name, tensor in first_weights.items():
        assert torch.equal(tensor, second_weights[name]), name
    assert (first / "tokenizer.json").read_bytes() == (second / "tokenizer.json").read_bytes()

    # A second resolve reuses the directory instead of rebuilding it.
    modified = (second / "model.safetensors").stat().st_mtime_ns
    assert Path(models.resolve_model_dir(TINY)) == second
    assert (second / "model.safetensors").stat().st_mtime_ns == modified
    assert not [p for p in second.parent.iterdir() if ".tmp-" in p.name]


def test_tiny_architecture(tiny_dir):
    config = AutoModelForCausalLM.from_pretrained(tiny_dir).config
    assert config.model_type == "llama"
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (64, 2, 4)
    assert (config.num_key_value_heads, config.intermediate_size, config.max_position_embeddings) == (2, 128, 512)
    assert config.tie_word_embeddings is False


def test_tiny_tokenizer_round_trips_text(tiny_dir):
    tokenizer = models.load_tokenizer(TINY)
    text = "Below is an instruction that describes a task.\n\n### Response:\nNaïve café — 42 🙂 zebra-quux!"
    assert tokenizer.decode(tokenizer(text).input_ids) == text  # byte-level: any text, no unknown tokens
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.pad_token == "<|pad|>"
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    assert len(tokenizer) == AutoModelForCausalLM.from_pretrained(tiny_dir).config.vocab_size
    # Trained BPE, not raw bytes: the template words are whole tokens.
    assert tokenizer.tokenize(" Instruction") == ["ĠInstruction"]
    assert tokenizer.tokenize(" Response") == ["ĠResponse"]


def test_tiny_model_generates_a_left_padded_batch():
    tokenizer = models.load_tokenizer(TINY)
    tokenizer.padding_side = "left"
    model = models.load_model(TINY)
    batch = tokenizer(["Hello", PROMPT], return_tensors="pt", padding=True)
    output = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert output.shape[0] == 2 and 0 < output.shape[1] - batch.input_ids.shape[1] <= 6
    assert all(isinstance(text, str) for text in tokenizer.batch_decode(output, skip_special_tokens=True))


# --- adapters ---------------------------------------------------------------------------------------------------


def test_load_model_merges_adapter(adapters, prompt_ids):
    (adapter_dir, peft_logits), _ = adapters
    base_logits = logits_of(models.load_model(TINY), prompt_ids)
    merged = models.load_model(TINY, [str(adapter_dir)])
    merged_logits = logits_of(merged, prompt_ids)
    assert type(merged).__name__ == "LlamaForCausalLM"  # a plain transformers model, not a PeftModel
    assert not torch.allclose(merged_logits, base_logits, atol=1e-3)
    torch.testing.assert_close(merged_logits, peft_logits, atol=1e-5, rtol=0)


def test_load_model_merges_every_adapter(adapters, prompt_ids, tmp_path):
    (first_dir, _), (second_dir, _) = adapters
    both = logits_of(models.load_model(TINY, [first_dir, second_dir]), prompt_ids)
    only_first = logits_of(models.load_model(TINY, [first_dir]), prompt_ids)
    assert not torch.allclose(both, only_first, atol=1e-3)
    # Same result when the first merge is saved to disk and the second adapter is applied to that.
    first_merged_dir = models.materialize_merged(TINY, [first_dir], tmp_path / "first-merged")
    stepwise = logits_of(models.load_model(model_cfg("local", path=first_merged_dir), [second_dir]), prompt_ids)
    torch.testing.assert_close(both, stepwise, atol=1e-5, rtol=0)


def test_load_model_freezes_unless_trainable():
    frozen = models.load_model(TINY)
    trainable, total = models.trainable_parameter_count(frozen)
    assert trainable == 0 and total > 0 and not frozen.training
    unfrozen = models.load_model(TINY, trainable=True)
    assert models.trainable_parameter_count(unfrozen) == (total, total) and not unfrozen.training


def test_load_model_rejects_a_directory_without_adapter(tmp_path):
    with pytest.raises(RealignError, match="adapter_config.json"):
        models.load_model(TINY, [str(tmp_path)])


def test_materialize_merged_writes_a_loadable_safetensors_dir(adapters, prompt_ids, tmp_path):
    (adapter_dir, peft_logits), _ = adapters
    out_dir = Path(models.materialize_merged(TINY, [adapter_dir], tmp_path / "merged"))
    assert out_dir == tmp_path / "merged"
    assert (out_dir / "model.safetensors").is_file() and (out_dir / "tokenizer.json").is_file()
    assert not list(out_dir.glob("*.bin")) and not list(out_dir.glob("*.pt"))  # nothing pickled
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir)
    torch.testing.assert_close(logits_of(reloaded, prompt_ids), peft_logits, atol=1e-5, rtol=0)
    assert AutoTokenizer.from_pretrained(out_dir).pad_token == "<|pad|>"


def test_materialize_merged_without_adapters_returns_the_base(tiny_dir, tmp_path):
    assert models.materialize_merged(TINY, [], tmp_path / "unused") == str(tiny_dir)
    assert not (tmp_path / "unused").exists()


# --- LoRA helpers -----------------------------------------------------------------------------------------------


def test_lora_config_and_trainable_parameter_count(tiny_dir):
    config = models.lora_config(r=8, alpha=16, dropout=0.05, target_modules=None)
    assert set(config.target_modules) == set(models.DEFAULT_TARGET_MODULES)
    assert (config.r, config.lora_alpha, config.lora_dropout, config.task_type) == (8, 16, 0.05, "CAUSAL_LM")

    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    _, base_total = models.trainable_parameter_count(base)
    only_q = get_peft_model(base, models.lora_config(r=2, alpha=4, dropout=0.0, target_modules=["q_proj"]))
    trainable, total = models.trainable_parameter_count(only_q)
    # q_proj is 64x64 in each of 2 layers: A is 2x64, B is 64x2.
    assert trainable == 2 * (2 * 64 + 64 * 2)
    assert total == base_total + trainable


# --- other sources, dtype, tokenizer ----------------------------------------------------------------------------


def test_local_source_returns_a_directory_with_config(tiny_dir, prompt_ids):
    local = model_cfg("local", path=str(tiny_dir))
    assert models.resolve_model_dir(local) == str(tiny_dir)
    torch.testing.assert_close(
        logits_of(models.load_model(local), prompt_ids), logits_of(models.load_model(TINY), prompt_ids)
    )


def test_local_source_without_model_raises(tmp_path):
    with pytest.raises(RealignError, match="does not exist"):
        models.resolve_model_dir(model_cfg("local", path=str(tmp_path / "missing")))
    with pytest.raises(RealignError, match="config.json"):
        models.resolve_model_dir(model_cfg("local", path=str(tmp_path)))  # exists, but holds no model
    with pytest.raises(RealignError):
        models.resolve_model_dir(model_cfg("local", path=None))


def test_unknown_source_raises_listing_valid_sources():
    with pytest.raises(RealignError) as raised:
        models.resolve_model_dir(model_cfg("ollama"))
    message = str(raised.value)
    assert "ollama" in message
    assert all(source in message for source in ("smollm2", "hub", "local", "tiny"))


def test_hub_source_returns_the_id_without_network(monkeypatch):
    def refuse_connection(*args, **kwargs):
        raise AssertionError("resolve_model_dir opened a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse_connection)
    hub = model_cfg("hub", path="meta-llama/Meta-Llama-3-8B-Instruct", name="llama3-8b")
    assert models.resolve_model_dir(hub) == "meta-llama/Meta-Llama-3-8B-Instruct"
    with pytest.raises(RealignError, match="no path"):
        models.resolve_model_dir(model_cfg("hub", path=None))


def test_torch_dtype():
    assert models.torch_dtype("float32") is torch.float32
    assert models.torch_dtype("bfloat16") is torch.bfloat16
    assert models.torch_dtype("float16") is torch.float16
    assert models.torch_dtype("auto") == "auto"
    with pytest.raises(RealignError, match="float64"):
        models.torch_dtype("float64")


def test_load_model_uses_configured_dtype():
    model = models.load_model(model_cfg("tiny", dtype="bfloat16"))
    assert next(model.parameters()).dtype is torch.bfloat16


def test_load_tokenizer_falls_back_to_eos_for_padding(tiny_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).pad_token is None
    reloaded = models.load_tokenizer(tmp_path)
    assert reloaded.pad_token == reloaded.eos_token == "<|endoftext|>"


# --- SmolLM2 ----------------------------------------------------------------------------------------------------


def test_smollm2_converts_from_the_wheel_once(monkeypatch):
    if USER_CACHE:
        monkeypatch.setenv("REALIGN_CACHE", USER_CACHE)
    else:
        monkeypatch.delenv("REALIGN_CACHE")
    smollm2 = model_cfg("smollm2", name="smollm2-135m")
    model_dir = Path(models.resolve_model_dir(smollm2))
    assert model_dir == models.cache_dir() / "models" / "smollm2-135m"
    assert (model_dir / "model.safetensors").is_file() and (model_dir / "tokenizer.json").is_file()

    model = models.load_model(smollm2)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (model.config.num_hidden_layers, model.config.hidden_size, model.config.vocab_size) == (30, 576, 49152)
    assert getattr(model.config, "quantization_config", None) is None
    tokenizer = models.load_tokenizer(smollm2)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"
