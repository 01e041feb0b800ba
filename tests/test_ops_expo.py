"""realign.ops.expo: the EXPO formula on tensors, state dicts and LoRA adapters, against hand-computed numbers."""

import math

import pytest
import torch

from realign.ops import expo


def test_extrapolate_a_tensor_by_hand():
    aligned = torch.tensor([1.0, 2.0, -1.0])
    sft = torch.tensor([0.5, 2.0, 1.0])
    # 1 + 0.5·(1 − 0.5) = 1.25;  2 + 0.5·0 = 2;  −1 + 0.5·(−1 − 1) = −2
    assert torch.equal(expo.extrapolate(aligned, sft, 0.5), torch.tensor([1.25, 2.0, -2.0]))
    assert torch.equal(expo.extrapolate(aligned, sft, 0.0), aligned), "α = 0 is the aligned model"


def test_extrapolate_state_dicts_keeps_dtypes_and_untouched_weights():
    aligned = {"w": torch.tensor([[3.0, 0.0]]), "same": torch.tensor([7.0]), "ids": torch.tensor([1, 2])}
    sft = {"w": torch.tensor([[1.0, 1.0]]), "same": torch.tensor([7.0]), "ids": torch.tensor([1, 2])}
    out = expo.extrapolate(aligned, sft, 0.9)
    # 3 + 0.9·2 = 4.8;  0 + 0.9·(−1) = −0.9
    assert torch.allclose(out["w"], torch.tensor([[4.8, -0.9]]))
    assert torch.equal(out["same"], aligned["same"]) and torch.equal(out["ids"], aligned["ids"])
    assert out["ids"].dtype == torch.int64


def test_extrapolate_keeps_a_bfloat16_model_in_bfloat16():
    aligned = torch.tensor([1.0078125], dtype=torch.bfloat16)  # 1 + 2⁻⁷: one bfloat16 step above 1
    sft = torch.tensor([1.0], dtype=torch.bfloat16)
    out = expo.extrapolate(aligned, sft, 1.0)
    assert out.dtype == torch.bfloat16 and out.item() == 1.015625  # 1 + 2·2⁻⁷


def test_independent_adapters_give_one_plus_alpha_aligned_minus_alpha_sft():
    # θ_a = θ0 + ΔA, θ_s = θ0 + ΔS  →  θ_a + α(θ_a − θ_s) = θ0 + (1 + α)ΔA − αΔS
    theta0, delta_a, delta_s, alpha = torch.tensor([10.0]), torch.tensor([2.0]), torch.tensor([1.0]), 0.5
    out = expo.extrapolate(theta0 + delta_a, theta0 + delta_s, alpha)
    assert out.item() == pytest.approx(10.0 + 1.5 * 2.0 - 0.5 * 1.0)  # 12.5


def test_refuses_mismatched_state_dicts():
    with pytest.raises(ValueError, match="differ in key 'b'"):
        expo.extrapolate({"a": torch.zeros(1)}, {"a": torch.zeros(1), "b": torch.zeros(1)}, 0.5)
    with pytest.raises(ValueError, match="shapes differ"):
        expo.extrapolate({"a": torch.zeros(2)}, {"a": torch.zeros(3)}, 0.5)


PREFIX = "base_model.model.model.layers.0.self_attn.q_proj"


def _adapter():
    a = torch.tensor([[1.0, 2.0]])  # r = 1, in = 2
    b = torch.tensor([[3.0], [-1.0]])  # out = 2
    return {f"{PREFIX}.lora_A.weight": a, f"{PREFIX}.lora_B.weight": b}


def test_scale_lora_update_scales_b_only_and_the_update_by_the_factor():
    state = _adapter()
    scaled = expo.scale_lora_update(state, expo.lora_update_factor(0.9))
    assert torch.equal(scaled[f"{PREFIX}.lora_A.weight"], state[f"{PREFIX}.lora_A.weight"])
    assert torch.allclose(scaled[f"{PREFIX}.lora_B.weight"], torch.tensor([[5.7], [-1.9]]))
    # ΔW = B·A = [[3, 6], [−1, −2]]; EXPO at α = 0.9 makes it 1.9·ΔW = [[5.7, 11.4], [−1.9, −3.8]]
    delta = scaled[f"{PREFIX}.lora_B.weight"] @ scaled[f"{PREFIX}.lora_A.weight"]
    assert torch.allclose(delta, torch.tensor([[5.7, 11.4], [-1.9, -3.8]]))
    assert torch.equal(state[f"{PREFIX}.lora_B.weight"], torch.tensor([[3.0], [-1.0]])), "input left untouched"


