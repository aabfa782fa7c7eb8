"""t2mv.view_refine: recovery of detail from six normal maps (an analytic bumpy sphere, and a creased object with
a handle from a TripoSR-like marching-cubes start), remeshing without folds, robustness to bad views and to masks a
pixel or two off the normal maps, a no_grad caller, and the Large Steps solver.
"""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image
from scipy import ndimage
from view_scenes import (
    CAMERA,
    DISC_BOX,
    RADIUS,
    SIZE,
    bumpy_sphere,
    chamfer,
    disc_sdf,
    encode,
    mug_start,
    mug_truth,
    mug_views,
    raycast_targets,
    render_targets,
    surface_errors,
)

from t2mv import view_refine as vr
from t2mv.view_texture import ViewCamera
from wonder3d_perflow.cameras import VIEW_NAMES

# Converges on these small meshes in a test's time. The camera here is exact and the start deliberately 2 % too
# large: with the camera's similarity free (the default, for a camera fitted to the start's own silhouettes, as in
# the chain) the fit would rightly explain that by the camera; these tests measure the mesh.
FAST = {"iterations": 60, "lr": 5e-2, "lam": 10.0, "fit_camera": False}


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


def test_large_steps_solver(one_thread, monkeypatch):
    mesh = trimesh.creation.icosphere(subdivisions=2)
    topo = vr.mesh_topology(torch.tensor(mesh.faces), len(mesh.vertices))
    steps = vr.LargeSteps(topo, 19.0, torch.device("cpu"))
    x = torch.tensor(mesh.vertices, dtype=torch.float32)
    u = steps.to_differential(x)
    assert steps.solver.backend == "cholespy"
    torch.testing.assert_close(steps.from_differential(u), x, atol=1e-4, rtol=0)
    monkeypatch.setitem(sys.modules, "cholespy", None)  # the SciPy fallback gives the same solve
    fallback = vr.LargeSteps(topo, 19.0, torch.device("cpu"))
    assert fallback.solver.backend == "scipy-splu"
    torch.testing.assert_close(fallback.from_differential(u), x, atol=1e-4, rtol=0)


def test_untangle_pulls_back_only_where_the_fit_crossed_itself():
    """A fit that grew the whole sphere by 10 % and pushed one vertex through the far side: the spot is pulled back
    until nothing intersects, the rest of the fit (the growth) is kept; where the start itself crosses there,
    nothing can be undone and the pairs are reported (the refinement is then rejected)."""
    sphere = trimesh.creation.icosphere(subdivisions=4)
    start = np.asarray(sphere.vertices, dtype=np.float64)
    faces = np.asarray(sphere.faces)
    fitted = start * 1.1
    tip = int(np.argmax(start[:, 0]))
    fitted[tip] = [-1.6, 0.0, 0.0]  # through the sphere and out of the far side
    assert vr.self_intersections(fitted, faces) > 0
    out, moved, left = vr.untangle(fitted, start, faces)
    assert left == 0 and vr.self_intersections(out, faces) == 0
    assert 0 < moved < 0.1 * len(start)
    far = np.abs(start[:, 0]) < 0.5  # well away from the tip (x = 1) and from where it crossed (x = -1)
    np.testing.assert_array_equal(out.numpy()[far], fitted[far])
    assert fitted[tip].tolist() == [-1.6, 0.0, 0.0]  # the caller's array is not modified
    crossed_start = start.copy()
    crossed_start[tip] = [-1.6, 0.0, 0.0]
    _, _, left = vr.untangle(fitted, crossed_start, faces)
    assert left > 0


def test_per_view_corrections_move_one_view_and_stay_bounded():
    """The refinement's camera (`_Similarity`) with per-view corrections: zero parameters project as the base camera;
    one view's zoom and shift move that view's pixels only (about the image centre), not the depth; `clamp_` holds
    them to ±2 % and ±2 px; `record` reports them."""
    points = torch.tensor(trimesh.creation.icosphere(subdivisions=1).vertices, dtype=torch.float32) * 0.5
    plain = vr._Similarity(CAMERA, torch.zeros(4), points.mean(0), 0.01)
    sim = vr._Similarity(CAMERA, torch.zeros(22), points.mean(0), 0.01)
    base = CAMERA.project(points)  # (6, N, 3)
    torch.testing.assert_close(plain.project(points), base)
    torch.testing.assert_close(sim.project(points), base)
    with torch.no_grad():
        sim.params[4 + 2] = math.log(1.01)  # view 2 (right): 1 % larger
        sim.params[10 + 2 * 2 : 10 + 2 * 2 + 2] = torch.tensor([1.5, -0.5]) / 25.0  # and 1.5 px right, 0.5 px up
    moved = sim.project(points)
    half = CAMERA.image_size / 2.0
    expected = (base[2, :, :2] - half) * 1.01 + half + torch.tensor([1.5, -0.5])
    torch.testing.assert_close(moved[2, :, :2], expected, atol=1e-4, rtol=0)
    others = [k for k in range(6) if k != 2]
    torch.testing.assert_close(moved[others], base[others])
    torch.testing.assert_close(moved[..., 2], base[..., 2])
    with torch.no_grad():
        sim.params[4:] = 1.0
    sim.clamp_()
    record = sim.record()
    assert max(record["view_zoom"]) <= math.exp(0.02) + 1e-6
    assert max(max(abs(v) for v in row) for row in record["view_shift_px"]) <= 2.0 + 1e-6


