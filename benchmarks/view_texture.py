"""Benchmark case "view_texture": texture a mesh from six generated views (`t2mv.view_texture.texture_from_views`).

The inputs are synthetic and do not need any model: an object-like mesh (marching cubes of a smooth blob of a body,
a head and an arm, with surface bumps; decimated to the target face count like a simplified TripoSR mesh) and its
six 256² views at Wonder3D's framing, drawn with the project's own screen-space rasteriser at a known camera. The
mesh is given in other units and offset, so the silhouette fit has real work to do. The result records the stage's
own time split (masks, fit, atlas, raster, blend).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import trimesh
from PIL import Image

VIEW_SIZE = 256


def object_mesh(target_faces: int, grid: int) -> trimesh.Trimesh:
    """A closed, outward-wound, object-like mesh in the export frame (+Y up), about 1.6 units tall."""
    from skimage.measure import marching_cubes

    from triposr.mesh import simplify

    axis = np.linspace(-1.0, 1.0, grid, dtype=np.float32)
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")

    def ellipsoid(cx, cy, cz, ax, ay, az):
        return 1.0 - np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((z - cz) / az) ** 2)

    parts = [ellipsoid(0, -0.2, 0, 0.42, 0.55, 0.33), ellipsoid(0, 0.5, 0.04, 0.26, 0.26, 0.26)]
    parts.append(ellipsoid(0.38, 0.0, 0.08, 0.45, 0.09, 0.09))
    k = 12.0  # smooth maximum: blends the parts like a sculpted object
    field = np.log(sum(np.exp(k * p) for p in parts)) / k + 0.02 * np.sin(9 * x) * np.sin(7 * y) * np.sin(8 * z)
    verts, faces, _, _ = marching_cubes(field, level=0.0, spacing=(2 / (grid - 1),) * 3)
    mesh = trimesh.Trimesh(verts - 1.0, faces, process=True)
    if mesh.volume < 0:
        mesh.invert()
    if len(mesh.faces) > target_faces:
        mesh = simplify(mesh, target_faces)
    return mesh


def object_views(mesh: trimesh.Trimesh, scale: float, center: tuple[float, float, float]) -> list[Image.Image]:
    """Six views of `mesh` (white background) through the orthographic camera (scale, center); the colour varies
    with the position (and a stripe pattern), so every view differs."""
    from t2mv.view_texture import ViewCamera
    from triposr.texture import rasterize_screen

    camera = ViewCamera(scale=scale, center=center, image_size=VIEW_SIZE)
    vertices = torch.from_numpy(np.asarray(mesh.vertices, dtype=np.float32))  # (V, 3)
    faces = torch.from_numpy(np.asarray(mesh.faces, dtype=np.int64))  # (F, 3)
    proj = camera.project(vertices)  # (6, V, 3)
    views = []
    for k in range(6):
        pixel, face, bary = rasterize_screen(proj[k, :, :2], proj[k, :, 2], faces, VIEW_SIZE, VIEW_SIZE)
        p = (vertices[faces[face]] * bary[..., None]).sum(dim=1)  # (N, 3)
        color = torch.stack(
            [0.5 + 0.4 * p[:, 0], 0.45 + 0.3 * torch.sin(12 * p[:, 1]), 0.5 + 0.4 * p[:, 2]], dim=-1
        ).clamp(0.05, 0.9)
        image = torch.ones(VIEW_SIZE * VIEW_SIZE, 3)
        image[pixel] = color
        views.append(Image.fromarray((image.reshape(VIEW_SIZE, VIEW_SIZE, 3) * 255).round().byte().numpy()))
    return views


def view_texture_cases(b, sizes) -> list:
    """One case: texture_from_views on a 100k-face mesh (tiny mode: ~5k faces) with a 1024² texture (tiny: 512²)."""
    from t2mv.view_texture import texture_from_views

    from .builders import Case

    real = b.mode == "real"
    target_faces, grid = (100_000, 200) if real else (5_000, 48)
    texture_size = 1024 if real else 512
    mesh = b._get(f"view_texture_mesh{target_faces}", lambda: object_mesh(target_faces, grid))
    # The views see the object at Wonder3D's fill (its height ~75 % of the image); the mesh is in other units.
    height = float(np.ptp(mesh.vertices[:, 1]))
    scale = 1.5 / height
    center = tuple(float(c) for c in mesh.bounds.mean(axis=0) + np.array([0.02, -0.03, 0.01]))
    views = b._get(f"view_texture_views{target_faces}", lambda: object_views(mesh, scale, center))
    units = 0.62  # TripoSR's units differ from the views' framing
    given = trimesh.Trimesh(np.asarray(mesh.vertices) * units + [0.0, 0.2, 0.0], mesh.faces, process=False)

    def run():
        return texture_from_views(given, views, texture_size=texture_size, device=b.device)

    def describe(result) -> dict[str, Any]:
        return {
            "stage_timings_s": dict(result.timings),
            "coverage": result.coverage,
            "view_iou": list(result.view_iou),
            "atlas_faces": int(len(result.mesh.faces)),
            "fitted_scale_error": abs(result.camera.scale * units / scale - 1.0),
        }

    return [
        Case(
            "view_texture",
            f"view texture {texture_size}² from 6 × {VIEW_SIZE}² views ({len(mesh.faces) // 1000}k faces)",
            {"texture_size": texture_size, "view_size": VIEW_SIZE, "faces": int(len(mesh.faces))},
            run,
            describe=describe,
        )
    ]
