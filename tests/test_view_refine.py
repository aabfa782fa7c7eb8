"""t2mv.view_refine: renderer gradients, the renderer against an analytic ray-cast, recovery of detail from six
normal maps, and robustness to bad views.

The ground truth is a sphere with 18 Gaussian bumps (asymmetric, so a mirrored view would show); the start mesh is
a plain, lower-resolution sphere (what TripoSR's smoothing leaves of such detail).
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image
from scipy.spatial import cKDTree

from benchmarks.view_refine import bump_centres
from t2mv import view_refine as vr
from t2mv.view_texture import ViewCamera
from wonder3d_perflow.cameras import VIEW_NAMES, view_axes

SIZE = 128
RADIUS = 0.5
BUMP = 0.1  # bump height, fraction of the radius
WIDTH = 0.04  # bump width: exp((d . c - 1) / WIDTH), about 0.2 rad
CAMERA = ViewCamera(scale=1.4, center=(0.01, 0.02, -0.01), image_size=SIZE)
FAST = {"iterations": 60, "lr": 5e-2, "lam": 10.0}  # converges on these small meshes in a test's time


CENTRES = bump_centres()  # the benchmark's ground truth, shared


def bump_radius(d: np.ndarray) -> np.ndarray:
    """Radius (N,) of the ground truth along unit directions d (N, 3)."""
    return RADIUS * (1.0 + BUMP * np.exp((d @ CENTRES.T - 1.0) / WIDTH).sum(-1))


def analytic_normal(d: np.ndarray) -> np.ndarray:
    """Outward unit normals (N, 3) of the ground truth at its points along unit directions d (N, 3):
    the gradient of f(p) = |p| - r(p / |p|)."""
    g = RADIUS * BUMP * (np.exp((d @ CENTRES.T - 1.0) / WIDTH) / WIDTH) @ CENTRES  # (N, 3) dr/dd
    tangential = g - (g * d).sum(-1, keepdims=True) * d
    n = d - tangential / bump_radius(d)[:, None]
    return n / np.linalg.norm(n, axis=-1, keepdims=True)


def bumpy_sphere(subdivisions: int) -> trimesh.Trimesh:
    sphere = trimesh.creation.icosphere(subdivisions=subdivisions)
    d = sphere.vertices / np.linalg.norm(sphere.vertices, axis=1, keepdims=True)
    return trimesh.Trimesh(d * bump_radius(d)[:, None], sphere.faces, process=False)


def encode(normals: np.ndarray, masks: np.ndarray) -> tuple[list[Image.Image], list[Image.Image]]:
    """(6, S, S, 3) unit normals + (6, S, S) bool -> the multiview stage's PIL images (white background)."""
    rgb = np.where(masks[..., None], np.round((normals + 1.0) / 2.0 * 255.0), 255.0).clip(0, 255).astype(np.uint8)
    return [Image.fromarray(x) for x in rgb], [Image.fromarray((m * 255).astype(np.uint8)) for m in masks]


def render_targets(mesh: trimesh.Trimesh, camera: ViewCamera):
    """Targets rendered by the module's own renderer."""
    x = torch.tensor(mesh.vertices, dtype=torch.float32)
    topo = vr.mesh_topology(torch.tensor(mesh.faces), len(x))
    vis = vr.visibility(x, topo, camera, camera.image_size)
    normal, _ = vr.render(x, topo, camera, vis).images()
    s = camera.image_size
    return encode(normal.reshape(6, s, s, 3).numpy(), vis.hard.reshape(6, s, s).numpy())


