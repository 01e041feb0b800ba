"""What every training stage shares: the Trainer arguments, checkpoints to resume from, and the LoRA fit.

Checkpoints: the Trainer's output_dir is a folder named by a hash of the stage's resolved config, the code version
and the tracking store (under $REALIGN_CHECKPOINT_DIR, default <realign cache>/checkpoints), not the run's temp
dir. A stage killed mid-training leaves its newest checkpoint there; the same command run again finds it, resumes
from it, tags the new run `realign.resumed_from` and marks the dead run FAILED. While the process that owns the
folder is alive, a second identical command trains in a folder of its own instead of sharing it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from realign import distributed
from realign.config import TrainSettings
from realign.errors import RealignError


def trainer_arguments(train: TrainSettings, seed: int, output_dir: Path) -> dict[str, Any]:
    """Keyword arguments every TRL config here takes (all subclass transformers.TrainingArguments)."""
    return dict(
        output_dir=str(output_dir),
        learning_rate=train.learning_rate,
        max_steps=train.max_steps,
        num_train_epochs=train.num_train_epochs,
        per_device_train_batch_size=train.per_device_train_batch_size,
        gradient_accumulation_steps=train.gradient_accumulation_steps,
        max_length=train.max_length,
        warmup_steps=train.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of the total steps
        lr_scheduler_type=train.lr_scheduler_type,
        weight_decay=train.weight_decay,
        logging_steps=train.logging_steps,
        gradient_checkpointing=train.gradient_checkpointing,
        bf16=train.bf16,
        seed=seed,
        data_seed=seed,
        save_strategy="steps" if train.save_steps > 0 else "no",
        save_steps=train.save_steps if train.save_steps > 0 else 500,
        save_total_limit=1,  # the newest checkpoint is all a resume needs
        report_to="none",  # metrics go to the stage run through tracking.metrics_callback
        dataset_num_proc=None,
        # Without it, processes launched on a CPU-only machine each train alone instead of as one DDP group.
        use_cpu=distributed.trains_on_cpu(),
        ddp_find_unused_parameters=False,
        logging_nan_inf_filter=False,  # a NaN loss must show as NaN (the Trainer would log 0), and stop training  # LoRA uses every trainable parameter; the search costs a graph pass
    )


@dataclass
class Checkpoints:
    """Where the Trainer writes checkpoints, and the one to resume from (left by a killed run of this config)."""

    folder: Path
    resume_from: str | None = None
    previous_run: str | None = None  # the run whose process died there


def checkpoint_root() -> Path:
    from realign import models

    configured = os.environ.get("REALIGN_CHECKPOINT_DIR")
    return Path(configured).expanduser() if configured else models.cache_dir() / "checkpoints"


def plan_checkpoints(run, cfg: Any) -> Checkpoints:
    """The checkpoint folder of this stage config, shared by every process of an `accelerate launch`."""

    def plan() -> list:
        import hashlib

        import yaml

        from realign import tracking
        from realign.config import to_dict

        key = "\0".join([run.stage, tracking.code_version(), tracking.tracking_uri(),
                          yaml.safe_dump(to_dict(cfg), sort_keys=True)])
        folder = checkpoint_root() / f"{run.stage}-{hashlib.sha256(key.encode()).hexdigest()[:20]}"
        found = _claim(folder, run.run_id)
        return [str(found.folder), found.resume_from, found.previous_run]

    folder, resume_from, previous_run = distributed.agree(plan)
    return Checkpoints(Path(folder), resume_from, previous_run)


def _claim(folder: Path, run_id: str) -> Checkpoints:
    """Own `folder` for this process; resume from its newest checkpoint if its last owner is gone."""
    from realign import models, tracking

    folder.mkdir(parents=True, exist_ok=True)
    me = {"process": tracking.this_process(), "run_id": run_id}
    with models.exclusive_lock(folder / ".lock"):
        owner_file = folder / "owner.json"
        owner = json.loads(owner_file.read_text()) if owner_file.is_file() else None
        if owner and tracking.process_is_alive(str(owner.get("process", ""))):
            # The same config is training right now in another process: share nothing with it.
            apart = folder.with_name(f"{folder.name}-{run_id}")
            apart.mkdir(parents=True, exist_ok=True)
            (apart / "owner.json").write_text(json.dumps(me))
            return Checkpoints(apart)
        owner_file.write_text(json.dumps(me))
    steps = [p for p in folder.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    if not steps:
        return Checkpoints(folder)
    newest = max(steps, key=lambda p: int(p.name.rsplit("-", 1)[1]))
    return Checkpoints(folder, str(newest), owner.get("run_id") if owner else None)


def nan_guard():
    """A TrainerCallback that stops training at the first logged loss (or gradient norm) that is NaN or infinite."""
    from transformers import TrainerCallback

    class NanGuard(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            for key in ("loss", "grad_norm"):
                value = (logs or {}).get(key)
                if isinstance(value, (int, float)) and not math.isfinite(value):
                    raise RealignError(f"training loss became nan at step {state.global_step} ({key} = {value})",
                                       "lower --train.learning_rate or check the data; no adapter was logged")

    return NanGuard()


def train_lora(run, start_dir: str, model_cfg, lora, trainer_cls, trainer_config, train_set, seed: int,
               what: str, checkpoints: Checkpoints | None = None, init_adapter: str | None = None) -> Path:
    """Fit a LoRA on the weights in `start_dir` (loaded from disk) with a TRL trainer; the adapter dir.

    A fresh LoRA, or with `init_adapter` (a PEFT dir) that adapter, loaded trainable, trained further: same keys,
    same config, starting from its own tensors. The starting weights always come from disk, never from another
    trainer's in-memory model: a LoRA trained on a model merged in-process by an earlier trainer changed nothing at
    inference here. With `checkpoints` (the folder `trainer_config.output_dir` names) training resumes from a
    checkpoint a killed run left.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from realign import models, tracking

    torch.manual_seed(seed)
    tokenizer = models.load_tokenizer(start_dir)
    model = AutoModelForCausalLM.from_pretrained(start_dir, dtype=models.torch_dtype(model_cfg.dtype),
                                                 trust_remote_code=model_cfg.trust_remote_code)
    if init_adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, init_adapter, is_trainable=True)
        peft_config = None
    else:
        peft_config = models.lora_config(lora.r, lora.alpha, lora.dropout, lora.target_modules)
    trainer = trainer_cls(model=model, args=trainer_config, train_dataset=train_set, processing_class=tokenizer,
                          peft_config=peft_config, callbacks=[tracking.metrics_callback(run.run_id), nan_guard()])
    trainable, total = models.trainable_parameter_count(trainer.model)
    run.log_params({"lora.trainable_parameters": trainable, "model.parameters": total})
    resume_from = _note_resume(run, checkpoints)
    try:
        loss = trainer.train(resume_from_checkpoint=resume_from).training_loss
        if loss is None or not math.isfinite(loss):
            raise RealignError(f"training loss became {loss} ({what})",
                               "lower --train.learning_rate or check the data; no adapter was logged")
    except RealignError:
        for callback in trainer.callback_handler.callbacks:  # end the progress bar's line before the error's
            bar = getattr(callback, "training_bar", None)
            if bar is not None:
                bar.close()
        if checkpoints and run.is_main:  # a bad config fails the same way again: nothing there to resume
            shutil.rmtree(checkpoints.folder, ignore_errors=True)
        raise
    return _save_adapter(run, trainer, checkpoints)


