"""Batched greedy generation that gives the same text as a per-prompt loop, only faster."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm import tqdm

# The Alpaca-style template the base models see: an unaligned base model tends to go on after its answer with
# another "### Instruction:" (or "### Explanation:", "### Response:") block, which belongs to no answer.
DEFAULT_STOP_STRINGS = ("###",)


def cut_at_stop_strings(text: str, stop_strings: Sequence[str]) -> str:
    """The text before the first occurrence of any stop string, stripped."""
    cut = len(text)
    for stop in stop_strings:
        position = text.find(stop)
        if position != -1:
            cut = min(cut, position)
    return text[:cut].strip()


def _eos_token_ids(model, tokenizer) -> set[int]:
    ids = {tokenizer.eos_token_id}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(configured) if isinstance(configured, (list, tuple)) else {configured}
    return {i for i in ids if i is not None}


def shared_prefix_length(token_lists: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every list has in common, leaving each at least one token of its own (the last
    prompt token's logits start its answer)."""
    if not token_lists:
        return 0
    limit = min(len(tokens) for tokens in token_lists) - 1
    length = 0
    while length < limit and all(tokens[length] == token_lists[0][length] for tokens in token_lists):
        length += 1
    return length


def greedy_new_tokens(model, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                      eos_ids: set[int], stop_strings: Sequence[str] = (),
                      prefix_ids: torch.Tensor | None = None) -> list[list[int]]:
    """The greedy continuation of each (left-padded) row, up to and including its end: an eos token, the token
    that completes a stop string, or `max_new_tokens` tokens.

    What `model.generate(do_sample=False)` computes, except that a row that has ended leaves the batch (and its
    slice of the key/value cache): the remaining rows do not keep paying for it. Positions follow the attention
    mask, as in `generate`, so padding changes nothing. With `prefix_ids` (1-D), every row's prompt is that prefix
    followed by its row: the prefix's keys and values are computed once and shared (a prompt template is about
    half of each prompt), its padding sits between prefix and row, masked, and positions skip it.
    """
    from transformers import DynamicCache

    import inspect

    # transformers renamed the argument (past_key_values -> cache); older 5.x releases know only the first.
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a PeftModel passes kwargs on
    cache_arg = "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"
    rows = input_ids.shape[0]
    generated: list[list[int]] = [[] for _ in range(rows)]
    active = torch.arange(rows, device=input_ids.device)
    cache = DynamicCache()
    prefix_length = 0 if prefix_ids is None else len(prefix_ids)
    if prefix_length:
        model(input_ids=prefix_ids[None, :], use_cache=True, logits_to_keep=1, **{cache_arg: cache})
        cache.batch_repeat_interleave(rows)
        attention_mask = torch.cat([attention_mask.new_ones((rows, prefix_length)), attention_mask], dim=-1)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, prefix_length:]
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=True, logits_to_keep=1, **{cache_arg: cache}).logits[:, -1, :]
    next_positions = position_ids[:, -1:] + 1
    for step in range(max_new_tokens):
        tokens = logits.argmax(dim=-1)
        keep = []
        for slot, (row, token) in enumerate(zip(active.tolist(), tokens.tolist())):
            generated[row].append(token)
            ended = token in eos_ids or (
                stop_strings and any(stop in tokenizer.decode(generated[row][-32:]) for stop in stop_strings))
            if not ended:
                keep.append(slot)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(active):  # rows that ended leave the batch and the cache
            kept = torch.tensor(keep, device=input_ids.device)
            cache.batch_select_indices(kept)
            active, tokens = active[kept], tokens[kept]
            attention_mask, next_positions = attention_mask[kept], next_positions[kept]
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(active), 1))], dim=-1)
        logits = model(input_ids=tokens[:, None], attention_mask=attention_mask, position_ids=next_positions,
                       use_cache=True, **{cache_arg: cache}).logits[:, -1, :]
        next_positions = next_positions + 1
    return generated


def _left_padded(token_lists: Sequence[Sequence[int]], shared: int, pad_id: int, device):
    """(the shared prefix, the rest of each row left-padded, its attention mask) as tensors on `device`."""
    rests = [list(tokens[shared:]) for tokens in token_lists]
    width = max(len(rest) for rest in rests)
    input_ids = torch.tensor([[pad_id] * (width - len(rest)) + rest for rest in rests], device=device)
    attention_mask = torch.tensor([[0] * (width - len(rest)) + [1] * len(rest) for rest in rests], device=device)
    return torch.tensor(list(token_lists[0][:shared]), dtype=torch.long, device=device), input_ids, attention_mask


def generate_responses(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    stop_strings: Sequence[str] = DEFAULT_STOP_STRINGS,
    add_special_tokens: bool = True,
    share_prefix: bool = True,
) -> list[str]:
    """Greedy responses to `prompts`, in the order of `prompts`.

    Prompts are sorted by token length and batched with LEFT padding (so every row's new tokens start at the
    same column and position ids follow the attention mask), which gives the same greedy text as generating
    each prompt alone. The tokens every prompt of a batch starts with (the prompt template) are run once
    (`share_prefix=False` runs each prompt whole: the same text, slower; bench/eval_throughput.py compares them).
    Only the new tokens are decoded, special tokens skipped, each cut at the first stop string and stripped.
    `add_special_tokens=False` is for prompts that already carry them (chat templates). The tokenizer's padding
    side and pad token and the model's train/eval mode are restored afterwards.
    """
    if not prompts:
        return []
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")

    original_padding_side = tokenizer.padding_side
    original_pad_token = tokenizer.pad_token
    was_training = model.training
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        # Padded positions are masked out, so which token fills them does not matter; eos is always there.
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    try:
        prompt_ids = tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"]
        # Longest first: similar lengths share a batch (less padding), and an out-of-memory shows up at once.
        order = sorted(range(len(prompts)), key=lambda index: -len(prompt_ids[index]))
        responses: list[str | None] = [None] * len(prompts)
        eos_ids = _eos_token_ids(model, tokenizer)
        batch_starts = range(0, len(order), batch_size)
        with torch.inference_mode():
            for start in tqdm(batch_starts, desc="generating", unit="batch", disable=None):
                batch_indices = order[start : start + batch_size]
                token_lists = [prompt_ids[index] for index in batch_indices]
                shared = shared_prefix_length(token_lists) if share_prefix else 0
                prefix_ids, input_ids, attention_mask = _left_padded(token_lists, shared, tokenizer.pad_token_id,
                                                                     model.device)
                new_token_ids = greedy_new_tokens(model, tokenizer, input_ids, attention_mask, max_new_tokens,
                                                  eos_ids, stop_strings, prefix_ids=prefix_ids)
                texts = tokenizer.batch_decode(new_token_ids, skip_special_tokens=True)
                for index, text in zip(batch_indices, texts):
                    responses[index] = cut_at_stop_strings(text, stop_strings)
    finally:
        tokenizer.padding_side = original_padding_side
        if original_pad_token is None:
            tokenizer.pad_token = None
        model.train(was_training)
    return responses