def raycast_targets(camera: ViewCamera):
    """Targets by an independent analytic ray-cast of the ground truth: orthographic rays through the pixel centres,
    the first sign change of f(p) = |p| - r(p / |p|) along each, refined by bisection."""
    s, scale = camera.image_size, camera.scale
    axes = view_axes(torch.float64).numpy()  # (6, 3, 3)
    u = (np.arange(s) + 0.5) / s * 2.0 - 1.0  # column -> NDC u
    v = 1.0 - (np.arange(s) + 0.5) / s * 2.0  # row -> NDC v
    uu, vv = np.meshgrid(u, v)  # (S, S), [row, col]
    ts = np.linspace(0.6, -0.6, 61)  # along the view direction, from the camera's side (radius < 0.56)

    def f(p):
        r = np.linalg.norm(p, axis=-1)
        return r - bump_radius(p / r[..., None])

    normals, masks = np.zeros((6, s, s, 3)), np.zeros((6, s, s), dtype=bool)
    for k in range(6):
        right, up, back = axes[k]
        origin = np.asarray(camera.center) + (uu / scale)[..., None] * right + (vv / scale)[..., None] * up
        origin = origin.reshape(-1, 3)  # (S * S, 3)
        near = np.linalg.norm(origin - (origin @ back)[:, None] * back, axis=1) < 0.6  # rays that can hit
        values = np.stack([f(origin[near] + t * back) for t in ts], axis=1)  # (R, T)
        inside = values < 0
        hit = np.zeros(len(origin), dtype=bool)
        hit[near] = inside.any(axis=1)
        inside = inside[inside.any(axis=1)]
        first = inside.argmax(axis=1)
        lo, hi, o = ts[np.maximum(first - 1, 0)], ts[first], origin[hit]  # f(lo) > 0 > f(hi)
        for _ in range(40):
            mid = (lo + hi) / 2
            out = f(o + mid[:, None] * back) > 0
            lo, hi = np.where(out, mid, lo), np.where(out, hi, mid)
        p = o + ((lo + hi) / 2)[:, None] * back
        n = np.zeros((s * s, 3))
        n[hit] = analytic_normal(p / np.linalg.norm(p, axis=-1, keepdims=True))
        normals[k], masks[k] = n.reshape(s, s, 3), hit.reshape(s, s)
    return normals, masks


def surface_errors(mesh: trimesh.Trimesh, gt: trimesh.Trimesh, n: int = 100_000) -> tuple[float, float]:
    """Symmetric Chamfer distance (mean of both directions) and mean angle (degrees) between the mesh's normals and
    the analytic ground truth's normal in the same direction from the centre."""
    pa, fa = trimesh.sample.sample_surface(mesh, n, seed=1)
    pb, _ = trimesh.sample.sample_surface(gt, n, seed=2)
    chamfer = (cKDTree(pb).query(pa)[0].mean() + cKDTree(pa).query(pb)[0].mean()) / 2
    d = pa / np.linalg.norm(pa, axis=1, keepdims=True)
    cos = (mesh.face_normals[fa] * analytic_normal(d)).sum(-1).clip(-1, 1)
    return float(chamfer), float(np.degrees(np.arccos(cos)).mean())


@pytest.fixture(scope="module")
def gt() -> trimesh.Trimesh:
    return bumpy_sphere(5)


@pytest.fixture(scope="module")
def start() -> trimesh.Trimesh:
    mesh = trimesh.creation.icosphere(subdivisions=4, radius=RADIUS * 1.02)
    mesh.visual.vertex_colors = np.tile([200, 120, 40, 255], (len(mesh.vertices), 1)).astype(np.uint8)
    return mesh


@pytest.fixture(scope="module")
def targets(gt, one_thread):
    return render_targets(gt, CAMERA)


@pytest.fixture(scope="module")
def start_errors(start, gt):
    return surface_errors(start, gt)


# --------------------------------------------------------------------------------------------- renderer


