"""The chain's stages, one small class each: what a stage needs from the result, what it adds, how it runs, and the
files it writes.

A stage is data (its per-request options) plus `run(ctx, model)`. The runner (`t2mv.chain.runner`) does everything
else for every stage alike (progress, timings, memory, files, the failure marker, loading and freeing its model), so
adding a stage is adding one class here (it registers itself by its `name`) and one line in the chain's plan.

Fields named in ``needs``/``adds`` are `ChainResult` attributes; `check_plan` refuses a plan where a stage needs
something no earlier stage adds. ``model`` names the chain's model slot a stage runs with (``text_to_image``,
``multiview``, ``mesh``): consecutive stages with the same slot share one load (low-memory mode) or one move to the
device (offload), so TripoSR stays on the device from the mesh through the texture.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from ..inputs import write_image
from ..settings import GenerationSettings
from .files import check_mesh_formats, horizontal_strip, view_file, write_candidates

Files = dict[str, Path]
STAGE_TYPES: dict[str, type[Stage]] = {}  # name → class, filled by Stage.__init_subclass__


@dataclass
class StageContext:
    """What every stage of one run shares.

    Attributes:
        result: the `ChainResult` being filled (stages read their ``needs`` from it and write their ``adds``).
        settings: the run's validated `GenerationSettings`.
        device: where the models run.
        session: the rembg session (None when no background removal runs).
        multiview_size: the multiview stage's input side (256 for Wonder3D).
        scratch: what a stage hands a later one without keeping it in the result (TripoSR's scene code).
    """

    result: Any
    settings: GenerationSettings
    device: torch.device
    session: Any = None
    multiview_size: int | None = None
    scratch: dict[str, Any] = field(default_factory=dict)


class Stage:
    """One step of the chain. Subclasses set the class attributes and implement `run` (and `write` for files).

    Attributes:
        name: the stage's name: the key of its timings/memory, of ``FAILED.json``'s ``failed_stage``, and of
            `ChainResult.save_stage`.
        model: the model slot it runs with, or None for a stage without weights (preprocess).
        needs: result fields that must be set before it runs.
        adds: result fields it sets.
        timed: shown in progress and timed (False only for the given input image, which runs no code).
        listed: the names it adds to ``settings.json``'s ``stages`` (the models' stages and the refinement).
    """

    name: ClassVar[str] = ""
    model: ClassVar[str | None] = None
    needs: ClassVar[tuple[str, ...]] = ()
    adds: ClassVar[tuple[str, ...]] = ()
    timed: ClassVar[bool] = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            STAGE_TYPES[cls.name] = cls

    @property
    def label(self) -> str:
        """The stage's name as the progress bar shows it."""
        return self.name.replace("_", " ")

    @property
    def listed(self) -> tuple[str, ...]:
        """The names it adds to ``settings.json``'s ``stages`` (the models' stages and the refinement)."""
        return (self.name,) if self.timed else ()

    def run(self, ctx: StageContext, model: Any) -> None:
        """Run on ``ctx.result`` with `model` (the slot's stage on the device; None when `model` is None)."""

    @staticmethod
    def write(result: Any, folder: Path, mesh_formats: Sequence[str]) -> Files:
        """Write this stage's files of `result` into `folder`, each atomically; return {name: path}."""
        return {}


def check_plan(plan: Sequence[Stage], given: Sequence[str] = ()) -> None:
    """Raise ValueError when a stage needs a result field that neither `given` nor an earlier stage provides."""
    have = set(given)
    for stage in plan:
        missing = [need for need in stage.needs if need not in have]
        if missing:
            raise ValueError(f"the {stage.name} stage needs {', '.join(missing)}, which no earlier stage adds")
        have.update(stage.adds)


def stage_files(name: str, result: Any, folder: str | os.PathLike, mesh_formats: Sequence[str]) -> Files:
    """The files of the stage called `name` (``{}`` for a name without files)."""
    stage = STAGE_TYPES.get(name)
    return {} if stage is None else stage.write(result, Path(folder), mesh_formats)


def _write_image(result: Any, folder: Path, mesh_formats: Sequence[str]) -> Files:
    return {} if result.image is None else {"image": write_image(result.image, folder / "image.png")}


