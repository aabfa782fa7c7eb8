"""Where the chain's stages live between runs: resident, offloaded, or loaded per run (low-memory mode).

The chain holds each stage in a `StageSlot`: either a built stage (resident: loaded once, kept for the chain's
lifetime) or a loader (low-memory mode: loaded when the stage runs and freed right after, so at most one stage's
weights are in memory at a time). `StageSlot.run(...)` is the one place where stages are placed, moved and freed.

Why a loader and not "move to disk": a stage's weights are read back from the hub cache, which the OS keeps in its
page cache when there is room, so re-loading costs seconds, while keeping three fp32 stages resident on a CPU costs
about 13.5 GiB of RAM (measured, benchmarks/results/cpu-2core-fp32.json).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
from collections.abc import Callable
from typing import Any

import torch

logger = logging.getLogger(__name__)

# Peak host memory of the whole chain with all three stages resident on the CPU in float32 (GiB, measured with the
# benchmark at real sizes). Below this much available RAM the chain switches to low-memory mode by itself.
RESIDENT_CPU_FP32_GIB = 13.5


def move_stage(stage: Any, device: torch.device | str, dtype: torch.dtype | None = None) -> None:
    """Move a stage's weights: an object holding a diffusers ``.pipe``, a diffusers pipeline, or an nn.Module."""
    if isinstance(stage, torch.nn.Module):
        stage.to(device=device, dtype=dtype)
    else:  # DiffusionPipeline.to(torch_device, torch_dtype) in diffusers 0.19
        pipe = getattr(stage, "pipe", stage)
        pipe.to(device, dtype)


def free_memory(device: torch.device | str | None = None) -> None:
    """Give freed tensors back: Python garbage, CUDA's caching allocator, and glibc's heap (malloc_trim), so the
    process's resident set really shrinks after a stage is dropped (glibc keeps freed small blocks otherwise)."""
    gc.collect()
    if device is not None and torch.device(device).type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def available_host_memory_gib() -> float | None:
    """MemAvailable from /proc/meminfo (what can be allocated without swapping), None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20  # kB -> GiB
    except OSError:
        return None
    return None


def auto_low_memory(device: torch.device, dtype: torch.dtype, *, available_gib: float | None = None) -> bool:
    """Whether the chain should keep one stage at a time: on the CPU, when the host has less RAM available than the
    resident chain needs (bf16 halves the need). On CUDA the weights live on the GPU, so host RAM does not decide."""
    if device.type != "cpu":
        return False
    available = available_host_memory_gib() if available_gib is None else available_gib
    if available is None:
        return False
    need = RESIDENT_CPU_FP32_GIB * (0.5 if dtype in (torch.float16, torch.bfloat16) else 1.0)
    return available < need


class StageSlot:
    """One stage of the chain: a built stage, or a loader that builds it when needed.

    Args:
        name: the stage's name (for messages).
        stage: the built stage (resident mode), or None.
        loader: a callable returning the stage (low-memory mode: called at every run), or None.
        dtype: the dtype the stage runs in (TripoSR always float32).
    """

    def __init__(self, name: str, stage: Any = None, loader: Callable[[], Any] | None = None, *, dtype=None):
        if stage is not None and loader is not None:
            raise ValueError(f"stage {name!r}: give a built stage or a loader, not both")
        self.name, self.stage, self.loader, self.dtype = name, stage, loader, dtype

    @property
    def present(self) -> bool:
        return self.stage is not None or self.loader is not None

    @property
    def resident(self) -> bool:
        return self.stage is not None

    def run(self, device: torch.device, fn: Callable[[Any], Any], *, offload: bool = False) -> Any:
        """``fn(stage)`` with the stage on `device`; returns what `fn` returns.

        Resident: the stage is already there (with `offload`, it is moved to `device` for the call and back to the
        CPU after). Loader: the stage is built, moved to `device`, and freed after the call (low-memory mode), even
        when `fn` fails. The stage is handed to `fn` instead of being yielded to a ``with`` block because a
        ``with ... as stage`` name outlives the block: the memory could not be given back until the caller returned.
        """
        if self.stage is not None:
            if not offload:
                return fn(self.stage)
            move_stage(self.stage, device, self.dtype)
            try:
                return fn(self.stage)
            finally:
                move_stage(self.stage, "cpu")
                free_memory(device)
        if self.loader is None:
            raise RuntimeError(f"the chain has no {self.name} stage")
        stage = self.loader()
        try:
            move_stage(stage, device, self.dtype)
            return fn(stage)
        finally:
            del stage  # the last reference: fn's frame is gone
            free_memory(device)
            logger.info("low-memory mode: %s stage freed", self.name)
