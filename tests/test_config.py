"""Config resolution: presets, overrides, validation errors."""

import pytest

from realign.config import flatten, parse_overrides, resolve_stage_config, to_dict
from realign.stage_configs import AlignConfig
from realign.errors import RealignError
from realign.stages.align import resolve_align_config


def test_recipe_then_model_then_overrides():
    cfg = resolve_align_config({"method": "dpo", "train.learning_rate": "1e-3", "model": "tiny"})
    assert cfg.method == "dpo"
    assert cfg.train.learning_rate == pytest.approx(1e-3)
    assert cfg.train.max_steps == 40  # from conf/align/dpo.yaml
    assert cfg.model.name == "tiny" and cfg.model.source == "tiny"


def test_default_model_is_offline_smollm2():
    cfg = resolve_align_config({"method": "sft"})
    assert cfg.model.name == "smollm2-135m" and cfg.model.source == "smollm2"


def test_gpu_recipe_carries_seed_settings():
    cfg = resolve_align_config({"recipe": "nlsr-simpo", "model": "llama3-8b"})
    assert cfg.method == "simpo"
    assert (cfg.lora.r, cfg.lora.alpha) == (128, 256)
    assert cfg.lora.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert (cfg.train.beta, cfg.train.simpo_gamma, cfg.train.learning_rate) == (2.0, 1.0, 2e-6)
    assert cfg.model.path == "meta-llama/Meta-Llama-3-8B" and cfg.model.trust_remote_code is False
    dpo = resolve_align_config({"recipe": "nlsr-dpo"})
    assert (dpo.train.beta, dpo.train.learning_rate) == (0.1, 2e-6)
    orpo = resolve_align_config({"recipe": "nlsr-orpo"})
    assert (orpo.train.beta, orpo.train.learning_rate) == (0.5, 2e-4)
    sft = resolve_align_config({"recipe": "nlsr-sft"})
    assert (sft.train.learning_rate, sft.train.num_train_epochs) == (1e-4, 3)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"train.lr": "1"}, "unknown config key 'train.lr'"),
        ({"bogus": "1"}, "unknown config key 'bogus'"),
        ({"train.learning_rate": "fast"}, "not a valid float"),
        ({"train.max_steps": "2.5"}, "not a valid int"),
        ({"train.learning_rate": "-1"}, "train.learning_rate must be > 0"),
        ({"data.benign_fraction": "1.5"}, "data.benign_fraction=1.5 is outside"),
        ({"model.dtype": "int3"}, "model.dtype='int3' is not one of"),
        ({"model": "no-such-model"}, "unknown model preset 'no-such-model'"),
        ({"method": "rlhf"}, "unknown align method 'rlhf'"),
        ({"recipe": "no-such-recipe"}, "unknown align preset 'no-such-recipe'"),
        ({"method": "sft", "sft_run": "abc"}, "sft_run was given for method sft"),
        ({"model": "tiny", "model.source": "local"}, "model.path is required"),
    ],
)
def test_bad_values_give_one_line_errors(overrides, fragment):
    with pytest.raises(RealignError) as err:
        resolve_align_config(overrides)
    message = str(err.value)
    assert fragment in message
    assert "\n" not in message


def test_overrides_parse_cli_and_mlflow_styles():
    assert parse_overrides(["--train.beta", "0.2", "--lora.r=8", "data.seed=3"]) == {
        "train.beta": "0.2", "lora.r": "8", "data.seed": "3"}
    with pytest.raises(RealignError):
        parse_overrides(["--train.beta"])


def test_list_values_from_strings():
    cfg = resolve_align_config({"lora.target_modules": "q_proj,v_proj", "model": "tiny"})
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]


def test_flatten_gives_dotted_param_keys():
    flat = flatten(to_dict(AlignConfig()))
    assert "train.learning_rate" in flat and "lora.r" in flat and "model.name" in flat


def test_invalid_yaml_is_reported(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: dpo\n  train: [\n")
    with pytest.raises(RealignError, match="not valid YAML"):
        resolve_stage_config(AlignConfig, "align", str(bad), {})


def test_every_family_is_one_registry_shape_with_one_line_for_an_unknown_name():
    from realign.eval.judges import JUDGES
    from realign.ops.merge import MERGE_METHODS
    from realign.ops.selection import METHODS
    from realign.registry import Registry
    from realign.stages.align import ALIGN_METHODS

    for registry, family in ((ALIGN_METHODS, "align method"), (JUDGES, "judge"), (METHODS, "scoring method"),
                             (MERGE_METHODS, "fusion method")):
        assert isinstance(registry, Registry)
        with pytest.raises(RealignError, match=f"unknown {family} 'nope' — use one of: {registry.names()[0]}"):
            registry.get("nope")
    local = Registry("widget")
    local.register("a", 1)
    with pytest.raises(ValueError, match="registered twice"):
        local.register("a", 2)
    assert list(local) == ["a"] and "a" in local and local["a"] == 1 and len(local) == 1
