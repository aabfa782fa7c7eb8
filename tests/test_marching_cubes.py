"""triposr.marching_cubes: the table and the vectorised marching cubes against the installed PyMCubes (same
triangles in the same order, same vertex positions), vertex sharing, watertightness and outward normals."""

import itertools

import mcubes  # PyMCubes is a hard requirement (requirements.txt): the reference these tests compare with
import numpy as np
import pytest
import torch
import trimesh

from triposr.marching_cubes import CORNER_OFFSETS, TRIANGLE_TABLE, cube_codes, marching_cubes

EDGE_CORNERS = ((0, 1), (1, 2), (2, 3), (3, 0), (4, 5), (5, 6), (6, 7), (7, 4), (0, 4), (1, 5), (2, 6), (3, 7))


def single_cube(code: int) -> np.ndarray:
    """A 2x2x2 grid whose one cell has cube index `code`: corner m is -1 (bit set, level <= 0) or +1."""
    volume = np.empty((2, 2, 2))
    for m, offset in enumerate(CORNER_OFFSETS):
        volume[offset] = -1.0 if (code >> m) & 1 else 1.0
    return volume


def triangles(vertices, faces) -> np.ndarray:
    """(F, 3, 3) corner coordinates in face order: compares meshes whatever their vertex numbering."""
    return np.asarray(vertices, dtype=np.float64)[np.asarray(faces)]


def assert_same_as_pymcubes(level: torch.Tensor, atol: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    vertices, faces = marching_cubes(level)
    ref_vertices, ref_faces = mcubes.marching_cubes(level.double().numpy(), 0.0)
    assert faces.shape == ref_faces.shape
    np.testing.assert_allclose(triangles(vertices, faces), triangles(ref_vertices, ref_faces), rtol=0, atol=atol)
    return vertices, faces


def test_table_is_pymcubes_table_on_every_cube_case():
    """Row by row, the crossed edges of each triangle as PyMCubes emits them for a single cell."""
    midpoints = {tuple(np.add(CORNER_OFFSETS[a], CORNER_OFFSETS[b]) / 2): e for e, (a, b) in enumerate(EDGE_CORNERS)}
    for code in range(256):
        vertices, faces = mcubes.marching_cubes(single_cube(code), 0.0)
        edges = [midpoints[tuple(v)] for v in vertices]
        assert "".join(f"{edges[i]:x}" for i in np.asarray(faces).reshape(-1)) == TRIANGLE_TABLE[code], code


def test_every_cube_case_matches_pymcubes():
    assert len(TRIANGLE_TABLE) == 256 and all(len(row) % 3 == 0 and len(row) <= 15 for row in TRIANGLE_TABLE)
    for code in range(256):
        level = torch.from_numpy(single_cube(code)).float()
        assert cube_codes(level).item() == code
        vertices, faces = assert_same_as_pymcubes(level)
        assert len(faces) == len(TRIANGLE_TABLE[code]) // 3


@pytest.mark.parametrize("shape", [(17, 23, 30), (2, 9, 5), (40, 40, 40)])
def test_smooth_random_fields_match_pymcubes(shape):
    coarse = torch.randn(1, 1, 5, 6, 7, generator=torch.Generator().manual_seed(sum(shape)))
    level = torch.nn.functional.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)[0, 0]
    vertices, faces = assert_same_as_pymcubes(level)
    assert len(faces) > 0
    # One vertex per crossed grid edge, shared by every cell around it.
    below = (level <= 0).numpy()
    crossed = sum(int((np.diff(below, axis=a) != 0).sum()) for a in range(3))
    assert len(vertices) == crossed
    assert len(np.unique(faces.numpy())) == crossed


def test_ties_at_the_level_follow_pymcubes():
    """Values exactly 0 count as outside (bit set, as PyMCubes's `v <= iso`); vertices then sit on grid points."""
    level = torch.round(torch.randn(12, 11, 10, generator=torch.Generator().manual_seed(3)) * 2) / 2  # many zeros
    assert (level == 0).sum() > 100
    vertices, faces = assert_same_as_pymcubes(level)
    on_grid = (vertices == vertices.round()).all(dim=1)
    assert on_grid.any()


def test_closed_surface_is_watertight_with_outward_normals():
    axis = torch.linspace(-1, 1, 41)
    x, y, z = torch.meshgrid(axis, axis, axis, indexing="ij")
    # A torus (genus 1): inside = level > 0.
    level = 0.25**2 - ((x**2 + y**2).sqrt() - 0.6) ** 2 - z**2
    vertices, faces = assert_same_as_pymcubes(level)
    mesh = trimesh.Trimesh(vertices.numpy(), faces.numpy(), process=False)  # no merging needed: shared by edge id
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert mesh.euler_number == 0  # a torus
    assert mesh.volume > 0  # outward normals
    expected = 2 * np.pi**2 * 0.6 * 0.25**2 / (2 / 40) ** 3  # torus volume in grid cells
    assert abs(mesh.volume - expected) / expected < 0.02


def test_empty_and_full_grids_give_empty_meshes():
    for value in (1.0, -1.0, 0.0):
        vertices, faces = marching_cubes(torch.full((5, 6, 7), value))
        assert vertices.shape == (0, 3) and faces.shape == (0, 3)
        assert vertices.dtype == torch.float32 and faces.dtype == torch.int64


def test_bad_input():
    with pytest.raises(ValueError, match="grid"):
        marching_cubes(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="grid"):
        marching_cubes(torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="floating"):
        marching_cubes(torch.zeros(4, 4, 4, dtype=torch.int64))


def test_half_and_double_grids():
    coarse = torch.randn(1, 1, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    level = torch.nn.functional.interpolate(coarse, size=(20, 20, 20), mode="trilinear", align_corners=True)[0, 0]
    ref_vertices, ref_faces = marching_cubes(level)
    for dtype in (torch.float64, torch.bfloat16):
        vertices, faces = marching_cubes(level.to(dtype))
        assert vertices.dtype == torch.float32
        if dtype == torch.float64:
            torch.testing.assert_close(vertices[faces], ref_vertices[ref_faces], rtol=0, atol=1e-5)
        else:  # rounded values may move signs of near-zero points: same surface, roughly
            assert abs(len(faces) - len(ref_faces)) < 0.05 * len(ref_faces)


def test_corner_offsets_and_bits():
    # Bit m of the code is corner m, at CORNER_OFFSETS[m] (the order PyMCubes reads v[0..7] in).
    for m, offset in enumerate(CORNER_OFFSETS):
        level = torch.ones(2, 2, 2)
        level[offset] = -1.0
        assert cube_codes(level).item() == 1 << m
    assert sorted(CORNER_OFFSETS) == sorted(itertools.product((0, 1), repeat=3))
