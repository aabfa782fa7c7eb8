"""The turntable: one full turn of the mesh in an mp4 (decoded here), the camera convention, colours, culling."""

import imageio_ffmpeg
import numpy as np
import pytest
import trimesh
from PIL import Image

from t2mv.turntable import TurntableConfig, camera_axes, closed_orientation, make_turntable, render_turntable
from wonder3d_perflow.cameras import view_axes

RED, GREEN, GREY = (220, 30, 30, 255), (30, 200, 30, 255), (128, 128, 128, 255)


def coloured_box() -> trimesh.Trimesh:
    """An elongated box (long along X) whose +Z faces are red, +X faces green, the rest grey."""
    box = trimesh.creation.box(extents=(1.0, 0.5, 0.3))
    normals = box.face_normals
    colors = np.tile(np.array(GREY, np.uint8), (len(box.faces), 1))
    colors[normals[:, 2] > 0.9] = RED
    colors[normals[:, 0] > 0.9] = GREEN
    box.visual.face_colors = colors
    return box


def decode(path) -> np.ndarray:
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    return np.stack([np.frombuffer(f, np.uint8).reshape(height, width, 3) for f in reader])  # (T, H, W, 3)


def silhouette(frame: np.ndarray) -> np.ndarray:
    return np.abs(frame.astype(int) - 255).sum(-1) > 60  # not the white background


def test_the_default_is_36_frames_at_512():
    cfg = TurntableConfig()
    assert cfg.frames >= 36 and cfg.size == 512 and 0 < cfg.elevation_deg < 30


def test_the_mp4_holds_one_full_turn(tmp_path):
    path = tmp_path / "turntable.mp4"
    make_turntable(coloured_box(), path, TurntableConfig(frames=36, size=64))
    frames = decode(path)
    assert frames.shape == (36, 64, 64, 3)
    masks = np.stack([silhouette(f) for f in frames])  # (T, H, W)
    iou = (masks[0] & masks[9]).sum() / (masks[0] | masks[9]).sum()
    assert iou < 0.8  # a quarter turn shows the long box end-on: the silhouette changes
    # One full turn: the last frame (350 degrees) is one step from the first, like the second (10 degrees) is.
    diffs = [np.abs(frames[0].astype(float) - f).mean() for f in frames]  # (T,)
    assert diffs[-1] <= 1.25 * diffs[1] + 1.0
    assert diffs[-1] < 0.3 * max(diffs)
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_the_camera_starts_at_the_front_and_moves_towards_plus_x():
    frames = render_turntable(coloured_box(), TurntableConfig(frames=4, size=64, elevation_deg=0.0)).frames
    front, quarter = frames[0, 32, 32].astype(int), frames[1, 32, 32].astype(int)
    assert front[0] > 2 * front[1]  # red: the +Z face
    assert quarter[1] > 2 * quarter[0]  # green: the +X face, as the views' front_right → right go
    axes = camera_axes(8, 0.0).double()
    np.testing.assert_allclose(axes[[0, 2, 4, 6]], view_axes(dtype=axes.dtype)[[0, 2, 3, 4]], atol=1e-6)


def test_the_elevated_camera_looks_down_on_the_top():
    box = coloured_box()
    colors = np.asarray(box.visual.face_colors).copy()
    colors[box.face_normals[:, 1] > 0.9] = GREEN  # the top
    box.visual.face_colors = colors
    level = silhouette(render_turntable(box, TurntableConfig(frames=2, size=64, elevation_deg=0.0)).frames[0])
    frame = render_turntable(box, TurntableConfig(frames=2, size=64, elevation_deg=30.0)).frames[0].astype(int)
    green = (frame[..., 1] > 2 * frame[..., 0]) & silhouette(frame)
    assert green[:32].sum() > 20 and green[32:].sum() == 0  # the top shows in the upper half only
    assert silhouette(frame).sum() > level.sum()


