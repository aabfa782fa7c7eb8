"""Gradio web app: text (or an image) → image → six normals + six colors → a 3D mesh, with downloads.

    t2mv app [--tiny] [--host 127.0.0.1] [--port 7860]      (or: python app.py ...)

`build_demo(chain)` returns the Blocks for a `t2mv.chain.TextTo3D`; `main()` checks the flags, loads the models and
launches. Importing this module does nothing else: gradio is imported inside those functions, after `main()` has
turned gradio's analytics off.

The settings controls are built from `t2mv.settings.GenerationSettings` (label, bounds, step and default of each
option), so the sliders allow exactly what the chain accepts. Adding a control is adding its option name to
`SETTING_CONTROLS` (and the option to `GenerationSettings`): the handler's signature, the request's settings and
the API follow from that list.

Each request writes into its own folder under the output root (default ``<temp>/t2mv-app``); folders older than
``--keep-hours`` or beyond the newest ``--keep-requests`` are deleted, and only folders this app made (they carry
``REQUEST_MARKER``). Files are world-readable (0644, folders 0755) like any other output.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import secrets
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger("t2mv.app")

MAX_PROMPT_CHARS = 2000  # far beyond CLIP's 77 tokens (which only warn); longer input is rejected
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
# The request's own inputs, then the GenerationSettings options shown under "Settings", in this order.
REQUEST_INPUTS = ("prompt", "negative_prompt", "seed", "randomize_seed", "image")
SETTING_CONTROLS = (
    "t2i_steps",
    "t2i_guidance",
    "mv_steps",
    "mv_guidance",
    "remove_background",
    "mv_foreground_ratio",
    "mesh_foreground_ratio",
    "mc_resolution",
    "mc_threshold",
    "texture_source",
    "refine",
    "refine_iterations",
    "bake_texture",
    "texture_size",
    "simplify_faces",
    "candidates",
    "turntable",
    "upscale",
)
OUTPUTS = (
    "image",
    "mv_input",
    "mesh_input",
    "normals",
    "colors",
    "mesh",
    "downloads",
    "timings",
    "seed",
    "status",
    "field_mesh",
    "view_report",
    "candidates",
    "turntable",
    "chosen",
    "image_upscaled",
)
# The handler's input after the settings: which configured text-to-image model runs (its label, `t2i_label`).
MODEL_INPUT = "t2i_model"
UPSCALE_CHOICES = [("off", 0), ("1024 × 1024", 1024)]  # the PeRFlow-Refiner's side, as upstream's script runs it
TIMING_HEADERS = ["stage", "seconds", "GPU peak (GiB)", "host RSS (GiB)"]
VIEW_REPORT_HEADERS = ["view", "silhouette IoU", "surface share"]
MESH_FORMATS = ("glb", "obj", "ply", "stl")
REQUEST_PREFIX = "run-"
REQUEST_MARKER = ".t2mv-request"  # only folders carrying it are ever deleted by the clean-up
DEFAULT_KEEP_REQUESTS = 50
DEFAULT_KEEP_HOURS = 24.0
DEFAULT_MAX_UPLOAD_MB = 25
AUTH_ENV = "T2MV_APP_AUTH"  # user:password, so the password need not appear in the process list
FILE_MODE, FOLDER_MODE = 0o644, 0o755
OBJECT_MASK_NOTES = {
    "input alpha": "the upload's transparency was used as the object mask (background removal skipped)",
    "rembg u2net": "background removed with rembg (u2net)",
    "none (whole image)": "background removal off: the whole image was used",
}


# ---------------------------------------------------------------------------------------------- request folders
def clean_request_folders(root: str | os.PathLike, *, max_age_s: float, max_count: int) -> list[Path]:
    """Delete this app's request folders under `root` that are older than `max_age_s` or beyond the newest
    `max_count`; return the deleted paths.

    Only folders holding ``REQUEST_MARKER`` are touched, so pointing ``-o/--output`` at a folder with other
    files never deletes them. Age is the folder's modification time.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    ages: dict[Path, float] = {}
    now = time.time()
    for path in root.iterdir():
        try:
            if path.is_dir() and (path / REQUEST_MARKER).is_file():
                ages[path] = now - path.stat().st_mtime
        except FileNotFoundError:  # removed meanwhile (another app process on the same root)
            continue
    newest_first = sorted(ages, key=ages.__getitem__)
    doomed = [p for i, p in enumerate(newest_first) if i >= max_count or ages[p] > max_age_s]
    for folder in doomed:
        shutil.rmtree(folder, ignore_errors=True)
    return doomed


