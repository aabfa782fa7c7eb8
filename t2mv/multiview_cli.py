"""`t2mv-multiview`: image → a folder with the chain's multiview files: the six normal and six colour views,
their two 256×1536 strips, the multiview input, the image, settings.json and timings.json.

The multiview stage alone (``wonder3d_perflow``), with the same flags, files, checks and exit codes as ``t2mv``:
the options come from `GenerationSettings` under the chain's names (``--mv-steps``, ``--mv-guidance``,
``--mv-preprocess``, ``--mv-foreground-ratio``, ``--no-remove-bg``, ``--multiview-model``, ...); the files are
written by the chain's own writer (`ChainResult.save`), so a folder from this command and one from
``t2mv text-to-mesh`` read the same (`t2mv.chain.read_views`). The options, the input image, the output folder,
the device and background removal are checked before the model loads; errors are one line (``--debug`` adds the
trace); exit codes 2 bad input, 3 missing weights, 4 out of memory, 1 anything else.

The folder is written next to its final place under a temporary name and renamed into place at the end, so an
interrupted run leaves no half-written output folder.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .cli_common import (
    ArgumentParser,
    HelpFormatter,
    add_model_args,
    add_output_arg,
    check_device,
    run_main,
    stage_record,
)
from .errors import EXIT_OK, BadInputError
from .settings import MAX_STEPS, add_arguments, from_namespace
from .tiny import FakeRembgSession, print_smoke_banner, smoke_requested

STAGES = ("multiview",)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="t2mv-multiview",
        description="Wonder3D + PeRFlow: one image → 6 normal maps + 6 color views (256²) in a folder, with the "
        "same file names and settings.json as `t2mv text-to-mesh`.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "image", type=Path, help="input image (PNG with alpha, or any image: rembg removes its background)"
    )
    add_output_arg(parser, "output folder (created; must not exist unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    add_arguments(parser, STAGES)
    group = parser.add_argument_group("this command only")
    group.add_argument("--scheduler", choices=("perflow", "ddim"), default="perflow", help="sampler")
    group.add_argument("--num-time-windows", type=int, default=4, help="PeRFlow windows; 1 = EXPERIMENTAL single pass")
    group.add_argument(
        "--multiview-revision", default=None, help="hub revision (branch, tag or commit) of --multiview-model"
    )
    add_model_args(parser, STAGES, chain=False)
    return parser


def _check_steps(steps: int, scheduler: str, windows: int) -> None:
    """PeRFlow: at least one UNet pass per time window (an error, never a silent raise); DDIM: at least one."""
    if not 1 <= windows <= 4:
        raise BadInputError(f"--num-time-windows must be 1 (experimental) .. 4 (trained), got {windows}.")
    low = windows if scheduler == "perflow" else 1
    if isinstance(steps, bool) or not isinstance(steps, int) or not low <= steps <= MAX_STEPS:
        raise BadInputError(
            f"--mv-steps must be an integer in [{low}, {MAX_STEPS}], got {steps!r}"
            + (
                f": PeRFlow with {windows} time windows needs --mv-steps >= {windows} (one UNet pass per window; "
                f"upstream's 'one-step' demo silently runs {windows})."
                if scheduler == "perflow"
                else "."
            )
        )


def _load(args: argparse.Namespace, smoke: bool, device: Any, dtype: Any) -> Any:
    from wonder3d_perflow.pipeline import MultiviewPipeline

    if smoke:
        print_smoke_banner()
        pipe = MultiviewPipeline.tiny(scheduler=args.scheduler, num_time_windows=args.num_time_windows)
        pipe.to(device, dtype)
        return pipe
    return MultiviewPipeline.from_pretrained(
        args.multiview_model,
        delta=None if args.no_multiview_delta else args.multiview_delta,
        delta_variant=args.delta_variant,
        scheduler=args.scheduler,
        torch_dtype=dtype,
        device=str(device),
        revision=args.multiview_revision,
        local_files_only=True if args.local_files_only else None,
        num_time_windows=args.num_time_windows,
    )


def run(args: argparse.Namespace) -> int:
    """The command after parsing: checks, then load, generate, write."""
    from .chain import ChainResult, resolve_device_dtype
    from .inputs import check_output_folder, has_alpha, new_rembg_session, open_image

    # 1. Everything the user gave, before any model loads (steps: the scheduler's own rule below).
    smoke = smoke_requested(args.tiny)
    settings = from_namespace(args, smoke=smoke, skip=("mv_steps",))
    _check_steps(settings.mv_steps, args.scheduler, args.num_time_windows)
    device_name = check_device(args.device, args.dtype)
    image = open_image(args.image)
    output = check_output_folder(args.output, may_exist=args.overwrite).resolve()
    check_output_folder(output.parent)  # the staging folder is made there and renamed into place
    use_rembg = settings.remove_background and not has_alpha(image)
    session = None
    if use_rembg:  # u2net now (smoke mode: the weightless stand-in), not after the model loaded
        session = FakeRembgSession() if smoke else new_rembg_session(off_switch="pass --no-remove-bg")
    device, dtype = resolve_device_dtype(device_name, None if args.dtype == "auto" else _dtype(args.dtype))

    import torch

    from wonder3d_perflow.preprocess import preprocess_image

    # 2. Load.
    started = time.perf_counter()
    pipe = _load(args, smoke, device, dtype)
    timings = {"load": time.perf_counter() - started}

    # 3. Generate.
    started = time.perf_counter()
    condition = preprocess_image(
        image,
        session=session,
        remove_background=settings.remove_background,
        size=int(pipe.unet.config.sample_size * pipe.vae_scale_factor),  # as the chain: 256 for Wonder3D
        mode=settings.mv_preprocess,
        foreground_ratio=settings.mv_foreground_ratio,
    )
    timings["preprocess"] = time.perf_counter() - started
    generator = torch.Generator(device="cpu").manual_seed(settings.seed)
    out = pipe(
        condition, num_inference_steps=settings.mv_steps, guidance_scale=settings.mv_guidance, generator=generator
    )
    timings.update(
        {"multiview": out.timings.get("total", 0.0), **{f"multiview.{k}": v for k, v in out.timings.items()}}
    )
    timings["total"] = sum(timings[k] for k in ("load", "preprocess", "multiview"))

    # 4. The chain's files, written by the chain's writer into a staging folder, then renamed into place.
    record = _record(args, settings, smoke=smoke, device=device, dtype=dtype, use_rembg=use_rembg, out=out)
    result = ChainResult(
        image=image,
        mv_input=condition,
        normals=list(out.normals),
        colors=list(out.colors),
        view_names=tuple(out.view_names),
        timings=timings,
        settings=record,
    )
    _save_atomically(result, output)

    print(f"wrote 12 views, 2 strips and settings.json to {output} ({out.timings['total']:.2f} s)")
    if smoke:
        print("SMOKE MODE: the images are noise from random weights.", file=sys.stderr)
    return EXIT_OK


def _record(args: argparse.Namespace, settings: Any, *, smoke: bool, device, dtype, use_rembg: bool, out) -> dict:
    """settings.json: the chain's record for the multiview stage, plus this command's own options."""
    models = {
        "multiview_model": "tiny(seed=0)" if smoke else str(args.multiview_model),
        "multiview_delta": None if smoke or args.no_multiview_delta else str(args.multiview_delta),
        "delta_variant": args.delta_variant,
    }
    command = {
        "scheduler": args.scheduler,
        "num_time_windows": args.num_time_windows,
        "multiview_revision": args.multiview_revision,
        "input_file": str(args.image),
        "pipeline": out.settings,
    }
    return stage_record(
        settings,
        stages=STAGES,
        models=models,
        device=device,
        dtype=dtype,
        smoke=smoke,
        use_rembg=use_rembg,
        command=command,
    )


def _save_atomically(result: Any, output: Path) -> None:
    """`result`'s files into a staging folder next to `output`, renamed into place when all are written."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        result.save(staging, mesh_formats=())
        if output.exists():
            shutil.rmtree(output)
        staging.rename(output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _dtype(name: str):
    import torch

    return getattr(torch, name)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``t2mv-multiview``; returns the exit status (0, 2 bad input, 3 no weights, 4 OOM, 1 other)."""
    return run_main(build_parser(), argv, run)


if __name__ == "__main__":
    sys.exit(main())
