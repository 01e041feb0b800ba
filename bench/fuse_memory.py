"""Peak memory and speed of fusing full-weight models: realign's streamed fusion next to mergekit, same TIES merge.

Inputs: SmolLM2-135M (the offline default, float32, one safetensors file) as the base and two perturbed copies of it
(base + 1 % of each tensor's standard deviation in seeded Gaussian noise), TIES at density 0.2, equal weights, λ = 1.
Each side runs in a subprocess of its own; its peak resident memory is that child's `ru_maxrss` (os.wait4), so
the Python interpreter and torch import count on both sides. The inputs are made in a process of their own too: a
child's `ru_maxrss` starts from its parent's resident size at the fork, so a parent that had just built the
perturbed copies made the first run's realign side read 2.85× one model where the same fusion needs 0.97×. Sides:

- ``realign``: `realign.ops.streaming.stream_fusion`, what `realign fuse` runs on full weights (row chunks, streamed
  safetensors output);
- ``eager``: every input loaded whole, then fused tensor by tensor (what loading all inputs at once costs);
- ``realign-<method>``: the same streamed fusion for every other full-weight method of the fuse registry (resta
  with the base as θ_un, antidote without a region = every weight zeroed; safe_lora works on LoRA factors, not
  here), each method's own defaults;
- ``mergekit``: `mergekit-yaml` (PyPI `mergekit`, the tool users would pick instead) on the same merge, from
  `--mergekit` or $MERGEKIT_YAML, else `mergekit-yaml` on PATH; `mergekit: not installed` lines when absent.

Prints `name: value` lines: per side peak RSS (bytes and × one model's bytes; goal for realign's sides <= 1.5),
wall seconds, seconds per GB of one model, and the ratios realign / mergekit, plus the largest difference between
the two outputs.

    .venv/bin/python bench/fuse_memory.py --mergekit /tmp/mergekit-venv/bin/mergekit-yaml
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

DENSITY = 0.2
NOISE = 0.01  # perturbation: this fraction of each tensor's standard deviation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mergekit", default=os.environ.get("MERGEKIT_YAML") or shutil.which("mergekit-yaml") or "",
                        help="mergekit-yaml executable (default: $MERGEKIT_YAML, else on PATH)")
    parser.add_argument("--workdir", default="", help="where the inputs and outputs go (default: a temp dir)")
    parser.add_argument("--model", default="smollm2-135m", help="conf/model preset of the base (default smollm2-135m)")
    parser.add_argument("--side", default="", help=argparse.SUPPRESS)  # internal: run one side in this process
    parser.add_argument("--inputs", default="", help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "prepare":
        print(json.dumps(prepare_inputs(args.model, Path(args.out))))
        return
    if args.side:
        run_side(args.side, json.loads(args.inputs), Path(args.out))
        return

    work = Path(args.workdir or tempfile.mkdtemp(prefix="realign-bench-fuse-"))
    # the copies are built in a child: this process stays small, so no measured child inherits its memory
    made = subprocess.run([sys.executable, __file__, "--side", "prepare", "--model", args.model, "--out", str(work)],
                          check=True, capture_output=True, text=True)
    inputs = json.loads(made.stdout.strip().splitlines()[-1])
    model_bytes = (Path(inputs["base"]) / "model.safetensors").stat().st_size
    print(f"model: {args.model}")
    print(f"model_bytes: {model_bytes}")
    print(f"merge: ties density={DENSITY} weights=1,1 lambda=1 (two perturbed copies onto the base)")
    results = {}
    for side in ("realign", "eager", *(f"realign-{m}" for m in other_methods())):
        results[side] = measure([sys.executable, __file__, "--side", side, "--inputs", json.dumps(inputs),
                                 "--out", str(work / f"out-{side}")])
        if side.startswith("realign-"):  # only the TIES outputs are compared; the others would fill the disk
            shutil.rmtree(work / f"out-{side}", ignore_errors=True)
    if args.mergekit and Path(args.mergekit).exists():
        config = write_mergekit_config(inputs, work / "mergekit.yml")
        results["mergekit"] = measure([args.mergekit, str(config), str(work / "out-mergekit"), "--no-copy-tokenizer",
                                       "--no-write-model-card", "--quiet"])
    else:
        print("mergekit: not installed (pass --mergekit or set MERGEKIT_YAML to a mergekit-yaml executable)")

    for side, (peak, seconds) in results.items():
        print(f"{side}_peak_rss_bytes: {peak}")
        print(f"{side}_peak_rss_over_model: {peak / model_bytes:.2f}")
        print(f"{side}_seconds: {seconds:.1f}")
        print(f"{side}_seconds_per_gb: {seconds / (model_bytes / 1e9):.1f}")
    if "mergekit" in results:
        (rl_peak, rl_seconds), (mk_peak, mk_seconds) = results["realign"], results["mergekit"]
        print(f"realign_over_mergekit_peak_rss: {rl_peak / mk_peak:.2f}")
        print(f"realign_over_mergekit_seconds: {rl_seconds / mk_seconds:.2f}")
        print(f"max_abs_diff_realign_vs_mergekit: {max_abs_difference(work / 'out-realign', work / 'out-mergekit'):.3g}")
    print(f"max_abs_diff_realign_vs_eager: {max_abs_difference(work / 'out-realign', work / 'out-eager'):.3g}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


def measure(command: list[str]) -> tuple[int, float]:
    """(peak resident bytes, wall seconds) of one child process, from its own rusage."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{command[0]} failed ({process.returncode}): {process.stderr.read().decode()[-2000:]}")
    return usage.ru_maxrss * 1024, seconds  # ru_maxrss is in KiB on Linux


