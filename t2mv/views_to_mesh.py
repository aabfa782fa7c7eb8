"""The one place where Wonder3D's six views meet TripoSR's mesh: masks → registration → [refinement] → texture.

`views_to_mesh` is what the chain's views stage, the quality benchmark and the tests call. It takes the six colour
and six normal images exactly as the multiview stage returns them and derives everything else itself:

1. masks (`view_texture.object_masks`): the object's silhouette from the normal maps and the colour views together
   (a white object keeps its mask: its normal map is not white), holes filled; the colour views' own silhouettes
   for the texture's edge falloff (they may sit a pixel or two off the normal maps').
2. registration (`view_texture.fit_camera`): one scale and 3-D centre for the six views, plus a small bounded
   per-view 2-D correction (shift, scale), fitted to the mesh's silhouettes.
3. optional refinement (`view_refine.refine_mesh`) of the vertices against the normal maps; the camera is then
   re-fitted on the refined mesh, whose silhouettes are truer than the start's (a smooth start against a boxy
   object biases the first fit's scale).
4. texture (`view_texture.texture_from_views`): colour harmonisation across views, then blending; TripoSR's colour
   field (`fallback`), its colours matched to the views', where no view sees the surface.

Views that cannot be aligned with the mesh do not fail the run: the mesh keeps its own colours, `texture` is None
and a warning says why. Only malformed inputs (wrong count, sizes, options) raise ValueError.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
import trimesh
from PIL import Image

from .view_parts import MissingParts, add_missing_parts
from .view_refine import RefineResult, refine_mesh
from .view_texture import (
    AGREEMENT_PX,
    MIN_MASK_PIXELS,
    MIN_MEAN_AGREEMENT,
    ViewCamera,
    ViewMasks,
    ViewTexture,
    ViewTextureError,
    check_views,
    fit_camera,
    object_masks,
    texture_from_views,
)


@dataclass(frozen=True)
class ViewsToMeshOptions:
    """The stage's tuning knobs (`views_to_mesh(**options)`); the defaults are the chain's."""

    iterations: int = 200  # refinement steps
    seed: int = 0  # recorded by the refiner (its method draws no random numbers)
    atlas: str = "projection"  # "projection" (fast) or "xatlas" (fewer seams, slow)
    harmonize: bool = True  # per-view colour gain/bias solved across the views before blending
    view_corrections: bool = True  # per-view 2-D zoom/shift on top of the shared camera
    match_fallback: bool = True  # the fallback's colours mapped onto the views' before it colours unseen surface
    restore_parts: bool = True  # with refine: parts all views show and the mesh lacks are added before the fit
    # With refine: an accepted result (remeshed at 2 px: 30-60k faces) decimated to about this many faces before it
    # is textured, so the chain's --simplify holds with --refine too; 0: as refined.
    simplify_faces: int = 0
    refine_options: dict[str, Any] = field(default_factory=dict)  # passed on to `refine_mesh`

    @classmethod
    def from_kwargs(cls, options: dict[str, Any]) -> ViewsToMeshOptions:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown views_to_mesh option(s) {unknown}; known: {sorted(known)}")
        out = cls(**options)
        if out.iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {out.iterations}")
        if out.atlas not in ("projection", "xatlas"):
            raise ValueError(f"atlas must be 'projection' or 'xatlas', got {out.atlas!r}")
        if out.simplify_faces < 0 or 0 < out.simplify_faces < 4:
            raise ValueError(f"simplify_faces must be 0 (keep all) or >= 4, got {out.simplify_faces}")
        return out


@dataclass
class ViewsToMesh:
    """Result of `views_to_mesh`.

    mesh: the textured mesh (refined when asked and accepted); the input geometry with its own colours when the
    views could not texture it. texture: the `ViewTexture` (camera, coverage, per-view fit) or None. refine: the
    `RefineResult` or None when refinement was not asked for or could not run. parts: what `view_parts` found and the
    refinement started from (None without refinement; its parts are in `mesh` only when the fit was accepted).
    masks: the masks used. camera: the
    registration the texture used (the re-fitted one after refinement), None when the views could not be aligned.
    shape: the geometry that was textured, with its own vertex colours (the input, or the accepted refinement,
    decimated to `simplify_faces` when asked). warnings: what degraded and why. timings: seconds per step ("masks",
    "fit", "refine", "simplify", "texture", "total").
    """

    mesh: trimesh.Trimesh
    texture: ViewTexture | None
    refine: RefineResult | None
    masks: ViewMasks
    camera: ViewCamera | None = None
    parts: MissingParts | None = None
    shape: trimesh.Trimesh | None = None
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def _refine(
    mesh: trimesh.Trimesh,
    colors: Sequence[Image.Image],
    normals: Sequence[Image.Image],
    masks: ViewMasks,
    opts: ViewsToMeshOptions,
    device: torch.device,
    result: ViewsToMesh,
) -> trimesh.Trimesh:
    """Fit the camera to the normal maps' silhouettes, refine the vertices; return the mesh to texture."""
    t = time.perf_counter()
    try:
        camera, _, agreement = fit_camera(mesh, masks.object, device=device, view_corrections=opts.view_corrections)
    except ViewTextureError as e:
        result.warnings.append(f"Refinement skipped: {e}")
        result.timings["fit"] = time.perf_counter() - t
        return mesh
    agree = [x for x, m in zip(agreement, masks.object) if int(m.sum()) >= MIN_MASK_PIXELS]  # the fit's views
    result.timings["fit"] = time.perf_counter() - t
    if not agree or sum(agree) / len(agree) < MIN_MEAN_AGREEMENT:
        mean = sum(agree) / max(len(agree), 1)
        result.warnings.append(
            "Refinement skipped: the mesh's silhouettes do not match the normal maps (mean agreement within "
            f"{AGREEMENT_PX} px {mean:.2f})"
        )
        return mesh
    start = mesh
    if opts.restore_parts:  # what TripoSR's smooth field lost (a thin part) has no surface for the fit to move
        t = time.perf_counter()
        start, result.parts = add_missing_parts(mesh, masks.object, camera)
        result.timings["parts"] = time.perf_counter() - t
        if result.parts.note:
            result.warnings.append(f"Refinement: no missing part added: {result.parts.note}")
    t = time.perf_counter()
    with torch.enable_grad():  # the refiner optimises; a no_grad caller must not break it
        refined = refine_mesh(
            start,
            normals,
            masks.object.float(),
            camera,
            colors=colors,
            iterations=opts.iterations,
            device=device,
            seed=opts.seed,
            **opts.refine_options,
        )
    result.timings["refine"] = time.perf_counter() - t
    result.refine = refined
    result.warnings += [f"Refinement: {w}" for w in refined.warnings]
    if result.parts is not None and result.parts.parts and refined.accepted:
        result.warnings.append(
            f"Refinement: {result.parts.parts} part(s) that every view shows and the mesh lacked (smoothed away)"
            " were added"
        )
    if not refined.accepted:
        return mesh  # a rejected fit drops the added parts too
    if opts.simplify_faces and len(refined.mesh.faces) > opts.simplify_faces:
        from triposr.mesh import simplify

        t = time.perf_counter()
        shaped = simplify(refined.mesh, opts.simplify_faces)  # quadric: the fitted creases kept, colours carried
        result.timings["simplify"] = time.perf_counter() - t
        return shaped
    return refined.mesh


