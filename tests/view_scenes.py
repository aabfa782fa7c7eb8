"""Synthetic scenes with known truth for the views' renderer and refinement tests (not a test module).

- A sphere with 18 Gaussian bumps (asymmetric, so a mirrored view would show), its analytic normals and an
  independent ray-cast of it.
- A creased object with a handle (a box and a torus, as a signed distance function), sphere-traced for its true
  views, and a TripoSR-like start mesh: its occupancy voxelised, blurred and marching-cubed (smoothed creases, a
  thickened handle, the uneven triangles and slivers of marching cubes).
"""

from __future__ import annotations

import mcubes
import numpy as np
import torch
import trimesh
from PIL import Image
from scipy import ndimage
from scipy.spatial import cKDTree

from benchmarks.view_refine import bump_centres
from t2mv import view_render as vrr
from t2mv.view_texture import ViewCamera
from wonder3d_perflow.cameras import view_axes

SIZE = 128
RADIUS = 0.5
BUMP = 0.1  # bump height, fraction of the radius
WIDTH = 0.04  # bump width: exp((d . c - 1) / WIDTH), about 0.2 rad
CAMERA = ViewCamera(scale=1.4, center=(0.01, 0.02, -0.01), image_size=SIZE)
FAST = {"iterations": 60, "lr": 5e-2, "lam": 10.0}  # converges on these small meshes in a test's time


CENTRES = bump_centres()  # the benchmark's ground truth, shared


def bump_radius(d: np.ndarray) -> np.ndarray:
    """Radius (N,) of the ground truth along unit directions d (N, 3)."""
    return RADIUS * (1.0 + BUMP * np.exp((d @ CENTRES.T - 1.0) / WIDTH).sum(-1))


def analytic_normal(d: np.ndarray) -> np.ndarray:
    """Outward unit normals (N, 3) of the ground truth at its points along unit directions d (N, 3):
    the gradient of f(p) = |p| - r(p / |p|)."""
    g = RADIUS * BUMP * (np.exp((d @ CENTRES.T - 1.0) / WIDTH) / WIDTH) @ CENTRES  # (N, 3) dr/dd
    tangential = g - (g * d).sum(-1, keepdims=True) * d
    n = d - tangential / bump_radius(d)[:, None]
    return n / np.linalg.norm(n, axis=-1, keepdims=True)


def bumpy_sphere(subdivisions: int) -> trimesh.Trimesh:
    sphere = trimesh.creation.icosphere(subdivisions=subdivisions)
    d = sphere.vertices / np.linalg.norm(sphere.vertices, axis=1, keepdims=True)
    return trimesh.Trimesh(d * bump_radius(d)[:, None], sphere.faces, process=False)


def encode(normals: np.ndarray, masks: np.ndarray) -> tuple[list[Image.Image], list[Image.Image]]:
    """(6, S, S, 3) unit normals + (6, S, S) bool -> the multiview stage's PIL images (white background)."""
    rgb = np.where(masks[..., None], np.round((normals + 1.0) / 2.0 * 255.0), 255.0).clip(0, 255).astype(np.uint8)
    return [Image.fromarray(x) for x in rgb], [Image.fromarray((m * 255).astype(np.uint8)) for m in masks]


def render_targets(mesh: trimesh.Trimesh, camera: ViewCamera):
    """Targets rendered by the module's own renderer."""
    x = torch.tensor(mesh.vertices, dtype=torch.float32)
    topo = vrr.mesh_topology(torch.tensor(mesh.faces), len(x))
    vis = vrr.visibility(x, topo, camera, camera.image_size)
    normal, _ = vrr.render(x, topo, camera, vis).images()
    s = camera.image_size
    return encode(normal.reshape(6, s, s, 3).numpy(), vis.hard.reshape(6, s, s).numpy())


