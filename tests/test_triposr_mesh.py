"""triposr.mesh: marching cubes parity with upstream's fixture meshes, winding, frame, clean-up options."""

import json

import numpy as np
import pytest
import torch
import trimesh
from safetensors.torch import load_file
from scipy.spatial import cKDTree

from triposr import mesh as tmesh
from triposr.marching_cubes import marching_cubes

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


def native_triangles(mesh) -> np.ndarray:
    """(F, 3, 3) model-frame corner coordinates in face order: meshes compared whatever their vertex numbering."""
    return tmesh.export_to_native(np.asarray(mesh.vertices, dtype=np.float64))[mesh.faces]


@pytest.mark.parametrize("method", ["dense", "sparse"])
def test_pymcubes_matches_upstream_pymcubes_mesh(ref, field, method):
    mesh = tmesh.extract_mesh(field, radius=RADIUS, resolution=32, chunk_size=5000, backend="pymcubes", method=method)
    native = tmesh.export_to_native(np.asarray(mesh.vertices))
    # Same library, same level field: same triangles in the same order, vertices within float32 noise.
    np.testing.assert_array_equal(mesh.faces, ref["pymcubes_faces"].numpy())
    np.testing.assert_allclose(native, ref["pymcubes_vertices"].numpy(), atol=1e-4)
    assert np.abs(mesh.visual.vertex_colors.astype(int) - ref["pymcubes_vertex_colors_u8"].numpy()).max() <= 1


@pytest.mark.parametrize("method", ["dense", "sparse"])
def test_torch_marching_cubes_is_upstream_pymcubes_mesh(ref, field, method):
    """The default backend ("auto" = torch): PyMCubes's triangles in PyMCubes's order, only numbered differently."""
    mesh = tmesh.extract_mesh(field, radius=RADIUS, resolution=32, chunk_size=5000, method=method)
    expected = ref["pymcubes_vertices"].numpy().astype(np.float64)[ref["pymcubes_faces"].numpy()]
    np.testing.assert_allclose(native_triangles(mesh), expected, rtol=0, atol=1e-4)
    assert len(mesh.vertices) == len(ref["pymcubes_vertices"])  # one vertex per crossed grid edge, as merged there
    # Colours are per vertex: compare them through the triangles' corners.
    colors = mesh.visual.vertex_colors[mesh.faces].astype(int)  # (F, 3, 4)
    expected_colors = ref["pymcubes_vertex_colors_u8"].numpy()[ref["pymcubes_faces"].numpy()]
    assert np.abs(colors - expected_colors).max() <= 1


@pytest.mark.parametrize("backend", ["torch", "pymcubes", "skimage"])
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


def test_bad_backend_method_and_threshold(field):
    with pytest.raises(ValueError, match="backend"):
        tmesh.extract_mesh(field, radius=RADIUS, resolution=32, backend="torchmcubes")
    with pytest.raises(ValueError, match="method"):
        tmesh.extract_mesh(field, radius=RADIUS, resolution=32, method="octree")
    with pytest.raises(ValueError, match="block"):
        tmesh.sparse_level_grid(
            field, radius=RADIUS, resolution=32, threshold=25.0, chunk_size=100, device="cpu", block=1
        )
    with pytest.raises(ValueError, match="threshold"):
        tmesh.extract_mesh(field, radius=RADIUS, resolution=32, threshold=float("nan"))


@pytest.mark.parametrize("method", ["dense", "sparse"])
def test_empty_surface_says_what_to_do(field, method):
    with pytest.raises(ValueError, match="no surface at threshold 1e\\+09.*lower"):
        tmesh.extract_mesh(field, radius=RADIUS, resolution=32, threshold=1e9, method=method)


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


