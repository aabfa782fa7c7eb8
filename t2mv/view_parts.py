"""Parts the views show and the mesh lacks: carved from the six silhouettes, added as new surface.

TripoSR's field is smooth at about 1/96 of the object: a part a few pixels thin in the views (an antenna, a
handle's thin bar, a spike) can blur below its iso-level and vanish, or leave a floater the export drops. No
refinement of the vertices can bring it back: there is no surface there to move. But all six views show it.

`missing_parts` finds such parts as the voxels that
- lie inside every view's mask (the visual hull, masks dilated by `slack` pixels: the views are a pixel or two off;
  a mask over much of the picture's border, a backdrop, bounds nothing and is left out),
- and project onto mask pixels the mesh leaves uncovered in at least `min_views` views (so they are outside the
  mesh: a point inside it would be covered in every view, and a concavity the mesh already has, like a mug's
  hollow, is covered in every view too),
- in components thick enough to survive a one-voxel opening (a rim a pixel or two wide along the whole outline is
  registration, not a part) and of at least `min_volume` voxels,
and returns them as a closed surface (marching cubes of the smoothed voxels), grown back within the hull to overlap
the mesh they stem from. `add_missing_parts` unites it with the mesh (manifold3d's boolean: one watertight surface,
so the fit cannot pull the two into each other); the refinement then fits it like any other surface.

The grid is the views' own: the cameras rotate about +Y at elevation 0 (`wonder3d_perflow.cameras.view_axes`), so a
horizontal slice of the grid projects onto one image row per view, and one voxel is one pixel.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
import trimesh
from scipy import ndimage

from .view_refine import _carry_visuals
from .view_texture import NUM_VIEWS, ViewCamera, _disk, _mesh_tensors, _render_views, backdrop_views, signed_volume


@dataclass
class MissingParts:
    """What `missing_parts` found: `mesh` (export frame; None when nothing is missing), the number of `parts`,
    their `voxels` (one voxel = one view pixel³) and the number of `views` (per part) it reaches `reach` px past the
    mesh's silhouette in; `note` says why what was found is not returned."""

    mesh: trimesh.Trimesh | None
    parts: int
    voxels: list[int]
    views: list[int]
    note: str | None = None  # why parts that were found are not returned (the views disagree with the mesh)


def _dilate(masks: np.ndarray, px: int) -> np.ndarray:
    """(6, S, S) bool masks grown by px pixels (a disc)."""
    if px <= 0:
        return masks
    return np.stack([ndimage.binary_dilation(m, structure=_disk(px)) for m in masks])


def _erode(masks: np.ndarray, px: int) -> np.ndarray:
    return ~_dilate(~masks, px)


def _voxel_centres(index: np.ndarray, camera: ViewCamera) -> np.ndarray:
    """Export-frame centres (..., 3) of voxels (..., 3) (x, y, z indices): one voxel per pixel, over the cube every
    view sees (half-width 1 / scale about the camera's centre)."""
    pix, size = camera.pixel_size, camera.image_size
    return (index + 0.5) * pix - size * pix / 2 + np.asarray(camera.center, dtype=np.float64)


def _carve(
    hull_mask: np.ndarray, uncovered: np.ndarray, used: np.ndarray, camera: ViewCamera
) -> tuple[np.ndarray, np.ndarray]:
    """The visual hull (S, S, S) bool and, per voxel, how many views show its pixel uncovered (S, S, S) uint8.

    Slice by slice: the cameras rotate about +Y at elevation 0, so a voxel's column in a view does not depend on its
    height and a horizontal slice projects onto one image row per view."""
    size = camera.image_size
    axis = np.arange(size)
    xs, zs = np.meshgrid(axis, axis, indexing="ij")  # (S, S) horizontal slice
    slice_points = _voxel_centres(np.stack([xs.ravel(), np.zeros(xs.size), zs.ravel()], axis=-1), camera)  # (S², 3)
    hull = np.zeros((size, size, size), dtype=bool)  # (x, y, z)
    evidence = np.zeros((size, size, size), dtype=np.uint8)
    cols = camera.project(torch.from_numpy(slice_points))[..., 0].floor().long().numpy()  # (6, S²)
    col_ok = (cols >= 0) & (cols < size)
    cols = cols.clip(0, size - 1)
    heights = _voxel_centres(np.stack([np.zeros(size), axis, np.zeros(size)], axis=-1), camera)  # (S, 3)
    rows = camera.project(torch.from_numpy(heights))[..., 1].floor().long().numpy()  # (6, S)
    for j in range(size):
        inside = np.ones(size * size, dtype=bool)
        count = np.zeros(size * size, dtype=np.uint8)
        for k in np.flatnonzero(used):
            r = int(rows[k, j])
            if not 0 <= r < size:
                inside[:] = False
                break
            inside &= col_ok[k] & hull_mask[k, r][cols[k]]
            count += (col_ok[k] & uncovered[k, r][cols[k]]).astype(np.uint8)
        hull[:, j, :] = inside.reshape(size, size)
        evidence[:, j, :] = count.reshape(size, size)
    return hull, evidence