def raycast_targets(camera: ViewCamera):
    """Targets by an independent analytic ray-cast of the ground truth: orthographic rays through the pixel centres,
    the first sign change of f(p) = |p| - r(p / |p|) along each, refined by bisection."""
    s, scale = camera.image_size, camera.scale
    axes = view_axes(torch.float64).numpy()  # (6, 3, 3)
    u = (np.arange(s) + 0.5) / s * 2.0 - 1.0  # column -> NDC u
    v = 1.0 - (np.arange(s) + 0.5) / s * 2.0  # row -> NDC v
    uu, vv = np.meshgrid(u, v)  # (S, S), [row, col]
    ts = np.linspace(0.6, -0.6, 61)  # along the view direction, from the camera's side (radius < 0.56)

    def f(p):
        r = np.linalg.norm(p, axis=-1)
        return r - bump_radius(p / r[..., None])

    normals, masks = np.zeros((6, s, s, 3)), np.zeros((6, s, s), dtype=bool)
    for k in range(6):
        right, up, back = axes[k]
        origin = np.asarray(camera.center) + (uu / scale)[..., None] * right + (vv / scale)[..., None] * up
        origin = origin.reshape(-1, 3)  # (S * S, 3)
        near = np.linalg.norm(origin - (origin @ back)[:, None] * back, axis=1) < 0.6  # rays that can hit
        values = np.stack([f(origin[near] + t * back) for t in ts], axis=1)  # (R, T)
        inside = values < 0
        hit = np.zeros(len(origin), dtype=bool)
        hit[near] = inside.any(axis=1)
        inside = inside[inside.any(axis=1)]
        first = inside.argmax(axis=1)
        lo, hi, o = ts[np.maximum(first - 1, 0)], ts[first], origin[hit]  # f(lo) > 0 > f(hi)
        for _ in range(40):
            mid = (lo + hi) / 2
            out = f(o + mid[:, None] * back) > 0
            lo, hi = np.where(out, mid, lo), np.where(out, hi, mid)
        p = o + ((lo + hi) / 2)[:, None] * back
        n = np.zeros((s * s, 3))
        n[hit] = analytic_normal(p / np.linalg.norm(p, axis=-1, keepdims=True))
        normals[k], masks[k] = n.reshape(s, s, 3), hit.reshape(s, s)
    return normals, masks


def surface_errors(mesh: trimesh.Trimesh, gt: trimesh.Trimesh, n: int = 100_000) -> tuple[float, float]:
    """Symmetric Chamfer distance (mean of both directions) and mean angle (degrees) between the mesh's normals and
    the analytic ground truth's normal in the same direction from the centre."""
    pa, fa = trimesh.sample.sample_surface(mesh, n, seed=1)
    pb, _ = trimesh.sample.sample_surface(gt, n, seed=2)
    chamfer = (cKDTree(pb).query(pa)[0].mean() + cKDTree(pa).query(pb)[0].mean()) / 2
    d = pa / np.linalg.norm(pa, axis=1, keepdims=True)
    cos = (mesh.face_normals[fa] * analytic_normal(d)).sum(-1).clip(-1, 1)
    return float(chamfer), float(np.degrees(np.arccos(cos)).mean())


# --------------------------------------------------------------------------------------------- creased object with a handle

BOX = np.array([0.3, 0.35, 0.25])  # half extents of the box (creases: its 12 edges)
HANDLE = (np.array([0.3, 0.0, 0.0]), 0.2, 0.06)  # torus centre (in the box's +x face), major and minor radius
MUG_LO, MUG_HI = np.array([-0.4, -0.45, -0.35]), np.array([0.62, 0.45, 0.35])


def mug_sdf(p: np.ndarray) -> np.ndarray:
    """Signed distance (..., ) of the box-with-handle at points p (..., 3) (negative inside; exact outside)."""
    q = np.abs(p) - BOX
    box = np.linalg.norm(np.maximum(q, 0.0), axis=-1) + np.minimum(q.max(-1), 0.0)
    c = p - HANDLE[0]
    ring = np.sqrt(c[..., 0] ** 2 + c[..., 1] ** 2) - HANDLE[1]  # the handle's hole faces the front camera (+Z)
    return np.minimum(box, np.sqrt(ring**2 + c[..., 2] ** 2) - HANDLE[2])


def disc_sdf(p: np.ndarray) -> np.ndarray:
    """A disc facing the front camera with a recessed ring on both faces (like a gear's hub): the recess's floor
    faces the camera as the face around it does, so only its walls place its depth."""
    r = np.hypot(p[..., 0], p[..., 1])
    disc = np.maximum(r - 0.5, np.abs(p[..., 2]) - 0.14)
    recess = np.maximum(np.maximum(r - 0.38, 0.16 - r), 0.07 - np.abs(p[..., 2]))
    return np.maximum(disc, -recess)


DISC_BOX = (np.array([-0.6, -0.6, -0.3]), np.array([0.6, 0.6, 0.3]))


