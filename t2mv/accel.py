"""Speed levers shared by the two SD1.5-family diffusion stages (`t2mv.text_to_image.TextToImage` and
`wonder3d_perflow.MultiviewPipeline`): the compiled mode (torch.compile of UNet and VAE decoder with static shapes,
compiled once per shape and reused) and the SDPA kernel choice and report.

A leaf module: it imports nothing else of ours, so both stages can use it without importing each other.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

# --------------------------------------------------------------------------------------------- speed levers
# Shared by TextToImage and wonder3d_perflow.MultiviewPipeline (both are SD1.5-family UNet + VAE pipelines).

#: SDPA kernel order on CUDA: flash first wherever its shape rules allow (fp16/bf16, head dim ≤ 256, no mask),
#: then memory-efficient (e.g. the VAE's single 512-wide head), then cuDNN and math.
SDPA_PRIORITY = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")

# Profiler op name → kernel; the ops SDPA dispatches to on CPU and CUDA.
_SDPA_OPS = {
    "aten::_scaled_dot_product_flash_attention": "flash",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "flash (cpu)",
    "aten::_scaled_dot_product_efficient_attention": "efficient",
    "aten::_scaled_dot_product_cudnn_attention": "cudnn",
    "aten::_scaled_dot_product_attention_math": "math",
    "aten::_scaled_dot_product_fused_attention_overrideable": "overrideable",
}


def compile_unavailable_reason(device: str | torch.device, backend: str = "inductor") -> str | None:
    """Why ``torch.compile`` with `backend` cannot run on `device` here (None when it can).

    Inductor needs a C++ compiler for CPU code and Triton for CUDA code; the other backends (``"eager"``,
    ``"aot_eager"``) only trace, and need neither.
    """
    import importlib.util
    import shutil

    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python version"
    if backend != "inductor":
        return None
    if torch.device(device).type == "cuda":
        return None if importlib.util.find_spec("triton") is not None else "Triton is not installed"
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        compiler = get_cpp_compiler()
    except Exception as error:  # no compiler found, or an inductor without this helper
        return f"no C++ compiler for inductor's CPU code ({error})"
    if shutil.which(compiler) is None and not Path(compiler).is_file():
        return f"no C++ compiler for inductor's CPU code ({compiler!r} not found; install g++)"
    return None


def compile_module(module: torch.nn.Module, *, backend: str = "inductor", mode: str | None = None) -> None:
    """``torch.compile`` `module` in place with static shapes (``dynamic=False``): the module keeps its class,
    attributes and weights (pipelines read ``unet.config``, ``.dtype``), only its call goes through the compiled
    code. A new input shape compiles once more (up to dynamo's cache limit); undo with `uncompile_module`."""
    module.compile(backend=backend, mode=mode, dynamic=False)


def uncompile_module(module: torch.nn.Module) -> None:
    """Back to the eager call of `module` (the compiled code stays in dynamo's cache for this process)."""
    module._compiled_call_impl = None


def is_compiled(module: torch.nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


def preferred_sdpa(device: str | torch.device):
    """Context manager: on CUDA, SDPA tries the kernels in `SDPA_PRIORITY` order (flash first); elsewhere nothing
    changes (the CPU has its own flash kernel, which PyTorch already picks)."""
    import contextlib

    if torch.device(device).type != "cuda":
        return contextlib.nullcontext()
    import inspect

    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [getattr(SDPBackend, name) for name in SDPA_PRIORITY]
    if "set_priority" not in inspect.signature(sdpa_kernel).parameters:  # torch < 2.6: its own order, flash first
        return sdpa_kernel(backends)
    return sdpa_kernel(backends, set_priority=True)


def sdpa_choice(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> str:
    """The SDPA kernel PyTorch picks for these (B, heads, L, head_dim) tensors on their device, without running it.

    Returns:
        ``"FLASH_ATTENTION"``, ``"EFFICIENT_ATTENTION"``, ``"CUDNN_ATTENTION"``, ``"MATH"``, ...
    """
    from torch.nn.attention import SDPBackend

    return SDPBackend(torch._fused_sdp_choice(query, key, value)).name


def sdpa_kernels(fn, *args, **kwargs) -> dict[str, int]:
    """Run ``fn(*args, **kwargs)`` under the profiler and count the attention kernels that ran.

    Returns:
        kernel → calls, e.g. ``{"flash": 40, "efficient": 2}`` (CUDA fp16 SD1.5: the UNet's heads are 40-160 wide,
        flash; the VAE's one 512-wide head is not); ``{"flash (cpu)": n}`` on CPU; xformers ops as ``xformers``.
    """
    from collections import Counter

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(*args, **kwargs)
    counts: Counter[str] = Counter()
    for event in prof.events():
        if event.name in _SDPA_OPS:
            counts[_SDPA_OPS[event.name]] += 1
        elif event.name.startswith("xformers::"):
            counts["xformers"] += 1
    return dict(counts)


class CompiledRun:
    """Bookkeeping of a pipeline's compiled mode: which modules, which static call shapes have been compiled.

    The first call with a new shape runs an untimed warm-up call first (compilation + one run); its seconds are
    reported as ``timings["compile"]`` so that the call's own timing is the steady-state one.
    """

    def __init__(self, modules: dict[str, torch.nn.Module], *, backend: str, mode: str | None):
        self.modules = modules
        self.backend = backend
        self.mode = mode
        self.shapes: set[tuple] = set()
        for module in modules.values():
            compile_module(module, backend=backend, mode=mode)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "mode": self.mode, "modules": sorted(self.modules), "dynamic": False}

    def undo(self) -> None:
        for module in self.modules.values():
            uncompile_module(module)

    def warm_up(self, shape: tuple, run) -> float | None:
        """Call ``run()`` once when `shape` is new; returns its seconds (None when the shape was compiled before).

        Raises:
            Exception: whatever compilation raised (the caller falls back to eager).
        """
        if shape in self.shapes:
            return None
        started = time.perf_counter()
        run()
        self.shapes.add(shape)
        return time.perf_counter() - started


def enable_compile_on(
    owner: Any, modules: dict[str, torch.nn.Module], device, *, backend: str, mode: str | None, logger_
) -> CompiledRun | None:
    """Compile `modules` for `owner` (a pipeline) or say once, clearly, why not; returns the bookkeeping or None."""
    reason = compile_unavailable_reason(device, backend)
    if reason is not None:
        logger_.warning("Compiled mode is off, running eagerly: %s.", reason)
        return None
    previous = getattr(owner, "_compiled", None)
    if previous is not None:
        previous.undo()
    return CompiledRun(modules, backend=backend, mode=mode)


def _is_compile_error(error: BaseException) -> bool:
    """Whether `error` comes from torch.compile (dynamo, inductor, the C++ or Triton toolchain)."""
    if isinstance(error, torch._dynamo.exc.TorchDynamoException):
        return True
    module = type(error).__module__ or ""
    return module.startswith(("torch._dynamo", "torch._inductor", "triton", "subprocess"))


def run_compile_warm_up(owner: Any, shape: tuple, run, logger_) -> float | None:
    """`CompiledRun.warm_up` for `owner._compiled`; on a compile error: one warning, back to eager, None."""
    compiled = owner._compiled
    if compiled is None:
        return None
    try:
        return compiled.warm_up(shape, run)
    except Exception as error:
        if not _is_compile_error(error):
            raise  # e.g. latents of the wrong shape: the caller's error, not the compiler's
        compiled.undo()
        owner._compiled = None
        root = error
        # dynamo wraps the backend's error (BackendCompilerFailed.inner_exception)
        while (inner := getattr(root, "inner_exception", None) or root.__cause__) is not None:
            root = inner
        lines = [line for line in str(root).splitlines() if line.strip()]
        logger_.warning(
            "Compiled mode is off, running eagerly: compilation failed (%s: %s).",
            type(root).__name__,
            lines[0][:200] if lines else "",
        )
        return None