def prepare_inputs(model_name: str, work: Path) -> dict[str, str]:
    """The base model dir and two perturbed copies (config + tokenizer + model.safetensors), made once."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from realign import models
    from realign.config import ModelConfig, load_preset

    base = Path(models.resolve_model_dir(ModelConfig(**load_preset("model", model_name))))
    copies = {}
    for index in (1, 2):
        folder = work / f"copy{index}"
        copies[f"copy{index}"] = str(folder)
        if (folder / "model.safetensors").is_file():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        generator = torch.Generator().manual_seed(index)
        with safe_open(str(base / "model.safetensors"), framework="pt") as handle:
            perturbed = {}
            for name in handle.keys():
                tensor = handle.get_tensor(name)
                noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
                perturbed[name] = (tensor.float() + NOISE * tensor.float().std() * noise).to(tensor.dtype)
        save_file(perturbed, str(folder / "model.safetensors"), metadata={"format": "pt"})
        del perturbed
        for file in base.iterdir():
            if file.name != "model.safetensors" and file.is_file():
                shutil.copyfile(file, folder / file.name)
    return {"base": str(base), **copies}


def write_mergekit_config(inputs: dict[str, str], path: Path) -> Path:
    lines = ["merge_method: ties", f"base_model: {inputs['base']}", "models:"]
    for key in ("copy1", "copy2"):
        lines += [f"  - model: {inputs[key]}", f"    parameters: {{weight: 1.0, density: {DENSITY}}}"]
    lines += ["parameters: {normalize: true, lambda: 1.0}", "dtype: float32"]
    path.write_text("\n".join(lines) + "\n")
    return path


def other_methods() -> list[str]:
    """The fuse registry's full-weight methods other than the TIES side (realign's own list, imported lazily)."""
    from realign.ops import merge

    return [name for name in merge.MERGE_METHODS if merge.get_merge_method(name).entrywise and name != "ties"]


def run_side(side: str, inputs: dict[str, str], out: Path) -> None:
    from realign.ops import merge, streaming

    plan = merge.FusionPlan(merge.get_merge_method("ties"), merge.MergeParams(weights=(1.0, 1.0), density=DENSITY))
    if side.startswith("realign-"):
        plan = merge.FusionPlan(merge.get_merge_method(side.removeprefix("realign-")), merge.MergeParams())
        side = "realign"
    if side == "realign":
        with streaming.WeightFiles(inputs["copy1"]) as first, streaming.WeightFiles(inputs["copy2"]) as second, \
                streaming.WeightFiles(inputs["base"]) as base:
            streaming.stream_fusion(plan, streaming.StreamInputs(first, second, base), out)
        return
    if side == "eager":
        from safetensors.torch import load_file, save_file

        base, first, second = (load_file(str(Path(inputs[k]) / "model.safetensors")) for k in ("base", "copy1", "copy2"))
        fused = {name: plan.fuse(name, base[name], first[name], second[name]).contiguous() for name in first}
        out.mkdir(parents=True, exist_ok=True)
        save_file(fused, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    raise SystemExit(f"unknown side {side!r}")


def max_abs_difference(first: Path, second: Path) -> float:
    """Largest |a − b| over all tensors of two model dirs, read tensor by tensor."""
    import torch

    from realign.ops.streaming import WeightFiles

    with WeightFiles(first) as a, WeightFiles(second) as b:
        if set(a.names) != set(b.names):
            return float("inf")
        return max(float((a.read(n).to(torch.float32) - b.read(n).to(torch.float32)).abs().max()) for n in a.names)


if __name__ == "__main__":
    main()
