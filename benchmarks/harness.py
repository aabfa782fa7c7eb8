"""Measurement primitives: timing with warm-up, peak memory (GPU and host), FLOP counts, environment info.

Timing on CUDA uses CUDA events around each run plus a synchronize (so queued kernels are counted); on CPU it
uses ``time.perf_counter``. Host peak RSS is reset per measurement through ``/proc/self/clear_refs`` (Linux)
and read back from ``VmHWM``; where that is not possible a psutil sampling thread is used, and as a last resort
the process-wide ``resource.getrusage`` high-water mark (which cannot be reset, and is labelled so).
"""

from __future__ import annotations

import math
import os
import platform
import re
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

# ----------------------------------------------------------------------------------------------------- timing


def synchronize(device: torch.device | str) -> None:
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def summarize(values: list[float]) -> dict[str, Any]:
    """Median and spread of a list of seconds: min/max, quartiles and IQR (linear interpolation)."""
    if not values:
        raise ValueError("summarize() needs at least one timed run; pass runs >= 1")
    ordered = sorted(values)
    n = len(ordered)

    def quantile(q: float) -> float:
        pos = q * (n - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    q1, q3 = quantile(0.25), quantile(0.75)
    return {
        "median": statistics.median(ordered),
        "mean": statistics.fmean(ordered),
        "min": ordered[0],
        "max": ordered[-1],
        "q1": q1,
        "q3": q3,
        "iqr": q3 - q1,
        "n": n,
        "values": list(values),
    }


def time_runs(
    fn: Callable[[], Any], *, runs: int, warmup: int, device: torch.device | str
) -> tuple[list[float], list[float], Any]:
    """Call ``fn`` ``warmup`` times untimed-for-statistics, then ``runs`` times timed.

    Returns (timed seconds, warm-up seconds, result of the last call). Each timed run is bracketed by device
    synchronisation so asynchronous GPU work is inside the measurement and no earlier work leaks into it.
    """
    if runs < 1 or warmup < 0:
        raise ValueError(f"need runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    device = torch.device(device)
    warm_times: list[float] = []
    result = None
    for _ in range(warmup):
        t0 = time.perf_counter()
        result = fn()
        synchronize(device)
        warm_times.append(time.perf_counter() - t0)
    times: list[float] = []
    for _ in range(runs):
        synchronize(device)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end) / 1000.0)  # ms -> s
        else:
            t0 = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - t0)
    return times, warm_times, result


# ----------------------------------------------------------------------------------------------------- memory

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


def _vm_hwm_bytes() -> int | None:
    try:
        with open(_STATUS) as f:
            match = re.search(r"VmHWM:\s+(\d+)\s+kB", f.read())
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def _reset_vm_hwm() -> bool:
    try:
        with open(_CLEAR_REFS, "w") as f:
            f.write("5")  # "5" resets the peak RSS (VmHWM) of this process (Linux >= 4.0)
    except OSError:
        return False
    return True


def _ru_maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports kB


class _RssSampler:
    """Polls the RSS in a thread; only used where the kernel's peak counter cannot be reset."""

    def __init__(self, interval: float = 0.01):
        import psutil  # optional; callers fall back when missing

        self._proc = psutil.Process()
        self._interval = interval
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self._interval)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)
        return self.peak


@dataclass
class PeakMemory:
    """Context manager: peak GPU memory allocated by torch and peak host RSS inside the block."""

    device: torch.device | str = "cpu"
    gpu_peak_bytes: int | None = None
    host_peak_bytes: int | None = None
    host_method: str = ""
    _sampler: Any = field(default=None, repr=False)

    def __enter__(self) -> PeakMemory:
        dev = torch.device(self.device)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        if _reset_vm_hwm() and _vm_hwm_bytes() is not None:
            self.host_method = "VmHWM (reset via /proc/self/clear_refs)"
        else:
            try:
                self._sampler = _RssSampler()
                self._sampler.start()
                self.host_method = "psutil RSS sampled every 10 ms"
            except ImportError:
                self.host_method = "ru_maxrss (process-wide high-water mark, not reset per measurement)"
        return self

    def __exit__(self, *exc: object) -> None:
        dev = torch.device(self.device)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            self.gpu_peak_bytes = int(torch.cuda.max_memory_allocated(dev))
        if self._sampler is not None:
            self.host_peak_bytes = int(self._sampler.stop())
        elif self.host_method.startswith("VmHWM"):
            self.host_peak_bytes = _vm_hwm_bytes()
        else:
            self.host_peak_bytes = _ru_maxrss_bytes()


