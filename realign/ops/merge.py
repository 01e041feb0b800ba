"""Model fusion: the math of the `fuse` stage (pure torch and safetensors; no MLflow, no TRL).

Models are fused as task vectors τ_t = θ_t − θ0 (θ0 = the base model; in LoRA mode the zero update of the adapters'
shared base), always computed in float32 and cast back to the fine-tuned tensor's dtype. The fused models are, in
order, the fine-tuned (attacked) model and the safety reference.

One generalized task-arithmetic core (as mergekit's `GeneralizedTaskArithmeticMerge`) with configured variants,
plus `restore` (NLSR's transplant), each an entry of `MERGE_METHODS`:

- ``average``: Σ_t w_t θ_t / Σ_t w_t (the weighted mean of the weights; computed as θ0 + Σ w_t τ_t / Σ w_t).
- ``task_arithmetic``: θ0 + λ Σ_t w_t τ_t.
- ``ties``: each τ_t trimmed to its top ``density`` fraction by magnitude (per tensor: exactly k = ⌊density·n⌋
  entries, at least one, as mergekit; among equal magnitudes the first in row-major order), the sign elected per
  entry as the sign of Σ_t w_t τ̂_t (a sum of exactly 0 elects +, as mergekit does), then the weighted mean over
  the entries whose sign agrees with it (a zero entry agrees with no sign); θ0 + λ·that mean.
- ``consensus_ta`` / ``consensus_ties`` (TALL masks, Wang et al. 2024, arXiv 2405.07813): per model the mask
  m_t = 1{|τ_t| ≥ λ_tall·|τ_MTL − τ_t|} with τ_MTL = Σ_t τ_t (untrimmed, unweighted, as the paper); entries kept
  where Σ_t m_t ≥ k; the TA (resp. TIES) merged vector is zeroed elsewhere before θ0 + λ·(…), as the paper applies
  the consensus mask to the merged multi-task vector.
- ``restore`` (NLSR, Yi et al. 2024, arXiv 2412.12497): the reference's values replace the fine-tuned ones, bit for
  bit (inside a region: θ = where(mask, θ_ref, θ_ft)); optionally only in the modules that adaptive layer
  selection draws (`replacement_probabilities`).

Regions (`Region`) restrict any method: outside them the fine-tuned weights stay bit-identical. ``neurons``: a bool
mask per parameter; ``ranks``: θ_ft + P(θ_method − θ_ft) with P the ActSVD projection of `masks.rank_projection`;
``heads``: the top fraction of attention heads by summed safety score, as q_proj rows and o_proj columns
(`head_masks`). The method is computed on the whole tensor first (TIES trims over the whole tensor), then restricted.

Full weights stream tensor by tensor, in row chunks, from safetensors files (`WeightFiles`) into safetensors files
written as they are computed (`SafetensorsStreamWriter`), so memory stays near one tensor chunk per input, not one
model per input.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from realign.registry import Registry

from realign.ops.masks import BASIS_SEPARATOR, rank_projection

# ---------------------------------------------------------------------------------------------------------------
# Methods: one generalized task-arithmetic core, configured variants, and restore
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MergeParams:
    """The knobs of every method; each method reads the ones named in its `uses`."""

    weights: tuple[float, ...] = (1.0, 1.0)  # w_t, one per fused model: (finetuned, reference)
    scale: float = 1.0  # λ of task arithmetic: θ0 + λ·(merged task vector)
    density: float = 0.2  # TIES: fraction of each task vector kept, by magnitude
    tall_lambda: float = 0.4  # TALL masks: |τ_t| ≥ λ_tall·|τ_MTL − τ_t|
    consensus_k: int = 2  # consensus: keep entries selected by at least k TALL masks


@dataclass(frozen=True)
class MergeMethod:
    """One registry entry. ``kind="task_arithmetic"`` entries configure the generalized core; ``restore`` replaces."""

    name: str
    kind: str  # "task_arithmetic" | "restore"
    trim: bool = False  # TIES: top-density magnitude trimming of each τ_t
    elect_sign: bool = False  # TIES: sign election and the mean over agreeing entries
    normalize: bool = False  # divide by the sum of the (agreeing) weights
    scaled: bool = True  # multiply the merged task vector by λ
    tall: bool = False  # consensus: zero the entries fewer than k TALL masks select
    uses: tuple[str, ...] = ()
    summary: str = ""


MERGE_METHODS: Registry[MergeMethod] = Registry("fusion method")
for _method in (
        MergeMethod("average", "task_arithmetic", normalize=True, scaled=False, uses=("weights",),
                    summary="weighted mean of the models' weights"),
        MergeMethod("task_arithmetic", "task_arithmetic", uses=("weights", "scale"),
                    summary="θ0 + λ Σ w_t τ_t"),
        MergeMethod("ties", "task_arithmetic", trim=True, elect_sign=True, normalize=True,
                    uses=("weights", "scale", "density"),
                    summary="trim to top-density |τ|, elect sign by Σ τ, mean over agreeing entries"),
        MergeMethod("consensus_ta", "task_arithmetic", tall=True,
                    uses=("weights", "scale", "tall_lambda", "consensus_k"),
                    summary="task arithmetic on the entries ≥ k TALL masks keep"),
        MergeMethod("consensus_ties", "task_arithmetic", trim=True, elect_sign=True, normalize=True, tall=True,
                    uses=("weights", "scale", "density", "tall_lambda", "consensus_k"),
                    summary="TIES on the entries ≥ k TALL masks keep"),
        MergeMethod("restore", "restore", uses=(),
                    summary="the reference's weights transplanted into the region (NLSR)"),
):
    MERGE_METHODS.register(_method.name, _method)


def get_merge_method(name: str) -> MergeMethod:
    return MERGE_METHODS.get(name)


def trim_count(numel: int, density: float) -> int:
    """k of TIES trimming: ⌊density·n⌋, at least one entry, at most n (mergekit's rule)."""
    return max(1, min(numel, int(density * numel)))


@dataclass
class MagnitudeTrim:
    """TIES trimming of one whole tensor's task vector, applied chunk by chunk: keeps exactly its k largest |τ|.

    Entries above the k-th largest magnitude are kept; of the entries equal to it, the first ones in row-major
    order until k are kept (ties broken by position, as a stable sort would). Chunks must be passed in row order,
    each once (`keep` counts the tied entries it has seen).
    """

    threshold: float
    tied_quota: int  # entries equal to the threshold that are kept
    tied_seen: int = 0

    @classmethod
    def of(cls, task_vector: torch.Tensor, density: float) -> "MagnitudeTrim":
        """The rule for a float32 task vector, which it overwrites: |τ| is taken in place and partially sorted in
        place with numpy, so a whole embedding matrix needs one copy of itself, not the several sort would make."""
        flat = task_vector.reshape(-1)
        n = flat.numel()
        k = trim_count(n, density) if n else 0
        if k == n:
            return cls(threshold=-math.inf, tied_quota=0)
        values = flat.abs_().numpy()
        values.partition(n - k)
        threshold = float(values[n - k])
        above = int((values > threshold).sum())
        return cls(threshold=threshold, tied_quota=k - above)

    def keep(self, task_vector: torch.Tensor) -> torch.Tensor:
        """The kept entries of the next chunk (row-major order) of the task vector."""
        magnitude = task_vector.abs()
        kept = magnitude > self.threshold
        tied = (magnitude == self.threshold).reshape(-1)
        tied_here = int(tied.sum())
        if tied_here:
            if self.tied_quota > self.tied_seen:
                rank = torch.cumsum(tied, dim=0) + self.tied_seen  # 1-based position among all tied entries so far
                kept = kept | (tied & (rank <= self.tied_quota)).reshape(kept.shape)
            self.tied_seen += tied_here
        return kept


def tall_masks(task_vectors: Sequence[torch.Tensor], tall_lambda: float) -> list[torch.Tensor]:
    """m_t = 1{|τ_t| ≥ λ·|τ_MTL − τ_t|}, τ_MTL = Σ_t τ_t (TALL masks, arXiv 2405.07813)."""
    total = torch.stack(list(task_vectors)).sum(dim=0)
    return [tau.abs() >= tall_lambda * (total - tau).abs() for tau in task_vectors]


def consensus_mask(task_vectors: Sequence[torch.Tensor], tall_lambda: float, k: int) -> torch.Tensor:
    """Entries that at least k of the models' TALL masks select."""
    masks = tall_masks(task_vectors, tall_lambda)
    return torch.stack([m.to(torch.int32) for m in masks]).sum(dim=0) >= k


def task_arithmetic(method: MergeMethod, params: MergeParams, base: torch.Tensor, models: Sequence[torch.Tensor],
                    trims: Sequence[MagnitudeTrim] | None = None) -> torch.Tensor:
    """The generalized task-arithmetic core on one tensor (or one row chunk of it), in float32.

    `trims` are the TIES trimming rules of each model's task vector over its whole tensor (`MagnitudeTrim.of`);
    computed here when absent, which is right only when `models` are whole tensors.
    """
    if len(params.weights) != len(models):
        raise ValueError(f"{len(params.weights)} weights for {len(models)} models")
    base32 = base.to(torch.float32)
    task_vectors = [m.to(torch.float32) - base32 for m in models]
    kept = task_vectors
    if method.trim:
        if trims is None:
            trims = [MagnitudeTrim.of(tau.clone(), params.density) for tau in task_vectors]
        kept = [torch.where(trim.keep(tau), tau, 0.0) for tau, trim in zip(task_vectors, trims)]
    weighted = [w * tau for w, tau in zip(params.weights, kept)]
    total = torch.stack(weighted).sum(dim=0)
    if method.elect_sign:
        elected = torch.where(total >= 0, 1.0, -1.0)
        agree = [torch.sign(wt) == elected for wt in weighted]
        mixed = torch.stack([torch.where(a, wt, 0.0) for a, wt in zip(agree, weighted)]).sum(dim=0)
        divisor = torch.stack([a.to(torch.float32) * w for a, w in zip(agree, params.weights)]).sum(dim=0)
    else:
        mixed = total
        divisor = torch.full_like(total, float(sum(params.weights)))
    if method.normalize:
        # Entries no weight reaches (every τ zero there) have nothing to average: they stay at θ0.
        mixed = mixed / torch.where(divisor == 0, 1.0, divisor)
    if method.tall:
        mixed = torch.where(consensus_mask(task_vectors, params.tall_lambda, params.consensus_k), mixed, 0.0)
    scale = params.scale if method.scaled else 1.0
    return base32 + scale * mixed


def fuse_values(method: MergeMethod, params: MergeParams, base: torch.Tensor | None, finetuned: torch.Tensor,
                reference: torch.Tensor, trims: Sequence[MagnitudeTrim] | None = None) -> torch.Tensor:
    """The method's result for one tensor or row chunk, unrestricted, in the fine-tuned tensor's dtype."""
    if method.kind == "restore":
        return reference.to(finetuned.dtype)
    if base is None:
        raise ValueError(f"{method.name} needs the base weights θ0")
    return task_arithmetic(method, params, base, [finetuned, reference], trims).to(finetuned.dtype)


def merge_tensors(method: MergeMethod | str, params: MergeParams, base: torch.Tensor | None,
                  finetuned: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`fuse_values` for two whole tensors, method by name or entry: the form tests and notebooks call."""
    entry = get_merge_method(method) if isinstance(method, str) else method
    return fuse_values(entry, params, base, finetuned, reference)


# ---------------------------------------------------------------------------------------------------------------
# Regions: where a method may change weights
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Region:
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


def region_from_file(tensors: Mapping[str, torch.Tensor], kind: str) -> Region:
    """A `neurons` or `ranks` region from a region file's tensors (`masks.load_region`)."""
    if kind == "neurons":
        return Region("neurons", masks={name: t.to(torch.bool) for name, t in tensors.items()})
    if kind == "ranks":
        names = sorted({key.split(BASIS_SEPARATOR)[0] for key in tensors})
        projections = {}
        for name in names:
            safety = tensors.get(f"{name}{BASIS_SEPARATOR}safety")
            if safety is None:
                raise ValueError(f"rank region entry {name!r} has no {name}{BASIS_SEPARATOR}safety basis")
            utility = tensors.get(f"{name}{BASIS_SEPARATOR}utility", safety.new_zeros(safety.shape[0], 0))
            projections[name] = rank_projection(safety, utility)
        return Region("ranks", projections=projections)
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


# ---------------------------------------------------------------------------------------------------------------
# NLSR adaptive layer selection
# ---------------------------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------------------------
# A fusion plan, applied to whole tensors (LoRA adapters, tests) or streamed over files (full weights)
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class FusionPlan:
    """What to compute where: the method and its knobs, the region, and (restore) the modules adaptive
    selection drew. A parameter the plan does not touch is copied from the fine-tuned model unchanged."""

    method: MergeMethod
    params: MergeParams = field(default_factory=MergeParams)
    region: Region | None = None
    replaced: frozenset[str] | None = None  # restore with adaptive/threshold selection: only these change

    def touches(self, name: str) -> bool:
        if self.region is not None and not self.region.covers(name):
            return False
        if self.replaced is not None and name not in self.replaced:
            return False
        return True

    def fuse(self, name: str, base: torch.Tensor | None, finetuned: torch.Tensor, reference: torch.Tensor,
             rows: slice | None = None, trims: Sequence[MagnitudeTrim] | None = None) -> torch.Tensor:
        """The fused tensor (or row chunk) of parameter `name`, restricted to the plan's region."""
        if not self.touches(name) or not finetuned.is_floating_point():
            return finetuned
        fused = fuse_values(self.method, self.params, base, finetuned, reference, trims)
        if self.region is None:
            return fused
        return self.region.restrict(name, fused, finetuned, rows)


def fuse_state_dicts(plan: FusionPlan, base: Mapping[str, torch.Tensor] | None,
                     finetuned: Mapping[str, torch.Tensor],
                     reference: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, tuple[int, int]]]:
    """Fuse two state dicts with the same keys and shapes; `base` None = θ0 is zero (LoRA adapters on a shared
    base). Returns (fused state dict, per parameter (entries changed against the fine-tuned one, entries))."""
    _check_same_tensors(finetuned, reference, "reference")
    if base is not None:
        _check_same_tensors(finetuned, base, "base")
    fused: dict[str, torch.Tensor] = {}
    changed: dict[str, tuple[int, int]] = {}
    for name, ft in finetuned.items():
        theta0 = base[name] if base is not None else torch.zeros_like(ft)
        out = plan.fuse(name, theta0, ft, reference[name]).contiguous()
        fused[name] = out
        changed[name] = (int((out != ft).sum()), ft.numel())
    return fused, changed


def _check_same_tensors(first: Mapping[str, torch.Tensor], second: Mapping[str, torch.Tensor], what: str) -> None:
    differ = sorted(set(first) ^ set(second))
    if differ:
        raise ValueError(f"the {what} weights differ in parameter {differ[0]!r} ({len(differ)} names differ)")
    for name, tensor in first.items():
        if tuple(tensor.shape) != tuple(second[name].shape):
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} vs {tuple(second[name].shape)} in the {what}")


