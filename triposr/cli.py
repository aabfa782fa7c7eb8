"""`t2mv-mesh`: images (files or folders) -> meshes with TripoSR.

For each image, <output-dir>/<image stem>/ receives input.png (the preprocessed model input), mesh.<format> for
every requested format (mesh.mtl + mesh.png next to a textured OBJ) and info.json (settings, timings). Meshes are
in the export frame (glTF: +Y up, the input view's front facing +Z). Each image's files are written to a temporary
folder and moved into place only when all of them are complete.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
FORMATS = ("glb", "obj", "ply")
STAGES = ("preprocess", "model", "extract_mesh", "keep_largest", "simplify", "bake_texture", "export")
SMOKE_BANNER = (
    "\n" + "!" * 100 + "\n"
    "!!  SMOKE MODE (--tiny): TripoSR with tiny RANDOM weights. The meshes are NOISE, not reconstructions;\n"
    "!!  this only checks that the program runs. Drop --tiny to use stabilityai/TripoSR.\n" + "!" * 100 + "\n"
)


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
    from .mesh import MAX_RESOLUTION, MC_BACKENDS, MIN_RESOLUTION

    parser = argparse.ArgumentParser(
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
    parser.add_argument(
        "--resolution",
        type=int,
        default=256,
        help=f"marching-cubes grid resolution ({MIN_RESOLUTION}..{MAX_RESOLUTION})",
    )
    parser.add_argument("--threshold", type=float, default=25.0, help="density level of the surface")
    parser.add_argument(
        "--bake", action="store_true", help="bake a UV texture (GLB, OBJ+MTL+PNG) instead of vertex colours"
    )
    parser.add_argument("--texture-size", type=int, default=1024, help="baked texture size in texels (512..4096)")
    parser.add_argument("--foreground-ratio", type=float, default=0.85, help="object size in the square model input")
    parser.add_argument(
        "--no-rembg",
        action="store_true",
        help="do not remove the background (images without alpha must already be square, on 0.5 grey)",
    )
    parser.add_argument(
        "--keep-largest", action="store_true", help="keep only the largest connected part (no floaters)"
    )
    parser.add_argument("--simplify", type=int, metavar="FACES", default=None, help="decimate to about FACES faces")
    parser.add_argument(
        "--model", default="stabilityai/TripoSR", help="hub id or local folder with config.yaml + model.ckpt"
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--chunk-size", type=int, default=2**18, help="field points queried per batch")
    parser.add_argument("--mc-backend", choices=MC_BACKENDS, default="auto", help="marching-cubes library")
    parser.add_argument("--tiny", action="store_true", help="smoke mode: tiny random model, output is noise")
    parser.add_argument("--seed", type=int, default=0, help="seed of the --tiny model")
    return parser


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    from .mesh import MAX_RESOLUTION, MIN_RESOLUTION
    from .texture import MAX_TEXTURE_SIZE, MIN_TEXTURE_SIZE

    args.formats = list(dict.fromkeys(f for group in (args.formats or [["glb"]]) for f in group))
    if not MIN_RESOLUTION <= args.resolution <= MAX_RESOLUTION:
        parser.error(f"--resolution must be between {MIN_RESOLUTION} and {MAX_RESOLUTION} (got {args.resolution})")
    if not math.isfinite(args.threshold):
        parser.error("--threshold must be a finite number")
    if not MIN_TEXTURE_SIZE <= args.texture_size <= MAX_TEXTURE_SIZE:
        parser.error(
            f"--texture-size must be between {MIN_TEXTURE_SIZE} and {MAX_TEXTURE_SIZE} (got {args.texture_size})"
        )
    if not 0.0 < args.foreground_ratio <= 1.0:
        parser.error(f"--foreground-ratio must be in (0, 1] (got {args.foreground_ratio})")
    if args.simplify is not None and args.simplify < 4:
        parser.error(f"--simplify needs a face count of at least 4 (got {args.simplify})")
    if args.chunk_size < 1:
        parser.error("--chunk-size must be positive")


def collect_images(parser: argparse.ArgumentParser, paths: list[Path]) -> list[Path]:
    """Expand folders (their image files, sorted) and check that every file opens as an image."""
    from PIL import Image, UnidentifiedImageError

    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                parser.error(f"folder {path} has no images ({', '.join(IMAGE_SUFFIXES)})")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            parser.error(f"{path} does not exist")
    for file in files:
        try:
            with Image.open(file) as image:
                image.load()  # decodes everything: catches truncated files, not just bad headers
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            parser.error(f"cannot read {file} as an image ({err}); pass PNG/JPEG/WebP files or folders of them")
    return files


def _output_names(files: list[Path]) -> list[str]:
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


def _process(image_path: Path, workdir: Path, model, session, args, device) -> dict[str, float]:
    """All files of one image into `workdir`; returns the stage timings."""
    import torch
    from PIL import Image

    from . import mesh as tmesh
    from .export import export_mesh
    from .preprocess import preprocess_image

    timings: dict[str, float] = {}
    with _timed(timings, "preprocess", device):
        with Image.open(image_path) as raw:
            image = preprocess_image(
                raw, session=session, remove_background=not args.no_rembg, foreground_ratio=args.foreground_ratio
            )
        image.save(workdir / "input.png")
    with _timed(timings, "model", device), torch.no_grad():
        scene_code = model([image], device)[0]  # (3, C, H, W)
    with _timed(timings, "extract_mesh", device):
        mesh = tmesh.extract_mesh_from_scene_code(
            model,
            scene_code,
            resolution=args.resolution,
            threshold=args.threshold,
            has_vertex_color=not args.bake or "ply" in args.formats,
            chunk_size=args.chunk_size,
            backend=args.mc_backend,
        )
    if args.keep_largest:
        with _timed(timings, "keep_largest", device):
            mesh = tmesh.keep_largest_component(mesh)
    if args.simplify is not None:
        with _timed(timings, "simplify", device):
            mesh = tmesh.simplify(mesh, args.simplify)
    textured = None
    if args.bake:
        from .texture import bake_texture

        with _timed(timings, "bake_texture", device):
            textured = bake_texture(model, scene_code, mesh, args.texture_size, chunk_size=args.chunk_size)
    with _timed(timings, "export", device):
        for fmt in args.formats:
            out = textured if textured is not None and fmt != "ply" else mesh
            export_mesh(out, workdir / f"mesh.{fmt}")
    info = {
        "image": str(image_path),
        "settings": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("images", "output_dir")
        },
        "frame": "glTF: +Y up, input view's front facing +Z, image right +X",
        "vertices": len(mesh.vertices),
        "faces": len(mesh.faces),
        "timings": timings,
    }
    (workdir / "info.json").write_text(json.dumps(info, indent=1))
    return timings


def _move_into_place(workdir: Path, final: Path) -> None:
    final.mkdir(parents=True, exist_ok=True)
    for item in sorted(workdir.iterdir()):
        os.replace(item, final / item.name)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    files = collect_images(parser, args.images)

    import torch
    from tqdm.auto import tqdm

    from .preprocess import REMBG_MODEL, has_alpha
    from .system import TSR, MissingWeightsError

    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    load_timing: dict[str, float] = {}
    if args.tiny:
        print(SMOKE_BANNER, file=sys.stderr, flush=True)
        args.no_rembg = True  # rembg's u2net is a download; smoke mode needs no files (alpha cut-outs still work)
        with _timed(load_timing, "load_model", device):
            model = TSR.tiny(seed=args.seed).to(device)
    else:
        try:
            with _timed(load_timing, "load_model", device):
                model = TSR.from_pretrained(args.model, device=device)
        except MissingWeightsError as err:
            print(f"t2mv-mesh: error: {err}", file=sys.stderr)
            return 1

    session = None
    if not args.no_rembg:
        from PIL import Image

        needs_rembg = []
        for f in files:
            with Image.open(f) as image:
                needs_rembg.append(not has_alpha(image))
        if any(needs_rembg):
            try:
                import rembg

                session = rembg.new_session(REMBG_MODEL)  # one session for all images
            except Exception as err:  # missing package, model not downloadable offline, onnxruntime errors
                print(
                    f"t2mv-mesh: error: background removal (rembg, {REMBG_MODEL}) is unavailable: {err}. Pass RGBA "
                    "cut-outs, or --no-rembg with square images on a 0.5 grey background.",
                    file=sys.stderr,
                )
                return 1

    args.output_dir.mkdir(parents=True, exist_ok=True)
    totals: dict[str, float] = {}
    failures: list[str] = []
    bar = tqdm(list(zip(files, _output_names(files))), desc="t2mv-mesh", unit="image", file=sys.stderr)
    for path, name in bar:
        bar.set_postfix_str(path.name)
        workdir = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=args.output_dir))
        try:
            timings = _process(path, workdir, model, session, args, device)
            _move_into_place(workdir, args.output_dir / name)
        except (ValueError, OSError, RuntimeError, ImportError) as err:
            failures.append(f"{path}: {err}")
            tqdm.write(f"t2mv-mesh: error: {path}: {err}", file=sys.stderr)
            continue
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        for stage, seconds in timings.items():
            totals[stage] = totals.get(stage, 0.0) + seconds
        tqdm.write(
            f"{path.name} -> {args.output_dir / name}: " + ", ".join(f"{k} {v:.2f}s" for k, v in timings.items())
        )
    bar.close()

    done = len(files) - len(failures)
    print(f"load_model: {load_timing['load_model']:.2f}s")
    for stage in STAGES:
        if stage in totals:
            print(f"{stage}: {totals[stage]:.2f}s total, {totals[stage] / max(done, 1):.2f}s per image")
    print(f"{done}/{len(files)} meshes written to {args.output_dir}")
    if args.tiny:
        print(SMOKE_BANNER, file=sys.stderr, flush=True)
    if failures:
        print(f"t2mv-mesh: {len(failures)} image(s) failed:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
