"""triposr.texture: UV and screen-space rasterisers, edge padding, and baked colours equal to the field's."""

import numpy as np
import pytest
import torch
import trimesh
from safetensors.torch import load_file

from triposr import mesh as tmesh
from triposr import texture

RADIUS = 0.87


def fixture_field(fixtures_dir):
    """The tiny fixture model's field from its stored scene code and decoder (same helper as test_triposr_mesh)."""
    weights = load_file(fixtures_dir / "triposr_tiny" / "model.safetensors")
    scene_code = load_file(fixtures_dir / "triposr_tiny" / "outputs.safetensors")["scene_codes"][0]

    def query(points):
        p = points / RADIUS
        uv = torch.stack([p[:, [0, 1]], p[:, [0, 2]], p[:, [1, 2]]])[:, None]  # (3, 1, N, 2)
        feats = torch.nn.functional.grid_sample(scene_code.to(points.device), uv, align_corners=False)  # (3, C, 1, N)
        h = feats[:, :, 0].permute(2, 0, 1).reshape(points.shape[0], -1)  # (N, 3C)
        for i in (0, 2):
            w, b = weights[f"decoder.layers.{i}.weight"], weights[f"decoder.layers.{i}.bias"]
            h = torch.nn.functional.silu(h @ w.T.to(h.device) + b.to(h.device))
        out = h @ weights["decoder.layers.4.weight"].T.to(h.device) + weights["decoder.layers.4.bias"].to(h.device)
        return {"density_act": torch.exp(out[:, :1] - 1.0), "color": torch.sigmoid(out[:, 1:])}

    return query


def linear_color_field(points):
    """Colour = an affine function of the model-frame position, different per axis (catches frame mix-ups)."""
    return {"density_act": torch.zeros_like(points[:, :1]), "color": (0.5 + 0.8 * points).clamp(0, 1)}


def sample_bilinear(image: np.ndarray, uv: np.ndarray) -> np.ndarray:
    """What a glTF/OpenGL viewer samples: texel centres at (i + 0.5) / S, v = 0 at the bottom row, clamp to edge."""
    h, w = image.shape[:2]
    x = uv[:, 0] * w - 0.5
    y = (1.0 - uv[:, 1]) * h - 0.5
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]

    def at(r, c):
        return image[np.clip(r, 0, h - 1), np.clip(c, 0, w - 1)]

    top = at(y0, x0) * (1 - fx) + at(y0, x0 + 1) * fx
    bottom = at(y0 + 1, x0) * (1 - fx) + at(y0 + 1, x0 + 1) * fx
    return top * (1 - fy) + bottom * fy


def texture_array(mesh) -> np.ndarray:
    return np.asarray(mesh.visual.material.baseColorTexture.convert("RGB"), dtype=np.float64) / 255.0


def field_at_vertices(field, mesh) -> np.ndarray:
    native = tmesh.export_to_native(torch.from_numpy(np.asarray(mesh.vertices, dtype=np.float32)))
    return field(native)["color"].numpy()


@pytest.fixture(scope="module")
def fixture_mesh_and_field(request):
    field = fixture_field(request.config.rootpath / "tests" / "fixtures")
    return tmesh.extract_mesh(field, radius=RADIUS, resolution=32), field


def test_baked_texture_matches_field_at_vertices(fixture_mesh_and_field):
    mesh, field = fixture_mesh_and_field
    baked = texture.bake_texture_from_field(field, mesh, 512)
    image = texture_array(baked)
    assert image.shape == (512, 512, 3)
    err = np.abs(sample_bilinear(image, baked.visual.uv) - field_at_vertices(field, baked)).max(axis=1)
    # uint8 quantisation (0.002) + half a texel of colour gradient; a handful of vertices at chart corners packed
    # within a texel of another chart see a little of it.
    assert err.mean() < 0.002
    assert np.quantile(err, 0.99) < 0.01
    assert err.max() < 0.06
    # Same surface: positions are the input's (split along seams), sliver faces below xatlas' epsilon dropped.
    assert set(map(tuple, np.round(baked.vertices, 6))) <= set(map(tuple, np.round(mesh.vertices, 6)))
    assert len(baked.faces) >= 0.99 * len(mesh.faces)
    assert abs(baked.area - mesh.area) < 1e-4 * mesh.area


