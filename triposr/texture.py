"""Texture baking: UV atlas (xatlas) + a PyTorch rasteriser in UV space + colours queried from the field; the same
rasteriser with a z-buffer in screen space (`rasterize_screen`) for depth renders of a mesh.

No OpenGL context and no compiled CUDA extension: the rasteriser is plain tensor code, so baking runs on whatever
device the model is on (CPU or CUDA). Import this module lazily (xatlas is only needed here).

UV convention (OBJ's, and trimesh's): v = 0 is the bottom row of the image. Texel (row r from the top, column c) has
its centre at u = (c + 0.5) / S, v = 1 - (r + 0.5) / S, as samplers in glTF/OpenGL viewers expect.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
import trimesh
from PIL import Image

from .mesh import QueryFn, export_to_native, query_in_chunks, scene_code_query_fn

MIN_TEXTURE_SIZE = 512
MAX_TEXTURE_SIZE = 4096


def default_padding(texture_size: int) -> int:
    """Gutter between charts and edge-padding width in texels (upstream's rule: max(2, size / 256))."""
    return max(2, round(texture_size / 256))


def uv_atlas(
    vertices: np.ndarray, faces: np.ndarray, texture_size: int, padding: int, *, max_cost: float | None = None
):
    """xatlas parametrisation. Returns (vmapping (V',) into the input vertices, faces (F, 3), uvs (V', 2) in [0, 1]).

    `max_cost` is xatlas' chart-growing cost limit (default 2.0): lower values stop charts earlier, giving a few
    more, flatter charts and a much faster atlas on large meshes (chart growing dominates xatlas' time).
    """
    import xatlas

    atlas = xatlas.Atlas()
    atlas.add_mesh(np.ascontiguousarray(vertices, dtype=np.float32), np.ascontiguousarray(faces, dtype=np.uint32))
    charts = xatlas.ChartOptions()
    if max_cost is not None:
        charts.max_cost = float(max_cost)
    pack = xatlas.PackOptions()
    pack.resolution = texture_size
    pack.padding = padding
    pack.bilinear = True  # leave room around charts for bilinear filtering
    atlas.generate(chart_options=charts, pack_options=pack)
    vmapping, new_faces, uvs = atlas[0]
    return vmapping.astype(np.int64), new_faces.astype(np.int64), uvs.astype(np.float32)


# Projection atlas: chart directions (8 horizontal azimuths every 45 degrees, up, down) with right/up image axes that
# form a right-handed frame with the direction (charts are never mirrored).
_AZIMUTHS = np.deg2rad(np.arange(0, 360, 45))
_CHART_DIRS = np.concatenate(
    [np.stack([np.sin(_AZIMUTHS), 0 * _AZIMUTHS, np.cos(_AZIMUTHS)], 1), [[0.0, 1.0, 0.0], [0.0, -1.0, 0.0]]]
)  # (10, 3)
_CHART_RIGHT = np.concatenate(
    [np.stack([np.cos(_AZIMUTHS), 0 * _AZIMUTHS, -np.sin(_AZIMUTHS)], 1), [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]]
)  # (10, 3)
_CHART_UP = np.cross(_CHART_DIRS, _CHART_RIGHT)  # (10, 3)
MIN_CHART_FACES = 8  # smaller projection charts are merged into a neighbouring one


def _face_neighbours(faces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (P,), (P,) of faces sharing an edge (consecutive faces on each edge; manifold edges give one pair)."""
    edges = np.sort(faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)  # (3F, 2)
    key = edges[:, 0].astype(np.int64) * (int(faces.max()) + 1) + edges[:, 1]
    order = np.argsort(key, kind="stable")
    same = key[order[1:]] == key[order[:-1]]
    return order[:-1][same] // 3, order[1:][same] // 3


def projection_atlas(
    vertices: np.ndarray, faces: np.ndarray, texture_size: int, padding: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A fast UV atlas: charts are connected patches facing the same one of 10 directions (8 around +Y, up, down),
    each parametrised by orthographic projection along its direction, packed on shelves at one texel density.

    Orders of magnitude faster than xatlas on 100k faces (no chart growing or optimisation), at the cost of more
    charts and some area stretch (a face is at most ~45 degrees from its chart's direction). Faces are assigned by
    their vertex-smoothed normal; charts of fewer than MIN_CHART_FACES faces join a neighbour.

    Returns:
        vmapping (V',) into the input vertices, faces (F, 3) into the split vertices, uvs (V', 2) in [0, 1]
        (same contract as `uv_atlas`).
    """
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    num_faces = len(faces)
    tri = vertices[faces]  # (F, 3, 3)
    cross = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])  # (F, 3) 2 x area x normal
    vertex_normals = np.zeros_like(vertices)
    np.add.at(vertex_normals, faces.reshape(-1), np.repeat(cross, 3, axis=0))
    smooth = vertex_normals[faces].sum(axis=1)  # (F, 3) a face's normal smoothed over its vertices
    smooth /= np.linalg.norm(smooth, axis=1, keepdims=True).clip(min=1e-20)
    facing = smooth @ _CHART_DIRS.T  # (F, 10)
    label = facing.argmax(axis=1)  # (F,)
    f1, f2 = _face_neighbours(faces)

    def components(label: np.ndarray) -> tuple[int, np.ndarray]:
        keep = label[f1] == label[f2]
        graph = coo_matrix((np.ones(int(keep.sum())), (f1[keep], f2[keep])), shape=(num_faces, num_faces))
        return connected_components(graph, directed=False)

    count, comp = components(label)
    # Small charts join the neighbouring direction the face faces most (two rounds: merged specks can chain).
    for _ in range(2):
        small = np.bincount(comp, minlength=count)[comp] < MIN_CHART_FACES  # (F,)
        if not small.any():
            break
        best = np.full(num_faces, -np.inf)
        new_label = label.copy()
        for a, b in ((f1, f2), (f2, f1)):
            cand = small[a] & (label[b] != label[a])
            score = facing[a[cand], label[b[cand]]]
            order = np.argsort(score, kind="stable")  # ascending: the best candidate is written last
            fa, fb, sc = a[cand][order], b[cand][order], score[order]
            better = sc > best[fa]
            new_label[fa[better]] = label[fb[better]]
            best[fa[better]] = np.maximum(best[fa[better]], sc[better])
        label = new_label
        count, comp = components(label)

    # Split vertices per chart; project them along the chart's direction.
    corner_key = comp[:, None].astype(np.int64) * len(vertices) + faces  # (F, 3)
    keys, inverse = np.unique(corner_key.reshape(-1), return_inverse=True)
    vmapping = keys % len(vertices)  # (V',)
    chart_of_vertex = keys // len(vertices)  # (V',)
    chart_label = np.zeros(count, dtype=np.int64)
    chart_label[comp] = label
    d = chart_label[chart_of_vertex]  # (V',)
    p = vertices[vmapping]
    uv = np.stack([(p * _CHART_RIGHT[d]).sum(1), (p * _CHART_UP[d]).sum(1)], axis=1)  # (V', 2) world units
    lo = np.full((count, 2), np.inf)
    hi = np.full((count, 2), -np.inf)
    np.minimum.at(lo, chart_of_vertex, uv)
    np.maximum.at(hi, chart_of_vertex, uv)
    extent = hi - lo  # (C, 2)

    # Shelf packing (tallest first) at one texel density; the density is adjusted until the shelves fill the square.
    size = texture_size
    density = np.sqrt(0.6 * size * size / max(float((extent[:, 0] * extent[:, 1]).sum()), 1e-20))
    order = np.argsort(-extent[:, 1], kind="stable")
    for _ in range(30):
        box = np.ceil(extent * density).astype(np.int64) + 2 * padding + 1  # (C, 2) texels incl. gutter
        offset = np.zeros((count, 2), dtype=np.int64)
        x = y = row_height = 0
        fits = True
        for c in order:
            w, h = box[c]
            if x + w > size:
                x, y, row_height = 0, y + row_height, 0
            if w > size or y + h > size:
                fits = False
                break
            offset[c] = (x, y)
            x += w
            row_height = max(row_height, h)
        if fits:
            break
        density *= 0.95
    else:
        raise ValueError(f"cannot pack {count} charts into a {size}² texture")
    texel = offset[chart_of_vertex] + padding + 0.5 + (uv - lo[chart_of_vertex]) * density  # (V', 2) from corner
    uvs = (texel / size).astype(np.float32)
    return vmapping, inverse.reshape(-1, 3), uvs


