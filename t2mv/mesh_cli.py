"""`t2mv-mesh`: images (files or folders) -> meshes with TripoSR.

The mesh stage alone (``triposr``), with the same checks and exit codes as ``t2mv``: the options
(`GenerationSettings`), every input image (`t2mv.inputs.open_image`), the output folder and background removal are
checked before the model loads; errors are one line (``--debug`` adds the trace); exit codes 2 bad input,
3 missing weights, 4 out of memory, 1 anything else (with several images: the first failure's code, after the
others were done).

The flags are the chain's (``--mc-resolution``, ``--mc-threshold``, ``--bake-texture``, ``--mesh-foreground-ratio``,
``--no-remove-bg``, ``--triposr-model``, ``-o/--output``, ``--format glb obj`` or ``glb,obj``, ...), from the same
declarations. For each image, <output>/<image stem>/ receives the chain's files for the mesh stage: image.png,
mesh_input.png (the preprocessed model input), mesh.<format> for every requested format (mesh.mtl + mesh.png next
to a textured OBJ), settings.json and timings.json as ``t2mv image-to-mesh --no-multiview`` writes them, and
info.json (vertex and face counts, frame). Meshes are in the export frame (glTF: +Y up, the input view's front
facing +Z). Each image's files are written to a temporary folder and moved into place only when all of them are
complete.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .cli_common import (
    ArgumentParser,
    HelpFormatter,
    add_format_arg,
    add_model_args,
    add_output_arg,
    check_device,
    run_main,
    stage_record,
)
from .errors import EXIT_OK, BadInputError, describe, exit_code
from .inputs import IMAGE_SUFFIXES
from .settings import GenerationSettings, add_arguments, from_namespace
from .tiny import FakeRembgSession, print_smoke_banner, smoke_requested

STAGES = ("mesh",)
STEPS = ("preprocess", "model", "extract_mesh", "keep_largest", "simplify", "bake_texture", "export")
DEFAULT_FORMATS = ("glb", "obj", "ply")
FRAME = "glTF: +Y up, input view's front facing +Z, image right +X"  # as t2mv text-to-mesh / image-to-mesh
DTYPE_HELP = (
    "TripoSR's image transformer runs in this dtype (autocast; the weights, the field and marching cubes stay "
    "float32); auto = float16 on CUDA, else float32"
)


def build_parser() -> argparse.ArgumentParser:
    from triposr.mesh import MC_BACKENDS

    parser = ArgumentParser(
        prog="t2mv-mesh",
        description="Reconstruct a mesh from each image with TripoSR (image -> triplane -> marching cubes). Meshes "
        "are written in glTF's frame: +Y up, the side seen in the image facing +Z.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("images", nargs="+", type=Path, help="image files and/or folders of images")
    add_output_arg(parser, "where the mesh folders go (one per image)", default="outputs/mesh")
    add_format_arg(parser, DEFAULT_FORMATS)
    add_arguments(parser, STAGES, exclude=("turntable",))  # (a chain option this command does not offer yet)
    group = parser.add_argument_group("this command only")
    group.add_argument("--chunk-size", type=int, default=2**18, help="field points queried per batch")
    group.add_argument("--mc-backend", choices=MC_BACKENDS, default="auto", help="marching-cubes library")
    add_model_args(parser, STAGES, chain=False, dtype_help=DTYPE_HELP)
    return parser


def collect_images(paths: Sequence[Path]) -> list[Path]:
    """Expand folders (their image files, sorted); BadInputError for a missing path or a folder without images."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise BadInputError(f"folder {path} has no images ({', '.join(IMAGE_SUFFIXES)}).")
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            raise BadInputError(f"{path} does not exist. Give image files or folders of images.")
    return files


def _output_names(files: Sequence[Path]) -> list[str]:
    names, seen = [], {}
    for file in files:
        stem = file.stem or "image"
        seen[stem] = seen.get(stem, 0) + 1
        names.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
    return names


@contextmanager
def _timed(timings: dict[str, float], stage: str, device):
    import torch

    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the work is asynchronous: time it, not its launch
    timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start


def _process(
    image: Any, workdir: Path, model: Any, session: Any, settings: GenerationSettings, args, device, record: dict
) -> dict[str, float]:
    """All files of one (already opened and checked) image into `workdir`; returns the step timings."""
    import torch

    from triposr import mesh as tmesh
    from triposr.export import export_mesh
    from triposr.preprocess import preprocess_image

    from .chain import ChainResult

    steps: dict[str, float] = {}
    with _timed(steps, "preprocess", device):
        model_input = preprocess_image(
            image,
            session=session,
            remove_background=settings.remove_background,
            foreground_ratio=settings.mesh_foreground_ratio,
        )
    with _timed(steps, "model", device), torch.no_grad():
        scene_code = model([model_input], device)[0]  # (3, C, H, W)
    with _timed(steps, "extract_mesh", device):
        mesh = tmesh.extract_mesh_from_scene_code(
            model,
            scene_code,
            resolution=settings.mc_resolution,
            threshold=settings.mc_threshold,
            has_vertex_color=not settings.bake_texture or "ply" in args.format,
            chunk_size=args.chunk_size,
            backend=args.mc_backend,
        )
    if settings.keep_largest:
        with _timed(steps, "keep_largest", device):
            mesh = tmesh.keep_largest_component(mesh)
    if settings.simplify_faces:
        with _timed(steps, "simplify", device):
            mesh = tmesh.simplify(mesh, settings.simplify_faces)
    textured = None
    if settings.bake_texture:
        from triposr.texture import bake_texture

        with _timed(steps, "bake_texture", device):
            textured = bake_texture(model, scene_code, mesh, settings.texture_size, chunk_size=args.chunk_size)
    with _timed(steps, "export", device):
        for fmt in args.format:  # a PLY keeps the vertex colours (it has no texture)
            export_mesh(textured if textured is not None and fmt != "ply" else mesh, workdir / f"mesh.{fmt}")
    # The chain's files for the same stages: image.png, mesh_input.png, settings.json, timings.json, info.json.
    mesh_steps = ("model", "extract_mesh", "keep_largest", "simplify")
    timings = {
        "preprocess": steps["preprocess"],
        "mesh": sum(steps.get(k, 0.0) for k in mesh_steps),
        **({"texture": steps["bake_texture"]} if "bake_texture" in steps else {}),
        **{f"mesh.{k}": steps[k] for k in mesh_steps if k in steps},
        "export": steps["export"],
        "total": sum(steps.values()),
    }
    info = {"mesh": {"vertices": len(mesh.vertices), "faces": len(mesh.faces), "frame": FRAME}}
    result = ChainResult(image=image, mesh_input=model_input, timings=timings, settings=record, info=info)
    result.save(workdir, mesh_formats=())
    return steps


