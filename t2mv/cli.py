"""The ``t2mv`` command: text → image, batch text → multiview (+ mesh), text/image → mesh, and the web app.

    t2mv image "a red teapot" -o teapot.png          (or -o out/ : writes out/image.png)
    t2mv text-to-mesh "a red teapot" -o out/teapot
    t2mv image-to-mesh photo.png -o out/photo
    t2mv batch prompts.txt -o out/batch [--mesh]
    accelerate launch --multi_gpu --num_processes 4 -m t2mv.cli batch prompts.txt -o out/batch
    t2mv app [--host 127.0.0.1 --port 7860]

Every command takes ``--tiny`` (smoke mode: tiny random weights, noise out, runs on a CPU in seconds; also
``T2MV_SMOKE=1``), ``--device``, ``--dtype`` and ``--debug``. Options, input image and output path are checked
before any model loads. Exit codes: 0 done, 2 bad input, 3 missing weights, 4 out of memory, 1 anything else;
errors are one line on stderr (``--debug`` adds the trace). text-to-mesh writes each stage's files as soon as the
stage ends: when a later stage fails, the earlier files stay, with FAILED.json naming the stage.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .cli_common import (
    ArgumentParser,
    HelpFormatter,
    add_format_arg,
    add_model_args,
    add_output_arg,
    check_device,
    load_chain,
    run_main,
    settings_from_args,
)
from .errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_NO_WEIGHTS, EXIT_OK, EXIT_OOM, BadInputError
from .settings import STAGES, add_arguments

__all__ = [
    "EXIT_BAD_INPUT",
    "EXIT_FAILED",
    "EXIT_NO_WEIGHTS",
    "EXIT_OK",
    "EXIT_OOM",
    "ArgumentParser",
    "HelpFormatter",
    "add_model_args",
    "build_parser",
    "load_chain",
    "main",
    "run_main",
]

logger = logging.getLogger("t2mv")

IMAGE_STAGES = ("multiview", "mesh")  # image-to-mesh: no text-to-image stage, so none of its options or models
MESH_DEFAULT_FORMATS = ("glb", "obj", "ply")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="t2mv", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="print the full trace of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("image", help="text → image (PeRFlow SD1.5)", formatter_class=HelpFormatter)
    p.add_argument("prompt", help="the text prompt")
    add_output_arg(
        p, "output image (.png/.jpg/.webp; settings go next to it as .json), or a folder", default="image.png"
    )
    p.add_argument("--negative-prompt", default=None, help="negative prompt")
    add_arguments(p, ("text_to_image",))
    add_model_args(p, ("text_to_image",))

    p = sub.add_parser(
        "text-to-mesh", help="text → image → 6 normals + 6 colors and a mesh", formatter_class=HelpFormatter
    )
    p.add_argument("prompt", help="the text prompt")
    add_output_arg(p, "output folder (created; files in it are replaced)", default="outputs/text-to-mesh")
    p.add_argument("--no-multiview", action="store_true", help="skip the multiview stage (mesh only)")
    p.add_argument("--negative-prompt", default=None, help="negative prompt")
    add_arguments(p, STAGES)
    add_format_arg(p, MESH_DEFAULT_FORMATS)
    add_model_args(p, STAGES)

    p = sub.add_parser("image-to-mesh", help="image → 6 normals + 6 colors and a mesh", formatter_class=HelpFormatter)
    p.add_argument("image", help="input image (PNG/JPEG/WebP; transparency is used as the object mask)")
    add_output_arg(p, "output folder (created; files in it are replaced)", default="outputs/image-to-mesh")
    p.add_argument("--no-multiview", action="store_true", help="skip the multiview stage (mesh only)")
    add_arguments(p, IMAGE_STAGES)
    add_format_arg(p, MESH_DEFAULT_FORMATS)
    add_model_args(p, IMAGE_STAGES)

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
    add_output_arg(p, "output folder", default="outputs/batch")
    p.add_argument("--mesh", action="store_true", help="also make the mesh of every prompt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--negative-prompt", default=None, help="negative prompt of every prompt without its own")
    add_arguments(p, STAGES)
    add_format_arg(p, ["glb"])
    add_model_args(p, STAGES)

    p = sub.add_parser("app", help="launch the web app (Gradio)", add_help=False)
    p.add_argument("app_args", nargs=argparse.REMAINDER, help="arguments of the app (see `t2mv app --help`)")
    return parser


def _check_prompt(prompt: str) -> None:
    if not prompt.strip():
        raise BadInputError('The prompt is empty. Give a text prompt such as "a red teapot".')


def candidate_path(output: Path, index: int) -> Path:
    """Where `t2mv image` writes candidate `index` beside `output`: ``candidate_<k>`` for the default name
    ``image.<ext>`` (the same names as text-to-mesh's folder), else ``<stem>_candidate_<k>`` (two named outputs
    in one folder keep their own candidates)."""
    stem = "candidate" if output.stem == "image" else f"{output.stem}_candidate"
    return output.with_name(f"{stem}_{index}{output.suffix}")


def chosen_line(result: Any) -> str | None:
    """``chose candidate 2 of 4 (score 0.81; scores 0.12 0.40 0.81 0.33)`` for a best-of-N run, else None."""
    if result.chosen is None or len(result.candidates) < 2:
        return None
    scores = [float(s["score"]) for s in result.candidate_scores]
    how = "by --choose" if result.settings.get("chosen_by") == "choose" else "best score"
    listed = " ".join(f"{s:.2f}" for s in scores)
    own = f"score {scores[result.chosen]:.2f}, " if result.chosen < len(scores) else ""
    return f"chose candidate {result.chosen} of {len(result.candidates)} ({own}{how}; scores {listed})"


def _report(result: Any, paths: dict[str, Path], output: Path) -> None:
    for message in result.warnings:
        print(f"warning: {message}", file=sys.stderr)
    timings = ", ".join(f"{row.stage} {row.seconds:.2f} s" for row in result.stage_rows())  # the chain's plan
    print(f"wrote {len(paths)} files to {output}  ({timings})")
    chosen = chosen_line(result)
    if chosen is not None:
        print(chosen)


def _cmd_image(args: argparse.Namespace) -> int:
    from .chain import _json
    from .inputs import image_output_path, write_image, write_text

    settings = settings_from_args(args)
    _check_prompt(args.prompt)
    output = image_output_path(args.output)
    settings_path = output.with_suffix(".json")
    # Several candidates are scored on u2net's mask (as text-to-mesh does): load it first, so a missing model fails now.
    chain = load_chain(args, ("text_to_image",), needs_rembg=settings.candidates > 1 and settings.remove_background)
    result = chain(args.prompt, negative_prompt=args.negative_prompt, settings=settings)
    write_image(result.image, output)
    written = {"image": output, "settings": settings_path}
    for k, candidate in enumerate(result.candidates if len(result.candidates) > 1 else []):
        written[f"candidate_{k}"] = write_image(candidate, candidate_path(output, k))
    if result.image_upscaled is not None:  # --upscale: image_1024.png beside image.png
        side = result.image_upscaled.width
        written["image_upscaled"] = write_image(result.image_upscaled, output.with_stem(f"{output.stem}_{side}"))
    write_text(_json(result.settings), settings_path)
    _report(result, written, output.parent)
    return EXIT_OK


def _cmd_to_mesh(args: argparse.Namespace) -> int:
    from .chain import check_mesh_formats
    from .inputs import check_output_folder, has_alpha, open_image

    text = args.command == "text-to-mesh"
    settings = settings_from_args(args)
    if text:
        _check_prompt(args.prompt)
    image = None if text else open_image(args.image)
    output = check_output_folder(args.output)
    formats = check_mesh_formats(args.format)
    stages = (("text_to_image",) if text else ()) + (() if args.no_multiview else ("multiview",)) + ("mesh",)
    needs_rembg = settings.remove_background and (image is None or not has_alpha(image))  # generated: no alpha
    chain = load_chain(args, stages, needs_rembg=needs_rembg)
    result = chain(  # writes each stage's files into `output` as soon as the stage ends
        args.prompt if text else None,
        image=image,
        negative_prompt=args.negative_prompt if text else None,
        settings=settings,
        output_dir=output,
        mesh_formats=formats,
    )
    files = [p for p in output.iterdir() if p.is_file() and not p.name.startswith(".")]
    _report(result, {p.name: p for p in files}, output)
    return EXIT_OK


def _cmd_batch(args: argparse.Namespace) -> int:
    import torch
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from .batch import read_prompts, run_batch, write_summary
    from .chain import check_mesh_formats
    from .inputs import check_output_folder

    settings = settings_from_args(args)
    specs = read_prompts(args.prompts, base_seed=settings.seed, negative_prompt=args.negative_prompt)
    check_output_folder(args.output)
    formats = check_mesh_formats(args.format)
    args.device = check_device(args.device, args.dtype)  # None: auto
    on_cpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cpu")
    # One process per GPU (or per CPU worker under torchrun / accelerate launch): each takes its own shard.
    state = PartialState(cpu=on_cpu)
    device = args.device if args.device and state.num_processes == 1 else state.device
    stages = ("text_to_image", "multiview") + (("mesh",) if args.mesh else ())
    chain = load_chain(args, stages, device=device, needs_rembg=settings.remove_background)
    summary = run_batch(
        chain,
        specs,
        args.output,
        mesh=args.mesh,
        mesh_formats=formats,
        process_index=state.process_index,
        num_processes=state.num_processes,
        progress=not args.no_progress,
        settings=settings,
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
    if state.num_processes > 1 and torch.distributed.is_initialized():
        # Tear the process group down before the interpreter exits: gloo's threads left to static destruction can
        # abort a rank at exit ("terminate called without an active exception"), seen once in a 2-process run.
        torch.distributed.destroy_process_group()
    return EXIT_FAILED if failed else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``t2mv`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["app"]:  # the app parses its own flags (`t2mv app --help` shows them); imported only here
        from .app import main as app_main

        try:
            return app_main(argv[1:])
        except SystemExit as done:  # --help, or the app's one-line error and its exit code
            return done.code if isinstance(done.code, int) else EXIT_BAD_INPUT
    commands = {"image": _cmd_image, "text-to-mesh": _cmd_to_mesh, "image-to-mesh": _cmd_to_mesh, "batch": _cmd_batch}
    return run_main(build_parser(), argv, lambda args: commands[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