def new_request_folder(root: str | os.PathLike) -> Path:
    """A fresh, uniquely named folder for one request under `root` (created 0755, marked as the app's)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=REQUEST_PREFIX, dir=root))  # mkdtemp makes it 0700
    folder.chmod(FOLDER_MODE)
    (folder / REQUEST_MARKER).touch()
    return folder


def make_readable(folder: Path) -> None:
    """Files 0644 and folders 0755 under `folder`: outputs are ordinary files (temp-file writers leave 0600)."""
    folder.chmod(FOLDER_MODE)
    for path in folder.rglob("*"):
        path.chmod(FOLDER_MODE if path.is_dir() else FILE_MODE)


def _zip(path: Path, files: Sequence[Path]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for file in files:
            archive.write(file, arcname=file.name)
    return path


# ---------------------------------------------------------------------------------------------- text-to-image models
def t2i_kind(chain: Any) -> tuple[str, str]:
    """The kind (``perflow`` / ``rectified_flow``) and name of `chain`'s text-to-image model.

    A resident stage says its own kind; a low-memory chain's (loaded per run) is read from its model's
    ``model_index.json`` (PeRFlow when that cannot be read: loading reports it at the first request)."""
    slot = chain._slots["text_to_image"]
    model = str(chain.model_ids.get("t2i_model", ""))
    if slot.stage is not None:
        return getattr(slot.stage, "kind", "perflow"), str(slot.stage.settings.get("model", model))
    from .rectified_flow import kind_of_model

    try:
        return kind_of_model(model, local_files_only=True), model
    except Exception:  # not on disk (yet): the run names the missing weights
        return "perflow", model


def t2i_label(chain: Any) -> str:
    """How the UI names `chain`'s text-to-image model: "PeRFlow SD1.5 (best)", "InstaFlow (fastest)" (a one-step
    rectified flow) or "Rectified flow (<model>)"."""
    from .rectified_flow import defaults_for

    kind, model = t2i_kind(chain)
    if kind == "perflow":
        return "PeRFlow SD1.5 (best)"
    if defaults_for(kind, model).num_inference_steps == 1:
        return "InstaFlow (fastest)"
    return f"Rectified flow ({Path(model).name or model})"


def with_text_to_image(chain: Any, other: Any) -> Any:
    """`chain` with `other`'s text-to-image stage (a `TextTo3D` holding only that stage): the 3D stages, the
    background remover and the settings are shared, not loaded twice; the defaults are the new model kind's
    (InstaFlow: 1 step, no guidance)."""
    import copy

    from .settings import GenerationSettings, t2i_model_defaults

    kind, model = t2i_kind(other)
    plain = GenerationSettings()  # PeRFlow's steps and guidance, which a rectified-flow kind replaces
    combined = copy.copy(chain)  # shares every slot object; only the text-to-image slot differs
    combined._slots = {**chain._slots, "text_to_image": other._slots["text_to_image"]}
    combined.model_ids = {**chain.model_ids, "t2i_model": other.model_ids.get("t2i_model", model)}
    base = chain.defaults.with_changes(t2i_steps=plain.t2i_steps, t2i_guidance=plain.t2i_guidance)
    combined.defaults = base.with_changes(**t2i_model_defaults(kind, model))
    combined._refiner_parts = None  # the refiner is loaded for this model kind on its first upscale
    return combined


def t2i_choices(chain: Any, extra: Sequence[Any] = ()) -> dict[str, Any]:
    """{label: chain} of the configured text-to-image models, `chain`'s first (the UI's default)."""
    choices: dict[str, Any] = {}
    for option in (chain, *extra):
        label = t2i_label(option)
        if label in choices:
            label = f"{label} · {t2i_kind(option)[1]}"
        choices[label] = option
    return choices


def model_defaults(choices: dict[str, Any], label: str) -> tuple[int, float]:
    """The steps and guidance a model's choice sets in the settings (its kind's own defaults)."""
    defaults = choices[label].defaults
    return defaults.t2i_steps, defaults.t2i_guidance


# ---------------------------------------------------------------------------------------------- the handler
def timing_table(result: Any) -> dict[str, Any]:
    """Stage timings and memory as a small table (``{"headers", "data"}``, a `gr.Dataframe` value).

    One row per planned stage that ran, in run order, then ``total`` (`ChainResult.stage_rows`: the chain's plan,
    the same list the progress bar and the command line's summary read); the stages' finer timings
    (``multiview.denoise``) are left out. Memory cells are empty where nothing was measured (no GPU). `result`
    None (nothing ran): no rows.
    """
    rows = []
    for row in [] if result is None else result.stage_rows():
        gpu, rss = row.gpu_peak, row.host_rss
        rows.append(
            [
                row.stage,
                round(row.seconds, 3),
                "" if gpu is None else round(gpu, 3),
                "" if rss is None else round(rss, 3),
            ]
        )
    return {"headers": TIMING_HEADERS, "data": rows}


def _status(result: Any, seed: int) -> str:
    """The one-line summary shown under the results: time, seed, how the object was cut out, what coloured the
    mesh (with the views' coverage) and whether refinement was kept."""
    parts = [f"Done in {result.timings.get('total', 0.0):.1f} s", f"seed {seed}"]
    mask = result.settings.get("object_mask")
    if result.settings.get("input") == "image" and mask in OBJECT_MASK_NOTES:
        parts.append(f"Background: {OBJECT_MASK_NOTES[mask]}")
    texture = result.info.get("view_texture", {})
    if "coverage" in texture:
        parts.append(f"Mesh textured from the six views: {texture['coverage']:.0%} of the surface seen")
    elif result.settings.get("texture_source") == "field" and result.mesh is not None:
        parts.append("Mesh colours from TripoSR's field")
    refine = result.info.get("refine")
    if refine is not None:
        parts.append("Shape refined from the normal maps" if refine.get("accepted") else "Refinement not kept")
    return " · ".join(parts) + "."


RUNNING_STATUS = "⏳ Generating…"
FAILED_STATUS = "⚠️ The request failed (the message says why); nothing new was generated."


def status_running() -> str:
    """The status line while a request runs (set before the handler starts)."""
    return RUNNING_STATUS


def status_after_run(current: str) -> str:
    """The status line after a request: the handler's own line, or, when it failed and so set none, the failure."""
    return FAILED_STATUS if current == RUNNING_STATUS else current


def view_report(result: Any) -> list[list[Any]]:
    """Rows of the views-texture table: per view its silhouette IoU against the mesh and its share of the
    surface, then the total coverage (empty when the mesh was not textured from the views)."""
    texture = {} if result is None else result.info.get("view_texture", {})
    if "coverage" not in texture:
        return []
    rows = [
        [view, round(float(iou), 3), round(float(texture["view_share"].get(view, 0.0)), 3)]
        for view, iou in texture["view_iou"].items()
    ]
    return rows + [["coverage (all views)", None, round(float(texture["coverage"]), 3)]]


def _outputs(folder: Path, result: Any, seed: int, status: str) -> tuple:
    """The handler's return values (in `OUTPUTS` order) from the files the chain wrote into `folder`."""

    def file(name: str) -> str | None:
        return str(folder / name) if (folder / name).is_file() else None

    views = sorted(folder.glob("normal_*.png")) + sorted(folder.glob("color_*.png"))
    upscaled = next(iter(sorted(folder.glob("image_[0-9]*.png"))), None)  # the refiner's image_<side>.png
    downloads: list[str] = [] if upscaled is None else [str(upscaled)]
    glb = file("mesh.glb")
    if glb is not None:
        obj_files = [p for p in sorted(folder.glob("mesh.*")) if p.suffix in (".obj", ".mtl", ".png")]
        downloads += [glb, str(_zip(folder / "mesh_obj.zip", obj_files))]
        downloads += [p for p in [file("mesh.ply"), file("mesh.stl")] if p is not None]
    if views:
        extras = [folder / n for n in ("normals.png", "colors.png", "mv_input.png", "mesh_input.png", "image.png")]
        extras += [folder / "settings.json"]
        downloads.append(str(_zip(folder / "multiview.zip", views + [p for p in extras if p.is_file()])))
    make_readable(folder)

    def gallery(kind: str) -> list[tuple[str, str]]:
        found = []
        for i, view in enumerate(result.view_names if result is not None else ()):
            path = file(f"{kind}_{i}_{view}.png")
            if path is not None:
                found.append((path, f"{kind} · {view}"))
        return found

    table = timing_table(result)
    return (
        file("image.png"),
        file("mv_input.png"),
        file("mesh_input.png"),
        gallery("normal"),
        gallery("color"),
        glb,
        downloads,
        table,
        seed,
        status,
        file("mesh_field.glb"),
        view_report(result),
        candidate_gallery(folder, result),
        file("turntable.mp4"),
        -1 if result is None or result.chosen is None else result.chosen,
        None if upscaled is None else str(upscaled),
    )


def candidate_gallery(folder: Path, result: Any) -> list[tuple[str, str]]:
    """The best-of-N images of a request with their 3D-suitability scores, the chosen one marked (empty for one
    image)."""
    scores = [] if result is None else result.candidate_scores
    items = []
    for k in range(len(list(folder.glob("candidate_*.png")))):
        path = folder / f"candidate_{k}.png"
        if not path.is_file():
            break
        caption = f"{k}" + (f" · score {scores[k]['score']:.2f}" if k < len(scores) else "")
        items.append((str(path), caption + (" · chosen" if result is not None and result.chosen == k else "")))
    return items


def _candidate_files(value: Any) -> list[str]:
    """The candidate gallery's value (``[(path, caption), ...]`` or plain paths / file dicts) → image paths."""
    files = []
    for item in value or []:
        item = item[0] if isinstance(item, list | tuple) else item
        item = item.get("path") or item.get("name") if isinstance(item, dict) else item
        item = getattr(item, "path", item)  # a gradio FileData
        if item:
            files.append(str(item))
    return files


def make_generate(
    chain: Any,
    output_root: str | os.PathLike,
    *,
    controls: Sequence[str] = SETTING_CONTROLS,
    keep_requests: int = DEFAULT_KEEP_REQUESTS,
    keep_hours: float = DEFAULT_KEEP_HOURS,
    from_candidates: bool = False,
    choices: dict[str, Any] | None = None,
):
    """The click handler for `chain`, writing each request's files into its own folder under `output_root`.

    Args:
        chain: a `TextTo3D`.
        output_root: where request folders go; old ones are cleaned (see `clean_request_folders`) per request.
        controls: the `GenerationSettings` options the UI sends, after `REQUEST_INPUTS`.
        keep_requests, keep_hours: the clean-up limits.
        from_candidates: the "Make 3D" handler instead: two more inputs, ``candidate_images`` (the candidates
            gallery of an earlier request) and ``chosen_candidate`` (the index clicked, -1: the best score), and the
            3D stages run from that image without making the images again.
        choices: {label: chain} of the configured text-to-image models (`t2i_choices`); the input ``t2i_model``
            (after the controls) picks one by its label; None or empty: `chain` only.

    Returns:
        ``generate(prompt, negative_prompt, seed, randomize_seed, image, *<controls>, t2i_model, progress)``,
        callable with keywords too. It returns the values of `OUTPUTS`: the image, the multiview input, the mesh input, the
        normals and colors galleries, the GLB for the viewer, the download files, the timings table, the seed
        used and a status line. Bad input raises `gradio.Error` with what to do (one line, never a traceback);
        prompt warnings become `gradio.Warning` toasts. When a late stage fails, the finished stages are shown
        and the status line says what failed.
    """
    import gradio as gr
    from PIL import ImageOps

    from .errors import StageFailedError, describe, is_out_of_memory
    from .inputs import open_image
    from .settings import MAX_SEED, GenerationSettings
    from .tiny import SMOKE_BANNER

    output_root = Path(output_root)
    specs = GenerationSettings.bounds()
    labels = {name: spec.label for name, spec in specs.items()}
    choices = dict(choices or {}) or {"": chain}  # no choice configured: `chain`, whatever the input says
    names = tuple(REQUEST_INPUTS) + tuple(controls)
    extras = (MODEL_INPUT,) + (("candidate_images", "chosen_candidate") if from_candidates else ())
    parameter = inspect.Parameter.POSITIONAL_OR_KEYWORD
    signature = inspect.Signature(
        [inspect.Parameter(name, parameter) for name in names]
        + [inspect.Parameter(name, parameter, default=None) for name in extras]
        + [inspect.Parameter("progress", parameter, default=gr.Progress())]
    )

    def pick(label: Any) -> Any:
        """The chain of the chosen text-to-image model (none chosen, or none configured: the first)."""
        if label is None or label == "" or "" in choices:
            return next(iter(choices.values()))
        if label not in choices:
            raise gr.Error(f"Unknown text-to-image model {label!r}; choose one of: {', '.join(choices)}.")
        return choices[label]

    def run(request: dict[str, Any], progress: Any) -> tuple:
        # 1. Check the request before anything runs: prompt, seed, settings, image.
        chain = pick(request.get(MODEL_INPUT))
        prompt = (request["prompt"] or "").strip()
        candidate_files = _candidate_files(request.get("candidate_images")) if from_candidates else []
        if from_candidates and not candidate_files:
            raise gr.Error("There are no candidates yet: set Candidate images above 1 and press Generate first.")
        image_path = None if from_candidates else request["image"]  # "Make 3D" starts from a candidate
        if not image_path and not prompt:
            raise gr.Error("Enter a prompt, or upload an image instead.")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise gr.Error(
                f"The prompt has {len(prompt)} characters; at most {MAX_PROMPT_CHARS} are accepted (and the model "
                "reads only the first 77 tokens). Shorten it."
            )
        seed = request["seed"]
        if request["randomize_seed"]:
            seed = secrets.randbelow(MAX_SEED + 1)
        elif seed is None or seed == "":
            raise gr.Error(f"Seed is missing; give a whole number in [0, {MAX_SEED}] or tick Random seed.")
        values = {"seed": seed, **{name: request[name] for name in controls}}
        if from_candidates:
            chosen = request.get("chosen_candidate")
            chosen = -1 if chosen is None or chosen == "" else int(chosen)
            values.update(candidates=len(candidate_files), choose=chosen if 0 <= chosen < len(candidate_files) else -1)
        try:
            # Slider floats become ints where exact (4.0 → 4); then one check, naming options by their labels.
            converted = GenerationSettings.from_mapping(values, base=chain.defaults, coerce=True, skip=specs)
            settings = converted.validate(names=labels)
        except ValueError as e:
            raise gr.Error(str(e)) from None
        image = None
        if image_path:
            try:
                image = open_image(image_path, name=f"The uploaded image ({Path(image_path).name})")
            except ValueError as e:
                raise gr.Error(str(e)) from None
            # Phone photos store "rotate me" in EXIF; gradio no longer re-encodes the upload, so apply it here.
            image = ImageOps.exif_transpose(image)
            if prompt:
                gr.Warning("An image was uploaded, so the prompt is not used. Clear the image to generate from text.")

        # 2. Run the chain into a fresh request folder, a progress step per stage.
        def on_stage(name: str, index: int, total: int) -> None:
            progress(index / total, desc=f"{name.replace('_', ' ')} ({index + 1}/{total})")

        clean_request_folders(output_root, max_age_s=keep_hours * 3600, max_count=max(keep_requests - 1, 0))
        folder = new_request_folder(output_root)
        finished: dict[str, Any] = {}
        try:
            result = chain(
                None if image is not None else prompt,
                image=image,
                candidates=candidate_files or None,
                negative_prompt=(request["negative_prompt"] or "").strip() or None,
                settings=settings,
                callback=on_stage,
                output_dir=folder,
                mesh_formats=MESH_FORMATS,
                on_stage_done=lambda name, partial: finished.update(result=partial),
            )
        except StageFailedError as e:  # earlier stages are on disk: show them, say what failed
            if is_out_of_memory(e.cause):
                _free_gpu_memory()
            message = OOM_MESSAGE if is_out_of_memory(e.cause) else describe(e.cause)
            status = f"⚠️ The {e.stage.replace('_', ' ')} stage failed: {message} The finished stages are shown."
            gr.Warning(status)
            logger.warning("request %s: %s stage failed: %r", folder.name, e.stage, e.cause)
            return _outputs(folder, finished.get("result"), settings.seed, status)
        except Exception as e:
            shutil.rmtree(folder, ignore_errors=True)  # nothing finished: no empty folder left behind
            if is_out_of_memory(e):
                _free_gpu_memory()
                raise gr.Error(OOM_MESSAGE) from None
            if isinstance(e, FileNotFoundError | ValueError):  # bad input; missing weights (u2net, ...)
                raise gr.Error(describe(e)) from None
            logger.exception("generation failed")  # unexpected: in full in the log, briefly on the page
            text = " ".join(str(e).split())  # one line, whatever the library's message looks like
            raise gr.Error(
                f"Generation failed ({type(e).__name__}: {text}). The details are in the server log."
            ) from e
        for message in result.warnings:
            if message != SMOKE_BANNER:  # the page shows that one permanently
                gr.Warning(message)

        # 3. Downloads and the page's values.
        progress(1.0, desc="writing files")
        return _outputs(folder, result, settings.seed, _status(result, settings.seed))

    def generate(*args: Any, **kwargs: Any) -> tuple:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        request = dict(bound.arguments)
        return run(request, request.pop("progress"))

    generate.__signature__ = signature  # gradio reads the parameters (and finds `progress`) from it
    generate.__name__ = "generate"
    return generate


def _free_gpu_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- the page
def _checked_image(**kwargs: Any):
    """A `gr.Image` that hands the handler the uploaded file as it is (alpha, mode and bit depth kept), and whose
    upload errors read as advice.

    ``image_mode=None`` + ``type="filepath"``: gradio only reads the header (PIL.Image.open) and passes the file's
    path on, so a cut-out keeps its transparency and `t2mv.inputs.open_image` does every check in the handler.
    The header read itself can fail (not an image; more pixels than PIL opens at all); those failures are turned
    into the shared checks' messages here, wrapped on this instance (a subclass would make gradio write a .pyi
    file next to ours).
    """
    import gradio as gr

    from .inputs import open_image

    component = gr.Image(type="filepath", image_mode=None, **kwargs)
    preprocess = component.preprocess

    def checked_preprocess(payload: Any) -> Any:
        try:
            return preprocess(payload)
        except gr.Error:
            raise
        except Exception as e:  # PIL: DecompressionBombError, UnidentifiedImageError (an OSError), ...
            try:
                open_image(payload.path, name=f"The uploaded image ({Path(payload.orig_name or 'image').name})")
            except ValueError as checked:
                raise gr.Error(str(checked)) from None
            raise gr.Error(
                f"The uploaded file could not be read ({type(e).__name__}). Upload a PNG, JPEG or WebP."
            ) from None

    component.preprocess = checked_preprocess
    return component


def settings_control(spec: Any, value: Any) -> Any:
    """The gradio control for one `GenerationSettings` option (its `OptionSpec`), starting at `value`.

    bool → checkbox; str → radio buttons of its choices; a number with both bounds → slider over exactly the
    bounds (with 0 allowed besides them, or a range too wide for a slider: a number box); otherwise a number box.
    """
    import gradio as gr

    if spec.kind == "bool":
        return gr.Checkbox(label=spec.label, value=value, info=spec.help)
    if spec.kind == "str":
        return gr.Radio(list(spec.choices), label=spec.label, value=value, info=spec.help)
    bounded = spec.low is not None and spec.high is not None
    if bounded and not spec.zero_allowed and spec.high - spec.low <= 10_000:
        step = spec.step or (1 if spec.kind == "int" else 0.01)
        return gr.Slider(spec.low, spec.high, value=value, step=step, label=spec.label)
    precision = 0 if spec.kind == "int" else None
    return gr.Number(label=spec.label, value=value, precision=precision, minimum=0 if spec.zero_allowed else spec.low)


def upscale_control(spec: Any, value: int, visible: bool) -> Any:
    """The PeRFlow-Refiner's choice: off or 1024² (upstream's target side), sending the side (0: off)."""
    import gradio as gr

    choices = list(UPSCALE_CHOICES) + ([] if value in dict(UPSCALE_CHOICES).values() else [(str(value), value)])
    return gr.Radio(choices, value=value, label=spec.label, info=spec.help, visible=visible, elem_id="upscale")


def build_demo(
    chain: Any,
    *,
    output_dir: str | os.PathLike | None = None,
    keep_requests: int = DEFAULT_KEEP_REQUESTS,
    keep_hours: float = DEFAULT_KEEP_HOURS,
    more_t2i: Sequence[Any] = (),
) -> Any:
    """The app's `gradio.Blocks` for `chain` (a `TextTo3D`).

    Args:
        chain: the loaded chain (smoke mode shows a permanent banner).
        more_t2i: `chain` with other text-to-image models (`with_text_to_image`, e.g. InstaFlow from
            ``--fast-t2i-model``): a "Text-to-image model" choice lists them all, and picking one sets the steps
            and guidance to that model's own defaults. The choice is shown when there is more than one model, or
            the only one is not PeRFlow (so the page says that InstaFlow runs).
        output_dir: request folders go here (default: ``<system temp>/t2mv-app``).
        keep_requests, keep_hours: request folders beyond the newest `keep_requests` or older than `keep_hours`
            are deleted when a new request starts.

    One generation runs at a time (the GPU is the bottleneck); ``demo.t2mv_output_root`` is the output folder
    (for ``launch(allowed_paths=...)``).
    """
    import gradio as gr

    from .settings import MAX_SEED, GenerationSettings
    from .tiny import SMOKE_BANNER

    output_root = Path(output_dir) if output_dir is not None else Path(tempfile.gettempdir()) / "t2mv-app"
    defaults = chain.defaults
    specs = GenerationSettings.bounds()
    has_t2i = "text_to_image" in chain.stages
    has_mesh = "mesh" in chain.stages
    choices = t2i_choices(chain, more_t2i) if has_t2i else {}
    show_choice = len(choices) > 1 or any(t2i_kind(option)[0] != "perflow" for option in choices.values())
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
                with gr.Accordion("… or start from an image", open=not has_t2i, elem_id="image-accordion"):
                    image = _checked_image(
                        label="Input image (used instead of the prompt; a transparent background is kept)",
                        elem_id="input-image",
                    )
                with gr.Row():
                    seed = gr.Number(
                        label="Seed", value=defaults.seed, precision=0, minimum=0, maximum=MAX_SEED, elem_id="seed"
                    )
                    randomize = gr.Checkbox(label="Random seed", value=False)
                model = gr.Radio(
                    list(choices) or [""],
                    value=next(iter(choices), ""),
                    label="Text-to-image model",
                    info="InstaFlow: one step, no guidance (fastest); PeRFlow: 4 steps with guidance (best)",
                    visible=show_choice,
                    elem_id="t2i-model",
                )
                with gr.Accordion("Settings", open=False):
                    controls = [
                        upscale_control(specs[name], defaults.upscale, has_t2i)
                        if name == "upscale"
                        else settings_control(specs[name], getattr(defaults, name))
                        for name in SETTING_CONTROLS
                    ]
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                if has_t2i:
                    gr.Examples(examples=[[text] for text in EXAMPLES], inputs=[prompt], label="Examples")
            with gr.Column(scale=2):
                status = gr.Markdown("", elem_id="status")
                with gr.Row():
                    out_image = gr.Image(label="Generated image", type="filepath", interactive=False, height=220)
                    out_mv_input = gr.Image(label="Multiview input", type="filepath", interactive=False, height=220)
                    out_mesh_input = gr.Image(label="Mesh input", type="filepath", interactive=False, height=220)
                out_upscaled = gr.Image(
                    label="Upscaled image (PeRFlow-Refiner; choose Upscale under Settings)",
                    type="filepath",
                    interactive=False,
                    height=320,
                    visible=has_t2i,
                    elem_id="upscaled",
                )
                candidates = gr.Gallery(
                    label="Candidates (click one, then Make 3D from it)",
                    columns=4,
                    rows=1,
                    height=200,
                    object_fit="contain",
                    allow_preview=False,
                    visible=has_t2i,
                    elem_id="candidates",
                )
                # The candidate clicked (or chosen by the last run); -1: the best score. A hidden number, not a
                # State, so the API's /make_3d takes it as `chosen_candidate` too.
                chosen = gr.Number(value=-1, precision=0, visible=False, label="Candidate", elem_id="chosen-candidate")
                make_3d_button = gr.Button("Make 3D from the selected candidate", visible=has_t2i, elem_id="make-3d")
                gallery = {"columns": 6, "rows": 1, "height": 190, "object_fit": "contain"}
                normals = gr.Gallery(label="Normals", elem_id="normals", **gallery)
                colors = gr.Gallery(label="Colors", elem_id="colors", **gallery)
                show = gr.Radio(
                    ["views", "field"],
                    value="views",
                    label="Show the mesh coloured by",
                    info="views: textured from the six generated views; field: TripoSR's own colours (to compare)",
                    visible=has_mesh,
                    elem_id="show-colours",
                )
                viewer = gr.Model3D(label="Mesh (GLB)", visible=has_mesh, height=360, elem_id="viewer")
                field_viewer = gr.Model3D(
                    label="Mesh with TripoSR's field colours (GLB)", visible=False, height=360, elem_id="field-viewer"
                )
                show.change(
                    lambda which: (gr.update(visible=which == "views"), gr.update(visible=which == "field")),
                    [show],
                    [viewer, field_viewer],
                    api_name=False,
                )
                report = gr.Dataframe(
                    headers=VIEW_REPORT_HEADERS,
                    label="Views → mesh texture: silhouette fit and surface share per view",
                    interactive=False,
                    visible=has_mesh,
                    elem_id="view-report",
                )
                turntable = gr.Video(
                    label="Turntable (tick Turntable video under Settings)",
                    visible=has_mesh,
                    interactive=False,
                    autoplay=True,
                    loop=True,
                    elem_id="turntable",
                )
                downloads = gr.File(label="Downloads", file_count="multiple", interactive=False, elem_id="downloads")
                timings = gr.Dataframe(
                    headers=TIMING_HEADERS,
                    label="Timings (s) and memory (GiB)",
                    interactive=False,
                    elem_id="timings",
                )
        inputs = [prompt, negative, seed, randomize, image, *controls, model]
        outputs = [out_image, out_mv_input, out_mesh_input, normals, colors, viewer, downloads, timings, seed, status]
        outputs += [field_viewer, report, candidates, turntable, chosen, out_upscaled]
        common = {"keep_requests": keep_requests, "keep_hours": keep_hours, "choices": choices}
        generate = make_generate(chain, output_root, **common)
        make_3d = make_generate(chain, output_root, from_candidates=True, **common)
        steps_and_guidance = [controls[SETTING_CONTROLS.index(n)] for n in ("t2i_steps", "t2i_guidance")]
        model.change(
            lambda label: model_defaults(choices, label) if label in choices else (gr.update(), gr.update()),
            [model],
            steps_and_guidance,
            queue=False,
            api_name=False,
        )

        def select_candidate(evt):
            return evt.index

        select_candidate.__annotations__ = {"evt": gr.SelectData}  # gradio passes the click by this annotation
        candidates.select(select_candidate, None, [chosen], queue=False, api_name=False)
        make_3d_button.click(status_running, None, [status], queue=False, api_name=False).then(
            make_3d, [*inputs, candidates, chosen], outputs, api_name="make_3d", concurrency_limit=1
        ).then(status_after_run, [status], [status], queue=False, api_name=False)
        for trigger, api_name in ((button.click, "generate"), (prompt.submit, False)):
            # The status line first says a request runs, and after it, whether it failed: a failed request returns
            # no values (gradio shows its error), which would leave the previous request's "Done" standing.
            trigger(status_running, None, [status], queue=False, api_name=False).then(
                generate, inputs, outputs, api_name=api_name, concurrency_limit=1
            ).then(status_after_run, [status], [status], queue=False, api_name=False)
    demo.queue(default_concurrency_limit=1, max_size=32)
    demo.t2mv_output_root = output_root
    demo.t2mv_controls = dict(zip(SETTING_CONTROLS, controls))  # option name → its control (tests, extensions)
    demo.t2mv_model_choice = model
    return demo


# ---------------------------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    """The app's flags: address, sharing and login, request folders, upload limit, and the shared model flags."""
    from .cli_common import ArgumentParser, HelpFormatter, add_model_args

    parser = ArgumentParser(prog="t2mv app", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    parser.add_argument("--port", type=int, default=7860, help="port")
    parser.add_argument(
        "--share", action="store_true", help="make a public gradio.live link (needs --auth; downloads frpc)"
    )
    parser.add_argument(
        "--auth",
        default=None,
        metavar="USER:PASSWORD",
        help=f"require this login (also from ${AUTH_ENV}, which keeps the password out of the process list)",
    )
    parser.add_argument(
        "--i-know", action="store_true", help="allow --share without --auth: anyone with the link can use the GPU"
    )
    parser.add_argument("-o", "--output", default=None, help="where requests write their files (default: temp dir)")
    parser.add_argument(
        "--keep-requests", type=int, default=DEFAULT_KEEP_REQUESTS, help="request folders kept (older ones deleted)"
    )
    parser.add_argument(
        "--keep-hours", type=float, default=DEFAULT_KEEP_HOURS, help="request folders older than this are deleted"
    )
    parser.add_argument(
        "--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB, help="largest upload accepted, in MB"
    )
    add_model_args(parser)
    parser.add_argument(
        "--fast-t2i-model",
        default=None,
        metavar="MODEL",
        help="a second, rectified-flow text-to-image model (e.g. XCLiu/instaflow_0_9B_from_sd_1_5) offered beside "
        '--t2i-model as "InstaFlow (fastest)"; it shares the 3D stages (smoke mode: a tiny one)',
    )
    return parser


def check_fast_t2i(args: argparse.Namespace) -> None:
    """Check ``--fast-t2i-model`` from its ``model_index.json`` alone, before any model loads (smoke mode: nothing
    to check, its tiny model is used).

    Raises:
        BadInputError: the model is not a rectified-flow one (a PeRFlow model is what --t2i-model loads).
        MissingWeightsError: the model is not available (exit 3).
    """
    from .cli_common import smoke_requested
    from .errors import BadInputError
    from .rectified_flow import kind_of_model

    model = args.fast_t2i_model
    if model is None or smoke_requested(args.tiny):
        return
    if kind_of_model(model, local_files_only=True if args.local_files_only else None) != "rectified_flow":
        raise BadInputError(
            f"--fast-t2i-model {model} is not a rectified-flow model (its model_index.json names no "
            "RectifiedFlowPipeline); give InstaFlow (XCLiu/instaflow_0_9B_from_sd_1_5), or load it with --t2i-model."
        )


def load_fast_t2i(args: argparse.Namespace, chain: Any) -> Any:
    """`chain` with ``--fast-t2i-model``'s text-to-image stage (`with_text_to_image`; checked by `check_fast_t2i`)."""
    from .chain import TextTo3D
    from .cli_common import load_chain, smoke_requested
    from .text_to_image import TextToImage

    if smoke_requested(args.tiny):  # smoke mode: the tiny InstaFlow-like model
        t2i = TextToImage.tiny(kind="rectified_flow")
        fast = TextTo3D(t2i, device=chain.device, dtype=chain.dtype, smoke=True, model_ids={"t2i_model": "tiny"})
        return with_text_to_image(chain, fast)
    model = args.fast_t2i_model
    fast_args = argparse.Namespace(**{**vars(args), "t2i_model": model, "t2i_delta": None})
    return with_text_to_image(chain, load_chain(fast_args, ("text_to_image",)))


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """``"user:password"`` → ``("user", "password")`` (the password may contain ':'); None stays None.

    Raises:
        BadInputError: no ':' or an empty user or password.
    """
    from .errors import BadInputError

    if text is None:
        return None
    user, colon, password = text.partition(":")
    if not colon or not user.strip() or not password:
        raise BadInputError("--auth must be USER:PASSWORD with a non-empty user and password.")
    return user.strip(), password


def check_flags(args: argparse.Namespace) -> tuple[str, str] | None:
    """Check the flags before any model loads; return the login (or None). Warnings go to stderr.

    Raises:
        BadInputError: ``--share`` without a login (unless ``--i-know``), a bad ``--auth``, or limits out of range.
    """
    from .errors import BadInputError

    auth = parse_auth(args.auth if args.auth is not None else os.environ.get(AUTH_ENV) or None)
    if args.share and auth is None:
        if not args.i_know:
            raise BadInputError(
                "--share publishes the app on a public gradio.live link: anyone who has it can run generations on "
                f"this machine. Add a login with --auth USER:PASSWORD (or ${AUTH_ENV}), or pass --i-know to share "
                "without one."
            )
        print(
            "warning: sharing a public link WITHOUT a login (--i-know): anyone with it can use the app.",
            file=sys.stderr,
        )
    if auth is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"warning: serving on {args.host} without a login: anyone who can reach this address can use the app. "
            "Add --auth USER:PASSWORD to require one.",
            file=sys.stderr,
        )
    if args.keep_requests < 1 or not args.keep_hours > 0 or not args.max_upload_mb > 0:
        raise BadInputError("--keep-requests must be at least 1, --keep-hours and --max-upload-mb more than 0.")
    return auth


def launch_options(args: argparse.Namespace, auth: tuple[str, str] | None, output_root: Path) -> dict[str, Any]:
    """The keyword arguments of ``demo.launch`` for the parsed flags."""
    return {
        "server_name": args.host,
        "server_port": args.port,
        "share": args.share,
        "auth": auth,
        "max_file_size": int(args.max_upload_mb * 1024 * 1024),
        "show_error": True,
        "allowed_paths": [str(output_root)],
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Check the flags, load the models (or the smoke-mode ones), and serve until interrupted.

    Errors (bad flags, missing weights) print one ``t2mv app: error: ...`` line and exit with the project's codes
    (2 bad input, 3 missing weights, 4 out of memory, 1 anything else), before any model loads where possible.
    """
    # No analytics or telemetry unless the user asked for them; set before gradio is first imported.
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    from .cli_common import load_chain
    from .errors import describe, exit_code

    try:
        auth = check_flags(args)
        check_fast_t2i(args)
        chain = load_chain(args, ("text_to_image", "multiview", "mesh"))
        more_t2i = [load_fast_t2i(args, chain)] if args.fast_t2i_model else []
    except Exception as e:  # bad flags; missing weights: the message names the repo, the fixes and smoke mode
        if getattr(args, "debug", False):
            raise
        print(f"{parser.prog}: error: {describe(e)}", file=sys.stderr)
        raise SystemExit(exit_code(e)) from None
    try:  # u2net now, not in the first request; without it the app still serves cut-outs
        chain.rembg_session  # noqa: B018
    except Exception as e:
        print(
            f"warning: {describe(e)} Until then only uploads with a transparent background, or requests with "
            "'Remove background' off, can be made.",
            file=sys.stderr,
        )
    for extra in more_t2i:  # one u2net session for every text-to-image choice (copied before it was loaded)
        extra._rembg_session = chain._rembg_session
    demo = build_demo(
        chain,
        output_dir=args.output,
        keep_requests=args.keep_requests,
        keep_hours=args.keep_hours,
        more_t2i=more_t2i,
    )
    demo.launch(**launch_options(args, auth, demo.t2mv_output_root))
    return 0
