"""Model extrapolation (EXPO, Zheng et al. 2024, arXiv 2404.16792): θ_expo = θ_aligned + α(θ_aligned − θ_sft).

Two exact ways to compute it, depending on how the aligned model was built:

- **LoRA on top of the SFT model** (the aligned adapter was trained on the merged SFT weights, so
  θ_aligned = θ_sft + ΔW_aligned): θ_expo = θ_sft + (1 + α)·ΔW_aligned. With ΔW = s·B·A (s = lora_alpha / r),
  multiplying lora_B alone by (1 + α) multiplies ΔW by (1 + α), so the result is again a LoRA adapter on the SFT
  model: `scale_lora_update(adapter, 1 + alpha)`.
- **Independent models** (e.g. both adapters trained on the base, θ = θ_0 + ΔW): θ_expo = θ_0 + (1 + α)·ΔW_aligned
  − α·ΔW_sft, computed on the merged weights. The stage streams it as task arithmetic (`fusion_plan`:
  θ_sft + (1 + α)(θ_aligned − θ_sft), base θ_sft, λ = 1 + α) tensor by tensor over safetensors files, never
  holding a whole model; `extrapolate(aligned_state, sft_state, alpha)` is the same formula on state dicts.

The seed's form (`expo.form: seed`): the NLSR seed code (`src/expo-lora.py`) multiplies every LoRA tensor, A and
B alike, by 2α (`p = α·p + α·p`). That scales ΔW by (2α)² = 4α², not by (1 + α): at α = 0.9 the update grows 3.24×
instead of 1.9×, at α = 0.5 it is unchanged, and below α = 0.5 it shrinks the alignment (α = 0.1 keeps 4 % of it).
The two agree only at α = (1 + √17)/8 ≈ 0.64. `scale_lora_factors(adapter, 2 * alpha)` computes it;
`seed_update_factor` gives its factor on ΔW, so α values translate between the forms (paper α = 4α_seed² − 1: the
seed's α = 0.9 is the paper's α = 2.24; the paper's α = 0.9 is the seed's α = √1.9 / 2 ≈ 0.689).
"""

from __future__ import annotations

from typing import Mapping, TypeVar

import torch

from realign.ops.merge import FusionPlan, MergeParams, get_merge_method

Weights = TypeVar("Weights", torch.Tensor, Mapping[str, torch.Tensor])


def extrapolate(aligned: Weights, sft: Weights, alpha: float) -> Weights:
    """θ_aligned + α(θ_aligned − θ_sft) for one tensor, or for two state dicts with the same keys and shapes.

    Computed in float32 and cast back to the aligned tensor's dtype: in bfloat16, θ_aligned − θ_sft of two
    merged models would lose most of the small alignment update to rounding.
    """
    if isinstance(aligned, torch.Tensor):
        return _extrapolate_tensor(aligned, sft, alpha, "tensor")
    missing = sorted(set(aligned) ^ set(sft))
    if missing:
        raise ValueError(f"the two state dicts differ in key {missing[0]!r} ({len(missing)} keys differ)")
    return {name: _extrapolate_tensor(aligned[name], sft[name], alpha, name) for name in aligned}


def _extrapolate_tensor(aligned: torch.Tensor, sft: torch.Tensor, alpha: float, name: str) -> torch.Tensor:
    if aligned.shape != sft.shape:
        raise ValueError(f"{name}: shapes differ, {tuple(aligned.shape)} vs {tuple(sft.shape)}")
    if not aligned.is_floating_point():  # integer buffers (position ids and the like) are not weights
        return aligned.clone()
    a = aligned.float()
    return (a + alpha * (a - sft.float())).to(aligned.dtype)


def lora_update_factor(alpha: float) -> float:
    """EXPO's factor on the aligned LoRA update when it sits on the SFT model: θ_sft + (1 + α)·ΔW_aligned."""
    return 1.0 + alpha


def seed_update_factor(alpha: float) -> float:
    """The factor on ΔW that the NLSR seed's code applies (A and B each × 2α): 4α², kept for comparison only."""
    return (2.0 * alpha) ** 2


def scale_lora_factors(adapter_state: Mapping[str, torch.Tensor], factor: float) -> dict[str, torch.Tensor]:
    """Every LoRA A and B tensor × `factor` (the NLSR seed's EXPO with factor = 2α): ΔW × factor²."""
    scaled: dict[str, torch.Tensor] = {}
    for name, tensor in adapter_state.items():
        if not any(part in name for part in (".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B")):
            raise ValueError(f"adapter tensor {name!r} is not a LoRA A/B matrix; its update cannot be scaled")
        scaled[name] = (tensor.float() * factor).to(tensor.dtype)
    return scaled


def scale_lora_update(adapter_state: Mapping[str, torch.Tensor], factor: float) -> dict[str, torch.Tensor]:
    """A PEFT LoRA state dict whose update ΔW = s·B·A is multiplied by `factor`: lora_B scaled, lora_A kept.

    Scaling B alone is exact for plain LoRA, whatever r, lora_alpha or rsLoRA: ΔW is linear in B (a lora_B bias,
    if any, is part of the update too and scales with it). Scaling A and B both would multiply ΔW by factor².
    Other tensors (DoRA magnitude vectors, modules_to_save copies) are not additive updates, so they are refused.
    """
    scaled: dict[str, torch.Tensor] = {}
    for name, tensor in adapter_state.items():
        if ".lora_B." in name or ".lora_embedding_B" in name:
            scaled[name] = (tensor.float() * factor).to(tensor.dtype)
        elif ".lora_A." in name or ".lora_embedding_A" in name:
            scaled[name] = tensor.clone()
        else:
            raise ValueError(f"adapter tensor {name!r} is not a LoRA A/B matrix; its update cannot be scaled")
    if not any(".lora_B." in n or ".lora_embedding_B" in n for n in scaled):
        raise ValueError("the adapter holds no lora_B tensors")
    return scaled


def fusion_plan(alpha: float) -> FusionPlan:
    """EXPO on full weights as a fusion plan for (fine-tuned, reference) = (θ_aligned, θ_sft) on the base θ_sft:
    task arithmetic with weights (1, 0) and λ = 1 + α gives θ_sft + (1 + α)(θ_aligned − θ_sft)
    = θ_aligned + α(θ_aligned − θ_sft). Float32 inside, cast back to θ_aligned's dtype, as `extrapolate`."""
    return FusionPlan(get_merge_method("task_arithmetic"), MergeParams(weights=(1.0, 0.0), scale=1.0 + alpha))