def lora_module_names(adapter_state: Mapping[str, torch.Tensor]) -> list[str]:
    """The adapted modules of a PEFT LoRA state dict (`...q_proj` for `...q_proj.lora_A.weight`), in file order."""
    return [name.split(".lora_A.")[0] for name in adapter_state if ".lora_A." in name]


def lora_update_similarities(finetuned: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor],
                             modules: Sequence[str], region: Region | None) -> list[float]:
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


# --- full weights, streamed over safetensors files ---------------------------------------------------------------

SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
TORCH_DTYPES = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}
WEIGHTS_INDEX = "model.safetensors.index.json"
SINGLE_WEIGHTS = "model.safetensors"


class WeightFiles:
    """A transformers model dir's safetensors weights (one file or shards with an index), read by tensor or rows.

    Each read opens the file with `safetensors.safe_open` and closes it again: safetensors maps the whole file and
    hands out tensors backed by that mapping, so pages once read stay resident for as long as a handle is open.
    Reopening per read (a header parse, well under a millisecond) keeps the process's resident memory near the
    rows in use instead of growing to the size of every input file.
    """

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / WEIGHTS_INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (self.folder / SINGLE_WEIGHTS).is_file():
            files = [SINGLE_WEIGHTS]
            weight_map = None
        else:
            raise FileNotFoundError(f"{self.folder} has no {SINGLE_WEIGHTS} or {WEIGHTS_INDEX}")
        self.file_of: dict[str, Path] = {}
        self._layout: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for file in files:
            with safe_open(str(self.folder / file), framework="pt") as handle:
                for name in handle.keys():
                    view = handle.get_slice(name)
                    self.file_of[name] = self.folder / file
                    self._layout[name] = (tuple(view.get_shape()), TORCH_DTYPES[view.get_dtype()])
        if weight_map is not None and set(weight_map) != set(self.file_of):
            raise ValueError(f"{index} does not list the tensors its shards hold")

    @property
    def names(self) -> list[str]:
        return list(self.file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._layout[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._layout[name][1]

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.file_of[name]), framework="pt") as handle:
            if rows is None:
                return handle.get_tensor(name)
            return handle.get_slice(name)[rows]

    def close(self) -> None:
        """Nothing stays open between reads; kept so a `with` block reads naturally."""

    def __enter__(self) -> "WeightFiles":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SafetensorsStreamWriter:
    """Writes one safetensors file tensor by tensor, chunk by chunk, as values are computed.

    The header (names, dtypes, shapes, offsets) is known before any value: it is written first, then each tensor's
    bytes in header order, so nothing but the current chunk is ever held in memory. The file is a standard
    safetensors file (8-byte little-endian header length, JSON header padded with spaces to 8 bytes, data).
    """

    def __init__(self, path: str | Path, specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
        self.order: list[str] = []
        self.sizes: dict[str, int] = {}
        offset = 0
        for name, dtype, shape in specs:
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self.order.append(name)
            self.sizes[name] = size
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self.total_bytes = offset
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(encoded)))
        self._file.write(encoded)
        self._next = 0  # index into self.order of the tensor being written
        self._written = 0  # bytes of it written so far

    def write(self, name: str, chunk: torch.Tensor) -> None:
        """Append the next rows of tensor `name` (tensors in the order given, rows in order)."""
        if self._next >= len(self.order) or self.order[self._next] != name:
            expected = self.order[self._next] if self._next < len(self.order) else "nothing"
            raise ValueError(f"writing {name!r}, but the file expects {expected}")
        data = chunk.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.write(data.data)
        self._written += data.nbytes
        if self._written > self.sizes[name]:
            raise ValueError(f"{name}: more bytes written than its shape holds")
        if self._written == self.sizes[name]:
            self._next += 1
            self._written = 0

    def close(self) -> None:
        self._file.close()
        if self._next != len(self.order):
            raise ValueError(f"{self.path.name}: tensor {self.order[self._next]!r} was not written in full")


