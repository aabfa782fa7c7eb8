"""ChainResult: everything one run produced, how long each stage took and how much memory it used; its files.

Each stage's files are written by the stage itself (`t2mv.chain.stages`, ``Stage.write``); the run's record
(``settings.json``, ``timings.json``, ``info.json``) is written here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image

from ..inputs import write_text
from .files import FAILED_MARKER, check_mesh_formats, to_json
from .stages import stage_files

# The stages `ChainResult.save` writes, in order (``record``: the settings, timings and info files).
SAVED_STAGES = ("candidates", "input", "upscale", "preprocess", "multiview", "mesh", "turntable", "record")


class StageRow(NamedTuple):
    """One line of the timings summary (the app's table, the command line's summary)."""

    stage: str
    seconds: float
    gpu_peak: float | None  # GiB, CUDA only
    host_rss: float | None  # GiB after the stage (for ``total``: the process's peak)


@dataclass
class ChainResult:
    """Everything one run produced, plus how long each stage took and how much memory it used.

    Attributes:
        image: the text-to-image output, or the given input image (RGB or RGBA).
        mv_input: the multiview condition (RGB 256², white background), None when the stage did not run.
        mesh_input: the TripoSR condition (RGB 512², grey background), None when the stage did not run.
        normals, colors: six PIL images each, in the order of `view_names` (empty when the stage did not run).
        mesh: a `trimesh.Trimesh` in the glTF frame (+Y up, front +Z), None when the stage did not run.
        timings: seconds per stage (``text_to_image``, ``preprocess``, ``multiview``, ``mesh``, ``texture``,
            ``total``) and the stages' own finer timings (``multiview.denoise``, ...).
        memory: GiB, per stage: ``<stage>.gpu_peak`` (torch.cuda.max_memory_allocated, CUDA only) and
            ``<stage>.host_rss`` (resident set size after the stage), and ``host_peak_rss`` for the process.
        settings: everything needed to reproduce the run (prompt, seed, steps, models, device, versions).
        warnings: messages for the user (e.g. a prompt longer than CLIP's 77 tokens was truncated).
        finished: the stages that finished, in order (``text_to_image``/``input``, ``preprocess``, ...).
        field_mesh: the mesh with TripoSR's field colours (vertex colours), kept beside a views-textured `mesh`
            for comparison (None otherwise).
        info: what the view stages measured: ``view_texture`` (coverage, per-view silhouette IoU and share,
            the fitted camera, texture source used) and ``refine`` (accepted, losses summary, timings).
        plan: the timed stages planned for the run, in order (the progress bar's steps, the timings table's rows).
        candidates: the images of a best-of-N run (``candidate_<k>.png``; empty for one image), `candidate_scores`
            their 3D-suitability scores (`t2mv.candidates.CandidateScore.to_dict`), `chosen` the index of `image`.
        turntable: the turntable video's frames (T, H, W, 3) uint8 (``turntable.mp4``), None when not asked for.
    """

    image: Image.Image | None = None
    mv_input: Image.Image | None = None
    mesh_input: Image.Image | None = None
    normals: list[Image.Image] = field(default_factory=list)
    colors: list[Image.Image] = field(default_factory=list)
    mesh: Any = None
    view_names: tuple[str, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    field_mesh: Any = None
    info: dict[str, Any] = field(default_factory=dict)
    plan: list[str] = field(default_factory=list)
    image_upscaled: Image.Image | None = None  # the PeRFlow-Refiner's --upscale version (image_<side>.png)
    candidates: list[Image.Image] = field(default_factory=list)
    candidate_scores: list[dict[str, Any]] = field(default_factory=list)
    chosen: int | None = None
    turntable: Any = None

    def save_stage(
        self, stage: str, folder: str | os.PathLike, *, mesh_formats: Sequence[str] = ("glb",)
    ) -> dict[str, Path]:
        """Write one finished stage's files into `folder` (created), each atomically; return {name: path}.

        Stages and their files: ``text_to_image`` / ``input``: ``image.png``; ``preprocess``: ``mv_input.png``,
        ``mesh_input.png``; ``multiview``: ``normal_<i>_<view>.png``, ``color_<i>_<view>.png`` and the strips
        ``normals.png`` / ``colors.png``; ``mesh`` / ``refine`` / ``texture``: ``mesh.<fmt>`` for each of
        `mesh_formats` (``.obj`` also writes ``.mtl`` and the texture when textured), and with a views texture
        ``mesh_field.glb`` (the field-coloured mesh, for comparison); ``record``: ``settings.json`` (deterministic:
        same settings, same file), ``timings.json`` and ``info.json`` (coverage, per-view IoU, camera, refinement
        losses). The files of a stage are its class's ``write`` (`t2mv.chain.stages`).
        """
        folder = Path(folder)
        if stage != "record":
            return stage_files(stage, self, folder, mesh_formats)
        paths = {"settings": write_text(to_json(self.settings), folder / "settings.json")}
        record = {"timings": self.timings, "memory": self.memory, "warnings": self.warnings}
        paths["timings"] = write_text(to_json(record), folder / "timings.json")
        if self.info:
            paths["info"] = write_text(to_json(self.info), folder / "info.json")
        return paths

    def save(self, folder: str | os.PathLike, *, mesh_formats: Sequence[str] = ("glb",)) -> dict[str, Path]:
        """Write the whole result into `folder` (created) and return {name: path} (see `save_stage` for the files).

        A ``FAILED.json`` left in `folder` by an earlier failed run is removed: the folder is now complete.
        """
        check_mesh_formats(mesh_formats)
        paths: dict[str, Path] = {}
        for stage in SAVED_STAGES:
            paths.update(self.save_stage(stage, folder, mesh_formats=mesh_formats))
        (Path(folder) / FAILED_MARKER).unlink(missing_ok=True)
        return paths

    def stage_rows(self) -> list[StageRow]:
        """One row per planned stage that ran, in plan order, then ``total`` (when the run ended): the one source of
        the app's timings table and the command line's summary. A stage's finer timings (``multiview.denoise``)
        are left out."""
        if self.plan:
            names = [name for name in self.plan if name in self.timings]
        else:  # a result built by hand (no plan): its stage timings in the order they were recorded
            names = [name for name in self.timings if "." not in name and name != "total"]
        names += ["total"] if "total" in self.timings else []
        return [
            StageRow(
                name,
                self.timings[name],
                self.memory.get(f"{name}.gpu_peak"),
                self.memory.get("host_peak_rss") if name == "total" else self.memory.get(f"{name}.host_rss"),
            )
            for name in names
        ]


def run_record(
    settings: Any,
    plan: Sequence[Any],
    prompt: str | None,
    negative_prompt: str | None,
    use_rembg: bool,
    chain: dict[str, Any],
) -> dict[str, Any]:
    """``settings.json``: the request (`prompt` None for an image), the `GenerationSettings`, what the `plan` does
    (object mask, texture source, refinement, the models' stages) and `chain` (models, device, versions)."""
    names = [stage.name for stage in plan]
    listed = [name for stage in plan for name in stage.listed]  # the models' stages and the refinement
    texture = next((getattr(stage, "source", None) for stage in plan if stage.name == "texture"), None)
    if "preprocess" in names and settings.remove_background and not use_rembg:
        object_mask = "input alpha"  # the cut-out the user gave; rembg did not run
    else:
        object_mask = "rembg u2net" if use_rembg else "none (whole image)"
    return {
        "prompt": None if prompt is None else str(prompt),
        "negative_prompt": negative_prompt if prompt is not None else None,
        "input": "text" if prompt is not None else "image",
        **settings.to_dict(),
        "remove_background": use_rembg,  # what happened: False when the input's alpha was used
        "object_mask": object_mask,
        "simplify_faces": settings.simplify_faces or None,
        "bake_texture": texture == "field",
        "texture_source": ("views" if texture == "views" else "field") if "mesh" in names else None,
        "refine": "refine" in listed,
        "stages": listed,
        **chain,
    }
