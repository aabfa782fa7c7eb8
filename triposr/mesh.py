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

Field evaluation is coarse-to-fine by default (`method="sparse"`, see `sparse_level_grid`): every 4th grid point
first, then the full-resolution grid only in the blocks the surface passes through; marching cubes runs on the
field's device (`backend="torch"`, `triposr.marching_cubes`), so on a GPU the level grid never leaves it.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
import trimesh

MIN_RESOLUTION = 32
MAX_RESOLUTION = 1024
MC_BACKENDS = ("auto", "torch", "pymcubes", "skimage")
FIELD_METHODS = ("sparse", "dense")

# Coarse-to-fine defaults (see sparse_level_grid): blocks of 4^3 cells (the coarse grid is every 4th point, about one
# triplane texel at R=256), straddling blocks dilated by one block, and blocks with a coarse density within 0.75x the
# threshold of it (density 6.25..43.75 for threshold 25) count as near the surface. On the benchmark's object-like
# field at R=256 the margin costs ~16% more queries than 0.5 (~22% of the dense grid's points in all); on the random
# tiny TripoSR field at R=64 it is what keeps near-threshold specks of a few voxels (0.5 loses 24 grid points).
SPARSE_BLOCK = 4
SPARSE_DILATE = 1
SPARSE_MARGIN = 0.75

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