def plan_shards(specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
                max_shard_bytes: int) -> list[list[tuple[str, torch.dtype, tuple[int, ...]]]]:
    """Consecutive groups of tensors of at most `max_shard_bytes` each (a larger tensor gets a shard of its own)."""
    shards: list[list] = [[]]
    size = 0
    for spec in specs:
        nbytes = math.prod(spec[2]) * torch.empty((), dtype=spec[1]).element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    """transformers' names: model.safetensors alone, else model-00001-of-0000N.safetensors + an index."""
    if count == 1:
        return [SINGLE_WEIGHTS]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


@dataclass
class StreamInputs:
    """The weight files fusion reads: θ_ft and θ_ref always, θ0 for task arithmetic, the anchor for NLSR."""

    finetuned: WeightFiles
    reference: WeightFiles
    base: WeightFiles | None = None

    def check(self) -> None:
        """Same tensor names and shapes in every input (the fine-tuned model's order is the output's)."""
        for what, files in (("reference", self.reference), ("base", self.base)):
            if files is None:
                continue
            differ = sorted(set(self.finetuned.names) ^ set(files.names))
            if differ:
                raise ValueError(f"the {what} weights differ from the fine-tuned ones in tensor {differ[0]!r}")
            for name in self.finetuned.names:
                if self.finetuned.shape(name) != files.shape(name):
                    raise ValueError(f"{name}: shape {self.finetuned.shape(name)} in the fine-tuned weights, "
                                     f"{files.shape(name)} in the {what}")


