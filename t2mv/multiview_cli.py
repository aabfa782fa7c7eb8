"""`t2mv-multiview`: image → folder with 12 PNGs (6 normals, 6 colors), two 256×1536 strips and settings.json.

The multiview stage alone (``wonder3d_perflow``), with the same checks and exit codes as ``t2mv``: the options
(`GenerationSettings`), the input image (`t2mv.inputs.open_image`), the output folder and background removal are
checked before the model loads; errors are one line (``--debug`` adds the trace); exit codes 2 bad input,
3 missing weights, 4 out of memory, 1 anything else.

The folder is written next to its final place under a temporary name and renamed into place at the end, so an
interrupted run leaves no half-written output folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from .cli_common import ArgumentParser, run_main
from .errors import EXIT_OK, BadInputError
from .settings import MAX_STEPS, add_arguments, from_namespace
from .tiny import FakeRembgSession, print_smoke_banner

FLAGS = {
    "mv_steps": "--steps",
    "mv_guidance": "--cfg",
    "mv_preprocess": "--preprocess",
    "mv_foreground_ratio": "--foreground-ratio",
    "remove_background": "--no-rembg",
}


def build_parser() -> argparse.ArgumentParser:
    from wonder3d_perflow.pipeline import DEFAULT_DELTA, DEFAULT_MODEL

    parser = ArgumentParser(
        prog="t2mv-multiview",
        description="Wonder3D + PeRFlow: one image → 6 normal maps + 6 color views (256²) in a folder.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "image", type=Path, help="input image (PNG with alpha, or any image: rembg removes its background)"
    )
    parser.add_argument("-o", "--output", type=Path, required=True, help="output folder (created; must not exist)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="Wonder3D checkpoint: hub id or local folder")
    parser.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) of --model")
    parser.add_argument("--delta", default=DEFAULT_DELTA, help="SD1.5 PeRFlow ΔW: hub id or local folder")
    parser.add_argument(
        "--delta-variant",
        default="v0-1",
        help="ΔW file variant: reads diffusion_pytorch_model.<variant>.safetensors at the delta repo's root",
    )
    parser.add_argument("--no-delta", action="store_true", help="keep the original Wonder3D UNet (no ΔW)")
    parser.add_argument("--scheduler", choices=("perflow", "ddim"), default="perflow", help="sampler")
    add_arguments(parser, ("seed", "preprocess", "multiview"), exclude=("mesh_foreground_ratio",), names=FLAGS)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--dtype", choices=("auto", "float16", "bfloat16", "float32"), default="auto", help="auto: fp16 on cuda"
    )
    parser.add_argument(
        "--num-time-windows", type=int, default=4, help="PeRFlow windows; 1 = EXPERIMENTAL single pass"
    )
    parser.add_argument("--local-files-only", action="store_true", help="never download (use the HF cache)")
    parser.add_argument("--tiny", action="store_true", help="smoke mode: tiny random weights, output is noise")
    parser.add_argument("--debug", action="store_true", help="print the full trace of an error")
    return parser


def _check_steps(steps: int, scheduler: str, windows: int) -> None:
    """PeRFlow: at least one UNet pass per time window (an error, never a silent raise); DDIM: at least one."""
    if not 1 <= windows <= 4:
        raise BadInputError(f"--num-time-windows must be 1 (experimental) .. 4 (trained), got {windows}.")
    low = windows if scheduler == "perflow" else 1
    if isinstance(steps, bool) or not isinstance(steps, int) or not low <= steps <= MAX_STEPS:
        raise BadInputError(
            f"--steps must be an integer in [{low}, {MAX_STEPS}], got {steps!r}"
            + (
                f": PeRFlow with {windows} time windows needs --steps >= {windows} (one UNet pass per window; "
                f"upstream's 'one-step' demo silently runs {windows})."
                if scheduler == "perflow"
                else "."
            )
        )


def run(args: argparse.Namespace) -> int:
    """The command after parsing: checks, then load, generate, write."""
    from .chain import horizontal_strip, resolve_device_dtype
    from .inputs import check_output_folder, has_alpha, new_rembg_session, open_image, write_text

    # 1. Everything the user gave, before any model loads.
    settings = from_namespace(
        args, smoke=args.tiny, skip=("mv_steps",), names=FLAGS
    )  # steps: the scheduler's own rule below
    steps = settings.mv_steps
    _check_steps(steps, args.scheduler, args.num_time_windows)
    image = open_image(args.image)
    output = check_output_folder(args.output, may_exist=args.overwrite).resolve()
    check_output_folder(output.parent)  # the staging folder is made there and renamed into place
    remove_background = settings.remove_background and not has_alpha(image)
    session = None
    if remove_background:  # u2net now (smoke mode: the weightless stand-in), not after the model loaded
        session = FakeRembgSession() if args.tiny else new_rembg_session(off_switch="pass --no-rembg")
    device, dtype = resolve_device_dtype(None if args.device == "auto" else args.device, _dtype(args.dtype))

    import torch

    from wonder3d_perflow.pipeline import MultiviewPipeline
    from wonder3d_perflow.preprocess import preprocess_image

    # 2. Load.
    started = time.perf_counter()
    if args.tiny:
        print_smoke_banner()
        pipe = MultiviewPipeline.tiny(scheduler=args.scheduler, num_time_windows=args.num_time_windows)
        pipe.to(device, dtype)
    else:
        pipe = MultiviewPipeline.from_pretrained(
            args.model,
            delta=None if args.no_delta else args.delta,
            delta_variant=args.delta_variant,
            scheduler=args.scheduler,
            torch_dtype=dtype,
            device=str(device),
            revision=args.revision,
            local_files_only=True if args.local_files_only else None,
            num_time_windows=args.num_time_windows,
        )
    load_seconds = time.perf_counter() - started

    # 3. Generate.
    condition = preprocess_image(
        image,
        session=session,
        remove_background=settings.remove_background,
        mode=settings.mv_preprocess,
        foreground_ratio=settings.mv_foreground_ratio,
    )
    generator = torch.Generator(device="cpu").manual_seed(settings.seed)
    result = pipe(condition, num_inference_steps=steps, guidance_scale=settings.mv_guidance, generator=generator)

    # 4. Write into a staging folder, then rename into place.
    from wonder3d_perflow.cameras import VIEW_NAMES

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        condition.save(staging / "input.png")
        for name, normal, color in zip(VIEW_NAMES, result.normals, result.colors):
            normal.save(staging / f"normal_{name}.png")
            color.save(staging / f"color_{name}.png")
        horizontal_strip(result.normals).save(staging / "normals.png")
        horizontal_strip(result.colors).save(staging / "colors.png")
        record = {
            "input": str(args.image),
            "smoke_mode_random_weights": args.tiny,
            "preprocess": {
                "mode": settings.mv_preprocess,
                "foreground_ratio": settings.mv_foreground_ratio,
                "remove_background": remove_background,  # False when the input's alpha was used
                "object_mask": "rembg u2net" if remove_background else ("input alpha" if has_alpha(image) else "none"),
            },
            "seed": settings.seed,
            "view_names": list(VIEW_NAMES),
            "normal_frame": "front (input) camera frame, OpenGL axes (x right, y up, z to viewer); RGB = (n + 1) / 2",
            "pipeline": result.settings,
            "timings": {"load": load_seconds, **result.timings},
        }
        write_text(json.dumps(record, indent=2, default=str) + "\n", staging / "settings.json")
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    print(f"wrote 12 views, 2 strips and settings.json to {output} ({result.timings['total']:.2f} s)")
    if args.tiny:
        print("SMOKE MODE: the images are noise from random weights.", file=sys.stderr)
    return EXIT_OK


def _dtype(name: str):
    import torch

    return None if name == "auto" else getattr(torch, name)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``t2mv-multiview``; returns the exit status (0, 2 bad input, 3 no weights, 4 OOM, 1 other)."""
    return run_main(build_parser(), argv, run)


if __name__ == "__main__":
    sys.exit(main())
