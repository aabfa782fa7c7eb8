"""What every command line of t2mv shares: the one-line argument parser, the model flags, loading the chain, and
the parse → run → one error path (`run_main`).

``t2mv`` (`t2mv.cli`), ``t2mv-multiview`` (`t2mv.multiview_cli`), ``t2mv-mesh`` (`t2mv.mesh_cli`) and the app
(`t2mv.app`) import this module; it imports none of them, so no command imports another.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from .chain import DEFAULT_MULTIVIEW_DELTA, DEFAULT_MULTIVIEW_MODEL, DEFAULT_T2I_MODEL, DEFAULT_TRIPOSR_MODEL
from .errors import EXIT_BAD_INPUT, run_command
from .settings import GenerationSettings, from_namespace
from .tiny import print_smoke_banner, smoke_requested

__all__ = [
    "DTYPES",
    "ArgumentParser",
    "HelpFormatter",
    "add_model_args",
    "load_chain",
    "run_main",
    "settings_from_args",
]

DTYPES = ("auto", "float16", "bfloat16", "float32")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and appends "(default: ...)" where there is a default to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (``prog: error: message (see prog --help)``) instead of usage + message.

    Subparsers made from it are of the same class, so every subcommand's errors read the same.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The model, device and smoke-mode flags every command (and the app) shares."""
    group = parser.add_argument_group("models and device")
    group.add_argument("--tiny", action="store_true", help="smoke mode: tiny random weights, output is NOISE")
    group.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda when available)")
    group.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="diffusion stages' dtype; auto = float16 on CUDA, else float32"
    )
    group.add_argument("--offload", action="store_true", help="keep stages on the CPU, each on the GPU only to run")
    group.add_argument(
        "--compile",
        action="store_true",
        help="compiled mode: torch.compile the UNets and VAE decoders (first run compiles; then faster on CUDA)",
    )
    group.add_argument(
        "--low-memory",
        action="store_true",
        default=None,
        help="keep at most one stage in memory (load, run, free); automatic on a CPU host with too little RAM",
    )
    group.add_argument("--t2i-model", default=DEFAULT_T2I_MODEL, help="SD1.5 model (hub id or folder)")
    group.add_argument("--t2i-delta", default=None, help="PeRFlow ΔW to merge into --t2i-model (if not merged)")
    group.add_argument("--multiview-model", default=DEFAULT_MULTIVIEW_MODEL, help="Wonder3D model")
    group.add_argument("--multiview-delta", default=DEFAULT_MULTIVIEW_DELTA, help="PeRFlow ΔW for Wonder3D")
    group.add_argument(
        "--delta-variant",
        default="v0-1",
        help="ΔW file variant: reads diffusion_pytorch_model.<variant>.safetensors at the delta repo's root",
    )
    group.add_argument("--triposr-model", default=DEFAULT_TRIPOSR_MODEL, help="TripoSR model")
    group.add_argument("--local-files-only", action="store_true", help="never download (as HF_HUB_OFFLINE=1)")
    group.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="print the full trace of an error"
    )


def _dtype(name: str):
    import torch

    return None if name == "auto" else getattr(torch, name)


def load_chain(args: argparse.Namespace, stages: Sequence[str], device: Any = None, *, needs_rembg: bool = False):
    """The chain for parsed model flags: smoke mode (``--tiny`` / T2MV_SMOKE=1) or the real models.

    Args:
        args: the parsed flags (`add_model_args`).
        stages: the stages to load.
        device: overrides ``--device`` (batch workers).
        needs_rembg: the run will remove a background: rembg's u2net is loaded first, so a missing model is an
            error (exit 3) before the large models load, not after them.
    """
    from .chain import TextTo3D
    from .inputs import new_rembg_session

    device = device if device is not None else args.device
    if smoke_requested(args.tiny):
        print_smoke_banner()
        return TextTo3D.tiny(
            stages=stages,
            device=device or "cpu",
            dtype=_dtype(args.dtype),
            offload=args.offload,
            low_memory=bool(args.low_memory),
            compile=args.compile,
        )
    return TextTo3D.from_pretrained(
        args.t2i_model,
        t2i_delta=args.t2i_delta,
        multiview_model=args.multiview_model,
        multiview_delta=args.multiview_delta or None,
        delta_variant=args.delta_variant,
        triposr_model=args.triposr_model,
        stages=stages,
        device=device,
        dtype=_dtype(args.dtype),
        offload=args.offload,
        low_memory=args.low_memory,  # None (flag absent): decided from the host's free RAM
        compile=args.compile,
        local_files_only=True if args.local_files_only else None,
        rembg_session=new_rembg_session(off_switch="pass --no-remove-bg") if needs_rembg else None,
    )


def settings_from_args(args: argparse.Namespace) -> GenerationSettings:
    """The command's validated `GenerationSettings` (smoke-mode defaults under ``--tiny``), before any loading."""
    return from_namespace(args, smoke=smoke_requested(args.tiny))


def run_main(
    parser: argparse.ArgumentParser,
    argv: Sequence[str] | None,
    command: Callable[[argparse.Namespace], int],
    *,
    verbose: bool = False,
) -> int:
    """Parse `argv` with `parser` and run `command(args)` through the one error path (`errors.run_command`).

    Used by ``t2mv``, ``t2mv-multiview`` and ``t2mv-mesh``: a parse error or ``--help`` returns its exit code
    (2 or 0) instead of raising SystemExit, and every failure becomes one ``prog: error: ...`` line.
    """
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as done:  # --help (0) or a one-line parse error (2)
        return int(done.code or 0) if not isinstance(done.code, str) else EXIT_BAD_INPUT
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", verbose) else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    return run_command(parser.prog, lambda: command(args), debug=bool(getattr(args, "debug", False)))
