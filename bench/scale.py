"""How the cost of fusion and scoring grows with the model: one architecture family (SmolLM2's Llama shape) at three
sizes, random bfloat16 weights written once to disk.

Sizes (hidden, layers, heads, kv heads, MLP width; vocabulary 49,152, tied embeddings): `135m` (576, 30, 9, 3, 1536,
SmolLM2-135M's shape), `360m` (960, 32, 15, 5, 2560, SmolLM2-360M's), `1.7b` (2048, 24, 32, 32, 8192,
SmolLM2-1.7B's). Per size three checkpoints (base θ0, "fine-tuned" θ_ft = θ0 + noise, "reference" θ_ref = θ0 +
other noise; seeded, 1 % of θ0's standard deviation), SmolLM2's tokenizer beside them. Each measurement runs in a
subprocess of its own (its peak resident memory is its `ru_maxrss`, from os.wait4):
- `baseline`: the same imports (torch, realign.ops, safetensors) and nothing else: the Python/torch floor;
- `fuse-restore`: NLSR's restore on full weights (θ_ref's entries into θ_ft, every tensor), streamed as
  `realign fuse` runs it (`realign.ops.streaming.stream_fusion`);
- `fuse-ties`: TIES (density 0.2) of θ_ft and θ_ref onto θ0, streamed;
- `score-wanda`: the model loaded in bfloat16, Wanda importance of every linear weight on 8 harmful calibration
  examples (`realign score --method wanda`'s computation), masks at sparsity 0.01.
And `read`: every byte of the three checkpoints read once, sequentially, in 64 MiB blocks: the disk (or page
cache: the files were just written, and a container cannot drop the cache) read rate fusion is bounded by.

Prints `name: value` lines per size: bytes of one checkpoint, its largest tensor, and per measurement peak RSS,
peak minus the baseline, that over the largest tensor, seconds, and seconds per GB of one checkpoint. Goals:
fusion's `peak − baseline` within 1.1× the largest tensor plus a constant at every size (it must not grow with the
model), and its seconds per GB flat across sizes (time linear in bytes).

    .venv/bin/python bench/scale.py --workdir /tmp/realign-scale               # all three sizes (~14 GB of disk)
    .venv/bin/python bench/scale.py --sizes 135m,360m --keep                   # keep the checkpoints for a rerun
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHAPES = {  # hidden, layers, attention heads, kv heads, MLP width
    "135m": (576, 30, 9, 3, 1536),
    "360m": (960, 32, 15, 5, 2560),
    "1.7b": (2048, 24, 32, 32, 8192),
}
VOCAB = 49152
NOISE = 0.01
DENSITY = 0.2
MEASURES = ("baseline", "fuse-restore", "fuse-ties", "score-wanda")


def llama_config(size: str) -> dict:
    hidden, layers, heads, kv_heads, mlp = SHAPES[size]
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "intermediate_size": mlp, "vocab_size": VOCAB, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": True, "torch_dtype": "bfloat16",
            "bos_token_id": 1, "eos_token_id": 2}


def write_checkpoints(size: str, folder: Path) -> dict[str, str]:
    """θ0, θ_ft, θ_ref of one size (made once; a folder that holds them is reused)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from realign import models
    from realign.config import ModelConfig, load_preset

    paths = {role: folder / role for role in ("base", "finetuned", "reference")}
    if all((p / "model.safetensors").is_file() for p in paths.values()):
        return {role: str(p) for role, p in paths.items()}
    config = llama_config(size)
    with torch.device("meta"):  # only the names and shapes; the weights are drawn below, one tensor at a time
        shapes = {n: tuple(p.shape) for n, p in LlamaForCausalLM(LlamaConfig(**config)).state_dict().items()
                  if n != "lm_head.weight"}
    smollm2 = Path(models.resolve_model_dir(ModelConfig(**load_preset("model", "smollm2-135m"))))
    for index, (role, path) in enumerate(paths.items()):
        path.mkdir(parents=True, exist_ok=True)
        generator = torch.Generator().manual_seed(1234)  # θ0 drawn alike for all three, then each its noise
        noise = torch.Generator().manual_seed(index)
        tensors = {}
        for name, shape in shapes.items():
            scale = 1.0 if name.endswith("norm.weight") else 0.02
            base = torch.randn(shape, generator=generator) * scale + (1.0 if name.endswith("norm.weight") else 0.0)
            if index:
                base = base + NOISE * scale * torch.randn(shape, generator=noise)
            tensors[name] = base.to(torch.bfloat16)
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        (path / "config.json").write_text(json.dumps(config, indent=1))
        for file in smollm2.iterdir():
            if file.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")) and file.is_file():
                shutil.copyfile(file, path / file.name)
    return {role: str(p) for role, p in paths.items()}