def current_rss_bytes() -> int | None:
    try:
        with open(_STATUS) as f:
            match = re.search(r"VmRSS:\s+(\d+)\s+kB", f.read())
        return int(match.group(1)) * 1024 if match else None
    except OSError:
        return None


# ----------------------------------------------------------------------------------------------------- FLOPs


def count_flops(fn: Callable[[], Any]) -> dict[str, Any]:
    """FLOPs of one call of ``fn`` as counted by ``torch.utils.flop_counter.FlopCounterMode``.

    The counter covers matmul / conv / SDPA-type ops (1 multiply-add = 2 FLOPs) and ignores norms and
    element-wise ops. ``fn`` may run on meta tensors, which costs no compute. Returns the total and a per-op
    breakdown (top-level "Global" entry).
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return {"total": int(counter.get_total_flops()), "by_op": by_op}


# ----------------------------------------------------------------------------------------------------- environment


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # not installed
        return None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return sorted(f for f in flags if f.startswith(("avx512", "amx", "avx2", "fma")))
    except OSError:
        pass
    return []


def environment(device: torch.device | str, dtype: torch.dtype) -> dict[str, Any]:
    device = torch.device(device)
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "diffusers": _version("diffusers"),
        "transformers": _version("transformers"),
        "xformers": _version("xformers"),
        "numpy": _version("numpy"),
        "trimesh": _version("trimesh"),
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "os_cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "total_host_memory_bytes": _total_memory(),
        "cuda_available": torch.cuda.is_available(),
        "gpu_name": None,
        "cuda_version": torch.version.cuda,
        "cudnn_version": None,
    }
    if device.type == "cuda" and torch.cuda.is_available():
        env["gpu_name"] = torch.cuda.get_device_name(device)
        env["cudnn_version"] = torch.backends.cudnn.version()
        props = torch.cuda.get_device_properties(device)
        env["gpu_total_memory_bytes"] = int(props.total_memory)
    return env


def record_header(benchmark: str, argv: list[str] | None, device: torch.device) -> dict[str, Any]:
    """The opening fields of a benchmark's JSON record: which benchmark, the command that ran it, when, on what
    (fp32), and the machine's load when it started."""
    import datetime as _dt

    return {
        "benchmark": benchmark,
        "command": f"python -m benchmarks.{benchmark} " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(device, torch.float32),
        "load_average": list(os.getloadavg()),
    }


def run_setup(args: Any, default_out: Any) -> tuple[torch.device, Any]:
    """A quality benchmark's --threads, --device and --out (the default path only for the full preset)."""
    from pathlib import Path

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out) if args.out else (default_out if args.preset == "full" else None)
    return torch.device(args.device), out


def merge_files(paths: list[str], out: str | None, merge: Callable[[list[dict]], dict]) -> dict | None:
    """A benchmark's --merge: the JSON records at `paths` merged by `merge`, written to `out`; None (with an error
    line) when --out is missing."""
    import json
    from pathlib import Path

    if not out:
        print("error: --merge needs --out", file=sys.stderr)
        return None
    merged = merge([json.loads(Path(path).read_text()) for path in paths])
    Path(out).write_text(json.dumps(merged, indent=1) + "\n")
    return merged


def comma_list(text: str) -> list[str]:
    """A command line's comma list, blanks dropped."""
    return [item.strip() for item in text.split(",") if item.strip()]


def _total_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            match = re.search(r"MemTotal:\s+(\d+)\s+kB", f.read())
        return int(match.group(1)) * 1024 if match else None
    except OSError:
        return None


# ----------------------------------------------------------------------------------------------------- diffs


