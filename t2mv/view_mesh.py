"""Mesh hygiene and checks around the refinement (`t2mv.view_refine`): pure functions over vertex and face arrays.

- `manifold_faces` / `remesh`: what the isotropic remeshing takes (no face with a repeated corner, no edge shared by
  more than two faces) and the remeshing itself (gpytoolbox, on the host; a dense input decimated first).
- `intersecting_pairs` / `self_intersections` / `untangle`: triangles that cross one another, and pulling a fit back
  where it made some.
- `flipped_faces` / `folded_faces`: faces the fit turned over.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from triposr.mesh import distinct_corners

from .view_render import face_normals, vertex_normals

Array = np.ndarray | torch.Tensor  # vertex and face arrays: either, converted at the entry


def self_intersections(vertices: Array, faces: Array, *, max_pairs: int = 2**22) -> int:
    """Number of pairs of triangles that share no vertex and intersect (an edge of one crosses the other); see
    `intersecting_pairs`. 0 for a clean mesh."""
    return len(intersecting_pairs(vertices, faces, max_pairs=max_pairs))


def intersecting_pairs(vertices: Array, faces: Array, *, max_pairs: int = 2**22) -> torch.Tensor:
    """The pairs of triangles (K, 2) long (face ids, each pair once, smaller first) that share no vertex and intersect
    (an edge of one crosses the other), on the vertices' device (arrays: the CPU).

    Broad phase: a uniform grid of cells about two mean edge lengths wide; narrow phase: a vectorised
    segment-triangle test of the six edges of each candidate pair (float64). Coplanar overlap is not counted.
    Tensor code, so that on a GPU the refinement's check does not wait on the host (numpy took 0.17 s at 40k faces).

    Args:
        vertices: (V, 3) float. faces: (F, 3) int. max_pairs: candidate pairs tested per batch (memory bound).
    """
    v = torch.as_tensor(vertices).to(torch.float64)  # (V, 3)
    f = torch.as_tensor(faces, device=v.device).long()  # (F, 3)
    none = torch.zeros((0, 2), dtype=torch.long, device=v.device)
    if len(f) < 2:
        return none
    tri = v[f]  # (F, 3, 3)
    lo, hi = tri.amin(dim=1), tri.amax(dim=1)  # (F, 3)
    cell = 2.0 * float((tri[:, 1] - tri[:, 0]).norm(dim=1).mean()) + 1e-12
    origin = lo.amin(dim=0)  # (3,)
    clo = torch.floor((lo - origin) / cell).long()  # (F, 3)
    ext = torch.floor((hi - origin) / cell).long() - clo + 1  # (F, 3)
    count = ext.prod(dim=1)  # (F,) cells per triangle
    face_of = torch.repeat_interleave(torch.arange(len(f), device=v.device), count)  # (T,)
    local = torch.arange(len(face_of), device=v.device) - torch.repeat_interleave(count.cumsum(0) - count, count)
    ex, ey = ext[face_of, 0], ext[face_of, 1]
    ijk = clo[face_of] + torch.stack([local % ex, (local // ex) % ey, local // (ex * ey)], dim=1)  # (T, 3)
    dims = ijk.amax(dim=0) + 1
    key, order = torch.sort((ijk[:, 0] * dims[1] + ijk[:, 1]) * dims[2] + ijk[:, 2], stable=True)  # (T,)
    face_of = face_of[order]
    new_cell = torch.ones_like(key, dtype=torch.bool)
    new_cell[1:] = key[1:] != key[:-1]
    starts = torch.nonzero(new_cell).squeeze(1)  # (C,)
    sizes = torch.diff(starts, append=starts.new_tensor([len(key)]))  # (C,)
    pairs = []
    for size in torch.unique(sizes[sizes > 1]).tolist():  # cells with `size` triangles: all their pairs at once
        group = face_of[starts[sizes == size][:, None] + torch.arange(size, device=v.device)]  # (cells, size)
        ii, jj = torch.triu_indices(size, size, offset=1, device=v.device)
        pairs.append(torch.stack([group[:, ii].reshape(-1), group[:, jj].reshape(-1)], dim=1))
    if not pairs:
        return none
    pairs = torch.sort(torch.cat(pairs), dim=1).values  # (P', 2) smaller face first
    # One int per pair, sorted: deduplicating rows (numpy's unique over axis 0) was 80 % of the time.
    key = torch.unique_consecutive(torch.sort(pairs[:, 0] * len(f) + pairs[:, 1]).values)  # (P,) each pair once
    a, b = key // len(f), key % len(f)
    shared = (f[a][:, :, None] == f[b][:, None, :]).flatten(1).any(dim=1)  # (P,)
    overlap = ((lo[a] <= hi[b]) & (lo[b] <= hi[a])).all(dim=1)  # (P,)
    pairs = torch.stack([a, b], dim=1)[~shared & overlap]  # (P'', 2)
    hits = [none]
    batch = max(1, max_pairs // 6)
    for begin in range(0, len(pairs), batch):
        p = pairs[begin : begin + batch]
        t1, t2 = tri[p[:, 0]], tri[p[:, 1]]  # (B, 3, 3)
        hit = torch.zeros(len(p), dtype=torch.bool, device=v.device)
        for s_tri, t_tri in ((t1, t2), (t2, t1)):
            for i in range(3):
                hit |= _segment_hits_triangle(s_tri[:, i], s_tri[:, (i + 1) % 3], t_tri)
        hits.append(p[hit])
    return torch.cat(hits)


def untangle(
    vertices: Array, start: Array, faces: Array, *, rings: int = 2, tries: int = 6
) -> tuple[torch.Tensor, int, int]:
    """Pull the vertices around intersecting triangles back towards `start` (the same faces, before the fit), half
    of the way each try, until no pair intersects or `tries` run out.

    Why: one intersecting pair among 50k faces rejected a whole refinement (measured on the benchmark's gear with the
    normal maps' outlines exact: Chamfer -17 % lost for one pair). The fit's displacement is smooth, so where two
    sheets cross (a recess's walls pressed together, an arm against the body) pulling that spot back a little
    separates them; the rest of the fit stays.

    Args:
        vertices, start: (V, 3) float, the fitted and the round-start positions. faces: (F, 3) int.
        rings: the vertices within this many edges of an intersecting triangle move.

    Returns:
        the vertices (V, 3) float64 on the vertices' device (arrays: the CPU), the number of vertices moved, the
        intersecting pairs left.
    """
    x = torch.as_tensor(vertices).to(torch.float64, copy=True)  # (V, 3)
    start = torch.as_tensor(start).to(device=x.device, dtype=torch.float64)  # (V, 3)
    f = torch.as_tensor(faces, device=x.device).long()  # (F, 3)
    moved = torch.zeros(len(x), dtype=torch.bool, device=x.device)
    pairs = intersecting_pairs(x, f)
    for _ in range(tries):
        if len(pairs) == 0:
            break
        near = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        near[f[pairs.reshape(-1)].reshape(-1)] = True
        for _ in range(rings):  # grow by one edge: every vertex of a face touching the set
            near[f[near[f].any(dim=1)].reshape(-1)] = True
        x[near] = (x[near] + start[near]) / 2.0
        moved |= near
        pairs = intersecting_pairs(x, f)
    return x, int(moved.sum()), len(pairs)


def _segment_hits_triangle(p: torch.Tensor, q: torch.Tensor, tri: torch.Tensor, eps: float = 1e-9) -> torch.Tensor:
    """(P,) bool: segment p -> q (P, 3) meets triangle tri (P, 3, 3), borders included (Moeller-Trumbore)."""
    a = tri[:, 0]
    e1, e2 = tri[:, 1] - a, tri[:, 2] - a
    d = q - p
    h = torch.linalg.cross(d, e2)
    det = (e1 * h).sum(-1)
    ok = det.abs() > eps * d.norm(dim=-1) * e1.norm(dim=-1) * e2.norm(dim=-1)
    inv = torch.where(ok, 1.0 / torch.where(ok, det, torch.ones_like(det)), torch.zeros_like(det))
    s = p - a
    u = inv * (s * h).sum(-1)
    qv = torch.linalg.cross(s, e1)
    w = inv * (d * qv).sum(-1)
    t = inv * (e2 * qv).sum(-1)
    return ok & (u >= 0) & (w >= 0) & (u + w <= 1) & (t >= 0) & (t <= 1)


def flipped_faces(before: torch.Tensor, after: torch.Tensor, faces: torch.Tensor) -> int:
    """Faces whose normal turned by more than 90 degrees between two vertex sets (folds)."""
    return int(((face_normals(before, faces) * face_normals(after, faces)).sum(-1) < 0).sum())


def folded_faces(vertices: torch.Tensor, faces: torch.Tensor) -> int:
    """Faces whose normal points against the summed normals of their three corners (folds), on any topology.

    A corner's normal is the area-weighted mean of the faces around it, so a face turned over against its
    neighbourhood (a fold, a pleat the optimiser pushed through itself) disagrees with it; 0 on a clean mesh."""
    fn = face_normals(vertices, faces)  # (F, 3)
    corners = vertex_normals(vertices, faces)[faces].sum(1)  # (F, 3)
    return int(((fn * corners).sum(-1) < 0).sum())


def manifold_faces(faces: np.ndarray) -> tuple[np.ndarray, int]:
    """The faces isotropic remeshing accepts (gpytoolbox refuses an edge that more than two faces share).

    Quadric decimation (the chain's `--simplify`) leaves faces with a repeated corner: measured on a 141k-face
    marching-cubes robot decimated to 100k, 8 of them, each counting one of its edges twice, so the mesh was
    refused, the fit ran on the decimated faces and 719 of them folded. Such faces have no area: they are dropped,
    as are repeated faces (one copy kept). What is still crowded (sheets meeting along an edge) loses the faces on
    that edge, leaving a small hole whose border the remeshing keeps.

    Args:
        faces: (F, 3) int.

    Returns:
        the faces kept (F', 3) int64, and how many faces on crowded edges were dropped.
    """
    f = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    f = f[distinct_corners(f)]
    if not len(f):
        return f, 0
    n = int(f.max()) + 1
    corners = np.sort(f, axis=1)  # (F', 3)
    if n < 2**21:  # one int per face (n³ < 2⁶³) and per edge: at 640k faces 0.25 s, 1.56 s with rows sorted
        order = np.argsort((corners[:, 0] * n + corners[:, 1]) * n + corners[:, 2], kind="stable")
        ranked = corners[order]  # (F', 3)
        first = order[np.r_[True, (ranked[1:] != ranked[:-1]).any(axis=1)]]
    else:
        _, first = np.unique(corners, axis=0, return_index=True)
    f = f[np.sort(first)]  # (F', 3) each set of three corners once, in the input's order
    edges = np.sort(f[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)  # (3F', 2)
    _, inverse, counts = np.unique(edges[:, 0] * n + edges[:, 1], return_inverse=True, return_counts=True)
    crowded = (counts[inverse] > 2).reshape(-1, 3).any(axis=1)  # (F',)
    return f[~crowded], int(crowded.sum())


# Three rounds of split / collapse / flip / relax: with five (gpytoolbox's examples use ten) the 20k-face sphere's
# remeshing to 38.7k took 0.64 s, with three 0.41 s (0.78 -> 0.72 smallest triangle quality, mean 0.98 -> 0.97),
# and the quality benchmark's four objects (imperfect views, one run each) came out within 0.7 points of Chamfer of
# the record, as its repeats do (robot -53.0 %, gear -30.1 %, mug -33.1 %, table -44.4 %; session 29).
REMESH_ITERATIONS = 3
# Remeshing's time grows with its input: measured (2-core CPU) on a marching-cubes sphere remeshed to ~39k faces,
# 2.27 s from R=256's 159k faces, 5.34 s from R=384's 360k. Decimated first (quadric error, fast-simplification) to
# twice the faces it will make: 0.25 + 1.11 s and 0.46 + 1.26 s, the surface moved by at most 0.0002 (1/40 px at 256²),
# the triangles as good (measured with five rounds). Host time, whatever the refinement's device.
PRE_DECIMATE = 2.0


def remesh(vertices: np.ndarray, faces: np.ndarray, edge_length: float, *, iterations: int = REMESH_ITERATIONS):
    """Isotropic remeshing (Botsch-Kobbelt: split, collapse, flip, relax; gpytoolbox `remesh_botsch`) to triangles
    with edges about `edge_length` long, the new vertices projected back onto the input surface. Open borders are
    kept as they are (gpytoolbox fixes border vertices). `faces` must be edge-manifold (`manifold_faces`); a
    ValueError otherwise. An input with more than `PRE_DECIMATE` times the faces the remeshing makes is decimated to
    that many first (unless the decimation leaves crowded edges: then the input as it is).

    Args:
        vertices: (V, 3) float. faces: (F, 3) int. edge_length: target edge length (export units).

    Returns:
        (vertices (V', 3) float64, faces (F', 3) int64) with no unreferenced vertex or degenerate face.
    """
    import gpytoolbox  # a compiled library: loaded on the first refinement only

    v = np.ascontiguousarray(vertices, dtype=np.float64)  # (V, 3)
    f = np.ascontiguousarray(faces, dtype=np.int64)  # (F, 3)
    tri = v[f]  # (F, 3, 3)
    area = float(np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1).sum()) / 2
    made = area / (math.sqrt(3) / 4 * float(edge_length) ** 2)  # faces of equilateral triangles with that edge
    if len(f) > PRE_DECIMATE * made:
        import fast_simplification

        dv, df = fast_simplification.simplify(v, f, target_count=int(PRE_DECIMATE * made))
        df, crowded = manifold_faces(df)
        if not crowded and len(df):
            v, f = np.ascontiguousarray(dv, dtype=np.float64), df
    v, f = gpytoolbox.remesh_botsch(v, np.ascontiguousarray(f, dtype=np.int32), i=iterations, h=float(edge_length),
                                    project=True)  # fmt: skip
    f = np.asarray(f, dtype=np.int64)
    f = f[distinct_corners(f)]
    used, f = np.unique(f, return_inverse=True)
    return np.asarray(v, dtype=np.float64)[used], f.reshape(-1, 3)