def test_bake_uses_the_model_frame():
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=0.5)
    baked = texture.bake_texture_from_field(linear_color_field, sphere, 512)
    sampled = sample_bilinear(texture_array(baked), baked.visual.uv)
    expected = field_at_vertices(linear_color_field, baked)
    assert np.abs(sampled - expected).max() < 0.02
    # Had the export-frame positions been queried directly, the channels would be permuted.
    wrong = linear_color_field(torch.from_numpy(np.asarray(baked.vertices, dtype=np.float32)))["color"].numpy()
    assert np.abs(sampled - wrong).max() > 0.3
    assert baked.visual.material.metallicFactor == 0.0


def test_field_color_fn_takes_export_frame_points():
    points = torch.rand(100, 3) - 0.5
    colors = texture.field_color_fn(linear_color_field, chunk_size=7)(points)
    torch.testing.assert_close(colors, linear_color_field(tmesh.export_to_native(points))["color"])
    assert not torch.allclose(colors, linear_color_field(points)["color"])


def test_rasterizer_covers_a_full_quad_once():
    uvs = torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    size = 16
    texel, face, bary = texture.rasterize_uv(uvs, faces, size, margin=0.0)
    assert texel.numel() == size * size and torch.unique(texel).numel() == size * size
    # The barycentric point of each texel is its centre: u = (c + 0.5) / S, v = 1 - (r + 0.5) / S.
    point = (uvs[faces[face]] * bary[..., None]).sum(dim=1)  # (N, 2)
    row, col = texel // size, texel % size
    torch.testing.assert_close(point[:, 0], (col + 0.5) / size)
    torch.testing.assert_close(point[:, 1], 1.0 - (row + 0.5) / size)


def test_rasterizer_band_projects_onto_the_triangle():
    uvs = torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75]])
    faces = torch.tensor([[0, 1, 2]])
    inner, _, _ = texture.rasterize_uv(uvs, faces, 32, margin=0.0)
    texel, _, bary = texture.rasterize_uv(uvs, faces, 32, margin=1.5)
    assert texel.numel() > inner.numel()
    assert (bary >= -1e-6).all() and torch.allclose(bary.sum(dim=1), torch.ones(len(bary)))


def brute_force_screen(xy, depth, faces, height, width):
    """Per pixel centre, per triangle: the reference z-buffer (float64, edges inside, ties to the lower face)."""
    xy, depth, faces = xy.double().numpy(), depth.double().numpy(), faces.numpy()
    out = {}
    for r in range(height):
        for c in range(width):
            p = np.array([c + 0.5, r + 0.5])
            best = None
            for f, (i, j, k) in enumerate(faces):
                a, b, cc = xy[i], xy[j], xy[k]
                m = np.array([a - cc, b - cc]).T  # p - c = l0 (a - c) + l1 (b - c)
                if abs(np.linalg.det(m)) < 1e-12:
                    continue
                l0, l1 = np.linalg.solve(m, p - cc)
                bary = np.array([l0, l1, 1.0 - l0 - l1])
                if (bary < -1e-9).any():
                    continue
                z = bary @ depth[[i, j, k]]
                if best is None or z > best[0] + 1e-9:
                    best = (z, f, bary)
            if best is not None:
                out[r * width + c] = best
    return out


