"""The six Wonder3D views and the camera/domain label the UNet's class embedding reads.

Each UNet batch item carries a 5-vector ``[elevation_cond, Δelevation, Δazimuth, is_normal, is_color]`` that is
turned into 10 numbers by ``cat(sin(v), cos(v))`` (the 0/1 domain flags pass through sin/cos as well) and fed as
`class_labels` to the projection class embedding.

The angles are not the nominal 0/45/90/180/-90/-45 degrees: upstream derived them from its fixed world-to-camera
files (`fixed_poses/nine_views/000_{view}_RT.txt`: camera centre −Rᵀt, elevation from +Z, azimuth atan2(y, x),
differences against the front view), which do not sit exactly at those angles, and the model was trained on the
resulting numbers. They act as fixed labels and must be reproduced exactly. Upstream's pipeline hard-codes them as
a float16 table; `camera_table()` rounds the radians below to float16 the same way (checked against the
upstream-generated table in tests/fixtures/wonder3d_unet_tiny/inputs.safetensors).
"""

from __future__ import annotations

import torch

VIEW_NAMES = ("front", "front_right", "right", "back", "left", "front_left")
DOMAINS = ("normal", "color")

# Radians, in VIEW_NAMES order (Wonder3D's RT files; the nominal azimuths are 0, 45, 90, 180, 270, 315 degrees).
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
