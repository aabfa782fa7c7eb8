"""The stages around the core chain: best of N images (the given candidates, the choice) and the turntable video.

- `TextToImageStage` (in `stages`) makes ``settings.candidates`` images in one batched call; with more than one it
  adds ``candidates`` instead of ``image`` and `Choose` follows.
- `GivenCandidates`: candidates made earlier (the app's "Make 3D" from another candidate) instead of new ones.
- `Choose`: scores each candidate from its object mask (`t2mv.candidates`) and hands the best one (or
  ``settings.choose``) on as ``image``; ``info.json`` gets ``candidate_scores``, ``settings.json`` ``chosen``.
- `Turntable`: the finished mesh turning once → ``turntable.mp4`` (`t2mv.turntable`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image

from ..errors import BadInputError
from ..inputs import open_image, write_image
from ..settings import GenerationSettings
from .files import candidate_file, write_candidates  # noqa: F401  (candidate_file: re-exported)
from .stages import Files, Stage, StageContext

SMOKE_TURNTABLE_SIZE = 128  # smoke meshes are noise; the frames cost per pixel


def _write_image(result: Any, folder: Path, mesh_formats: Sequence[str]) -> Files:
    return {} if result.image is None else {"image": write_image(result.image, folder / "image.png")}


@dataclass
class GivenCandidates(Stage):
    """Candidate images from an earlier run of the same prompt: nothing to run, their files to write."""

    images: list[Image.Image] = field(default_factory=list)
    name: ClassVar[str] = "candidates"
    adds: ClassVar[tuple[str, ...]] = ("candidates",)
    timed: ClassVar[bool] = False
    write = staticmethod(write_candidates)

    def run(self, ctx: StageContext, model: Any) -> None:
        ctx.result.candidates = list(self.images)


@dataclass
class Choose(Stage):
    """Score the candidates for 3D and pass the best (or the one ``settings.choose`` names) on as the image.

    The masks come from the run's background remover (the preprocessors' own session, so the chosen image is cut
    out with the mask it was judged by); a run without background removal judges by the border-colour mask of
    `t2mv.tiny.FakeRembgSession` (no model).
    """

    name: ClassVar[str] = "choose"
    needs: ClassVar[tuple[str, ...]] = ("candidates",)
    adds: ClassVar[tuple[str, ...]] = ("image",)
    write = staticmethod(_write_image)

    def run(self, ctx: StageContext, model: Any) -> None:
        from ..candidates import candidate_seeds, choose, score_images
        from ..tiny import FakeRembgSession

        settings, result = ctx.settings, ctx.result
        scores = score_images(result.candidates, ctx.session if ctx.session is not None else FakeRembgSession())
        override = settings.choose if settings.choose >= 0 else None
        chosen = choose(scores, override)
        result.image, result.chosen = result.candidates[chosen], chosen
        result.candidate_scores = [s.to_dict() for s in scores]
        result.info["candidate_scores"] = result.candidate_scores
        result.settings["chosen"] = chosen
        result.settings["chosen_by"] = "score" if override is None else "choose"
        result.settings["candidate_seeds"] = candidate_seeds(settings.seed, len(result.candidates))


def _write_turntable(result: Any, folder: Path, mesh_formats: Sequence[str]) -> Files:
    if result.turntable is None:
        return {}
    from ..turntable import TurntableConfig, write_mp4

    return {"turntable": write_mp4(result.turntable, folder / "turntable.mp4", fps=TurntableConfig().fps)}


@dataclass
class Turntable(Stage):
    """The finished mesh turning once, rendered by the project's rasteriser on the run's device → turntable.mp4."""

    size: int = 512  # frame side (smoke mode: SMOKE_TURNTABLE_SIZE)
    name: ClassVar[str] = "turntable"
    needs: ClassVar[tuple[str, ...]] = ("mesh",)
    adds: ClassVar[tuple[str, ...]] = ("turntable",)
    write = staticmethod(_write_turntable)

    def run(self, ctx: StageContext, model: Any) -> None:
        from ..turntable import TurntableConfig, render_turntable

        started = time.perf_counter()
        out = render_turntable(ctx.result.mesh, TurntableConfig(size=self.size), device=ctx.device)
        ctx.result.turntable = out.frames  # (T, H, W, 3) uint8; encoded when the stage's files are written
        ctx.result.timings["turntable.render"] = time.perf_counter() - started


def given_candidates(
    image: Any, candidates: Sequence[Any], settings: GenerationSettings
) -> tuple[list[Image.Image], GenerationSettings]:
    """Candidates made earlier, opened and checked, and the settings with their count (``choose`` picks one of
    them; -1 scores them again). BadInputError when they do not fit the request."""
    from ..candidates import MAX_CANDIDATES

    if image is not None:
        raise BadInputError("Give either an image or the candidates made from a prompt, not both.")
    if not 1 <= len(candidates) <= MAX_CANDIDATES:
        raise BadInputError(f"Give 1 to {MAX_CANDIDATES} candidate images, got {len(candidates)}.")
    images = [open_image(c, name=f"Candidate {k}") for k, c in enumerate(candidates)]
    return images, settings.with_changes(candidates=len(images)).validate()
