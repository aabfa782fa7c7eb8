"""Marching cubes in PyTorch: runs wherever the level grid lives (CUDA or CPU), no compiled extension.

The output is PyMCubes's mesh: the same cube configurations, the same triangles in the same order (cell by cell in
C order of the grid, each cell's triangles in table order), the same vertex positions up to float32 rounding; only
the vertex numbering differs (ours: sorted by edge id; PyMCubes: creation order, with duplicated vertices on the
grid's low faces that trimesh merges). Conventions, shared with PyMCubes and Lorensen & Cline / Bourke:

- a cell's corners 0..7 sit at offsets (0,0,0), (1,0,0), (1,1,0), (0,1,0), (0,0,1), (1,0,1), (1,1,1), (0,1,1) along
  the grid's axes (0, 1, 2); its edges 0..11 join corners (0,1) (1,2) (2,3) (3,0) (4,5) (5,6) (6,7) (7,4) (0,4)
  (1,5) (2,6) (3,7);
- corner m sets bit m of the cell's cube index when its value is <= 0: "inside" is level > 0 (a corner exactly at
  the level counts as outside);
- `TRIANGLE_TABLE[cube index]` lists the crossed edges of each triangle; in that order the triangles' normals
  point toward level <= 0, i.e. outward when inside is positive; the ambiguous configurations are resolved the
  table's way (no asymptotic decider), so the mesh is watertight wherever PyMCubes's is (closed surfaces that do
  not reach the grid's border);
- a vertex lies on its edge at the linear zero crossing, p0 + t (p1 - p0), t = f0 / (f0 - f1).

Vertices are shared between cells through a global edge id ((lower endpoint's flat grid index) * 3 + axis): every
crossed grid edge gives exactly one vertex.

The triangle table is the classic one of Paul Bourke, "Polygonising a scalar field" (1994; table by Cory Gene
Bloyd, placed in the public domain), as PyMCubes (BSD-3-Clause) ships it in mcubes/src/marchingcubes.cpp; it is
written here as one hexadecimal digit per edge, three digits per triangle. `tests/test_marching_cubes.py` checks
all 256 rows against the installed PyMCubes.
"""

from __future__ import annotations

import functools

import torch

