"""What every training stage shares: the Trainer arguments and the LoRA fit."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

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
        save_strategy="no",
        report_to="none",  # metrics go to the stage run through tracking.metrics_callback
        dataset_num_proc=None,
    )


def train_lora(run, start_dir: str, model_cfg, lora, trainer_cls, trainer_config, train_set, seed: int,
               what: str) -> Path:
    """Fit a fresh LoRA on the weights in `start_dir` (loaded from disk) with a TRL trainer; the adapter dir.

    The starting weights always come from disk, never from another trainer's in-memory model: a LoRA trained
    on a model merged in-process by an earlier trainer changed nothing at inference here.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from realign import models, tracking

    torch.manual_seed(seed)
    tokenizer = models.load_tokenizer(start_dir)
    model = AutoModelForCausalLM.from_pretrained(start_dir, dtype=models.torch_dtype(model_cfg.dtype),
                                                 trust_remote_code=model_cfg.trust_remote_code)
    trainer = trainer_cls(model=model, args=trainer_config, train_dataset=train_set, processing_class=tokenizer,
                          peft_config=models.lora_config(lora.r, lora.alpha, lora.dropout, lora.target_modules),
                          callbacks=[tracking.metrics_callback(run.run_id)])
    trainable, total = models.trainable_parameter_count(trainer.model)
    run.log_params({"lora.trainable_parameters": trainable, "model.parameters": total})
    loss = trainer.train().training_loss
    if loss is None or not math.isfinite(loss):
        raise RealignError(f"training loss became {loss} ({what})",
                           "lower --train.learning_rate or check the data; no adapter was logged")
    adapter_dir = run.workdir / "adapter"
    trainer.model.save_pretrained(str(adapter_dir))
    return adapter_dir