def _reach(labels: np.ndarray, n: int, beyond: np.ndarray, camera: ViewCamera) -> np.ndarray:
    """How far (n, 6) each of the n labelled parts reaches past the mesh's silhouette in each view, in pixels
    (`beyond`: (6, S, S) each pixel's distance from the silhouette)."""
    size = camera.image_size
    idx = np.argwhere(labels > 0)  # (M, 3) voxel indices (x, y, z)
    lab = labels[labels > 0]  # (M,) same order as argwhere
    pp = camera.project(torch.from_numpy(_voxel_centres(idx, camera)))  # (6, M, 3)
    far = np.zeros((n, NUM_VIEWS))
    for k in range(NUM_VIEWS):
        c = pp[k, :, 0].floor().long().clamp(0, size - 1).numpy()
        r = pp[k, :, 1].floor().long().clamp(0, size - 1).numpy()
        np.maximum.at(far[:, k], lab - 1, beyond[k, r, c])
    return far


def _surface(parts: np.ndarray, camera: ViewCamera) -> trimesh.Trimesh:
    """Marching cubes of the smoothed indicator (S, S, S): a smooth closed surface around the voxels' centres."""
    from skimage.measure import marching_cubes

    field = ndimage.gaussian_filter(np.pad(parts, 2).astype(np.float32), sigma=0.7)
    verts, tris, _, _ = marching_cubes(field, level=0.5)
    # Voxel (i, j, k) of the padded grid is voxel (i - 2, j - 2, k - 2) of ours.
    part_mesh = trimesh.Trimesh(_voxel_centres(verts - 2, camera), tris[:, ::-1], process=True)  # inward winding
    if part_mesh.volume < 0:
        part_mesh.invert()
    return part_mesh