# fmt: off
TRIANGLE_TABLE: tuple[str, ...] = (
    "", "083", "019", "183981", "12a", "08312a", "92a029", "2832a8a98", "3b2", "0b28b0", "19023b", "1b219b98b",
    "3a1ba3", "0a108a8ba", "3903b9ba9", "98aa8b", "478", "430734", "019847", "419471731", "12a847", "34730412a",
    "92a902847", "2a9297273794", "8473b2", "b47b24204", "90184723b", "47b94b9b2921", "3a13ba784", "1ba14b1047b4",
    "47890b9bab03", "47b4b99ba", "954", "954083", "054150", "854835315", "12a954", "30812a495", "52a542402",
    "2a5325354348", "95423b", "0b208b495", "05401523b", "21525828b485", "a3ba13954", "4950818a18ba",
    "54050b5bab03", "54858aa8b", "978579", "930953573", "078017157", "153357", "978957a12", "a12950530573",
    "802825857a52", "2a5253357", "7957893b2", "95797292027b", "23b018178157", "b21b17715", "958857a13a3b",
    "5705097b010aba0", "ba0b03a50807570", "ba57b5", "a65", "0835a6", "9015a6", "1831985a6", "165261", "165126308",
    "965906026", "598582526328", "23ba65", "b08b20a65", "01923b5a6", "5a61929b298b", "63b653513", "08b0b50515b6",
    "3b6036065059", "65969bb98", "5a6478", "43047365a", "1905a6847", "a65197173794", "612651478", "125526304347",
    "847905065026", "739794329596269", "3b2784a65", "5a647242027b", "01947823b5a6", "9219b294b7b45a6",
    "8473b53515b6", "51b5b610b7b404b", "059065036b63847", "65969b4797b9", "a4964a", "4a649a083", "a01a60640",
    "83181686461a", "149124264", "308129249264", "024426", "832824426", "a49a64b23", "08228b49a4a6",
    "3b201606461a", "64161a48121b8b1", "964936913b63", "8b1810b61914641", "3b6360064", "648b68", "7a678a89a",
    "0730a709a67a", "a671a7178180", "a67a71173", "126168189867", "269291679093739", "780706602", "732672",
    "23ba68a89867", "20727b09767a9a7", "1801781a767a23b", "b21b17a61671", "896867916b63136", "091b67",
    "7807063b0b60", "7b6", "76b", "308b76", "019b76", "819831b76", "a126b7", "12a3086b7", "2902a96b7",
    "6b72a3a83a98", "723627", "708760620", "276237019", "162186198876", "a76a17137", "a7617a187108",
    "03707a0a96a7", "76a7a88a9", "684b86", "36b306046", "86b846901", "946963931b36", "6846b82a1", "12a30b06b046",
    "4b846b0292a9", "a93a32943b36463", "823842462", "042462", "190234246438", "194142246", "8138618466a1",
    "a10a06604", "4634386a3039a93", "a946a4", "49576b", "083495b76", "50154076b", "b76834354315", "954a1276b",
    "6b712a083495", "76b54a42a402", "348354325a52b76", "723762549", "954086062687", "362376150540",
    "628687218485158", "954a16176137", "16a176107870954", "40a4a503a6a737a", "76a7a854a48a", "6956b9b89",
    "36b063056095", "0b805b01556b", "6b3635531", "12a95b9b8b56", "0b306b09656912a", "b85b56805a52025",
    "6b36352a3a53", "589528562382", "956960062", "158180568382628", "156216", "13616a386569896", "a10a06950560",
    "03856a", "a56", "b5a75b", "b5ab75830", "5b75ab190", "a75ab7981831", "b12b71751", "08312717572b",
    "9759279022b7", "75272b592328982", "25a235375", "820852875a25", "9015a35373a2", "982921872a25752", "135375",
    "087071175", "903935537", "987597", "5845a8ab8", "5045b05abb30", "01984a8aba45", "ab4a45b34941314",
    "2512852b8458", "04b0b345b2b151b", "0250592b5458b85", "9452b3", "25a352345384", "5a2524420", "3a235a385458019",
    "5a2524192942", "845853351", "045105", "845853905035", "945", "4b749b9ab", "0834979b79ab", "1ab1b414074b",
    "3143481a474bab4", "4b79b492b912", "9749b791b2b1083", "b74b42240", "b74b42834324", "29a279237749",
    "9a7974a27870207", "37a3a274a1a040a", "1a2874", "491417713", "491417081871", "403743", "487", "9a8ab8",
    "30939bb9a", "01a0a88ab", "31ab3a", "12b1b99b8", "30939b1292b9", "02b80b", "32b", "23828aa89", "9a2092",
    "23828a0181a8", "1a2", "138918", "091", "038", "",
)
# fmt: on

# Corner m of a cell at offset CORNER_OFFSETS[m] from the cell's lowest grid point.
CORNER_OFFSETS = ((0, 0, 0), (1, 0, 0), (1, 1, 0), (0, 1, 0), (0, 0, 1), (1, 0, 1), (1, 1, 1), (0, 1, 1))
# Edge e as (offset of its lower endpoint from the cell's lowest grid point, axis it runs along).
EDGE_LOWER_AXIS = (
    ((0, 0, 0), 0), ((1, 0, 0), 1), ((0, 1, 0), 0), ((0, 0, 0), 1),
    ((0, 0, 1), 0), ((1, 0, 1), 1), ((0, 1, 1), 0), ((0, 0, 1), 1),
    ((0, 0, 0), 2), ((1, 0, 0), 2), ((1, 1, 0), 2), ((0, 1, 0), 2),
)  # fmt: skip


