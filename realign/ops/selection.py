"""Score methods (a registry of named entries) and what they select: element-wise masks or rank bases, with the
helpers the sanity check uses to remove a selection and a random one of the same size. The scores themselves
(SNIP, Wanda, the output Gram matrices of ActSVD) are in realign.ops.neurons, whose docstring has the definitions.
Pure torch; no MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from realign.ops.masks import projection_rank
from realign.ops.neurons import (TARGETS, CalibrationBatch, ScoredModule, o_head_sums, output_grams, q_head_sums,
                                 snip_scores, top_fraction_mask, top_fraction_mask_rows,
                                 wanda_scores)
from realign.registry import Registry


# ---------------------------------------------------------------------------------------------------------------
# Methods and their registry
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ScoreSettings:
    sparsity: float = 0.01  # snip, wanda, lora_actsvd: fraction of each matrix selected
    top_q: float = 0.01  # set_difference: top-q of the safety score ...
    top_p: float = 0.01  # ... minus top-p of the utility score
    difference_score: str = "snip"  # set_difference: the element-wise score both sets are ranked by
    safety_rank: int = 10  # actsvd: r_s
    utility_rank: int = 0  # actsvd: r_u (0 = plain ActSVD)
    lora_rank_fraction: float = 0.8  # lora_actsvd: directions kept, ⌊f · min(d_out, d_in)⌋
    # lora_actsvd: score the decoder layers in order, each on the outputs of the earlier layers already projected
    # (W ← U_k U_kᵀ W, in place, undone at the end), as NLSR's wrapper does; False: every layer on the original model.
    lora_sequential: bool = True
    # snip, wanda: which entries compete for the top fraction: the whole matrix, or each output row (Wei et al.'s
    # per-output comparison, and NLSR's prune.py)
    comparison: str = "matrix"
    num_heads: int = 0  # attention heads per layer; > 0 (target weights) = also sum each head's safety score
    state_budget_bytes: int = 256 * 2**20  # scoring state held per pass
    # snip, wanda, set_difference: element-wise scores kept across calls (a search's trials that differ only in
    # sparsity), under `memo_key` = what the caller knows determines them (the model, the calibration data)
    memo: "ScoreMemo | None" = None
    memo_key: str = ""
    memo_origin: str = ""  # who computes the scores when they are not held (a run id), reported by later hits


@dataclass
class Selection:
    """What a method selected: bool masks (kind neurons) or output bases (kind ranks), and how much of each weight."""

    kind: str
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    heads: dict[str, torch.Tensor] = field(default_factory=dict)  # model.layers.<i>.self_attn -> per-head score
    selected: dict[str, int] = field(default_factory=dict)  # weight key -> selected entries (neurons) or ranks
    totals: dict[str, int] = field(default_factory=dict)  # weight key -> numel (neurons) or min(d_out, d_in)


ELEMENTWISE_SCORES: dict[str, Callable[..., Iterator[tuple[ScoredModule, torch.Tensor]]]] = {
    "snip": snip_scores,
    "wanda": wanda_scores,
}


@dataclass(frozen=True)
class ScoreMethod:
    name: str
    kind: str  # the region kind it writes: neurons | ranks
    targets: tuple[str, ...]  # what it can score: weights (the merged model), lora (the adapter's A/B matrices)
    uses_utility: Callable[[ScoreSettings], bool]  # whether it needs utility calibration data with these settings
    summary: str
    select: Callable[["ScoreMethod", nn.Module, Sequence[ScoredModule], Sequence[CalibrationBatch],
                      Sequence[CalibrationBatch], ScoreSettings], Selection]


class _HeadSums:
    """Per attention block (model.layers.<i>.self_attn), each head's summed score over its q_proj rows and o_proj
    columns, added while the module's score is at hand; the scores themselves are not kept."""

    def __init__(self, num_heads: int):
        self.num_heads = num_heads
        self.heads: dict[str, torch.Tensor] = {}

    def add(self, scored: ScoredModule, score: torch.Tensor) -> None:
        if self.num_heads <= 0 or scored.kind not in ("q_proj", "o_proj"):
            return
        block = scored.key.rsplit(".", 2)[0]
        sums = q_head_sums(score, self.num_heads) if scored.kind == "q_proj" else o_head_sums(score, self.num_heads)
        self.heads[block] = self.heads.get(block, torch.zeros(self.num_heads)) + sums.cpu()