def _closest_on_triangle(px, py, a, b, c, bary):
    """Distance (texels) from texel centres to their triangles and the barycentrics of the closest points.
    Inside points keep their barycentrics and distance 0; outside ones are projected onto the nearest edge."""
    best_d = torch.full_like(px, float("inf"))
    best_w = bary.clone()
    for i, (p0, p1) in enumerate(((a, b), (b, c), (c, a))):
        edge = p1 - p0  # (T, 2)
        rel = torch.stack([px, py], dim=-1) - p0  # (T, 2)
        t = ((rel * edge).sum(-1) / (edge * edge).sum(-1).clamp(min=1e-20)).clamp(0.0, 1.0)  # (T,)
        d = (rel - t[:, None] * edge).norm(dim=-1)  # (T,)
        w = torch.zeros_like(bary)
        w[:, i] = 1.0 - t
        w[:, (i + 1) % 3] = t
        closer = d < best_d
        best_d = torch.where(closer, d, best_d)
        best_w = torch.where(closer[:, None], w, best_w)
    inside = (bary >= 0).all(dim=-1)
    return torch.where(inside, torch.zeros_like(best_d), best_d), torch.where(inside[:, None], bary, best_w)


def _triangle_candidates(
    pix: torch.Tensor, faces: torch.Tensor, height: int, width: int, margin: float, max_candidates: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Pixel candidates of each triangle: the pixels of its bounding box (grown by `margin`) that lie within
    `margin` of every edge line, in batches of consecutive triangles.

    Args:
        pix: (V, 2) float64 vertex positions in pixel units with pixel centres at integers (x = column, y = row).
        faces: (F, 3) long. height, width: the grid. margin: band width in pixels (0: interiors and edges only).
        max_candidates: bounding-box pixels tested per batch (a larger triangle alone); bounds memory.

    Yields:
        px, py (T,) float64 pixel centres, face (T,) long, bary (T, 3) float64 barycentrics (negative outside).
    """
    device = pix.device
    tri = pix[faces]  # (F, 3, 2)
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]  # (F, 2) each
    det = (b[:, 1] - c[:, 1]) * (a[:, 0] - c[:, 0]) + (c[:, 0] - b[:, 0]) * (a[:, 1] - c[:, 1])  # (F,) 2 x signed area
    limit = torch.tensor([width - 1, height - 1], device=device)
    lo = torch.minimum((tri.amin(dim=1) - margin).ceil().clamp(min=0), limit).long()  # (F, 2)
    hi = torch.minimum((tri.amax(dim=1) + margin).floor().clamp(min=-1), limit).long()  # (F, 2)
    extent = (hi - lo + 1).clamp(min=0)  # (F, 2) pixels per axis in the bounding box
    extent[det.abs() < 1e-12] = 0  # degenerate on the grid: covers nothing
    counts = extent[:, 0] * extent[:, 1]  # (F,)
    edge_len = torch.stack([(b - c).norm(dim=-1), (c - a).norm(dim=-1), (a - b).norm(dim=-1)], dim=-1)  # (F, 3)
    heights = det.abs()[:, None] / edge_len.clamp(min=1e-12)  # (F, 3) from each vertex to the opposite edge

    # Batches of consecutive triangles with at most max_candidates bounding-box pixels (a larger triangle alone).
    counts_host = counts.cpu().numpy()
    ends = np.cumsum(counts_host)
    start = 0
    while start < len(counts_host):
        base = ends[start - 1] if start else 0
        stop = max(int(np.searchsorted(ends, base + max_candidates, side="right")), start + 1)
        idx = torch.arange(start, stop, device=device)  # (f,)
        n = counts[start:stop]
        total = int(ends[stop - 1] - base)
        start = stop
        if total == 0:
            continue
        face = torch.repeat_interleave(idx, n, output_size=total)  # (T,)
        first = torch.cumsum(n, 0) - n  # (f,) offset of each triangle's first candidate
        local = torch.arange(total, device=device) - first[face - idx[0]]  # (T,)
        span = extent[face, 0]
        px = (lo[face, 0] + local % span).double()  # (T,)
        py = (lo[face, 1] + local // span).double()
        fa, fb, fc, fdet = a[face], b[face], c[face], det[face]
        l0 = ((fb[:, 1] - fc[:, 1]) * (px - fc[:, 0]) + (fc[:, 0] - fb[:, 0]) * (py - fc[:, 1])) / fdet
        l1 = ((fc[:, 1] - fa[:, 1]) * (px - fc[:, 0]) + (fa[:, 0] - fc[:, 0]) * (py - fc[:, 1])) / fdet
        bary = torch.stack([l0, l1, 1.0 - l0 - l1], dim=-1)  # (T, 3)
        # bary_i * height_i is the signed distance to the edge opposite vertex i; a pixel more than `margin` outside
        # any edge line is out of the band.
        near = (bary * heights[face] >= -margin).all(dim=-1)  # (T,)
        yield px[near], py[near], face[near], bary[near]


def first_best(pixel: torch.Tensor, score: torch.Tensor, num_pixels: int) -> torch.Tensor:
    """Indices of the candidates that win their pixel: the smallest score, among equals the first candidate.
    pixel (T,) flat pixel indices, score (T,). Returns (N,) candidate indices, one per covered pixel."""
    best = torch.full((num_pixels,), float("inf"), dtype=score.dtype, device=score.device)
    best.scatter_reduce_(0, pixel, score, reduce="amin")
    candidates = torch.nonzero(score <= best[pixel]).squeeze(1)  # (M,)
    owner = torch.full((num_pixels,), pixel.numel(), dtype=torch.long, device=pixel.device)
    owner.scatter_reduce_(0, pixel[candidates], candidates, reduce="amin")
    return owner[owner < pixel.numel()]  # (N,)


def rasterize_uv(
    uvs: torch.Tensor, faces: torch.Tensor, texture_size: int, *, margin: float = 1.5, max_candidates: int = 2**22
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rasterise triangles given by their UVs into an S x S texel grid (texel centres, see module docstring).

    Texels whose centre lies within `margin` texels outside a triangle get the closest point of that triangle,
    so that bilinear filtering at the edge of a chart mixes surface colours only (the conservative band a GPU
    baker draws with thick edges). Every texel goes to its nearest triangle; interiors win over bands.

    Args:
        uvs: (V, 2) float UVs; faces: (F, 3) long.
        margin: width in texels of the band around each triangle (0: interiors only).
        max_candidates: texel candidates (bounding-box texels) tested per batch of triangles; bounds memory.

    Returns:
        texel (N,) flat texel indices (row * S + col), face (N,) the triangle each one shows, bary (N, 3)
        barycentric weights of the surface point in that triangle. Each texel appears at most once.
    """
    size = texture_size
    device = uvs.device
    pix = torch.stack([uvs[:, 0] * size - 0.5, (1.0 - uvs[:, 1]) * size - 0.5], dim=-1).double()  # (V, 2) x, y
    tri = pix[faces]  # (F, 3, 2)
    # A texel outside every triangle is nearest to the chart's boundary, so only faces with a boundary edge (an edge
    # no other face shares) need the band; the others are drawn without it (far fewer candidates on small faces).
    edges = torch.sort(faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), dim=1).values  # (3F, 2)
    key = edges[:, 0] * (uvs.shape[0] + 1) + edges[:, 1]  # (3F,) one integer per undirected edge
    _, edge_id, edge_count = torch.unique(key, return_inverse=True, return_counts=True)
    boundary = (edge_count[edge_id] == 1).reshape(-1, 3).any(dim=1)  # (F,)
    groups = [(torch.nonzero(~boundary).squeeze(1), 0.0), (torch.nonzero(boundary).squeeze(1), margin)]
    texels, faces_out, barys, dists = [], [], [], []
    for subset, band in groups:
        for px, py, face, bary in _triangle_candidates(pix, faces[subset], size, size, band, max_candidates):
            face = subset[face]  # (T,) into faces
            # Interior texels keep their barycentrics at distance 0; only band texels are projected onto the face.
            dist = torch.zeros_like(px)
            out = torch.nonzero((bary < 0).any(dim=-1)).squeeze(1)  # (T',)
            if out.numel():
                fo = face[out]
                d_out, b_out = _closest_on_triangle(px[out], py[out], tri[fo, 0], tri[fo, 1], tri[fo, 2], bary[out])
                dist[out] = d_out
                bary = bary.index_put((out,), b_out)
            keep = dist <= margin
            texels.append((py.long() * size + px.long())[keep])
            faces_out.append(face[keep])
            barys.append(bary[keep].float())
            dists.append(dist[keep])
    if not texels:
        empty = torch.empty(0, dtype=torch.long, device=device)
        return empty, empty, torch.empty(0, 3, device=device)
    texel, face, bary, dist = torch.cat(texels), torch.cat(faces_out), torch.cat(barys), torch.cat(dists)
    # Nearest triangle per texel: the smallest distance wins; among equals (shared edges) the first does.
    chosen = first_best(texel, dist, size * size)  # (N,)
    return texel[chosen], face[chosen], bary[chosen]