def run_child(command: list[str]) -> tuple[int, float]:
    """(peak resident bytes, wall seconds) of one child, waited for with os.wait4 for its own ru_maxrss."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(command[2:6])} failed ({code}): {process.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss * 1024, seconds  # KiB on Linux


def child(what: str, inputs: dict[str, str], out: Path) -> None:
    """One measurement in this process (the parent reads its peak RSS and time)."""
    import torch  # noqa: F401  (the baseline's imports: what every other child also holds)
    from safetensors import safe_open  # noqa: F401

    from realign.ops import merge, streaming

    if what == "baseline":
        return
    if what.startswith("fuse-"):
        method = what.removeprefix("fuse-")
        params = merge.MergeParams(density=DENSITY) if method == "ties" else merge.MergeParams()
        plan = merge.FusionPlan(merge.get_merge_method(method), params)
        with streaming.WeightFiles(inputs["finetuned"]) as ft, streaming.WeightFiles(inputs["reference"]) as ref, \
                streaming.WeightFiles(inputs["base"]) as base:
            streaming.stream_fusion(plan, streaming.StreamInputs(ft, ref, base if method == "ties" else None), out)
        return
    if what == "score-wanda":
        score_wanda(inputs["finetuned"])
        return
    raise SystemExit(f"unknown measurement {what!r}")


def score_wanda(model_dir: str) -> None:
    from realign import models
    from realign.config import ModelConfig
    from realign.ops import neurons, selection
    from realign.stage_configs import ScoreConfig
    from realign.stages import score as stage

    cfg = ScoreConfig(method="wanda", nsamples=8, sparsity=0.01)
    cfg.model = ModelConfig(name="scale", source="local", path=model_dir, dtype="bfloat16")
    model = models.load_model(cfg.model, device="cpu")
    tokenizer = models.load_tokenizer(cfg.model)
    safety = stage.calibration_batches(tokenizer, stage.safety_calibration(cfg), cfg)
    modules = neurons.find_scored_modules(model, cfg.modules, cfg.target)
    settings = stage.score_settings(cfg, model.config.num_attention_heads, 0)
    selection.score_region("wanda", model, modules, safety, [], settings)


def read_rate(paths: list[Path]) -> float:
    """Bytes per second reading the files once, sequentially, in 64 MiB blocks."""
    total, start = 0, time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while block := handle.read(64 << 20):
                total += len(block)
    return total / (time.perf_counter() - start)


def largest_tensor_bytes(model_dir: str) -> int:
    import math

    from safetensors import safe_open

    with safe_open(str(Path(model_dir) / "model.safetensors"), framework="pt") as handle:
        return 2 * max(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())  # bfloat16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="", help="where the checkpoints and outputs go (default: a temp dir)")
    parser.add_argument("--sizes", default=",".join(SHAPES), help=f"comma-separated, of {', '.join(SHAPES)}")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints (a rerun reuses them)")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)  # internal: one measurement
    parser.add_argument("--inputs", default="", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    parser.add_argument("--size", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "prepare":
        print(json.dumps(write_checkpoints(args.size, Path(args.out))))
        return
    if args.child:
        child(args.child, json.loads(args.inputs), Path(args.out))
        return
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown size {', '.join(unknown)}: choose from {', '.join(SHAPES)}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="realign-bench-scale-"))
    for size in sizes:
        folder = work / size
        made = subprocess.run([sys.executable, __file__, "--child", "prepare", "--size", size, "--out", str(folder)],
                              check=True, capture_output=True, text=True)  # in a child: this process stays small
        inputs = json.loads(made.stdout.strip().splitlines()[-1])
        checkpoint = (Path(inputs["finetuned"]) / "model.safetensors").stat().st_size
        largest = largest_tensor_bytes(inputs["finetuned"])
        print(f"{size}_checkpoint_bytes: {checkpoint}")
        print(f"{size}_largest_tensor_bytes: {largest}")
        rate = read_rate([Path(inputs[r]) / "model.safetensors" for r in ("base", "finetuned", "reference")])
        print(f"{size}_read_gb_per_s: {rate / 1e9:.2f}")
        baseline = 0
        for what in MEASURES:
            out = folder / f"out-{what}"
            peak, seconds = run_child([sys.executable, __file__, "--child", what, "--inputs", json.dumps(inputs),
                                       "--out", str(out)])
            shutil.rmtree(out, ignore_errors=True)
            if what == "baseline":
                baseline = peak
                print(f"{size}_baseline_peak_rss_bytes: {peak}")
                continue
            print(f"{size}_{what}_peak_rss_bytes: {peak}")
            print(f"{size}_{what}_over_baseline_bytes: {peak - baseline}")
            print(f"{size}_{what}_over_baseline_per_largest_tensor: {(peak - baseline) / largest:.2f}")
            print(f"{size}_{what}_seconds: {seconds:.1f}")
            print(f"{size}_{what}_seconds_per_gb: {seconds / (checkpoint / 1e9):.1f}", flush=True)
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    if not args.workdir and not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
