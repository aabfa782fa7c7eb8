"""Variants compared against the float32 / default-SDPA reference: attention backends, dtypes, channels-last,
torch.compile. Each is applied to a stage object (a diffusers pipeline or the TripoSR model), run, compared
with the reference output, and undone.

``compile`` is the product's compiled mode (`t2mv.text_to_image.compile_module`: UNet and VAE decoder, static
shapes); its compile time is the variant's warm-up (``warmup_s``). ``benchmarks.compile_speed`` measures the
diffusion levers (compile, channels-last, one text-encoder batch, SDPA kernels) with compile time apart.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
VARIANTS = (
    "sdpa-math",
    "sdpa-flash",
    "sdpa-efficient",
    "xformers",
    "fp16",
    "bf16",
    "channels-last",
    "compile",
    "compile-cudagraphs",
)

# Max abs difference allowed on outputs in [0, 1] (images) or O(1) (scene codes): float32 changes of kernel
# order stay far below 1e-3; half precision is a numerical change, judged against a looser bound.
TOLERANCE = {"fp32": 1e-3, "half": 0.1}


@dataclass
class Variant:
    name: str
    dtype: torch.dtype = torch.float32
    attention: str = "sdpa"  # sdpa (PyTorch picks), sdpa-math, sdpa-flash, sdpa-efficient, xformers
    channels_last: bool = False
    compile: bool = False
    compile_mode: str | None = None  # torch.compile mode; "reduce-overhead" = CUDA graphs

    def describe(self) -> dict[str, Any]:
        return {
            "dtype": str(self.dtype).removeprefix("torch."),
            "attention": self.attention,
            "channels_last": self.channels_last,
            "compile": self.compile,
            "compile_mode": self.compile_mode,
        }

    @property
    def tolerance(self) -> float:
        return TOLERANCE["fp32" if self.dtype == torch.float32 else "half"]


def parse_variants(names: list[str]) -> list[Variant]:
    out = []
    for name in names:
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}; choose from {', '.join(VARIANTS)}")
        if name in ("fp16", "bf16"):
            out.append(Variant(name, dtype=DTYPES[name]))
        elif name == "channels-last":
            out.append(Variant(name, channels_last=True))
        elif name == "compile":
            out.append(Variant(name, compile=True))
        elif name == "compile-cudagraphs":
            out.append(Variant(name, compile=True, compile_mode="reduce-overhead"))
        else:
            out.append(Variant(name, attention=name))
    return out


def unavailable_reason(variant: Variant, device: torch.device) -> str | None:
    """Why a variant cannot run here (None when it can)."""
    if variant.attention == "xformers":
        if device.type != "cuda":
            return "xformers attention is CUDA-only"
        if importlib.util.find_spec("xformers") is None:
            return "xformers is not installed"
    if variant.attention in ("sdpa-flash", "sdpa-efficient") and device.type != "cuda":
        return f"{variant.attention} is a CUDA kernel"
    if variant.dtype == torch.float16 and device.type == "cpu":
        return "float16 is not a CPU compute type here (the chain refuses it on CPU); use bf16"
    if variant.compile_mode == "reduce-overhead" and device.type != "cuda":
        return "CUDA graphs (reduce-overhead) are CUDA-only"
    if variant.compile:
        from t2mv.text_to_image import compile_unavailable_reason

        return compile_unavailable_reason(device)
    return None


def _modules(target: Any) -> dict[str, torch.nn.Module]:
    if isinstance(target, torch.nn.Module):
        return {"model": target}
    return {name: m for name in ("unet", "vae", "text_encoder", "image_encoder") if (m := getattr(target, name, None))}


@contextlib.contextmanager
def applied(variant: Variant, target: Any, device: torch.device) -> Iterator[None]:
    """Apply ``variant`` to ``target`` for the duration of the block; the reference state is restored after."""
    modules = _modules(target)
    saved_dtype = {name: next(m.parameters()).dtype for name, m in modules.items()}
    saved_unet = getattr(target, "unet", None)
    stack = contextlib.ExitStack()
    try:
        if variant.dtype != torch.float32:
            for m in modules.values():
                m.to(dtype=variant.dtype)
        if variant.channels_last:
            for m in modules.values():
                m.to(memory_format=torch.channels_last)
        if variant.attention.startswith("sdpa-"):
            from torch.nn.attention import SDPBackend, sdpa_kernel

            backend = {
                "sdpa-math": SDPBackend.MATH,
                "sdpa-flash": SDPBackend.FLASH_ATTENTION,
                "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
            }[variant.attention]
            stack.enter_context(sdpa_kernel(backend))
        elif variant.attention == "xformers":
            target.enable_xformers_memory_efficient_attention()
        if variant.compile:
            from t2mv.text_to_image import compile_module

            if saved_unet is not None:  # a diffusion pipeline: the product's compiled mode
                for m in (target.unet, target.vae.decoder):
                    compile_module(m, mode=variant.compile_mode)
            elif isinstance(target, torch.nn.Module):
                target.forward = torch.compile(target.forward, mode=variant.compile_mode, dynamic=False)
        with stack:
            yield
    finally:
        if variant.compile:
            from t2mv.text_to_image import uncompile_module

            if saved_unet is not None:
                for m in (target.unet, target.vae.decoder):
                    uncompile_module(m)
            elif isinstance(target, torch.nn.Module):
                del target.forward  # back to the class's forward
        if variant.attention == "xformers":
            from diffusers.models.attention_processor import AttnProcessor2_0

            for name in ("unet", "vae"):
                if (m := getattr(target, name, None)) is not None:
                    m.set_attn_processor(AttnProcessor2_0())
        if variant.channels_last:
            for m in modules.values():
                m.to(memory_format=torch.contiguous_format)
        for name, m in modules.items():
            m.to(dtype=saved_dtype[name])
