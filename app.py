"""Gradio web app: text (or an image) → image → six normals + six colors → a 3D mesh, with downloads.

    python app.py [--tiny] [--host 127.0.0.1] [--port 7860]      (or: t2mv app ...)

`build_demo(chain)` returns the Blocks for a `t2mv.chain.TextTo3D`; `main()` loads the models and launches.
Importing this module does nothing else: gradio itself is imported inside those functions, after `main()` has
turned gradio's analytics off.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger("t2mv.app")

MAX_PROMPT_CHARS = 2000  # far beyond CLIP's 77 tokens (which only warn); longer input is rejected
MAX_UI_SEED = 2**32 - 1
EXAMPLES = [
    "a husky dog",
    "a red teapot with a golden lid",
    "a wooden chair",
    "a blue ceramic mug",
    "a cheeseburger",
    "a toy robot, full body",
]
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"]
MONO_FONTS = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"]
OOM_MESSAGE = (
    "Out of GPU memory. Restart the app with --offload (each model on the GPU only while it runs), lower the "
    "marching-cubes resolution, turn texture baking off or use a smaller texture."
)


def _as_int(name: str, value: Any, low: int, high: int) -> int:
    """A whole number from a UI field (sliders send floats); ValueError says the allowed range."""
    if value is None or isinstance(value, bool):
        raise ValueError(f"{name} is missing; give a whole number in [{low}, {high}].")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a whole number in [{low}, {high}], got {value!r}.") from None
    if not number.is_integer() or not low <= number <= high:
        raise ValueError(f"{name} must be a whole number in [{low}, {high}], got {value!r}.")
    return int(number)


def _as_float(name: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}.") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ValueError(f"{name} must be a finite number, got {value!r}.")
    return number


def _zip(path: Path, files: Sequence[Path]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for file in files:
            archive.write(file, arcname=file.name)
    return path


def make_generate(chain: Any, output_root: str | os.PathLike):
    """The click handler for `chain`, writing each request's files into its own folder under `output_root`.

    It returns, in order: the image, the multiview input, the mesh input, the normals and colors galleries,
    the GLB for the viewer, the download files, the timings/memory table, and the seed used. Bad input raises
    `gradio.Error` with what to do; prompt warnings become `gradio.Warning` toasts.
    """
    import gradio as gr
    import torch

    from t2mv.chain import LIMITS
    from t2mv.tiny import SMOKE_BANNER

    output_root = Path(output_root)

    def generate(
        prompt: str | None,
        negative_prompt: str | None,
        seed: Any,
        randomize_seed: bool,
        image: str | None,
        t2i_steps: Any,
        t2i_guidance: Any,
        mv_steps: Any,
        mv_guidance: Any,
        remove_background: bool,
        mv_foreground_ratio: Any,
        mesh_foreground_ratio: Any,
        mc_resolution: Any,
        bake_texture: bool,
        texture_size: Any,
        simplify_faces: Any,
        progress=gr.Progress(),
    ):
        # 1. Check the request (the chain re-checks ranges and says what is allowed).
        prompt = (prompt or "").strip()
        if not image and not prompt:
            raise gr.Error("Enter a prompt, or upload an image instead.")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise gr.Error(
                f"The prompt has {len(prompt)} characters; at most {MAX_PROMPT_CHARS} are accepted (and the model "
                "reads only the first 77 tokens). Shorten it."
            )
        try:
            seed = secrets.randbelow(MAX_UI_SEED + 1) if randomize_seed else _as_int("Seed", seed, 0, MAX_UI_SEED)
            settings = {
                "t2i_steps": _as_int("Text-to-image steps", t2i_steps, *map(int, LIMITS["t2i_steps"])),
                "t2i_guidance": _as_float("Text-to-image CFG", t2i_guidance),
                "mv_steps": _as_int("Multiview steps", mv_steps, *map(int, LIMITS["mv_steps"])),
                "mv_guidance": _as_float("Multiview CFG", mv_guidance),
                "mv_foreground_ratio": _as_float("Foreground ratio (multiview)", mv_foreground_ratio),
                "mesh_foreground_ratio": _as_float("Foreground ratio (mesh)", mesh_foreground_ratio),
                "mc_resolution": _as_int(
                    "Marching-cubes resolution", mc_resolution, *map(int, LIMITS["mc_resolution"])
                ),
                "texture_size": _as_int("Texture size", texture_size, *map(int, LIMITS["texture_size"])),
                "simplify_faces": _as_int("Simplify target", simplify_faces or 0, 0, int(LIMITS["simplify_faces"][1])),
            }
        except ValueError as e:
            raise gr.Error(str(e)) from None
        if image and prompt:
            gr.Warning("An image was uploaded, so the prompt is not used. Clear the image to generate from text.")

        # 2. Run the chain, with a progress step per stage.
        def on_stage(name: str, index: int, total: int) -> None:
            progress(index / total, desc=f"{name.replace('_', ' ')} ({index + 1}/{total})")

        try:
            result = chain(
                None if image else prompt,
                image=image or None,
                negative_prompt=(negative_prompt or "").strip() or None,
                seed=seed,
                remove_background=bool(remove_background),
                bake_texture=bool(bake_texture),
                callback=on_stage,
                **settings,
            )
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            raise gr.Error(OOM_MESSAGE) from None
        except (ValueError, FileNotFoundError) as e:  # bad input; missing weights (WeightsUnavailableError)
            raise gr.Error(str(e)) from None
        except Exception as e:  # unexpected: log it in full, tell the user briefly, keep serving
            logger.exception("generation failed")
            raise gr.Error(f"Generation failed ({type(e).__name__}: {e}). The details are in the server log.") from e
        for message in result.warnings:
            if message != SMOKE_BANNER:  # the page shows that one permanently
                gr.Warning(message)

        # 3. Files for this request only, in its own folder.
        progress(1.0, desc="writing files")
        output_root.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="run-", dir=output_root))
        paths = result.save(folder, mesh_formats=("glb", "obj", "ply") if result.mesh is not None else ())
        downloads: list[str] = []
        glb = None
        if result.mesh is not None:
            glb = str(paths["mesh.glb"])
            obj_files = [p for name, p in paths.items() if name.startswith("mesh.") and p.suffix in (".obj", ".mtl")]
            obj_files += [p for name, p in paths.items() if name.startswith("mesh.") and p.suffix == ".png"]
            downloads += [glb, str(_zip(folder / "mesh_obj.zip", obj_files)), str(paths["mesh.ply"])]
        views = [paths[n] for n in paths if n.startswith(("normal_", "color_"))]
        strips = [paths[n] for n in ("normals", "colors", "mv_input", "mesh_input", "image") if n in paths]
        if views:
            downloads.append(str(_zip(folder / "multiview.zip", [*views, *strips, paths["settings"]])))
        normals = [(str(paths[f"normal_{i}_{v}"]), f"normal · {v}") for i, v in enumerate(result.view_names)]
        colors = [(str(paths[f"color_{i}_{v}"]), f"color · {v}") for i, v in enumerate(result.view_names)]
        table = {
            "seconds": {k: round(v, 3) for k, v in result.timings.items()},
            "memory_gib": {k: round(v, 3) for k, v in result.memory.items()},
            "seed": seed,
            "folder": folder.name,
        }
        return (
            str(paths["image"]),
            str(paths["mv_input"]) if "mv_input" in paths else None,
            str(paths["mesh_input"]) if "mesh_input" in paths else None,
            normals,
            colors,
            glb,
            downloads,
            table,
            seed,
        )

    return generate


def _checked_image(**kwargs: Any):
    """A `gr.Image` whose upload errors read as advice: not an image, or too many pixels to decode.

    gradio opens uploads with PIL before the handler runs, so those two failures happen in the component's
    `preprocess`; it is wrapped on this instance (a subclass would make gradio write a .pyi file next to ours).
    """
    import gradio as gr
    from PIL import Image

    component = gr.Image(**kwargs)
    preprocess = component.preprocess

    def checked_preprocess(payload):
        try:
            return preprocess(payload)
        except Image.DecompressionBombError:
            raise gr.Error(
                "The uploaded image has too many pixels to open safely. Downscale it (1024×1024 is plenty)."
            ) from None
        except (OSError, SyntaxError, ValueError):  # PIL.UnidentifiedImageError is an OSError
            raise gr.Error(
                "The uploaded file is not an image this app can read. Upload a PNG, JPEG or WebP."
            ) from None

    component.preprocess = checked_preprocess
    return component


def build_demo(chain: Any, *, output_dir: str | os.PathLike | None = None) -> Any:
    """The app's `gradio.Blocks` for `chain` (a `TextTo3D`). Each request writes into its own folder of `output_dir`
    (default: ``<system temp>/t2mv-app``). One generation runs at a time (the GPU is the bottleneck)."""
    import gradio as gr

    from t2mv.chain import LIMITS
    from t2mv.tiny import SMOKE_BANNER

    output_root = Path(output_dir) if output_dir is not None else Path(tempfile.gettempdir()) / "t2mv-app"
    d = chain.defaults
    has_t2i = chain.text_to_image is not None
    has_mesh = chain.reconstructor is not None
    # Fonts the browser already has: gr.themes.Font adds no @font-face (plain strings would become LocalFonts,
    # fetched from /static/fonts, and the default theme loads Google Fonts).
    theme = gr.themes.Default(
        font=[gr.themes.Font(name) for name in SYSTEM_FONTS], font_mono=[gr.themes.Font(name) for name in MONO_FONTS]
    )
    with gr.Blocks(title="t2mv: text to multiview and mesh", theme=theme, analytics_enabled=False) as demo:
        gr.Markdown(
            "# t2mv: text → image → multiview → mesh\n"
            "PeRFlow SD1.5 makes an image, PeRFlow Wonder3D its six normals and colors, TripoSR a mesh."
        )
        if chain.smoke:
            gr.Markdown(f"## ⚠️ {SMOKE_BANNER}", elem_id="smoke-banner")
        with gr.Row():
            with gr.Column(scale=1):
                prompt = gr.Textbox(label="Prompt", placeholder="a red teapot", lines=2, visible=has_t2i)
                negative = gr.Textbox(label="Negative prompt", lines=1, visible=has_t2i)
                with gr.Accordion("… or start from an image", open=not has_t2i):
                    image = _checked_image(label="Input image (used instead of the prompt)", type="filepath")
                with gr.Row():
                    seed = gr.Number(label="Seed", value=0, precision=0, minimum=0, maximum=MAX_UI_SEED)
                    randomize = gr.Checkbox(label="Random seed", value=False)
                with gr.Accordion("Settings", open=False):
                    t2i_steps = gr.Slider(4, 16, value=d.t2i_steps, step=1, label="Text-to-image steps")
                    t2i_cfg = gr.Slider(1.0, 12.0, value=d.t2i_guidance, step=0.5, label="Text-to-image CFG")
                    mv_steps = gr.Slider(4, 16, value=d.mv_steps, step=1, label="Multiview steps")
                    mv_cfg = gr.Slider(1.0, 5.0, value=d.mv_guidance, step=0.5, label="Multiview CFG (1 = off)")
                    remove_bg = gr.Checkbox(label="Remove background", value=True)
                    low, high = LIMITS["mv_foreground_ratio"]
                    mv_ratio = gr.Slider(
                        low, high, value=d.mv_foreground_ratio, step=0.05, label="Foreground ratio (multiview)"
                    )
                    mesh_ratio = gr.Slider(
                        low, high, value=d.mesh_foreground_ratio, step=0.05, label="Foreground ratio (mesh)"
                    )
                    mc_res = gr.Slider(32, 512, value=d.mc_resolution, step=32, label="Marching-cubes resolution")
                    bake = gr.Checkbox(label="Bake a UV texture (instead of vertex colours)", value=False)
                    tex_size = gr.Dropdown([512, 1024, 2048, 4096], value=d.texture_size, label="Texture size")
                    simplify = gr.Number(
                        label="Simplify to about N faces (0 = keep all)", value=0, precision=0, minimum=0
                    )
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                if has_t2i:
                    gr.Examples(examples=[[text] for text in EXAMPLES], inputs=[prompt], label="Examples")
            with gr.Column(scale=2):
                with gr.Row():
                    out_image = gr.Image(label="Generated image", type="filepath", interactive=False, height=220)
                    out_mv_input = gr.Image(label="Multiview input", type="filepath", interactive=False, height=220)
                    out_mesh_input = gr.Image(label="Mesh input", type="filepath", interactive=False, height=220)
                gallery = {"columns": 6, "rows": 1, "height": 190, "object_fit": "contain"}
                normals = gr.Gallery(label="Normals", elem_id="normals", **gallery)
                colors = gr.Gallery(label="Colors", elem_id="colors", **gallery)
                viewer = gr.Model3D(label="Mesh (GLB)", visible=has_mesh, height=360, elem_id="viewer")
                downloads = gr.File(label="Downloads", file_count="multiple", interactive=False, elem_id="downloads")
                timings = gr.JSON(label="Timings (s) and memory (GiB)")
        inputs = [prompt, negative, seed, randomize, image, t2i_steps, t2i_cfg, mv_steps, mv_cfg, remove_bg]
        inputs += [mv_ratio, mesh_ratio, mc_res, bake, tex_size, simplify]
        outputs = [out_image, out_mv_input, out_mesh_input, normals, colors, viewer, downloads, timings, seed]
        generate = make_generate(chain, output_root)
        button.click(generate, inputs, outputs, api_name="generate", concurrency_limit=1)
        prompt.submit(generate, inputs, outputs, api_name=False, concurrency_limit=1)
    demo.queue(default_concurrency_limit=1, max_size=32)
    demo.t2mv_output_root = output_root  # for launch(allowed_paths=...) and tests
    return demo


def build_parser() -> argparse.ArgumentParser:
    from t2mv.cli import HelpFormatter, add_model_args

    parser = argparse.ArgumentParser(prog="t2mv app", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    parser.add_argument("--port", type=int, default=7860, help="port")
    parser.add_argument("--share", action="store_true", help="make a public gradio.live link (downloads frpc)")
    parser.add_argument("--output-dir", default=None, help="where requests write their files (default: temp dir)")
    add_model_args(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Parse flags, load the models (or the smoke-mode ones), and serve until interrupted."""
    # No analytics or telemetry unless the user asked for them; set before gradio is first imported.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    from t2mv.cli import load_chain

    try:
        chain = load_chain(args, ("text_to_image", "multiview", "mesh"))
    except FileNotFoundError as e:  # missing weights: the message names the repo, the fixes and smoke mode
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(3) from None
    demo = build_demo(chain, output_dir=args.output_dir)
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=args.share,
        show_error=True,
        allowed_paths=[str(demo.t2mv_output_root)],
    )


if __name__ == "__main__":
    main()