def _write_mesh(result: Any, folder: Path, mesh_formats: Sequence[str], *, field_mesh: bool = False) -> Files:
    """``mesh.<fmt>`` per format (``.obj`` also writes ``.mtl`` and the texture), and ``mesh_field.glb``."""
    if result.mesh is None:
        return {}
    from triposr.export import export_mesh

    folder.mkdir(parents=True, exist_ok=True)
    paths: Files = {}
    for fmt in check_mesh_formats(mesh_formats):
        for written in export_mesh(result.mesh, folder / f"mesh.{fmt}"):  # atomic; .obj also .mtl (+ .png)
            paths[written.name] = written
    if field_mesh and result.field_mesh is not None:
        for written in export_mesh(result.field_mesh, folder / "mesh_field.glb"):
            paths[written.name] = written
    return paths


# ------------------------------------------------------------------------------------------------ the stages
@dataclass
class InputImage(Stage):
    """The image the user gave instead of a prompt: nothing to run, ``image.png`` to write."""

    name: ClassVar[str] = "input"
    adds: ClassVar[tuple[str, ...]] = ("image",)
    timed: ClassVar[bool] = False
    write = staticmethod(_write_image)


@dataclass
class TextToImageStage(Stage):
    """Prompt → image (PeRFlow SD1.5), seeded from its own CPU generator. With `count` > 1: that many candidates in
    one batched call, seeds seed, seed+1, … (one generator each, so candidate k is the image seed + k makes alone);
    `extra_stages.Choose` then picks the image."""

    prompt: str = ""
    negative_prompt: str | None = None
    count: int = 1
    name: ClassVar[str] = "text_to_image"
    model: ClassVar[str | None] = "text_to_image"

    @property
    def adds(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("candidates",) if self.count > 1 else ("image",)

    @staticmethod
    def write(result: Any, folder: Path, mesh_formats: Sequence[str]) -> Files:
        """``image.png``, or ``candidate_<k>.png`` for each of several candidates."""
        return {**write_candidates(result, folder, mesh_formats), **_write_image(result, folder, mesh_formats)}

    def run(self, ctx: StageContext, model: Any) -> None:
        from ..candidates import candidate_generators

        settings, result = ctx.settings, ctx.result
        out = model(
            self.prompt,
            negative_prompt=self.negative_prompt,
            num_inference_steps=settings.t2i_steps,
            guidance_scale=settings.t2i_guidance,
            height=settings.height,
            width=settings.width,
            num_images_per_prompt=self.count,
            generator=candidate_generators(settings.seed, self.count),
        )
        if self.count > 1:
            result.candidates = list(out.images)
        else:
            result.image = out.images[0]
        result.warnings += list(getattr(out, "warnings", []))
        result.timings.update({f"text_to_image.{k}": v for k, v in getattr(out, "timings", {}).items()})


@dataclass
class Preprocess(Stage):
    """The image → each model's condition (one rembg pass, shared through the chain's memo session)."""

    multiview: bool = True
    mesh: bool = True
    name: ClassVar[str] = "preprocess"
    needs: ClassVar[tuple[str, ...]] = ("image",)
    listed: ClassVar[tuple[str, ...]] = ()

    @property
    def adds(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("mv_input",) * self.multiview + ("mesh_input",) * self.mesh

    def run(self, ctx: StageContext, model: Any) -> None:
        settings, result = ctx.settings, ctx.result
        if self.multiview:
            from wonder3d_perflow.preprocess import preprocess_image as multiview_preprocess

            result.mv_input = multiview_preprocess(
                result.image,
                session=ctx.session,
                remove_background=settings.remove_background,
                size=ctx.multiview_size,
                mode=settings.mv_preprocess,
                foreground_ratio=settings.mv_foreground_ratio,
            )
        if self.mesh:
            from triposr.preprocess import preprocess_image as mesh_preprocess

            result.mesh_input = mesh_preprocess(
                result.image,
                session=ctx.session,
                remove_background=settings.remove_background,
                foreground_ratio=settings.mesh_foreground_ratio,
            )

    @staticmethod
    def write(result: Any, folder: Path, mesh_formats: Sequence[str]) -> Files:
        images = {"mv_input": result.mv_input, "mesh_input": result.mesh_input}
        return {
            name: write_image(image, folder / f"{name}.png") for name, image in images.items() if image is not None
        }


@dataclass
class Multiview(Stage):
    """The multiview condition → six normals + six colours (Wonder3D + PeRFlow)."""

    name: ClassVar[str] = "multiview"
    model: ClassVar[str | None] = "multiview"
    needs: ClassVar[tuple[str, ...]] = ("mv_input",)
    adds: ClassVar[tuple[str, ...]] = ("normals", "colors", "view_names")

    def run(self, ctx: StageContext, model: Any) -> None:
        settings, result = ctx.settings, ctx.result
        out = model(
            result.mv_input,
            num_inference_steps=settings.mv_steps,
            guidance_scale=settings.mv_guidance,
            generator=torch.Generator("cpu").manual_seed(settings.seed),
        )
        result.normals, result.colors = list(out.normals), list(out.colors)
        result.view_names = tuple(out.view_names)
        result.timings.update({f"multiview.{k}": v for k, v in getattr(out, "timings", {}).items()})

    @staticmethod
    def write(result: Any, folder: Path, mesh_formats: Sequence[str]) -> Files:
        """``normal_<i>_<view>.png``, ``color_<i>_<view>.png`` and the strips ``normals.png`` / ``colors.png``."""
        paths: Files = {}
        for kind, views in (("normal", result.normals), ("color", result.colors)):
            for i, (view, name) in enumerate(zip(views, result.view_names)):
                paths[f"{kind}_{i}_{name}"] = write_image(view, folder / view_file(kind, i, name))
            if views:
                paths[f"{kind}s"] = write_image(horizontal_strip(views), folder / f"{kind}s.png")
        return paths


@dataclass
class Mesh(Stage):
    """The mesh condition → TripoSR scene code → marching-cubes mesh (+ floaters dropped, simplification),
    field-coloured."""

    name: ClassVar[str] = "mesh"
    model: ClassVar[str | None] = "mesh"
    needs: ClassVar[tuple[str, ...]] = ("mesh_input",)
    adds: ClassVar[tuple[str, ...]] = ("mesh",)
    write = staticmethod(_write_mesh)

    def run(self, ctx: StageContext, model: Any) -> None:
        settings = ctx.settings
        scene_codes = model([ctx.result.mesh_input], device=ctx.device)  # (1, 3, C, H, W)
        mesh = model.extract_mesh(scene_codes, resolution=settings.mc_resolution, threshold=settings.mc_threshold)[0]
        if settings.keep_largest:
            from triposr.mesh import keep_largest_component

            mesh = keep_largest_component(mesh)
        if settings.simplify_faces:
            from triposr.mesh import simplify

            mesh = simplify(mesh, settings.simplify_faces)
        ctx.result.mesh = mesh
        ctx.scratch["scene_code"] = scene_codes[0]  # (3, C, H, W): the texture stage's fallback colours


def _write_textured(result: Any, folder: Path, mesh_formats: Sequence[str]) -> Files:
    return _write_mesh(result, folder, mesh_formats, field_mesh=True)


@dataclass
class Texture(Stage):
    """Colour the mesh: from the six views (``source="views"``: `t2mv.views_to_mesh.views_to_mesh`, after the
    optional refinement of the shape against the normal maps, with TripoSR's colour field where no view sees the
    surface) or TripoSR's field baked into a UV texture (``source="field"``).

    Runs in the ``mesh`` slot: TripoSR stays loaded for the field colours. Views that cannot be aligned degrade to
    the field's colours with a warning (baked when ``bake_texture``): the mesh and the views are kept either way.
    With a views texture the field-coloured mesh is kept as ``ChainResult.field_mesh`` (``mesh_field.glb``).
    """

    source: str = "views"
    refine: bool = False
    name: ClassVar[str] = "texture"
    model: ClassVar[str | None] = "mesh"
    adds: ClassVar[tuple[str, ...]] = ("mesh",)
    write = staticmethod(_write_textured)

    @property
    def needs(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("mesh", "colors", "normals", "view_names") if self.source == "views" else ("mesh",)

    @property
    def label(self) -> str:
        return "views → mesh (refine + texture)" if self.refine else "texture"

    @property
    def listed(self) -> tuple[str, ...]:  # type: ignore[override]
        return ("refine",) if self.refine else ()  # settings.json has named the refinement, never the texture

    def run(self, ctx: StageContext, model: Any) -> None:
        from triposr.texture import bake_texture

        settings, result, scene_code = ctx.settings, ctx.result, ctx.scratch["scene_code"]
        if self.source == "field":
            result.mesh = bake_texture(model, scene_code, result.mesh, texture_size=settings.texture_size)
            return
        with torch.no_grad():
            self._from_views(ctx, model, scene_code)

    def _from_views(self, ctx: StageContext, model: Any, scene_code: torch.Tensor) -> None:
        from triposr.mesh import scene_code_query_fn
        from triposr.texture import bake_texture, field_color_fn

        from ..views_to_mesh import views_to_mesh

        settings, result = ctx.settings, ctx.result
        out = views_to_mesh(
            result.mesh,
            result.colors,
            result.normals,
            refine=self.refine,
            fallback=field_color_fn(scene_code_query_fn(model, scene_code)),
            texture_size=settings.texture_size,
            device=ctx.device,
            iterations=settings.refine_iterations,
            seed=settings.seed,
            simplify_faces=settings.simplify_faces,  # the refinement remeshes: --simplify holds after it too
        )
        result.warnings += out.warnings
        if self.refine:
            _record_refine(result, out)
        if out.texture is None:  # the views could not be aligned: the (refined) shape keeps the field's colours
            error = next((w for w in out.warnings if "could not texture" in w), "the views could not be aligned")
            result.info["view_texture"] = {"texture_source": "field", "error": error}
            result.settings["texture_source"] = "field"
            result.mesh = out.mesh
            if settings.bake_texture:
                result.mesh = bake_texture(model, scene_code, out.mesh, texture_size=settings.texture_size)
            return
        textured = out.texture
        # The field-coloured mesh to compare with: the shape the texture was made for, with TripoSR's colours.
        result.field_mesh = out.shape
        result.mesh = out.mesh
        result.info["view_texture"] = {
            "texture_source": "views",
            "coverage": textured.coverage,
            "view_iou": dict(zip(result.view_names, textured.view_iou)),
            "view_agreement": dict(zip(result.view_names, textured.view_agreement)),
            "view_share": dict(zip(result.view_names, textured.view_share)),
            "camera": {"scale": textured.camera.scale, "center": list(textured.camera.center)},
        }
        result.timings.update({f"texture.{k}": v for k, v in out.timings.items() if k not in _REFINE_STEPS})


_REFINE_STEPS = ("fit", "parts", "refine", "simplify")  # views_to_mesh's timings that belong to the refinement


def _record_refine(result: Any, out: Any) -> None:
    """The refinement's part of a `ViewsToMesh` in the result: ``info["refine"]``, its timings (``refine``, then
    ``refine.<step>``, before the stage's own ``texture`` time, which includes it)."""
    refined = out.refine
    result.timings["refine"] = sum(out.timings.get(k, 0.0) for k in _REFINE_STEPS)
    if refined is None:  # the views could not be aligned for the fit: TripoSR's shape stays
        error = next((w for w in out.warnings if w.startswith("Refinement skipped")), "refinement did not run")
        result.info["refine"] = {"accepted": False, "error": error}
        return
    history = refined.losses.get("history")
    result.info["refine"] = {
        "accepted": refined.accepted,
        "losses": {k: v for k, v in refined.losses.items() if k != "history"},
        # info.json keeps the first and last loss, not every iteration
        "loss_first_last": None if not history else [float(history[0]), float(history[-1])],
        "timings": refined.timings,
        # parts every view shows and TripoSR's mesh lacked, added before the fit (kept only with an accepted fit)
        "parts_added": 0 if out.parts is None or not refined.accepted else out.parts.parts,
        # the faces textured: the refinement's own, or --simplify's after it
        "faces": None if not refined.accepted else len(out.shape.faces),
    }
    result.timings.update({f"refine.{k}": v for k, v in refined.timings.items()})
