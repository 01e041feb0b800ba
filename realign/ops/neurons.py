"""Safety-critical weights: SNIP, Wanda, set difference, ActSVD (Wei et al. 2024, arXiv 2402.05162) and NLSR's
LoRA ActSVD (Yi et al. 2024, arXiv 2412.12497). Pure torch: no MLflow, no TRL.

A calibration example x is a prompt and a response; only the response tokens count ("response-token only": the
prompt's labels are -100, and activations are taken at response positions only). Per scored linear weight W
(d_out × d_in, its input X at those positions, stacked over every example):

- ``snip``: I = |W ⊙ Σ_x ∇_W L(x)|, L(x) = the mean cross-entropy over x's response tokens (the gradient is summed
  over examples, then multiplied and made absolute, as the issue defines it; the seed's code sums |∇_W L(x)| per
  example instead).
- ``wanda``: I_ij = |W_ij| · ‖X_j‖₂, the L2 norm of input channel j over every response token.
- ``set_difference``: top-q of the safety score minus top-p of the utility score, per weight matrix (score: snip or
  wanda, `ScoreSettings.difference_score`).
- ``actsvd``: U_s = the top-r_s output directions of the layer on safety data: the top right singular vectors of
  S = XWᵀ (n × d_out, the layer's outputs at response tokens), i.e. the top eigenvectors of SᵀS = W XᵀX Wᵀ; U_u the
  same with r_u directions on utility data. The safety rank region of W is P = (I − U_u U_uᵀ) U_s U_sᵀ on the output
  side, removed as W − PW; r_u = 0 is plain ActSVD (the top safety ranks themselves).
- ``lora_actsvd``: the same projection on each LoRA matrix (A: r × d_in, B: d_out × r) of a reference adapter,
  keeping k = ⌊f · min(d_out, d_in)⌋ directions (f = 0.8 in NLSR): W_low = U_k U_kᵀ W; the selection is the top
  `sparsity` (NLSR: 20 %) of |W_low| per matrix.

Element-wise selections take the top ⌊fraction · numel⌋ scores of each weight matrix (ties broken by torch.topk),
or with `comparison="row"` the top ⌊fraction · d_in⌋ of each output row (Wei et al.'s per-output comparison; NLSR's
prune.py ranks Wanda and WandG per row). NLSR's own mask keeps the entries strictly above the value at sorted index
⌊0.8·numel⌋, i.e. the top 20 % less its ties; topk breaks the ties instead, which differs by at most the tied entries.

Memory: scores exist one pass at a time. A pass runs the model over the calibration data with hooks (or
gradients) on a group of whole decoder layers whose state fits `state_budget_bytes`: Wanda keeps one d_in vector
per module (one pass), ActSVD one min(d_in, d_out)² Gram matrix per module, SNIP one float32 gradient sum per
weight (its backward recomputes each layer's activations instead of storing them all, and the output layer runs on
response positions only). Each module's score is turned into its mask (and head sums) as soon as its pass ends and
then dropped; masks share one bool buffer; a forward pass stops right after the last module it needs. Nothing like
a full dump of score matrices is kept.
"""

from __future__ import annotations

import contextlib
import functools
import re
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from tqdm import tqdm


IGNORE_INDEX = -100  # label of a prompt or padding token: no loss, no activation
TARGETS = ("weights", "lora")
LORA_PARTS = ("lora_A", "lora_B")
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_DECODER_LAYER = re.compile(r"(?:^|\.)layers\.\d+$")


# ---------------------------------------------------------------------------------------------------------------
# Calibration batches
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class CalibrationBatch:
    input_ids: torch.Tensor  # (B, T), right-padded
    attention_mask: torch.Tensor  # (B, T), 0 on padding
    labels: torch.Tensor  # (B, T), the token id on response tokens, IGNORE_INDEX elsewhere

    @property
    def response_mask(self) -> torch.Tensor:
        """True at positions that hold a response token: where activations are taken."""
        return self.labels != IGNORE_INDEX

    def to(self, device: torch.device | str) -> "CalibrationBatch":
        return CalibrationBatch(self.input_ids.to(device), self.attention_mask.to(device), self.labels.to(device))


