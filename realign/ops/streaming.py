"""Full weights streamed over safetensors files: fusion reads tensors in row chunks from the inputs' files
(`WeightFiles`) and writes the fused ones as they are computed (`SafetensorsStreamWriter`), so memory stays near one
tensor chunk per input, not one model per input. Shards are planned by huggingface_hub's splitter. Pure torch and
safetensors; no MLflow.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from realign.ops.merge import FusionPlan, MagnitudeTrim
from realign.ops.nlsr import UpdateSimilarity
from realign.ops.regions import FusionRegion


SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
TORCH_DTYPES = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}
WEIGHTS_INDEX = "model.safetensors.index.json"
SINGLE_WEIGHTS = "model.safetensors"


class WeightFiles:
    """A transformers model dir's safetensors weights (one file or shards with an index), read by tensor or rows.

    Each read opens the file with `safetensors.safe_open` and closes it again: safetensors maps the whole file and
    hands out tensors backed by that mapping, so pages once read stay resident for as long as a handle is open.
    Reopening per read (a header parse, well under a millisecond) keeps the process's resident memory near the
    rows in use instead of growing to the size of every input file.
    """

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / WEIGHTS_INDEX
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (self.folder / SINGLE_WEIGHTS).is_file():
            files = [SINGLE_WEIGHTS]
            weight_map = None
        else:
            raise FileNotFoundError(f"{self.folder} has no {SINGLE_WEIGHTS} or {WEIGHTS_INDEX}")
        self.file_of: dict[str, Path] = {}
        self._layout: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for file in files:
            with safe_open(str(self.folder / file), framework="pt") as handle:
                for name in handle.keys():
                    view = handle.get_slice(name)
                    self.file_of[name] = self.folder / file
                    self._layout[name] = (tuple(view.get_shape()), TORCH_DTYPES[view.get_dtype()])
        if weight_map is not None and set(weight_map) != set(self.file_of):
            raise ValueError(f"{index} does not list the tensors its shards hold")

    @property
    def names(self) -> list[str]:
        return list(self.file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._layout[name][0]

    def dtype(self, name: str) -> torch.dtype:
        return self._layout[name][1]

    def read(self, name: str, rows: slice | None = None) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.file_of[name]), framework="pt") as handle:
            if rows is None:
                return handle.get_tensor(name)
            return handle.get_slice(name)[rows]

    def close(self) -> None:
        """Nothing stays open between reads; kept so a `with` block reads naturally."""

    def __enter__(self) -> "WeightFiles":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SafetensorsStreamWriter:
    """Writes one safetensors file tensor by tensor, chunk by chunk, as values are computed.

    The header (names, dtypes, shapes, offsets) is known before any value: it is written first, then each tensor's
    bytes in header order, so nothing but the current chunk is ever held in memory. The file is a standard
    safetensors file (8-byte little-endian header length, JSON header padded with spaces to 8 bytes, data).
    """

    def __init__(self, path: str | Path, specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
                 metadata: Mapping[str, str] | None = None):
        self.path = Path(path)
        header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
        self.order: list[str] = []
        self.sizes: dict[str, int] = {}
        offset = 0
        for name, dtype, shape in specs:
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self.order.append(name)
            self.sizes[name] = size
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self.total_bytes = offset
        self._file = open(self.path, "wb")
        self._file.write(struct.pack("<Q", len(encoded)))
        self._file.write(encoded)
        self._next = 0  # index into self.order of the tensor being written
        self._written = 0  # bytes of it written so far

    def write(self, name: str, chunk: torch.Tensor) -> None:
        """Append the next rows of tensor `name` (tensors in the order given, rows in order)."""
        if self._next >= len(self.order) or self.order[self._next] != name:
            expected = self.order[self._next] if self._next < len(self.order) else "nothing"
            raise ValueError(f"writing {name!r}, but the file expects {expected}")
        data = chunk.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.write(data.data)
        self._written += data.nbytes
        if self._written > self.sizes[name]:
            raise ValueError(f"{name}: more bytes written than its shape holds")
        if self._written == self.sizes[name]:
            self._next += 1
            self._written = 0

    def close(self) -> None:
        self._file.close()
        if self._next != len(self.order):
            raise ValueError(f"{self.path.name}: tensor {self.order[self._next]!r} was not written in full")


def plan_shards(specs: Sequence[tuple[str, torch.dtype, tuple[int, ...]]],
                max_shard_bytes: int) -> list[tuple[str, list[tuple[str, torch.dtype, tuple[int, ...]]]]]:
    """(file name, its tensors) per shard, as huggingface_hub splits a state dict for `save_pretrained`: consecutive
    tensors up to `max_shard_bytes` per file (a larger one alone), named model.safetensors or
    model-0000i-of-0000N.safetensors. Works on (name, dtype, shape) specs: no tensor is needed to plan."""
    from huggingface_hub import split_state_dict_into_shards_factory

    by_name = {spec[0]: spec for spec in specs}
    split = split_state_dict_into_shards_factory(
        by_name, get_storage_size=lambda spec: math.prod(spec[2]) * torch.empty((), dtype=spec[1]).element_size(),
        filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_bytes)
    return [(file_name, [by_name[name] for name in names]) for file_name, names in split.filename_to_tensors.items()]


@dataclass
class StreamInputs:
    """The weight files fusion reads: θ_ft and θ_ref always, θ0 for task arithmetic (θ_un for RESTA)."""

    finetuned: WeightFiles
    reference: WeightFiles
    base: WeightFiles | None = None

    def check(self) -> None:
        """Same tensor names and shapes in every input (the fine-tuned model's order is the output's)."""
        for what, files in (("reference", self.reference), ("base", self.base)):
            if files is None:
                continue
            differ = sorted(set(self.finetuned.names) ^ set(files.names))
            if differ:
                raise ValueError(f"the {what} weights differ from the fine-tuned ones in tensor {differ[0]!r}")
            for name in self.finetuned.names:
                if self.finetuned.shape(name) != files.shape(name):
                    raise ValueError(f"{name}: shape {self.finetuned.shape(name)} in the fine-tuned weights, "
                                     f"{files.shape(name)} in the {what}")


def row_chunks(shape: Sequence[int], chunk_elements: int) -> list[slice | None]:
    """Row slices covering a tensor with about `chunk_elements` entries each; None for a 0-d tensor."""
    if len(shape) == 0:
        return [None]
    row_size = max(1, math.prod(shape[1:]))
    step = max(1, chunk_elements // row_size)
    return [slice(start, min(start + step, shape[0])) for start in range(0, shape[0], step)]


def stream_similarities(names: Sequence[str], finetuned: WeightFiles, reference: WeightFiles,
                        anchor: WeightFiles | None, region: FusionRegion | None,
                        chunk_elements: int = 1 << 21, progress: bool = False) -> list[float]:
    """Per parameter cos(region part of θ_ft − θ_anchor, region part of θ_ref − θ_anchor), streamed in row chunks
    (rank regions project whole tensors); no anchor = updates measured from zero."""
    similarities = []
    for name in _progress(names, progress, "similarity"):
        similarity = UpdateSimilarity()
        whole = region is not None and name in region.projections
        for rows in ([None] if whole else row_chunks(finetuned.shape(name), chunk_elements)):
            ft = finetuned.read(name, rows).to(torch.float32)
            ref = reference.read(name, rows).to(torch.float32)
            if anchor is not None:
                theta0 = anchor.read(name, rows).to(torch.float32)
                ft, ref = ft - theta0, ref - theta0
            if region is not None:
                ft, ref = region.select(name, ft, rows), region.select(name, ref, rows)
            similarity.add(ft, ref)
        similarities.append(similarity.value())
    return similarities


def stream_fusion(plan: FusionPlan, inputs: StreamInputs, out_dir: str | Path, chunk_elements: int = 1 << 21,
                  max_shard_bytes: int = 5 * 1024**3, progress: bool = False) -> dict[str, tuple[int, int]]:
    """Fuse full weights tensor by tensor into safetensors files under `out_dir`; returns per tensor
    (entries changed against the fine-tuned weights, entries).

    Peak memory: one row chunk of each input and its temporaries — never a whole tensor or model (TIES's threshold
    over the whole tensor is found by exact radix selection over its chunks, `MagnitudeTrim.of_chunks`).
    """
    if plan.method.kind in ("task_arithmetic", "resta") and inputs.base is None:
        raise ValueError(f"{plan.method.name} needs the {'unaligned' if plan.method.kind == 'resta' else 'base'} "
                         "weights")
    inputs.check()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ft_files = inputs.finetuned
    specs = [(name, ft_files.dtype(name), ft_files.shape(name)) for name in ft_files.names]
    shards = plan_shards(specs, max_shard_bytes)
    changed: dict[str, tuple[int, int]] = {}
    weight_map: dict[str, str] = {}
    bar = _progress_bar(len(specs), progress, f"fuse/{plan.method.name}")
    for file_name, shard_specs in shards:
        writer = SafetensorsStreamWriter(out_dir / file_name, shard_specs)
        try:
            for name, dtype, shape in shard_specs:
                changed[name] = _stream_tensor(plan, inputs, name, shape, writer, chunk_elements)
                weight_map[name] = file_name
                if bar is not None:
                    bar.update(1)
        finally:
            writer.close()
    if bar is not None:
        bar.close()
    if len(shards) > 1:
        total = sum(math.prod(s[2]) * torch.empty((), dtype=s[1]).element_size() for s in specs)
        (out_dir / WEIGHTS_INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                        indent=2))
    return changed


def _stream_tensor(plan: FusionPlan, inputs: StreamInputs, name: str, shape: tuple[int, ...],
                   writer: SafetensorsStreamWriter, chunk_elements: int) -> tuple[int, int]:
    numel = math.prod(shape)
    ft_files = inputs.finetuned
    if not plan.touches(name) or not ft_files.dtype(name).is_floating_point:
        for rows in row_chunks(shape, chunk_elements):  # a copy, read and written in chunks
            writer.write(name, ft_files.read(name, rows))
        return 0, numel

    def read_all(rows):
        base = inputs.base.read(name, rows) if inputs.base is not None else None
        return base, ft_files.read(name, rows), inputs.reference.read(name, rows)

    if plan.region is not None and name in plan.region.projections:  # a projection needs the whole tensor
        base, ft, ref = read_all(None)
        out = plan.fuse(name, base, ft, ref)
        writer.write(name, out)
        return int((out != ft).sum()), numel

    trims = None
    if plan.method.kind == "task_arithmetic" and plan.method.trim and plan.params.dare_rate == 0:
        trims = [_stream_trim(inputs.base, files, name, shape, plan.params.density, chunk_elements)
                      for files in (ft_files, inputs.reference)]
    changed = 0
    for rows in row_chunks(shape, chunk_elements):
        base, ft, ref = read_all(rows)
        out = plan.fuse(name, base, ft, ref, rows=rows, trims=trims)
        writer.write(name, out)
        changed += int((out != ft).sum())
    return changed, numel


def _stream_trim(base: WeightFiles, model: WeightFiles, name: str, shape: tuple[int, ...], density: float,
                 chunk_elements: int) -> MagnitudeTrim:
    """TIES's trimming rule for τ = θ − θ0 over the whole tensor, from its chunks (two passes, no whole copy)."""
    def task_vector_chunks():
        for rows in row_chunks(shape, chunk_elements):
            yield model.read(name, rows).to(torch.float32) - base.read(name, rows).to(torch.float32)

    return MagnitudeTrim.of_chunks(task_vector_chunks, math.prod(shape), density)


def _progress(items: Iterable, enabled: bool, desc: str) -> Iterable:
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="tensor")


def _progress_bar(total: int, enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tensor")