def test_uniform_adam_step_survives_one_coordinates_spike():
    """One coordinate's gradient spike must not set every other coordinate's step (with the second moments'
    maximum as the shared scale it did, for hundreds of steps: beta2 = 0.999), nor move that coordinate by more than
    the step size; the shared scale stays one for all (the Large Steps rule), so equal gradients move equally."""
    lr, steps = 0.01, 20

    def run(quantile: float) -> torch.Tensor:
        x = torch.zeros(2000, 3, requires_grad=True)
        opt = vr.AdamUniform(x, lr, quantile=quantile)
        for t in range(steps):
            g = torch.ones_like(x)  # d/dx of sum(x): every coordinate pulled down alike
            if t == 0:
                g[7, 1] = 1e4  # a sliver's silhouette edge, once
            x.grad = g
            opt.step()
        return x.detach()

    robust = run(0.999)
    others = torch.ones(2000, 3, dtype=torch.bool)
    others[7, 1] = False
    # Every other coordinate moved by the full step each time, and all alike (one shared scale).
    torch.testing.assert_close(robust[others], torch.full((int(others.sum()),), -lr * steps), rtol=0.02, atol=0)
    assert robust[7, 1] >= -lr * steps - 1e-6  # the spiked one clipped at the step size
    throttled = run(1.0)  # the maximum: the spike shrinks everyone's step ~50-fold
    assert throttled[others].abs().max() < 0.1 * lr * steps
    with pytest.raises(ValueError, match="quantile"):
        vr.AdamUniform(torch.zeros(3, requires_grad=True), lr, quantile=0.0)


def test_normal_error_makes_a_steep_narrow_step_cheaper_than_a_wide_gentle_one(monkeypatch):
    """A smoothed step (a recess's wall) is a sloped band of pixels. With the plain error, linear in the angle, the
    band's summed error is about its height whatever its width, so the fit could lower it as well by flattening the
    step as by sharpening it (it flattened: the benchmark's gear kept its faces and recess floor 0.7-1.5 px off).
    With ρ the same height over fewer, steeper pixels costs clearly less. Small errors keep the linear slope, and no
    covered pixel costs as much as a masked pixel the mesh leaves uncovered (1)."""

    def band_cost(width: int) -> float:  # a step 1 px high over `width` pixels
        angle = torch.atan(torch.tensor(1.0 / width, dtype=torch.float64))
        return float(width * vr.normal_error(torch.cos(angle)))

    assert band_cost(8) / band_cost(2) > 1.25
    assert band_cost(8) > band_cost(4) > band_cost(2)
    small = torch.tensor(0.05, dtype=torch.float64)  # ~3 degrees
    assert float(vr.normal_error(torch.cos(small))) == pytest.approx(0.05, rel=0.06)
    assert float(vr.normal_error(torch.tensor(-1.0))) < 1.0  # opposite normals: less than leaving the pixel bare
    monkeypatch.setattr(vr, "NORMAL_ROBUST", 1e6)  # the plain error: the width barely matters
    assert band_cost(8) / band_cost(2) < 1.1


def test_intersecting_pairs_are_every_crossing_pair():
    """The grid's broad phase misses no pair: against all pairs of faces (that share no vertex) through the same
    segment-triangle test, on two overlapping spheres of unequal triangles; tensors in, the same pairs out."""
    from t2mv.view_mesh import _segment_hits_triangle

    a = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
    b = trimesh.creation.icosphere(subdivisions=1, radius=0.3)
    b.apply_translation([0.45, 0.1, 0.05])
    both = trimesh.util.concatenate([a, b])
    v = torch.tensor(both.vertices, dtype=torch.float64)
    f = torch.tensor(both.faces, dtype=torch.long)
    i, j = torch.triu_indices(len(f), len(f), offset=1)
    apart = ~(f[i][:, :, None] == f[j][:, None, :]).flatten(1).any(dim=1)
    i, j = i[apart], j[apart]
    t1, t2 = v[f[i]], v[f[j]]
    hit = torch.zeros(len(i), dtype=torch.bool)
    for s_tri, t_tri in ((t1, t2), (t2, t1)):
        for k in range(3):
            hit |= _segment_hits_triangle(s_tri[:, k], s_tri[:, (k + 1) % 3], t_tri)
    expected = {(int(x), int(y)) for x, y in zip(i[hit], j[hit])}
    found = vr.intersecting_pairs(v, f)
    assert len(expected) > 20 and {tuple(p) for p in found.tolist()} == expected
    assert vr.self_intersections(both.vertices, both.faces) == len(expected)  # arrays in: the same


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