def test_simplify_leaves_no_face_with_a_repeated_corner():
    """Quadric decimation of a smoothed marching-cubes box (as TripoSR's field gives) leaves faces with a repeated
    corner (here 2 at 90 %): each counts an edge twice, so remeshing refused the mesh and a slicer sees it as
    non-manifold. simplify drops them: the result is closed and edge-manifold."""
    from scipy import ndimage
    from skimage.measure import marching_cubes

    axis = np.linspace(-1, 1, 40)
    x, y, z = np.meshgrid(axis, axis, axis, indexing="ij")
    box = np.maximum(np.maximum(abs(x) - 0.7, abs(y) - 0.5), abs(z) - 0.3) < 0
    vertices, faces, _, _ = marching_cubes(0.5 - ndimage.gaussian_filter(box.astype(np.float32), 1.0), 0.0)
    mesh = trimesh.Trimesh(vertices, faces, process=True)
    raw = np.asarray(mesh.simplify_quadric_decimation(face_count=int(len(mesh.faces) * 0.9)).faces)
    assert ((raw[:, 0] == raw[:, 1]) | (raw[:, 1] == raw[:, 2]) | (raw[:, 2] == raw[:, 0])).any()  # the case
    simple = tmesh.simplify(mesh, int(len(mesh.faces) * 0.9))
    f = simple.faces
    assert not ((f[:, 0] == f[:, 1]) | (f[:, 1] == f[:, 2]) | (f[:, 2] == f[:, 0])).any()
    assert simple.is_watertight and len(simple.vertices) == len(np.unique(f))


def test_tsr_extract_mesh_matches_upstream(fixtures_dir, ref):
    """Through the model: our TSR loaded from the fixture checkpoint, extract_mesh at 32^3 vs upstream (PyMCubes)."""
    from triposr.system import TSR

    model = TSR.from_pretrained(fixtures_dir / TINY, weight_name="model.safetensors")
    scene_codes = load_file(fixtures_dir / TINY / "outputs.safetensors")["scene_codes"]  # (1, 3, 8, 8, 8)
    (mesh,) = model.extract_mesh(scene_codes, resolution=32)  # sparse field, torch marching cubes
    expected = ref["pymcubes_vertices"].numpy().astype(np.float64)[ref["pymcubes_faces"].numpy()]
    np.testing.assert_allclose(native_triangles(mesh), expected, rtol=0, atol=1e-4)
    expected_colors = ref["pymcubes_vertex_colors_u8"].numpy()[ref["pymcubes_faces"].numpy()]
    assert np.abs(mesh.visual.vertex_colors[mesh.faces].astype(int) - expected_colors).max() <= 1
    (dense,) = model.extract_mesh(scene_codes, resolution=32, method="dense", backend="pymcubes")
    np.testing.assert_array_equal(dense.faces, ref["pymcubes_faces"].numpy())


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


# ---------------------------------------------------------------- coarse-to-fine field (method="sparse")


def assert_same_mesh(a, b):
    """Same triangles in the same order (vertex numbering free); vertices within float32 query noise."""
    assert len(a.faces) == len(b.faces) > 0
    np.testing.assert_allclose(native_triangles(a), native_triangles(b), rtol=0, atol=1e-5)


@pytest.mark.parametrize("resolution", [32, 47, 64])
def test_sparse_equals_dense_on_the_fixture(field, resolution):
    args = dict(radius=RADIUS, resolution=resolution, threshold=25.0, chunk_size=2**18, device="cpu")
    dense = tmesh.level_grid(field, **args)
    sparse, counts = tmesh.sparse_level_grid(field, **args)
    assert torch.equal(dense > 0, sparse > 0)  # every grid point on the same side
    crossing = torch.zeros_like(dense, dtype=torch.bool)  # ends of grid edges that cross: they place the vertices
    for axis in range(3):
        cut = (dense > 0).narrow(axis, 0, resolution - 1) != (dense > 0).narrow(axis, 1, resolution - 1)
        crossing.narrow(axis, 0, resolution - 1).logical_or_(cut)
        crossing.narrow(axis, 1, resolution - 1).logical_or_(cut)
    torch.testing.assert_close(sparse[crossing], dense[crossing], rtol=1e-5, atol=1e-5)
    assert counts["points_queried"] < counts["points_total"] and counts["rounds"] >= 1
    a = tmesh.extract_mesh(field, radius=RADIUS, resolution=resolution, method="dense", has_vertex_color=False)
    b = tmesh.extract_mesh(field, radius=RADIUS, resolution=resolution, method="sparse", has_vertex_color=False)
    assert_same_mesh(a, b)


