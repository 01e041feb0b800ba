"""Peak resident memory of scoring with each method, as a multiple of the model's weight bytes, and seconds per
calibration sample.

Each method runs in a fresh subprocess on the same model and calibration data: load the model, build the batches,
touch every weight (so the model is resident, as it is once scoring starts), then score and turn the scores into
masks. The peak is the process's high-water mark of resident memory during scoring (Linux: VmHWM, reset just before
scoring through /proc/self/clear_refs; elsewhere ru_maxrss over the whole process). It counts everything the
process holds: Python, torch, the model, the calibration data and the scoring state. Prints `name: value` lines:
  weight_mb, baseline_rss_ratio (resident before scoring / weights),
  <method>_peak_rss_ratio (goal <= 2.5), <method>_added_ratio ((peak - baseline) / weights: the scoring itself),
  <method>_s_per_sample (scoring seconds / calibration examples, safety and utility together).
lora_actsvd scores a LoRA (r=16 on every module, random A and B) on top of the model.

    .venv/bin/python bench/score_memory.py                          # SmolLM2-135M, 16 examples per data set
    .venv/bin/python bench/score_memory.py --model tiny --nsamples 8 --methods wanda,snip
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

METHODS = ("wanda", "snip", "set_difference", "actsvd", "lora_actsvd")


def _status_bytes(field: str) -> int | None:
    """A field of /proc/self/status (Linux), in bytes; None elsewhere."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset the resident high-water mark (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    peak = _status_bytes("VmHWM")
    if peak is not None:
        return peak
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss if sys.platform == "darwin" else maxrss * 1024  # Linux reports KiB, macOS bytes


def current_rss_bytes() -> int:
    current = _status_bytes("VmRSS")
    return current if current is not None else peak_rss_bytes()


def child(method: str, model_name: str, nsamples: int, state_budget: float, batch_size: int) -> dict:
    """Score once in this process; the numbers the parent prints."""
    import torch

    from realign import models
    from realign.config import ModelConfig, from_dict, load_preset
    from realign.stage_configs import ScoreConfig
    from realign.ops import neurons, selection
    from realign.stages import score as stage

    cfg = ScoreConfig(method=method, nsamples=nsamples, sparsity=0.2 if method == "lora_actsvd" else 0.01,
                      target="lora" if method == "lora_actsvd" else "weights", utility_rank=10)
    cfg.model = from_dict(ModelConfig, load_preset("model", model_name))
    cfg.data.batch_size = batch_size
    model = models.load_model(cfg.model)
    if method == "lora_actsvd":
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=cfg.modules,
                                                 init_lora_weights=False))
        model.eval()
    tokenizer = models.load_tokenizer(cfg.model)
    spec = selection.METHODS[method]
    safety = stage.calibration_batches(tokenizer, stage.safety_calibration(cfg), cfg)
    utility = stage.calibration_batches(tokenizer, stage.utility_calibration(cfg), cfg) \
        if spec.uses_utility(stage.score_settings(cfg)) else []
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    with torch.no_grad():  # touch every weight once: the model's own pages are resident before scoring starts
        for parameter in model.parameters():
            parameter.sum()
    baseline = current_rss_bytes()
    reset_peak()
    modules = neurons.find_scored_modules(model, cfg.modules, cfg.target)
    base_config = model.config
    settings = stage.score_settings(cfg, base_config.num_attention_heads if cfg.target == "weights" else 0,
                                    int(state_budget * weight_bytes))
    start = time.perf_counter()
    region = selection.score_region(method, model, modules, safety, utility, settings)
    seconds = time.perf_counter() - start
    examples = neurons.count_examples(safety) + neurons.count_examples(utility)
    peak = peak_rss_bytes()
    return {"weight_bytes": weight_bytes, "baseline": baseline, "peak": peak, "seconds": seconds,
            "examples": examples, "selected": sum(region.selected.values())}


def main() -> None:
    from realign.config import resolve_stage_config
    from realign.stage_configs import ScoreConfig

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--methods", default=",".join(METHODS))
    defaults = resolve_stage_config(ScoreConfig, "score", "default", {"model": "tiny"})  # conf/score/default.yaml
    parser.add_argument("--state-budget", type=float, default=defaults.state_budget,
                        help="scoring state per pass / weight bytes (default: the stage's)")
    parser.add_argument("--batch-size", type=int, default=defaults.data.batch_size,
                        help="calibration batch size (default: the stage's)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.nsamples, args.state_budget, args.batch_size)))
        return

    print(f"model: {args.model}")
    print(f"nsamples: {args.nsamples}")
    print(f"batch_size: {args.batch_size}")
    print(f"state_budget: {args.state_budget}")
    weight_printed = False
    for method in args.methods.split(","):
        command = [sys.executable, __file__, "--child", method, "--model", args.model,
                   "--nsamples", str(args.nsamples), "--state-budget", str(args.state_budget),
                   "--batch-size", str(args.batch_size)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        weights = result["weight_bytes"]
        if not weight_printed:
            print(f"weight_mb: {weights / 2**20:.1f}")
            print(f"baseline_rss_ratio: {result['baseline'] / weights:.2f}")
            weight_printed = True
        print(f"{method}_peak_rss_ratio: {result['peak'] / weights:.2f}  (goal <= 2.5)")
        print(f"{method}_added_ratio: {(result['peak'] - result['baseline']) / weights:.2f}")
        print(f"{method}_s_per_sample: {result['seconds'] / result['examples']:.3f}")


if __name__ == "__main__":
    main()