def _grid(per_unit: float, box=None) -> tuple[np.ndarray, list[np.ndarray]]:
    lo, hi = box or (MUG_LO, MUG_HI)
    axes = [np.linspace(lo[i], hi[i], int(per_unit * (hi[i] - lo[i])) + 1) for i in range(3)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), -1), axes


def _marching_cubes(volume: np.ndarray, level: float, axes: list[np.ndarray]) -> trimesh.Trimesh:
    v, f = mcubes.marching_cubes(volume, level)
    v = v * np.array([a[1] - a[0] for a in axes]) + np.array([a[0] for a in axes])
    mesh = trimesh.Trimesh(v, f, process=True)
    if mesh.volume < 0:
        mesh.invert()
    return mesh


def mug_truth(per_unit: float = 160.0, sdf=None, box=None) -> trimesh.Trimesh:
    """The truth as a fine marching-cubes mesh of the distance field (for Chamfer distances); `sdf`, `box`: another
    object (default: the mug) and its bounds."""
    g, axes = _grid(per_unit, box)
    return _marching_cubes(-(sdf or mug_sdf)(g), 0.0, axes)


def mug_start(per_unit: float = 96.0, blur: float = 1.3, sdf=None, box=None) -> trimesh.Trimesh:
    """A TripoSR stand-in: occupancy at 1/per_unit, Gaussian-blurred by `blur` voxels, marching cubes at 0.5."""
    g, axes = _grid(per_unit, box)
    occupancy = ndimage.gaussian_filter(((sdf or mug_sdf)(g) < 0).astype(np.float64), blur)
    return _marching_cubes(occupancy, 0.5, axes)


def mug_views(
    camera: ViewCamera, shift: tuple[int, ...] = (0,) * 6, sdf=None
) -> tuple[list[Image.Image], list[Image.Image]]:
    """True normal maps (sphere-traced distance field, normals from its gradient) and masks. shift: per view,
    pixels the mask is grown (> 0) or shrunk (< 0) by against the normal map's silhouette (a generator's rim
    mismatch). sdf: another object (default: the mug)."""
    mug_sdf_ = sdf or mug_sdf
    s, scale = camera.image_size, camera.scale
    axes = view_axes(torch.float64).numpy()  # (6, 3, 3)
    u = (np.arange(s) + 0.5) / s * 2.0 - 1.0
    uu, vv = np.meshgrid(u, -u)  # (S, S) [row, col]: NDC u, v at the pixel centres
    normals, masks = np.zeros((6, s, s, 3)), np.zeros((6, s, s), dtype=bool)
    for k in range(6):
        right, up, back = axes[k]
        p = np.asarray(camera.center) + (uu / scale)[..., None] * right + (vv / scale)[..., None] * up + back
        p, t = p.reshape(-1, 3), np.zeros(s * s)
        for _ in range(200):  # sphere tracing from 1 unit in front of the centre, towards the camera's back
            d = mug_sdf_(p - t[:, None] * back)
            t = t + np.where(d > 1e-5, d, 0.0)
        hit = np.abs(mug_sdf_(p - t[:, None] * back)) < 1e-4
        q = p[hit] - t[hit, None] * back
        eps = 1e-5
        grad = np.stack([mug_sdf_(q + eps * e) - mug_sdf_(q - eps * e) for e in np.eye(3)], axis=-1)  # (H, 3)
        n = np.zeros((s * s, 3))
        n[hit] = grad / np.linalg.norm(grad, axis=-1, keepdims=True)
        normals[k], masks[k] = n.reshape(s, s, 3), hit.reshape(s, s)
    for k, grow in enumerate(shift):
        if grow:
            op = ndimage.binary_dilation if grow > 0 else ndimage.binary_erosion
            masks[k] = op(masks[k], iterations=abs(grow))
    rgb = np.where(normals.any(-1, keepdims=True), np.round((normals + 1.0) / 2.0 * 255.0), 255.0)
    return [Image.fromarray(x.astype(np.uint8)) for x in rgb], [
        Image.fromarray(m.astype(np.uint8) * 255) for m in masks
    ]


def chamfer(a: trimesh.Trimesh, b: trimesh.Trimesh, n: int = 50_000) -> float:
    """Symmetric Chamfer distance (mean of both directions) between surface samples of two meshes."""
    pa, _ = trimesh.sample.sample_surface(a, n, seed=1)
    pb, _ = trimesh.sample.sample_surface(b, n, seed=2)
    return float((cKDTree(pb).query(pa)[0].mean() + cKDTree(pa).query(pb)[0].mean()) / 2)