@pytest.fixture(scope="module")
def benchmark_field():
    """The benchmark's object-like random field (benchmarks.stages: smooth_triplane_embeddings, calibrate_density)
    at the real triplane and decoder sizes (3 x 40 x 64 x 64 scene code, NeRF MLP 120-64x9-4), with a small
    transformer and image encoder instead of the real ones (the field's shape comes from the smoothed tokens)."""
    import copy
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.configs import TRIPOSR
    from benchmarks.stages import calibrate_density, object_image, smooth_triplane_embeddings
    from triposr import TSR, TSRConfig, ViTConfig

    values = copy.deepcopy(TRIPOSR)
    values["cond_image_size"] = 64
    values["image_tokenizer"]["pretrained_model_name_or_path"] = "small-vit"
    values["tokenizer"]["num_channels"] = 64
    values["backbone"].update(in_channels=64, num_attention_heads=2, attention_head_dim=16, num_layers=1)
    values["backbone"]["cross_attention_dim"] = 32
    values["post_processor"]["in_channels"] = 64
    vit = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=32)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = TSR(TSRConfig.from_dict(values), vit).eval()
        smooth_triplane_embeddings(model)
        with torch.no_grad():
            code = model([object_image(64, (127, 127, 127))])[0]  # (3, 40, 64, 64)
            calibrate_density(model, code)
    return model, code


def test_sparse_equals_dense_on_the_benchmark_field(benchmark_field, one_thread):
    model, code = benchmark_field
    assert code.shape == (3, 40, 64, 64)
    query = tmesh.scene_code_query_fn(model, code)
    args = dict(radius=RADIUS, resolution=80, threshold=25.0, chunk_size=2**18, device="cpu")
    dense = tmesh.level_grid(query, **args)
    sparse, counts = tmesh.sparse_level_grid(query, **args)
    assert torch.equal(dense > 0, sparse > 0)
    assert counts["points_queried"] < 0.6 * counts["points_total"]  # the point of it
    (v_dense, f_dense), (v_sparse, f_sparse) = marching_cubes(dense), marching_cubes(sparse)
    assert len(f_dense) > 10_000
    torch.testing.assert_close(v_sparse[f_sparse], v_dense[f_dense], rtol=0, atol=1e-4)  # grid units