def collate(examples: Sequence[tuple[Sequence[int], Sequence[int]]], pad_token_id: int, max_length: int,
            batch_size: int) -> list[CalibrationBatch]:
    """(prompt ids, response ids) pairs -> right-padded batches whose labels mark the response tokens only.

    An example longer than `max_length` loses the start of its prompt, not its response (the scored part): it keeps
    the prompt's last tokens (the instruction and "### Response:") and up to max_length − 1 response tokens.
    """
    if batch_size < 1 or max_length < 2:
        raise ValueError(f"batch_size must be >= 1 and max_length >= 2, got {batch_size} and {max_length}")
    rows = []
    for index, (prompt, response) in enumerate(examples):
        if not response:
            raise ValueError(f"calibration example {index} has an empty response")
        response = list(response)[:max_length - 1]
        prompt = list(prompt)[max(0, len(prompt) - (max_length - len(response))):]
        rows.append((prompt + response, [IGNORE_INDEX] * len(prompt) + response))
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        for row, (ids, row_labels) in enumerate(chunk):
            input_ids[row, :len(ids)] = torch.tensor(ids)
            attention_mask[row, :len(ids)] = 1
            labels[row, :len(ids)] = torch.tensor(row_labels)
        batches.append(CalibrationBatch(input_ids, attention_mask, labels))
    return batches


def count_examples(batches: Sequence[CalibrationBatch]) -> int:
    return sum(batch.input_ids.shape[0] for batch in batches)


# ---------------------------------------------------------------------------------------------------------------
# Which weights are scored
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ScoredModule:
    """One linear layer whose weight is scored."""

    key: str  # the weight's name in the region file: state_dict name, or the adapter file's key (target lora)
    module: nn.Linear
    layer: int  # decoder layer index
    kind: str  # q_proj, ..., down_proj; with target lora q_proj.lora_A, q_proj.lora_B, ...

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight


def find_scored_modules(model: nn.Module, module_names: Sequence[str], target: str) -> list[ScoredModule]:
    """The linear layers of the decoder blocks named in `module_names` (q_proj, ..., down_proj), in model order.

    target ``weights``: the (merged) model's own layers, keys as in ``state_dict()``
    (``model.layers.0.self_attn.q_proj.weight``). target ``lora``: the LoRA A/B layers of a PEFT model, keys as in
    its ``adapter_model.safetensors`` (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``).
    """
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; one of {', '.join(TARGETS)}")
    wanted = set(module_names)
    found = []
    for name, module in model.named_modules():
        layer = _LAYER_INDEX.search(name)
        if layer is None or not isinstance(module, nn.Linear):
            continue
        parts = name.split(".")
        if target == "weights" and parts[-1] in wanted and not any(part in LORA_PARTS for part in parts):
            found.append(ScoredModule(f"{name}.weight", module, int(layer.group(1)), parts[-1]))
        elif target == "lora" and len(parts) >= 3 and parts[-2] in LORA_PARTS and parts[-3] in wanted:
            # PEFT names the layer <module>.lora_A.<adapter name>; the adapter file drops the adapter name.
            key = ".".join(parts[:-1]) + ".weight"
            found.append(ScoredModule(key, module, int(layer.group(1)), f"{parts[-3]}.{parts[-2]}"))
    return found


def plan_passes(modules: Sequence[ScoredModule], state_bytes: Callable[[ScoredModule], int],
                budget_bytes: int) -> list[list[ScoredModule]]:
    """Whole decoder layers grouped in order so that each group's scoring state stays within `budget_bytes`
    (a layer bigger than the budget gets a pass of its own)."""
    by_layer: dict[int, list[ScoredModule]] = {}
    for module in modules:
        by_layer.setdefault(module.layer, []).append(module)
    passes: list[list[ScoredModule]] = []
    current: list[ScoredModule] = []
    current_bytes = 0
    for layer in sorted(by_layer):
        layer_bytes = sum(state_bytes(m) for m in by_layer[layer])
        if current and current_bytes + layer_bytes > budget_bytes:
            passes.append(current)
            current, current_bytes = [], 0
        current.extend(by_layer[layer])
        current_bytes += layer_bytes
    if current:
        passes.append(current)
    return passes