def check_refined(result, start, gt, start_errors, *, fall: float = 0.5):
    """Accepted, surface errors down to `fall` x the start's, closed, no fold, no self-intersection."""
    assert result.accepted, result.warnings
    chamfer, angle = surface_errors(result.mesh, gt)
    assert chamfer <= fall * start_errors[0], (chamfer, start_errors)
    assert angle <= fall * start_errors[1], (angle, start_errors)
    assert result.mesh.is_watertight
    assert vr.folded_faces(torch.tensor(result.mesh.vertices), torch.tensor(result.mesh.faces)) == 0
    assert vr.self_intersections(result.mesh.vertices, result.mesh.faces) == 0
    assert result.losses["final"]["data"] < fall * result.losses["initial"]["data"]


def test_refinement_recovers_detail(start, gt, targets, start_errors, one_thread):
    normals, masks = targets
    result = vr.refine_mesh(start, normals, masks, CAMERA, **FAST)
    check_refined(result, start, gt, start_errors)
    assert result.warnings == []
    rounds = result.losses["rounds"]
    assert [r["edge_pixels"] for r in rounds] == [2.0] and rounds[0]["iterations"] == 60
    assert result.settings["edge_pixels"] == [2.0]
    assert len(result.losses["history"]) == FAST["iterations"] + len(rounds)
    # Remeshed to the pixels: 2 px edges over the sphere's ~0.7 x 128 px wide silhouette.
    area = 4 * np.pi * (RADIUS * CAMERA.scale * SIZE / 2) ** 2  # px² of the sphere's surface
    assert (
        0.5 < rounds[0]["faces"] / (area / (np.sqrt(3) / 4 * 2.0**2)) < 2
        and len(result.mesh.faces) == rounds[0]["faces"]
    )
    assert set(result.timings) >= {"remesh", "optimise", "total"}
    # Vertex colours come over from the input (one colour here).
    assert (np.asarray(result.mesh.visual.vertex_colors) == start.visual.vertex_colors[0]).all()


def test_refinement_without_remeshing_keeps_faces_and_visuals(start, gt, targets, start_errors, one_thread):
    normals, masks = targets
    result = vr.refine_mesh(start, normals, masks, CAMERA, remesh=False, **FAST)
    check_refined(result, start, gt, start_errors)
    assert np.array_equal(result.mesh.faces, start.faces) and result.losses["rounds"][0]["edge_pixels"] is None
    np.testing.assert_array_equal(result.mesh.visual.vertex_colors, start.visual.vertex_colors)


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
    a = vr.refine_mesh(mesh, normals, masks, CAMERA, iterations=8, check_intersections=False, remesh=False)
    b = vr.refine_mesh(inward, normals, masks, CAMERA, iterations=8, check_intersections=False, remesh=False)
    assert b.accepted and any("inwards" in w for w in b.warnings)
    assert np.array_equal(b.mesh.faces, inward.faces)
    np.testing.assert_allclose(b.mesh.vertices, a.mesh.vertices, atol=1e-5)


# --------------------------------------------------------------------------------------------- robustness


def corrupt_shift(image: Image.Image, pixels: int) -> Image.Image:
    return Image.fromarray(np.roll(np.asarray(image), pixels, axis=1))


