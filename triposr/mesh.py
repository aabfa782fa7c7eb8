"""Mesh extraction from a TripoSR density field: marching cubes, vertex colours, clean-up, export frame.

Two coordinate frames appear in this package:

- the *native* (model) frame, in which the triplane field is queried: +Z up, the input camera on +X looking toward
  -X (the object's front, the side seen in the input image, faces +X), image right = +Y. Upstream's `run.py`
  exports meshes in this frame unchanged.
- the *export* frame, used by every mesh this package returns or writes: glTF's convention, +Y up, the object's
  front facing +Z (a default glTF viewer at +Z looking toward -Z sees the input view), image right = +X.

The change of frame happens in ONE place: `extract_mesh` converts the marching-cubes vertices with
`native_to_export` before building the mesh. Everything downstream (clean-up, texture baking, export, CLI, app)
works on export-frame meshes; code that queries the field at mesh points maps them back with `export_to_native`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import trimesh

MIN_RESOLUTION = 32
MAX_RESOLUTION = 1024
MC_BACKENDS = ("auto", "pymcubes", "skimage")

# new = NATIVE_TO_EXPORT @ old (column vectors): export (x, y, z) = native (y, z, x). A cyclic axis permutation, so a
# proper rotation (det +1): winding and outward normals survive it.
NATIVE_TO_EXPORT = np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]], dtype=np.float64)

QueryFn = Callable[[torch.Tensor], dict]


def native_to_export(points):
    """Map (..., 3) points (numpy or torch) from the model frame to the export frame: (x, y, z) -> (y, z, x)."""
    return points[..., [1, 2, 0]]


def export_to_native(points):
    """Inverse of `native_to_export`: (x, y, z) -> (z, x, y)."""
    return points[..., [2, 0, 1]]


def _check_resolution(resolution: int) -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, int | np.integer):
        raise ValueError(
            f"resolution must be an integer between {MIN_RESOLUTION} and {MAX_RESOLUTION}, got {resolution!r}"
        )
    if not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION:
        raise ValueError(
            f"resolution {resolution} is outside {MIN_RESOLUTION}..{MAX_RESOLUTION}: below {MIN_RESOLUTION} the surface "
            f"is a few blobs, above {MAX_RESOLUTION} the density grid alone needs more than 4 GB; 256 is the default"
        )
    return int(resolution)


def _marching_cubes(level: np.ndarray, backend: str) -> tuple[np.ndarray, np.ndarray]:
    """Iso-surface level == 0 of a (R, R, R) grid; inside is level > 0. Returns vertices in grid index units
    (column c indexes axis c of `level`) and faces wound so that normals point toward level < 0 (outward)."""
    if backend == "auto":
        try:
            import mcubes  # noqa: F401

            backend = "pymcubes"
        except ImportError:
            backend = "skimage"
    if backend == "pymcubes":
        import mcubes

        # PyMCubes uses the classic Bourke tables with the same winding as torchmcubes (upstream's library).
        vertices, faces = mcubes.marching_cubes(level, 0.0)
    elif backend == "skimage":
        from skimage.measure import marching_cubes

        # Lewiner's tables; with the default gradient direction the faces point inward for "inside is positive".
        vertices, faces, _, _ = marching_cubes(level, 0.0, method="lewiner")
        faces = faces[:, ::-1]
    else:
        raise ValueError(f"unknown marching-cubes backend {backend!r}; use one of {MC_BACKENDS}")
    return np.asarray(vertices, dtype=np.float64), np.ascontiguousarray(faces, dtype=np.int64)


def query_in_chunks(query_fn: QueryFn, points: torch.Tensor, key: str, chunk_size: int) -> torch.Tensor:
    """Evaluate `query_fn(points)[key]` over (N, 3) points chunk by chunk; returns (N, D) float32 on points.device."""
    outs = [query_fn(points[i : i + chunk_size])[key].float() for i in range(0, points.shape[0], chunk_size)]
    return torch.cat(outs, dim=0).reshape(points.shape[0], -1)  # (N, D)


def level_grid(
    query_fn: QueryFn, *, radius: float, resolution: int, threshold: float, chunk_size: int, device: torch.device
) -> torch.Tensor:
    """density_act - threshold on the R^3 grid, (R, R, R) float32 on `device`; [i, j, k] is the point
    (x_i, y_j, z_k), x_i = -r + 2r * i / (R - 1) (upstream's linspace + meshgrid "ij"), model frame.

    Coordinates are generated per chunk from the flat index on the device, so no R^3 x 3 grid is materialised or
    copied from the host, and nothing in the loop waits for the device.
    """
    n = resolution**3
    step = 2.0 * radius / (resolution - 1)
    level = torch.empty(n, dtype=torch.float32, device=device)  # (R^3,)
    for start in range(0, n, chunk_size):
        flat = torch.arange(start, min(start + chunk_size, n), device=device)  # (n_chunk,)
        ijk = torch.stack([flat // resolution**2, (flat // resolution) % resolution, flat % resolution], dim=-1)
        points = ijk.float() * step - radius  # (n_chunk, 3)
        density = query_fn(points)["density_act"].float().reshape(-1)  # (n_chunk,)
        level[start : start + points.shape[0]] = density - threshold
    # A NaN density would make marching cubes emit NaN vertices: count it as empty space.
    return torch.nan_to_num(level, nan=-threshold).reshape(resolution, resolution, resolution)


@torch.no_grad()
def extract_mesh(
    query_fn: QueryFn,
    *,
    radius: float,
    resolution: int = 256,
    threshold: float = 25.0,
    has_vertex_color: bool = True,
    chunk_size: int = 2**18,
    device: torch.device | str | None = None,
    backend: str = "auto",
) -> trimesh.Trimesh:
    """Marching cubes of a density field, with vertex colours queried from the same field.

    Args:
        query_fn: maps (N, 3) float32 points in the model's native frame to a dict holding `"density_act"`
            (N, 1) (activated density, the quantity compared with `threshold`) and, when `has_vertex_color`,
            `"color"` (N, 3) in [0, 1]. See `scene_code_query_fn` for the TripoSR field.
        radius: the field lives in the cube [-radius, radius]^3 (TripoSR: `renderer.cfg.radius` = 0.87).
        resolution: grid points per axis, 32..1024 (default 256, as upstream).
        threshold: density level of the surface (default 25.0, as upstream; lower values give fatter, smoother
            surfaces).
        has_vertex_color: query colours at the vertices.
        chunk_size: points per query call.
        device: where the grid is built and queried (default CPU); use the model's device.
        backend: "pymcubes" (default for "auto": same winding and tables as upstream's torchmcubes) or "skimage".

    Returns:
        A `trimesh.Trimesh` in the export frame (glTF: +Y up, front +Z), outward normals, uint8 RGBA vertex colours
        (round(255 c), as upstream) when requested.
    """
    resolution = _check_resolution(resolution)
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold}")
    if backend not in MC_BACKENDS:
        raise ValueError(f"unknown marching-cubes backend {backend!r}; use one of {MC_BACKENDS}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    device = torch.device("cpu") if device is None else torch.device(device)

    # 1. Level field, built and queried on the device; 2. marching cubes on the host.
    level = level_grid(
        query_fn, radius=radius, resolution=resolution, threshold=threshold, chunk_size=chunk_size, device=device
    )
    level_np = level.cpu().numpy()  # the one device -> host copy

    if not (level_np > 0).any() or not (level_np < 0).any():
        max_density = float(level_np.max()) + threshold
        raise ValueError(
            f"no surface at threshold {threshold:g}: the density on the {resolution}^3 grid stays "
            f"{'below' if max_density <= threshold else 'above'} it (max {max_density:.4g}); choose a threshold "
            "between the field's minimum and maximum (lower it for thin objects) or check the input image"
        )
    vertices, faces = _marching_cubes(level_np, backend)
    vertices = vertices * (2.0 * radius / (resolution - 1)) - radius  # grid index units -> native frame, (V, 3)

    # 3. Colours from the field at the vertices (native frame), then the frame change (the only place it happens).
    vertex_colors = None
    if has_vertex_color:
        points = torch.from_numpy(vertices).to(device=device, dtype=torch.float32)  # (V, 3)
        colors = query_in_chunks(query_fn, points, "color", chunk_size).clamp(0.0, 1.0)  # (V, 3)
        vertex_colors = np.round(colors.cpu().numpy() * 255.0).astype(np.uint8)
        vertex_colors = np.concatenate([vertex_colors, np.full_like(vertex_colors[:, :1], 255)], axis=1)
    return trimesh.Trimesh(
        vertices=native_to_export(vertices).astype(np.float32), faces=faces, vertex_colors=vertex_colors, process=True
    )


def scene_code_query_fn(model, scene_code: torch.Tensor) -> QueryFn:
    """The TripoSR field of one scene code (3, C, H, W) as a query function for `extract_mesh` / texture baking.

    Uses `model.query_triplane(scene_code, points) -> {"density": raw (N, 1), "color": (N, 3)}` and applies the
    renderer's density activation: density_act = exp(raw + density_bias) (config: "exp", bias -1.0).
    """
    if scene_code.ndim != 4 or scene_code.shape[0] != 3:
        raise ValueError(f"expected one scene code of shape (3, C, H, W), got {tuple(scene_code.shape)}")
    cfg = model.renderer.cfg
    if cfg.density_activation not in ("exp", "trunc_exp"):  # trunc_exp only differs in its gradient
        raise ValueError(f"unsupported density activation {cfg.density_activation!r}; expected 'exp'")
    bias = float(cfg.density_bias)

    def query(points: torch.Tensor) -> dict:
        # float32 points: query_triplane casts to the triplane dtype only after scaling (fp16 grid positions would
        # round first). chunk_size=0: extract_mesh / the baker already hand over large chunks.
        out = model.query_triplane(scene_code, points, chunk_size=0)
        density_act = out["density_act"] if "density_act" in out else torch.exp(out["density"].float() + bias)
        return {"density_act": density_act, "color": out["color"]}

    return query


def extract_mesh_from_scene_code(
    model,
    scene_code: torch.Tensor,
    *,
    resolution: int = 256,
    threshold: float = 25.0,
    has_vertex_color: bool = True,
    chunk_size: int = 2**18,
    backend: str = "auto",
) -> trimesh.Trimesh:
    """`extract_mesh` of one scene code (3, C, H, W) of a `TSR` model, on the scene code's device."""
    return extract_mesh(
        scene_code_query_fn(model, scene_code),
        radius=float(model.renderer.cfg.radius),
        resolution=resolution,
        threshold=threshold,
        has_vertex_color=has_vertex_color,
        chunk_size=chunk_size,
        device=scene_code.device,
        backend=backend,
    )


def keep_largest_component(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """Drop floaters: keep the connected component (faces sharing edges) with the most faces. Colours are kept."""
    components = mesh.split(only_watertight=False)
    if len(components) <= 1:
        return mesh.copy()
    return max(components, key=lambda part: len(part.faces))


def simplify(mesh: trimesh.Trimesh, target_faces: int) -> trimesh.Trimesh:
    """Quadric decimation (fast-simplification, through trimesh) down to about `target_faces` faces.

    Vertex colours are carried over from the nearest vertex of the input mesh. A mesh that already has no more
    than `target_faces` faces is returned unchanged (as a copy).
    """
    if isinstance(target_faces, bool) or not isinstance(target_faces, int | np.integer) or target_faces < 4:
        raise ValueError(f"target_faces must be an integer >= 4, got {target_faces!r}")
    if len(mesh.faces) <= target_faces:
        return mesh.copy()
    try:
        import fast_simplification  # noqa: F401
    except ImportError as err:
        raise ImportError("mesh simplification needs fast-simplification: pip install fast-simplification") from err
    simple = mesh.simplify_quadric_decimation(face_count=int(target_faces))
    if mesh.visual.kind == "vertex" and len(simple.vertices):
        from scipy.spatial import cKDTree

        _, nearest = cKDTree(mesh.vertices).query(simple.vertices)
        simple.visual.vertex_colors = mesh.visual.vertex_colors[nearest]
    return simple