def missing_parts(
    vertices: torch.Tensor,
    faces: torch.Tensor,
    masks: torch.Tensor,
    camera: ViewCamera,
    *,
    slack: int = 1,
    min_views: int = 2,
    min_volume: int = 27,
    reach: float = 8.0,
    reach_views: int = 3,
    bridge: int = 4,
    max_grid: int = 256,
    min_framed: int = 4,
    max_fraction: float = 0.1,
) -> MissingParts:
    """Find the parts the masks show and the mesh lacks (module docstring).

    Args:
        vertices, faces: (V, 3) float, (F, 3) long: the mesh in the export frame.
        masks: (6, S, S) bool or [0, 1]: the object masks (`ViewMasks.object`), `camera.image_size` = S.
        camera: the fitted cameras (`fit_camera`), per-view corrections included.
        slack: pixels the masks are grown by for the hull, and shrunk by (and the mesh's silhouettes grown by) for
            the uncovered pixels: the views' misregistration.
        min_views: a voxel counts when this many views show its pixel uncovered by the mesh.
        min_volume: smallest part kept, in voxels.
        reach, reach_views: a part is kept when it reaches at least `reach` pixels past the mesh's silhouette in at
            least `reach_views` views: the views' misregistration and a generator's grown outlines leave bands a
            pixel or two wide along the mesh's outline, which the hull keeps where they line up across views.
        bridge: voxels a part is grown by within the hull (towards the mesh it stems from).
        max_grid: larger views are area-pooled to at most this size (the voxel grid is its cube; pixel counts above
            are then in pooled pixels).
        min_framed: nothing is looked for unless at least this many views have a silhouette (a mask neither empty
            nor over much of the border ring): with fewer, the hull is a prism a part could be carved from anywhere.
        max_fraction: parts adding up to more than this fraction of the mesh's volume are not returned (`note`).
    """
    masks = masks.float()
    if camera.image_size > max_grid:  # the grid is S³ voxels: views larger than 256² are pooled to it first
        factor = -(-camera.image_size // max_grid)
        camera = replace(camera, image_size=camera.image_size // factor)
        masks = F.adaptive_avg_pool2d(masks[:, None], camera.image_size)[:, 0]
    mask = (masks > 0.5).cpu().numpy()  # (6, S, S)
    # A mask over much of the image's border ring is a backdrop taken for the object (a smoke run's noise, a kept
    # photo background), not a silhouette: it neither bounds the hull nor counts as evidence. An object the picture
    # cuts off touches less of the ring and stays (the hull ends at the picture's edge anyway).
    backdrop = backdrop_views(torch.from_numpy(mask))[0].numpy()  # (6,)
    used = (mask.reshape(NUM_VIEWS, -1).sum(-1) > 0) & ~backdrop  # (6,)
    if int(used.sum()) < min_framed:
        return MissingParts(None, 0, [], [])  # too few outlines to carve a hull from
    _, covered = _render_views(vertices.double(), faces, camera)  # (6, S, S)
    covered = covered.cpu().numpy()
    hull_mask = _dilate(mask, slack)  # (6, S, S)
    uncovered = _erode(mask, slack) & ~_dilate(covered, slack)  # (6, S, S)
    beyond = np.stack([ndimage.distance_transform_edt(~c) for c in covered])  # (6, S, S) px past the silhouette
    beyond[~used] = 0.0  # a part's reach is counted in the views that bound it only
    if int((hull_mask & (beyond >= reach)).any(axis=(1, 2)).sum()) < reach_views:
        return MissingParts(None, 0, [], [])  # nothing reaches far enough in enough views: no grid needed

    hull, evidence = _carve(hull_mask, uncovered, used, camera)  # (S, S, S) each, voxel (x, y, z)
    candidate = hull & (evidence >= min_views)
    # A rim a voxel or two thick along the outline is the views' misregistration, not a part.
    candidate = ndimage.binary_opening(candidate, structure=ndimage.generate_binary_structure(3, 1))
    labels, n = ndimage.label(candidate, structure=ndimage.generate_binary_structure(3, 3))
    if n == 0:
        return MissingParts(None, 0, [], [])
    volumes = ndimage.sum_labels(candidate, labels, index=np.arange(1, n + 1)).astype(int)  # (n,)
    far = _reach(labels, n, beyond, camera)  # (n, 6) px past the mesh's silhouette
    reached = (far >= reach).sum(-1)  # (n,)
    keep = [i + 1 for i in range(n) if volumes[i] >= min_volume and reached[i] >= reach_views]
    if not keep:
        return MissingParts(None, 0, [], [])
    parts = np.isin(labels, keep)
    views = [int(reached[i - 1]) for i in keep]
    kept = [int(volumes[i - 1]) for i in keep]
    own = abs(signed_volume(vertices, faces)) / camera.pixel_size**3  # the mesh's volume in voxels
    if sum(kept) > max_fraction * own:
        # What a smooth field loses is thin; this much "missing" means the views show another shape than the mesh
        # (measured: the benchmark's robot lacks its antenna, 0.4 % of its volume; a mesh given another object's
        # views, 15-1058 % in 11 of 12 pairs, 8.9 % in one, whose refinement the accept step then rejects).
        note = (
            f"the views show {sum(kept) / max(own, 1.0):.0%} of the mesh's volume outside it, more than a smoothed-"
            f"away part ({max_fraction:.0%}): they disagree with the mesh, nothing is added"
        )
        return MissingParts(None, 0, kept, views, note)
    # The evidence stops a few voxels short of the mesh (the slack, the opening): grown back within the hull, a part
    # that touches the mesh overlaps it, so the union is one surface and the fit cannot pull the two into each
    # other; sideways the hull holds it to what the views show.
    parts = parts | (ndimage.binary_dilation(parts, iterations=bridge) & hull)
    part_mesh = _surface(parts, camera)
    return MissingParts(part_mesh, len(keep), kept, views)


def _union(mesh: trimesh.Trimesh, extra: trimesh.Trimesh) -> trimesh.Trimesh | None:
    """The boolean union (manifold3d), or None where it cannot be had (not installed, a non-manifold input)."""
    try:
        import manifold3d  # noqa: F401  (trimesh's "manifold" engine)
    except ImportError:
        return None
    if not (mesh.is_watertight and extra.is_watertight):
        return None
    try:
        out = trimesh.boolean.union([mesh, extra], engine="manifold")
    except Exception:  # noqa: BLE001  (any failure of the boolean: keep the parts apart)
        return None
    return out if len(out.faces) and out.is_watertight else None


def add_missing_parts(
    mesh: trimesh.Trimesh, masks: torch.Tensor, camera: ViewCamera, **kwargs
) -> tuple[trimesh.Trimesh, MissingParts]:
    """The mesh united with `missing_parts` (one watertight surface; appended as separate components where the union
    cannot be had), vertex colours from the nearest input vertex; and the MissingParts. Unchanged when none."""
    # The texture stage's tensors: an inside-out mesh is drawn with its faces flipped, as the camera fit drew it.
    vertices, faces = _mesh_tensors(mesh, torch.device("cpu"))
    found = missing_parts(vertices, faces, masks, camera, **kwargs)
    if found.mesh is None:
        return mesh, found
    out = _union(mesh, found.mesh)
    if out is None:
        out = trimesh.util.concatenate([mesh, found.mesh])
    return _carry_visuals(mesh, np.asarray(out.vertices), np.asarray(out.faces)), found