def rasterize_screen(
    xy: torch.Tensor,
    depth: torch.Tensor,
    faces: torch.Tensor,
    height: int,
    width: int,
    *,
    max_candidates: int = 2**22,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Depth-tested rasterisation of triangles in screen space (an orthographic or already-projected view).

    Args:
        xy: (V, 2) continuous pixel coordinates (x = column, y = row; pixel (r, c) has its centre at
            (c + 0.5, r + 0.5)).
        depth: (V,) larger = closer to the camera.
        faces: (F, 3) long.
        height, width: the image size in pixels.
        max_candidates: bounding-box pixels tested per batch of triangles; bounds memory.

    Returns:
        pixel (N,) flat indices row * width + col, face (N,) and bary (N, 3) (float32) of the nearest triangle
        covering each pixel centre (z-buffer on the interpolated depth; edges count as inside, ties go to the
        lower face index). Each pixel appears at most once. Runs on the inputs' device.
    """
    device = xy.device
    pix = xy.detach().double() - 0.5  # (V, 2) pixel centres at integers; coverage has no gradient
    depth = depth.detach().double()
    pixels, faces_out, barys, depths = [], [], [], []
    for px, py, face, bary in _triangle_candidates(pix, faces, height, width, 0.0, max_candidates):
        pixels.append(py.long() * width + px.long())
        faces_out.append(face)
        barys.append(bary)
        depths.append((depth[faces[face]] * bary).sum(dim=-1))  # (T,) interpolated depth
    if not pixels:
        empty = torch.empty(0, dtype=torch.long, device=device)
        return empty, empty, torch.empty(0, 3, device=device)
    pixel, face, bary, z = torch.cat(pixels), torch.cat(faces_out), torch.cat(barys), torch.cat(depths)
    chosen = first_best(pixel, -z, height * width)  # (N,) the closest candidate per pixel
    return pixel[chosen], face[chosen], bary[chosen].float()


def dilate(image: torch.Tensor, mask: torch.Tensor, iterations: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Edge padding: grow the filled region (mask) of an (S, S, C) image by `iterations` texels, each new texel the
    mean of its filled 8-neighbours, so bilinear filtering and mipmaps at chart borders see surface colours."""
    img = (image * mask[..., None]).permute(2, 0, 1)[None]  # (1, C, S, S)
    m = mask[None, None].to(image.dtype)  # (1, 1, S, S)
    for _ in range(iterations):
        # 3 x 3 box sums (average pooling with the zero padding counted, times 9): much faster than a grouped conv
        total = F.avg_pool2d(img, 3, stride=1, padding=1, count_include_pad=True) * 9  # (1, C, S, S) filled sum
        count = F.avg_pool2d(m, 3, stride=1, padding=1, count_include_pad=True) * 9  # (1, 1, S, S)
        count = count.round()  # exact small integers despite the pooling's float arithmetic
        grow = (m == 0) & (count > 0)
        img = torch.where(grow, total / count.clamp(min=1), img)
        m = torch.where(grow, torch.ones_like(m), m)
    return img[0].permute(1, 2, 0), m[0, 0] > 0


def check_texture_size(texture_size: int) -> int:
    """The texture size as an int, or a ValueError naming the allowed range."""
    if isinstance(texture_size, bool) or not isinstance(texture_size, int | np.integer):
        raise ValueError(f"texture_size must be an integer between {MIN_TEXTURE_SIZE} and {MAX_TEXTURE_SIZE}")
    if not MIN_TEXTURE_SIZE <= texture_size <= MAX_TEXTURE_SIZE:
        raise ValueError(
            f"texture_size {texture_size} is outside {MIN_TEXTURE_SIZE}..{MAX_TEXTURE_SIZE}; 1024 or 2048 are typical"
        )
    return int(texture_size)


def mesh_atlas(
    mesh: trimesh.Trimesh, texture_size: int, padding: int, *, method: str = "xatlas", max_cost: float | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """UV atlas of `mesh` (same surface): vmapping (V',) into mesh.vertices, faces (F', 3) into the split vertices,
    uvs (V', 2). Seams split vertices; faces xatlas could not chart are dropped (see below).

    method: "xatlas" (fewest seams, least stretch; slow on large meshes: minutes at 500k faces on a CPU) or
    "projection" (`projection_atlas`: seconds or less, more charts).
    """
    if len(mesh.faces) == 0:
        raise ValueError("cannot bake a texture for an empty mesh")
    if method == "projection":
        return projection_atlas(np.asarray(mesh.vertices), np.asarray(mesh.faces), texture_size, padding)
    if method != "xatlas":
        raise ValueError(f"atlas method must be 'xatlas' or 'projection', got {method!r}")
    vmapping, faces, uvs = uv_atlas(
        np.asarray(mesh.vertices), np.asarray(mesh.faces), texture_size, padding, max_cost=max_cost
    )
    # xatlas leaves faces below its area epsilon (~1e-7; marching cubes makes a few slivers where vertices nearly
    # coincide) out of every chart, all at UV (0, 0). They are far below a texel and would show a wrong colour, so
    # they are dropped, with the vertices only they used.
    tri_uv = uvs[faces]  # (F, 3, 2)
    e1, e2 = tri_uv[:, 1] - tri_uv[:, 0], tri_uv[:, 2] - tri_uv[:, 0]  # (F, 2)
    uv_area = np.abs(e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0])  # (F,) 2 x area
    faces = faces[uv_area > 1e-12]
    if len(faces) == 0:
        raise ValueError("cannot bake a texture: every face of the mesh is degenerate")
    used, faces = np.unique(faces, return_inverse=True)
    return vmapping[used], faces.reshape(-1, 3), uvs[used]


def textured_mesh(
    vertices: np.ndarray, faces: np.ndarray, uvs: np.ndarray, image: torch.Tensor, mask: torch.Tensor, padding: int
) -> trimesh.Trimesh:
    """A UV-textured trimesh from texel colours: edge padding, a neutral fill elsewhere, a matte PBR material.

    Args:
        vertices (V', 3), faces (F', 3), uvs (V', 2): the atlas mesh (`mesh_atlas`).
        image: (S, S, 3) colours in [0, 1], row 0 = top; mask: (S, S) bool, the texels that were written.
        padding: texels of edge padding (dilation) around the charts.
    """
    # Beyond the rasteriser's band: colour dilation fills the rest of the gutter.
    image, mask = dilate(image, mask, padding)
    if mask.any():  # texels no chart reaches: a neutral fill (the mean colour) keeps mipmaps clean
        image[~mask] = image[mask].mean(dim=0)
    pixels = (image * 255.0).round().clamp(0, 255).to(torch.uint8).cpu().numpy()  # (S, S, 3), row 0 = top

    from trimesh.visual.material import PBRMaterial

    material = PBRMaterial(
        name="baked",
        baseColorTexture=Image.fromarray(pixels),  # (S, S, 3) uint8 -> RGB
        baseColorFactor=[255, 255, 255, 255],
        metallicFactor=0.0,
        roughnessFactor=1.0,
    )
    visual = trimesh.visual.TextureVisuals(uv=uvs, material=material)
    return trimesh.Trimesh(vertices=vertices, faces=faces, visual=visual, process=False)


@torch.no_grad()
def bake_texture_from_field(
    query_fn: QueryFn,
    mesh: trimesh.Trimesh,
    texture_size: int = 1024,
    *,
    padding: int | None = None,
    chunk_size: int = 2**18,
    device: torch.device | str | None = None,
) -> trimesh.Trimesh:
    """Bake the field's colour into a UV texture for `mesh` (export frame, as `extract_mesh` returns).

    Args:
        query_fn: model-frame points (N, 3) -> {"color": (N, 3) in [0, 1], ...} (see `triposr.mesh`).
        texture_size: texture width = height in texels, 512..4096.
        padding: texels between charts and of edge padding (default `default_padding(texture_size)`).
        device: where rasterising and querying run (default CPU; use the model's device).

    Returns:
        A new mesh (vertices split along UV seams, same positions) with UVs and a PBR material (matte, white factor)
        whose base colour texture is an RGB PIL image.
    """
    size = check_texture_size(texture_size)
    padding = default_padding(size) if padding is None else int(padding)
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    device = torch.device("cpu") if device is None else torch.device(device)

    # 1. UV atlas on the host (xatlas); seams split vertices, vmapping points back to the input ones.
    vmapping, faces, uvs = mesh_atlas(mesh, size, padding)
    vertices = np.asarray(mesh.vertices, dtype=np.float32)[vmapping]  # (V', 3) export frame

    # 2. Rasterise in UV space on the device: which surface point each texel centre shows.
    faces_t = torch.from_numpy(faces).to(device)  # (F, 3)
    verts_t = torch.from_numpy(vertices).to(device)  # (V', 3)
    texel, face, bary = rasterize_uv(torch.from_numpy(uvs).to(device), faces_t, size)
    points = (verts_t[faces_t[face]] * bary[..., None]).sum(dim=1)  # (N, 3) export frame

    # 3. Colours from the field (queried in the model frame), written into the texture, then edge padding.
    colors = field_color_fn(query_fn, chunk_size)(points)  # (N, 3)
    image = torch.zeros(size * size, 3, device=device)  # (S*S, 3)
    mask = torch.zeros(size * size, dtype=torch.bool, device=device)
    image[texel] = colors
    mask[texel] = True
    return textured_mesh(vertices, faces, uvs, image.reshape(size, size, 3), mask.reshape(size, size), padding)


def field_color_fn(query_fn: QueryFn, chunk_size: int = 2**18) -> Callable[[torch.Tensor], torch.Tensor]:
    """The field's colour at export-frame points: (N, 3) -> (N, 3) in [0, 1] (queried in the model frame, in
    chunks), e.g. the `fallback` of `t2mv.view_texture.texture_from_views`. Call it under `torch.no_grad()`."""

    def colors(points: torch.Tensor) -> torch.Tensor:
        return query_in_chunks(query_fn, export_to_native(points), "color", chunk_size).clamp(0.0, 1.0)

    return colors


def bake_texture(
    model,
    scene_code: torch.Tensor,
    mesh: trimesh.Trimesh,
    texture_size: int = 1024,
    *,
    padding: int | None = None,
    chunk_size: int = 2**18,
) -> trimesh.Trimesh:
    """`bake_texture_from_field` for one scene code (3, C, H, W) of a `TSR` model, on the scene code's device."""
    return bake_texture_from_field(
        scene_code_query_fn(model, scene_code),
        mesh,
        texture_size,
        padding=padding,
        chunk_size=chunk_size,
        device=scene_code.device,
    )