def max_diffs(output: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Max absolute and max relative difference (relative to the reference's max magnitude) in float64."""
    out = output.detach().to("cpu", torch.float64)
    ref = reference.detach().to("cpu", torch.float64)
    if out.shape != ref.shape:
        raise ValueError(f"output shape {tuple(out.shape)} differs from reference {tuple(ref.shape)}")
    abs_diff = (out - ref).abs()
    scale = ref.abs().max().clamp_min(1e-12)
    return {
        "max_abs_diff": float(abs_diff.max()),
        "max_rel_diff": float(abs_diff.max() / scale),
        "rms_rel_diff": float(abs_diff.pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp_min(1e-12)),
    }


def human_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def human_seconds(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.0f} µs"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


def human_flops(n: int | float | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} FLOP"


# ----------------------------------------------------------------------------------------------------- call log


@dataclass(frozen=True)
class _Spec:
    """Shape and dtype of a tensor argument (the tensor itself is not kept)."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    def meta(self) -> torch.Tensor:
        return torch.zeros(self.shape, dtype=self.dtype, device="meta")


def _describe(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return _Spec(tuple(value.shape), value.dtype)
    if isinstance(value, list | tuple):
        return type(value)(_describe(v) for v in value)
    if isinstance(value, dict):
        return {k: _describe(v) for k, v in value.items()}
    return value


def _materialize(value: Any) -> Any:
    if isinstance(value, _Spec):
        return value.meta()
    if isinstance(value, list | tuple):
        return type(value)(_materialize(v) for v in value)
    if isinstance(value, dict):
        return {k: _materialize(v) for k, v in value.items()}
    return value


def _signature(args: Any, kwargs: Any) -> str:
    return repr((args, sorted(kwargs.items())))


def _batch(args: tuple, kwargs: dict) -> int | None:
    for value in list(args) + list(kwargs.values()):
        if isinstance(value, _Spec) and value.shape:
            return value.shape[0]
    return None


class CallRecorder:
    """Logs every forward call of the named modules (argument shapes only) while active.

    This yields two things per stage: the call pattern (how many UNet calls, at what batch: shows whether CFG is
    one batch, whether encoders run once, whether the VAE decodes in one batch), and exact FLOP counts, by
    re-running each distinct call signature once on the meta device with ``torch.func.functional_call`` (the
    module's own code with meta parameters: no compute, no copy of the weights).
    """

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.modules = {name: m for name, m in modules.items() if m is not None}
        self.calls: list[tuple[str, tuple, dict]] = []
        self._handles: list[Any] = []

    def __enter__(self) -> CallRecorder:
        for name, module in self.modules.items():

            def hook(_module, args, kwargs, _name=name):
                self.calls.append((_name, _describe(args), _describe(kwargs)))

            self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def clear(self) -> None:
        self.calls.clear()

    def pattern(self) -> dict[str, dict[str, Any]]:
        """Per module: number of calls and the batch sizes seen (first tensor argument's leading dim)."""
        out: dict[str, dict[str, Any]] = {}
        for name, args, kwargs in self.calls:
            entry = out.setdefault(name, {"calls": 0, "batch_sizes": []})
            entry["calls"] += 1
            batch = _batch(args, kwargs)
            if batch is not None and batch not in entry["batch_sizes"]:
                entry["batch_sizes"].append(batch)
            if "rows" in entry or (args and isinstance(args[0], _Spec)):
                entry["rows"] = entry.get("rows", 0) + (args[0].shape[0] if args[0].shape else 1)
        return out

    def flops(self) -> dict[str, Any]:
        """Total FLOPs of the logged calls, per module, computed on the meta device (one run per signature)."""
        from torch.func import functional_call

        cache: dict[tuple[str, str], int] = {}
        per_module: dict[str, int] = {}
        for name, args, kwargs in self.calls:
            key = (name, _signature(args, kwargs))
            if key not in cache:
                module = self.modules[name]
                meta_state = {
                    k: torch.empty_like(v, device="meta")
                    for k, v in list(module.named_parameters()) + list(module.named_buffers())
                }
                cache[key] = count_flops(
                    lambda m=module, s=meta_state, a=args, kw=kwargs: functional_call(
                        m, s, _materialize(a), _materialize(kw)
                    )
                )["total"]
            per_module[name] = per_module.get(name, 0) + cache[key]
        return {"total": sum(per_module.values()), "by_module": per_module, "method": "meta replay of logged calls"}
