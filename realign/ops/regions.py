"""Regions: where a fusion method may change weights (pure torch; no MLflow). Outside a region the fine-tuned
weights stay bit-identical.

- ``neurons``: a bool mask per parameter;
- ``ranks``: θ_ft + P(θ_method − θ_ft) with P the ActSVD projection of `masks.rank_projection`;
- ``heads``: the top fraction of attention heads by summed safety score, as q_proj rows and o_proj columns
  (`head_masks`).
The method is computed on the whole tensor first (TIES trims over the whole tensor), then restricted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from realign.ops.masks import BASIS_SEPARATOR, rank_projection


@dataclass
class FusionRegion:
    """Where fusion may change weights: per parameter name a bool mask (neurons, heads) or a projection (ranks)."""

    kind: str  # "neurons" | "ranks" | "heads"
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # neurons, heads: bool, the parameter's shape
    projections: dict[str, torch.Tensor] = field(default_factory=dict)  # ranks: P (d_out × d_out), float32

    def covers(self, name: str) -> bool:
        return name in self.masks or name in self.projections

    def restrict(self, name: str, fused: torch.Tensor, finetuned: torch.Tensor,
                 rows: slice | None = None) -> torch.Tensor:
        """The fused values inside the region, the fine-tuned ones (bit-identical) outside.

        `rows` selects the mask rows of a row chunk; projections act on whole tensors only.
        """
        if name in self.masks:
            mask = self.masks[name] if rows is None else self.masks[name][rows]
            return torch.where(mask, fused, finetuned)
        if name in self.projections:
            if rows is not None:
                raise ValueError(f"{name}: a rank region projects whole tensors, not row chunks")
            return restrict_to_ranks(self.projections[name], fused, finetuned)
        return finetuned

    def select(self, name: str, values: torch.Tensor, rows: slice | None = None) -> torch.Tensor:
        """The part of `values` (an update) inside the region: masked entries or the projection P·values."""
        if name in self.masks:
            mask = self.masks[name] if rows is None else self.masks[name][rows]
            return torch.where(mask, values, 0.0)
        if name in self.projections:
            return self.projections[name] @ values.to(torch.float32)
        return torch.zeros_like(values)


def restrict_to_ranks(projection: torch.Tensor, fused: torch.Tensor, finetuned: torch.Tensor) -> torch.Tensor:
    """θ_ft + P(θ_fused − θ_ft): only the fused change that lies in the region's output directions."""
    ft32 = finetuned.to(torch.float32)
    return (ft32 + projection @ (fused.to(torch.float32) - ft32)).to(finetuned.dtype)


def region_from_file(tensors: Mapping[str, torch.Tensor], kind: str) -> FusionRegion:
    """A `neurons` or `ranks` region from a region file's tensors (`masks.load_region`)."""
    if kind == "neurons":
        return FusionRegion("neurons", masks={name: t.to(torch.bool) for name, t in tensors.items()})
    if kind == "ranks":
        names = sorted({key.split(BASIS_SEPARATOR)[0] for key in tensors})
        projections = {}
        for name in names:
            safety = tensors.get(f"{name}{BASIS_SEPARATOR}safety")
            if safety is None:
                raise ValueError(f"rank region entry {name!r} has no {name}{BASIS_SEPARATOR}safety basis")
            utility = tensors.get(f"{name}{BASIS_SEPARATOR}utility", safety.new_zeros(safety.shape[0], 0))
            projections[name] = rank_projection(safety, utility)
        return FusionRegion("ranks", projections=projections)
    raise ValueError(f"a {kind!r} region file is not read by region_from_file; heads go through head_masks")


def head_masks(head_scores: Mapping[str, torch.Tensor], top_fraction: float, head_dim: int,
               param_shapes: Mapping[str, Sequence[int]]) -> tuple[dict[str, torch.Tensor], list[tuple[str, int]]]:
    """The top `top_fraction` of all attention heads of the model by summed safety score, as weight masks.

    `head_scores` maps ``model.layers.<i>.self_attn`` to one score per query head. The round(fraction · total heads)
    best heads (at least one; equal scores broken by layer, then head order) become the rows of their q_proj and
    the columns of their o_proj (the head's slice of the output projection's input). k_proj and v_proj are left
    out: with grouped-query attention one key/value head serves several query heads, so restoring its rows would
    change heads outside the region too. Returns (masks by parameter name, the selected (block, head) pairs).
    """
    blocks = sorted(head_scores, key=_natural_key)
    entries = [(block, head) for block in blocks for head in range(head_scores[block].numel())]
    if not entries:
        return {}, []
    scores = torch.cat([head_scores[block].reshape(-1).to(torch.float32) for block in blocks])
    count = max(1, min(len(entries), int(top_fraction * len(entries) + 0.5)))
    order = torch.sort(scores, descending=True, stable=True).indices[:count].tolist()
    selected = sorted((entries[i] for i in order), key=lambda e: (_natural_key(e[0]), e[1]))
    masks: dict[str, torch.Tensor] = {}
    for block, head in selected:
        rows = slice(head * head_dim, (head + 1) * head_dim)
        q_name, o_name = f"{block}.q_proj.weight", f"{block}.o_proj.weight"
        for name in (q_name, o_name):
            if name not in param_shapes:
                raise ValueError(f"head region names {block!r}, but the model has no {name}")
            if name not in masks:
                masks[name] = torch.zeros(tuple(param_shapes[name]), dtype=torch.bool)
        masks[q_name][rows, :] = True
        masks[o_name][:, rows] = True
    return masks, selected


def _natural_key(name: str) -> tuple:
    """'model.layers.10.x' after 'model.layers.2.x': numbers compare as numbers."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


_LAYER = re.compile(r"\.layers\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """The decoder layer index in a parameter (or adapter tensor) name, None outside the layers."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def changed_fractions(changed: Mapping[str, tuple[int, int]]) -> tuple[float, dict[int, float]]:
    """(fraction of all entries changed, fraction changed per decoder layer)."""
    per_layer: dict[int, list[int]] = {}
    total_changed = total = 0
    for name, (count, numel) in changed.items():
        total_changed += count
        total += numel
        layer = layer_of(name)
        if layer is not None:
            bucket = per_layer.setdefault(layer, [0, 0])
            bucket[0] += count
            bucket[1] += numel
    overall = total_changed / total if total else 0.0
    return overall, {layer: c / n if n else 0.0 for layer, (c, n) in sorted(per_layer.items())}
