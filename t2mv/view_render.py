"""The differentiable orthographic renderer of the six views (plain PyTorch, CPU or CUDA, no compiled extension).

For the six view cameras of `t2mv.view_texture` it renders the mesh's per-pixel normal (export frame = the front
camera's OpenGL frame, which is the frame of Wonder3D's normal maps) and a soft silhouette; `t2mv.view_refine` fits
the mesh to the normal maps and masks with it.

- Visibility (which triangle each pixel centre shows) comes from the z-buffer rasteriser
  `triposr.texture.rasterize_screen` and has no gradient.
- Barycentrics are recomputed from the projected vertex positions at the pixel centres, so the interpolated vertex
  normals carry gradients to the vertex positions.
- Silhouette: pixels where coverage changes within their 3x3 neighbourhood take a soft coverage
  clamp(0.5 + d, 0, 1), with d the signed distance (pixels, positive inside) from the pixel centre to the nearest
  projected contour edge (an edge between a front- and a back-facing triangle). That is the area a straight edge
  covers of a pixel-wide box, and it gives the silhouette its gradient to the contour vertices (the role of
  nvdiffrast's `antialias`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from triposr import texture as _texture
from wonder3d_perflow import cameras as _cameras

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
    return _VertexNormals.apply(vertices, faces)


class _VertexNormals(torch.autograd.Function):
    """`vertex_normals` with its backward by hand (~2x faster on the CPU than the composed ops' at 39k faces):
    n = a / |a|, a_v = Σ_(faces f at v) e1_f x e2_f with e1 = v1 - v0, e2 = v2 - v0. Backward: da = (g - n (n · g))
    / |a|; per face, dF = Σ_corners da; de1 = e2 x dF, de2 = dF x e1; dv1 += de1, dv2 += de2, dv0 -= de1 + de2."""

    @staticmethod
    def forward(ctx, vertices, faces):
        f0, f1, f2 = faces.unbind(1)  # (F,) each
        v0 = vertices.index_select(0, f0)
        e1, e2 = vertices.index_select(0, f1) - v0, vertices.index_select(0, f2) - v0  # (F, 3) each
        fn = torch.linalg.cross(e1, e2, dim=-1)  # (F, 3)
        acc = torch.zeros_like(vertices).index_add_(0, f0, fn).index_add_(0, f1, fn).index_add_(0, f2, fn)  # (V, 3)
        length = acc.norm(dim=-1, keepdim=True).clamp(min=1e-12)  # (V, 1)
        unit = acc / length
        ctx.save_for_backward(faces, e1, e2, unit, length)
        return unit

    @staticmethod
    def backward(ctx, grad):
        faces, e1, e2, unit, length = ctx.saved_tensors
        f0, f1, f2 = faces.unbind(1)
        d_acc = (grad - unit * (unit * grad).sum(-1, keepdim=True)) / length  # (V, 3)
        d_fn = d_acc.index_select(0, f0) + d_acc.index_select(0, f1) + d_acc.index_select(0, f2)  # (F, 3)
        d_e1, d_e2 = torch.linalg.cross(e2, d_fn, dim=-1), torch.linalg.cross(d_fn, e1, dim=-1)  # (F, 3) each
        d_v = torch.zeros_like(grad).index_add_(0, f1, d_e1).index_add_(0, f2, d_e2).index_add_(0, f0, -(d_e1 + d_e2))
        return d_v, None


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

    coef: torch.Tensor  # (P, 9): gx, gy, h side by side, each (P, 3)
    edge_coverage: torch.Tensor  # (B,) soft coverage of each silhouette pixel in [0, 1]
    vis: Visibility

    @property
    def normal(self) -> torch.Tensor:
        """(N, 3) unit export-frame normal at each covered pixel (differentiable)."""
        c = self.coef.index_select(0, self.vis.pair)  # (N, 9)
        p = self._pixel_centres()  # (N, 2)
        return F.normalize(c[:, 0:3] * p[:, :1] + c[:, 3:6] * p[:, 1:] + c[:, 6:9], dim=-1, eps=1e-12)  # (N, 3)

    def cosine(self, target: torch.Tensor) -> torch.Tensor:
        """(N,) cosine between each pixel's normal and target (N, 3) unit vectors: `(normal * target).sum(-1)`, in
        one fused autograd node (the optimiser's hot path: ~3x fewer tensor passes than the composed ops)."""
        return _PixelCosine.apply(self.coef, self.vis.pair, self._pixel_centres(), target)

    def _pixel_centres(self) -> torch.Tensor:
        return _centres(self.vis.pixel, self.vis.size, self.coef.dtype)

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


def _coverage_gradient(hard: torch.Tensor, size: int) -> torch.Tensor:
    """(6, S * S, 2): the gradient (d/dx, d/dy in pixels) of the 3x3-blurred z-buffer coverage: it points inwards."""
    blur = F.avg_pool2d(hard.reshape(-1, 1, size, size).float(), 3, stride=1, padding=1, count_include_pad=False)
    gx = F.pad((blur[..., :, 2:] - blur[..., :, :-2]) / 2, (1, 1, 0, 0))  # (6, 1, S, S)
    gy = F.pad((blur[..., 2:, :] - blur[..., :-2, :]) / 2, (0, 0, 1, 1))
    return torch.stack([gx, gy], dim=-1).reshape(hard.shape[0], -1, 2)


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
    inward = _coverage_gradient(hard, size)  # (6, S * S, 2)
    for k in range(NUM_VIEWS):
        xy = proj[k, :, :2]  # (V, 2)
        edges, sign = _contour_edges(xy, front[:, k], topo)
        pix, seg, dist = _segment_candidates(xy[edges[:, 0]], xy[edges[:, 1]], size, margin)
        on_edge = mixed[k, pix]
        pix, seg, dist = pix[on_edge], seg[on_edge], dist[on_edge]
        chosen = _texture.first_best(pix, dist, n_pix)
        edge = edges[seg[chosen]]  # (B_k, 2)
        # Which side of the edge is inside: the front face's side is ill-defined at a contour, where that face is
        # seen almost edge-on (its third vertex projects within 0.1 px of the edge on a plain sphere, and 8 % of
        # its silhouette pixels got the wrong side). The z-buffer's coverage says where the object is; the face's
        # side is kept only where the coverage gradient runs along the edge (a one-pixel-thin part).
        d = xy[edge[:, 1]] - xy[edge[:, 0]]  # (B_k, 2)
        g = inward[k, pix[chosen]]  # (B_k, 2)
        along = -d[:, 1] * g[:, 0] + d[:, 0] * g[:, 1]  # (B_k,) left normal of a -> b, dotted with the gradient
        clear = along.abs() > 0.1 * d.norm(dim=-1) * g.norm(dim=-1)
        edge_pixels.append(pix[chosen] + k * n_pix)
        edges_out.append(edge)
        signs.append(torch.where(clear, torch.sign(along), sign[seg[chosen]]))
    pixel, face = torch.cat(pixels), torch.cat(faces)
    view = pixel // n_pix
    key, pair = torch.unique(view * len(topo.faces) + face, return_inverse=True)  # (P,), (N,)
    # Pixels grouped by pair: the render's per-pixel gathers from, and its backward's scatters into, the pairs then
    # walk memory in order (the backward's index_add ~2.5x faster at 157k pixels than in image order).
    order = torch.argsort(pair, stable=True)
    pixel, face, pair = pixel[order], face[order], pair[order]
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


def render(
    vertices: torch.Tensor, topo: Topology, camera: Camera, vis: Visibility, *, projected: torch.Tensor | None = None
) -> Render:
    """Differentiable normals and soft silhouette of the six views at the pixels of `vis`.

    Args:
        vertices: (V, 3) export-frame positions (with grad). vis: from `visibility()` (same or nearby vertices).
        projected: `camera.project(vertices)` (6, V, 3) when the caller has it already (with grad).

    Returns:
        `Render` with gradients to `vertices` through the vertex normals, the barycentrics (recomputed at the pixel
        centres from the projected vertices) and the contour edges' positions.
    """
    size, num = vis.size, len(vertices)
    projected = camera.project(vertices) if projected is None else projected  # (6, V, 3)
    xy = projected[..., :2].reshape(-1, 2)  # (6 * V, 2): vertex v of view k at k * V + v
    normals = vertex_normals(vertices, topo.faces)  # (V, 3)
    # Barycentrics are affine in the pixel position, so per (view, triangle) pair the interpolated normal is
    # m(p) = gx * p.x + gy * p.y + h; the pixels then only evaluate that (same values, far fewer operations).
    # index_select rather than fancy indexing: its backward is a plain index_add (much cheaper on the CPU).
    tri = topo.faces.index_select(0, vis.pair_face).reshape(-1)  # (3P,)
    tri_xy = xy.index_select(0, tri + (vis.pair_view * num).repeat_interleave(3)).reshape(-1, 3, 2)  # (P, 3, 2)
    coef = _PairCoefficients.apply(tri_xy, normals.index_select(0, tri).reshape(-1, 3, 3))  # (P, 9)
    # Soft coverage of silhouette pixels: a pixel-wide box cut by the contour edge's line.
    e = vis.edge + (vis.edge_pixel // (size * size) * num)[:, None]  # (B, 2) into xy
    ea, eb = xy[e[:, 0]], xy[e[:, 1]]  # (B, 2)
    q = _centres(vis.edge_pixel, size, xy.dtype)  # (B, 2)
    d = eb - ea
    cross = d[:, 0] * (q[:, 1] - ea[:, 1]) - d[:, 1] * (q[:, 0] - ea[:, 0])  # (B,)
    signed = vis.edge_sign * cross / d.norm(dim=-1).clamp(min=1e-9)  # (B,) pixels, > 0 inside
    return Render(coef, (0.5 + signed).clamp(0.0, 1.0), vis)


class _PairCoefficients(torch.autograd.Function):
    """Per (view, triangle) pair, the coefficients of the interpolated normal m(p) = gx * p.x + gy * p.y + h.

    With A the pair's rows (x_i, y_i, 1) of its three projected corners and N the rows n_i of their normals, the
    barycentric coefficients are W = A^-1 (l_i(p) = W[0, i] p.x + W[1, i] p.y + W[2, i], so that l_i(corner j) =
    δ_ij) and C = (gx; gy; h) = W N. Backward by hand, in closed form: dN = W^T G and dA = -W^T G C^T, i.e.
    dn_i = Σ_r W[r, i] G_r and d(x_i, y_i) = -(dn_i · gx, dn_i · gy). One node instead of ~40 small autograd ones
    (their backward was half the optimiser's time on the CPU at 88k pairs).

    forward(tri_xy (P, 3, 2), n (P, 3, 3)) -> (P, 9): gx, gy, h side by side.
    """

    @staticmethod
    def forward(ctx, tri_xy, n):
        # Component-major (2, 3, P) rows: elementwise work on contiguous rows is ~4x faster here than on (P, 3)
        # columns gathered by corner.
        t = tri_xy.permute(2, 1, 0).contiguous()  # (2 = x / y, 3 corners, P)
        t1, t2 = t.roll(-1, 1), t.roll(-2, 1)  # corner i + 1, i + 2
        wx, wy = t1[1] - t2[1], t2[0] - t1[0]  # (3, P) each: d l_i / dx, d l_i / dy, times det
        # Relative to corner c, in float32: products of absolute pixel coordinates (~128²) lose the sub-pixel
        # digits (measured: gradients 4 % off, against 0.06 % this way).
        det = wx[0] * (t[0, 0] - t[0, 2]) + wx[1] * (t[0, 1] - t[0, 2])  # (P,) twice the signed area, pixels²
        flat = det.abs() < 1e-9  # edge-on slivers: no blow-up (and no gradient, see backward)
        inv = 1.0 / torch.where(flat, torch.full_like(det, 1e-9), det)
        # l_i(p) = (wx_i (p.x - x_c) + wy_i (p.y - y_c)) / det + [i = c]: its value at p = (0, 0).
        w1 = -(wx * t[0, 2] + wy * t[1, 2]) * inv  # (3, P)
        w1[2] += 1.0
        w = torch.stack([wx * inv, wy * inv, w1]).permute(2, 0, 1).contiguous()  # (P, 3 rows x / y / 1, 3 corners)
        # C = W N written as W' (n_a - n_c; n_b - n_c; n_c) (rows of W sum to 0, 0, 1): l_i at p = (0, 0) reaches
        # ~±64 on a 2-pixel triangle, and multiplying it by the normals themselves rather than by their small
        # differences left float32 normals 4e-3 off.
        w_diff = w.clone()
        w_diff[:, :, 2] = torch.tensor([0.0, 0.0, 1.0], dtype=w.dtype, device=w.device)
        diff = torch.cat([n[:, :2] - n[:, 2:], n[:, 2:]], dim=1)  # (P, 3, 3)
        coef = torch.bmm(w_diff, diff).reshape(-1, 9)  # (P, 9)
        ctx.save_for_backward(w, coef, flat)
        return coef

    @staticmethod
    def backward(ctx, grad):
        w, coef, flat = ctx.saved_tensors
        dn = torch.bmm(w.transpose(1, 2), grad.reshape(-1, 3, 3))  # (P, corners, 3): Σ_r W[r, i] G_r
        dxy = -torch.bmm(dn, coef[:, 0:6].reshape(-1, 2, 3).transpose(1, 2))  # (P, corners, 2)
        return dxy.masked_fill(flat[:, None, None], 0.0), dn


class _PixelCosine(torch.autograd.Function):
    """cos(m(p), t) per pixel with m(p) = gx[pair] * p.x + gy[pair] * p.y + h[pair], backward by hand:
    d cos / d m = (t - cos * m / |m|) / |m|, gathered back to the pairs with index_add."""

    @staticmethod
    def forward(ctx, coef, pair, p, target):
        c = coef.index_select(0, pair)  # (N, 9): one gather of the 9 coefficients, one scatter back
        m = c[:, 0:3] * p[:, :1] + c[:, 3:6] * p[:, 1:] + c[:, 6:9]  # (N, 3)
        length = m.norm(dim=-1, keepdim=True).clamp(min=1e-12)  # (N, 1)
        unit = m / length
        cos = (unit * target).sum(-1)  # (N,)
        ctx.save_for_backward(unit, length, cos, pair, p, target)
        ctx.num_pairs = len(coef)
        return cos

    @staticmethod
    def backward(ctx, grad):
        unit, length, cos, pair, p, target = ctx.saved_tensors
        g = (target - cos[:, None] * unit) * (grad[:, None] / length)  # (N, 3) d loss / d m
        per_pixel = torch.cat([g * p[:, :1], g * p[:, 1:], g], dim=1)  # (N, 9)
        grad_coef = torch.zeros(ctx.num_pairs, 9, dtype=g.dtype, device=g.device).index_add(0, pair, per_pixel)
        return grad_coef, None, None, None
