"""triposr.mesh: marching cubes parity with upstream's fixture meshes, winding, frame, clean-up options."""

import json

import numpy as np
import pytest
import torch
import trimesh
from safetensors.torch import load_file
from scipy.spatial import cKDTree

from triposr import mesh as tmesh

TINY = "triposr_tiny"
RADIUS = 0.87


def fixture_field(fixtures_dir):
    """The tiny fixture model's field, computed here from its stored scene code and decoder weights (upstream's
    query_triplane: planes (x,y), (x,z), (y,z), bilinear, align_corners False; MLP; exp(raw - 1); sigmoid)."""
    weights = load_file(fixtures_dir / TINY / "model.safetensors")
    scene_code = load_file(fixtures_dir / TINY / "outputs.safetensors")["scene_codes"][0]  # (3, 8, 8, 8)

    def query(points):
        uv = (points / RADIUS)[None].expand(3, -1, -1)[:, :, [[0, 1], [0, 2], [1, 2]]]  # (3, N, 3, 2)
        uv = torch.stack([uv[0, :, 0], uv[1, :, 1], uv[2, :, 2]])[:, None]  # (3, 1, N, 2)
        feats = torch.nn.functional.grid_sample(scene_code, uv, align_corners=False)  # (3, C, 1, N)
        h = feats[:, :, 0].permute(2, 0, 1).reshape(points.shape[0], -1)  # (N, 3C)
        for i in (0, 2):
            h = torch.nn.functional.silu(
                h @ weights[f"decoder.layers.{i}.weight"].T + weights[f"decoder.layers.{i}.bias"]
            )
        out = h @ weights["decoder.layers.4.weight"].T + weights["decoder.layers.4.bias"]  # (N, 4)
        return {"density_act": torch.exp(out[:, :1] - 1.0), "color": torch.sigmoid(out[:, 1:])}

    return query


def signed_volume(vertices, faces):
    v = np.asarray(vertices, dtype=np.float64)
    a, b, c = v[faces[:, 0]], v[faces[:, 1]], v[faces[:, 2]]
    return float(np.einsum("ij,ij->i", a, np.cross(b, c)).sum() / 6.0)


@pytest.fixture(scope="module")
def ref(request):
    return load_file(request.config.rootpath / "tests" / "fixtures" / TINY / "mesh.safetensors")


@pytest.fixture(scope="module")
def field(request):
    return fixture_field(request.config.rootpath / "tests" / "fixtures")


def test_field_helper_matches_fixture_queries(fixtures_dir, field):
    out = load_file(fixtures_dir / TINY / "outputs.safetensors")
    got = field(out["query_points"])
    torch.testing.assert_close(got["density_act"], out["query_density_act"], rtol=2e-4, atol=0)
    torch.testing.assert_close(got["color"], out["query_color"], rtol=0, atol=2e-5)


def test_pymcubes_matches_upstream_pymcubes_mesh(ref, field):
    mesh = tmesh.extract_mesh(field, radius=RADIUS, resolution=32, chunk_size=5000)
    native = tmesh.export_to_native(np.asarray(mesh.vertices))
    # Same library, same level field: same triangles in the same order, vertices within float32 noise.
    np.testing.assert_array_equal(mesh.faces, ref["pymcubes_faces"].numpy())
    np.testing.assert_allclose(native, ref["pymcubes_vertices"].numpy(), atol=1e-4)
    assert np.abs(mesh.visual.vertex_colors.astype(int) - ref["pymcubes_vertex_colors_u8"].numpy()).max() <= 1


@pytest.mark.parametrize("backend", ["pymcubes", "skimage"])
def test_same_surface_as_upstream_torchmcubes(ref, field, backend):
    mesh = tmesh.extract_mesh(field, radius=RADIUS, resolution=32, backend=backend)
    up_v = ref["torchmcubes_vertices"].numpy().astype(np.float64)
    up_f = ref["torchmcubes_faces"].numpy()
    ours = tmesh.export_to_native(np.asarray(mesh.vertices, dtype=np.float64))
    assert abs(len(ours) - len(up_v)) / len(up_v) < 0.03
    assert abs(len(mesh.faces) - len(up_f)) / len(up_f) < 0.01
    d_ab, _ = cKDTree(up_v).query(ours)
    d_ba, _ = cKDTree(ours).query(up_v)
    assert d_ab.mean() + d_ba.mean() < 1e-4
    # Consistent winding with outward normals: same orientation as upstream (positive signed volume).
    assert mesh.is_winding_consistent
    vol, up_vol = signed_volume(ours, mesh.faces), signed_volume(up_v, up_f)
    assert vol > 0 and abs(vol - up_vol) < 1e-3 * up_vol
    # Colours are the field's colours at the vertices.
    nearest = cKDTree(up_v).query(ours)[1]
    diff = mesh.visual.vertex_colors[:, :3].astype(int) - ref["torchmcubes_vertex_colors_u8"].numpy()[nearest, :3]
    assert np.abs(diff).max() <= 1


