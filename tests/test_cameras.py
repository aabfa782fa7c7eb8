"""The 6-view camera/domain table (upstream's exact float16 values, the 10-d embedding layouts) and the geometric
cameras of the six views, derived from upstream's world-to-camera files."""

import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from wonder3d_perflow.cameras import (
    DELTA_AZIMUTH,
    VIEW_AZIMUTHS_DEG,
    VIEW_NAMES,
    camera_embedding,
    camera_table,
    view_axes,
)


@pytest.fixture(scope="module")
def upstream(request):
    return load_file(request.config.rootpath / "tests/fixtures/wonder3d_unet_tiny/inputs.safetensors")


def test_table_equals_upstream_fp16_table(upstream):
    table = camera_table()
    assert table.dtype == torch.float16 and table.shape == (12, 5)
    assert torch.equal(table, upstream["camera_table_fp16"])


def test_rows_are_normals_then_colors():
    table = camera_table()
    assert torch.equal(table[:6, 3:], torch.tensor([[1.0, 0.0]] * 6, dtype=torch.float16))
    assert torch.equal(table[6:, 3:], torch.tensor([[0.0, 1.0]] * 6, dtype=torch.float16))
    assert torch.equal(table[:6, :3], table[6:, :3])


def test_view_order_and_nominal_azimuths():
    assert VIEW_NAMES == ("front", "front_right", "right", "back", "left", "front_left")
    # The trained labels are near, not at, the nominal angles (upstream issues #72 / #123).
    degrees = [math.degrees(a) for a in DELTA_AZIMUTH]
    for got, nominal in zip(degrees, (0, 45, 90, 180, 270, 315)):
        assert abs(got - nominal) < 8
    assert degrees[1] != 45  # not rounded


def test_embedding_equals_upstream_class_labels(upstream):
    assert torch.equal(camera_embedding(), upstream["b12_t1000/class_labels"])
    assert torch.equal(camera_embedding(classifier_free_guidance=True), upstream["b24_cfg_t500/class_labels"])


def test_embedding_dtype_and_layout():
    emb = camera_embedding(classifier_free_guidance=True, dtype=torch.float16)
    assert emb.shape == (24, 10) and emb.dtype == torch.float16
    base = camera_embedding()
    assert torch.equal(emb.float(), torch.cat([base[:6], base[:6], base[6:], base[6:]]).half().float())
    assert torch.allclose(base[:, 3], torch.sin(torch.tensor([1.0] * 6 + [0.0] * 6)))


def upstream_cameras(fixtures_dir):
    """Per view: camera centre and right/up/backward axes in upstream's world (+Z up), from the RT files.

    Each file is a Blender/OpenGL world-to-camera [R | t]: the rows of R are the camera's x (right), y (up) and z
    (backward: the camera looks along -z) axes in world coordinates, and the centre is -Rᵀt.
    """
    cams = {}
    for name in VIEW_NAMES:
        rt = torch.from_numpy(np.loadtxt(fixtures_dir / "wonder3d_cameras" / f"000_{name}_RT.txt")).reshape(3, 4)
        rot, t = rt[:, :3], rt[:, 3]
        cams[name] = {"centre": -rot.T @ t, "right": rot[0], "up": rot[1], "backward": rot[2]}
    return cams


def upstream_to_export(front_centre: torch.Tensor) -> torch.Tensor:
    """(3, 3) rotation from upstream's world to our export frame, built from two facts only: upstream's up is +Z
    (export +Y), and the front camera sits on export +Z. Export +X follows (right-handed)."""
    y = torch.tensor([0.0, 0.0, 1.0], dtype=front_centre.dtype)
    z = front_centre - (front_centre @ y) * y
    z = z / z.norm()
    x = torch.linalg.cross(y, z)
    return torch.stack([x, y, z])  # rows: export axes in upstream coordinates


def test_view_axes_match_upstream_rt_files(request):
    cams = upstream_cameras(request.config.rootpath / "tests" / "fixtures")
    to_export = upstream_to_export(cams["front"]["centre"])
    assert torch.isclose(torch.linalg.det(to_export), torch.tensor(1.0, dtype=torch.float64))
    axes = view_axes(dtype=torch.float64)
    assert axes.shape == (6, 3, 3) and axes.dtype == torch.float64
    for k, name in enumerate(VIEW_NAMES):
        cam = {key: to_export @ v for key, v in cams[name].items()}
        direction = cam["centre"] / cam["centre"].norm()
        torch.testing.assert_close(direction, axes[k, 2], atol=1e-6, rtol=0)  # sits on its backward axis
        torch.testing.assert_close(cam["right"], axes[k, 0], atol=1e-6, rtol=0)
        torch.testing.assert_close(cam["up"], axes[k, 1], atol=1e-6, rtol=0)
        torch.testing.assert_close(cam["backward"], axes[k, 2], atol=1e-6, rtol=0)
        # Upstream's azimuth, measured in the export frame from +Z towards +X, is the nominal one.
        azimuth = math.degrees(math.atan2(direction[0].item(), direction[2].item())) % 360
        assert abs(azimuth - VIEW_AZIMUTHS_DEG[name]) < 1e-4


def test_front_camera_is_the_export_frame():
    # Image right = +X, image up = +Y, the viewer on +Z: the normal maps' (front camera, OpenGL) axes are ours.
    torch.testing.assert_close(view_axes()[0], torch.eye(3))


def test_view_axes_are_rotations_about_y():
    axes = view_axes(dtype=torch.float64)  # (6, 3, 3)
    torch.testing.assert_close(axes @ axes.transpose(1, 2), torch.eye(3, dtype=torch.float64).expand(6, 3, 3))
    torch.testing.assert_close(torch.linalg.det(axes), torch.ones(6, dtype=torch.float64))
    # The right camera sees +X head-on and shows -Z on its image right.
    right = VIEW_NAMES.index("right")
    torch.testing.assert_close(
        axes[right] @ torch.tensor([1.0, 0, 0], dtype=torch.float64), torch.tensor([0.0, 0, 1], dtype=torch.float64)
    )
    assert axes[right, 0, 2] < -0.99