def test_render_gradients_match_finite_differences(one_thread):
    mesh = bumpy_sphere(1)  # 42 vertices, 80 faces
    camera = ViewCamera(scale=1.5, center=(0.0, 0.0, 0.0), image_size=32)
    x = torch.tensor(mesh.vertices, dtype=torch.float64)
    topo = vr.mesh_topology(torch.tensor(mesh.faces), len(x))
    vis = vr.visibility(x, topo, camera, 32)
    base = vr.render(x, topo, camera, vis)
    gen = torch.Generator().manual_seed(0)
    w_normal = torch.randn(len(vis.pixel), 3, generator=gen, dtype=torch.float64)  # (N, 3)
    # Interior of the silhouette ramp only: at 0 or 1 the coverage is clamped (no gradient, a kink).
    ramp = (base.edge_coverage > 0.02) & (base.edge_coverage < 0.98)
    assert ramp.sum() > 20
    w_edge = torch.randn(len(vis.edge_pixel), generator=gen, dtype=torch.float64) * ramp  # (B,)

    def loss(v: torch.Tensor, check_same_visibility: bool = False) -> torch.Tensor:
        vis_v = vr.visibility(v, topo, camera, 32)  # re-rasterised: the function the optimiser really sees
        if check_same_visibility:  # a step of 1e-6 moves no pixel centre across an edge
            assert torch.equal(vis_v.pixel, vis.pixel) and torch.equal(vis_v.face, vis.face)
            assert torch.equal(vis_v.edge_pixel, vis.edge_pixel) and torch.equal(vis_v.edge, vis.edge)
        r = vr.render(v, topo, camera, vis_v)
        return (r.normal * w_normal).sum() + (r.edge_coverage * w_edge).sum()

    xg = x.clone().requires_grad_(True)
    loss(xg).backward()
    # Every coordinate of 8 contour vertices (silhouette and normals) and of 8 others (normals only).
    contour = vis.edge.unique()
    others = torch.tensor([i for i in range(len(x)) if i not in set(contour.tolist())])
    chosen = torch.cat([contour[torch.randperm(len(contour), generator=gen)[:8]], others[:8]])
    eps = 1e-6
    for i in chosen.tolist():
        for j in range(3):
            plus, minus = x.clone(), x.clone()
            plus[i, j] += eps
            minus[i, j] -= eps
            numeric = (loss(plus, True) - loss(minus, True)) / (2 * eps)
            torch.testing.assert_close(xg.grad[i, j], numeric, rtol=1e-5, atol=1e-7)
    assert xg.grad[chosen].abs().max() > 1e-3

    # The silhouette term alone reaches the contour vertices (and only through the edges it is computed from).
    xs = x.clone().requires_grad_(True)
    vr.render(xs, topo, camera, vis).edge_coverage.mul(w_edge).sum().backward()
    moved = xs.grad.norm(dim=-1) > 0
    assert moved.any()
    assert set(torch.nonzero(moved).squeeze(1).tolist()) <= set(vis.edge.unique().tolist())


