"""t2mv.view_texture on surface the views see little or nothing of: the fallback's colours matched to the views'
(`color_transfer`, `fallback_transfer`), the views' residual continued into unseen surface without a seam, and the
fallback as an anchor for the views' colour harmonisation.

The object is the flat ellipsoid of test_view_texture (its top and bottom are edge-on to all six elevation-0 views),
with analytically ray-cast views; the fallback (TripoSR's colour field) is a dull copy of the truth."""

import numpy as np
import pytest
import torch
from PIL import Image
from test_view_texture import (
    ELLIPSOID_CENTRE,
    FLAT_AXES,
    ellipsoid_mesh,
    raycast_views,
    rt_cameras,
    texture_at,
    to_mesh_frame,
    to_true_frame,
    true_color,
)

from t2mv import view_texture as vt

pytestmark = pytest.mark.usefixtures("one_thread")
AZIMUTHS = (0.0, 1.3, 2.5, 3.8, 5.0)  # meridians (radians about +Y), none along a view direction


@pytest.fixture(scope="module")
def flat(request):
    cameras = rt_cameras(request.config.rootpath / "tests" / "fixtures")
    return raycast_views(cameras, semi_axes=FLAT_AXES), ellipsoid_mesh(FLAT_AXES, subdivisions=4)


def dull(colors: np.ndarray) -> np.ndarray:
    """What TripoSR's field does to the colours: desaturated to 45 %, dimmed to 80 % (a linear map of them)."""
    grey = colors.mean(axis=-1, keepdims=True)
    return 0.8 * (grey + 0.45 * (colors - grey))


def field(colors_of_truth):
    """A fallback: (N, 3) mesh-frame points -> colours, from a function of true-frame points."""

    def colors(points: torch.Tensor) -> torch.Tensor:
        out = colors_of_truth(to_true_frame(points.double().numpy()))
        return torch.from_numpy(np.asarray(out, dtype=np.float32))

    return colors


def meridian(azimuth: float, start: float = 0.0, count: int = 60) -> np.ndarray:
    """(count, 3) mesh-frame surface points from elevation angle `start` up to the top pole, at one azimuth."""
    angle = np.linspace(start, np.pi / 2, count)
    ring = np.stack([np.cos(angle) * np.sin(azimuth), np.sin(angle), np.cos(angle) * np.cos(azimuth)], 1)
    return to_mesh_frame(ELLIPSOID_CENTRE + ring * FLAT_AXES)


def cap(count: int = 20) -> np.ndarray:
    """Mesh-frame points on the top cap no view sees (elevation angle > 65 degrees on the unit sphere)."""
    return np.concatenate([meridian(a, start=np.radians(65), count=count) for a in AZIMUTHS])


@pytest.fixture(scope="module")
def dull_result(flat):
    views, mesh = flat
    return vt.texture_from_views(mesh, views, texture_size=512, fallback=field(lambda p: dull(true_color(p))))


# --------------------------------------------------------------------------------------------- color_transfer


def test_color_transfer_inverts_a_linear_colour_distortion():
    rng = np.random.default_rng(0)
    truth = torch.from_numpy(np.clip(rng.normal([0.5, 0.4, 0.3], [0.15, 0.1, 0.12], (4000, 3)), 0, 1))
    source = torch.from_numpy(dull(truth.numpy()))
    matrix, bias = vt.color_transfer(source, truth)
    mapped = source @ matrix.T + bias
    assert float((mapped - truth).abs().mean()) < 0.005  # the dulling is undone point by point
    # Matching moments, not a regression: a shuffled target (no point-to-point link) gives the same map.
    shuffled = vt.color_transfer(source, truth[torch.from_numpy(rng.permutation(4000))])
    torch.testing.assert_close(shuffled[0], matrix)


def test_color_transfer_of_a_flat_source_is_bounded():
    target = torch.rand(500, 3, dtype=torch.float64)
    matrix, bias = vt.color_transfer(torch.full((500, 3), 0.5, dtype=torch.float64), target)
    assert float(torch.linalg.eigvalsh(matrix).max()) <= vt.TRANSFER_MAX_GAIN + 1e-9
    # A flat source carries no variation to stretch: it lands on the target's mean.
    torch.testing.assert_close(torch.full((3,), 0.5, dtype=torch.float64) @ matrix.T + bias, target.mean(0))


# --------------------------------------------------------------------------------------------- texture_from_views