def views_to_mesh(
    mesh: trimesh.Trimesh,
    colors: Sequence[Image.Image],
    normals: Sequence[Image.Image],
    *,
    refine: bool = False,
    fallback: Callable[[torch.Tensor], torch.Tensor] | None = None,
    texture_size: int = 1024,
    device: torch.device | str | None = None,
    **options: Any,
) -> ViewsToMesh:
    """Shape (optionally) and texture `mesh` from the six generated views.

    Args:
        mesh: TripoSR's mesh in the export frame (glTF, +Y up, the input view from +Z).
        colors, normals: the multiview stage's 6 + 6 PIL images in `VIEW_NAMES` order (square, one size, white
            background; normals RGB = (n + 1) / 2 in the front camera's frame).
        refine: fit the vertices to the normal maps before texturing (rejected, with a warning, when it fits worse).
        fallback: (N, 3) export-frame points -> (N, 3) colours in [0, 1] for surface no view sees (TripoSR's
            colour field, `triposr.texture.field_color_fn(...)`); None: a fill diffused from the seen surface.
        texture_size: UV texture size, 512..4096.
        device: where the tensor work runs (default CPU).
        **options: `ViewsToMeshOptions` fields (iterations, seed, atlas, harmonize, view_corrections,
            match_fallback, refine_options).

    Returns:
        `ViewsToMesh`. The views failing to align never raises: `texture` is None and the mesh keeps its colours.

    Raises:
        ValueError: malformed views (count, type, size), texture size or options; an empty mesh.
    """
    t_start = time.perf_counter()
    opts = ViewsToMeshOptions.from_kwargs(options)
    check_views(colors, normals)
    if len(mesh.faces) == 0:
        raise ValueError("cannot texture an empty mesh")
    device = torch.device("cpu") if device is None else torch.device(device)

    t = time.perf_counter()
    masks = object_masks(colors, normals)
    result = ViewsToMesh(mesh=mesh, texture=None, refine=None, masks=masks)
    result.timings["masks"] = time.perf_counter() - t

    shaped = _refine(mesh, colors, normals, masks, opts, device, result) if refine else mesh
    result.shape = shaped

    t = time.perf_counter()
    try:
        texture = texture_from_views(
            shaped,
            colors,
            masks=masks,
            texture_size=texture_size,
            fallback=fallback,
            device=device,
            atlas=opts.atlas,
            harmonize=opts.harmonize,
            view_corrections=opts.view_corrections,
            match_fallback=opts.match_fallback,
        )
    except ViewTextureError as e:
        result.mesh = shaped
        result.warnings.append(f"The views could not texture the mesh ({e}); it keeps its own colours.")
    else:
        result.mesh, result.texture, result.camera = texture.mesh, texture, texture.camera
        result.warnings += [f"View texture: {w}" for w in texture.warnings]
        result.timings.update({f"texture.{k}": v for k, v in texture.timings.items()})
    result.timings["texture"] = time.perf_counter() - t
    result.timings["total"] = time.perf_counter() - t_start
    return result
