"""The align stage against a bare TRL trainer with identical settings, in one process.

Prints `name: value` lines; the ratio is stage seconds / bare seconds (goal <= 1.05). Both sides load the same
starting weights from disk, build the same dataset and train the same LoRA for the same steps; the stage adds
config resolution, MLflow run bookkeeping, the dataset input and the adapter artifact (evaluation is switched off,
since the bare trainer has none).

    .venv/bin/python bench/align_overhead.py                        # SmolLM2, DPO, 8 steps
    .venv/bin/python bench/align_overhead.py --model tiny --steps 20
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def bare_trl(cfg, workdir: str) -> float:
    """What a researcher would write by hand: load, build data, DPOTrainer with LoRA, save the adapter."""
    import torch
    from transformers import AutoModelForCausalLM

    from realign import data, models
    from realign.stages.align import get_align_method
    from realign.stages.common import trainer_arguments

    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    method = get_align_method(cfg.method)
    model_dir = models.resolve_model_dir(cfg.model)
    tokenizer = models.load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=models.torch_dtype(cfg.model.dtype))
    train_set = data.alignment_dataset(method.data_format, cfg.data.num_examples, cfg.data.seed,
                                       benign_fraction=cfg.data.benign_fraction)
    trainer_cls, trainer_config = method.build(cfg, trainer_arguments(cfg.train, cfg.seed, f"{workdir}/bare"))
    peft_config = models.lora_config(cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules)
    trainer = trainer_cls(model=model, args=trainer_config, train_dataset=train_set, processing_class=tokenizer,
                          peft_config=peft_config)
    trainer.train()
    trainer.model.save_pretrained(f"{workdir}/bare-adapter")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--method", default="dpo")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()

    from realign import models
    from realign.stages.align import resolve_align_config, run_align

    with tempfile.TemporaryDirectory() as workdir:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir}/mlflow.db"
        overrides = {"method": args.method, "model": args.model, "train.max_steps": str(args.steps), "sft_run": "none",
                     "eval.enabled": "false"}
        cfg = resolve_align_config(overrides)
        models.load_model(cfg.model)  # warm the model cache and imports for both sides
        from realign.stages.align import get_align_method
        from realign.stages.common import trainer_arguments

        get_align_method(cfg.method).build(cfg, trainer_arguments(cfg.train, cfg.seed, f"{workdir}/warm"))
        # Warm MLflow's store (schema migration happens once per new database, not per run).
        import mlflow

        mlflow.set_tracking_uri(os.environ["MLFLOW_TRACKING_URI"])
        mlflow.search_experiments()

        bare = bare_trl(cfg, workdir)
        start = time.perf_counter()
        run_align(overrides)
        stage = time.perf_counter() - start

    print(f"model: {args.model}")
    print(f"method: {args.method}")
    print(f"steps: {args.steps}")
    print(f"bare_trl_seconds: {bare:.2f}")
    print(f"align_stage_seconds: {stage:.2f}")
    print(f"stage_over_bare_ratio: {stage / bare:.3f}  (goal <= 1.05)")


if __name__ == "__main__":
    main()