class ScoreMemo:
    """Element-wise scores of whole models, kept in CPU memory up to `budget_bytes` in all, the oldest dropped first.

    A search whose trials differ only in the selected fraction computes SNIP or Wanda on the same model and the same
    calibration data again and again; the selection (a top fraction) is the cheap part. A key's scores are kept only
    once every module was scored (a call stopped halfway keeps nothing), and a model whose scores alone exceed the
    budget is recomputed every time (`too_big` names it, so the caller can say so). Only the module keys and the
    score tensors are kept, never a module: the next call's model is a new one.
    """

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.entries: dict[str, tuple[str, dict[str, torch.Tensor]]] = {}  # key -> (origin, module key -> score)
        self.too_big: set[str] = set()
        self.hits: list[tuple[str, str]] = []  # (key, origin) of every call answered from memory

    def held_bytes(self) -> int:
        return sum(score.numel() * score.element_size() for _, scores in self.entries.values()
                   for score in scores.values())

    def scores(self, key: str, origin: str, compute: Callable[[], Iterator[tuple[ScoredModule, torch.Tensor]]],
               modules: Sequence[ScoredModule]) -> Iterator[tuple[ScoredModule, torch.Tensor]]:
        """The scores under `key` if held for exactly these modules, else `compute()`'s, kept on the way.
        `origin` (who computes them, e.g. a run id) is what a later hit reports."""
        if key in self.entries:
            held_origin, held = self.entries[key]
            if list(held) == [scored.key for scored in modules]:
                self.hits.append((key, held_origin))
                for scored in modules:
                    yield scored, held[scored.key]
                return
            del self.entries[key]
        if key in self.too_big:
            yield from compute()
            return
        kept: dict[str, torch.Tensor] | None = {}
        kept_bytes = 0
        for scored, score in compute():
            if kept is not None:
                kept_bytes += score.numel() * score.element_size()
                if kept_bytes <= self.budget_bytes:
                    kept[scored.key] = score.detach().to("cpu")
                else:
                    kept = None
                    self.too_big.add(key)
            yield scored, score
        if kept is not None:
            while self.entries and self.held_bytes() + kept_bytes > self.budget_bytes:
                del self.entries[next(iter(self.entries))]
            self.entries[key] = (origin, kept)


def _scores(score_name: str, model, modules, batches, settings: ScoreSettings, calibration: str,
            description: str) -> Iterator[tuple[ScoredModule, torch.Tensor]]:
    """One element-wise score of every module on one calibration set (`safety` or `utility`), from the memo when
    the settings carry one that holds it."""
    def compute():
        return ELEMENTWISE_SCORES[score_name](model, modules, batches, settings.state_budget_bytes, description)

    if settings.memo is None or not settings.memo_key:
        return compute()
    key = f"{settings.memo_key}|{score_name}|{calibration}"
    return settings.memo.scores(key, settings.memo_origin, compute, modules)


def _elementwise(score_name: str):
    def select(method: ScoreMethod, model, modules, safety, utility, settings: ScoreSettings) -> Selection:
        region = Selection("neurons")
        heads = _HeadSums(settings.num_heads)
        storage = _MaskStorage(modules)
        select_top = top_fraction_mask_rows if settings.comparison == "row" else top_fraction_mask
        for scored, score in _scores(score_name, model, modules, safety, settings, "safety",
                                     f"{method.name} safety"):
            _keep(region, scored, select_top(score, settings.sparsity, out=storage[scored.key]))
            heads.add(scored, score)
            del score
        region.heads = heads.heads
        return region

    return select


def _set_difference(method: ScoreMethod, model, modules, safety, utility, settings: ScoreSettings) -> Selection:
    region = Selection("neurons")
    heads = _HeadSums(settings.num_heads)
    storage = _MaskStorage(modules)  # the top-q safety masks wait there for the utility pass, not the scores
    score_name = settings.difference_score
    for scored, score in _scores(score_name, model, modules, safety, settings, "safety", f"{method.name} safety"):
        top_fraction_mask(score, settings.top_q, out=storage[scored.key])
        heads.add(scored, score)
        del score
    for scored, score in _scores(score_name, model, modules, utility, settings, "utility",
                                 f"{method.name} utility"):
        mask = storage[scored.key]
        mask &= ~top_fraction_mask(score, settings.top_p).cpu()
        _keep(region, scored, mask)
        del score
    region.heads = heads.heads
    return region


