"""DARE drop-and-rescale (Yu et al. 2024, "Language Models are Super Mario", arXiv 2311.03099; pure torch).

Each entry of a task vector τ is dropped with probability p and the survivors are rescaled by 1/(1 − p), so the
expected update is unchanged: DARE(τ) = m ⊙ τ / (1 − p), m_i ~ Bernoulli(1 − p).

The draw is counter-based: entry i of parameter `name` is kept when u(seed, name, model, i) ≥ p, with u a
splitmix64 hash of those four numbers mapped to [0, 1). So the same entry gets the same decision whether the tensor is
fused whole (LoRA mode, tests) or streamed in row chunks of any size (full weights), on any machine — a stateful
generator would tie the draw to the chunking.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

_MASK64 = (1 << 64) - 1


def _signed(value: int) -> int:
    """A 64-bit pattern as torch's int64 holds it."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _signed(0x9E3779B97F4A7C15)
_MIX1 = _signed(0xBF58476D1CE4E5B9)
_MIX2 = _signed(0x94D049BB133111EB)


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 patterns (torch's >> is arithmetic on negative values)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def splitmix64(x: torch.Tensor) -> torch.Tensor:
    """The splitmix64 finalizer on int64 tensors (wrapping arithmetic, as the reference C code on uint64)."""
    z = x + _GOLDEN
    z = (z ^ _shift_right(z, 30)) * _MIX1
    z = (z ^ _shift_right(z, 27)) * _MIX2
    return z ^ _shift_right(z, 31)


def tensor_key(seed: int, name: str, model: int) -> int:
    """A 64-bit key per (seed, parameter name, model index), stable across processes (not Python's hash)."""
    digest = hashlib.sha256(f"{seed}\0{name}\0{model}".encode()).digest()
    return _signed(int.from_bytes(digest[:8], "little"))


def uniforms(key: int, start: int, count: int) -> torch.Tensor:
    """u ∈ [0, 1) (float64, 53 bits) for entries start … start + count − 1 of the tensor keyed `key`."""
    index = torch.arange(start, start + count, dtype=torch.int64)
    bits = _shift_right(splitmix64(splitmix64(index ^ key)), 11)
    return bits.to(torch.float64) / float(1 << 53)


@dataclass(frozen=True)
class EntryPosition:
    """Where a tensor chunk sits: its parameter's name and the flat (row-major) index of its first entry."""

    name: str
    start: int = 0


def drop_and_rescale(task_vector: torch.Tensor, rate: float, seed: int, position: EntryPosition,
                     model: int = 0) -> torch.Tensor:
    """DARE(τ) of a float32 task vector (or row chunk of one): entries dropped with probability `rate`, the rest
    × 1/(1 − rate). `rate` 0 returns τ unchanged."""
    if rate == 0.0:
        return task_vector
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"DARE drop rate {rate} is outside [0, 1)")
    u = uniforms(tensor_key(seed, position.name, model), position.start, task_vector.numel())
    kept = (u >= rate).reshape(task_vector.shape)
    return torch.where(kept, task_vector / (1.0 - rate), 0.0)
