"""Refine the TripoSR mesh from Wonder3D's six normal maps and masks.

A differentiable orthographic renderer in plain PyTorch (CPU or CUDA, no compiled extension) renders, for the six
view cameras of `t2mv.view_texture`, the mesh's per-pixel normal (export frame = the front camera's OpenGL frame,
which is the frame of Wonder3D's normal maps) and a soft silhouette. The vertices are then fitted to the maps with
the "Large Steps" parameterisation (Nicolet et al. 2021): the optimiser moves u = (I + λL) x instead of the vertex
positions x, which turns its gradient steps into smooth, low-frequency deformations.

Renderer:
- Visibility (which triangle each pixel centre shows) comes from the z-buffer rasteriser
  `triposr.texture.rasterize_screen` and has no gradient.
- Barycentrics are recomputed from the projected vertex positions at the pixel centres, so the interpolated vertex
  normals carry gradients to the vertex positions.
- Silhouette: pixels where coverage changes within their 3x3 neighbourhood take a soft coverage
  clamp(0.5 + d, 0, 1), with d the signed distance (pixels, positive inside) from the pixel centre to the nearest
  projected contour edge (an edge between a front- and a back-facing triangle). That is the area a straight edge
  covers of a pixel-wide box, and it gives the silhouette its gradient to the contour vertices (the role of
  nvdiffrast's `antialias`).

Optimisation (`refine_mesh`): loss = per view (weighted as Wonder3D's own reconstruction weighs them) the
reliability-weighted mean of 1 - cos(rendered normal, map normal) over the mask (pixels near the mask's rim and
normals seen at grazing angles count less) + 0.1 x the squared soft-silhouette error + a small Laplacian energy of
the displacement. Views with an empty mask, or whose normal map contradicts its own mask's outline or the input
mesh, are left out with a warning. The iterate with the lowest loss is kept, and it replaces the input only if the
data loss went down and nothing degenerated (non-finite vertices, folded faces, new self-intersections).
The faces are kept (no remeshing): vertex colours and any per-vertex data stay valid, and at the 20k-100k faces of a
TripoSR mesh a triangle already covers only a few of the normal maps' pixels (about 3 at 20k faces, under 1 at
100k), so splitting edges would add vertices the maps cannot place.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
import trimesh
from PIL import Image

from triposr import texture as _texture
from wonder3d_perflow import cameras as _cameras

# Wonder3D's own reconstruction (instant-nsr-pl, neuralangelo-ortho-wmask.yaml) weights the views
# [1.0, 0.8, 0.2, 1.0, 0.4, 0.7] in VIEW_NAMES order (front, front_right, right, back, left, front_left): the front
# and back are the most reliable generations (see ../shared/research/wonder3d.md, "Mesh reconstruction").
DEFAULT_VIEW_WEIGHTS = (1.0, 0.8, 0.2, 1.0, 0.4, 0.7)
NUM_VIEWS = 6


class Camera(Protocol):
    """What `refine_mesh` needs of `t2mv.view_texture.ViewCamera` (`texture_from_views(...).camera`)."""

    image_size: int

    def project(self, points: torch.Tensor) -> torch.Tensor:  # (N, 3) -> (6, N, 3): col px, row px, depth
        ...


# --------------------------------------------------------------------------------------------- mesh topology


@dataclass
class Topology:
    """Fixed connectivity of the mesh being refined (the optimisation moves vertices only)."""

    faces: torch.Tensor  # (F, 3) long
    edges: torch.Tensor  # (E, 2) long, unique undirected edges
    edge_faces: torch.Tensor  # (E, 2) long: the two faces of each edge (-1: boundary edge, one face only)
    edge_opposite: torch.Tensor  # (E, 2) long: the vertex opposite the edge in each of those faces (-1: none)
    num_vertices: int


def mesh_topology(faces: torch.Tensor, num_vertices: int) -> Topology:
    """Unique edges and their adjacent faces. Edges with more than two faces (non-manifold) keep the first two.

    Args:
        faces: (F, 3) long. num_vertices: V.

    Returns:
        `Topology` on the faces' device.
    """
    device = faces.device
    f = faces.long()
    directed = torch.cat([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]], dim=0)  # (3F, 2) edge k of face i at k*F + i
    opposite = torch.cat([f[:, 2], f[:, 0], f[:, 1]], dim=0)  # (3F,)
    face_of = torch.arange(len(f), device=device).repeat(3)  # (3F,)
    key = directed.amin(dim=1) * num_vertices + directed.amax(dim=1)  # (3F,) undirected edge id
    uniq, inverse = torch.unique(key, return_inverse=True)  # (E,), (3F,)
    num_edges = len(uniq)
    order = torch.argsort(inverse, stable=True)  # directed edges grouped by undirected edge, face order kept
    sorted_edge = inverse[order]
    first = torch.searchsorted(sorted_edge, torch.arange(num_edges, device=device))  # (E,) start of each group
    count = torch.bincount(inverse, minlength=num_edges)  # (E,)
    edge_faces = torch.full((num_edges, 2), -1, dtype=torch.long, device=device)
    edge_opposite = torch.full((num_edges, 2), -1, dtype=torch.long, device=device)
    edge_faces[:, 0] = face_of[order[first]]
    edge_opposite[:, 0] = opposite[order[first]]
    two = count >= 2
    second = order[(first + 1).clamp(max=len(order) - 1)]
    edge_faces[two, 1] = face_of[second[two]]
    edge_opposite[two, 1] = opposite[second[two]]
    edges = torch.stack([uniq // num_vertices, uniq % num_vertices], dim=1)  # (E, 2)
    return Topology(f, edges, edge_faces, edge_opposite, num_vertices)


def face_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Area-weighted (unnormalised) face normals (F, 3): cross(v1 - v0, v2 - v0), counter-clockwise = outward."""
    tri = vertices[faces]  # (F, 3, 3)
    return torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1)  # (F, 3)