def _actsvd(method: ScoreMethod, model, modules, safety, utility, settings: ScoreSettings) -> Selection:
    """Bases of the safety (r_s) and utility (r_u) output directions; the region is their rank projection."""
    region = Selection("ranks")
    safety_bases = {}
    for scored, gram in output_grams(model, modules, safety, settings.state_budget_bytes, f"{method.name} safety"):
        safety_bases[scored.key] = gram.top_directions(min(settings.safety_rank, min(scored.weight.shape))).cpu()
    utility_bases = {m.key: torch.zeros((m.weight.shape[0], 0)) for m in modules}
    if settings.utility_rank > 0:
        for scored, gram in output_grams(model, modules, utility, settings.state_budget_bytes,
                                         f"{method.name} utility"):
            rank = min(settings.utility_rank, min(scored.weight.shape))
            utility_bases[scored.key] = gram.top_directions(rank).cpu()
    for scored in modules:
        safety_basis, utility_basis = safety_bases[scored.key], utility_bases[scored.key]
        region.tensors[f"{scored.key}::safety"] = safety_basis
        region.tensors[f"{scored.key}::utility"] = utility_basis
        region.selected[scored.key] = projection_rank(safety_basis, utility_basis)
        region.totals[scored.key] = min(scored.weight.shape)
    return region


def _lora_actsvd(method: ScoreMethod, model, modules, safety, utility, settings: ScoreSettings) -> Selection:
    """Per LoRA matrix, W_low = U_k U_kᵀ W from its top output directions on safety data, and the top `sparsity`
    of |W_low|. Sequential (NLSR): layer by layer, each layer's matrices recorded in one pass over the model whose
    earlier layers were already replaced by their W_low, then replaced in turn; the originals come back at the end."""
    region = Selection("neurons")
    storage = _MaskStorage(modules)
    layers = sorted({m.layer for m in modules}) if settings.lora_sequential else [None]
    originals: dict[str, torch.Tensor] = {}
    try:
        for layer in layers:
            group = [m for m in modules if layer is None or m.layer == layer]
            label = method.name if layer is None else f"{method.name} layer {layer}"
            low_ranks = {}
            for scored, gram in output_grams(model, group, safety, settings.state_budget_bytes, label):
                kept = int(settings.lora_rank_fraction * min(scored.weight.shape))
                basis = gram.top_directions(kept).to(scored.weight.device)
                low_ranks[scored.key] = basis @ (basis.T @ scored.weight.detach().float())
            for scored in group:  # only after the whole layer was recorded, as NLSR's wrapper does
                low_rank = low_ranks.pop(scored.key)
                if settings.lora_sequential:
                    originals[scored.key] = scored.weight.detach().clone()
                    with torch.no_grad():
                        scored.weight.copy_(low_rank.to(scored.weight.dtype))
                _keep(region, scored, top_fraction_mask(low_rank.abs_(), settings.sparsity, out=storage[scored.key]))
    finally:
        with torch.no_grad():
            for scored in modules:
                if scored.key in originals:
                    scored.weight.copy_(originals.pop(scored.key))
    return region


class _MaskStorage:
    """Every module's bool mask as a view of one CPU buffer allocated up front: masks live as long as the region,
    and thousands of separate ~MB allocations between the short-lived scores would fragment the heap."""

    def __init__(self, modules: Sequence[ScoredModule]):
        self.buffer = torch.zeros(sum(m.weight.numel() for m in modules), dtype=torch.bool)
        self.views: dict[str, torch.Tensor] = {}
        offset = 0
        for scored in modules:
            numel = scored.weight.numel()
            self.views[scored.key] = self.buffer[offset:offset + numel].view(scored.weight.shape)
            offset += numel

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.views[key]


def _keep(region: Selection, scored: ScoredModule, mask: torch.Tensor) -> None:
    region.tensors[scored.key] = mask
    region.selected[scored.key] = int(mask.sum())
    region.totals[scored.key] = mask.numel()