@pytest.mark.parametrize(
    "case, view",
    [
        ("flat normals", "front"),
        ("empty mask", "back"),
        ("mirrored normals", "left"),
        ("noise", "front_right"),
        ("backdrop", "right"),
    ],
)
def test_bad_view_leaves_mesh_no_worse(case, view, start, gt, targets, start_errors, one_thread):
    normals, masks = list(targets[0]), list(targets[1])
    k = VIEW_NAMES.index(view)
    if case == "flat normals":  # every pixel facing the front camera
        normals[k] = Image.new("RGB", (SIZE, SIZE), (128, 128, 255))
    elif case == "empty mask":
        masks[k] = Image.new("L", (SIZE, SIZE), 0)
    elif case == "backdrop":  # the mask runs into the picture's left half: a background kept, not a silhouette
        m = np.asarray(masks[k].convert("L")).copy()
        m[:, : SIZE // 2] = 255
        masks[k] = Image.fromarray(m)
    elif case == "noise":  # no pixel decodes to a unit normal: the warning says so (it said "0 degrees" before)
        normals[k] = Image.fromarray(np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    else:  # the right view's normal map given as the left's: it contradicts the left mask's outline
        normals[k] = normals[VIEW_NAMES.index("right")]
    result = vr.refine_mesh(start, normals, masks, CAMERA, **FAST)
    assert any(view in w for w in result.warnings), result.warnings
    if case in ("noise", "backdrop"):
        reason = "no usable normal" if case == "noise" else "a backdrop, not a silhouette"
        assert any(f"view {view} left out" in w and reason in w for w in result.warnings), result.warnings
    if case == "backdrop":  # no silhouette to hold the result to (robot, both maps on a ramp: rejected before)
        assert k not in result.losses["silhouette_views"]
    assert result.losses["views_used"] == [v for v in VIEW_NAMES if v != view]
    # The other five views still refine the mesh: the result is accepted and the errors fall (returning the input,
    # or rejecting everything once a view is dropped, fails here).
    check_refined(result, start, gt, start_errors, fall=0.6)


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


# --------------------------------------------------------------------------------------------- TripoSR-like input


@pytest.fixture(scope="module")
def mug(one_thread):
    """A creased box with a handle: its true views (sphere-traced), its fine mesh, and a TripoSR-like start (the
    occupancy at 1/80 blurred and marching-cubed: ~30k uneven faces, rounded creases, a thicker handle)."""
    camera = ViewCamera(scale=1.5, center=(0.11, 0.0, 0.0), image_size=SIZE)
    return camera, mug_views(camera), mug_truth(120.0), mug_start(80.0)


# The camera here is exact (see FAST); the default one 2 px round (measured: Chamfer 0.89x the start, data loss
# 0.29x. The previous loss, without the crease weights and the anchor, reached 0.80x here with the same remesh but
# took the benchmark's gear 16 % away from the truth: the anchor trades a little detail for never drifting.)
CREASED = {"fit_camera": False}


def test_marching_cubes_start_refines_without_folds(mug, one_thread):
    camera, (normals, masks), truth, start = mug
    assert 25_000 < len(start.faces) < 40_000
    result = vr.refine_mesh(start, normals, masks, camera, iterations=200, **CREASED)
    assert result.accepted, result.warnings
    assert result.losses["views_used"] == list(VIEW_NAMES)
    assert result.losses["final"]["data"] < 0.35 * result.losses["initial"]["data"]
    out = result.mesh
    # No fold (checked two ways: against the faces' own corners, and no pair of neighbours turned back on each
    # other), no self-intersection, closed, and nearer the truth.
    assert vr.folded_faces(torch.tensor(out.vertices), torch.tensor(out.faces)) == 0
    assert (out.face_adjacency_angles < np.radians(150)).all()
    assert vr.self_intersections(out.vertices, out.faces) == 0 and out.is_watertight
    before, after = chamfer(start, truth), chamfer(out, truth)
    assert after <= 0.92 * before, (before, after)


def shifted_masks(masks: list[Image.Image], grow: tuple[int, ...]) -> list[Image.Image]:
    """Masks grown (> 0) or shrunk (< 0) by whole pixels: a generator's normal maps and masks a pixel or two apart."""
    out = []
    for mask, g in zip(masks, grow):
        m = np.asarray(mask) > 127
        if g:
            m = (ndimage.binary_dilation if g > 0 else ndimage.binary_erosion)(m, iterations=abs(g))
        out.append(Image.fromarray(m.astype(np.uint8) * 255))
    return out


@pytest.mark.parametrize("grow", [(2, 1, -1, 2, -2, 1), (-2, -1, 1, -2, 2, -1)])
def test_masks_a_pixel_or_two_off_the_normal_maps_keep_every_view(grow, targets, mug, one_thread):
    """Smooth and creased objects alike: masks grown or shrunk by 1-2 px still agree with their normal maps."""
    normals, masks = targets
    camera, (mug_normals, mug_masks), _, _ = mug
    for views, smooth in (((normals, masks), True), ((mug_normals, mug_masks), False)):
        t = vr.make_targets(views[0], shifted_masks(views[1], grow), device=torch.device("cpu"))
        agreement = vr.silhouette_agreement(t)
        seen = ~torch.isnan(agreement)  # NaN: no side seen at the outline (the box's faces seen square-on)
        assert seen.all() if smooth else seen.sum() >= 2, agreement
        assert (agreement[seen] > 0.8).all(), agreement
    # The refinement keeps all six views of the sphere, with masks off by up to 2 px.
    start = trimesh.creation.icosphere(subdivisions=3, radius=RADIUS * 1.02)
    result = vr.refine_mesh(start, normals, shifted_masks(masks, grow), CAMERA, iterations=0)
    assert result.losses["views_used"] == list(VIEW_NAMES), result.warnings


def test_refinement_under_no_grad(targets, one_thread):
    """Inference code often runs under torch.no_grad(): the fit still runs and matches a run outside it."""
    normals, masks = targets
    mesh = trimesh.creation.icosphere(subdivisions=3, radius=RADIUS)
    with torch.no_grad():
        a = vr.refine_mesh(mesh, normals, masks, CAMERA, iterations=8, check_intersections=False)
    b = vr.refine_mesh(mesh, normals, masks, CAMERA, iterations=8, check_intersections=False)
    assert a.accepted and a.losses["history"][-1] < a.losses["history"][0]
    assert np.array_equal(a.mesh.vertices, b.mesh.vertices)


def test_mask_without_outline_is_named_not_nan(targets, one_thread):
    """A mask filling the whole image (the smoke chain's noise views) has no outline: the view is left out with a
    plain reason, and the record has no NaN (it goes into info.json)."""
    normals, masks = list(targets[0]), list(targets[1])
    masks[0] = Image.new("L", (SIZE, SIZE), 255)
    mesh = trimesh.creation.icosphere(subdivisions=3, radius=RADIUS)
    result = vr.refine_mesh(mesh, normals, masks, CAMERA, iterations=4, check_intersections=False)
    front = [w for w in result.warnings if "front" in w]
    assert len(front) == 1 and "no outline" in front[0] and "nan" not in front[0].lower(), result.warnings
    assert result.losses["silhouette_agreement"][0] is None
    json.dumps(result.losses, allow_nan=False)


# --------------------------------------------------------------------------------------------- real-looking views


def _disc_views(radius: float, centre: tuple[float, float], size: int = 64, ss: int = 8, color=(0.3, 0.5, 0.2)):
    """An antialiased sphere seen from the front (its outline a disc of `radius` px at `centre`, sub-pixel) over
    white: the normal map, a plain colour view, both (6, S, S, 3) in [0, 1] (six copies), and the true coverage of
    each pixel (S, S) by `ss` x `ss` supersampling."""
    t = (np.arange(size * ss) + 0.5) / ss  # supersample centres, pixels
    x, y = np.meshgrid(t - centre[0], t - centre[1])  # (S ss, S ss) right, down
    r2 = (x**2 + y**2) / radius**2
    inside = r2 < 1.0
    n = np.stack([x / radius, -y / radius, np.sqrt(np.clip(1.0 - r2, 0.0, 1.0))], -1)  # (S ss, S ss, 3) unit inside

    def box(a):  # mean over each pixel's ss x ss supersamples
        return a.reshape(size, ss, size, ss, -1).mean(axis=(1, 3))

    alpha = box(inside[..., None].astype(float))[..., 0]  # (S, S)
    normal = box(np.where(inside[..., None], (n + 1.0) / 2.0, 1.0))  # (S, S, 3) antialiased over white
    colour = box(np.where(inside[..., None], np.array(color), 1.0))
    six = lambda a: torch.from_numpy(np.repeat(a[None], 6, 0)).float()  # noqa: E731
    return six(normal), six(colour), alpha


def test_soft_coverage_reads_the_outline_to_a_fraction_of_a_pixel(one_thread):
    """Along an antialiased outline the maps say how much of each pixel the object covers (the binary mask is up to
    half a pixel off everywhere); a colour outline a pixel inside the normals' leaves the range between them free;
    a white colour view leaves it to the normal map; an aliased map (no antialiasing) gets the half pixel it cannot
    resolve."""
    normal, colour, alpha = _disc_views(20.3, (31.7, 32.4))
    edge = torch.from_numpy((alpha > 0.02) & (alpha < 0.98))  # (S, S) outline pixels
    mask = torch.from_numpy(np.repeat((alpha >= 0.5)[None], 6, 0))
    pure = ((normal * 2 - 1).norm(dim=-1) - 1).abs() < 0.1
    truth = torch.from_numpy(alpha).float()
    low, high = vr.soft_coverage(normal, mask, pure, colour)
    assert (mask[0].float() - truth)[edge].abs().mean() > 0.2  # the binary mask's quantisation
    # The normal map's reading is a little high (its reference, the nearest pure pixels, faces the camera more than
    # the contour does): ~0.05 px on average.
    assert (low[0] - truth)[edge].abs().mean() < 0.03 and (high[0] - truth)[edge].abs().mean() < 0.08
    # (A pixel read full next to one read empty may hold the contour anywhere past its centre: a few do.)
    assert (high - low)[0][edge].mean() < 0.06 and ((high - low)[0][edge] > 0.15).float().mean() < 0.1
    assert (low[0] - truth)[~edge].abs().mean() < 0.01  # whole pixels stay whole (or empty)

    # The colour view's outline a pixel inside the normal map's: the truth (either) lies within the range.
    _, small, inner = _disc_views(19.3, (31.7, 32.4))
    low, high = vr.soft_coverage(normal, mask, pure, small)
    band = edge | torch.from_numpy((inner > 0.02) & (inner < 0.98))
    assert (low[0] <= truth + 0.05)[band].float().mean() > 0.95 and (high[0] >= truth - 0.05)[
        band
    ].float().mean() > 0.95
    assert (low[0] <= torch.from_numpy(inner).float() + 0.05)[band].float().mean() > 0.95
    assert (high - low)[0][band].mean() > 0.5  # a pixel apart: the range spans most of the band

    # A white object in the colour view: its outline says nothing; the normal map's alone counts.
    _, white, _ = _disc_views(20.3, (31.7, 32.4), color=(0.97, 0.97, 0.97))
    low_w, high_w = vr.soft_coverage(normal, mask, pure, white)
    low_n, high_n = vr.soft_coverage(normal, mask, pure, None)
    assert torch.allclose(low_w, low_n) and torch.allclose(high_w, high_n)

    # Aliased maps: outline pixels read 0 or 1; the side of the contour each centre lies on is all they say.
    hard, _, _ = _disc_views(20.3, (31.7, 32.4), ss=1)  # each pixel its centre's sample
    inside = (hard < 0.999).any(-1)  # (6, S, S)
    low, high = vr.soft_coverage(hard, inside, ((hard * 2 - 1).norm(dim=-1) - 1).abs() < 0.1, None)
    assert ((low[0] <= truth + 1e-6) & (high[0] >= truth - 1e-6))[edge].float().mean() > 0.97
    assert ((high - low)[0][edge] - 0.5).abs().max() < 1e-6


def test_silhouette_loss_asks_for_the_maps_own_outline(gt, targets, one_thread):
    """The silhouette term asks for the coverage the maps show, whatever the mask within a few pixels of it (a
    generated mask sits a pixel or two off the normals' outline): the true mesh scores ~0 against its own maps with
    masks grown or shrunk by 1-2 px, and a mesh 1.5 px too large costs clearly more."""
    normals, masks = targets
    x = torch.tensor(gt.vertices, dtype=torch.float32)
    topo = vr.mesh_topology(torch.tensor(gt.faces), len(x))
    sil = {}
    for scale in (1.0, 1.0 + 1.5 / (RADIUS * CAMERA.scale * SIZE / 2)):
        rendered = vr.render(x * scale, topo, CAMERA, vr.visibility(x * scale, topo, CAMERA, SIZE))
        for grow in (0, 1, -1, 2):
            t = vr.make_targets(normals, shifted_masks(masks, (grow,) * 6), device=torch.device("cpu"))
            sil[scale, grow] = float(vr.view_losses(rendered, t)[1].mean())
    true = [v for (scale, _), v in sil.items() if scale == 1.0]
    large = [v for (scale, _), v in sil.items() if scale != 1.0]
    assert max(true) < 2e-3, sil
    assert min(large) > 3 * max(true), sil


def test_camera_biased_by_the_shape_is_refitted(one_thread):
    """The chain's camera comes from the TripoSR mesh's silhouettes, which its smoothing biases (1-4 % in scale on
    the benchmark). Fitted with the vertices, the camera's similarity takes the bias out: the mesh stays in its
    frame and comes nearer the truth, where a fixed camera bends it into the camera's frame."""
    gt = bumpy_sphere(5)
    normals, masks = render_targets(gt, CAMERA)
    start = bumpy_sphere(3)  # the right shape, coarser: only the camera is wrong
    biased = ViewCamera(scale=CAMERA.scale * 1.03, center=CAMERA.center, image_size=SIZE)
    before = surface_errors(start, gt)[0]
    fixed = vr.refine_mesh(start, normals, masks, biased, **{**FAST, "fit_camera": False})
    fitted = vr.refine_mesh(start, normals, masks, biased, **{**FAST, "fit_camera": True})
    assert fitted.accepted, fitted.warnings
    sim = fitted.losses["camera_similarity"]
    # Each view's scale is the similarity's times that view's own zoom correction (they share a 3 % bias freely).
    for zoom in sim["view_zoom"]:
        assert abs(sim["scale"] * zoom * 1.03 - 1) < 0.01, sim
    assert surface_errors(fitted.mesh, gt)[0] < before < surface_errors(fixed.mesh, gt)[0]


def test_crowded_edge_is_dropped_and_the_mesh_remeshed(targets, one_thread):
    """An edge that three faces share (a fin) makes the remesher refuse the mesh: the faces on that edge are dropped
    with a warning and the rest is remeshed (the fit ran on the raw faces before, where marching-cubes meshes fold)."""
    normals, masks = targets
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=RADIUS * 1.02)
    a, b = sphere.faces[0, 0], sphere.faces[0, 1]
    tip = len(sphere.vertices)
    vertices = np.vstack([sphere.vertices, sphere.vertices[[a, b]].mean(0) * 1.01])
    faces = np.vstack([sphere.faces, [[a, b, tip]]])  # a third face on edge a-b: non-manifold
    kept, crowded = vr.manifold_faces(faces)
    assert crowded == 3 and len(kept) == len(faces) - 3
    mesh = trimesh.Trimesh(vertices, faces, process=False)
    result = vr.refine_mesh(mesh, normals, masks, CAMERA, iterations=4, check_intersections=False)
    assert not any("not remeshed" in w for w in result.warnings), result.warnings
    assert any("3 faces on edges that more than two faces share" in w for w in result.warnings), result.warnings
    assert result.losses["rounds"][0]["faces"] != len(faces)


def test_decimated_faces_with_a_repeated_corner_are_remeshed(targets, one_thread):
    """Quadric decimation (`--simplify`) leaves faces with a repeated corner, each counting an edge twice: the
    remesher refused such meshes (measured: a 141k-face robot decimated to 100k had 8; the fit then folded 719 of the
    raw faces and was rejected). They have no area: dropped silently, as are repeated faces, and the fit is accepted."""
    normals, masks = targets
    sphere = trimesh.creation.icosphere(subdivisions=3, radius=RADIUS * 1.02)
    a, b = sphere.faces[0, :2]
    faces = np.vstack([sphere.faces, [[a, b, a]], [[b, a, b]], sphere.faces[5:7]])  # degenerate, then repeated
    assert vr.manifold_faces(faces)[0].tolist() == sphere.faces.tolist()
    mesh = trimesh.Trimesh(sphere.vertices, faces, process=False)
    result = vr.refine_mesh(mesh, normals, masks, CAMERA, **FAST)
    assert result.accepted, result.warnings
    assert not result.warnings, result.warnings


def test_a_dense_input_is_decimated_before_remeshing(monkeypatch):
    """Remeshing's time grows with its input (a marching-cubes mesh at the chain's R=256 has ~160k faces): an input
    with more than twice the faces the remeshing makes is decimated to twice that first; the result is the same
    remeshed surface. A coarser input is remeshed as it is."""
    import fast_simplification

    from benchmarks.view_refine import marching_cubes_sphere

    calls = []
    simplify = fast_simplification.simplify

    def spy(points, triangles, **kwargs):
        calls.append((len(triangles), kwargs["target_count"]))
        return simplify(points, triangles, **kwargs)

    monkeypatch.setattr(fast_simplification, "simplify", spy)
    dense = marching_cubes_sphere(96)  # ~22k faces
    h = math.sqrt(dense.area / (2000 * math.sqrt(3) / 4))  # edges for ~2k faces
    v, f = vr.remesh(dense.vertices, dense.faces, h)
    assert len(calls) == 1 and calls[0][0] == len(dense.faces) and abs(calls[0][1] - 4000) <= 2
    assert 1600 < len(f) < 2400
    assert np.abs(np.linalg.norm(v, axis=1) - 0.51).max() < 0.05 * h  # on the sphere
    assert trimesh.Trimesh(v, f).is_watertight
    coarse = trimesh.creation.icosphere(subdivisions=2, radius=0.51)  # 320 faces: no decimation
    vr.remesh(coarse.vertices, coarse.faces, h)
    assert len(calls) == 1


def test_a_mesh_the_remesher_refuses_is_fitted_on_its_own_faces(targets, one_thread, monkeypatch):
    """Whatever else gpytoolbox refuses, the fit goes on with the mesh's own faces and says so."""
    normals, masks = targets

    def refuse(*args, **kwargs):
        raise ValueError("Input mesh is non-manifold.")

    monkeypatch.setattr(vr, "remesh", refuse)
    mesh = trimesh.creation.icosphere(subdivisions=3, radius=RADIUS * 1.02)
    result = vr.refine_mesh(mesh, normals, masks, CAMERA, iterations=4, check_intersections=False)
    assert any("not remeshed (Input mesh is non-manifold.)" in w for w in result.warnings), result.warnings
    assert result.losses["rounds"][0]["faces"] == len(mesh.faces)


def test_anchor_holds_what_no_view_places(one_thread):
    """A disc with a recessed ring from a TripoSR-like start: the floor of the recess faces the camera like the face
    around it, and the renderer has no gradient through the occlusion by the recess's rim, so nothing in the views
    holds its depth. Without the displacement anchor the fit lets the floor drift (measured: 1.29x the start's
    Chamfer distance, 1.43x with the silhouette weight of 0.3); the default anchor keeps it nearer (1.10x here, at
    128²; 1.13x before; on the benchmark's gear at 256² the result is nearer the truth than the start); half of it
    (0.05) 1.28x, no hold at all. A stronger anchor (0.3: 0.93x) would cost the bumpy sphere half of the detail it
    recovers."""
    camera = ViewCamera(scale=1.5, center=(0.0, 0.0, 0.0), image_size=SIZE)
    normals, masks = mug_views(camera, sdf=disc_sdf)
    truth, start = mug_truth(120.0, disc_sdf, DISC_BOX), mug_start(60.0, 1.3, disc_sdf, DISC_BOX)
    options = {"iterations": 150, "fit_camera": False}
    anchored = vr.refine_mesh(start, normals, masks, camera, **options)
    free = vr.refine_mesh(start, normals, masks, camera, anchor_weight=0.0, **options)
    assert anchored.accepted and free.accepted
    before = chamfer(start, truth)
    assert chamfer(anchored.mesh, truth) < 1.25 * before < chamfer(free.mesh, truth), before


def test_anchor_spares_faces_only_the_outlines_place(one_thread):
    """A slab whose start is 2 px too thick (top and bottom faces off): every elevation-0 camera sees those faces
    edge-on, so only the outlines place them, over a few pixels, while an anchor charged on every vertex of the face
    holds them back (measured here: 1.22 px off after 150 steps, from 2.52; spared, 0.81 px). On the benchmark's
    table this was the difference between -24 % and -37 % Chamfer."""
    camera = ViewCamera(scale=1.5, center=(0.0, 0.0, 0.0), image_size=SIZE)
    pix = camera.pixel_size
    half = np.array([0.45, 0.08, 0.3])

    def slab(p: np.ndarray, grow: float = 0.0) -> np.ndarray:
        q = np.abs(p) - (half + np.array([0.0, grow, 0.0]))
        return np.linalg.norm(np.maximum(q, 0.0), axis=-1) + np.minimum(q.max(-1), 0.0)

    bounds = (np.array([-0.6, -0.3, -0.45]), np.array([0.6, 0.3, 0.45]))
    normals, masks = mug_views(camera, sdf=slab)
    start = mug_start(80.0, 1.3, lambda p: slab(p, 2 * pix), bounds)

    def faces_off(mesh) -> float:  # mean distance of the top and bottom faces' middles from the truth, in px
        v, n = np.asarray(mesh.vertices), mesh.vertex_normals
        middle = (np.abs(n[:, 1]) > 0.9) & (np.abs(v[:, 0]) < 0.3) & (np.abs(v[:, 2]) < 0.2)
        return float(np.abs(slab(v[middle])).mean() / pix)

    options = {"iterations": 150, "fit_camera": False}
    spared = vr.refine_mesh(start, normals, masks, camera, **options)
    uniform = vr.refine_mesh(start, normals, masks, camera, edge_on_anchor=1.0, **options)
    assert spared.accepted and uniform.accepted
    assert spared.settings["edge_on_anchor"] == 0.0
    before = faces_off(start)
    assert before > 2.0
    off_spared, off_uniform = faces_off(spared.mesh), faces_off(uniform.mesh)
    assert off_spared < 0.95 and off_spared < 0.8 * off_uniform, (before, off_spared, off_uniform)


def test_anchor_lets_the_views_set_the_depth(one_thread):
    """A box whose start is 1.5 px too thin in depth (export z, what TripoSR guesses from one front image): the
    front and back views see its large faces face-on, so only the side views' outlines place them, while the
    anchor, charged on every vertex of those faces, holds them where the start had them (measured: 1.80 px inside
    -> 1.70). Holding the start up to a fitted scale of its depth lets the outlines move them (0.38 px; the
    benchmark's gear: -20.5 % -> -29.9 % Chamfer)."""
    camera = ViewCamera(scale=1.5, center=(0.0, 0.0, 0.0), image_size=SIZE)
    pix = camera.pixel_size
    half = np.array([0.45, 0.35, 0.3])

    def slab(p: np.ndarray, grow: float = 0.0) -> np.ndarray:
        q = np.abs(p) - (half + np.array([0.0, 0.0, grow]))
        return np.linalg.norm(np.maximum(q, 0.0), axis=-1) + np.minimum(q.max(-1), 0.0)

    bounds = (np.array([-0.6, -0.5, -0.45]), np.array([0.6, 0.5, 0.45]))
    normals, masks = mug_views(camera, sdf=slab)
    start = mug_start(80.0, 1.3, lambda p: slab(p, -1.5 * pix), bounds)

    def faces_off(mesh) -> float:  # mean signed distance of the front and back faces' middles, in px (< 0: inside)
        v, n = np.asarray(mesh.vertices), mesh.vertex_normals
        middle = (np.abs(n[:, 2]) > 0.9) & (np.abs(v[:, 0]) < 0.3) & (np.abs(v[:, 1]) < 0.2)
        return float(slab(v[middle]).mean() / pix)

    options = {"iterations": 150, "fit_camera": False}
    scaled = vr.refine_mesh(start, normals, masks, camera, **options)
    fixed = vr.refine_mesh(start, normals, masks, camera, depth_stretch=0.0, **options)
    assert scaled.accepted and fixed.accepted
    depth = scaled.losses["rounds"][0]["anchor_depth_scale"]
    assert fixed.losses["rounds"][0]["anchor_depth_scale"] == 1.0
    before, off_scaled, off_fixed = faces_off(start), faces_off(scaled.mesh), faces_off(fixed.mesh)
    assert before < -1.5
    assert depth > 1.03 and abs(off_scaled) < 0.4 * abs(off_fixed), (before, off_scaled, off_fixed, depth)
    with pytest.raises(ValueError, match="depth_stretch"):
        vr.refine_mesh(start, normals, masks, camera, depth_stretch=1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_refinement_matches_cpu(start, gt, targets, one_thread):
    """The refinement on the GPU (the renderer, Large Steps' solve, the mesh checks on the device): accepted, as near
    the truth as on the CPU; the intersection check gives the same pairs on the device."""
    normals, masks = targets
    cpu = vr.refine_mesh(start, normals, masks, CAMERA, **FAST)
    gpu = vr.refine_mesh(start, normals, masks, CAMERA, **FAST, device="cuda")
    assert cpu.accepted and gpu.accepted, gpu.warnings
    assert gpu.losses["final"]["data"] == pytest.approx(cpu.losses["final"]["data"], rel=0.05)
    assert surface_errors(gpu.mesh, gt)[0] <= 1.1 * surface_errors(cpu.mesh, gt)[0]
    a = trimesh.creation.icosphere(subdivisions=2, radius=0.5)
    b = trimesh.creation.icosphere(subdivisions=1, radius=0.3)
    b.apply_translation([0.45, 0.1, 0.05])
    both = trimesh.util.concatenate([a, b])
    on_cpu = vr.intersecting_pairs(both.vertices, both.faces)
    on_gpu = vr.intersecting_pairs(torch.tensor(both.vertices, device="cuda"), torch.tensor(both.faces, device="cuda"))
    assert on_gpu.device.type == "cuda" and len(on_cpu) > 20
    assert {tuple(p) for p in on_gpu.cpu().tolist()} == {tuple(p) for p in on_cpu.tolist()}