def test_a_texture_is_what_the_frames_show():
    box = trimesh.creation.box(extents=(0.6, 0.6, 0.6))
    texture = Image.new("RGB", (16, 16), (20, 60, 220))
    uv = np.random.default_rng(0).uniform(0.2, 0.8, (len(box.vertices), 2))
    box.visual = trimesh.visual.TextureVisuals(
        uv=uv, material=trimesh.visual.material.PBRMaterial(baseColorTexture=texture)
    )
    frame = render_turntable(box, TurntableConfig(frames=2, size=32, elevation_deg=0.0, ambient=1.0)).frames[0]
    np.testing.assert_allclose(frame[16, 16], (20, 60, 220), atol=3)


def test_shading_makes_faces_that_turn_away_from_the_light_darker():
    sphere = trimesh.creation.icosphere(3)
    frame = render_turntable(sphere, TurntableConfig(frames=2, size=64, elevation_deg=0.0)).frames[0].astype(int)
    lit, unlit = frame[20, 20].sum(), frame[44, 44].sum()  # upper left faces the light, lower right does not
    assert lit > unlit + 60


def test_closed_orientation_tells_outward_inward_and_open_meshes():
    sphere = trimesh.creation.icosphere(2)
    assert closed_orientation(sphere.faces, sphere.vertices) == 1
    assert closed_orientation(sphere.faces[:, ::-1], sphere.vertices) == -1
    assert closed_orientation(sphere.faces[1:], sphere.vertices) == 0


def test_an_open_mesh_shows_its_inside_through_the_hole():
    """Culling is for closed meshes only: a box without its front face shows the inside of its back face."""
    box = trimesh.creation.box(extents=(0.6, 0.6, 0.6))
    open_box = trimesh.Trimesh(box.vertices, box.faces[box.face_normals[:, 2] < 0.9], process=False)
    frame = render_turntable(open_box, TurntableConfig(frames=2, size=32, elevation_deg=0.0)).frames[0]
    assert silhouette(frame)[16, 16]


def test_bad_settings_and_an_empty_mesh_are_refused():
    with pytest.raises(ValueError, match="multiple of 16"):
        render_turntable(coloured_box(), TurntableConfig(size=100))
    with pytest.raises(ValueError, match="empty"):
        render_turntable(trimesh.Trimesh(), TurntableConfig(size=32))


def test_the_chain_writes_turntable_mp4_and_mesh_stl(tmp_path):
    """`--turntable` and `--format stl` through the chain (smoke mode: the video is SMOKE_TURNTABLE_SIZE²)."""
    import json

    from t2mv.chain import TextTo3D
    from t2mv.chain.extra_stages import SMOKE_TURNTABLE_SIZE
    from t2mv.settings import GenerationSettings

    chain = TextTo3D.tiny(0, stages=("text_to_image", "mesh"))
    settings = GenerationSettings.smoke(turntable=True)
    result = chain("a red chair", settings=settings, output_dir=tmp_path, mesh_formats=("glb", "stl"))
    frames = decode(tmp_path / "turntable.mp4")
    assert frames.shape == (TurntableConfig().frames, SMOKE_TURNTABLE_SIZE, SMOKE_TURNTABLE_SIZE, 3)
    assert silhouette(frames[0]).any()
    assert "turntable" in json.loads((tmp_path / "settings.json").read_text())["stages"]
    assert "turntable" in result.timings
    stl = trimesh.load(tmp_path / "mesh.stl")
    assert len(stl.faces) == len(result.mesh.faces)
    np.testing.assert_allclose(stl.bounds, result.mesh.bounds, atol=1e-5)
    plain = chain.plan(GenerationSettings.smoke(), prompt="a red chair")
    assert "turntable" not in [stage.name for stage in plain]  # only when asked for


def test_a_mesh_split_along_uv_seams_still_counts_as_closed():
    sphere = trimesh.creation.icosphere(2)
    split = sphere.faces.copy()
    split[0] = [len(sphere.vertices), len(sphere.vertices) + 1, len(sphere.vertices) + 2]  # its own vertex copies
    vertices = np.concatenate([sphere.vertices, sphere.vertices[sphere.faces[0]]])
    assert closed_orientation(split, vertices) == 1
    assert closed_orientation(split[:, ::-1], vertices) == -1