METHODS: Registry[ScoreMethod] = Registry("scoring method")


def register(method: ScoreMethod) -> ScoreMethod:
    return METHODS.register(method.name, method)


def _never(settings: ScoreSettings) -> bool:
    return False


def _always(settings: ScoreSettings) -> bool:
    return True


def _with_utility_ranks(settings: ScoreSettings) -> bool:
    return settings.utility_rank > 0


register(ScoreMethod("snip", "neurons", TARGETS, _never,
                     "|W ⊙ Σ_x ∇_W L(x)|, cross-entropy on response tokens", _elementwise("snip")))
register(ScoreMethod("wanda", "neurons", TARGETS, _never,
                     "|W_ij| · ‖X_j‖₂ over response-token inputs", _elementwise("wanda")))
register(ScoreMethod("set_difference", "neurons", TARGETS, _always,
                     "top-q safety score minus top-p utility score, per matrix", _set_difference))
register(ScoreMethod("actsvd", "ranks", ("weights",), _with_utility_ranks,
                     "safety output ranks of XWᵀ outside the utility ranks", _actsvd))
register(ScoreMethod("lora_actsvd", "neurons", ("lora",), _never,
                     "NLSR: top |W| of each LoRA matrix projected on its top output directions", _lora_actsvd))


def get_method(name: str) -> ScoreMethod:
    return METHODS.get(name)


def score_region(method_name: str, model: nn.Module, modules: Sequence[ScoredModule],
                 safety: Sequence[CalibrationBatch], utility: Sequence[CalibrationBatch],
                 settings: ScoreSettings) -> Selection:
    """Run one method over the calibration batches; the model's weights are left as they were."""
    method = get_method(method_name)
    if method.uses_utility(settings) and not utility:
        raise ValueError(f"{method.name} needs utility calibration data")
    if settings.difference_score not in ELEMENTWISE_SCORES:
        raise ValueError(f"unknown difference score {settings.difference_score!r}; "
                         f"one of {', '.join(ELEMENTWISE_SCORES)}")
    was_training = model.training
    model.eval()
    try:
        return method.select(method, model, modules, safety, utility, settings)
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------------------------------------------
# Applying a region (the sanity check: remove the selected weights, or a random set of the same size)
# ---------------------------------------------------------------------------------------------------------------


def random_like_mask(mask: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A bool mask of the same shape with the same number of True entries, at random positions."""
    count = int(mask.sum())
    chosen = torch.zeros(mask.numel(), dtype=torch.bool)
    chosen[torch.randperm(mask.numel(), generator=generator)[:count]] = True
    return chosen.view(mask.shape)


def random_basis(d_out: int, rank: int, generator: torch.Generator) -> torch.Tensor:
    """An orthonormal basis of a random rank-`rank` subspace of the output space (d_out × rank)."""
    if rank == 0:
        return torch.zeros((d_out, 0))
    q, _ = torch.linalg.qr(torch.randn(d_out, rank, generator=generator, dtype=torch.float64))
    return q.float()


@torch.no_grad()
def zero_masked(weight: torch.Tensor, mask: torch.Tensor) -> Callable[[], None]:
    """Zero the masked entries of a weight in place; returns the function that puts them back exactly."""
    mask = mask.to(weight.device)
    removed = weight[mask].clone()
    weight[mask] = 0

    def undo() -> None:
        with torch.no_grad():
            weight[mask] = removed

    return undo


@torch.no_grad()
def remove_rank_region(weight: torch.Tensor, left: torch.Tensor, basis: torch.Tensor) -> Callable[[], None]:
    """W ← W − L (Bᵀ W) in place, the rank region P = L Bᵀ removed (actsvd: L = (I − U_u U_uᵀ) U_s, B = U_s);
    returns the function that adds it back (exact up to float rounding). Only the low-rank factors are kept."""
    left = left.to(weight.device, torch.float32)
    right = basis.to(weight.device, torch.float32).T @ weight.float()  # (rank, d_in)
    weight.copy_((weight.float() - left @ right).to(weight.dtype))

    def undo() -> None:
        with torch.no_grad():
            weight.copy_((weight.float() + left @ right).to(weight.dtype))

    return undo