def test_a_dull_fallback_is_matched_to_the_views_on_unseen_surface(dull_result):
    points = cap()
    truth = true_color(to_true_frame(points))
    raw_error = np.abs(dull(truth) - truth).mean()
    error = np.abs(texture_at(dull_result.mesh, points) - truth).mean()
    # The raw fallback is off by ~0.1 per channel on the cap; matched to the views it is close to the truth.
    assert raw_error > 0.08 and error < 0.35 * raw_error, (error, raw_error)


def test_no_seam_where_the_views_end(dull_result):
    for azimuth in AZIMUTHS:
        path = texture_at(dull_result.mesh, meridian(azimuth))  # (60, 3) from the equator (seen) to the pole
        truth = true_color(to_true_frame(meridian(azimuth)))
        # Steps along the path no larger than the truth's own steps allow (plus texel noise): no colour jump where
        # the views' colour gives way to the fallback's.
        steps = np.abs(np.diff(path, axis=0)).max(axis=1)
        assert steps.max() < np.abs(np.diff(truth, axis=0)).max() + 0.03, (azimuth, steps.max())


def test_a_fallback_that_matches_the_views_is_left_as_it_is(flat):
    views, mesh = flat
    out = vt.texture_from_views(mesh, views, texture_size=512, fallback=field(true_color))
    transfer = np.array(out.fallback_transfer)  # (3, 4) [matrix | bias]
    np.testing.assert_allclose(transfer[:, :3], np.eye(3), atol=0.12)
    np.testing.assert_allclose(transfer[:, 3], 0.0, atol=0.05)
    truth = true_color(to_true_frame(cap()))
    assert np.abs(texture_at(out.mesh, cap()) - truth).mean() < 0.03


def test_a_flat_grey_fallback_is_bounded(flat):
    views, mesh = flat
    out = vt.texture_from_views(mesh, views, texture_size=512, fallback=lambda p: torch.full((len(p), 3), 0.5))
    transfer = np.array(out.fallback_transfer)
    assert np.linalg.eigvalsh((transfer[:, :3] + transfer[:, :3].T) / 2).max() <= vt.TRANSFER_MAX_GAIN + 1e-6
    # The cap takes the views' mean colour, not grey and nothing out of range.
    seen = np.concatenate([texture_at(out.mesh, meridian(a, count=60)[:10]) for a in AZIMUTHS])  # near the equator
    np.testing.assert_allclose(texture_at(out.mesh, cap()).mean(0), seen.mean(0), atol=0.08)


def test_match_fallback_off_keeps_the_raw_fallback(flat):
    views, mesh = flat
    out = vt.texture_from_views(
        mesh, views, texture_size=512, fallback=field(lambda p: dull(true_color(p))), match_fallback=False
    )
    np.testing.assert_array_equal(np.array(out.fallback_transfer), np.c_[np.eye(3), np.zeros(3)])
    truth = true_color(to_true_frame(cap()))
    np.testing.assert_allclose(texture_at(out.mesh, cap()), dull(truth), atol=0.03)


def test_the_fallback_anchors_a_view_that_few_others_overlap(flat, monkeypatch):
    views, mesh = flat[0], ellipsoid_mesh(FLAT_AXES, subdivisions=3)  # a coarser mesh: four runs
    back = np.asarray(views[3], dtype=np.float32) / 255.0  # (S, S, 3)
    object_px = (back < 0.98).any(axis=-1, keepdims=True)
    tinted = np.where(object_px, np.clip(back * [1.2, 1.0, 0.85] + [0.0, 0.04, 0.0], 0, 1), back)
    blank = Image.new("RGB", views[0].size, (255, 255, 255))
    # Right and left came out blank: only the front diagonals overlap the back view, at grazing angles; pairs of
    # views barely constrain its colour.
    sparse = [views[0], views[1], blank, views[3], blank, views[5]]
    cast = [*sparse[:3], Image.fromarray((tinted * 255).round().astype(np.uint8)), *sparse[4:]]  # the back tinted
    back_points = np.concatenate([meridian(a, count=40)[:12] for a in (2.8, 3.14, 3.5)])  # behind, near the equator
    truth = true_color(to_true_frame(back_points))
    errors = {}
    for anchor in (0.0, vt.HARMONIZE_ANCHOR):
        monkeypatch.setattr(vt, "HARMONIZE_ANCHOR", anchor)
        for name, view_set in (("cast", cast), ("clean", sparse)):
            out = vt.texture_from_views(mesh, view_set, texture_size=512, fallback=field(true_color))
            errors[name, anchor] = np.abs(texture_at(out.mesh, back_points) - truth).mean()
    assert errors["cast", vt.HARMONIZE_ANCHOR] < 0.85 * errors["cast", 0.0], errors  # measured: 0.065 -> 0.052
    assert errors["clean", vt.HARMONIZE_ANCHOR] < errors["clean", 0.0] + 0.003, errors  # no cast: left alone