# ---------------------------------------------------------------------------------------------------------------
# Passes over the calibration data
# ---------------------------------------------------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by a hook once every module of the pass has run: the rest of the forward pass is not needed."""


class _ActivationPass:
    """Forward hooks on a group of modules that see their inputs and outputs at response positions only."""

    def __init__(self, modules: Sequence[ScoredModule],
                 record: Callable[[ScoredModule, torch.Tensor, torch.Tensor, torch.Tensor], None]):
        self.modules = list(modules)
        self.record = record
        self.response_mask: torch.Tensor | None = None
        self.seen: set[str] = set()
        self.handles = []

    def __enter__(self) -> "_ActivationPass":
        for scored in self.modules:
            self.handles.append(scored.module.register_forward_hook(self._hook(scored)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _hook(self, scored: ScoredModule):
        def hook(module, args, output):
            self.record(scored, args[0].detach(), output.detach(), self.response_mask)
            self.seen.add(scored.key)
            if len(self.seen) == len(self.modules):
                raise _StopForward

        return hook

    def run(self, model: nn.Module, batches: Sequence[CalibrationBatch], description: str) -> None:
        device = _device_of(model)
        with torch.no_grad():
            for batch in tqdm(batches, desc=description, unit="batch", disable=None):
                batch = batch.to(device)
                self.response_mask = batch.response_mask
                self.seen = set()
                try:
                    model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
                except _StopForward:
                    pass
                if len(self.seen) != len(self.modules):
                    missing = sorted({m.key for m in self.modules} - self.seen)
                    raise RuntimeError(f"the forward pass never reached {missing[0]}")
        self.response_mask = None


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def response_loss_sum(model: nn.Module, batch: CalibrationBatch, chunk_tokens: int = 64) -> torch.Tensor:
    """Σ_x L(x) over the batch, L(x) = mean next-token cross-entropy over x's response tokens.

    The output layer runs on the response positions only: a pre-hook on it takes the final hidden states, computes
    the loss there and stops the forward pass, so the (batch × length × vocabulary) logits are never built. The
    loss is summed over chunks of `chunk_tokens` positions whose logits are recomputed in the backward pass, so at
    most one chunk's logits exist at a time, whatever the batch and the vocabulary.
    """
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise TypeError(f"the output layer is {type(head).__name__}, not a Linear layer")
    targets = batch.labels[:, 1:]
    predicting = targets != IGNORE_INDEX  # the hidden state at t predicts token t + 1
    rows = predicting.nonzero()[:, 0]
    per_example_weight = 1.0 / predicting.sum(dim=1).float()  # each example's tokens average to its own loss
    token_weights = per_example_weight[rows]
    token_targets = targets[predicting]
    result: dict[str, torch.Tensor] = {}

    def loss_from_hidden(module: nn.Linear, args):
        hidden = args[0][:, :-1][predicting]  # (response tokens, hidden size)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], chunk_tokens):
            end = start + chunk_tokens
            total = total + torch.utils.checkpoint.checkpoint(
                _weighted_cross_entropy, hidden[start:end], module.weight, module.bias, token_targets[start:end],
                token_weights[start:end], use_reentrant=False)
        result["loss"] = total
        raise _StopForward

    handle = head.register_forward_pre_hook(loss_from_hidden)
    try:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
    return result["loss"]


def _weighted_cross_entropy(hidden, weight, bias, targets, weights) -> torch.Tensor:
    logits = F.linear(hidden, weight, bias).float()
    return (F.cross_entropy(logits, targets, reduction="none") * weights).sum()


@contextlib.contextmanager
def recomputed_layer_activations(model: nn.Module) -> Iterator[None]:
    """Activation checkpointing of every decoder layer (``layers.<i>``) for as long as the context lasts: the backward
    pass recomputes a layer's activations instead of keeping all of them, so a pass holds about one layer's
    activations (plus each layer's input) rather than every layer's. The model stays in eval mode (HF's own
    gradient checkpointing only acts in train mode, which would switch dropout on)."""
    layers = [module for name, module in model.named_modules() if _DECODER_LAYER.search(name)]
    for layer in layers:
        layer.forward = functools.partial(torch.utils.checkpoint.checkpoint, layer.forward, use_reentrant=False)
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward  # the instance attribute goes; the class's forward is back


def snip_scores(model: nn.Module, modules: Sequence[ScoredModule], batches: Sequence[CalibrationBatch],
                budget_bytes: int, description: str = "snip") -> Iterator[tuple[ScoredModule, torch.Tensor]]:
    """(module, |W ⊙ Σ_x ∇_W L(x)|) for each module, float32, one pass (forward + backward) per layer group.

    Gradients are summed in float32 buffers by a post-accumulate hook that frees each `.grad` at once, so only the
    current group's sums are ever held, whatever the model's dtype; decoder layers recompute their activations in
    the backward pass (`recomputed_layer_activations`).
    """
    passes = plan_passes(modules, lambda m: m.weight.numel() * 4, budget_bytes)
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    device = _device_of(model)
    try:
        for number, group in enumerate(passes, start=1):
            model.requires_grad_(False)
            sums = {m.key: torch.zeros(m.weight.shape, dtype=torch.float32, device=m.weight.device) for m in group}
            handles = []
            for scored in group:
                scored.weight.requires_grad_(True)
                handles.append(scored.weight.register_post_accumulate_grad_hook(_add_and_free(sums[scored.key])))
            try:
                with recomputed_layer_activations(model):
                    for batch in tqdm(batches, desc=f"{description} pass {number}/{len(passes)}", unit="batch",
                                      disable=None):
                        response_loss_sum(model, batch.to(device)).backward()
            finally:
                for handle in handles:
                    handle.remove()
                model.requires_grad_(False)
            for scored in group:
                gradient_sum = sums.pop(scored.key)
                yield scored, gradient_sum.mul_(scored.weight.detach()).abs_()  # in place: no second copy
                del gradient_sum
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad[name])
            p.grad = None


def _add_and_free(buffer: torch.Tensor):
    def hook(param: torch.Tensor) -> None:
        buffer.add_(param.grad.float())
        param.grad = None

    return hook


def wanda_scores(model: nn.Module, modules: Sequence[ScoredModule], batches: Sequence[CalibrationBatch],
                 budget_bytes: int, description: str = "wanda") -> Iterator[tuple[ScoredModule, torch.Tensor]]:
    """(module, |W| · ‖X_j‖₂) for each module, float32; the input norms over response tokens from forward hooks."""
    passes = plan_passes(modules, lambda m: m.weight.shape[1] * 4, budget_bytes)
    for number, group in enumerate(passes, start=1):
        squares = {m.key: torch.zeros(m.weight.shape[1], dtype=torch.float32, device=m.weight.device) for m in group}

        def record(scored: ScoredModule, inputs: torch.Tensor, outputs: torch.Tensor, mask: torch.Tensor) -> None:
            squares[scored.key].add_(inputs[mask].float().pow(2).sum(dim=0))

        with _ActivationPass(group, record) as hooks:
            hooks.run(model, batches, f"{description} pass {number}/{len(passes)}")
        for scored in group:
            norms = squares.pop(scored.key).sqrt_()
            yield scored, scored.weight.detach().abs().float().mul_(norms.unsqueeze(0))


@dataclass
class OutputGram:
    """SᵀS for S = XWᵀ (the layer's outputs at response tokens), held in the smaller of two forms: SᵀS itself
    (d_out × d_out, when d_out <= d_in), or XᵀX (d_in × d_in) with W, since SᵀS = W XᵀX Wᵀ."""

    gram: torch.Tensor  # float64: SᵀS, or XᵀX when `weight` is set
    weight: torch.Tensor | None = None

    def matrix(self) -> torch.Tensor:
        """SᵀS (d_out × d_out, float64)."""
        if self.weight is None:
            return self.gram
        weight = self.weight.double()
        return weight @ self.gram @ weight.T

    def top_directions(self, count: int) -> torch.Tensor:
        """The `count` output directions with the largest singular values of S (d_out × count, float32 columns):
        the top eigenvectors of SᵀS. In the input form, the left singular vectors of W L with XᵀX = L Lᵀ (a thin
        SVD of d_out × d_in instead of an eigendecomposition of d_out × d_out)."""
        if self.weight is None:
            _, vectors = torch.linalg.eigh(self.gram)  # ascending eigenvalues
            return vectors[:, self.gram.shape[0] - count:].flip(1).float().contiguous()
        values, vectors = torch.linalg.eigh(self.gram)
        factor = vectors * values.clamp(min=0).sqrt()  # L, XᵀX = L Lᵀ
        left, _, _ = torch.linalg.svd(self.weight.double() @ factor, full_matrices=False)  # descending
        return left[:, :count].float().contiguous()


def output_grams(model: nn.Module, modules: Sequence[ScoredModule], batches: Sequence[CalibrationBatch],
                 budget_bytes: int, description: str = "actsvd") -> Iterator[tuple[ScoredModule, OutputGram]]:
    """(module, SᵀS) for each module, S = XWᵀ over response tokens: the top eigenvectors of SᵀS are the output
    directions ActSVD keeps. Each module sums min(d_in, d_out)² floats: SᵀS from the layer's output (bias removed)
    when d_out <= d_in, else XᵀX from its input."""
    def state_bytes(scored: ScoredModule) -> int:
        return min(scored.weight.shape) ** 2 * 4

    passes = plan_passes(modules, state_bytes, budget_bytes)
    for number, group in enumerate(passes, start=1):
        grams = {m.key: torch.zeros((min(m.weight.shape),) * 2, dtype=torch.float32, device=m.weight.device)
                 for m in group}

        def record(scored: ScoredModule, inputs: torch.Tensor, outputs: torch.Tensor, mask: torch.Tensor) -> None:
            d_out, d_in = scored.weight.shape
            if d_out <= d_in:
                y = outputs[mask].float()  # (response tokens, d_out) = X Wᵀ (+ bias)
                if scored.module.bias is not None:
                    y = y - scored.module.bias.detach().float()
                grams[scored.key].add_(y.T @ y)
            else:
                x = inputs[mask].float()  # (response tokens, d_in)
                grams[scored.key].add_(x.T @ x)

        with _ActivationPass(group, record) as hooks:
            hooks.run(model, batches, f"{description} pass {number}/{len(passes)}")
        for scored in group:
            gram = grams.pop(scored.key).double()
            d_out, d_in = scored.weight.shape
            yield scored, OutputGram(gram, scored.weight.detach() if d_out > d_in else None)


# ---------------------------------------------------------------------------------------------------------------
# Selections
# ---------------------------------------------------------------------------------------------------------------


def top_fraction_mask(score: torch.Tensor, fraction: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask of the ⌊fraction · numel⌋ largest scores of one matrix (written into `out` when given)."""
    count = int(fraction * score.numel())
    mask = torch.zeros(score.shape, dtype=torch.bool, device=score.device) if out is None else out.zero_()
    if count > 0:
        mask.view(-1)[torch.topk(score.flatten(), count, sorted=False).indices.to(mask.device)] = True
    return mask


def top_fraction_mask_rows(score: torch.Tensor, fraction: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Bool mask of the ⌊fraction · d_in⌋ largest scores of each output row (row = one output neuron)."""
    count = int(fraction * score.shape[-1])
    mask = torch.zeros(score.shape, dtype=torch.bool, device=score.device) if out is None else out.zero_()
    if count > 0:
        indices = torch.topk(score, count, dim=-1, sorted=False).indices.to(mask.device)
        mask.scatter_(-1, indices, True)
    return mask


def set_difference_mask(safety_score: torch.Tensor, utility_score: torch.Tensor, top_q: float,
                        top_p: float) -> torch.Tensor:
    """Weights in the top-q of the safety score and not in the top-p of the utility score (one matrix)."""
    return top_fraction_mask(safety_score, top_q) & ~top_fraction_mask(utility_score, top_p)


def q_head_sums(q_score: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Each attention head's summed score over its rows of q_proj (d_out = num_heads · head_dim)."""
    return q_score.float().reshape(num_heads, -1).sum(dim=1)


def o_head_sums(o_score: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Each attention head's summed score over its columns of o_proj (d_in = num_heads · head_dim)."""
    return o_score.float().reshape(o_score.shape[0], num_heads, -1).sum(dim=(0, 2))