def _note_resume(run, checkpoints: Checkpoints | None) -> str | None:
    """The checkpoint to resume from, if a killed run of this config left one; tags the run and names its
    successor on the dead run."""
    from realign import tracking

    resume_from = checkpoints.resume_from if checkpoints else None
    if resume_from:
        run.set_tags({tracking.TAG_RESUMED_FROM: f"{checkpoints.previous_run or 'unknown run'}/"
                                                 f"{Path(resume_from).name}"})
        if checkpoints.previous_run and run.is_main:
            tracking.mark_abandoned(checkpoints.previous_run,
                                    f"its process died; run {run.run_id} resumed from {Path(resume_from).name}",
                                    overwrite=True)
    return resume_from


def _save_adapter(run, trainer, checkpoints: Checkpoints | None) -> Path:
    """The trained adapter as a PEFT dir in the run's workdir; the checkpoints are no longer needed."""
    adapter_dir = run.workdir / "adapter"
    if trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled:
        # Sharded weights: the Trainer gathers them (every process takes part). It also writes
        # training_args.bin, a pickle nobody here reads, which stays out of the logged adapter.
        trainer.save_model(str(adapter_dir))
        (adapter_dir / "training_args.bin").unlink(missing_ok=True)
    else:
        trainer.model.save_pretrained(str(adapter_dir))
    if checkpoints and run.is_main:
        shutil.rmtree(checkpoints.folder, ignore_errors=True)
    return adapter_dir
