"""A LoRA training step in fp32 against the same step in bf16 autocast, one process, on this machine's CPU or GPU.

What `train.bf16` changes in the offline recipes: the weights stay fp32, the matrix products run in bf16. Same model,
LoRA (the offline recipes' r = 16, α = 32, every projection), batch and tokens; steps alternate between the two so
that a machine that slows down mid-run slows both. Prints `name: value` lines:
  fp32_step_s, bf16_step_s (medians), bf16_speedup (fp32 / bf16), cpu_native_bf16 (AVX512-BF16 on this CPU).
A CPU without native bf16 emulates it; there the speedup can fall below 1 and the recipes want `--train.bf16 false`.

    .venv/bin/python bench/train_precision.py                         # SmolLM2, batch 8 x 150 tokens, 6 steps each
    .venv/bin/python bench/train_precision.py --model tiny --steps 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=150)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()

    import torch
    from peft import get_peft_model

    from realign import models
    from realign.config import ModelConfig, from_dict, load_preset

    device = models.default_device()
    model_cfg = from_dict(ModelConfig, load_preset("model", args.model))
    model = models.load_model(model_cfg, trainable=True)
    model = get_peft_model(model, models.lora_config(16, 32, 0.05))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(0, model.config.vocab_size, (args.batch_size, args.tokens), generator=generator).to(device)

    def step(bf16: bool) -> float:
        started = time.perf_counter()
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started

    step(False), step(True)  # warm-up: first calls pay for allocation and kernel choice
    times = {False: [], True: []}
    for _ in range(args.steps):
        for bf16 in (False, True):
            times[bf16].append(step(bf16))
    fp32, bf16 = statistics.median(times[False]), statistics.median(times[True])
    print(f"device: {device}")
    print(f"cpu_native_bf16: {torch.cpu._is_avx512_bf16_supported()}")
    print(f"fp32_step_s: {fp32:.3f}")
    print(f"bf16_step_s: {bf16:.3f}")
    print(f"bf16_speedup: {fp32 / bf16:.2f}")


if __name__ == "__main__":
    main()
