"""What every command line of t2mv shares: the one-line argument parser, the shared flags (output, mesh formats,
models and device), the device check, loading the chain, and the parse → run → one error path (`run_main`).

One vocabulary: every command takes its generation options from `t2mv.settings.add_arguments` and its output,
format, model and device flags from here, so a setting has one flag name on every command that has it, and each
command shows only the flags of the stages it runs.

``t2mv`` (`t2mv.cli`), ``t2mv-multiview`` (`t2mv.multiview_cli`), ``t2mv-mesh`` (`t2mv.mesh_cli`) and the app
(`t2mv.app`) import this module; it imports none of them, so no command imports another.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from .chain import (
    DEFAULT_MULTIVIEW_DELTA,
    DEFAULT_MULTIVIEW_MODEL,
    DEFAULT_T2I_MODEL,
    DEFAULT_TRIPOSR_MODEL,
    MESH_FORMATS,
)
from .errors import EXIT_BAD_INPUT, BadInputError, run_command
from .settings import STAGES, GenerationSettings, from_namespace
from .tiny import print_smoke_banner, smoke_requested

__all__ = [
    "DTYPES",
    "RENAMED_FLAGS",
    "ArgumentParser",
    "HelpFormatter",
    "add_format_arg",
    "add_model_args",
    "add_output_arg",
    "check_device",
    "load_chain",
    "run_main",
    "settings_from_args",
    "stage_record",
]

DTYPES = ("auto", "float16", "bfloat16", "float32")
CHAIN_DTYPE_HELP = "diffusion stages' dtype; auto = float16 on CUDA, else float32"
# Flags the stage commands had before every command took the chain's names: a user who types one is told the new one.
RENAMED_FLAGS = {
    "--no-rembg": "--no-remove-bg",
    "--resolution": "--mc-resolution",
    "--threshold": "--mc-threshold",
    "--bake": "--bake-texture",
    "--foreground-ratio": "--mv-foreground-ratio / --mesh-foreground-ratio",
    "--steps": "--mv-steps",
    "--cfg": "--mv-guidance",
    "--preprocess": "--mv-preprocess",
    "--output-dir": "--output",
    "--model": "--multiview-model / --triposr-model",
    "--delta": "--multiview-delta",
    "--no-delta": "--no-multiview-delta",
    "--revision": "--multiview-revision",
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and appends "(default: ...)" where there is a default to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line error (``prog: error: message (see prog --help)``) instead of usage + message.

    Flags are never abbreviated (``--delta`` is not silently ``--delta-variant``), and a flag of the old stage
    commands' vocabulary is answered with its new name. Subparsers made from it are of the same class, so every
    subcommand's errors read the same.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        if message.startswith("unrecognized arguments:"):
            renamed = [f"{old} is now {new}" for old, new in RENAMED_FLAGS.items() if old in message.split()]
            if renamed:
                message += f" ({'; '.join(renamed)})"
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------------------------------------- shared flags
def add_output_arg(parser: argparse.ArgumentParser, help: str, *, default: str | None = None) -> None:
    """``-o/--output`` (every command): required when there is no `default`."""
    parser.add_argument("-o", "--output", default=default, required=default is None, help=help)


class _FormatsAction(argparse.Action):
    """``--format glb obj``, ``--format glb,obj`` and ``-f glb -f obj`` alike: one de-duplicated list."""

    def __call__(self, parser, namespace, values, option_string=None):
        names = [name.strip().lower().lstrip(".") for value in values for name in str(value).split(",")]
        names = [name for name in names if name]
        unknown = [name for name in names if name not in MESH_FORMATS]
        if unknown or not names:
            parser.error(
                f"argument -f/--format: unknown mesh format {', '.join(map(repr, unknown or values))} "
                f"(choose from {', '.join(MESH_FORMATS)})"
            )
        current = getattr(namespace, self.dest)
        current = [] if current is self.default else list(current)  # the first use replaces the default
        setattr(namespace, self.dest, list(dict.fromkeys(current + names)))


def add_format_arg(parser: argparse.ArgumentParser, default: Sequence[str]) -> None:
    """``-f/--format`` (every command that writes meshes), space- or comma-separated, or repeated."""
    parser.add_argument(
        "-f",
        "--format",
        nargs="+",
        action=_FormatsAction,
        default=list(default),
        metavar="FORMAT",
        help=f"mesh files to write: {', '.join(MESH_FORMATS)}; space- or comma-separated "
        f"(default: {' '.join(default)})",
    )


def add_model_args(
    parser: argparse.ArgumentParser,
    stages: Sequence[str] = STAGES,
    *,
    chain: bool = True,
    dtype_help: str = CHAIN_DTYPE_HELP,
) -> None:
    """The model, device and smoke-mode flags, for a command that loads the models of `stages`.

    Every command that loads a model gets ``--tiny``, ``--device``, ``--dtype``, ``--local-files-only`` and
    ``--debug``; each stage adds its model flags (``--t2i-model``, ``--multiview-model``, ``--triposr-model``, ...)
    and only those. `chain`: the command runs through the chain (`load_chain`), which adds ``--low-memory``,
    ``--compile`` (with a diffusion stage) and ``--offload`` (with more than one stage).
    """
    group = parser.add_argument_group("models and device")
    group.add_argument("--tiny", action="store_true", help="smoke mode: tiny random weights, output is NOISE")
    group.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps (default: cuda when available)")
    group.add_argument("--dtype", choices=DTYPES, default="auto", help=dtype_help)
    group.add_argument("--local-files-only", action="store_true", help="never download (as HF_HUB_OFFLINE=1)")
    diffusion = bool({"text_to_image", "multiview"} & set(stages))
    if chain and len(stages) > 1:
        group.add_argument(
            "--offload", action="store_true", help="keep stages on the CPU, each on the GPU only to run"
        )
    if chain and diffusion:
        group.add_argument(
            "--compile",
            action="store_true",
            help="compiled mode: torch.compile the UNets and VAE decoders (first run compiles; then faster on CUDA)",
        )
    if chain:
        group.add_argument(
            "--low-memory",
            action="store_true",
            default=None,
            help="keep at most one stage in memory (load, run, free); automatic on a CPU host with too little RAM",
        )
    if "text_to_image" in stages:
        group.add_argument(
            "--t2i-model",
            default=DEFAULT_T2I_MODEL,
            help="text-to-image model (hub id or folder): an SD1.5 PeRFlow model, or a rectified-flow one "
            "such as XCLiu/instaflow_0_9B_from_sd_1_5 (one step)",
        )
        group.add_argument("--t2i-delta", default=None, help="PeRFlow ΔW to merge into --t2i-model (if not merged)")
    if "multiview" in stages:
        group.add_argument("--multiview-model", default=DEFAULT_MULTIVIEW_MODEL, help="Wonder3D model")
        group.add_argument("--multiview-delta", default=DEFAULT_MULTIVIEW_DELTA, help="PeRFlow ΔW for Wonder3D")
        group.add_argument("--no-multiview-delta", action="store_true", help="keep the original Wonder3D UNet (no ΔW)")
    if diffusion:
        group.add_argument(
            "--delta-variant",
            default="v0-1",
            help="ΔW file variant: reads diffusion_pytorch_model.<variant>.safetensors at the delta repo's root",
        )
    if "mesh" in stages:
        group.add_argument("--triposr-model", default=DEFAULT_TRIPOSR_MODEL, help="TripoSR model (hub id or folder)")
    group.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="print the full trace of an error"
    )


def _dtype(name: str):
    import torch

    return None if name == "auto" else getattr(torch, name)


def check_device(device: Any, dtype: str = "auto") -> str | None:
    """A device the user named (and its dtype) that this machine can use; BadInputError (exit 2) otherwise.

    Checked before any model loads, so ``--device cuda`` on a machine without CUDA is one clear line, not
    "Torch not compiled with CUDA enabled" after the loading started. Returns the device's name, None for
    "choose" (no ``--device``, or ``auto``).
    """
    import torch

    name = None if device is None or str(device) == "auto" else str(device)
    if name is not None:
        try:
            parsed = torch.device(name)
        except (RuntimeError, ValueError, TypeError):
            raise BadInputError(f"--device {name!r} is not a device; use cpu, cuda, cuda:N or mps.") from None
        _check_available(parsed, name)
    elif dtype == "float16" and not torch.cuda.is_available():
        raise BadInputError("--dtype float16 needs a CUDA GPU and none is usable here; use float32 or bfloat16.")
    if name is not None and parsed.type == "cpu" and dtype == "float16":
        raise BadInputError("--dtype float16 is not supported on the CPU; use float32 (or bfloat16) there.")
    return name


def _check_available(device: Any, name: str) -> None:
    import torch

    if device.type == "cpu":
        return
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "this PyTorch has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise BadInputError(f"--device {name}: {why}. Use --device cpu (or leave --device out).")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise BadInputError(f"--device {name}: only {count} CUDA device(s) here (cuda:0 .. cuda:{count - 1}).")
        return
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise BadInputError(f"--device {name}: MPS (Apple GPU) is not available here. Use --device cpu.")
        return
    raise BadInputError(f"--device {name}: the {device.type!r} device is not supported; use cpu, cuda, cuda:N or mps.")


def load_chain(args: argparse.Namespace, stages: Sequence[str], device: Any = None, *, needs_rembg: bool = False):
    """The chain for parsed model flags: smoke mode (``--tiny`` / T2MV_SMOKE=1) or the real models.

    Args:
        args: the parsed flags (`add_model_args`; the model flags of stages the command lacks keep their defaults).
        stages: the stages to load.
        device: overrides ``--device`` (batch workers).
        needs_rembg: the run will remove a background: rembg's u2net is loaded first, so a missing model is an
            error (exit 3) before the large models load, not after them.

    Raises:
        BadInputError: a device (or dtype) this machine cannot use, before anything loads.
    """
    from .chain import TextTo3D
    from .inputs import new_rembg_session

    device = check_device(device if device is not None else args.device, args.dtype)
    offload, compile_ = getattr(args, "offload", False), getattr(args, "compile", False)
    if smoke_requested(args.tiny):
        print_smoke_banner()
        return TextTo3D.tiny(
            stages=stages,
            device=device or "cpu",
            dtype=_dtype(args.dtype),
            offload=offload,
            low_memory=bool(args.low_memory),
            compile=compile_,
        )
    no_delta = getattr(args, "no_multiview_delta", False)
    return TextTo3D.from_pretrained(
        getattr(args, "t2i_model", DEFAULT_T2I_MODEL),
        t2i_delta=getattr(args, "t2i_delta", None),
        multiview_model=getattr(args, "multiview_model", DEFAULT_MULTIVIEW_MODEL),
        multiview_delta=None if no_delta else getattr(args, "multiview_delta", DEFAULT_MULTIVIEW_DELTA) or None,
        delta_variant=getattr(args, "delta_variant", "v0-1"),
        triposr_model=getattr(args, "triposr_model", DEFAULT_TRIPOSR_MODEL),
        stages=stages,
        device=device,
        dtype=_dtype(args.dtype),
        offload=offload,
        low_memory=args.low_memory,  # None (flag absent): decided from the host's free RAM
        compile=compile_,
        local_files_only=True if args.local_files_only else None,
        rembg_session=new_rembg_session(off_switch="pass --no-remove-bg") if needs_rembg else None,
    )


def stage_record(
    settings: GenerationSettings,
    *,
    stages: Sequence[str],
    models: dict[str, Any],
    device: Any,
    dtype: Any,
    smoke: bool,
    use_rembg: bool,
    command: dict[str, Any],
) -> dict[str, Any]:
    """``settings.json`` of a stage command (an image in): the chain's own record (`t2mv.chain.result.run_record`)
    of the same stages, plus ``command``, the command's own options (scheduler, chunk size, ...).

    `stages`: the model stages that ran (``["multiview"]``, ``["mesh"]``); `use_rembg`: rembg ran (False when the
    input's alpha was used or removal was off).
    """
    import torch

    from .chain.loading import versions
    from .chain.result import run_record
    from .chain.stages import InputImage, Mesh, Multiview, Preprocess, Texture

    plan = [InputImage(), Preprocess(multiview="multiview" in stages, mesh="mesh" in stages)]
    plan += [Multiview()] if "multiview" in stages else []
    plan += [Mesh()] if "mesh" in stages else []
    plan += [Texture(source="field")] if "mesh" in stages and settings.bake_texture else []
    chain = {
        "models": models,
        "device": torch.device(device).type,
        "dtype": str(dtype).removeprefix("torch."),
        "offload": False,
        "low_memory": False,
        "compiled": {},
        "smoke": smoke,
        "versions": versions(),
    }
    return {**run_record(settings, plan, None, None, use_rembg, chain), "command": command}


def settings_from_args(args: argparse.Namespace) -> GenerationSettings:
    """The command's validated `GenerationSettings` (smoke-mode defaults under ``--tiny``), before any loading.

    A rectified-flow ``--t2i-model`` (InstaFlow) brings its own step and guidance defaults for the flags left
    unset, and the steps are checked against the model kind's bounds (PeRFlow: one per time window), from its
    ``model_index.json`` alone.
    """
    from .errors import BadInputError
    from .settings import t2i_kind_problem, t2i_model_defaults

    smoke = smoke_requested(args.tiny)
    kind, model = _t2i_kind(args, smoke)
    own = {} if kind is None else t2i_model_defaults(kind, model)
    settings = from_namespace(args, smoke=smoke, **{k: v for k, v in own.items() if getattr(args, k, None) is None})
    problem = None if kind is None else t2i_kind_problem(settings, kind, name="--t2i-steps")
    if problem:
        raise BadInputError(problem)
    return settings


def _t2i_kind(args: argparse.Namespace, smoke: bool) -> tuple[str | None, str]:
    """The text-to-image model's kind and name (None: the command has no such stage, or the model is not here yet:
    loading then reports it, naming the stage). ValueError for a model_index.json that names neither kind."""
    from .perflow.hub import MissingWeightsError
    from .rectified_flow import kind_of_model

    if not hasattr(args, "t2i_steps"):
        return None, ""
    if smoke:
        return "perflow", "tiny"  # smoke mode's tiny text-to-image is PeRFlow
    model = getattr(args, "t2i_model", None)
    if model is None:
        return None, ""
    try:
        return kind_of_model(model, local_files_only=True if getattr(args, "local_files_only", False) else None), model
    except MissingWeightsError:
        return None, str(model)


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
