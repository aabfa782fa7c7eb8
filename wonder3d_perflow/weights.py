"""Weights files read one tensor at a time, each cast to the dtype it will run in as it is read.

Why: Wonder3D's published UNet is a 1.82 GB fp16 pickle (``unet/diffusion_pytorch_model.bin``) and runs in
fp32 on a CPU. ``torch.load`` (or a memory map of it, whose touched pages count as resident) holds the whole
fp16 file while the fp32 copy is made: 1.82 + 3.64 GB at once. Read here, the peak is the fp32 model plus one
tensor's bytes, which keeps ``--low-memory`` under 6 GB.

- ``.bin``/``.ckpt`` (torch's zip format): the pickle is read with a restricted unpickler that admits only what a
  state dict holds (dicts, tensors of the standard storage types) and records where each tensor lives; each
  tensor's bytes are then read from the archive alone. Anything else (the legacy non-zip format, other objects)
  falls back to ``torch.load(weights_only=True)``, as strict as before.
- ``.safetensors``: the JSON header gives each tensor's byte range; each is read with one file read.

Plain file reads, not a memory map: mapped pages stay in the process's resident set until the whole map goes.
"""

from __future__ import annotations

import collections
import json
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

_STORAGE_DTYPES = {
    "HalfStorage": torch.float16,
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
_SAFETENSORS_DTYPES = {
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class NotAStateDictPickle(pickle.UnpicklingError):
    """The pickle holds something other than a plain state dict; use torch.load instead."""


@dataclass(frozen=True)
class _Storage:
    key: str
    dtype: torch.dtype


@dataclass(frozen=True)
class _TensorRecord:
    """Where one tensor of a torch zip archive lives: its storage record and its view of it (in elements)."""

    storage: _Storage
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, *_):
    return _TensorRecord(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *_):
    return data


class _StateDictUnpickler(pickle.Unpickler):
    """Admits only the globals a state dict needs; tensors become `_TensorRecord`s (no bytes read)."""

    _GLOBALS = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._GLOBALS:
            return self._GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise NotAStateDictPickle(f"{module}.{name}")

    def persistent_load(self, pid):
        # torch.save writes ('storage', <storage type>, key, location, numel) for every storage.
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)):
            raise NotAStateDictPickle(f"persistent id {pid!r}")
        return _Storage(str(pid[2]), pid[1])


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Floating tensors to `dtype` (integer and bool tensors keep theirs, as `Module.to(dtype)` does); always a
    tensor that owns its memory, so the bytes it was read from can be freed."""
    if dtype is not None and tensor.is_floating_point() and tensor.dtype != dtype:
        return tensor.to(dtype)
    return tensor.clone()


def _read_torch_zip(path: Path, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [name for name in names if name.endswith("/data.pkl") or name == "data.pkl"]
        if len(pickles) != 1:
            raise NotAStateDictPickle("not one data.pkl in the archive")
        prefix = pickles[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in names and archive.read(f"{prefix}byteorder") != b"little":
            raise NotAStateDictPickle("big-endian archive")
        with archive.open(pickles[0]) as handle:
            records = _StateDictUnpickler(handle).load()
        if not isinstance(records, dict) or not all(isinstance(v, _TensorRecord) for v in records.values()):
            raise NotAStateDictPickle("not a flat {name: tensor} dict")
        state_dict: dict[str, torch.Tensor] = {}
        for key, record in records.items():  # one storage's bytes in memory at a time
            raw = bytearray(archive.read(f"{prefix}data/{record.storage.key}"))
            flat = (
                torch.frombuffer(raw, dtype=record.storage.dtype)
                if raw
                else torch.empty(0, dtype=record.storage.dtype)
            )
            view = torch.as_strided(flat, record.size, record.stride, record.offset)
            state_dict[key] = _cast(view, dtype)
            del raw, flat, view
        return state_dict


def _read_safetensors(path: Path, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    with open(path, "rb") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_size))
        start = 8 + header_size
        state_dict: dict[str, torch.Tensor] = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            handle.seek(start + begin)
            raw = bytearray(handle.read(end - begin))
            stored = _SAFETENSORS_DTYPES[info["dtype"]]
            flat = torch.frombuffer(raw, dtype=stored) if raw else torch.empty(0, dtype=stored)
            state_dict[key] = _cast(flat.reshape(info["shape"]), dtype)
            del raw, flat
        return state_dict


def read_state_dict(path: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The {name: tensor} dict stored in a ``.bin``/``.ckpt``/``.pt`` or ``.safetensors`` file, on the CPU, floating
    tensors cast to `dtype` (None: as stored), read one tensor at a time (see the module docstring)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return _read_safetensors(path, dtype)
    if zipfile.is_zipfile(path):
        try:
            return _read_torch_zip(path, dtype)
        except NotAStateDictPickle:
            pass  # not a plain state dict of standard tensors: torch's own (weights-only) loader decides
    state_dict = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(state_dict).__name__}).")
    return {
        key: _cast(value, dtype) if isinstance(value, torch.Tensor) else value for key, value in state_dict.items()
    }


def describe_file(path: str | Path) -> dict[str, object]:
    """What a weights file is, without reading its tensors: format, stored dtype(s), tensor count and size."""
    path = Path(path)
    dtypes: set[str] = set()
    count = 0
    if path.suffix == ".safetensors":
        with open(path, "rb") as handle:
            (header_size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(header_size))
        infos = [info for key, info in header.items() if key != "__metadata__"]
        dtypes, count, kind = {str(_SAFETENSORS_DTYPES[i["dtype"]]) for i in infos}, len(infos), "safetensors"
    elif zipfile.is_zipfile(path):
        kind = "torch zip pickle"
        with zipfile.ZipFile(path) as archive:
            name = next(n for n in archive.namelist() if n.endswith("data.pkl"))
            with archive.open(name) as handle:
                try:
                    records = _StateDictUnpickler(handle).load()
                    dtypes = {str(r.storage.dtype) for r in records.values() if isinstance(r, _TensorRecord)}
                    count = len(records)
                except NotAStateDictPickle:
                    kind = "torch zip pickle (not a plain state dict)"
    else:
        kind = "legacy torch pickle"
    return {"format": kind, "dtypes": sorted(d.replace("torch.", "") for d in dtypes), "tensors": count,
            "bytes": path.stat().st_size}  # fmt: skip
