"""The batched evaluator against a per-prompt generation loop and a bare batched `model.generate`.

Same model, prompts and token budget, one process. Prints `name: value` lines:
  evaluator_prompts_per_s, per_prompt_loop_prompts_per_s, bare_generate_prompts_per_s,
  speedup_vs_per_prompt (goal >= 5), overhead_vs_bare_generate (evaluator seconds / bare seconds, goal <= 1.3),
  same_text_as_per_prompt_loop (greedy texts identical to generating each prompt alone),
  shared_template_speedup (the evaluator running each prompt whole / running the batch's shared template once).
The per-prompt loop is what the peers' pred.py scripts do: one prompt, one generate call, at a time.

    .venv/bin/python bench/eval_throughput.py                  # SmolLM2, 32 held-out harmful prompts, 48 tokens
    .venv/bin/python bench/eval_throughput.py --model tiny --prompts 64
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    import torch

    from realign import data, models
    from realign.config import load_preset, from_dict, ModelConfig
    from realign.eval import generate_responses

    model_cfg = from_dict(ModelConfig, load_preset("model", args.model))
    model = models.load_model(model_cfg)
    tokenizer = models.load_tokenizer(model_cfg)
    prompts = [data.format_prompt(p) for p in data.harmful_eval_prompts(args.prompts, 0)]
    budget = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)

    generate_responses(model, tokenizer, prompts[:2], max_new_tokens=4)  # warm-up

    # The evaluator as it runs (the batch's shared template once) and with each prompt run whole, alternating
    # (ABBA) so that a machine that speeds up or slows down mid-run affects both alike.
    seconds = {True: 0.0, False: 0.0}
    texts = {}
    for share in (True, False, False, True):
        start = time.perf_counter()
        texts[share] = generate_responses(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                                          batch_size=args.batch_size, stop_strings=(), share_prefix=share)
        seconds[share] += (time.perf_counter() - start) / 2
    batched, unshared = texts[True], texts[False]
    evaluator, evaluator_unshared = seconds[True], seconds[False]

    start = time.perf_counter()
    alone = []
    with torch.inference_mode():
        for prompt in prompts:
            inputs = tokenizer(prompt, return_tensors="pt")
            out = model.generate(**inputs, **budget)
            alone.append(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    per_prompt = time.perf_counter() - start

    tokenizer.padding_side = "left"
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), args.batch_size):
            inputs = tokenizer(prompts[i:i + args.batch_size], return_tensors="pt", padding=True)
            out = model.generate(**inputs, **budget)
            tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    bare = time.perf_counter() - start

    n = len(prompts)
    print(f"model: {args.model}")
    print(f"prompts: {n}")
    print(f"max_new_tokens: {args.max_new_tokens}")
    print(f"evaluator_prompts_per_s: {n / evaluator:.2f}")
    print(f"per_prompt_loop_prompts_per_s: {n / per_prompt:.2f}")
    print(f"bare_generate_prompts_per_s: {n / bare:.2f}")
    print(f"speedup_vs_per_prompt: {per_prompt / evaluator:.2f}  (goal >= 5)")
    print(f"overhead_vs_bare_generate: {evaluator / bare:.3f}  (goal <= 1.3; < 1: ended rows leave the batch)")
    print(f"same_text_as_per_prompt_loop: {sum(a == b for a, b in zip(batched, alone))}/{n}")
    print(f"shared_template_speedup: {evaluator_unshared / evaluator:.2f}  (each prompt run whole / the template once)")
    print(f"same_text_with_and_without_sharing: {sum(a == b for a, b in zip(batched, unshared))}/{n}")


if __name__ == "__main__":
    main()
