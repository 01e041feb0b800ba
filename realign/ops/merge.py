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
- ``consensus_ties_authors``: consensus TIES as its authors' code builds it (GitHub nik-dim/tall_masks,
  `src/eval/aggregation.py`, `src/utils/tallmask_utils.py`): the TIES vector is aggregated with the disjoint *sum*
  (`dis-sum`: Σ of the agreeing entries, no division), the TALL masks are built against it instead of the plain sum
  (m_t = 1{|τ_t| > λ_tall·|τ_TIES − τ_t|}, strict, τ_t untrimmed), and θ0 + λ·(τ_TIES ⊙ consensus mask). Two
  differences remain: the authors trim and elect over the whole model flattened into one vector, realign per tensor
  (as mergekit, and so it streams); and an elected sign of exactly 0 takes the global majority sign there, + here.
  `consensus_ties` (the paper's text) stays the default consensus method.
- ``restore`` (NLSR, Yi et al. 2024, arXiv 2412.12497): the reference's values replace the fine-tuned ones, bit for
  bit (inside a region: θ = where(mask, θ_ref, θ_ft)); optionally only in the modules NLSR's selection draws
  (`realign.ops.nlsr`).
- ``resta`` (RESTA, Bhardwaj et al. 2024, arXiv 2402.11746): the safety vector of the aligned reference over an
  unaligned model θ_un is added back: θ = θ_ft + γ·(θ_ref − θ_un). With DARE (`dare_rate` p > 0) the fine-tuning
  delta is first dropped and rescaled, measured from the reference (the aligned model the attack started from, in
  RESTA's setting): θ = θ_ref + DARE(θ_ft − θ_ref) + γ·(θ_ref − θ_un). The θ0 slot carries θ_un.
- ``safe_lora`` (Safe LoRA, arXiv 2405.16833): not entrywise; `realign.ops.safe_lora` projects the attacked LoRA
  factors, and the fuse stage runs it on the adapter.
- ``safemerge`` (SafeMERGE, arXiv 2503.17239): not entrywise; `realign.ops.safemerge` merges a safety LoRA into the
  attacked LoRA's factors in the modules whose Safe LoRA similarity is below τ.
- ``antidote`` (Antidote, Huang et al. 2024, arXiv 2408.09600): the weights of the region are set to zero, one shot
  (θ = where(mask, 0, θ_ft)); the region is the attacked model's own Wanda importance on harmful data (a score run
  of the attacked model with `data.safety_source: harmful`). No reference weights are read.

DARE (`realign.ops.dare`, `dare_rate` p > 0) also sparsifies the task vectors of the task-arithmetic family, as
mergekit offers it: task arithmetic and the consensus methods merge DARE(τ_t) (TALL masks are still computed from
the untouched τ_t, as the paper); TIES uses DARE's random drop in place of its magnitude trim, then elects signs
(mergekit's `dare_ties`). Each model's drop is its own seeded draw (`dare_seed`).

A `FusionPlan` is the method, its knobs and a region (`realign.ops.regions`); `fuse_state_dicts` applies it to whole
tensors (LoRA adapters), `realign.ops.streaming` streams it over safetensors files (full weights).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch

from realign.ops.dare import EntryPosition, drop_and_rescale
from realign.ops.regions import FusionRegion
from realign.registry import Registry

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
    dare_rate: float = 0.0  # DARE: drop probability p of each task-vector entry (0 = no DARE)
    dare_seed: int = 0  # DARE: seed of the counter-based draw
    gamma: float = 1.0  # RESTA: scale γ of the safety vector θ_ref − θ_un


@dataclass(frozen=True)
class MergeMethod:
    """One registry entry. ``kind="task_arithmetic"`` entries configure the generalized core; ``restore`` replaces."""

    name: str
    kind: str  # "task_arithmetic" | "restore" | "resta" | "antidote" | "safe_lora"
    trim: bool = False  # TIES: top-density magnitude trimming of each τ_t
    elect_sign: bool = False  # TIES: sign election and the mean over agreeing entries
    normalize: bool = False  # divide by the sum of the (agreeing) weights
    scaled: bool = True  # multiply the merged task vector by λ
    tall: bool = False  # consensus: zero the entries fewer than k TALL masks select
    tall_from_merged: bool = False  # TALL masks against the merged vector itself (authors' code), not Σ τ_t
    tall_strict: bool = False  # TALL mask |τ_t| > λ|…| (authors' code) instead of ≥ (the paper)
    uses: tuple[str, ...] = ()
    summary: str = ""

    @property
    def entrywise(self) -> bool:
        """Computed tensor by tensor from θ_ft, θ_ref (and θ0) by `fuse_values`; safe_lora and safemerge work on
        LoRA factors."""
        return self.kind not in ("safe_lora", "safemerge")


MERGE_METHODS: Registry[MergeMethod] = Registry("fusion method")
for _method in (
        MergeMethod("average", "task_arithmetic", normalize=True, scaled=False, uses=("weights", "dare_rate", "dare_seed"),
                    summary="weighted mean of the models' weights"),
        MergeMethod("task_arithmetic", "task_arithmetic", uses=("weights", "scale", "dare_rate", "dare_seed"),
                    summary="θ0 + λ Σ w_t τ_t"),
        MergeMethod("ties", "task_arithmetic", trim=True, elect_sign=True, normalize=True,
                    uses=("weights", "scale", "density", "dare_rate", "dare_seed"),
                    summary="trim to top-density |τ|, elect sign by Σ τ, mean over agreeing entries"),
        MergeMethod("consensus_ta", "task_arithmetic", tall=True,
                    uses=("weights", "scale", "tall_lambda", "consensus_k", "dare_rate", "dare_seed"),
                    summary="task arithmetic on the entries ≥ k TALL masks keep"),
        MergeMethod("consensus_ties", "task_arithmetic", trim=True, elect_sign=True, normalize=True, tall=True,
                    uses=("weights", "scale", "density", "tall_lambda", "consensus_k", "dare_rate", "dare_seed"),
                    summary="TIES on the entries ≥ k TALL masks keep"),
        MergeMethod("consensus_ties_authors", "task_arithmetic", trim=True, elect_sign=True, tall=True,
                    tall_from_merged=True, tall_strict=True,
                    uses=("weights", "scale", "density", "tall_lambda", "consensus_k", "dare_rate", "dare_seed"),
                    summary="consensus TIES as nik-dim/tall_masks runs it: dis-sum, masks against the TIES vector"),
        MergeMethod("restore", "restore", uses=(),
                    summary="the reference's weights transplanted into the region (NLSR)"),
        MergeMethod("resta", "resta", uses=("gamma", "dare_rate", "dare_seed"),
                    summary="θ_ft + γ(θ_ref − θ_unaligned), optionally after DARE of θ_ft − θ_ref (RESTA)"),
        MergeMethod("antidote", "antidote", uses=(),
                    summary="the region (the attacked model's harmful-data Wanda top weights) set to zero (Antidote)"),
        MergeMethod("safe_lora", "safe_lora", uses=("safe_lora_select", "safe_lora_tau", "safe_lora_layers"),
                    summary="the attacked LoRA update projected onto the alignment subspace where it strays (Safe "
                            "LoRA; realign.ops.safe_lora)"),
        MergeMethod("safemerge", "safemerge", uses=("safety_run", "safemerge_tau", "safemerge_weights", "dare_rate",
                                                    "dare_seed"),
                    summary="a safety LoRA merged per factor into the modules that stray from the alignment subspace "
                            "(SafeMERGE; realign.ops.safemerge)"),
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

    @classmethod
    def of_chunks(cls, chunks: Callable[[], Iterable[torch.Tensor]], numel: int, density: float) -> "MagnitudeTrim":
        """The same rule (the same threshold and quota as `of`) from a task vector seen only in chunks: `chunks()`
        yields its float32 chunks, and is called twice. Memory: one chunk and two 65,536-bin histograms.

        Exact selection by radix on the bit patterns of |τ| (a non-negative float32's bits, read as an integer, sort
        as the float does): the first pass counts the top 16 bits and finds the bin holding the k-th largest value,
        the second counts the low 16 bits inside that bin.
        """
        k = trim_count(numel, density) if numel else 0
        if k == numel:
            return cls(threshold=-math.inf, tied_quota=0)

        def magnitude_bits(chunk: torch.Tensor) -> torch.Tensor:
            return chunk.reshape(-1).to(torch.float32).abs().view(torch.int32)

        high_counts = torch.zeros(1 << 16, dtype=torch.int64)
        for chunk in chunks():
            high_counts += torch.bincount(magnitude_bits(chunk) >> 16, minlength=1 << 16)
        high, above_high = _bin_of_kth_largest(high_counts, k)
        low_counts = torch.zeros(1 << 16, dtype=torch.int64)
        for chunk in chunks():
            bits = magnitude_bits(chunk)
            low_counts += torch.bincount(bits[(bits >> 16) == high] & 0xFFFF, minlength=1 << 16)
        low, above_low = _bin_of_kth_largest(low_counts, k - above_high)
        threshold = float(torch.tensor([(high << 16) | low], dtype=torch.int32).view(torch.float32))
        return cls(threshold=threshold, tied_quota=k - above_high - above_low)

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


def _bin_of_kth_largest(counts: torch.Tensor, k: int) -> tuple[int, int]:
    """(the bin holding the k-th largest entry, how many entries lie in higher bins), for 1 <= k <= counts.sum()."""
    from_top = torch.cumsum(counts.flip(0), dim=0)  # entries in this bin or above, from the highest bin down
    index = int(torch.searchsorted(from_top, torch.tensor(k), right=False))
    return counts.numel() - 1 - index, int(from_top[index] - counts.flip(0)[index])


def tall_masks(task_vectors: Sequence[torch.Tensor], tall_lambda: float, merged: torch.Tensor | None = None,
               strict: bool = False) -> list[torch.Tensor]:
    """m_t = 1{|τ_t| ≥ λ·|τ_MTL − τ_t|}, τ_MTL = Σ_t τ_t (TALL masks, arXiv 2405.07813); `merged` replaces Σ_t τ_t
    and `strict` uses > (the authors' code builds them against the TIES vector, strictly)."""
    total = torch.stack(list(task_vectors)).sum(dim=0) if merged is None else merged
    if strict:
        return [tau.abs() > tall_lambda * (total - tau).abs() for tau in task_vectors]
    return [tau.abs() >= tall_lambda * (total - tau).abs() for tau in task_vectors]


def consensus_mask(task_vectors: Sequence[torch.Tensor], tall_lambda: float, k: int,
                   merged: torch.Tensor | None = None, strict: bool = False) -> torch.Tensor:
    """Entries that at least k of the models' TALL masks select."""
    masks = tall_masks(task_vectors, tall_lambda, merged, strict)
    return torch.stack([m.to(torch.int32) for m in masks]).sum(dim=0) >= k


def task_arithmetic(method: MergeMethod, params: MergeParams, base: torch.Tensor, models: Sequence[torch.Tensor],
                    trims: Sequence[MagnitudeTrim] | None = None,
                    position: EntryPosition | None = None) -> torch.Tensor:
    """The generalized task-arithmetic core on one tensor (or one row chunk of it), in float32.

    `trims` are the TIES trimming rules of each model's task vector over its whole tensor (`MagnitudeTrim.of`);
    computed here when absent, which is right only when `models` are whole tensors. `position` keys DARE's draw.
    """
    if len(params.weights) != len(models):
        raise ValueError(f"{len(params.weights)} weights for {len(models)} models")
    base32 = base.to(torch.float32)
    task_vectors = [m.to(torch.float32) - base32 for m in models]
    kept = task_vectors
    if params.dare_rate > 0:
        where = position or EntryPosition("")
        kept = [drop_and_rescale(tau, params.dare_rate, params.dare_seed, where, model=t)
                for t, tau in enumerate(task_vectors)]
    elif method.trim:
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
        keep = consensus_mask(task_vectors, params.tall_lambda, params.consensus_k,
                              merged=mixed if method.tall_from_merged else None, strict=method.tall_strict)
        mixed = torch.where(keep, mixed, 0.0)
    scale = params.scale if method.scaled else 1.0
    return base32 + scale * mixed


def fuse_values(method: MergeMethod, params: MergeParams, base: torch.Tensor | None, finetuned: torch.Tensor,
                reference: torch.Tensor, trims: Sequence[MagnitudeTrim] | None = None,
                position: EntryPosition | None = None) -> torch.Tensor:
    """The method's result for one tensor or row chunk, unrestricted, in the fine-tuned tensor's dtype.
    `base` is θ0 (task arithmetic) or θ_un (resta)."""
    if method.kind == "restore":
        return reference.to(finetuned.dtype)
    if method.kind == "antidote":
        return torch.zeros_like(finetuned)
    if not method.entrywise:
        raise ValueError(f"{method.name} is not computed tensor by tensor (realign.ops.safe_lora)")
    if base is None:
        raise ValueError(f"{method.name} needs the {'unaligned' if method.kind == 'resta' else 'base'} weights")
    if method.kind == "resta":
        return resta(params, base, finetuned, reference, position).to(finetuned.dtype)
    return task_arithmetic(method, params, base, [finetuned, reference], trims, position).to(finetuned.dtype)


def resta(params: MergeParams, unaligned: torch.Tensor, finetuned: torch.Tensor, reference: torch.Tensor,
          position: EntryPosition | None = None) -> torch.Tensor:
    """RESTA in float32: θ_ft + γ(θ_ref − θ_un), or θ_ref + DARE(θ_ft − θ_ref) + γ(θ_ref − θ_un) with DARE."""
    ft32, ref32 = finetuned.to(torch.float32), reference.to(torch.float32)
    safety_vector = ref32 - unaligned.to(torch.float32)
    if params.dare_rate > 0:
        delta = drop_and_rescale(ft32 - ref32, params.dare_rate, params.dare_seed, position or EntryPosition(""))
        return ref32 + delta + params.gamma * safety_vector
    return ft32 + params.gamma * safety_vector


def merge_tensors(method: MergeMethod | str, params: MergeParams, base: torch.Tensor | None,
                  finetuned: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`fuse_values` for two whole tensors, method by name or entry: the form tests and notebooks call."""
    entry = get_merge_method(method) if isinstance(method, str) else method
    return fuse_values(entry, params, base, finetuned, reference)



@dataclass
class FusionPlan:
    """What to compute where: the method and its knobs, the region, and (restore) the modules adaptive
    selection drew. A parameter the plan does not touch is copied from the fine-tuned model unchanged."""

    method: MergeMethod
    params: MergeParams = field(default_factory=MergeParams)
    region: FusionRegion | None = None
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
        row_size = max(1, math.prod(finetuned.shape[1:]))
        position = EntryPosition(name, (rows.start or 0) * row_size if rows is not None else 0)
        fused = fuse_values(self.method, self.params, base, finetuned, reference, trims, position)
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
