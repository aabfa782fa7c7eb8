"""The six Wonder3D views: the camera/domain label the UNet's class embedding reads, and their geometric cameras.

Two different things live here, named apart on purpose:
- the class-embedding table (`DELTA_ELEVATION`, `DELTA_AZIMUTH`, `camera_table`, `camera_embedding`): training
  labels the UNet was conditioned on, reproduced bit for bit, never used as geometry;
- the geometric cameras (`VIEW_AZIMUTHS_DEG`, `view_axes`): where each generated view is seen from, in our export
  frame, for projecting the views onto a mesh.

Each UNet batch item carries a 5-vector ``[elevation_cond, Δelevation, Δazimuth, is_normal, is_color]`` that is
turned into 10 numbers by ``cat(sin(v), cos(v))`` (the 0/1 domain flags pass through sin/cos as well) and fed as
`class_labels` to the projection class embedding.

The label angles are not the nominal 0/45/90/180/-90/-45 degrees: upstream derived them from its fixed
world-to-camera files (`fixed_poses/nine_views/000_{view}_RT.txt`: camera centre −Rᵀt, elevation from +Z, azimuth
atan2(y, x), differences against the front view), which do not sit exactly at those angles, and the model was
trained on the resulting numbers. They act as fixed labels and must be reproduced exactly. Upstream's pipeline hard-codes them as
a float16 table; `camera_table()` rounds the radians below to float16 the same way (checked against the
upstream-generated table in tests/fixtures/wonder3d_unet_tiny/inputs.safetensors).
"""

from __future__ import annotations

import torch

VIEW_NAMES = ("front", "front_right", "right", "back", "left", "front_left")
DOMAINS = ("normal", "color")

# Class-embedding labels, not geometry (see VIEW_AZIMUTHS_DEG for that). Radians, in VIEW_NAMES order
# (Wonder3D's RT files; the nominal azimuths are 0, 45, 90, 180, 270, 315 degrees).
DELTA_ELEVATION = (0.0, -0.23624, -0.16862, 0.52204, 0.69066, 0.37331)
DELTA_AZIMUTH = (0.0, 0.81238, 1.69349, 3.14159, 4.83508, 5.58601)
ELEVATION_COND = 0.0


def camera_table() -> torch.Tensor:
    """Upstream's (12, 5) float16 table: rows 0-5 normals (flags [1, 0]), rows 6-11 colors ([0, 1])."""
    rows = []
    for is_normal, is_color in ((1.0, 0.0), (0.0, 1.0)):
        for d_elev, d_azim in zip(DELTA_ELEVATION, DELTA_AZIMUTH):
            rows.append([ELEVATION_COND, d_elev, d_azim, is_normal, is_color])
    return torch.tensor(rows, dtype=torch.float16)  # (12, 5)


def camera_embedding(
    *,
    classifier_free_guidance: bool = False,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """The UNet's `class_labels` for one object: (12, 10), or (24, 10) with classifier-free guidance.

    sin/cos are taken in float32 of the float16 table values, then cast to `dtype`. With guidance the batch order
    is ``[normal-uncond, normal-cond, color-uncond, color-cond]`` (6 each): the joint attention pairs the first
    half of the batch with the second, so normals must fill the first half.
    """
    table = camera_table().to(torch.float32)  # (12, 5)
    embedding = torch.cat([torch.sin(table), torch.cos(table)], dim=-1)  # (12, 10)
    if classifier_free_guidance:
        normals, colors = embedding[:6], embedding[6:]
        embedding = torch.cat([normals, normals, colors, colors], dim=0)  # (24, 10)
    return embedding.to(device=device, dtype=dtype)


# Geometric cameras of the six views, in our export frame (glTF: +Y up, the input view seen from +Z, image right =
# +X). Wonder3D renders them orthographically at elevation 0, every camera looking at the origin along the
# horizontal plane (tests/fixtures/wonder3d_cameras: upstream world (x, y, z), +Z up, maps to export (x, z, -y)).
# Each view is the front camera rotated about +Y by its azimuth, positive from +Z towards +X.
# The generated normal maps are in the FRONT camera's frame with OpenGL axes (x right, y up, z towards the viewer),
# which are exactly our export axes; RGB = (n + 1) / 2.
VIEW_AZIMUTHS_DEG: dict[str, float] = {
    "front": 0.0,
    "front_right": 45.0,
    "right": 90.0,
    "back": 180.0,
    "left": 270.0,
    "front_left": 315.0,
}


def view_axes(dtype: torch.dtype = torch.float32, device: str | torch.device | None = None) -> torch.Tensor:
    """The six views' camera axes in the export frame, in `VIEW_NAMES` order.

    Returns:
        (6, 3, 3): rows = camera right, camera up, camera backward (from the object towards the viewer), each an
        export-frame unit vector. Camera-space coordinates of an export point p are ``axes @ p`` (orthographic
        image x, image y up, depth with larger = closer to the camera).
    """
    azimuth = torch.tensor([VIEW_AZIMUTHS_DEG[name] for name in VIEW_NAMES], dtype=torch.float64).deg2rad()  # (6,)
    cos, sin, zero = torch.cos(azimuth), torch.sin(azimuth), torch.zeros_like(azimuth)
    right = torch.stack([cos, zero, -sin], dim=-1)  # (6, 3) the front's +X turned about +Y
    up = torch.stack([zero, torch.ones_like(azimuth), zero], dim=-1)  # (6, 3) elevation 0: +Y for every view
    backward = torch.stack([sin, zero, cos], dim=-1)  # (6, 3) the front's +Z turned about +Y
    return torch.stack([right, up, backward], dim=1).to(dtype=dtype, device=device)  # (6, 3, 3)