def test_normals_point_outward_on_a_sphere():
    def ball(points):  # density 50 at the centre falling to 0 at radius 0.5: surface (25) at radius 0.25
        return {"density_act": 50.0 * (1.0 - points.norm(dim=-1, keepdim=True) / 0.5), "color": points * 0 + 0.5}

    mesh = tmesh.extract_mesh(ball, radius=RADIUS, resolution=48)
    assert mesh.is_watertight and mesh.is_winding_consistent
    centroid_dirs = mesh.triangles_center / np.linalg.norm(mesh.triangles_center, axis=1, keepdims=True)
    assert (np.einsum("ij,ij->i", mesh.face_normals, centroid_dirs) > 0.5).all()
    np.testing.assert_allclose(np.linalg.norm(mesh.vertices, axis=1), 0.25, atol=0.01)
    np.testing.assert_array_equal(mesh.visual.vertex_colors[:, :3], 128)


def test_chunking_does_not_change_the_mesh(field):
    a = tmesh.extract_mesh(field, radius=RADIUS, resolution=33, chunk_size=2**18)
    b = tmesh.extract_mesh(field, radius=RADIUS, resolution=33, chunk_size=777)
    np.testing.assert_array_equal(a.faces, b.faces)  # matmul blocking may move a vertex by float32 noise only
    np.testing.assert_allclose(a.vertices, b.vertices, atol=1e-6)


def test_no_color_and_device_argument(field):
    mesh = tmesh.extract_mesh(field, radius=RADIUS, resolution=32, has_vertex_color=False, device="cpu")
    assert mesh.visual.kind is None


@pytest.mark.parametrize("resolution", [31, 1025, 0, 64.0, True])
def test_resolution_out_of_range_is_a_clear_error(field, resolution):
    with pytest.raises(ValueError, match="resolution"):
        tmesh.extract_mesh(field, radius=RADIUS, resolution=resolution)


def test_bad_backend_and_threshold(field):
    with pytest.raises(ValueError, match="backend"):
        tmesh.extract_mesh(field, radius=RADIUS, resolution=32, backend="torchmcubes")
    with pytest.raises(ValueError, match="threshold"):
        tmesh.extract_mesh(field, radius=RADIUS, resolution=32, threshold=float("nan"))


def test_empty_surface_says_what_to_do(field):
    with pytest.raises(ValueError, match="no surface at threshold 1e\\+09.*lower"):
        tmesh.extract_mesh(field, radius=RADIUS, resolution=32, threshold=1e9)


def test_threshold_changes_the_surface(field):
    fat = tmesh.extract_mesh(field, radius=RADIUS, resolution=32, threshold=5.0, has_vertex_color=False)
    thin = tmesh.extract_mesh(field, radius=RADIUS, resolution=32, threshold=25.0, has_vertex_color=False)
    assert signed_volume(fat.vertices, fat.faces) > signed_volume(thin.vertices, thin.faces)


def test_export_frame_against_upstream_frames(fixtures_dir):
    facts = json.loads((fixtures_dir / "triposr_export_frame" / "export_frame.json").read_text())
    native = facts["native_frame (extract_mesh output, run.py export)"]
    gradio = facts["gradio_frame (gradio_app.py generate -> to_gradio_3d_orientation, then export obj+glb)"]
    p = tmesh.NATIVE_TO_EXPORT
    # Documented export frame: glTF, +Y up, the input view's front facing +Z, image right = +X.
    np.testing.assert_array_equal(p @ native["up"], [0, 1, 0])
    np.testing.assert_array_equal(p @ native["front (object side facing the input camera)"], [0, 0, 1])
    np.testing.assert_array_equal(p @ native["input_image_right_in_world"], [1, 0, 0])
    assert np.linalg.det(p) == pytest.approx(1.0)
    # Relation to upstream's app frame (README): ours = rotate 180 deg about Y after the app's transform.
    m_app = np.asarray(gradio["transform_4x4 (applied to column vectors, new = M @ [x,y,z,1])"], dtype=float)[:3, :3]
    np.testing.assert_array_equal(np.diag([-1.0, 1.0, -1.0]) @ m_app, p)
    np.testing.assert_array_equal(p @ np.asarray(native["transform_4x4"], dtype=float)[:3, :3], p)
    # The point helpers implement exactly that matrix, for numpy and torch alike.
    pts = np.random.default_rng(0).normal(size=(10, 3))
    np.testing.assert_allclose(tmesh.native_to_export(pts), pts @ p.T)
    np.testing.assert_allclose(tmesh.export_to_native(tmesh.native_to_export(pts)), pts)
    torch.testing.assert_close(tmesh.native_to_export(torch.from_numpy(pts)), torch.from_numpy(pts @ p.T))


