"""benchmarks.view_scenes / benchmarks.view_quality: the ground-truth scenes are what they claim (views at the
stand-in's camera, normals in the export frame, imperfections that act), and the metrics give known answers."""

import functools
import json

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

from benchmarks import view_scenes as vs
from t2mv.view_texture import view_masks

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors on 2 shared cores: one thread is faster


@pytest.fixture(scope="module")
def gear():
    return vs.make_case("gear", preset="small")


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def _silhouettes(mesh, camera) -> np.ndarray:
    """(6, S, S) bool: which pixels `mesh` covers through `camera` (the project's rasteriser)."""
    from triposr.texture import rasterize_screen

    size = camera.image_size
    vertices = torch.from_numpy(np.asarray(mesh.vertices, dtype=np.float32))
    faces = torch.from_numpy(np.asarray(mesh.faces, dtype=np.int64))
    proj = camera.project(vertices)  # (6, V, 3)
    out = np.zeros((6, size * size), dtype=bool)
    for k in range(6):
        pixel, _, _ = rasterize_screen(proj[k, :, :2], proj[k, :, 2], faces, size, size)
        out[k, pixel.numpy()] = True
    return out.reshape(6, size, size)


def test_case_shapes_and_truth_is_one_closed_piece(gear):
    size = gear.preset.view_size
    for images in (gear.colors, gear.normals, gear.clean_colors, gear.clean_normals):
        assert len(images) == 6 and all(im.size == (size, size) and im.mode == "RGB" for im in images)
    assert gear.truth.is_watertight and len(gear.truth.split(only_watertight=False)) == 1
    assert 1000 < len(gear.start.faces) < 10000  # the small preset: a few thousand faces
    colors = gear.fallback(torch.from_numpy(np.asarray(gear.start.vertices[:10])).float())
    assert colors.shape == (10, 3) and colors.dtype == torch.float32 and 0 <= colors.min() <= colors.max() <= 1


def test_start_camera_sees_the_stand_in_where_the_views_show_the_truth(gear):
    """The stand-in is the truth smoothed, at another scale and centre: through `start_camera` its silhouettes
    match the clean masks (a wrong transform or camera would not)."""
    truth_frame = _silhouettes(gear.truth, gear.camera)
    masks = np.stack([np.asarray(m) >= 128 for m in gear.clean_masks])
    start = _silhouettes(gear.start, gear.start_camera)
    for k in range(6):
        assert _iou(truth_frame[k], masks[k]) > 0.97
        assert _iou(start[k], masks[k]) > 0.85
    np.testing.assert_allclose(gear.to_truth(gear.start.vertices).mean(0), gear.truth.vertices.mean(0), atol=0.05)


