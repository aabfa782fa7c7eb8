"""The ``t2mv`` command: text → image, batch text → multiview (+ mesh), text/image → mesh, and the web app.

    t2mv image "a red teapot" -o teapot.png
    t2mv text-to-mesh "a red teapot" -o out/teapot
    t2mv image-to-mesh photo.png -o out/photo
    t2mv batch prompts.txt -o out/batch [--mesh]
    accelerate launch --multi_gpu --num_processes 4 -m t2mv.cli batch prompts.txt -o out/batch
    t2mv app [--host 127.0.0.1 --port 7860]

Every command takes ``--tiny`` (smoke mode: tiny random weights, noise out, runs on a CPU in seconds; also
``T2MV_SMOKE=1``), ``--device`` and ``--dtype``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .chain import (
    DEFAULT_MULTIVIEW_DELTA,
    DEFAULT_MULTIVIEW_MODEL,
    DEFAULT_T2I_MODEL,
    DEFAULT_TRIPOSR_MODEL,
    TINY_DEFAULTS,
    ChainDefaults,
)
from .tiny import SMOKE_BANNER, smoke_requested

logger = logging.getLogger("t2mv")
D, T = ChainDefaults(), TINY_DEFAULTS
DTYPES = ("auto", "float16", "bfloat16", "float32")
EXIT_BAD_INPUT, EXIT_NO_WEIGHTS, EXIT_OOM, EXIT_FAILED = 2, 3, 4, 1


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and appends "(default: ...)" where there is a default to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("models and device")
    group.add_argument("--tiny", action="store_true", help="smoke mode: tiny random weights, output is NOISE")
    group.add_argument("--device", default=None, help="cuda, cuda:1, cpu, ... (default: cuda when available)")
    group.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="diffusion stages' dtype; auto = float16 on CUDA, else float32"
    )
    group.add_argument("--offload", action="store_true", help="keep stages on the CPU, each on the GPU only to run")
    group.add_argument("--t2i-model", default=DEFAULT_T2I_MODEL, help="SD1.5 model (hub id or folder)")
    group.add_argument("--t2i-delta", default=None, help="PeRFlow ΔW to merge into --t2i-model (if not merged)")
    group.add_argument("--multiview-model", default=DEFAULT_MULTIVIEW_MODEL, help="Wonder3D model")
    group.add_argument("--multiview-delta", default=DEFAULT_MULTIVIEW_DELTA, help="PeRFlow ΔW for Wonder3D")
    group.add_argument("--delta-variant", default="v0-1", help="ΔW variant (subfolder of the delta repo)")
    group.add_argument("--triposr-model", default=DEFAULT_TRIPOSR_MODEL, help="TripoSR model")
    group.add_argument("--local-files-only", action="store_true", help="never download (as HF_HUB_OFFLINE=1)")


def _text_to_image_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("text to image")
    group.add_argument("--negative-prompt", default=None, help="negative prompt")
    group.add_argument("--seed", type=int, default=0, help="seed of every stage's noise")
    group.add_argument("--t2i-steps", type=int, default=D.t2i_steps, help="PeRFlow steps")
    group.add_argument("--t2i-guidance", type=float, default=D.t2i_guidance, help="classifier-free guidance")
    group.add_argument("--height", type=int, default=None, help=f"image height (default {D.height}; smoke {T.height})")
    group.add_argument("--width", type=int, default=None, help=f"image width (default {D.width}; smoke {T.width})")


def _image_input_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("background removal")
    group.add_argument("--no-remove-bg", action="store_true", help="do not run rembg on images without alpha")
    group.add_argument("--mv-foreground-ratio", type=float, default=D.mv_foreground_ratio, help="multiview")
    group.add_argument(
        "--mv-preprocess",
        choices=("wonder3d", "perflow"),
        default="wonder3d",
        help="multiview input: crop + recentre (wonder3d) or the PeRFlow demo's resize + whiten (perflow)",
    )
    group.add_argument("--mesh-foreground-ratio", type=float, default=D.mesh_foreground_ratio, help="TripoSR")


def _multiview_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("multiview")
    group.add_argument("--mv-steps", type=int, default=D.mv_steps, help="PeRFlow steps (at least 4)")
    group.add_argument("--mv-guidance", type=float, default=D.mv_guidance, help="1.0 = no CFG (as upstream)")


def _mesh_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("mesh")
    group.add_argument(
        "--mc-resolution", type=int, default=None, help=f"marching cubes grid (default {D.mc_resolution}; smoke 32)"
    )
    group.add_argument("--mc-threshold", type=float, default=D.mc_threshold, help="density level of the surface")
    group.add_argument("--bake-texture", action="store_true", help="bake a UV texture instead of vertex colours")
    group.add_argument(
        "--texture-size", type=int, default=None, help=f"texture side (default {D.texture_size}; smoke 512)"
    )
    group.add_argument("--simplify", type=int, default=0, help="decimate to about this many faces (0: keep all)")
    group.add_argument(
        "--format", nargs="+", choices=("glb", "obj", "ply"), default=["glb", "obj", "ply"], help="mesh files"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="t2mv", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("image", help="text → image (PeRFlow SD1.5)", formatter_class=HelpFormatter)
    p.add_argument("prompt", help="the text prompt")
    p.add_argument("-o", "--output", default="image.png", help="output PNG")
    _text_to_image_args(p)
    add_model_args(p)

    p = sub.add_parser(
        "text-to-mesh", help="text → image → 6 normals + 6 colors and a mesh", formatter_class=HelpFormatter
    )
    p.add_argument("prompt", help="the text prompt")
    p.add_argument("-o", "--output", default="outputs/text-to-mesh", help="output folder")
    p.add_argument("--no-multiview", action="store_true", help="skip the multiview stage (mesh only)")
    _text_to_image_args(p)
    _image_input_args(p)
    _multiview_args(p)
    _mesh_args(p)
    add_model_args(p)

    p = sub.add_parser("image-to-mesh", help="image → 6 normals + 6 colors and a mesh", formatter_class=HelpFormatter)
    p.add_argument("image", help="input image (PNG/JPEG/WebP; transparency is used as the object mask)")
    p.add_argument("-o", "--output", default="outputs/image-to-mesh", help="output folder")
    p.add_argument("--no-multiview", action="store_true", help="skip the multiview stage (mesh only)")
    p.add_argument("--seed", type=int, default=0, help="seed of the multiview noise")
    _image_input_args(p)
    _multiview_args(p)
    _mesh_args(p)
    add_model_args(p)

    p = sub.add_parser(
        "batch",
        help="prompt file → a folder per prompt (image, 12 views, strips, settings); resumable, shardable",
        formatter_class=HelpFormatter,
        description=(
            'Prompt file: one prompt per line, or JSON lines {"prompt", "negative_prompt", "seed"}. Prompt i '
            "gets seed --seed + i unless its line sets one. Finished folders are skipped on a re-run. Under "
            "`accelerate launch` or `torchrun` the prompts are split across the processes."
        ),
    )
    p.add_argument("prompts", help="prompt file (.txt or .jsonl)")
    p.add_argument("-o", "--output", default="outputs/batch", help="output folder")
    p.add_argument("--mesh", action="store_true", help="also make the mesh of every prompt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _text_to_image_args(p)
    _image_input_args(p)
    _multiview_args(p)
    _mesh_args(p)
    p.set_defaults(format=["glb"])
    add_model_args(p)

    p = sub.add_parser("app", help="launch the web app (Gradio)", add_help=False)
    p.add_argument("app_args", nargs=argparse.REMAINDER, help="arguments of the app (see `t2mv app --help`)")
    return parser


def _dtype(name: str):
    import torch

    return None if name == "auto" else getattr(torch, name)


def load_chain(args: argparse.Namespace, stages: Sequence[str], device: Any = None):
    from .chain import TextTo3D

    device = device if device is not None else args.device
    if smoke_requested(args.tiny):
        print(f"\n*** {SMOKE_BANNER} ***\n", file=sys.stderr)
        return TextTo3D.tiny(stages=stages, device=device or "cpu", dtype=_dtype(args.dtype), offload=args.offload)
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
        local_files_only=True if args.local_files_only else None,
    )


def _generation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    names = {
        "t2i_steps": "t2i_steps",
        "t2i_guidance": "t2i_guidance",
        "height": "height",
        "width": "width",
        "mv_steps": "mv_steps",
        "mv_guidance": "mv_guidance",
        "mv_foreground_ratio": "mv_foreground_ratio",
        "mv_preprocess": "mv_preprocess",
        "mesh_foreground_ratio": "mesh_foreground_ratio",
        "mc_resolution": "mc_resolution",
        "mc_threshold": "mc_threshold",
        "bake_texture": "bake_texture",
        "texture_size": "texture_size",
        "simplify": "simplify_faces",
    }
    kwargs = {target: getattr(args, name) for name, target in names.items() if hasattr(args, name)}
    if hasattr(args, "no_remove_bg"):
        kwargs["remove_background"] = not args.no_remove_bg
    return kwargs


def _report(result: Any, paths: dict[str, Path], output: Path) -> None:
    for message in result.warnings:
        print(f"warning: {message}", file=sys.stderr)
    timings = ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items() if "." not in k)
    print(f"wrote {len(paths)} files to {output}  ({timings})")


def _cmd_image(args: argparse.Namespace) -> int:
    chain = load_chain(args, ("text_to_image",))
    kwargs = {k: v for k, v in _generation_kwargs(args).items() if k.startswith("t2i") or k in ("height", "width")}
    result = chain(args.prompt, negative_prompt=args.negative_prompt, seed=args.seed, **kwargs)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    result.image.save(output)
    settings_path = output.with_suffix(".json")
    settings_path.write_text(json.dumps(result.settings, indent=2, sort_keys=True, default=str) + "\n")
    _report(result, {"image": output, "settings": settings_path}, output.parent)
    return 0


def _cmd_to_mesh(args: argparse.Namespace) -> int:
    text = args.command == "text-to-mesh"
    stages = (("text_to_image",) if text else ()) + (() if args.no_multiview else ("multiview",)) + ("mesh",)
    chain = load_chain(args, stages)
    kwargs = _generation_kwargs(args)
    if text:
        result = chain(args.prompt, negative_prompt=args.negative_prompt, seed=args.seed, **kwargs)
    else:
        result = chain(image=args.image, seed=args.seed, **kwargs)
    output = Path(args.output)
    paths = result.save(output, mesh_formats=args.format)
    _report(result, paths, output)
    return 0


def _cmd_batch(args: argparse.Namespace) -> int:
    import torch
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from .batch import read_prompts, run_batch, write_summary

    specs = read_prompts(args.prompts, base_seed=args.seed, negative_prompt=args.negative_prompt)
    on_cpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cpu")
    # One process per GPU (or per CPU worker under torchrun / accelerate launch): each takes its own shard.
    state = PartialState(cpu=on_cpu)
    device = args.device if args.device and state.num_processes == 1 else state.device
    stages = ("text_to_image", "multiview") + (("mesh",) if args.mesh else ())
    chain = load_chain(args, stages, device=device)
    summary = run_batch(
        chain,
        specs,
        args.output,
        mesh=args.mesh,
        mesh_formats=args.format,
        process_index=state.process_index,
        num_processes=state.num_processes,
        progress=not args.no_progress,
        **_generation_kwargs(args),
    )
    summaries = gather_object([summary]) if state.num_processes > 1 else [summary]
    failed = 0
    if state.is_main_process:
        total = summaries[0]
        for other in summaries[1:]:
            total = total.merge(other)
        path = write_summary(specs, args.output, total)
        print(f"{total.line()}; summary: {path}")
        failed = len(total.failed)
    state.wait_for_everyone()
    return EXIT_FAILED if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``t2mv`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["app"]:  # the app parses its own flags (`t2mv app --help` shows them)
        import app

        app.main(argv[1:])
        return 0
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    commands = {
        "image": _cmd_image,
        "text-to-mesh": _cmd_to_mesh,
        "image-to-mesh": _cmd_to_mesh,
        "batch": _cmd_batch,
    }
    import torch

    try:
        return commands[args.command](args)
    except FileNotFoundError as e:  # missing weights (WeightsUnavailableError and the stages' own errors)
        print(f"error: {e}", file=sys.stderr)
        return EXIT_NO_WEIGHTS
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except torch.cuda.OutOfMemoryError as e:
        print(
            f"error: out of GPU memory ({e}). Try --offload, a lower --mc-resolution, or no --bake-texture.",
            file=sys.stderr,
        )
        return EXIT_OOM


if __name__ == "__main__":
    sys.exit(main())