def test_the_seed_code_scales_the_update_by_four_alpha_squared_not_one_plus_alpha():
    state = _adapter()
    # What the NLSR seed does: every LoRA tensor, A and B, times 2α.
    alpha = 0.9
    seed_delta = (2 * alpha * state[f"{PREFIX}.lora_B.weight"]) @ (2 * alpha * state[f"{PREFIX}.lora_A.weight"])
    delta = state[f"{PREFIX}.lora_B.weight"] @ state[f"{PREFIX}.lora_A.weight"]
    assert torch.allclose(seed_delta, 3.24 * delta) and expo.seed_update_factor(alpha) == pytest.approx(3.24)
    assert expo.lora_update_factor(alpha) == pytest.approx(1.9)
    assert expo.seed_update_factor(0.5) == pytest.approx(1.0), "the seed's α = 0.5 changes nothing"
    crossing = (1 + math.sqrt(17)) / 8
    assert expo.seed_update_factor(crossing) == pytest.approx(expo.lora_update_factor(crossing))


def test_scale_lora_update_refuses_tensors_that_are_not_lora_matrices():
    state = {**_adapter(), f"{PREFIX}.lora_magnitude_vector.default.weight": torch.ones(2)}
    with pytest.raises(ValueError, match="not a LoRA A/B matrix"):
        expo.scale_lora_update(state, 1.9)
    with pytest.raises(ValueError, match="no lora_B"):
        expo.scale_lora_update({f"{PREFIX}.lora_A.weight": torch.ones(1, 2)}, 1.9)


def test_scale_lora_factors_is_the_seed_code_on_every_tensor():
    state = _adapter()
    scaled = expo.scale_lora_factors(state, 2 * 0.9)
    assert torch.allclose(scaled[f"{PREFIX}.lora_A.weight"], 1.8 * state[f"{PREFIX}.lora_A.weight"])
    assert torch.allclose(scaled[f"{PREFIX}.lora_B.weight"], 1.8 * state[f"{PREFIX}.lora_B.weight"])
    delta = scaled[f"{PREFIX}.lora_B.weight"] @ scaled[f"{PREFIX}.lora_A.weight"]
    # ΔW = [[3, 6], [−1, −2]] times 3.24
    assert torch.allclose(delta, torch.tensor([[9.72, 19.44], [-3.24, -6.48]]))
    with pytest.raises(ValueError, match="not a LoRA A/B matrix"):
        expo.scale_lora_factors({**state, f"{PREFIX}.lora_magnitude_vector.default.weight": torch.ones(2)}, 1.8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_expo_plan_is_the_extrapolation_formula(tmp_path, dtype):
    """The stage's merged mode streams `fusion_plan(α)` over safetensors files, in small row chunks; the result is
    θ_aligned + α(θ_aligned − θ_sft) (to float32 rounding: (1 + α)-scaling and α-adding round differently)."""
    from safetensors.torch import load_file, save_file

    from realign.ops import streaming

    gen = torch.Generator().manual_seed(0)
    sft = {"w": torch.randn(7, 5, generator=gen).to(dtype), "b": torch.randn(5, generator=gen).to(dtype),
           "ids": torch.arange(4)}
    aligned = {name: (t + 0.01 * torch.randn(t.shape, generator=gen)).to(dtype) if t.is_floating_point() else t
               for name, t in sft.items()}
    for name, state in (("aligned", aligned), ("sft", sft)):
        (tmp_path / name).mkdir()
        save_file(state, str(tmp_path / name / "model.safetensors"))
    with streaming.WeightFiles(tmp_path / "aligned") as a, streaming.WeightFiles(tmp_path / "sft") as s:
        streaming.stream_fusion(expo.fusion_plan(0.9), streaming.StreamInputs(a, s, base=s), tmp_path / "out",
                                chunk_elements=10)
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    expected = expo.extrapolate(aligned, sft, 0.9)
    assert set(out) == set(expected)
    for name, tensor in expected.items():
        assert out[name].dtype == tensor.dtype, name
        step = 1e-6 if dtype == torch.float32 else 2e-2  # one bfloat16 step at |θ| ≈ 2
        torch.testing.assert_close(out[name], tensor, atol=step, rtol=0)
    assert torch.equal(out["ids"], sft["ids"]), "integer tensors are copied"
