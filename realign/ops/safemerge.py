"""SafeMERGE (Djuhera et al. 2025, arXiv 2503.17239): merge a safety LoRA into the attacked LoRA only in the modules
whose attacked update strays from the alignment subspace (pure torch; no MLflow).

As the authors' code runs it (GitHub aladinD/SafeMERGE, `utils.py` `SafeLoRAMerger.add_weighted_adapter_safelora`):
- Per LoRA module, the Safe LoRA similarity of the attacked update (`realign.ops.safe_lora.update_similarity`:
  cos(C·ΔW, ΔW), C = V Vᵀ/‖V‖_F, V = W_aligned − W_unaligned). The code rounds it to 5 decimals; realign does not.
- Selected: similarity < τ (strict; code default τ = 0.35). Selected modules take the weights (w_ft, w_safe)
  (code default [0.8, 0.2]); every other module takes (1, 0), i.e. keeps the attacked update.
- The merge is PEFT's `add_weighted_adapter` per factor (`_generalized_task_arithmetic_weighted_adapter`), not a
  merge of the products: with s_i = lora_alpha_i / r the adapters' scales,
      A = Σ_i sign(w_i s_i)·√|w_i s_i|·A_i,   B = Σ_i √|w_i s_i|·B_i,
  in a new adapter of the same rank with lora_alpha = r (scale 1). So B·A = Σ_i w_i s_i B_i A_i plus the cross
  terms √(w_ft s_ft w_safe s_safe)(B_ft A_safe + B_safe A_ft); in a module with weights (1, 0) B·A = s_ft B_ft A_ft
  exactly. The paper writes the merge as a weighted sum of the two updates; the code's factor merge is what the
  defaults follow (offered alone: the authors' results come from it).
- `dare_linear` (code option; realign: `dare_rate` p > 0): each factor A_ft, A_safe, B_ft, B_safe is DARE'd first
  (entries dropped with probability p, survivors × 1/(1 − p)), in every module, the kept ones too, as PEFT's
  `dare_linear` does; realign's drop is the seeded counter-based draw of `realign.ops.dare` (PEFT's is an unseeded
  `torch.bernoulli`). The paper's TIES variant is not in the authors' code and is not offered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from realign.ops.dare import EntryPosition, drop_and_rescale

AUTHORS_TAU = 0.35
AUTHORS_WEIGHTS = (0.8, 0.2)


@dataclass(frozen=True)
class LoraFactors:
    """One module's LoRA update s·B·A: A (r × in), B (out × r) and the scale s = lora_alpha / r."""

    a: torch.Tensor
    b: torch.Tensor
    scale: float


def selected_modules(similarities: list[float], tau: float) -> list[bool]:
    """SafeMERGE merges where the attacked update's similarity is below τ (strict, as the authors' code)."""
    return [s < tau for s in similarities]


def factor_coefficients(weight: float, scale: float) -> tuple[float, float]:
    """(coefficient of A, coefficient of B) of one adapter in PEFT's per-factor weighted merge."""
    scaled = weight * scale
    root = math.sqrt(abs(scaled))
    return (root if scaled >= 0 else -root), root


def merged_factors(finetuned: LoraFactors, safety: LoraFactors, weights: tuple[float, float], module: str,
                   dare_rate: float = 0.0, dare_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) of the merged module for a scale-1 adapter, in float32; `module` names its tensors for the DARE draw
    (`<module>.lora_A.weight`, model 0 = finetuned, 1 = safety)."""
    if finetuned.a.shape != safety.a.shape or finetuned.b.shape != safety.b.shape:
        raise ValueError(f"{module}: the adapters' factors differ in shape ({tuple(finetuned.a.shape)} vs "
                         f"{tuple(safety.a.shape)})")
    merged = {}
    for part in ("a", "b"):
        total = None
        for index, (factors, weight) in enumerate(((finetuned, weights[0]), (safety, weights[1]))):
            tensor = getattr(factors, part).to(torch.float32)
            name = f"{module}.lora_{part.upper()}.weight"
            tensor = drop_and_rescale(tensor, dare_rate, dare_seed, EntryPosition(name), model=index)
            coefficient = factor_coefficients(weight, factors.scale)[0 if part == "a" else 1]
            total = coefficient * tensor if total is None else total + coefficient * tensor
        merged[part] = total
    return merged["a"], merged["b"]