def row_chunks(shape: Sequence[int], chunk_elements: int) -> list[slice | None]:
    """Row slices covering a tensor with about `chunk_elements` entries each; None for a 0-d tensor."""
    if len(shape) == 0:
        return [None]
    row_size = max(1, math.prod(shape[1:]))
    step = max(1, chunk_elements // row_size)
    return [slice(start, min(start + step, shape[0])) for start in range(0, shape[0], step)]


def stream_similarities(names: Sequence[str], finetuned: WeightFiles, reference: WeightFiles,
                        anchor: WeightFiles | None, region: Region | None,
                        chunk_elements: int = 1 << 21, progress: bool = False) -> list[float]:
    """Per parameter cos(region part of θ_ft − θ_anchor, region part of θ_ref − θ_anchor), streamed in row chunks
    (rank regions project whole tensors); no anchor = updates measured from zero."""
    similarities = []
    for name in _progress(names, progress, "similarity"):
        similarity = UpdateSimilarity()
        whole = region is not None and name in region.projections
        for rows in ([None] if whole else row_chunks(finetuned.shape(name), chunk_elements)):
            ft = finetuned.read(name, rows).to(torch.float32)
            ref = reference.read(name, rows).to(torch.float32)
            if anchor is not None:
                theta0 = anchor.read(name, rows).to(torch.float32)
                ft, ref = ft - theta0, ref - theta0
            if region is not None:
                ft, ref = region.select(name, ft, rows), region.select(name, ref, rows)
            similarity.add(ft, ref)
        similarities.append(similarity.value())
    return similarities


def stream_fusion(plan: FusionPlan, inputs: StreamInputs, out_dir: str | Path, chunk_elements: int = 1 << 21,
                  max_shard_bytes: int = 5 * 1024**3, progress: bool = False) -> dict[str, tuple[int, int]]:
    """Fuse full weights tensor by tensor into safetensors files under `out_dir`; returns per tensor
    (entries changed against the fine-tuned weights, entries).

    Peak memory: one row chunk of each input and its temporaries, plus, for TIES, one float32 copy of the tensor
    being trimmed (its threshold is over the whole tensor) — never a whole model.
    """
    if plan.method.kind == "task_arithmetic" and inputs.base is None:
        raise ValueError(f"{plan.method.name} needs the base weights θ0")
    inputs.check()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ft_files = inputs.finetuned
    specs = [(name, ft_files.dtype(name), ft_files.shape(name)) for name in ft_files.names]
    shards = plan_shards(specs, max_shard_bytes)
    file_names = shard_file_names(len(shards))
    changed: dict[str, tuple[int, int]] = {}
    weight_map: dict[str, str] = {}
    bar = _progress_bar(len(specs), progress, f"fuse/{plan.method.name}")
    for shard_specs, file_name in zip(shards, file_names):
        writer = SafetensorsStreamWriter(out_dir / file_name, shard_specs)
        try:
            for name, dtype, shape in shard_specs:
                changed[name] = _stream_tensor(plan, inputs, name, shape, writer, chunk_elements)
                weight_map[name] = file_name
                if bar is not None:
                    bar.update(1)
        finally:
            writer.close()
    if bar is not None:
        bar.close()
    if len(file_names) > 1:
        total = sum(math.prod(s[2]) * torch.empty((), dtype=s[1]).element_size() for s in specs)
        (out_dir / WEIGHTS_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                        indent=2))
    return changed


