"""Safety regions as safetensors files: the contract between the `score` stage (writes) and `fuse` (reads).

A region file is a plain safetensors file, loadable without realign (``safetensors.torch.load_file``). Its header
metadata (``str -> str``) says what kind of region it holds:

- ``realign.kind = "neurons"``: one **bool** tensor per scored weight, key = the parameter's name in the merged
  model's ``state_dict()`` (``model.layers.0.self_attn.q_proj.weight``; with ``realign.target = "lora"`` the adapter's
  own keys, ``...q_proj.lora_A.weight``), same shape as that parameter, True = selected (safety-critical).
  Bool keeps the file one byte per scored weight and needs no unpacking to use.
- ``realign.kind = "ranks"`` (ActSVD): per scored weight ``W`` (d_out × d_in) two float32 orthonormal bases of its
  output space, ``<name>::safety`` (d_out × r_s) and ``<name>::utility`` (d_out × r_u, possibly r_u = 0). The
  safety-critical rank region of W is the projection P = (I − U_u U_uᵀ) U_s U_sᵀ applied on the output side:
  the part of W's safety directions outside its utility directions.
- ``realign.kind = "heads"``: one float32 vector per attention block, key ``model.layers.<i>.self_attn``, length =
  number of attention heads, the summed safety score of each head (its q_proj rows and o_proj columns).

Other metadata: ``realign.method``, ``realign.target`` (``weights`` | ``lora``), ``realign.base_model``, and
``realign.architecture`` (a fingerprint of the model config that produced it: masks from another architecture
are refused before any shape is compared).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

KINDS = ("neurons", "ranks", "heads")
BASIS_SEPARATOR = "::"  # "<param>::safety" — a separator no parameter name contains


def save_region(path: str | Path, tensors: Mapping[str, torch.Tensor], kind: str,
                metadata: Mapping[str, str] | None = None) -> Path:
    """Write a region file (see the module doc); bool masks for ``neurons``, float32 otherwise."""
    from safetensors.torch import save_file

    if kind not in KINDS:
        raise ValueError(f"unknown region kind {kind!r}; one of {', '.join(KINDS)}")
    for name, tensor in tensors.items():
        if kind == "neurons" and tensor.dtype != torch.bool:
            raise ValueError(f"mask {name!r} is {tensor.dtype}, not bool")
    out = {name: (t if kind == "neurons" else t.to(torch.float32)).detach().cpu().contiguous()
           for name, t in tensors.items()}
    header = {"format": "pt", "realign.kind": kind, **{k: str(v) for k, v in (metadata or {}).items()}}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(path), metadata=header)
    return path


def load_region(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a region file; raises ValueError when it is not one."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        if metadata.get("realign.kind") not in KINDS:
            raise ValueError(f"{path} is not a realign region file (no realign.kind in its metadata)")
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    return tensors, metadata


def check_region_shapes(tensors: Mapping[str, torch.Tensor], kind: str,
                        param_shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Raise ValueError naming the first region entry that does not fit the model's parameters."""
    for key, tensor in tensors.items():
        if kind == "heads":
            continue  # checked against the attention config by the caller
        name = key.split(BASIS_SEPARATOR)[0]
        if name not in param_shapes:
            raise ValueError(f"region entry {key!r} names no parameter of the model")
        shape = tuple(param_shapes[name])
        if kind == "neurons" and tuple(tensor.shape) != shape:
            raise ValueError(f"mask {name!r} has shape {tuple(tensor.shape)}, the model's parameter {shape}")
        if kind == "ranks" and tensor.shape[0] != shape[0]:
            raise ValueError(f"basis {key!r} spans {tensor.shape[0]} outputs, the parameter has {shape[0]}")


def projection_factor(safety_basis: torch.Tensor, utility_basis: torch.Tensor) -> torch.Tensor:
    """L = (I − U_u U_uᵀ) U_s (d_out × r_s, float32): the ActSVD rank region is P = L U_sᵀ, the safety directions
    of a weight outside its utility ones. The one projection helper: P, its factors and its rank come from here."""
    us = safety_basis.to(torch.float32)
    uu = utility_basis.to(torch.float32)
    if uu.shape[1] == 0:
        return us
    return us - uu @ (uu.T @ us)


def rank_projection(safety_basis: torch.Tensor, utility_basis: torch.Tensor) -> torch.Tensor:
    """P = (I − U_u U_uᵀ) U_s U_sᵀ (d_out × d_out)."""
    return projection_factor(safety_basis, utility_basis) @ safety_basis.to(torch.float32).T


def projection_rank(safety_basis: torch.Tensor, utility_basis: torch.Tensor, tolerance: float = 1e-4) -> int:
    """Rank of P: the safety directions left outside the utility subspace."""
    if utility_basis.shape[1] == 0:
        return safety_basis.shape[1]
    outside = projection_factor(safety_basis.double(), utility_basis.double())
    return int((torch.linalg.svdvals(outside.double()) > tolerance).sum())


def selected_fraction(mask: torch.Tensor) -> float:
    return float(mask.sum()) / max(mask.numel(), 1)


def architecture_id(config: object) -> str:
    """A fingerprint of a transformers config's shapes: regions of one architecture never apply to another."""
    fields = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
              "num_key_value_heads", "vocab_size")
    return ":".join(f"{getattr(config, name, None)}" for name in fields)