@functools.lru_cache(maxsize=8)
def _tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tables as tensors on `device`: triangles per cube index (256,), their edges (256, 5, 3) (-1 padded),
    edge lower-endpoint offsets (12, 3) and edge axes (12,)."""
    counts = torch.tensor([len(row) // 3 for row in TRIANGLE_TABLE], dtype=torch.int64)  # (256,)
    edges = torch.full((256, 15), -1, dtype=torch.int64)
    for code, row in enumerate(TRIANGLE_TABLE):
        if row:
            edges[code, : len(row)] = torch.tensor([int(c, 16) for c in row])
    offsets = torch.tensor([lower for lower, _ in EDGE_LOWER_AXIS], dtype=torch.int64)  # (12, 3)
    axes = torch.tensor([axis for _, axis in EDGE_LOWER_AXIS], dtype=torch.int64)  # (12,)
    return counts.to(device), edges.view(256, 5, 3).to(device), offsets.to(device), axes.to(device)


def cube_codes(level: torch.Tensor) -> torch.Tensor:
    """Cube index of every cell of a (X, Y, Z) grid: (X-1, Y-1, Z-1) uint8, bit m set when corner m is <= 0.

    Built as two 4-bit square codes (the cell's z = 0 face and its z = 1 face, which have the same corner pattern)
    so the full-size tensors are touched about half as often as with eight corner slices.
    """
    below = (level <= 0).to(torch.uint8)  # (X, Y, Z)
    square = (
        below[:-1, :-1] | (below[1:, :-1] << 1) | (below[1:, 1:] << 2) | (below[:-1, 1:] << 3)
    )  # (X-1, Y-1, Z): corners 0..3 of the cells whose lower face is at each z
    return square[:, :, :-1] | (square[:, :, 1:] << 4)  # (X-1, Y-1, Z-1)


def marching_cubes(level: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Iso-surface level == 0 of a (X, Y, Z) float grid, inside = level > 0, on the grid's device.

    Args:
        level: (X, Y, Z) floating tensor, each side >= 2, finite.

    Returns:
        vertices (V, 3) float32 in grid index units (column c indexes axis c of `level`) and faces (F, 3) int64,
        wound so that normals point toward level <= 0 (outward). Empty (0, 3) tensors when nothing crosses 0.
        Vertices are ordered by (axis of their edge, flat index of the edge's lower endpoint).
    """
    if level.ndim != 3 or min(level.shape) < 2:
        raise ValueError(f"level must be a (X, Y, Z) grid with every side >= 2, got {tuple(level.shape)}")
    if not level.is_floating_point():
        raise ValueError(f"level must be a floating-point tensor, got {level.dtype}")
    device = level.device
    counts, tri_edges, edge_offsets, edge_axes = _tables(device)
    sx, sy, sz = level.shape
    n = sx * sy * sz
    level = level.contiguous()

    # Cube codes indexed like the grid points (a cell by its lowest corner; the last slab of each axis stays 0), so
    # a cell's flat index is its lowest corner's flat grid index.
    codes = torch.zeros(sx, sy, sz, dtype=torch.uint8, device=device)
    codes[:-1, :-1, :-1] = cube_codes(level)
    codes = codes.view(-1)  # (n,)
    cell = ((codes != 0) & (codes != 255)).nonzero().squeeze(1)  # (N,) ascending: PyMCubes's cell order
    cell_code = codes[cell].long()  # (N,)

    # One row per triangle: its cell and its rank among the cell's triangles.
    per_cell = counts[cell_code]  # (N,)
    tri_cell = torch.repeat_interleave(per_cell)  # (T,) index into cell
    first = torch.cumsum(per_cell, 0) - per_cell  # (N,) each cell's first triangle
    rank = torch.arange(tri_cell.shape[0], device=device) - first[tri_cell]  # (T,)
    edges = tri_edges.view(-1, 3)[cell_code[tri_cell] * 5 + rank]  # (T, 3) local edge numbers

    # An edge is keyed by axis * n + flat index of its lower endpoint; the crossed edges of the whole grid, listed
    # per axis in flat order, are then already sorted by key, and a triangle corner's vertex is its key's rank.
    strides = torch.tensor([sy * sz, sz, 1], device=device)
    edge_delta = edge_axes * n + (edge_offsets * strides).sum(-1)  # (12,)
    corner_keys = cell[tri_cell][:, None] + edge_delta[edges]  # (T, 3)
    below = (level <= 0).view(sx, sy, sz)
    crossed = []
    for axis in range(3):
        mask = torch.zeros_like(below)
        head = [slice(None)] * 3
        tail = [slice(None)] * 3
        head[axis], tail[axis] = slice(None, -1), slice(1, None)
        mask[tuple(head)] = below[tuple(head)] ^ below[tuple(tail)]
        crossed.append(mask.view(-1).nonzero().squeeze(1) + axis * n)
    keys = torch.cat(crossed)  # (V,) sorted
    faces = torch.searchsorted(keys, corner_keys.reshape(-1)).reshape(-1, 3)  # (T, 3)

    # Vertex = linear zero crossing on its edge.
    axis = keys // n  # (V,)
    start = keys % n  # (V,) flat index of the lower endpoint
    values = level.view(-1)
    f0 = values[start].float()  # (V,)
    f1 = values[start + strides[axis]].float()  # (V,)
    t = f0 / (f0 - f1)  # (V,) in [0, 1): exactly one endpoint is <= 0, so f0 != f1
    point = torch.stack([start // (sy * sz), (start // sz) % sy, start % sz], dim=-1).float()  # (V, 3)
    vertices = point.scatter_add(1, axis[:, None], t[:, None])  # (V, 3)
    return vertices, faces
