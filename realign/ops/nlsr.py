"""NLSR's layer selection (Yi et al. 2024, arXiv 2412.12497; the authors' code, xinykou/NLSR
src/safe_lora/inner.py): per module the similarity of the attacked and the reference updates inside the region,
the replacement probabilities from its rank (`adaptive_mask_replace`) or the threshold rule (`mask_replace`), and
the seeded draw. Pure torch; no MLflow.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from realign.ops.regions import FusionRegion


class UpdateSimilarity:
    """cos(u, v) of two updates accumulated chunk by chunk: Σuv / (‖u‖‖v‖).

    Two zero updates count as identical (1.0: nothing to restore); one zero update as unrelated (0.0).
    """

    def __init__(self) -> None:
        self.dot = 0.0
        self.u_sq = 0.0
        self.v_sq = 0.0

    def add(self, u: torch.Tensor, v: torch.Tensor) -> None:
        u64, v64 = u.to(torch.float64).reshape(-1), v.to(torch.float64).reshape(-1)
        self.dot += float(u64 @ v64)
        self.u_sq += float(u64 @ u64)
        self.v_sq += float(v64 @ v64)

    def value(self) -> float:
        if self.u_sq == 0.0 and self.v_sq == 0.0:
            return 1.0
        if self.u_sq == 0.0 or self.v_sq == 0.0:
            return 0.0
        return self.dot / math.sqrt(self.u_sq * self.v_sq)


def replacement_probabilities(similarities: Sequence[float], prune_rate: float, epsilon: float,
                              prefer: str = "dissimilar") -> torch.Tensor:
    """NLSR's per-module replacement probability from the similarity ranking (arXiv 2412.12497; the authors'
    code, `Adaptive_Search_Operation` in xinykou/NLSR src/safe_lora/inner.py).

    Modules are ranked by similarity (stable order for ties); the most similar gets rank n + 1, the least similar
    rank 2; ranks are min-max normalized to r̂ ∈ [0, 1] (1 = most similar) and
    p = (prune_rate − ε) + 2ε·r̂, clipped to [0, 1]: probabilities spread evenly over [prune_rate − ε, prune_rate + ε]
    by rank. ``prefer="similar"`` is the released code literally: the most similar module gets p = prune_rate + ε.
    ``prefer="dissimilar"`` takes r̂ from the other end (the least similar module gets prune_rate + ε), as the paper
    says and the code's own comment states ("the less similar layer will be updated"). A single module gets
    p = prune_rate (the code divides 0 by 0 there).
    """
    if prefer not in ("similar", "dissimilar"):
        raise ValueError(f"prefer must be similar or dissimilar, got {prefer!r}")
    sims = torch.tensor(list(similarities), dtype=torch.float64)
    n = sims.numel()
    if n == 0:
        return sims
    if n == 1:
        return torch.tensor([min(max(prune_rate, 0.0), 1.0)], dtype=torch.float64)
    order = torch.sort(sims, descending=True, stable=True).indices
    ranks = torch.empty(n, dtype=torch.float64)
    ranks[order] = torch.arange(n + 1, 1, -1, dtype=torch.float64)
    normalized = (ranks - ranks.min()) / (ranks.max() - ranks.min())
    if prefer == "dissimilar":
        normalized = 1.0 - normalized
    return ((prune_rate - epsilon) + normalized * (2.0 * epsilon)).clamp(0.0, 1.0)


def below_threshold(similarities: Sequence[float], tau: float) -> torch.Tensor:
    """NLSR's `mask_replace` (`Fusion_Opertions`): replace a module when its similarity is below τ."""
    return torch.tensor([float(s) < tau for s in similarities], dtype=torch.bool)


def sample_replaced(probabilities: torch.Tensor, seed: int) -> torch.Tensor:
    """One Bernoulli draw per module (True = replace), from a generator seeded with `seed` (NLSR seeds torch)."""
    generator = torch.Generator().manual_seed(int(seed))
    return torch.bernoulli(probabilities.to(torch.float64), generator=generator).to(torch.bool)


def lora_module_names(adapter_state: Mapping[str, torch.Tensor]) -> list[str]:
    """The adapted modules of a PEFT LoRA state dict (`...q_proj` for `...q_proj.lora_A.weight`), in file order."""
    return [name.split(".lora_A.")[0] for name in adapter_state if ".lora_A." in name]


def lora_update_similarities(finetuned: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
                             modules: Sequence[str], region: FusionRegion | None) -> list[float]:
    """Per LoRA module cos((B⊙m_B)(A⊙m_A), (B'⊙m_B)(A'⊙m_A)) of the fine-tuned and reference adapters, the masks m
    from a `neurons` region over the adapters' own keys (NLSR's `layer_passing`, step 1); no region = whole A, B."""
    similarities = []
    for module in modules:
        a_name, b_name = f"{module}.lora_A.weight", f"{module}.lora_B.weight"
        a_ft, b_ft, a_ref, b_ref = (t.to(torch.float32) for t in (finetuned[a_name], finetuned[b_name],
                                                                    reference[a_name], reference[b_name]))
        if region is not None:
            a_ft, a_ref = (region.select(a_name, t) if region.covers(a_name) else torch.zeros_like(t) for t in (a_ft, a_ref))
            b_ft, b_ref = (region.select(b_name, t) if region.covers(b_name) else torch.zeros_like(t) for t in (b_ft, b_ref))
        similarity = UpdateSimilarity()
        similarity.add(b_ft @ a_ft, b_ref @ a_ref)
        similarities.append(similarity.value())
    return similarities