def vertex_normals(vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Unit vertex normals (V, 3): the area-weighted mean of the adjacent face normals (differentiable)."""
    fn = face_normals(vertices, faces)  # (F, 3)
    acc = torch.zeros_like(vertices).index_add(0, faces.reshape(-1), fn.repeat_interleave(3, dim=0))  # (V, 3)
    return F.normalize(acc, dim=-1, eps=1e-12)


# --------------------------------------------------------------------------------------------- renderer


@dataclass
class Visibility:
    """Non-differentiable part of a render of the six views: the triangle each pixel shows and the contour edge
    bounding each silhouette pixel. Pixels are flat indices view * S * S + row * S + col. Recomputed by
    `visibility()`; it may be reused for a few steps while the vertices move little (everything differentiable is
    recomputed from the current vertices by `render()`)."""

    pixel: torch.Tensor  # (N,) covered pixels
    face: torch.Tensor  # (N,) the triangle each one shows
    pair: torch.Tensor  # (N,) index of each pixel's (view, triangle) pair in pair_view / pair_face
    pair_view: torch.Tensor  # (P,) the distinct (view, triangle) pairs seen
    pair_face: torch.Tensor  # (P,)
    hard: torch.Tensor  # (6, S * S) bool coverage of the z-buffer
    edge_pixel: torch.Tensor  # (B,) silhouette pixels (coverage changes in their 3x3 neighbourhood)
    edge: torch.Tensor  # (B, 2) vertex ids of the contour edge nearest each one
    edge_sign: torch.Tensor  # (B,) +1 / -1: the inside lies to the left / right of edge a -> b
    size: int
    xy: torch.Tensor  # (6, V, 2) projected vertices it was computed for (to measure how far they have moved)
    cache: dict[int, tuple[torch.Tensor, ...]] = field(default_factory=dict)  # per-target constants of the losses


@dataclass
class Render:
    """Differentiable render at the pixels of a `Visibility`.

    The interpolated normal is affine in the pixel position within a triangle, so it is kept per (view, triangle)
    pair: m(p) = gx * p.x + gy * p.y + h (unnormalised); `normal` evaluates it at the pixels.
    """

    gx: torch.Tensor  # (P, 3)
    gy: torch.Tensor  # (P, 3)
    h: torch.Tensor  # (P, 3)
    edge_coverage: torch.Tensor  # (B,) soft coverage of each silhouette pixel in [0, 1]
    vis: Visibility

    @property
    def normal(self) -> torch.Tensor:
        """(N, 3) unit export-frame normal at each covered pixel (differentiable)."""
        pair = self.vis.pair
        p = self._pixel_centres()  # (N, 2)
        m = self.gx.index_select(0, pair) * p[:, :1] + self.gy.index_select(0, pair) * p[:, 1:]
        return F.normalize(m + self.h.index_select(0, pair), dim=-1, eps=1e-12)  # (N, 3)

    def cosine(self, target: torch.Tensor) -> torch.Tensor:
        """(N,) cosine between each pixel's normal and target (N, 3) unit vectors: `(normal * target).sum(-1)`, in
        one fused autograd node (the optimiser's hot path: ~3x fewer tensor passes than the composed ops)."""
        return _PixelCosine.apply(self.gx, self.gy, self.h, self.vis.pair, self._pixel_centres(), target)

    def _pixel_centres(self) -> torch.Tensor:
        return _centres(self.vis.pixel, self.vis.size, self.h.dtype)

    def images(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense images: normal (6, S * S, 3) (0 where uncovered) and soft coverage (6, S * S)."""
        vis = self.vis
        values = self.normal  # (N, 3)
        normal = torch.zeros(vis.hard.numel(), 3, dtype=values.dtype, device=values.device)
        normal = normal.index_put((vis.pixel,), values).reshape(*vis.hard.shape, 3)
        coverage = vis.hard.reshape(-1).to(values.dtype).index_put((vis.edge_pixel,), self.edge_coverage)
        return normal, coverage.reshape(vis.hard.shape)


def _centres(pixel: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
    """Pixel centres (N, 2) as (x, y) = (col + 0.5, row + 0.5) of flat indices [view * S * S +] row * S + col."""
    local = pixel % (size * size)
    return torch.stack([(local % size).to(dtype) + 0.5, (local // size).to(dtype) + 0.5], dim=-1)


def _contour_edges(xy: torch.Tensor, front: torch.Tensor, topo: Topology) -> tuple[torch.Tensor, torch.Tensor]:
    """Contour edges of one view: between a front- and a back-facing triangle, or on an open front-facing border.

    Args:
        xy: (V, 2) projected vertices (pixels). front: (F,) bool, the faces that face this view.

    Returns:
        edges (C, 2) vertex ids, sign (C,) +1 where the inside (the front face's third vertex) lies to the left of
        a -> b in (x, y), else -1.
    """
    f0, f1 = topo.edge_faces[:, 0], topo.edge_faces[:, 1]
    boundary = f1 < 0
    front1 = front[f1.clamp(min=0)] & ~boundary
    contour = (front[f0] != front1) | (boundary & front[f0])  # (E,)
    idx = torch.nonzero(contour).squeeze(1)
    edges = topo.edges[idx]  # (C, 2)
    inner = torch.where(front[f0[idx]], topo.edge_opposite[idx, 0], topo.edge_opposite[idx, 1])  # (C,)
    a, b, o = xy[edges[:, 0]], xy[edges[:, 1]], xy[inner]
    cross = (b[:, 0] - a[:, 0]) * (o[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (o[:, 0] - a[:, 0])  # (C,)
    return edges, torch.where(cross >= 0, 1.0, -1.0).to(xy.dtype)


def _segment_candidates(
    a: torch.Tensor, b: torch.Tensor, size: int, margin: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pixels within `margin` of each segment a -> b (pixel coordinates, centres at +0.5).

    Returns:
        pixel (T,) flat indices row * S + col, segment (T,) ids, dist (T,) distance from the pixel centre to the
        segment.
    """
    device = a.device
    lo = (torch.minimum(a, b) - margin - 0.5).ceil().clamp(0, size - 1).long()  # (C, 2)
    hi = (torch.maximum(a, b) + margin - 0.5).floor().clamp(-1, size - 1).long()  # (C, 2)
    extent = (hi - lo + 1).clamp(min=0)  # (C, 2)
    counts = extent[:, 0] * extent[:, 1]  # (C,)
    total = int(counts.sum())
    if total == 0:
        empty = torch.empty(0, dtype=torch.long, device=device)
        return empty, empty, torch.empty(0, dtype=a.dtype, device=device)
    seg = torch.repeat_interleave(torch.arange(len(a), device=device), counts, output_size=total)  # (T,)
    local = torch.arange(total, device=device) - (torch.cumsum(counts, 0) - counts)[seg]  # (T,)
    span = extent[seg, 0]
    col = lo[seg, 0] + local % span
    row = lo[seg, 1] + local // span
    p = torch.stack([col.to(a.dtype) + 0.5, row.to(a.dtype) + 0.5], dim=-1)  # (T, 2)
    d = b[seg] - a[seg]  # (T, 2)
    t = (((p - a[seg]) * d).sum(-1) / (d * d).sum(-1).clamp(min=1e-12)).clamp(0.0, 1.0)  # (T,)
    dist = (p - a[seg] - t[:, None] * d).norm(dim=-1)  # (T,)
    keep = dist <= margin
    return (row * size + col)[keep], seg[keep], dist[keep]


def _mixed_neighbourhood(hard: torch.Tensor, size: int) -> torch.Tensor:
    """(6, S * S) bool: pixels whose 3x3 neighbourhood holds both covered and uncovered pixels."""
    img = hard.reshape(-1, 1, size, size).float()  # (6, 1, S, S)
    dil = F.max_pool2d(img, 3, stride=1, padding=1)
    ero = -F.max_pool2d(-img, 3, stride=1, padding=1)
    return (dil != ero).reshape(hard.shape)


@torch.no_grad()
def visibility(
    vertices: torch.Tensor, topo: Topology, camera: Camera, size: int, *, margin: float = 1.0
) -> Visibility:
    """Rasterise the six views (z-buffer, front-facing triangles only) and pair each silhouette pixel with its
    nearest contour edge.

    Args:
        vertices: (V, 3) export-frame positions (outward winding). topo: the mesh's `Topology`.
        camera: the six view cameras. size: image size S.
        margin: how far (pixels) from a contour edge a silhouette pixel may be to get one.

    Returns:
        `Visibility` on the vertices' device.
    """
    n_pix = size * size
    proj = camera.project(vertices.detach())  # (6, V, 3) col, row, depth
    axes = _cameras.view_axes(dtype=vertices.dtype, device=vertices.device)  # (6, 3, 3)
    front = face_normals(vertices.detach(), topo.faces) @ axes[:, 2].T > 0  # (F, 6) facing each viewer
    hard = torch.zeros(NUM_VIEWS, n_pix, dtype=torch.bool, device=vertices.device)
    pixels, faces, edge_pixels, edges_out, signs = [], [], [], [], []
    for k in range(NUM_VIEWS):
        # A closed, outward mesh shows only front-facing triangles: the back half need not be rasterised.
        shown = torch.nonzero(front[:, k]).squeeze(1)  # (F_k,)
        pixel, face, _ = _texture.rasterize_screen(proj[k, :, :2], proj[k, :, 2], topo.faces[shown], size, size)
        pixels.append(pixel + k * n_pix)
        faces.append(shown[face])
        hard[k, pixel] = True
    mixed = _mixed_neighbourhood(hard, size)  # (6, S * S)
    for k in range(NUM_VIEWS):
        xy = proj[k, :, :2]  # (V, 2)
        edges, sign = _contour_edges(xy, front[:, k], topo)
        pix, seg, dist = _segment_candidates(xy[edges[:, 0]], xy[edges[:, 1]], size, margin)
        on_edge = mixed[k, pix]
        pix, seg, dist = pix[on_edge], seg[on_edge], dist[on_edge]
        chosen = _texture.first_best(pix, dist, n_pix)
        edge_pixels.append(pix[chosen] + k * n_pix)
        edges_out.append(edges[seg[chosen]])
        signs.append(sign[seg[chosen]])
    pixel, face = torch.cat(pixels), torch.cat(faces)
    view = pixel // n_pix
    key, pair = torch.unique(view * len(topo.faces) + face, return_inverse=True)  # (P,), (N,)
    return Visibility(
        pixel,
        face,
        pair,
        key // len(topo.faces),
        key % len(topo.faces),
        hard,
        torch.cat(edge_pixels),
        torch.cat(edges_out),
        torch.cat(signs),
        size,
        proj[..., :2].clone(),
    )


def render(vertices: torch.Tensor, topo: Topology, camera: Camera, vis: Visibility) -> Render:
    """Differentiable normals and soft silhouette of the six views at the pixels of `vis`.

    Args:
        vertices: (V, 3) export-frame positions (with grad). vis: from `visibility()` (same or nearby vertices).

    Returns:
        `Render` with gradients to `vertices` through the vertex normals, the barycentrics (recomputed at the pixel
        centres from the projected vertices) and the contour edges' positions.
    """
    size, num = vis.size, len(vertices)
    xy = camera.project(vertices)[..., :2].reshape(-1, 2)  # (6 * V, 2): vertex v of view k at k * V + v
    normals = vertex_normals(vertices, topo.faces)  # (V, 3)
    # Barycentrics are affine in the pixel position, so per (view, triangle) pair the interpolated normal is
    # m(p) = gx * p.x + gy * p.y + h; the pixels then only evaluate that (same values, far fewer operations).
    # index_select rather than fancy indexing: its backward is a plain index_add (much cheaper on the CPU).
    tri = topo.faces.index_select(0, vis.pair_face)  # (P, 3)
    tri_xy = xy.index_select(0, (tri + (vis.pair_view * num)[:, None]).reshape(-1)).reshape(-1, 3, 2)  # (P, 3, 2)
    a, b, c = tri_xy.unbind(1)  # (P, 2) each
    det = (b[:, 1] - c[:, 1]) * (a[:, 0] - c[:, 0]) + (c[:, 0] - b[:, 0]) * (a[:, 1] - c[:, 1])  # (P,)
    det = torch.where(det.abs() < 1e-9, torch.full_like(det, 1e-9), det)  # edge-on slivers: no blow-up
    ax = torch.stack([b[:, 1] - c[:, 1], c[:, 1] - a[:, 1]], dim=-1) / det[:, None]  # (P, 2) d l0/dx, d l1/dx
    ay = torch.stack([c[:, 0] - b[:, 0], a[:, 0] - c[:, 0]], dim=-1) / det[:, None]  # (P, 2) d l0/dy, d l1/dy
    a0 = -(ax * c[:, :1] + ay * c[:, 1:])  # (P, 2) l0, l1 at p = (0, 0)
    n = normals.index_select(0, tri.reshape(-1)).reshape(-1, 3, 3)  # (P, 3, 3)
    dn = n[:, :2] - n[:, 2:]  # (P, 2, 3): l2 = 1 - l0 - l1
    gx = (ax[..., None] * dn).sum(1)  # (P, 3)
    gy = (ay[..., None] * dn).sum(1)
    h = (a0[..., None] * dn).sum(1) + n[:, 2]
    # Soft coverage of silhouette pixels: a pixel-wide box cut by the contour edge's line.
    e = vis.edge + (vis.edge_pixel // (size * size) * num)[:, None]  # (B, 2) into xy
    ea, eb = xy[e[:, 0]], xy[e[:, 1]]  # (B, 2)
    q = _centres(vis.edge_pixel, size, xy.dtype)  # (B, 2)
    d = eb - ea
    cross = d[:, 0] * (q[:, 1] - ea[:, 1]) - d[:, 1] * (q[:, 0] - ea[:, 0])  # (B,)
    signed = vis.edge_sign * cross / d.norm(dim=-1).clamp(min=1e-9)  # (B,) pixels, > 0 inside
    return Render(gx, gy, h, (0.5 + signed).clamp(0.0, 1.0), vis)


class _PixelCosine(torch.autograd.Function):
    """cos(m(p), t) per pixel with m(p) = gx[pair] * p.x + gy[pair] * p.y + h[pair], backward by hand:
    d cos / d m = (t - cos * m / |m|) / |m|, gathered back to the pairs with index_add."""

    @staticmethod
    def forward(ctx, gx, gy, h, pair, p, target):
        px, py = p[:, :1], p[:, 1:]  # (N, 1)
        m = gx.index_select(0, pair) * px + gy.index_select(0, pair) * py + h.index_select(0, pair)  # (N, 3)
        length = m.norm(dim=-1, keepdim=True).clamp(min=1e-12)  # (N, 1)
        unit = m / length
        cos = (unit * target).sum(-1)  # (N,)
        ctx.save_for_backward(unit, length, cos, pair, p, target)
        ctx.num_pairs = len(h)
        return cos

    @staticmethod
    def backward(ctx, grad):
        unit, length, cos, pair, p, target = ctx.saved_tensors
        g = (target - cos[:, None] * unit) * (grad[:, None] / length)  # (N, 3) d loss / d m
        zeros = torch.zeros(ctx.num_pairs, 3, dtype=g.dtype, device=g.device)
        grad_h = zeros.index_add(0, pair, g)
        grad_gx = zeros.index_add(0, pair, g * p[:, :1])
        grad_gy = zeros.index_add(0, pair, g * p[:, 1:])
        return grad_gx, grad_gy, grad_h, None, None, None


# --------------------------------------------------------------------------------------------- Large Steps


class _SparseSolver:
    """Solves (I + λL) x = b for the fixed mesh: cholespy's sparse Cholesky (CPU and CUDA) when installed, else
    SciPy's sparse LU on the host."""

    def __init__(self, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, n: int):
        self.device = values.device
        self.n = n
        try:
            from cholespy import CholeskySolverF, MatrixType
        except ImportError:  # pragma: no cover - cholespy is in requirements.txt; SciPy is the fallback
            import scipy.sparse
            import scipy.sparse.linalg

            m = scipy.sparse.coo_matrix(
                (values.double().cpu().numpy(), (rows.cpu().numpy(), cols.cpu().numpy())), shape=(n, n)
            ).tocsc()
            self._lu = scipy.sparse.linalg.splu(m)
            self._chol = None
            self.backend = "scipy-splu"
        else:
            self._chol = CholeskySolverF(n, rows.int(), cols.int(), values.double(), MatrixType.COO)
            self.backend = "cholespy"

    def solve(self, b: torch.Tensor) -> torch.Tensor:
        """x (n, k) with (I + λL) x = b (n, k), float32."""
        if self._chol is not None:
            b = b.detach().float().contiguous()
            x = torch.zeros_like(b)
            self._chol.solve(b, x)
            return x
        x = self._lu.solve(b.detach().double().cpu().numpy())
        return torch.from_numpy(x).to(device=self.device, dtype=torch.float32)


class _Solve(torch.autograd.Function):
    """x = M^-1 u with M symmetric, so the backward pass is another solve: grad_u = M^-1 grad_x."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, solver: _SparseSolver) -> torch.Tensor:
        ctx.solver = solver
        return solver.solve(u)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return ctx.solver.solve(grad), None


class LargeSteps:
    """The Large Steps parameterisation u = (I + λL) x with L the uniform (combinatorial) graph Laplacian."""

    def __init__(self, topo: Topology, lam: float, device: torch.device):
        n = topo.num_vertices
        e = topo.edges.to(device)
        i = torch.cat([e[:, 0], e[:, 1]])  # (2E,)
        j = torch.cat([e[:, 1], e[:, 0]])
        degree = torch.zeros(n, device=device).index_add_(0, i, torch.ones(len(i), device=device))  # (V,)
        diag = torch.arange(n, device=device)
        self.rows = torch.cat([diag, i])
        self.cols = torch.cat([diag, j])
        self.values = torch.cat([1.0 + lam * degree, torch.full((len(i),), -lam, device=device)])
        index = torch.stack([self.rows, self.cols])
        self.matrix = torch.sparse_coo_tensor(index, self.values, (n, n), check_invariants=False).coalesce()
        self.solver = _SparseSolver(self.rows, self.cols, self.values, n)

    def to_differential(self, x: torch.Tensor) -> torch.Tensor:
        """u = (I + λL) x, (V, 3)."""
        return torch.sparse.mm(self.matrix, x)

    def from_differential(self, u: torch.Tensor) -> torch.Tensor:
        """x = (I + λL)^-1 u, (V, 3), differentiable."""
        return _Solve.apply(u, self.solver)


class AdamUniform:
    """Adam with one step size for the whole parameter (the largest second moment), as Large Steps prescribes:
    per-coordinate scaling would undo the smoothing of the parameterisation."""

    def __init__(self, param: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.param, self.lr, self.betas, self.eps = param, lr, betas, eps
        self.m = torch.zeros_like(param)
        self.v = torch.zeros_like(param)
        self.t = 0

    @torch.no_grad()
    def step(self) -> None:
        g = self.param.grad
        b1, b2 = self.betas
        self.t += 1
        self.m.mul_(b1).add_(g, alpha=1 - b1)
        self.v.mul_(b2).addcmul_(g, g, value=1 - b2)
        m_hat = self.m / (1 - b1**self.t)
        v_max = (self.v / (1 - b2**self.t)).max()
        self.param.sub_(self.lr * m_hat / (v_max.sqrt() + self.eps))
        self.param.grad = None


# --------------------------------------------------------------------------------------------- targets and losses


@dataclass
class Targets:
    """The six views' targets, flattened over pixels (S * S)."""

    normal: torch.Tensor  # (6, S * S, 3) unit export-frame normals
    mask: torch.Tensor  # (6, S * S) float 0 / 1
    weight: torch.Tensor  # (6, S * S) reliability of each normal pixel in [0, 1] (0 outside the mask)
    size: int


def _images_to_tensor(images: Sequence[Image.Image] | torch.Tensor, mode: str) -> torch.Tensor:
    """6 PIL images -> (6, H, W, C) float in [0, 1]; a tensor (6, C, H, W) / (6, H, W) in [0, 1] passes through."""
    if isinstance(images, torch.Tensor):
        t = images.detach().float()
        return t[..., None] if t.dim() == 3 else t.permute(0, 2, 3, 1)
    if len(images) != NUM_VIEWS:
        raise ValueError(f"expected {NUM_VIEWS} images in VIEW_NAMES order, got {len(images)}")
    arrays = [np.asarray(im.convert(mode), dtype=np.float32) / 255.0 for im in images]
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(f"the {NUM_VIEWS} images differ in size: {[a.shape for a in arrays]}")
    t = torch.from_numpy(np.stack(arrays))
    return t[..., None] if t.dim() == 3 else t


def _erosion_depth(mask: torch.Tensor, steps: int) -> torch.Tensor:
    """(6, S, S) float: how many 3x3 erosions each mask pixel survives, up to `steps` (0 on the mask's rim)."""
    cur = mask[:, None].float()  # (6, 1, S, S)
    depth = torch.zeros_like(cur)
    for _ in range(steps):
        cur = -F.max_pool2d(-cur, 3, stride=1, padding=1)
        depth += cur
    return depth[:, 0]


def make_targets(
    normals: Sequence[Image.Image] | torch.Tensor,
    masks: Sequence[Image.Image] | torch.Tensor,
    *,
    device: torch.device,
    rim: int = 3,
    grazing: float = 0.3,
) -> Targets:
    """Decode the normal maps and masks and weigh each normal pixel by how far it can be trusted.

    Args:
        normals: 6 PIL RGB normal maps, RGB = (n + 1) / 2 with n in the front camera's OpenGL frame (= the export
            frame), or a (6, 3, S, S) tensor in [0, 1]. masks: 6 PIL "L" (255 = object) or (6, S, S) in [0, 1].
        rim: normal pixels within `rim` pixels of the mask's edge are down-weighted linearly (generated normals
            and masks disagree most there). grazing: normals whose cosine to the view direction is below this are
            down-weighted linearly to 0 (seen edge-on, a pixel averages very different normals).

    Returns:
        `Targets` on `device`.
    """
    n = _images_to_tensor(normals, "RGB")  # (6, S, S, 3)
    m = _images_to_tensor(masks, "L")[..., 0]  # (6, S, S)
    if n.shape[:3] != m.shape or n.shape[-1] != 3 or n.shape[1] != n.shape[2]:
        raise ValueError(f"normal maps {tuple(n.shape)} and masks {tuple(m.shape)} must be 6 square images alike")
    size = n.shape[1]
    n, m = n.to(device), (m.to(device) >= 0.5)
    vec = n * 2.0 - 1.0  # (6, S, S, 3)
    length = vec.norm(dim=-1)
    unit = vec / length.clamp(min=1e-6)[..., None]
    axes = _cameras.view_axes(device=device)  # (6, 3, 3)
    facing = (unit * axes[:, None, None, 2]).sum(-1)  # (6, S, S) cosine to each view's direction
    weight = (facing / grazing).clamp(0.0, 1.0) * (length > 0.5)  # (6, S, S) undecodable pixels: 0
    weight = weight * ((_erosion_depth(m, rim) + 1.0) / (rim + 1.0)).clamp(max=1.0) * m
    return Targets(
        unit.reshape(NUM_VIEWS, -1, 3), m.reshape(NUM_VIEWS, -1).float(), weight.reshape(NUM_VIEWS, -1), size
    )


def silhouette_agreement(targets: Targets) -> torch.Tensor:
    """Per view (6,): how well the normal map agrees with its own mask's outline.

    On a mask's rim the true normal points outwards in the image plane; the score is the mean cosine between the
    map's normal and that outward direction (from the blurred mask's gradient) over the rim pixels: 0.98 for the
    renders of the tests' ground truth, 0.0 for a flat map, 0.29 for the opposite side view's map. NaN where the
    mask has no rim.
    """
    size = targets.size
    m = targets.mask.reshape(NUM_VIEWS, 1, size, size)
    blur = F.avg_pool2d(m, 5, stride=1, padding=2, count_include_pad=False)
    gx = (blur[..., :, 2:] - blur[..., :, :-2]) / 2  # (6, 1, S, S-2) d/dcol
    gy = (blur[..., 2:, :] - blur[..., :-2, :]) / 2  # (6, 1, S-2, S) d/drow
    gx = F.pad(gx, (1, 1, 0, 0))[:, 0].reshape(NUM_VIEWS, -1)  # (6, S * S)
    gy = F.pad(gy, (0, 0, 1, 1))[:, 0].reshape(NUM_VIEWS, -1)
    axes = _cameras.view_axes(device=m.device)  # (6, 3, 3)
    # Outward = down the mask's gradient; image rows grow downwards, camera up is -row.
    outward = -gx[..., None] * axes[:, None, 0] + gy[..., None] * axes[:, None, 1]  # (6, S * S, 3)
    norm = outward.norm(dim=-1)
    rim = (targets.mask > 0) & (_erosion_depth(m[:, 0] > 0, 1).reshape(NUM_VIEWS, -1) == 0) & (norm > 1e-3)
    cos = (F.normalize(outward, dim=-1) * targets.normal).sum(-1)  # (6, S * S)
    count = rim.sum(-1)
    return torch.where(count > 0, (cos * rim).sum(-1) / count.clamp(min=1), torch.full_like(norm[:, 0], math.nan))


def view_losses(rendered: Render, targets: Targets) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-view normal and silhouette errors.

    Returns:
        normal (6,): the reliability-weighted mean of 1 - cos(rendered, target) over the target's mask, a masked
        pixel the mesh does not cover counting as 1 (so shrinking never pays); silhouette (6,): the sum of squared
        coverage differences over the mask's area.
    """
    vis = rendered.vis
    if id(targets) not in vis.cache:  # what does not change until the next rasterisation
        n_pix = vis.size * vis.size
        band = torch.zeros(NUM_VIEWS * n_pix, dtype=torch.bool, device=vis.hard.device)
        band[vis.edge_pixel] = True
        hard_err = ((vis.hard.float() - targets.mask) ** 2 * ~band.reshape(NUM_VIEWS, -1)).sum(-1)  # (6,)
        vis.cache[id(targets)] = (
            vis.pixel // n_pix,  # (N,) view of each covered pixel
            targets.weight.reshape(-1)[vis.pixel],  # (N,)
            targets.normal.reshape(-1, 3)[vis.pixel],  # (N, 3)
            (targets.weight * ~vis.hard).sum(-1),  # (6,) masked pixels nobody covers: error 1, no gradient
            vis.edge_pixel // n_pix,  # (B,)
            targets.mask.reshape(-1)[vis.edge_pixel],  # (B,)
            hard_err,  # (6,) squared coverage error off the silhouette pixels
        )
    view, weight, target, uncovered, edge_view, edge_mask, hard_err = vis.cache[id(targets)]
    cos = rendered.cosine(target)  # (N,)
    covered = torch.zeros(NUM_VIEWS, dtype=cos.dtype, device=cos.device).index_add(0, view, weight * (1.0 - cos))
    normal = (covered + uncovered) / targets.weight.sum(-1).clamp(min=1e-6)  # (6,)
    # Silhouette: soft coverage on the silhouette pixels, the z-buffer's elsewhere.
    soft = (rendered.edge_coverage - edge_mask) ** 2  # (B,)
    sil = (hard_err + torch.zeros_like(hard_err).index_add(0, edge_view, soft)) / targets.mask.sum(-1).clamp(min=1.0)
    return normal, sil


# --------------------------------------------------------------------------------------------- mesh checks


def self_intersections(vertices: np.ndarray, faces: np.ndarray, *, max_pairs: int = 2**22) -> int:
    """Number of pairs of triangles that share no vertex and intersect (an edge of one crosses the other).

    Broad phase: a uniform grid of cells about two mean edge lengths wide; narrow phase: a vectorised
    segment-triangle test of the six edges of each candidate pair (float64). Coplanar overlap is not counted.

    Args:
        vertices: (V, 3) float. faces: (F, 3) int. max_pairs: candidate pairs tested per batch (memory bound).

    Returns:
        The number of intersecting pairs (0 for a clean mesh).
    """
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    if len(f) < 2:
        return 0
    tri = v[f]  # (F, 3, 3)
    lo, hi = tri.min(axis=1), tri.max(axis=1)  # (F, 3)
    cell = 2.0 * np.linalg.norm(tri[:, 1] - tri[:, 0], axis=1).mean() + 1e-12
    origin = lo.min(axis=0)
    clo = np.floor((lo - origin) / cell).astype(np.int64)  # (F, 3)
    chi = np.floor((hi - origin) / cell).astype(np.int64)
    ext = chi - clo + 1  # (F, 3)
    count = ext.prod(axis=1)  # (F,) cells per triangle
    face_of = np.repeat(np.arange(len(f)), count)
    local = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count)
    ex, ey = ext[face_of, 0], ext[face_of, 1]
    ijk = clo[face_of] + np.stack([local % ex, (local // ex) % ey, local // (ex * ey)], axis=1)  # (T, 3)
    dims = ijk.max(axis=0) + 1
    key = (ijk[:, 0] * dims[1] + ijk[:, 1]) * dims[2] + ijk[:, 2]
    order = np.argsort(key, kind="stable")
    key, face_of = key[order], face_of[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    sizes = np.diff(np.r_[starts, len(key)])
    pairs = []
    for s in np.unique(sizes[sizes > 1]):  # cells with s triangles: all s * (s - 1) / 2 pairs at once
        group = face_of[starts[sizes == s][:, None] + np.arange(s)]  # (cells, s)
        ii, jj = np.triu_indices(s, k=1)
        pairs.append(np.stack([group[:, ii].ravel(), group[:, jj].ravel()], axis=1))
    if not pairs:
        return 0
    pairs = np.concatenate(pairs)
    pairs = np.unique(np.sort(pairs, axis=1), axis=0)  # (P, 2) each pair once
    a, b = pairs[:, 0], pairs[:, 1]
    shared = (f[a][:, :, None] == f[b][:, None, :]).any(axis=(1, 2))
    overlap = np.all((lo[a] <= hi[b]) & (lo[b] <= hi[a]), axis=1)
    pairs = pairs[~shared & overlap]
    hits = 0
    for start in range(0, len(pairs), max(1, max_pairs // 6)):
        p = pairs[start : start + max(1, max_pairs // 6)]
        t1, t2 = tri[p[:, 0]], tri[p[:, 1]]  # (P, 3, 3)
        hit = np.zeros(len(p), dtype=bool)
        for s_tri, t_tri in ((t1, t2), (t2, t1)):
            for i in range(3):
                hit |= _segment_hits_triangle(s_tri[:, i], s_tri[:, (i + 1) % 3], t_tri)
        hits += int(hit.sum())
    return hits


def _segment_hits_triangle(p: np.ndarray, q: np.ndarray, tri: np.ndarray, eps: float = 1e-9) -> np.ndarray:
    """(P,) bool: segment p -> q (P, 3) meets triangle tri (P, 3, 3), borders included (Moeller-Trumbore)."""
    a = tri[:, 0]
    e1, e2 = tri[:, 1] - a, tri[:, 2] - a
    d = q - p
    h = np.cross(d, e2)
    det = (e1 * h).sum(-1)
    ok = np.abs(det) > eps * np.linalg.norm(d, axis=-1) * np.linalg.norm(e1, axis=-1) * np.linalg.norm(e2, axis=-1)
    inv = np.where(ok, 1.0 / np.where(ok, det, 1.0), 0.0)
    s = p - a
    u = inv * (s * h).sum(-1)
    qv = np.cross(s, e1)
    v = inv * (d * qv).sum(-1)
    t = inv * (e2 * qv).sum(-1)
    return ok & (u >= 0) & (v >= 0) & (u + v <= 1) & (t >= 0) & (t <= 1)


def flipped_faces(before: torch.Tensor, after: torch.Tensor, faces: torch.Tensor) -> int:
    """Faces whose normal turned by more than 90 degrees between two vertex sets (folds)."""
    return int(((face_normals(before, faces) * face_normals(after, faces)).sum(-1) < 0).sum())


# --------------------------------------------------------------------------------------------- refinement


@dataclass
class RefineResult:
    """Result of `refine_mesh`.

    mesh: the refined mesh (same faces, same vertex order and visuals as the input), or the input itself when
    rejected. losses: "initial" / "final" per-view and total losses, "history" (total loss per iteration),
    "views_used". timings: seconds per phase. accepted: False when the input was kept. warnings: why views were
    dropped or the result rejected. settings: the options used.
    """

    mesh: trimesh.Trimesh
    losses: dict[str, Any]
    timings: dict[str, float]
    accepted: bool
    warnings: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)


def _loss_summary(normal: torch.Tensor, sil: torch.Tensor, weights: torch.Tensor, silhouette_weight: float) -> dict:
    data = (weights * (normal + silhouette_weight * sil)).sum() / weights.sum().clamp(min=1e-12)
    return {
        "data": float(data),
        "normal": [round(float(x), 6) for x in normal],
        "silhouette": [round(float(x), 6) for x in sil],
    }


def refine_mesh(
    mesh: trimesh.Trimesh,
    normals: Sequence[Image.Image] | torch.Tensor,
    masks: Sequence[Image.Image] | torch.Tensor,
    camera: Camera,
    *,
    iterations: int = 200,
    device: torch.device | str | None = None,
    seed: int = 0,
    lr: float = 3e-2,
    lam: float = 19.0,
    view_weights: Sequence[float] = DEFAULT_VIEW_WEIGHTS,
    silhouette_weight: float = 0.1,
    smooth_weight: float = 0.02,
    raster_every: int = 10,
    max_drift: float = 1.0,
    min_agreement: float = 0.5,
    max_input_angle: float = 60.0,
    check_intersections: bool = True,
) -> RefineResult:
    """Fit the mesh's vertices to the six normal maps and masks (the faces are kept).

    Args:
        mesh: the TripoSR mesh in the export frame (trimesh; its visuals are carried over).
        normals: 6 normal maps in `VIEW_NAMES` order as the multiview stage returns them (PIL RGB, (n + 1) / 2 in
            the front camera's OpenGL frame), or (6, 3, S, S) in [0, 1].
        masks: 6 PIL "L" images (255 = object) or (6, S, S) in [0, 1], aligned with the normal maps.
        camera: the fitted orthographic cameras (`texture_from_views(...).camera`); `camera.image_size` must be S.
        iterations: optimisation steps. device: where to run (default CPU). seed: recorded; the method draws no
            random numbers, so runs on one device are identical.
        lr: Adam step, as a fraction of the mesh's bounding radius. lam: Large Steps' λ (larger: smoother steps).
        view_weights: per-view weights (default: Wonder3D's own reconstruction's). silhouette_weight,
            smooth_weight: weights of the silhouette term and of the displacement's Laplacian energy.
        raster_every, max_drift: re-rasterise the visibility after this many steps, or sooner once a vertex has
            moved more than `max_drift` pixels in a view since the last time (barycentrics and contour distances
            are recomputed at every step regardless).
        min_agreement: views whose normal map agrees less than this with its mask's outline
            (`silhouette_agreement`) are left out, with a warning. max_input_angle: views whose mean normal angle
            to the input mesh exceeds this (degrees) are left out, with a warning.
        check_intersections: reject results that add self-intersections (`self_intersections`, ~0.1-0.5 s).

    Returns:
        `RefineResult`. When the data loss (normal + silhouette over the views used) does not go down, something
        degenerates, folds or self-intersections appear, or no view is usable, the input mesh is returned with
        accepted=False and a warning.
    """
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    warnings: list[str] = []
    device = torch.device("cpu") if device is None else torch.device(device)
    if iterations < 0 or raster_every < 1:
        raise ValueError("iterations must be >= 0 and raster_every >= 1")
    if len(view_weights) != NUM_VIEWS:
        raise ValueError(f"view_weights needs {NUM_VIEWS} values, got {len(view_weights)}")
    if len(mesh.faces) == 0:
        raise ValueError("cannot refine an empty mesh")
    settings = {
        "iterations": iterations,
        "device": str(device),
        "seed": seed,
        "lr": lr,
        "lam": lam,
        "view_weights": [float(w) for w in view_weights],
        "silhouette_weight": silhouette_weight,
        "smooth_weight": smooth_weight,
        "raster_every": raster_every,
        "max_drift": max_drift,
    }

    def reject(reason: str, losses: dict[str, Any]) -> RefineResult:
        warnings.append(f"refinement rejected, input mesh kept: {reason}")
        timings["total"] = time.perf_counter() - t_start
        return RefineResult(mesh, losses, timings, False, warnings, settings)

    targets = make_targets(normals, masks, device=device)
    size = targets.size
    if int(camera.image_size) != size:
        raise ValueError(f"camera.image_size {camera.image_size} differs from the maps' size {size}")
    x0 = torch.as_tensor(np.ascontiguousarray(mesh.vertices), dtype=torch.float32, device=device)  # (V, 3)
    faces = torch.as_tensor(np.ascontiguousarray(mesh.faces), dtype=torch.long, device=device)  # (F, 3)
    if float(face_normals(x0.double(), faces).mul(x0.double()[faces[:, 0]]).sum()) < 0:
        # Negative signed volume: the faces wind inwards; the renderer needs outward normals.
        faces = faces.flip(1)
        warnings.append("the mesh's faces wind inwards (negative volume); refined with outward winding")
    topo = mesh_topology(faces, len(x0))
    radius = float((x0 - x0.mean(0)).norm(dim=-1).max())
    steps = LargeSteps(topo, lam, device)
    neighbours = torch.sparse_coo_tensor(
        torch.stack(
            [torch.cat([topo.edges[:, 0], topo.edges[:, 1]]), torch.cat([topo.edges[:, 1], topo.edges[:, 0]])]
        ),
        torch.ones(2 * len(topo.edges), device=device),
        (len(x0), len(x0)),
        check_invariants=False,
    ).coalesce()
    degree = torch.sparse.sum(neighbours, dim=1).to_dense().clamp(min=1)[:, None]  # (V, 1)
    edge_len = float((x0[topo.edges[:, 0]] - x0[topo.edges[:, 1]]).norm(dim=-1).mean())
    timings["setup"] = time.perf_counter() - t_start

    # Which views to trust: non-empty masks, normal maps consistent with their outline and with the input mesh.
    t = time.perf_counter()
    weights = torch.tensor([float(w) for w in view_weights], device=device)  # (6,)
    vis0 = visibility(x0, topo, camera, size)
    with torch.no_grad():
        r0 = render(x0, topo, camera, vis0)
        normal0, sil0 = view_losses(r0, targets)
        img0, _ = r0.images()  # (6, S * S, 3)
    agreement = silhouette_agreement(targets)
    cover = targets.mask.mean(-1)  # (6,)
    cos0 = (img0 * targets.normal).sum(-1).clamp(-1, 1)  # (6, S * S)
    both = (targets.weight > 0) & vis0.hard
    angle0 = torch.rad2deg(torch.acos(cos0) * both).sum(-1) / both.sum(-1).clamp(min=1)  # (6,)
    names = _cameras.VIEW_NAMES
    for k in range(NUM_VIEWS):
        reason = None
        if weights[k] <= 0:
            continue
        if cover[k] < 1e-3:
            reason = "its mask is empty"
        elif not agreement[k] >= min_agreement:
            reason = f"its normal map disagrees with its mask's outline (agreement {float(agreement[k]):.2f})"
        elif both[k].sum() == 0 or angle0[k] > max_input_angle:
            reason = f"its normals are {float(angle0[k]):.0f} degrees from the input mesh's on average"
        if reason:
            weights[k] = 0.0
            warnings.append(f"view {names[k]} left out of the refinement: {reason}")
    initial = _loss_summary(
        normal0, sil0, weights.clamp(min=1e-12) if weights.sum() == 0 else weights, silhouette_weight
    )
    losses: dict[str, Any] = {
        "initial": initial,
        "views_used": [names[k] for k in range(NUM_VIEWS) if weights[k] > 0],
        "silhouette_agreement": [round(float(a), 4) for a in agreement],
        "input_normal_angle_deg": [round(float(a), 3) for a in angle0],
        "history": [],
    }
    timings["checks"] = time.perf_counter() - t
    if weights.sum() == 0:
        return reject("no usable view", losses)

    # Large Steps: optimise u = (I + λL) x with a uniform Adam.
    t = time.perf_counter()
    u = steps.to_differential(x0).clone().requires_grad_(True)  # (V, 3)
    opt = AdamUniform(u, lr * radius)
    best_loss, best_x, best_it, vis = math.inf, x0, 0, vis0
    raster_time, rasters, last = 0.0, 1, 0
    for it in range(iterations + 1):
        x = steps.from_differential(u)  # (V, 3)
        if it > 0:
            drift = float((camera.project(x.detach())[..., :2] - vis.xy).abs().amax())
            if it - last >= raster_every or drift > max_drift:
                t_r = time.perf_counter()
                vis, last, rasters = visibility(x, topo, camera, size), it, rasters + 1
                raster_time += time.perf_counter() - t_r
        normal, sil = view_losses(render(x, topo, camera, vis), targets)
        data = (weights * (normal + silhouette_weight * sil)).sum() / weights.sum()
        disp = x - x0
        lap = disp - torch.sparse.mm(neighbours, disp) / degree  # (V, 3) displacement's uniform Laplacian
        smooth = (lap**2).sum(-1).mean() / edge_len**2
        total = data + smooth_weight * smooth
        value = float(total.detach())
        losses["history"].append(round(value, 6))
        if not math.isfinite(value):
            break
        if value < best_loss:
            best_loss, best_x, best_it = value, x.detach().clone(), it
        if it == iterations:
            break
        total.backward()
        opt.step()
    timings["optimise"] = time.perf_counter() - t
    timings["rasterise"] = raster_time
    losses["rasterisations"] = rasters

    # Accept only what is better than the input, finite and not folded.
    t = time.perf_counter()
    x1 = best_x
    losses["best_iteration"] = best_it
    if best_it == 0:
        return reject("no step lowered the loss", losses)
    if not torch.isfinite(x1).all():
        return reject("non-finite vertices", losses)
    with torch.no_grad():
        vis1 = visibility(x1, topo, camera, size)
        normal1, sil1 = view_losses(render(x1, topo, camera, vis1), targets)
    final = _loss_summary(normal1, sil1, weights, silhouette_weight)
    losses["final"] = final
    folds = flipped_faces(x0, x1, faces)
    losses["flipped_faces"] = folds
    if not math.isfinite(final["data"]) or final["data"] >= initial["data"]:
        return reject(f"the loss did not go down ({initial['data']:.5f} -> {final['data']:.5f})", losses)
    if folds > max(1, len(faces) // 1000):
        return reject(f"{folds} faces folded over", losses)
    if check_intersections:
        f_np = faces.cpu().numpy()
        after = self_intersections(x1.cpu().numpy(), f_np)
        before = self_intersections(x0.cpu().numpy(), f_np) if after else 0  # a clean result needs no comparison
        losses["self_intersections"] = {"input": before if after else None, "result": after}
        if after > before:
            return reject(f"self-intersections went from {before} to {after}", losses)
    timings["accept"] = time.perf_counter() - t
    out = mesh.copy()
    out.vertices = x1.cpu().double().numpy()
    timings["total"] = time.perf_counter() - t_start
    return RefineResult(out, losses, timings, True, warnings, settings)