def test_the_fallback_sets_the_chroma_of_a_view_no_other_overlaps(flat, monkeypatch):
    """Only the front and back views, which share no surface, the back with a per-channel gain (a green cast, not a
    brightness change): no pair can see it, the matched fallback's spreads can (`_anchor_chroma`). The fallback is
    the dull field (desaturated, dimmed), so only its channels' relative spread can be trusted; clean views stay
    as they are. (The matched fallback itself carries half the cast, fitted on both views: the correction is
    partial.)"""
    views, mesh = flat[0], ellipsoid_mesh(FLAT_AXES, subdivisions=3)
    back = np.asarray(views[3], dtype=np.float32) / 255.0  # (S, S, 3)
    object_px = (back < 0.98).any(axis=-1, keepdims=True)
    green = np.where(object_px, np.clip(back * [0.9, 1.1, 1.0], 0, 1), back)  # channel gains, mean ~1
    blank = Image.new("RGB", views[0].size, (255, 255, 255))
    clean = [views[0], blank, blank, views[3], blank, blank]
    cast = [views[0], blank, blank, Image.fromarray((green * 255).round().astype(np.uint8)), blank, blank]
    back_points = np.concatenate([meridian(a, count=40)[:12] for a in (2.8, 3.14, 3.5)])
    truth = true_color(to_true_frame(back_points))
    dull_field = field(lambda p: dull(true_color(p)))
    errors, red_over_green = {}, {}
    for weight in (0.0, vt.HARMONIZE_GAIN_ANCHOR):
        monkeypatch.setattr(vt, "HARMONIZE_GAIN_ANCHOR", weight)
        for name, view_set in (("cast", cast), ("clean", clean)):
            out = vt.texture_from_views(mesh, view_set, texture_size=512, fallback=dull_field)
            errors[name, weight] = np.abs(texture_at(out.mesh, back_points) - truth).mean()
            red_over_green[name, weight] = out.color_gain[3][0] / out.color_gain[3][1]  # the back view's
    on = vt.HARMONIZE_GAIN_ANCHOR
    # The cast asks for red/green 1.22; without the anchor's chroma nothing moves it (measured 1.00 -> 1.11).
    assert abs(red_over_green["cast", 0.0] - 1.0) < 0.01 and red_over_green["cast", on] > 1.06, red_over_green
    assert errors["cast", on] < 0.92 * errors["cast", 0.0], errors  # measured 0.0251 -> 0.0221
    assert abs(red_over_green["clean", on] - 1.0) < 0.03 and errors["clean", on] < errors["clean", 0.0] + 0.002


def test_a_flat_fallback_says_nothing_about_the_chroma(flat, monkeypatch):
    """A fallback (nearly) flat in one channel, or in all (grey with a faint pattern, std ~0.003), carries no spread
    to compare a view's with: the views' gains come out as without the anchor's chroma. Weighed as every other
    channel, the grey field made every view's spreads equal (a 1.4x green gain on the clean back view, the
    texture's error 0.035 -> 0.045)."""
    views, mesh = flat[0], ellipsoid_mesh(FLAT_AXES, subdivisions=3)

    def faint(p: np.ndarray) -> np.ndarray:
        return 0.004 * np.sin(40.0 * p[:, :1] + 25.0 * p[:, 1:2])  # (N, 1)

    for fallback in (
        field(lambda p: 0.5 + faint(p) * np.ones(3)),
        field(lambda p: np.c_[true_color(p)[:, :2], 0.3 + faint(p)]),  # blue nearly flat
    ):
        gains = {}
        for weight in (0.0, vt.HARMONIZE_GAIN_ANCHOR):
            monkeypatch.setattr(vt, "HARMONIZE_GAIN_ANCHOR", weight)
            out = vt.texture_from_views(mesh, views, texture_size=512, fallback=fallback)
            gains[weight] = np.array(out.color_gain)
        np.testing.assert_allclose(gains[vt.HARMONIZE_GAIN_ANCHOR], gains[0.0], atol=0.03)
