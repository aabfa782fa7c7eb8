"""`t2mv-multiview`: image → folder with 12 PNGs (6 normals, 6 colors), two 256×1536 strips and settings.json.

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
from pathlib import Path

from PIL import Image

from .cameras import VIEW_NAMES

SMOKE_BANNER = (
    "=" * 78 + "\n"
    "SMOKE MODE (--tiny): tiny RANDOM weights. The output images are NOISE, not a result.\n"
    "It only checks that the stage runs end to end. Drop --tiny to use the real Wonder3D weights.\n" + "=" * 78
)


def build_parser() -> argparse.ArgumentParser:
    from .pipeline import DEFAULT_DELTA, DEFAULT_MODEL

    parser = argparse.ArgumentParser(
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
    parser.add_argument("--delta-variant", default="v0-1", help="variant of the ΔW files")
    parser.add_argument("--no-delta", action="store_true", help="keep the original Wonder3D UNet (no ΔW)")
    parser.add_argument("--scheduler", choices=("perflow", "ddim"), default="perflow", help="sampler")
    parser.add_argument(
        "--steps", type=int, default=4, help="UNet passes (PeRFlow: at least 4, one per time window; 4 or 8)"
    )
    parser.add_argument("--cfg", type=float, default=1.0, help="guidance scale (1.0 = no unconditional branch)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the initial noise")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument(
        "--dtype", choices=("auto", "float16", "bfloat16", "float32"), default="auto", help="auto: fp16 on cuda"
    )
    parser.add_argument("--no-rembg", action="store_true", help="never remove the background with rembg")
    parser.add_argument(
        "--preprocess", choices=("wonder3d", "perflow"), default="wonder3d", help="crop+recentre, or resize only"
    )
    parser.add_argument("--foreground-ratio", type=float, default=0.75, help="object size in the 256² input")
    parser.add_argument(
        "--num-time-windows", type=int, default=4, help="PeRFlow windows; 1 = EXPERIMENTAL single pass"
    )
    parser.add_argument("--local-files-only", action="store_true", help="never download (use the HF cache)")
    parser.add_argument("--tiny", action="store_true", help="smoke mode: tiny random weights, output is noise")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.image.is_file():
        parser.error(f"input image not found: {args.image}")
    output = args.output.expanduser().resolve()
    if output.exists() and not args.overwrite:
        parser.error(f"{output} already exists; pass --overwrite to replace it")
    if args.scheduler == "perflow" and args.steps < args.num_time_windows:
        parser.error(
            f"PeRFlow with {args.num_time_windows} time windows needs --steps >= {args.num_time_windows} "
            "(one UNet pass per window; upstream's 'one-step' demo silently runs 4)"
        )

    import torch

    from .pipeline import MultiviewPipeline
    from .preprocess import preprocess_image

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if args.dtype == "auto":
        dtype = torch.float16 if torch.device(device).type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)

    started = time.perf_counter()
    if args.tiny:
        print(SMOKE_BANNER, file=sys.stderr, flush=True)
        pipe = MultiviewPipeline.tiny(scheduler=args.scheduler, num_time_windows=args.num_time_windows)
        pipe.to(device, dtype)
    else:
        from t2mv.perflow.hub import MissingWeightsError

        try:
            pipe = MultiviewPipeline.from_pretrained(
                args.model,
                delta=None if args.no_delta else args.delta,
                delta_variant=args.delta_variant,
                scheduler=args.scheduler,
                torch_dtype=dtype,
                device=device,
                revision=args.revision,
                local_files_only=True if args.local_files_only else None,
                num_time_windows=args.num_time_windows,
            )
        except MissingWeightsError as error:
            print(f"t2mv-multiview: {error}", file=sys.stderr)
            return 1
    load_seconds = time.perf_counter() - started

    image = Image.open(args.image)
    # Smoke mode never downloads u2net: an image without alpha is used whole.
    remove_background = not (args.no_rembg or args.tiny)
    condition = preprocess_image(
        image, remove_background=remove_background, mode=args.preprocess, foreground_ratio=args.foreground_ratio
    )
    generator = torch.Generator(device=device).manual_seed(args.seed)
    result = pipe(condition, num_inference_steps=args.steps, guidance_scale=args.cfg, generator=generator)

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        condition.save(staging / "input.png")
        for name, normal, color in zip(VIEW_NAMES, result.normals, result.colors):
            normal.save(staging / f"normal_{name}.png")
            color.save(staging / f"color_{name}.png")
        _strip(result.normals).save(staging / "normals.png")
        _strip(result.colors).save(staging / "colors.png")
        settings = {
            "input": str(args.image),
            "smoke_mode_random_weights": args.tiny,
            "preprocess": {
                "mode": args.preprocess,
                "foreground_ratio": args.foreground_ratio,
                "remove_background": remove_background,
            },
            "seed": args.seed,
            "view_names": list(VIEW_NAMES),
            "normal_frame": "front (input) camera frame, OpenGL axes (x right, y up, z to viewer); RGB = (n + 1) / 2",
            "pipeline": result.settings,
            "timings": {"load": load_seconds, **result.timings},
        }
        (staging / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise

    print(f"wrote 12 views, 2 strips and settings.json to {output} ({result.timings['total']:.2f} s)")
    if args.tiny:
        print("SMOKE MODE: the images are noise from random weights.", file=sys.stderr)
    return 0


def _strip(images: list[Image.Image]) -> Image.Image:
    """Six views side by side: a (6·W)×H image (256×1536 for Wonder3D: 256 high, 1536 wide)."""
    width, height = images[0].size
    strip = Image.new("RGB", (width * len(images), height))
    for i, image in enumerate(images):
        strip.paste(image, (i * width, 0))
    return strip


if __name__ == "__main__":
    sys.exit(main())