def test_extract_mesh_returns_export_frame(field):
    """A vertex of the returned mesh, mapped back to the model frame, lies on the level-25 surface of the field."""
    mesh = tmesh.extract_mesh(field, radius=RADIUS, resolution=64, has_vertex_color=False)
    v = torch.from_numpy(np.asarray(mesh.vertices, dtype=np.float32))
    on_surface = field(tmesh.export_to_native(v))["density_act"]
    wrong_frame = field(v)["density_act"]
    assert (on_surface.log() - np.log(25.0)).abs().median() < 0.1
    assert (wrong_frame.log() - np.log(25.0)).abs().median() > 1.0


def _two_blobs():
    big = trimesh.creation.icosphere(subdivisions=3, radius=0.3)
    small = trimesh.creation.icosphere(subdivisions=1, radius=0.05)
    small.apply_translation([0.6, 0, 0])
    mesh = trimesh.util.concatenate([big, small])
    colors = np.zeros((len(mesh.vertices), 4), np.uint8)
    colors[:, 0] = np.arange(len(mesh.vertices)) % 256
    colors[:, 3] = 255
    mesh.visual.vertex_colors = colors
    return mesh, big


def test_keep_largest_component_drops_floaters_and_keeps_colors():
    mesh, big = _two_blobs()
    kept = tmesh.keep_largest_component(mesh)
    assert len(kept.faces) == len(big.faces) and len(kept.vertices) == len(big.vertices)
    assert kept.vertices[:, 0].max() < 0.31
    np.testing.assert_array_equal(kept.visual.vertex_colors, mesh.visual.vertex_colors[: len(big.vertices)])
    single = tmesh.keep_largest_component(big)
    assert len(single.faces) == len(big.faces)


def test_simplify_reaches_target_and_keeps_shape_and_colors():
    mesh = trimesh.creation.icosphere(subdivisions=4, radius=0.5)  # 5120 faces
    colors = np.round(255 * (mesh.vertices + 0.5)).clip(0, 255).astype(np.uint8)
    mesh.visual.vertex_colors = np.concatenate([colors, np.full_like(colors[:, :1], 255)], axis=1)
    simple = tmesh.simplify(mesh, 500)
    assert 450 <= len(simple.faces) <= 500
    assert simple.is_winding_consistent and signed_volume(simple.vertices, simple.faces) > 0
    np.testing.assert_allclose(np.linalg.norm(simple.vertices, axis=1), 0.5, atol=0.02)
    expected = np.round(255 * (simple.vertices + 0.5)).clip(0, 255)
    assert np.abs(simple.visual.vertex_colors[:, :3] - expected).max() < 0.1 * 255
    assert len(tmesh.simplify(mesh, 10_000).faces) == len(mesh.faces)
    with pytest.raises(ValueError, match="target_faces"):
        tmesh.simplify(mesh, 0)


def test_tsr_extract_mesh_matches_upstream(fixtures_dir, ref):
    """Through the model: our TSR loaded from the fixture checkpoint, extract_mesh at 32^3 vs upstream (PyMCubes)."""
    from triposr.system import TSR

    model = TSR.from_pretrained(fixtures_dir / TINY, weight_name="model.safetensors")
    scene_codes = load_file(fixtures_dir / TINY / "outputs.safetensors")["scene_codes"]  # (1, 3, 8, 8, 8)
    (mesh,) = model.extract_mesh(scene_codes, resolution=32)
    np.testing.assert_array_equal(mesh.faces, ref["pymcubes_faces"].numpy())
    np.testing.assert_allclose(tmesh.export_to_native(np.asarray(mesh.vertices)), ref["pymcubes_vertices"], atol=1e-4)
    assert np.abs(mesh.visual.vertex_colors.astype(int) - ref["pymcubes_vertex_colors_u8"].numpy()).max() <= 1


def test_level_grid_matches_upstream_grid(ref, field):
    level = tmesh.level_grid(field, radius=RADIUS, resolution=32, threshold=25.0, chunk_size=1000, device="cpu")
    assert level.shape == (32, 32, 32) and level.dtype == torch.float32
    torch.testing.assert_close(
        level + 25.0, ref["grid_density_act"], rtol=2e-4, atol=1e-5
    )  # atol: level + 25 rounding
    assert ((level > 0) == (ref["mc_level"] > 0)).all()  # margin 0.0093 >> float error


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_level_grid_has_no_host_syncs_on_cuda(field):
    def cuda_field(points):
        return {"density_act": (50.0 * (1.0 - points.norm(dim=-1, keepdim=True) / 0.5))}

    torch.cuda.set_sync_debug_mode("error")
    try:
        level = tmesh.level_grid(
            cuda_field, radius=RADIUS, resolution=64, threshold=25.0, chunk_size=10_000, device="cuda"
        )
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert level.is_cuda
    mesh = tmesh.extract_mesh(cuda_field, radius=RADIUS, resolution=64, has_vertex_color=False, device="cuda")
    assert mesh.is_watertight