def test_fused_pixel_cosine(one_thread):
    """The optimiser's fused cosine node: finite differences (gradcheck) and the composed ops agree with it."""
    gen = torch.Generator().manual_seed(1)
    pairs, pixels = 7, 40
    gx, gy, h = (torch.randn(pairs, 3, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    pair = torch.randint(0, pairs, (pixels,), generator=gen)
    p = torch.rand(pixels, 2, generator=gen, dtype=torch.float64) * 4
    target = torch.nn.functional.normalize(torch.randn(pixels, 3, generator=gen, dtype=torch.float64), dim=-1)
    assert torch.autograd.gradcheck(lambda *a: vr._PixelCosine.apply(*a, pair, p, target), (gx, gy, h))

    mesh = bumpy_sphere(1)
    x = torch.tensor(mesh.vertices, dtype=torch.float64, requires_grad=True)
    topo = vr.mesh_topology(torch.tensor(mesh.faces), len(x))
    camera = ViewCamera(scale=1.5, center=(0.0, 0.0, 0.0), image_size=32)
    r = vr.render(x, topo, camera, vr.visibility(x, topo, camera, 32))
    target = torch.nn.functional.normalize(
        torch.randn(len(r.vis.pixel), 3, generator=gen, dtype=torch.float64), dim=-1
    )
    fused = r.cosine(target)
    composed = (r.normal * target).sum(-1)
    torch.testing.assert_close(fused, composed)
    (g_fused,) = torch.autograd.grad(fused.sum(), x, retain_graph=True)
    (g_composed,) = torch.autograd.grad(composed.sum(), x)
    torch.testing.assert_close(g_fused, g_composed)


def test_renderer_matches_analytic_raycast(gt, one_thread):
    """The module's renders of the ground-truth mesh agree with an independent ray-cast of the analytic surface:
    same silhouettes (also no mirror image: the bumps are asymmetric) and normals in the front camera's frame."""
    normals_rc, masks_rc = raycast_targets(CAMERA)
    x = torch.tensor(gt.vertices, dtype=torch.float32)
    topo = vr.mesh_topology(torch.tensor(gt.faces), len(x))
    vis = vr.visibility(x, topo, CAMERA, SIZE)
    normal, coverage = vr.render(x, topo, CAMERA, vis).images()
    hard = vis.hard.reshape(6, SIZE, SIZE).numpy()
    normal = normal.reshape(6, SIZE, SIZE, 3).numpy()
    for k, name in enumerate(VIEW_NAMES):
        iou = (hard[k] & masks_rc[k]).sum() / (hard[k] | masks_rc[k]).sum()
        assert iou > 0.98, (name, iou)
        soft = coverage[k].reshape(SIZE, SIZE).numpy()
        assert abs(soft.sum() - masks_rc[k].sum()) < 0.01 * masks_rc[k].sum(), name
        both = hard[k] & masks_rc[k]
        cos = (normal[k][both] * normals_rc[k][both]).sum(-1).clip(-1, 1)
        assert np.degrees(np.arccos(cos)).mean() < 2.0, name
    # Mirror check: the left and right halves of the front view differ, and the renders agree on which is which.
    assert not np.array_equal(masks_rc[0], masks_rc[0][:, ::-1])


def test_topology_and_solver(one_thread, monkeypatch):
    mesh = trimesh.creation.icosphere(subdivisions=2)
    faces = torch.tensor(mesh.faces)
    topo = vr.mesh_topology(faces, len(mesh.vertices))
    assert len(topo.edges) == len(mesh.edges_unique)
    assert (topo.edge_faces >= 0).all()  # closed: two faces per edge
    for e, (f0, f1), (o0, o1) in zip(topo.edges.tolist()[:50], topo.edge_faces.tolist(), topo.edge_opposite.tolist()):
        assert set(e) < set(mesh.faces[f0]) and set(e) < set(mesh.faces[f1])
        assert o0 in mesh.faces[f0] and o0 not in e and o1 in mesh.faces[f1] and o1 not in e
    steps = vr.LargeSteps(topo, 19.0, torch.device("cpu"))
    x = torch.tensor(mesh.vertices, dtype=torch.float32)
    u = steps.to_differential(x)
    assert steps.solver.backend == "cholespy"
    torch.testing.assert_close(steps.from_differential(u), x, atol=1e-4, rtol=0)
    monkeypatch.setitem(sys.modules, "cholespy", None)  # the SciPy fallback gives the same solve
    fallback = vr.LargeSteps(topo, 19.0, torch.device("cpu"))
    assert fallback.solver.backend == "scipy-splu"
    torch.testing.assert_close(fallback.from_differential(u), x, atol=1e-4, rtol=0)


def test_self_intersections():
    sphere = trimesh.creation.icosphere(subdivisions=2)
    assert vr.self_intersections(sphere.vertices, sphere.faces) == 0
    other = sphere.copy()
    other.apply_translation([0.5, 0.13, 0.07])
    both = trimesh.util.concatenate([sphere, other])
    assert vr.self_intersections(both.vertices, both.faces) > 0
    apart = sphere.copy()
    apart.apply_translation([3.0, 0.0, 0.0])
    separate = trimesh.util.concatenate([sphere, apart])
    assert vr.self_intersections(separate.vertices, separate.faces) == 0


# --------------------------------------------------------------------------------------------- refinement


def check_refined(result, start, gt, start_errors):
    assert result.accepted, result.warnings
    chamfer, angle = surface_errors(result.mesh, gt)
    assert chamfer <= 0.5 * start_errors[0], (chamfer, start_errors)
    assert angle <= 0.5 * start_errors[1], (angle, start_errors)
    assert result.mesh.is_watertight and np.array_equal(result.mesh.faces, start.faces)
    assert vr.self_intersections(result.mesh.vertices, result.mesh.faces) == 0
    assert result.losses["final"]["data"] < 0.5 * result.losses["initial"]["data"]
    np.testing.assert_array_equal(result.mesh.visual.vertex_colors, start.visual.vertex_colors)


def test_refinement_recovers_detail(start, gt, targets, start_errors, one_thread):
    normals, masks = targets
    result = vr.refine_mesh(start, normals, masks, CAMERA, **FAST)
    check_refined(result, start, gt, start_errors)
    assert result.warnings == []
    assert len(result.losses["history"]) == FAST["iterations"] + 1
    assert set(result.timings) >= {"setup", "optimise", "total"}


def test_refinement_from_raycast_maps(start, gt, start_errors, one_thread):
    """Targets from the independent ray-cast: the fit does not depend on its own renderer's conventions."""
    normals, masks = encode(*raycast_targets(CAMERA))
    check_refined(vr.refine_mesh(start, normals, masks, CAMERA, **FAST), start, gt, start_errors)


def test_refinement_is_deterministic(targets, one_thread):
    normals, masks = targets
    mesh = trimesh.creation.icosphere(subdivisions=3, radius=RADIUS)
    a = vr.refine_mesh(mesh, normals, masks, CAMERA, iterations=8, check_intersections=False)
    b = vr.refine_mesh(mesh, normals, masks, CAMERA, iterations=8, check_intersections=False)
    assert a.accepted and np.array_equal(a.mesh.vertices, b.mesh.vertices)
    assert a.losses["history"] == b.losses["history"]


def test_inward_winding_is_handled(targets, one_thread):
    """A mesh whose faces wind inwards is refined with outward normals; its own faces come back unchanged."""
    normals, masks = targets
    mesh = trimesh.creation.icosphere(subdivisions=3, radius=RADIUS)
    inward = trimesh.Trimesh(mesh.vertices, mesh.faces[:, ::-1], process=False)
    a = vr.refine_mesh(mesh, normals, masks, CAMERA, iterations=8, check_intersections=False)
    b = vr.refine_mesh(inward, normals, masks, CAMERA, iterations=8, check_intersections=False)
    assert b.accepted and any("inwards" in w for w in b.warnings)
    assert np.array_equal(b.mesh.faces, inward.faces)
    np.testing.assert_allclose(b.mesh.vertices, a.mesh.vertices, atol=1e-5)


# --------------------------------------------------------------------------------------------- robustness


def corrupt_shift(image: Image.Image, pixels: int) -> Image.Image:
    return Image.fromarray(np.roll(np.asarray(image), pixels, axis=1))


@pytest.mark.parametrize(
    "case, view",
    [("flat normals", "front"), ("empty mask", "back"), ("mirrored normals", "left")],
)
def test_bad_view_leaves_mesh_no_worse(case, view, start, gt, targets, start_errors, one_thread):
    normals, masks = list(targets[0]), list(targets[1])
    k = VIEW_NAMES.index(view)
    if case == "flat normals":  # every pixel facing the front camera
        normals[k] = Image.new("RGB", (SIZE, SIZE), (128, 128, 255))
    elif case == "empty mask":
        masks[k] = Image.new("L", (SIZE, SIZE), 0)
    else:  # the right view's normal map given as the left's: it contradicts the left mask's outline
        normals[k] = normals[VIEW_NAMES.index("right")]
    result = vr.refine_mesh(start, normals, masks, CAMERA, **FAST)
    assert any(view in w for w in result.warnings), result.warnings
    assert view not in result.losses["views_used"]
    chamfer, angle = surface_errors(result.mesh, gt)
    assert chamfer <= start_errors[0] and angle <= start_errors[1]


def test_normals_disagreeing_everywhere_are_rejected(start, targets, one_thread):
    """No view agrees with its mask: nothing is refined, the input mesh comes back with a warning."""
    normals = [Image.new("RGB", (SIZE, SIZE), (128, 128, 255))] * 6
    result = vr.refine_mesh(start, normals, targets[1], CAMERA, **FAST)
    assert not result.accepted and result.mesh is start
    assert any("rejected" in w for w in result.warnings)
    assert result.losses["views_used"] == []


def test_losses_going_up_are_rejected(start, targets, one_thread):
    """A step size that blows the optimisation up: the loss goes up (or turns non-finite); the input is kept."""
    normals, masks = targets
    result = vr.refine_mesh(start, normals, masks, CAMERA, iterations=5, lr=50.0)
    assert not result.accepted and result.mesh is start
    assert any("rejected" in w for w in result.warnings), result.warnings
    assert np.array_equal(start.vertices, trimesh.creation.icosphere(subdivisions=4, radius=RADIUS * 1.02).vertices)


def test_bad_inputs():
    mesh = trimesh.creation.icosphere(subdivisions=1)
    grey = [Image.new("RGB", (SIZE, SIZE), (128, 128, 255))] * 6
    white = [Image.new("L", (SIZE, SIZE), 255)] * 6
    with pytest.raises(ValueError, match="6 images"):
        vr.refine_mesh(mesh, grey[:5], white, CAMERA)
    with pytest.raises(ValueError, match="image_size"):
        vr.refine_mesh(mesh, grey, white, ViewCamera(scale=1.0, center=(0.0, 0.0, 0.0), image_size=64))
    with pytest.raises(ValueError, match="view_weights"):
        vr.refine_mesh(mesh, grey, white, CAMERA, view_weights=(1.0, 1.0))
