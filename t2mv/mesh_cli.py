"""`t2mv-mesh`: images (files or folders) -> meshes with TripoSR.

The mesh stage alone (``triposr``), with the same checks and exit codes as ``t2mv``: the options
(`GenerationSettings`), every input image (`t2mv.inputs.open_image`), the output folder and background removal are
checked before the model loads; errors are one line (``--debug`` adds the trace); exit codes 2 bad input,
3 missing weights, 4 out of memory, 1 anything else (with several images: the first failure's code, after the
others were done).

For each image, <output-dir>/<image stem>/ receives input.png (the preprocessed model input), mesh.<format> for
every requested format (mesh.mtl + mesh.png next to a textured OBJ) and info.json (settings, timings). Meshes are
in the export frame (glTF: +Y up, the input view's front facing +Z). Each image's files are written to a temporary
folder and moved into place only when all of them are complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .cli_common import ArgumentParser, run_main
from .errors import EXIT_OK, BadInputError, describe, exit_code
from .inputs import IMAGE_SUFFIXES
from .settings import GenerationSettings, add_arguments, from_namespace
from .tiny import FakeRembgSession, print_smoke_banner

FORMATS = ("glb", "obj", "ply")
STAGES = ("preprocess", "model", "extract_mesh", "keep_largest", "simplify", "bake_texture", "export")
FLAGS = {
    "mc_resolution": "--resolution",
    "mc_threshold": "--threshold",
    "bake_texture": "--bake",
    "mesh_foreground_ratio": "--foreground-ratio",
    "remove_background": "--no-rembg",
    "simplify_faces": "--simplify",
}


def _formats(text: str) -> list[str]:
    names = [name.strip().lower().lstrip(".") for name in text.split(",") if name.strip()]
    bad = [name for name in names if name not in FORMATS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown format(s) {bad or text!r}; choose from {', '.join(FORMATS)}")
    return names


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: ...)" for options that have a meaningful default (not for flags or unset options)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or isinstance(action, argparse._StoreTrueAction):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    from triposr.mesh import MC_BACKENDS

    parser = ArgumentParser(
        prog="t2mv-mesh",
        description="Reconstruct a mesh from each image with TripoSR (image -> triplane -> marching cubes). Meshes "
        "are written in glTF's frame: +Y up, the side seen in the image facing +Z.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("images", nargs="+", type=Path, help="image files and/or folders of images")
    parser.add_argument("-o", "--output-dir", type=Path, default=Path("output"), help="where the mesh folders go")
    parser.add_argument(
        "-f",
        "--format",
        dest="formats",
        type=_formats,
        action="append",
        help="mesh format(s), comma-separated or repeated: glb, obj, ply (default: glb)",
    )
    exclude = ("mv_preprocess", "mv_foreground_ratio")
    add_arguments(parser, ("seed", "preprocess", "mesh"), exclude=exclude, names=FLAGS)
    parser.add_argument(
        "--keep-largest", action="store_true", help="keep only the largest connected part (no floaters)"
    )
    parser.add_argument(
        "--model", default="stabilityai/TripoSR", help="hub id or local folder with config.yaml + model.ckpt"
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--chunk-size", type=int, default=2**18, help="field points queried per batch")
    parser.add_argument("--mc-backend", choices=MC_BACKENDS, default="auto", help="marching-cubes library")
    parser.add_argument("--tiny", action="store_true", help="smoke mode: tiny random model (seeded by --seed)")
    parser.add_argument("--debug", action="store_true", help="print the full trace of an error")
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
    image_path: Path, image: Any, workdir: Path, model: Any, session: Any, settings: GenerationSettings, args, device
) -> dict[str, float]:
    """All files of one (already opened and checked) image into `workdir`; returns the stage timings."""
    import torch

    from triposr import mesh as tmesh
    from triposr.export import export_mesh
    from triposr.preprocess import preprocess_image

    timings: dict[str, float] = {}
    with _timed(timings, "preprocess", device):
        model_input = preprocess_image(
            image,
            session=session,
            remove_background=settings.remove_background,
            foreground_ratio=settings.mesh_foreground_ratio,
        )
        model_input.save(workdir / "input.png")
    with _timed(timings, "model", device), torch.no_grad():
        scene_code = model([model_input], device)[0]  # (3, C, H, W)
    with _timed(timings, "extract_mesh", device):
        mesh = tmesh.extract_mesh_from_scene_code(
            model,
            scene_code,
            resolution=settings.mc_resolution,
            threshold=settings.mc_threshold,
            has_vertex_color=not settings.bake_texture or "ply" in args.formats,
            chunk_size=args.chunk_size,
            backend=args.mc_backend,
        )
    if args.keep_largest:
        with _timed(timings, "keep_largest", device):
            mesh = tmesh.keep_largest_component(mesh)
    if settings.simplify_faces:
        with _timed(timings, "simplify", device):
            mesh = tmesh.simplify(mesh, settings.simplify_faces)
    textured = None
    if settings.bake_texture:
        from triposr.texture import bake_texture

        with _timed(timings, "bake_texture", device):
            textured = bake_texture(model, scene_code, mesh, settings.texture_size, chunk_size=args.chunk_size)
    with _timed(timings, "export", device):
        for fmt in args.formats:
            out = textured if textured is not None and fmt != "ply" else mesh
            export_mesh(out, workdir / f"mesh.{fmt}")
    command = {k: v for k, v in vars(args).items() if k not in ("images", "output_dir", *settings.to_dict())}
    info = {
        "image": str(image_path),
        "settings": {**settings.to_dict(), **{k: str(v) if isinstance(v, Path) else v for k, v in command.items()}},
        "frame": "glTF: +Y up, input view's front facing +Z, image right +X",
        "vertices": len(mesh.vertices),
        "faces": len(mesh.faces),
        "timings": timings,
    }
    (workdir / "info.json").write_text(json.dumps(info, indent=1, default=str))
    return timings


def _move_into_place(workdir: Path, final: Path) -> None:
    final.mkdir(parents=True, exist_ok=True)
    for item in sorted(workdir.iterdir()):
        os.replace(item, final / item.name)


def run(args: argparse.Namespace) -> int:
    """The command after parsing: checks, then load, reconstruct every image, write."""
    from .chain import resolve_device_dtype
    from .inputs import check_output_folder, has_alpha, new_rembg_session, open_image

    # 1. Everything the user gave, before the model loads.
    settings = from_namespace(args, smoke=args.tiny, names=FLAGS)
    if args.chunk_size < 1:
        raise BadInputError(f"--chunk-size must be a positive integer, got {args.chunk_size}.")
    args.formats = list(dict.fromkeys(f for group in (args.formats or [["glb"]]) for f in group))
    files = collect_images(args.images)
    alpha = [has_alpha(open_image(file)) for file in files]  # every image checked now; reopened one at a time
    output_dir = check_output_folder(args.output_dir)
    names = _output_names(files)
    for name in names:
        check_output_folder(output_dir / name)
    needs_rembg = settings.remove_background and not all(alpha)
    session = None
    if needs_rembg:  # one session for all images, loaded before the model (smoke mode: the weightless stand-in)
        session = FakeRembgSession() if args.tiny else new_rembg_session(off_switch="pass --no-rembg")
    device, _ = resolve_device_dtype(None if args.device == "auto" else args.device, None)

    from tqdm.auto import tqdm

    from triposr.system import TSR

    # 2. Load.
    load_timing: dict[str, float] = {}
    with _timed(load_timing, "load_model", device):
        if args.tiny:
            print_smoke_banner()
            model = TSR.tiny(seed=settings.seed).to(device)
        else:
            model = TSR.from_pretrained(args.model, device=device)

    # 3. Every image into its own folder; one failure does not stop the others.
    output_dir.mkdir(parents=True, exist_ok=True)
    totals: dict[str, float] = {}
    failures: list[tuple[Path, BaseException]] = []
    bar = tqdm(list(zip(files, names)), desc="t2mv-mesh", unit="image", file=sys.stderr)
    for path, name in bar:
        bar.set_postfix_str(path.name)
        workdir = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=output_dir))
        try:
            timings = _process(path, open_image(path), workdir, model, session, settings, args, device)
            _move_into_place(workdir, output_dir / name)
        except Exception as err:  # reported per image; the exit code comes from the first failure
            if args.debug:
                raise
            failures.append((path, err))
            tqdm.write(f"t2mv-mesh: error: {path}: {describe(err)}", file=sys.stderr)
            continue
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        for stage, seconds in timings.items():
            totals[stage] = totals.get(stage, 0.0) + seconds
        tqdm.write(f"{path.name} -> {output_dir / name}: " + ", ".join(f"{k} {v:.2f}s" for k, v in timings.items()))
    bar.close()

    done = len(files) - len(failures)
    print(f"load_model: {load_timing['load_model']:.2f}s")
    for stage in STAGES:
        if stage in totals:
            print(f"{stage}: {totals[stage]:.2f}s total, {totals[stage] / max(done, 1):.2f}s per image")
    print(f"{done}/{len(files)} meshes written to {output_dir}")
    if args.tiny:
        print_smoke_banner()
    if failures:
        return exit_code(failures[0][1])
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``t2mv-mesh``; returns the exit status (0, 2 bad input, 3 no weights, 4 OOM, 1 other)."""
    return run_main(build_parser(), argv, run)


if __name__ == "__main__":
    sys.exit(main())