def _marching_cubes(level: torch.Tensor, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Iso-surface level == 0 of a (R, R, R) grid; inside is level > 0.

    Returns vertices (V, 3) float64 in grid index units (column c indexes axis c of `level`) and faces (F, 3) int64
    wound so that normals point toward level < 0 (outward): on the grid's device for "torch", on the CPU otherwise.
    "torch" and "pymcubes" give the same triangles in the same order (see `triposr.marching_cubes`).
    """
    if backend in ("auto", "torch"):
        from .marching_cubes import marching_cubes

        vertices, faces = marching_cubes(level)
        return vertices.double(), faces
    level_np = level.cpu().numpy()  # the one device -> host copy
    if backend == "pymcubes":
        import mcubes

        # PyMCubes uses the classic Bourke tables with the same winding as torchmcubes (upstream's library).
        vertices, faces = mcubes.marching_cubes(level_np, 0.0)
    elif backend == "skimage":
        from skimage.measure import marching_cubes

        # Lewiner's tables; with the default gradient direction the faces point inward for "inside is positive".
        vertices, faces, _, _ = marching_cubes(level_np, 0.0, method="lewiner")
        faces = faces[:, ::-1]
    else:
        raise ValueError(f"unknown marching-cubes backend {backend!r}; use one of {MC_BACKENDS}")
    return torch.from_numpy(np.asarray(vertices, dtype=np.float64)), torch.from_numpy(
        np.ascontiguousarray(faces, dtype=np.int64)
    )


def query_in_chunks(query_fn: QueryFn, points: torch.Tensor, key: str, chunk_size: int) -> torch.Tensor:
    """Evaluate `query_fn(points)[key]` over (N, 3) points chunk by chunk; returns (N, D) float32 on points.device."""
    outs = [query_fn(points[i : i + chunk_size])[key].float() for i in range(0, points.shape[0], chunk_size)]
    return torch.cat(outs, dim=0).reshape(points.shape[0], -1)  # (N, D)


def grid_points(ijk: torch.Tensor, *, radius: float, resolution: int) -> torch.Tensor:
    """Model-frame coordinates (N, 3) float32 of integer grid indices (N, 3): x_i = -r + 2r * i / (R - 1).

    The one formula for every grid query, so the dense and the coarse-to-fine grids see bit-identical points.
    """
    return ijk.float() * (2.0 * radius / (resolution - 1)) - radius  # (N, 3)


def _query_level(
    query_fn: QueryFn, ijk: torch.Tensor, *, radius: float, resolution: int, threshold: float
) -> torch.Tensor:
    density = query_fn(grid_points(ijk, radius=radius, resolution=resolution))["density_act"].float().reshape(-1)
    # A NaN density would make marching cubes emit NaN vertices: count it as empty space.
    return torch.nan_to_num(density - threshold, nan=-threshold)  # (N,)


def level_grid(
    query_fn: QueryFn, *, radius: float, resolution: int, threshold: float, chunk_size: int, device: torch.device
) -> torch.Tensor:
    """density_act - threshold on the R^3 grid, (R, R, R) float32 on `device`; [i, j, k] is the point
    (x_i, y_j, z_k), x_i = -r + 2r * i / (R - 1) (upstream's linspace + meshgrid "ij"), model frame.

    Coordinates are generated per chunk from the flat index on the device, so no R^3 x 3 grid is materialised or
    copied from the host, and nothing in the loop waits for the device.
    """
    n = resolution**3
    level = torch.empty(n, dtype=torch.float32, device=device)  # (R^3,)
    for start in range(0, n, chunk_size):
        flat = torch.arange(start, min(start + chunk_size, n), device=device)  # (n_chunk,)
        ijk = torch.stack([flat // resolution**2, (flat // resolution) % resolution, flat % resolution], dim=-1)
        level[start : start + flat.shape[0]] = _query_level(
            query_fn, ijk, radius=radius, resolution=resolution, threshold=threshold
        )
    return level.reshape(resolution, resolution, resolution)


def _unflatten(flat: torch.Tensor, resolution: int) -> torch.Tensor:
    return torch.stack([flat // resolution**2, (flat // resolution) % resolution, flat % resolution], dim=-1)


def _any_all_corners(positive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Over the 8 corners of every cell of (..., X, Y, Z) bools: (any, all), each (..., X-1, Y-1, Z-1)."""
    corners = [
        positive[..., i : positive.shape[-3] - 1 + i, j : positive.shape[-2] - 1 + j, k : positive.shape[-1] - 1 + k]
        for i in (0, 1)
        for j in (0, 1)
        for k in (0, 1)
    ]
    any_, all_ = corners[0].clone(), corners[0].clone()
    for c in corners[1:]:
        any_ |= c
        all_ &= c
    return any_, all_


@torch.no_grad()
def sparse_level_grid(
    query_fn: QueryFn,
    *,
    radius: float,
    resolution: int,
    threshold: float,
    chunk_size: int,
    device: torch.device,
    block: int = SPARSE_BLOCK,
    dilate: int = SPARSE_DILATE,
    margin: float = SPARSE_MARGIN,
) -> tuple[torch.Tensor, dict]:
    """The level grid of `level_grid`, queried coarse-to-fine: the field is evaluated at full resolution only in
    the blocks of cells the surface passes through.

    1. Coarse grid: every `block`-th point per axis (and the last one), i.e. the corners of blocks of block^3 cells.
    2. Seeds: blocks whose 8 coarse corners straddle the level, dilated by `dilate` blocks (26-neighbourhood),
       and blocks with a coarse corner within `margin * |threshold|` of the level (a thin part between coarse
       points raises the density there without crossing it).
    3. Every grid point of the seed blocks is queried; then, until nothing changes, any block next to (26-
       neighbourhood) a cell that crosses the level is added and queried. So each connected piece of the surface
       that touches a queried block is traced to its end, at full resolution, whatever the coarse grid saw.
    4. Points never queried lie in blocks whose 8 coarse corners are all on one side and no crossing cell touches
       them; they get their block's coarse corner value (same side), so no cell with such a point crosses the
       level and marching cubes of this grid is exactly marching cubes of the dense grid on every traced piece.

    What it can miss: a piece of surface that lies wholly inside blocks that are neither seeds nor next to a
    traced piece (a floater or thin part smaller than a block whose density stays farther than the margin from
    the level at every coarse point).

    Args:
        query_fn, radius, resolution, threshold, chunk_size, device: as in `level_grid`.
        block: cells per block side (the coarse grid's stride), >= 2.
        dilate: seed dilation, in blocks.
        margin: fraction of |threshold|: coarse values this close to the level make their blocks seeds.

    Returns:
        The (R, R, R) float32 level grid on `device` (exact at every queried point, a same-side stand-in at the
        others) and counts: {"points_queried", "points_total", "blocks_selected", "blocks_total", "rounds"}.
    """
    if block < 2 or dilate < 0 or not margin >= 0:
        raise ValueError(f"need block >= 2, dilate >= 0, margin >= 0; got {block}, {dilate}, {margin}")
    res = resolution
    nb = -(-(res - 1) // block)  # blocks per axis; the last one may be thinner
    level = torch.empty(res**3, dtype=torch.float32, device=device)  # (R^3,)
    known = torch.zeros(res**3, dtype=torch.bool, device=device)  # (R^3,)

    def query(flat: torch.Tensor) -> None:
        for start in range(0, flat.shape[0], chunk_size):
            part = flat[start : start + chunk_size]
            level[part] = _query_level(
                query_fn, _unflatten(part, res), radius=radius, resolution=res, threshold=threshold
            )
        known[flat] = True

    # 1. Coarse grid: block corners.
    corner_index = (torch.arange(nb + 1, device=device) * block).clamp_max(res - 1)  # (nb+1,)
    ci, cj, ck = torch.meshgrid(corner_index, corner_index, corner_index, indexing="ij")  # (nb+1,)^3 each
    coarse_flat = ((ci * res + cj) * res + ck).reshape(-1)  # ((nb+1)^3,)
    query(coarse_flat)
    coarse = level[coarse_flat].reshape(nb + 1, nb + 1, nb + 1)

    # 2. Seed blocks.
    any_pos, all_pos = _any_all_corners(coarse > 0)  # (nb, nb, nb)
    near, _ = _any_all_corners(coarse.abs() <= margin * abs(threshold))
    seeds = any_pos & ~all_pos  # (nb, nb, nb)
    if dilate:
        seeds = F.max_pool3d(seeds[None, None].float(), 2 * dilate + 1, stride=1, padding=dilate)[0, 0] > 0
    seeds |= near

    # 3. Query the selected blocks; add the neighbours that crossing cells touch, until closed.
    local = torch.arange(block + 1, device=device)
    li, lj, lk = torch.meshgrid(local, local, local, indexing="ij")
    local_ijk = torch.stack([li, lj, lk], dim=-1).reshape(1, -1, 3)  # (1, (block+1)^3, 3)
    steps = torch.tensor([(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1)], device=device)
    selected = torch.zeros(nb, nb, nb, dtype=torch.bool, device=device)
    pending = seeds
    rounds = 0
    while True:
        new = pending & ~selected
        blocks = new.nonzero()  # (n, 3)
        if blocks.shape[0] == 0:
            break
        rounds += 1
        selected |= new
        ijk = (blocks[:, None, :] * block + local_ijk).clamp_max(res - 1)  # (n, (block+1)^3, 3)
        flat = (ijk[..., 0] * res + ijk[..., 1]) * res + ijk[..., 2]  # (n, (block+1)^3)
        need = torch.zeros_like(known)
        need[flat.reshape(-1)] = True
        need &= ~known
        query(need.nonzero().squeeze(1))

        # Crossing cells of the new blocks; the last block's clamped (zero-width) cells never cross.
        side = block + 1
        values = level[flat].reshape(-1, side, side, side)  # (n, b+1, b+1, b+1)
        any_pos, all_pos = _any_all_corners(values > 0)
        crossing = any_pos & ~all_pos  # (n, b, b, b)
        # Which of the 27 (3 x 3 x 3) neighbour directions each block's crossing cells touch: per axis, bin the cells
        # into "touches the low side" (index 0), "any" and "touches the high side" (index block-1).
        touches = crossing
        for axis in (1, 2, 3):
            low = touches.narrow(axis, 0, 1).any(axis, keepdim=True)
            high = touches.narrow(axis, block - 1, 1).any(axis, keepdim=True)
            touches = torch.cat([low, touches.any(axis, keepdim=True), high], dim=axis)
        touches = touches.reshape(-1, 27)  # (n, 27), direction (a, b, c) in {-1, 0, 1}^3 at 9(a+1) + 3(b+1) + c+1
        neighbour = (blocks[:, None, :] + steps[None]).reshape(-1, 3)  # (n*27, 3)
        valid = touches.reshape(-1) & ((neighbour >= 0) & (neighbour < nb)).all(1)
        neighbour = neighbour[valid]
        pending = torch.zeros_like(selected)
        pending[neighbour[:, 0], neighbour[:, 1], neighbour[:, 2]] = True

    # 4. Never-queried points: their block's coarse corner value (all 8 corners of such a block are on one side).
    owner = (torch.arange(res, device=device) // block).clamp_max(nb - 1)  # (R,) block of each index (lower one)
    level, known = level.view(res, res, res), known.view(res, res, res)
    for start in range(0, res, 32):  # in slabs: no second R^3 grid
        rows = owner[start : start + 32]
        fill = coarse[rows][:, owner][:, :, owner]  # (slab, R, R)
        level[start : start + 32] = torch.where(known[start : start + 32], level[start : start + 32], fill)
    info = {
        "points_queried": int(known.sum()),
        "points_total": res**3,
        "blocks_selected": int(selected.sum()),
        "blocks_total": nb**3,
        "rounds": rounds,
    }
    return level, info


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
    method: str = "sparse",
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
        has_vertex_color: query colours at the vertices (one pass over the final vertices).
        chunk_size: points per query call.
        device: where the grid is built, queried and (backend "torch") triangulated (default CPU); use the model's.
        backend: "torch" (the default for "auto": `triposr.marching_cubes`, on `device`, PyMCubes's triangles),
            "pymcubes" or "skimage" (both on the host).
        method: "sparse" (default: coarse grid first, full resolution only near the surface, see
            `sparse_level_grid`: the same mesh as "dense", except that a speck of surface smaller than a 4-cell
            block whose density stays outside 0.25..1.75x the threshold at every coarse point around it is
            missed) or "dense" (every grid point).

    Returns:
        A `trimesh.Trimesh` in the export frame (glTF: +Y up, front +Z), outward normals, uint8 RGBA vertex colours
        (round(255 c), as upstream) when requested.
    """
    resolution = _check_resolution(resolution)
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold}")
    if backend not in MC_BACKENDS:
        raise ValueError(f"unknown marching-cubes backend {backend!r}; use one of {MC_BACKENDS}")
    if method not in FIELD_METHODS:
        raise ValueError(f"unknown field method {method!r}; use one of {FIELD_METHODS}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    device = torch.device("cpu") if device is None else torch.device(device)

    # 1. Level field, built and queried on the device.
    grid_args = dict(radius=radius, resolution=resolution, threshold=threshold, chunk_size=chunk_size, device=device)
    if method == "sparse":
        level, _ = sparse_level_grid(query_fn, **grid_args)
    else:
        level = level_grid(query_fn, **grid_args)

    has_inside, has_outside = bool((level > 0).any()), bool((level < 0).any())  # one sync
    if not (has_inside and has_outside):
        max_density = float(level.max()) + threshold
        raise ValueError(
            f"no surface at threshold {threshold:g}: the density on the {resolution}^3 grid stays "
            f"{'below' if max_density <= threshold else 'above'} it (max {max_density:.4g}"
            f"{' on the coarse grid' if method == 'sparse' else ''}); choose a threshold between the field's "
            "minimum and maximum (lower it for thin objects) or check the input image"
        )
    # 2. Marching cubes (on the device for "torch"), grid index units -> native frame.
    vertices, faces = _marching_cubes(level, backend)
    vertices = vertices * (2.0 * radius / (resolution - 1)) - radius  # (V, 3) float64

    # 3. Colours from the field at the vertices (native frame), then the frame change (the only place it happens).
    vertex_colors = None
    if has_vertex_color:
        points = vertices.to(device=device, dtype=torch.float32)  # (V, 3)
        colors = query_in_chunks(query_fn, points, "color", chunk_size).clamp(0.0, 1.0)  # (V, 3)
        vertex_colors = np.round(colors.cpu().numpy() * 255.0).astype(np.uint8)
        vertex_colors = np.concatenate([vertex_colors, np.full_like(vertex_colors[:, :1], 255)], axis=1)
    return trimesh.Trimesh(
        vertices=native_to_export(vertices.cpu().numpy()).astype(np.float32),
        faces=faces.cpu().numpy(),
        vertex_colors=vertex_colors,
        process=True,
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
    method: str = "sparse",
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
        method=method,
    )


def keep_largest_component(mesh: trimesh.Trimesh) -> trimesh.Trimesh:
    """Drop floaters: keep the connected component (faces sharing edges) with the most faces. Colours are kept."""
    components = mesh.split(only_watertight=False)
    if len(components) <= 1:
        return mesh.copy()
    return max(components, key=lambda part: len(part.faces))


def distinct_corners(faces: np.ndarray) -> np.ndarray:
    """(F,) bool: the faces (F, 3) whose three corners are distinct vertices. A face with a repeated corner has no
    area and counts one edge twice, so a remesher or a slicer sees a non-manifold edge there."""
    f = np.asarray(faces)
    return (f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 2] != f[:, 0])


def simplify(mesh: trimesh.Trimesh, target_faces: int) -> trimesh.Trimesh:
    """Quadric decimation (fast-simplification, through trimesh) down to about `target_faces` faces.

    Vertex colours are carried over from the nearest vertex of the input mesh. Faces the decimation leaves with a
    repeated corner are dropped. A mesh that already has no more than `target_faces` faces is returned unchanged (as
    a copy).
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
    proper = distinct_corners(simple.faces)  # the decimation leaves a few faces with a repeated corner
    if not proper.all():
        simple.update_faces(proper)
        simple.remove_unreferenced_vertices()
    if mesh.visual.kind == "vertex" and len(simple.vertices):
        from scipy.spatial import cKDTree

        _, nearest = cKDTree(mesh.vertices).query(simple.vertices)
        simple.visual.vertex_colors = mesh.visual.vertex_colors[nearest]
    return simple
