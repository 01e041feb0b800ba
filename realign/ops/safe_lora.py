"""Safe LoRA (Hsu et al. 2024, arXiv 2405.16833): project an attacked LoRA update onto the alignment subspace in the
layers where it strays from it (pure torch; no MLflow).

Per LoRA module, with W_aligned and W_unaligned the full weights of that linear layer in the aligned and the
unaligned model:
  V = W_aligned − W_unaligned,  C = V Vᵀ / ‖V‖_F  (the paper's and the authors' code's form: ‖V‖_F, not squared, so C
  is not idempotent unless ‖V‖_F = 1),
  ΔW = s·B·A (s = lora_alpha / r), similarity = ⟨C·ΔW, ΔW⟩ / (‖C·ΔW‖‖ΔW‖),
and in the selected modules ΔW is replaced by C·ΔW, i.e. B by C·B (A unchanged), as the authors' code projects
lora_B. Selected (`select_modules`): similarity ≤ τ, or the k least similar modules; the authors' defaults are
`count` with k = 10 and τ = 0.5.

C is never formed: C·B = V (Vᵀ B) / ‖V‖_F, and the similarity is computed from r×r Gram matrices
(⟨P A, Q A⟩_F = Σ (P G) ⊙ Q with G = A Aᵀ), so no out×out or out×in product beyond V itself is held.
A zero norm (C·ΔW = 0 or ΔW = 0) gives similarity 0, as torch's cosine_similarity does.
"""

from __future__ import annotations

import torch


def projected_b(lora_b: torch.Tensor, alignment: torch.Tensor) -> torch.Tensor:
    """C·B in float32, C = V Vᵀ / ‖V‖_F with V = `alignment` (out × in), B = `lora_b` (out × r)."""
    v = alignment.to(torch.float32)
    norm = torch.linalg.matrix_norm(v)
    if float(norm) == 0.0:
        return torch.zeros_like(lora_b, dtype=torch.float32)
    return v @ (v.T @ lora_b.to(torch.float32)) / norm


def _inner(p: torch.Tensor, q: torch.Tensor, gram: torch.Tensor) -> float:
    """⟨P A, Q A⟩_F for G = A Aᵀ."""
    return float(((p @ gram) * q).sum())


def update_similarity(lora_a: torch.Tensor, lora_b: torch.Tensor, projected: torch.Tensor) -> float:
    """cos(C·ΔW, ΔW) with ΔW ∝ B·A and C·ΔW ∝ (C·B)·A (the positive LoRA scale cancels)."""
    a, b = lora_a.to(torch.float32), lora_b.to(torch.float32)
    gram = a @ a.T
    cross = _inner(projected, b, gram)
    norms = (max(_inner(projected, projected, gram), 0.0) * max(_inner(b, b, gram), 0.0)) ** 0.5
    return cross / norms if norms > 0.0 else 0.0


def select_modules(similarities: list[float], select: str, tau: float, count: int) -> list[bool]:
    """Which modules are projected, as the authors' code (IBM/SafeLoRA `projected_weighted`) decides: similarity
    ≤ τ (`threshold`; the paper writes < τ, which differs only at equality), or (`count`) similarity ≤ the
    `count`-th smallest similarity, so modules tied with it are projected too."""
    if select == "threshold":
        return [s <= tau for s in similarities]
    if select == "count":
        if count == 0 or not similarities:
            return [False] * len(similarities)
        cutoff = sorted(similarities)[min(count, len(similarities)) - 1]
        return [s <= cutoff for s in similarities]
    raise ValueError(f"unknown Safe LoRA selection {select!r} (threshold | count)")