def test_rasterize_screen_matches_brute_force_z_buffer():
    gen = torch.Generator().manual_seed(3)
    height, width = 13, 17
    n_faces = 20
    # Random triangles that overlap each other and stick out of the image, at random depths.
    centres = torch.rand(n_faces, 1, 2, generator=gen) * torch.tensor([width, height])  # (F, 1, 2)
    xy = (centres + (torch.rand(n_faces, 3, 2, generator=gen) - 0.5) * 12).reshape(-1, 2)  # (3F, 2)
    depth = (torch.rand(n_faces, 1, generator=gen) + torch.rand(n_faces, 3, generator=gen) * 0.3).reshape(-1)
    faces = torch.arange(3 * n_faces).reshape(n_faces, 3)
    # A small batch budget exercises the batching across triangles.
    pixel, face, bary = texture.rasterize_screen(xy, depth, faces, height, width, max_candidates=40)
    expected = brute_force_screen(xy, depth, faces, height, width)
    assert torch.unique(pixel).numel() == pixel.numel()
    assert sorted(pixel.tolist()) == sorted(expected)
    occluded = 0
    for p, f, w in zip(pixel.tolist(), face.tolist(), bary.double().numpy()):
        z, f_ref, w_ref = expected[p]
        assert f == f_ref
        np.testing.assert_allclose(w, w_ref, atol=1e-6)
        occluded += sum(1 for g in range(n_faces) if g != f and covers(xy, faces[g], p, width))
    assert occluded > 20  # the scene really has overlaps, so the depth order was tested


