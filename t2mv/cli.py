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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from .chain import DEFAULT_MULTIVIEW_DELTA, DEFAULT_MULTIVIEW_MODEL, DEFAULT_T2I_MODEL, DEFAULT_TRIPOSR_MODEL
from .errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_NO_WEIGHTS, EXIT_OK, EXIT_OOM, BadInputError, run_command
from .settings import GROUPS, GenerationSettings, add_arguments, from_namespace
from .tiny import print_smoke_banner, smoke_requested

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


def _output_arg(parser: argparse.ArgumentParser, default: str, what: str) -> None:
    parser.add_argument("-o", "--output", default=default, help=what)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="t2mv", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="print the full trace of an error")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("image", help="text → image (PeRFlow SD1.5)", formatter_class=HelpFormatter)
    p.add_argument("prompt", help="the text prompt")
    _output_arg(p, "image.png", "output image (.png/.jpg/.webp; settings go next to it as .json), or a folder")
    p.add_argument("--negative-prompt", default=None, help="negative prompt")
    add_arguments(p, ("seed", "text_to_image"))
    add_model_args(p)

    p = sub.add_parser(
        "text-to-mesh", help="text → image → 6 normals + 6 colors and a mesh", formatter_class=HelpFormatter
    )
    p.add_argument("prompt", help="the text prompt")
    _output_arg(p, "outputs/text-to-mesh", "output folder (created; files in it are replaced)")
    p.add_argument("--no-multiview", action="store_true", help="skip the multiview stage (mesh only)")
    p.add_argument("--negative-prompt", default=None, help="negative prompt")
    add_arguments(p, GROUPS)
    _format_arg(p, ["glb", "obj", "ply"])
    add_model_args(p)

    p = sub.add_parser("image-to-mesh", help="image → 6 normals + 6 colors and a mesh", formatter_class=HelpFormatter)
    p.add_argument("image", help="input image (PNG/JPEG/WebP; transparency is used as the object mask)")
    _output_arg(p, "outputs/image-to-mesh", "output folder (created; files in it are replaced)")
    p.add_argument("--no-multiview", action="store_true", help="skip the multiview stage (mesh only)")
    add_arguments(p, ("seed", "preprocess", "multiview", "mesh"))
    _format_arg(p, ["glb", "obj", "ply"])
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
    _output_arg(p, "outputs/batch", "output folder")
    p.add_argument("--mesh", action="store_true", help="also make the mesh of every prompt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--negative-prompt", default=None, help="negative prompt of every prompt without its own")
    add_arguments(p, GROUPS)
    _format_arg(p, ["glb"])
    add_model_args(p)

    p = sub.add_parser("app", help="launch the web app (Gradio)", add_help=False)
    p.add_argument("app_args", nargs=argparse.REMAINDER, help="arguments of the app (see `t2mv app --help`)")
    return parser


def _format_arg(parser: argparse.ArgumentParser, default: list[str]) -> None:
    parser.add_argument(
        "--format", nargs="+", choices=("glb", "obj", "ply"), default=default, help="mesh files to write"
    )


def _dtype(name: str):
    import torch

    return None if name == "auto" else getattr(torch, name)


def load_chain(args: argparse.Namespace, stages: Sequence[str], device: Any = None):
    """The chain for parsed model flags: smoke mode (``--tiny`` / T2MV_SMOKE=1) or the real models."""
    from .chain import TextTo3D

    device = device if device is not None else args.device
    if smoke_requested(args.tiny):
        print_smoke_banner()
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


def settings_from_args(args: argparse.Namespace) -> GenerationSettings:
    """The command's validated `GenerationSettings` (smoke-mode defaults under ``--tiny``), before any loading."""
    return from_namespace(args, smoke=smoke_requested(args.tiny))


def _check_prompt(prompt: str) -> None:
    if not prompt.strip():
        raise BadInputError('The prompt is empty. Give a text prompt such as "a red teapot".')


def _report(result: Any, paths: dict[str, Path], output: Path) -> None:
    for message in result.warnings:
        print(f"warning: {message}", file=sys.stderr)
    timings = ", ".join(f"{k} {v:.2f} s" for k, v in result.timings.items() if "." not in k)
    print(f"wrote {len(paths)} files to {output}  ({timings})")


def _cmd_image(args: argparse.Namespace) -> int:
    from .chain import _json
    from .inputs import image_output_path, write_image, write_text

    settings = settings_from_args(args)
    _check_prompt(args.prompt)
    output = image_output_path(args.output)
    settings_path = output.with_suffix(".json")
    chain = load_chain(args, ("text_to_image",))
    result = chain(args.prompt, negative_prompt=args.negative_prompt, settings=settings)
    write_image(result.image, output)
    write_text(_json(result.settings), settings_path)
    _report(result, {"image": output, "settings": settings_path}, output.parent)
    return EXIT_OK


def _cmd_to_mesh(args: argparse.Namespace) -> int:
    from .chain import check_mesh_formats
    from .inputs import check_output_folder, open_image

    text = args.command == "text-to-mesh"
    settings = settings_from_args(args)
    if text:
        _check_prompt(args.prompt)
    image = None if text else open_image(args.image)
    output = check_output_folder(args.output)
    formats = check_mesh_formats(args.format)
    stages = (("text_to_image",) if text else ()) + (() if args.no_multiview else ("multiview",)) + ("mesh",)
    chain = load_chain(args, stages)
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
    return EXIT_FAILED if failed else EXIT_OK


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


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``t2mv`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["app"]:  # the app parses its own flags (`t2mv app --help` shows them); imported only here
        import app

        app.main(argv[1:])
        return EXIT_OK
    commands = {"image": _cmd_image, "text-to-mesh": _cmd_to_mesh, "image-to-mesh": _cmd_to_mesh, "batch": _cmd_batch}
    return run_main(build_parser(), argv, lambda args: commands[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