def _move_into_place(workdir: Path, final: Path) -> None:
    final.mkdir(parents=True, exist_ok=True)
    for item in sorted(workdir.iterdir()):
        os.replace(item, final / item.name)


def _load(args: argparse.Namespace, smoke: bool, device: Any) -> Any:
    import torch

    from triposr.system import TSR

    # --dtype: the transformer's autocast dtype (None: the device's default, float16 on CUDA); weights stay float32.
    half = (
        {"auto": None, "float32": False}.get(args.dtype)
        if args.dtype in ("auto", "float32")
        else getattr(torch, args.dtype)
    )
    if smoke:
        print_smoke_banner()
        model = TSR.tiny().to(device)
        model.half_precision = half
        return model
    return TSR.from_pretrained(
        args.triposr_model,
        device=device,
        half_precision=half,
        local_files_only=True if args.local_files_only else None,
    )


def run(args: argparse.Namespace) -> int:
    """The command after parsing: checks, then load, reconstruct every image, write."""
    from .chain import resolve_device_dtype
    from .inputs import check_output_folder, has_alpha, new_rembg_session, open_image

    # 1. Everything the user gave, before the model loads.
    smoke = smoke_requested(args.tiny)
    settings = from_namespace(args, smoke=smoke)
    if args.chunk_size < 1:
        raise BadInputError(f"--chunk-size must be a positive integer, got {args.chunk_size}.")
    device_name = check_device(args.device, args.dtype)
    files = collect_images(args.images)
    alpha = [has_alpha(open_image(file)) for file in files]  # every image checked now; reopened one at a time
    output_dir = check_output_folder(args.output)
    names = _output_names(files)
    for name in names:
        check_output_folder(output_dir / name)
    needs_rembg = settings.remove_background and not all(alpha)
    session = None
    if needs_rembg:  # one session for all images, loaded before the model (smoke mode: the weightless stand-in)
        session = FakeRembgSession() if smoke else new_rembg_session(off_switch="pass --no-remove-bg")
    device, _ = resolve_device_dtype(device_name, None)

    from tqdm.auto import tqdm

    # 2. Load.
    load_timing: dict[str, float] = {}
    with _timed(load_timing, "load_model", device):
        model = _load(args, smoke, device)
    import torch

    record = {
        "settings": settings,
        "stages": STAGES,
        "models": {"triposr_model": "tiny(seed=0)" if smoke else str(args.triposr_model)},
        "device": device,
        "dtype": model.half_dtype(device) or torch.float32,
        "smoke": smoke,
    }
    command = {"chunk_size": args.chunk_size, "mc_backend": args.mc_backend}

    # 3. Every image into its own folder; one failure does not stop the others.
    output_dir.mkdir(parents=True, exist_ok=True)
    totals: dict[str, float] = {}
    failures: list[tuple[Path, BaseException]] = []
    bar = tqdm(list(zip(files, names, alpha)), desc="t2mv-mesh", unit="image", file=sys.stderr)
    for path, name, has_cutout in bar:
        bar.set_postfix_str(path.name)
        workdir = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=output_dir))
        use_rembg = settings.remove_background and not has_cutout
        image_record = stage_record(**record, use_rembg=use_rembg, command={**command, "input_file": str(path)})
        try:
            timings = _process(open_image(path), workdir, model, session, settings, args, device, image_record)
            _move_into_place(workdir, output_dir / name)
        except Exception as err:  # reported per image; the exit code comes from the first failure
            if getattr(args, "debug", False):
                raise
            failures.append((path, err))
            tqdm.write(f"t2mv-mesh: error: {path}: {describe(err)}", file=sys.stderr)
            continue
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        for step, seconds in timings.items():
            totals[step] = totals.get(step, 0.0) + seconds
        tqdm.write(f"{path.name} -> {output_dir / name}: " + ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()))
    bar.close()

    done = len(files) - len(failures)
    print(f"load_model: {load_timing['load_model']:.2f}s")
    for step in STEPS:
        if step in totals:
            print(f"{step}: {totals[step]:.2f}s total, {totals[step] / max(done, 1):.2f}s per image")
    print(f"{done}/{len(files)} meshes written to {output_dir}")
    if smoke:
        print_smoke_banner()
    if failures:
        return exit_code(failures[0][1])
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``t2mv-mesh``; returns the exit status (0, 2 bad input, 3 no weights, 4 OOM, 1 other)."""
    return run_main(build_parser(), argv, run)


if __name__ == "__main__":
    sys.exit(main())