def _stream_tensor(plan: FusionPlan, inputs: StreamInputs, name: str, shape: tuple[int, ...],
                   writer: SafetensorsStreamWriter, chunk_elements: int) -> tuple[int, int]:
    numel = math.prod(shape)
    ft_files = inputs.finetuned
    if not plan.touches(name) or not ft_files.dtype(name).is_floating_point:
        for rows in row_chunks(shape, chunk_elements):  # a copy, read and written in chunks
            writer.write(name, ft_files.read(name, rows))
        return 0, numel

    def read_all(rows):
        base = inputs.base.read(name, rows) if inputs.base is not None else None
        return base, ft_files.read(name, rows), inputs.reference.read(name, rows)

    if plan.region is not None and name in plan.region.projections:  # a projection needs the whole tensor
        base, ft, ref = read_all(None)
        out = plan.fuse(name, base, ft, ref)
        writer.write(name, out)
        return int((out != ft).sum()), numel

    trims = None
    if plan.method.kind == "task_arithmetic" and plan.method.trim:
        trims = [_stream_trim(inputs.base, files, name, shape, plan.params.density, chunk_elements)
                      for files in (ft_files, inputs.reference)]
    changed = 0
    for rows in row_chunks(shape, chunk_elements):
        base, ft, ref = read_all(rows)
        out = plan.fuse(name, base, ft, ref, rows=rows, trims=trims)
        writer.write(name, out)
        changed += int((out != ft).sum())
    return changed, numel


def _stream_trim(base: WeightFiles, model: WeightFiles, name: str, shape: tuple[int, ...], density: float,
                 chunk_elements: int) -> MagnitudeTrim:
    """TIES's trimming rule for τ = θ − θ0 over the whole tensor, filled chunk by chunk into one float32 copy."""
    task_vector = torch.empty(shape, dtype=torch.float32)
    for rows in row_chunks(shape, chunk_elements):
        target = task_vector if rows is None else task_vector[rows]
        torch.sub(model.read(name, rows).to(torch.float32), base.read(name, rows).to(torch.float32), out=target)
    return MagnitudeTrim.of(task_vector, density)


def _progress(items: Iterable, enabled: bool, desc: str) -> Iterable:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="tensor")


def _progress_bar(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tensor")


# ---------------------------------------------------------------------------------------------------------------
# Bookkeeping
# ---------------------------------------------------------------------------------------------------------------

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