def test_normal_maps_are_export_frame_normals(gear):
    """Front view of the gear's face: +Z (RGB ~ (128, 128, 255)); the right view sees the rim's +X side."""
    size = gear.preset.view_size
    front = np.asarray(gear.clean_normals[0], dtype=np.float64) / 255 * 2 - 1  # (S, S, 3)
    mask = np.asarray(gear.clean_masks[0]) >= 128
    # The front face of the gear between the recess and the teeth: a ring at ~0.6 of the gear's radius.
    ring = front[mask][np.abs(front[mask][:, 2]) > 0.9]
    assert len(ring) > 0.2 * mask.sum() and ring[:, 2].mean() > 0.98
    right = np.asarray(gear.clean_normals[2], dtype=np.float64)[size // 2 - 10 : size // 2 + 10, size // 2]
    assert np.median((right / 255 * 2 - 1)[:, 0]) > 0.9  # the rim seen from +X faces +X (teeth gaps aside)


def test_imperfections_act_and_the_back_view_is_worst():
    clean = vs.make_case("mug", imperfect=None, preset="small")
    worse = vs.make_case("mug", preset="small")  # the typical imperfections, white patch included
    # Colour error on the pixels both views cover: every view is off; the back view more than the front.
    err = []
    for k in range(6):
        a = np.asarray(clean.clean_colors[k], dtype=np.float64)
        b = np.asarray(worse.colors[k], dtype=np.float64)
        both = (a < 240).any(-1) & (b < 240).any(-1)
        err.append(np.abs(a[both] - b[both]).mean())
    assert min(err) > 1.0 and err[3] > err[0]
    # The white patch punches a hole into the white-background mask of some view (where it meets the outline).
    colour_masks = [m.numpy() for m in view_masks(worse.clean_colors)]
    lost = [int((np.asarray(worse.clean_masks[k]) >= 128).sum() - colour_masks[k].sum()) for k in range(6)]
    assert max(lost) > 30
    # The normal maps' outlines differ from the colour views' by the mismatch dial (grown or shrunk).
    normal_masks = [m.numpy() for m in view_masks(worse.normals)]
    colour_masks = [m.numpy() for m in view_masks(worse.colors)]
    assert all((n ^ c).sum() > 20 for n, c in zip(normal_masks, colour_masks))


def test_make_case_rejects_unknown_object():
    with pytest.raises(ValueError, match="unknown object"):
        vs.make_case("teapot")


# --------------------------------------------------------------------------------------------- metrics


def test_truth_against_itself_scores_perfectly(gear):
    from benchmarks import view_quality as vq

    truth = vq.truth_renders(gear, vq.NOVEL_VIEWS[:4])
    image = vq.image_metrics(truth, truth)
    assert image["texture_psnr"] == vq.PSNR_CAP and image["silhouette_psnr"] == vq.PSNR_CAP
    assert image["texture_ssim"] > 0.999 and image["overlap_pixels"] > 1000
    surface = vq.surface_metrics(gear.truth, gear.truth, 4000)
    assert surface["chamfer"] < 1e-3 and surface["normal_consistency"] > 0.99
    # The stand-in, mapped back by the known similarity: close but clearly not the truth.
    start = vq.surface_metrics(gear.truth, vq.to_truth_frame(gear, gear.start), 4000)
    assert 0.005 < start["chamfer"] < 0.05 and start["normal_consistency"] < 0.95


def test_fitted_similarity_recovers_a_known_scale_and_shift(gear):
    """The metrics' alignment (`fit_similarity`): the truth scaled by 1.03 and shifted comes back to the truth (to the sampling
    floor); the stand-in, whose known similarity leaves the unobservable offset, fits closer than it maps."""
    from benchmarks import view_quality as vq

    moved = gear.truth.copy()
    moved.vertices = (np.asarray(moved.vertices) - 0.1) * 1.03 + np.array([0.02, -0.01, 0.03])
    s, t, c = vq.fit_similarity(gear.truth, moved, samples=8000)
    back = trimesh.Trimesh((np.asarray(moved.vertices) - c) * s + c + t, moved.faces)
    assert abs(s * 1.03 - 1.0) < 2e-3
    assert vq.surface_metrics(gear.truth, back, 4000)["chamfer"] < 2e-3
    assert vq.surface_metrics(gear.truth, moved, 4000)["chamfer"] > 0.02

    start = vq.to_truth_frame(gear, gear.start)
    s, t, c = vq.fit_similarity(gear.truth, start, samples=8000)
    fitted = trimesh.Trimesh((np.asarray(start.vertices) - c) * s + c + t, start.faces)
    known = vq.surface_metrics(gear.truth, start, 4000)["chamfer"]
    assert vq.surface_metrics(gear.truth, fitted, 4000)["chamfer"] < known and abs(s - 1.0) < 0.05


def test_ceilings_bound_the_texture_and_know_what_the_views_see(gear):
    """`oracle` colours the stand-in with the truth's own colours: the best texture on that geometry, so on the
    truth itself it reproduces the truth's renders, and on the stand-in it beats the field. `oracle-seen` keeps the
    truth's colours only on surface elevation-0 cameras see: a shape whose only surface faces up (a flat slab seen
    from above) gets nothing from them but the field's best colour map, one whose surface faces sideways all."""
    from benchmarks import view_quality as vq

    views = vq.NOVEL_VIEWS[:4]
    truth = vq.truth_renders(gear, views)
    on_truth = [vq.render_novel(gear.truth.vertices, gear.truth.faces, vq.ceiling_shader(gear, gear.truth, "oracle"),
                                gear.camera, v) for v in views]  # fmt: skip
    assert vq.image_metrics(truth, on_truth)["texture_psnr"] > 60

    start, _ = vq.fitted_frame(gear, vq.to_truth_frame(gear, gear.start))
    scored = {
        kind: vq.image_metrics(truth, [vq.render_novel(start.vertices, start.faces, shade, gear.camera, v) for v in views])
        for kind, shade in (("field", vq.mesh_shader(start)), *((k, vq.ceiling_shader(gear, start, k)) for k in vq.CEILINGS))
    }  # fmt: skip
    assert scored["oracle"]["texture_psnr"] > scored["oracle-seen"]["texture_psnr"] > scored["field"]["texture_psnr"]

    slab = trimesh.Trimesh([[-0.5, 0, -0.5], [0.5, 0, -0.5], [0.5, 0, 0.5], [-0.5, 0, 0.5]], [[0, 2, 1], [0, 3, 2]])
    slab.visual.vertex_colors = [[40, 90, 200, 255]] * 4  # one flat colour: the best map of it is the truth's mean
    points = np.array([[0.1, 0.0, 0.2], [-0.3, 0.0, 0.1]])
    up = vq.ceiling_shader(gear, slab, "oracle-seen")(np.array([0, 1]), np.full((2, 3), 1 / 3), points)
    assert not np.allclose(up, gear.color_fn(points), atol=0.02)  # not the truth's colour: no view sees it
    wall = slab.copy()
    wall.vertices = np.asarray(slab.vertices)[:, [0, 2, 1]]  # the same square standing upright, facing +-Z
    side = vq.ceiling_shader(gear, wall, "oracle-seen")(np.array([0, 1]), np.full((2, 3), 1 / 3), points[:, [0, 2, 1]])
    np.testing.assert_allclose(side, gear.color_fn(points[:, [0, 2, 1]]), atol=1e-9)


def test_refine_repeats_report_the_median_run(monkeypatch, tmp_path, gear):
    """--refine-repeats: each +refine variant runs once per perturbation; the median-Chamfer run stands for it and
    every run is listed under "repeats" (stub variants: the refinement itself is tested elsewhere)."""
    from benchmarks import view_quality as vq

    seen = []

    def fake_run(case, variant, *, perturb=0.0, **kw):
        seen.append((variant, perturb))
        mesh = case.start.copy()
        # perturb 1e-6 -> 5 % wider (a shape change: the metrics' fitted alignment takes out a uniform scale)
        mesh.vertices = np.asarray(mesh.vertices) * np.array([1.0 + 50_000 * perturb, 1.0, 1.0])
        return mesh, {"seconds": 0.0, "refine_accepted": True}

    monkeypatch.setattr(vq, "run_variant", fake_run)
    monkeypatch.setattr(vq, "make_case", lambda name, **kw: gear)
    out = tmp_path / "vq.json"
    argv = ["--preset", "small", "--objects", "gear", "--variants", "field,clean+refine", "--refine-repeats", "3"]
    assert vq.main([*argv, "--out", str(out), "--threads", "1"]) == 0
    assert seen == [("field", 0.0), ("clean+refine", 0.0), ("clean+refine", 1e-6), ("clean+refine", 2e-6)]
    variant = json.loads(out.read_text())["objects"]["gear"]["variants"]["clean+refine"]
    chamfers = [r["chamfer"] for r in variant["repeats"]]
    assert len(chamfers) == 3 and len(set(chamfers)) == 3
    assert variant["metrics"]["chamfer"] == sorted(chamfers)[1]


def test_novel_views_look_from_above_and_below():
    from benchmarks import view_quality as vq

    elevations = [e for _, e in vq.NOVEL_VIEWS]
    assert len(vq.NOVEL_VIEWS) >= 8 and sum(e > 20 for e in elevations) >= 3 and sum(e < -20 for e in elevations) >= 3
    axes = vq.novel_axes(30, 40)
    np.testing.assert_allclose(axes @ axes.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(axes) > 0 and axes[2, 1] > 0  # right-handed, looking down from above


def test_small_benchmark_end_to_end(tmp_path, gear):
    """field < clean views on the texture; a mirrored set of views (texture flipped) scores far below the clean."""
    from benchmarks import view_quality as vq

    out = tmp_path / "vq.json"
    argv = ["--preset", "small", "--objects", "gear", "--variants", "field,clean", "--out", str(out), "--threads", "1"]
    assert vq.main(argv) == 0
    record = json.loads(out.read_text())
    m = {k: v["metrics"] for k, v in record["objects"]["gear"]["variants"].items()}
    assert m["clean"]["texture_psnr"] > m["field"]["texture_psnr"] + 1.5
    assert m["clean"]["texture_ssim"] > m["field"]["texture_ssim"] + 0.07
    assert m["clean"]["surface_color_psnr_seen"] > m["field"]["surface_color_psnr_seen"] + 3.0
    assert m["clean"]["chamfer"] == m["field"]["chamfer"]  # no refinement: the same surface
    assert record["objects"]["gear"]["targets"] == {
        "no_metric_worse_than_start": {"pass": True, "value": []}
    }  # the targets that need views / refine are left out, not failed
    assert (tmp_path / "vq.png").stat().st_size > 10_000

    from t2mv.views_to_mesh import views_to_mesh

    mirrored = [c.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for c in gear.clean_colors]
    result = views_to_mesh(gear.start, mirrored, gear.clean_normals, fallback=gear.fallback, texture_size=512)
    scored = vq.score(gear, vq.to_truth_frame(gear, result.mesh), vq.truth_renders(gear), 2000)
    assert scored.metrics["texture_psnr"] < m["clean"]["texture_psnr"] - 2.0
    assert scored.metrics["surface_color_psnr_seen"] < m["clean"]["surface_color_psnr_seen"] - 3.0


def test_merge_records_unites_variants_and_recomputes_targets():
    from benchmarks import view_quality as vq

    def metrics(psnr: float) -> dict:
        return {"texture_psnr": psnr, "texture_ssim": 0.5, "silhouette_psnr": 20.0, "normal_consistency": 0.9,
                "chamfer": 0.01}  # fmt: skip

    def record(variant: str, psnr: float) -> dict:
        base = {"benchmark": "view_quality", "preset": "full", "novel_views_az_el_deg": [], "alignment": "known"}
        variants = {variant: {"metrics": metrics(psnr), "run": {}}}
        return {**base, "command": variant, "objects": {"gear": {"case": {}, "variants": variants}}}

    merged = vq.merge_records([record("field", 20.0), record("views", 24.0), record("clean", 24.5)])
    assert list(merged["objects"]["gear"]["variants"]) == ["field", "views", "clean"]
    assert [r["command"] for r in merged["runs"]] == ["field", "views", "clean"]
    targets = merged["objects"]["gear"]["targets"]
    assert targets["views_vs_field_texture_psnr_ge_3.5dB"] == {"pass": True, "value": 4.0}
    assert targets["clean_minus_imperfect_le_1.5dB"] == {"pass": True, "value": 0.5}
    worse = vq.merge_records([record("field", 20.0), record("views", 19.0)])["objects"]["gear"]["targets"]
    assert worse["no_metric_worse_than_start"] == {"pass": False, "value": ["views.texture_psnr"]}


# --------------------------------------------------------------------------------------------- what no view places


def _table_views(shelf_inset: float):
    """The table's six clean masks (bool) and normal maps at 128², its truth marched at 96."""
    sdf = functools.partial(vs.sdf_table, shelf_inset=shelf_inset)
    camera = vs.view_camera(vs.sdf_mesh(vs.sdf_table, 96), 128)
    _, normal, alpha = vs._render(vs.sdf_mesh(sdf, 96), sdf, lambda p: np.zeros((len(p), 3)), camera, 1)
    return alpha >= 0.5, normal


def test_no_view_places_the_table_shelf_rim():
    """`table_hidden` is what the six elevation-0 views cannot place: a table whose shelf is 0.02 (1.2 px) shorter
    gives the same six masks, every surface point that moves lies in `table_hidden`, and the normal maps differ
    only where the shelf meets a leg. A wrong claim (e.g. a shelf whose end showed past a leg, or a region drawn
    on the wrong axis) fails here."""
    masks, normals = _table_views(0.0)
    masks_short, normals_short = _table_views(0.02)
    assert masks.sum() > 5000 and (masks == masks_short).all()
    changed = np.linalg.norm(normals - normals_short, axis=-1) > 0.1  # (6, S, S)
    assert 0 < changed.sum() < 0.1 * masks.sum()  # the shelf's junctions with the legs, seen face-on
    # Every surface point of either table that the other lacks is in the hidden region, a small part of the table.
    for inset, other in ((0.0, 0.02), (0.02, 0.0)):
        sdf = functools.partial(vs.sdf_table, shelf_inset=inset)
        points, _ = trimesh.sample.sample_surface(vs.sdf_mesh(sdf, 96), 40_000, seed=0)
        # Where the two tables' distance functions differ (marching cubes cuts both tables' corners alike).
        moved = np.abs(vs.sdf_table(points, shelf_inset=other) - vs.sdf_table(points, shelf_inset=inset)) > 0.005
        assert moved.sum() > 100 and vs.table_hidden(points[moved]).all()
        assert 0.03 < vs.table_hidden(points).mean() < 0.12


def test_placed_metrics_leave_out_the_hidden_surface():
    """Two tables that differ only in the shelf's hidden rim: perfect on the placed surface, not overall."""
    from benchmarks import view_quality as vq

    truth, short = vs.sdf_mesh(vs.sdf_table, 96), vs.sdf_mesh(lambda p: vs.sdf_table(p, shelf_inset=0.03), 96)
    m = vq.surface_metrics(truth, short, 20_000, hidden=vs.table_hidden)
    assert m["normal_consistency_placed"] > 0.999 and m["chamfer_placed"] < 2e-4
    assert m["normal_consistency"] < m["normal_consistency_placed"] - 0.005 and m["chamfer"] > 5 * m["chamfer_placed"]
    assert 0.03 < m["hidden_fraction"] < 0.12
    assert "chamfer_placed" not in vq.surface_metrics(truth, short, 2000)


def test_targets_report_the_placed_surface_apart():
    """The target stays on the whole surface; the placed figures are listed beside it, not instead of it."""
    from benchmarks import view_quality as vq

    def metrics(nc: float, nc_placed: float) -> dict:
        return {"texture_psnr": 20.0, "texture_ssim": 0.5, "silhouette_psnr": 20.0, "normal_consistency": nc,
                "chamfer": 0.01, "normal_consistency_placed": nc_placed, "chamfer_placed": 0.01}  # fmt: skip

    out = vq.targets({"field": {"metrics": metrics(0.97, 0.98)}, "views": {"metrics": metrics(0.96, 0.985)}})
    assert out["no_metric_worse_than_start"] == {"pass": False, "value": ["views.normal_consistency"], "placed": []}
    out = vq.targets({"field": {"metrics": metrics(0.97, 0.98)}, "views": {"metrics": metrics(0.96, 0.97)}})
    assert out["no_metric_worse_than_start"]["placed"] == ["views.normal_consistency_placed"]