def covers(xy, face, pixel, width):
    p = torch.tensor([pixel % width + 0.5, pixel // width + 0.5], dtype=torch.float64)
    a, b, c = xy[face].double()
    m = torch.stack([a - c, b - c], dim=1)
    if torch.linalg.det(m).abs() < 1e-12:
        return False
    l0, l1 = torch.linalg.solve(m, p - c)
    return bool(min(l0, l1, 1 - l0 - l1) >= 0)


def test_rasterize_screen_occlusion_order():
    # Two overlapping squares: the one with larger depth (closer) wins where both cover, whatever the face order.
    square = torch.tensor([[2.0, 2.0], [10.0, 2.0], [10.0, 10.0], [2.0, 10.0]])
    xy = torch.cat([square, square + 4.0])  # (8, 2)
    faces = torch.tensor([[0, 1, 2], [0, 2, 3], [4, 5, 6], [4, 6, 7]])
    for near_second in (True, False):
        depth = torch.tensor([0.0] * 4 + [1.0] * 4) if near_second else torch.tensor([1.0] * 4 + [0.0] * 4)
        pixel, face, bary = texture.rasterize_screen(xy, depth, faces, 16, 16)
        shown = dict(zip(pixel.tolist(), face.tolist()))
        overlap = 7 * 16 + 7  # pixel (7, 7): centre (7.5, 7.5) inside both squares
        assert (shown[overlap] >= 2) == near_second
        assert shown[3 * 16 + 3] < 2 and shown[12 * 16 + 12] >= 2  # only one square covers these
        assert len(shown) == 2 * 64 - 16  # 8 x 8 centres each, 4 x 4 shared, each pixel once
        point = (xy[faces[face]] * bary[..., None]).sum(dim=1)  # (N, 2) the pixel centres
        torch.testing.assert_close(point[:, 0], (pixel % 16).float() + 0.5)
        torch.testing.assert_close(point[:, 1], (pixel // 16).float() + 0.5)


def bumpy_sphere(subdivisions: int) -> trimesh.Trimesh:
    sphere = trimesh.creation.icosphere(subdivisions=subdivisions)
    v = sphere.vertices
    return trimesh.Trimesh(v * (1 + 0.15 * np.sin(3 * v[:, :1]) * np.cos(2 * v[:, 1:2])), sphere.faces)


def test_projection_atlas_is_the_same_surface_unfolded_without_overlaps():
    mesh = bumpy_sphere(3)
    size = 256
    vmapping, faces, uvs = texture.projection_atlas(mesh.vertices, mesh.faces, size, 2)
    assert len(faces) == len(mesh.faces) and uvs.min() > 0 and uvs.max() < 1
    # Same surface: every face is an input face (vertices split along chart seams only).
    np.testing.assert_array_equal(np.sort(vmapping[faces], axis=1), np.sort(mesh.faces, axis=1))
    # Charts are not mirrored: outward faces keep their counter-clockwise winding in UV.
    e1, e2 = uvs[faces[:, 1]] - uvs[faces[:, 0]], uvs[faces[:, 2]] - uvs[faces[:, 0]]
    signed = e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]  # (F,) 2 x signed UV area
    assert (signed > 0).all()
    # No overlaps: the texels covered equal the UV area; with the band, no chart reaches another chart's texels.
    uvs_t, faces_t = torch.from_numpy(uvs), torch.from_numpy(faces)
    texel, _, _ = texture.rasterize_uv(uvs_t, faces_t, size, margin=0.0)
    assert abs(texel.numel() - signed.sum() / 2 * size * size) < 0.01 * texel.numel()
    banded, _, _ = texture.rasterize_uv(uvs_t, faces_t, size)
    atlas = trimesh.Trimesh(np.c_[uvs, np.zeros(len(uvs))], faces, process=False)
    charts = trimesh.graph.connected_components(atlas.face_adjacency, nodes=np.arange(len(faces)))
    assert 6 <= len(charts) <= 40
    per_chart = sum(texture.rasterize_uv(uvs_t, faces_t[torch.from_numpy(c)], size)[0].numel() for c in charts)
    assert per_chart == banded.numel()


def brute_force_nearest(uvs, faces, size):
    """Per texel centre: the distance (texels) to the nearest triangle, over all triangles (numpy, float64)."""
    pix = np.stack([uvs[:, 0] * size - 0.5, (1 - uvs[:, 1]) * size - 0.5], 1).astype(np.float64)
    a, b, c = (pix[faces[:, i]][None] for i in range(3))  # (1, F, 2)
    r, col = np.divmod(np.arange(size * size), size)
    p = np.stack([col, r], 1).astype(np.float64)[:, None]  # (T, 1, 2)

    def seg(p, s0, s1):
        e = s1 - s0
        t = np.clip(((p - s0) * e).sum(-1) / (e * e).sum(-1), 0, 1)
        return np.linalg.norm(p - s0 - t[..., None] * e, axis=-1)

    cross = lambda u, v: u[..., 0] * v[..., 1] - u[..., 1] * v[..., 0]  # noqa: E731
    d1, d2, d3 = cross(b - a, p - a), cross(c - b, p - b), cross(a - c, p - c)
    inside = ((d1 >= 0) & (d2 >= 0) & (d3 >= 0)) | ((d1 <= 0) & (d2 <= 0) & (d3 <= 0))
    dist = np.minimum(np.minimum(seg(p, a, b), seg(p, b, c)), seg(p, c, a))
    return np.where(inside, 0.0, dist)  # (T, F)


def test_rasterize_uv_band_matches_brute_force_nearest_triangle():
    # The band is drawn around chart-boundary faces only; every texel must still get its nearest triangle.
    mesh = bumpy_sphere(1)
    size = 48
    _, faces, uvs = texture.projection_atlas(mesh.vertices, mesh.faces, size, 2)
    texel, face, bary = texture.rasterize_uv(torch.from_numpy(uvs), torch.from_numpy(faces), size)
    dist = brute_force_nearest(uvs, faces, size)  # (S*S, F)
    nearest = dist.min(axis=1)
    assert set(texel.tolist()) == set(np.nonzero(nearest <= 1.5)[0].tolist())
    np.testing.assert_allclose(dist[texel.numpy(), face.numpy()], nearest[texel.numpy()], atol=1e-6)
    assert (bary >= -1e-6).all()


def test_dilate_fills_the_gutter_with_neighbour_colours():
    image = torch.zeros(8, 8, 3)
    mask = torch.zeros(8, 8, dtype=torch.bool)
    image[2:4, 2:4] = torch.tensor([0.2, 0.4, 0.6])
    mask[2:4, 2:4] = True
    out, grown = texture.dilate(image, mask, 2)
    assert grown[0:6, 0:6].all() and not grown[7, 7]
    torch.testing.assert_close(out[grown], torch.tensor([0.2, 0.4, 0.6]).expand(int(grown.sum()), 3))
    torch.testing.assert_close(out[2:4, 2:4], image[2:4, 2:4])


def test_dilate_takes_each_gutter_texel_from_its_own_neighbours():
    """Two charts of different colours: the gutter beside each takes that chart's colour (a global mean would be
    purple), and a texel touching both takes the mean of exactly its filled 8-neighbours (hand-computed)."""
    red, blue = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0])
    image = torch.zeros(8, 8, 3)
    mask = torch.zeros(8, 8, dtype=torch.bool)
    image[:, 0], image[:, 7] = red, blue
    mask[:, 0] = mask[:, 7] = True
    out, grown = texture.dilate(image, mask, 3)
    assert grown.all()
    for col in (1, 2, 3):
        torch.testing.assert_close(out[:, col], red.expand(8, 3))
    for col in (4, 5, 6):
        torch.testing.assert_close(out[:, col], blue.expand(8, 3))

    # One texel between a red and a blue texel, and one more seeing red twice and blue once.
    image = torch.zeros(3, 3, 3)
    mask = torch.zeros(3, 3, dtype=torch.bool)
    image[0, 0], image[2, 0], image[0, 2] = red, red, blue
    mask[0, 0] = mask[2, 0] = mask[0, 2] = True
    out, _ = texture.dilate(image, mask, 1)
    torch.testing.assert_close(out[0, 1], (red + blue) / 2)  # filled neighbours: (0,0) red, (0,2) blue
    torch.testing.assert_close(out[1, 1], (2 * red + blue) / 3)  # (0,0), (2,0) red; (0,2) blue
    torch.testing.assert_close(out[1, 0], red)  # (0,0), (2,0): both red


@pytest.mark.parametrize("size", [256, 511, 4097, 1024.0])
def test_texture_size_range(size):
    sphere = trimesh.creation.icosphere(subdivisions=1)
    with pytest.raises(ValueError, match="texture_size"):
        texture.bake_texture_from_field(linear_color_field, sphere, size)


def test_default_padding_follows_texture_size():
    assert [texture.default_padding(s) for s in (512, 1024, 2048, 4096)] == [2, 4, 8, 16]


def test_bake_texture_with_tiny_model():
    from PIL import Image

    from triposr.system import TSR

    model = TSR.tiny(seed=0)
    scene_codes = model([Image.new("RGB", (64, 64), (200, 60, 60))])  # (1, 3, C, H, W)
    mesh = model.extract_mesh(scene_codes, resolution=32, has_vertex_color=False)[0]
    baked = texture.bake_texture(model, scene_codes[0], mesh, 512)
    field = tmesh.scene_code_query_fn(model, scene_codes[0])
    with torch.no_grad():
        expected = field(tmesh.export_to_native(torch.from_numpy(np.asarray(baked.vertices, np.float32))))["color"]
    err = np.abs(sample_bilinear(texture_array(baked), baked.visual.uv) - expected.numpy()).max(axis=1)
    assert np.quantile(err, 0.99) < 0.02


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bake_on_cuda_matches_cpu(fixture_mesh_and_field):
    mesh, field = fixture_mesh_and_field
    cpu = texture_array(texture.bake_texture_from_field(field, mesh, 512))
    gpu = texture_array(texture.bake_texture_from_field(field, mesh, 512, device="cuda"))
    assert np.abs(cpu - gpu).max() <= 2 / 255 + 1e-9