def test_margin_keeps_near_threshold_specks_of_the_tiny_model(one_thread):
    """TSR.tiny's random field has specks a few voxels wide whose density barely exceeds the threshold; the default
    margin (0.75) keeps them at R=64, half of it does not (so this field tells the margins apart)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.stages import object_image
    from triposr import TSR

    model = TSR.tiny(seed=0)
    query = tmesh.scene_code_query_fn(model, model([object_image(64, (127, 127, 127))])[0])
    args = dict(radius=RADIUS, resolution=64, threshold=25.0, chunk_size=2**18, device="cpu")
    dense = tmesh.level_grid(query, **args) > 0
    sparse, _ = tmesh.sparse_level_grid(query, **args)
    assert torch.equal(dense, sparse > 0)
    half_margin, _ = tmesh.sparse_level_grid(query, **args, margin=0.5 * tmesh.SPARSE_MARGIN)
    assert (dense & ~(half_margin > 0)).sum() > 0


# An analytic field on a 65^3 grid (64 cells: blocks of 4 cells, coarse points every 4th grid line).
THIN_RES = 65
H = 2 * RADIUS / (THIN_RES - 1)  # grid spacing


def grid_coordinate(index: float) -> float:
    return -RADIUS + index * H


def smooth_window(t: torch.Tensor, half_width: float) -> torch.Tensor:
    """1 inside |t| < half_width, falling smoothly to 0 over 3 grid spacings beyond it."""
    return torch.exp(-(((t.abs() - half_width).clamp_min(0) / (1.5 * H)) ** 2))


def thin_sheet(points: torch.Tensor) -> dict:
    """A plate 0.6 wide, its mid-plane on grid line z = 34 (halfway between the coarse lines 32 and 36), density 40
    on it and Gaussian across (sigma 1.5 spacings): about 3 grid spacings thick at the level 25, and the density at
    the nearest coarse points is 16 (below the level, within half the threshold of it)."""
    x, y, z = points.unbind(-1)
    across = torch.exp(-((z - grid_coordinate(34)) ** 2) / (2 * (1.5 * H) ** 2))
    density = 40.0 * across * smooth_window(x, 0.3) * smooth_window(y, 0.3)
    return {"density_act": density[:, None], "color": points * 0 + 0.5}


def test_thin_sheet_between_coarse_points_is_not_lost():
    args = dict(radius=RADIUS, resolution=THIN_RES, threshold=25.0, chunk_size=2**18, device="cpu")
    dense = tmesh.level_grid(thin_sheet, **args)
    assert (dense > 0).any()
    coarse = dense[::4, ::4, ::4]
    assert (coarse < 0).all()  # no coarse point inside: the coarse grid alone does not see the sheet
    sparse, _ = tmesh.sparse_level_grid(thin_sheet, **args)  # defaults: the margin finds it
    assert torch.equal(dense > 0, sparse > 0)
    blind, _ = tmesh.sparse_level_grid(thin_sheet, **args, margin=0.0, dilate=0)
    assert not (blind > 0).any()  # without the margin it is lost: the margin is what finds it
    a = tmesh.extract_mesh(thin_sheet, radius=RADIUS, resolution=THIN_RES, method="dense", has_vertex_color=False)
    b = tmesh.extract_mesh(thin_sheet, radius=RADIUS, resolution=THIN_RES, has_vertex_color=False)
    assert_same_mesh(a, b)
    assert a.is_watertight


def ball_with_rod(points: torch.Tensor) -> dict:
    """A ball (radius 0.3) with a thin rod (about 3 grid spacings across) sticking out along +x to x = 0.7, its
    axis on the grid line (y, z) = (34, 34), halfway between coarse lines."""
    x, y, z = points.unbind(-1)
    ball = 50.0 * (1.0 - points.norm(dim=-1) / 0.6)
    across = (y - grid_coordinate(34)) ** 2 + (z - grid_coordinate(34)) ** 2
    rod = 40.0 * torch.exp(-across / (2 * (1.5 * H) ** 2)) * smooth_window(x - 0.35, 0.35)
    return {"density_act": torch.maximum(ball, rod)[:, None], "color": points * 0 + 0.5}


def test_closure_traces_a_thin_rod_from_the_body():
    """No margin, no dilation: the rod is found because its surface leaves the ball's blocks (the closure)."""
    args = dict(radius=RADIUS, resolution=THIN_RES, threshold=25.0, chunk_size=2**18, device="cpu")
    dense = tmesh.level_grid(ball_with_rod, **args)
    sparse, counts = tmesh.sparse_level_grid(ball_with_rod, **args, margin=0.0, dilate=0)
    assert counts["rounds"] > 3  # the rod is followed block by block
    assert torch.equal(dense > 0, sparse > 0)
    mesh = tmesh.extract_mesh(ball_with_rod, radius=RADIUS, resolution=THIN_RES, has_vertex_color=False)
    assert tmesh.export_to_native(np.asarray(mesh.vertices))[:, 0].max() > 0.65  # the rod's tip
    assert_same_mesh(
        tmesh.extract_mesh(ball_with_rod, radius=RADIUS, resolution=THIN_RES, method="dense", has_vertex_color=False),
        mesh,
    )


def test_sparse_counts_nan_density_as_empty():
    def holes(points):
        out = thin_sheet(points)
        out["density_act"] = torch.where(points[:, :1] > 0.2, float("nan"), out["density_act"])
        return out

    args = dict(radius=RADIUS, resolution=THIN_RES, threshold=25.0, chunk_size=2**18, device="cpu")
    dense = tmesh.level_grid(holes, **args)
    sparse, _ = tmesh.sparse_level_grid(holes, **args)
    assert torch.isfinite(sparse).all() and torch.equal(dense > 0, sparse > 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sparse_torch_mesh_on_cuda_equals_cpu(field):
    def cuda_field(points):
        return {k: v.to(points.device) for k, v in field(points.cpu()).items()}

    cpu = tmesh.extract_mesh(field, radius=RADIUS, resolution=64)
    gpu = tmesh.extract_mesh(cuda_field, radius=RADIUS, resolution=64, device="cuda")
    assert_same_mesh(cpu, gpu)
