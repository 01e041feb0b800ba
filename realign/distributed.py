"""Several processes of one training stage (`accelerate launch`): which one logs, and what they agree on.

Under `accelerate launch --num_processes N` every process runs the whole stage command. They all train (the
Trainer's DDP/FSDP/DeepSpeed needs each of them), but only the main process (rank 0) talks to MLflow and
evaluates; the others learn its decisions (the run id, the checkpoint folder) through `agree()`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def is_main_process() -> bool:
    return rank() == 0


def trains_on_cpu() -> bool:
    """No GPU: the Trainer must be told (use_cpu), or processes launched together each train alone, and bf16
    (autocast on the CPU) is refused as "doesn't support bf16/gpu"."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    return not torch.cuda.is_available() and not (mps is not None and mps.is_available())


def agree(compute: Callable[[], Any]) -> Any:
    """`compute()` on the main process, its value handed to every process (a plain call with one process).

    Every process must call this at the same point. The value travels as JSON (strings, numbers, lists, dicts),
    never pickled. An exception on the main process is handed on too, so no process waits for it forever.
    """
    if world_size() == 1:
        return compute()
    import torch
    import torch.distributed as dist

    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():  # the launcher's env:// rendezvous; the Trainer reuses this group later
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    error: Exception | None = None
    payload = b""
    if is_main_process():
        try:
            payload = json.dumps({"value": compute()}).encode()
        except Exception as err:  # noqa: BLE001 - re-raised below, after the others heard of it
            error = err
            payload = json.dumps({"error": str(err)}).encode()
    length = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    dist.broadcast(length, src=0)
    data = torch.zeros(int(length.item()), dtype=torch.int32, device=device)
    if is_main_process():
        data = torch.tensor(list(payload), dtype=torch.int32, device=device)
    dist.broadcast(data, src=0)
    if error is not None:
        raise error
    message = json.loads(bytes(data.cpu().tolist()).decode())
    if "error" in message:
        from realign.errors import RealignError

        raise RealignError(f"the main process failed: {message['error']}", "see the main process's error above")
    return message["value"]
