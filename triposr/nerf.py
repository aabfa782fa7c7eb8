"""Triplane field queries (NeRF MLP decoder) and the preview volume renderer of TripoSR.

Frame: TripoSR's native world frame, +z up; the input view looks from +x toward the origin, +y is image right.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import DecoderConfig, RendererConfig


class NeRFMLP(nn.Module):
    """Triplane features (..., Cin) -> (..., 4): raw density (channel 0) and raw colour features (channels 1..3)."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        activation = {"relu": nn.ReLU, "silu": nn.SiLU}[config.activation]
        widths = [config.in_channels] + [config.n_neurons] * config.n_hidden_layers
        layers: list[nn.Module] = []
        for dim_in, dim_out in zip(widths[:-1], widths[1:]):
            layers += [self._linear(dim_in, dim_out, config), activation()]
        layers.append(self._linear(config.n_neurons, 4, config))
        # Named "layers" with activations at odd indices: the checkpoint stores layers.0, layers.2, ...
        self.layers = nn.Sequential(*layers)

    @staticmethod
    def _linear(dim_in: int, dim_out: int, config: DecoderConfig) -> nn.Linear:
        layer = nn.Linear(dim_in, dim_out, bias=config.bias)
        if config.weight_init == "kaiming_uniform":
            nn.init.kaiming_uniform_(layer.weight, nonlinearity="relu")
        if config.bias and config.bias_init == "zero":
            nn.init.zeros_(layer.bias)
        return layer

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class TriplaneNeRFRenderer(nn.Module):
    """Queries a triplane field and volume-renders it; it has no parameters of its own.

    ``cfg.radius`` bounds the field: world points in [-radius, radius]^3 map to the triplane's [-1, 1] range.
    ``chunk_size`` (points per decoder call, 0 = all at once) changes memory use only.
    """

    def __init__(self, config: RendererConfig, chunk_size: int = 8192):
        super().__init__()
        self.cfg = config
        self.chunk_size = chunk_size

    def set_chunk_size(self, chunk_size: int) -> None:
        if chunk_size < 0:
            raise ValueError(f"chunk_size must be >= 0 (0 = no chunking), got {chunk_size}")
        self.chunk_size = chunk_size

    def _decode_points(self, decoder: NeRFMLP, triplane: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        # points (N, 3) in [-1, 1]; plane 0 is sampled at (x, y), plane 1 at (x, z), plane 2 at (y, z), the first
        # coordinate along the plane's width.
        grid = torch.stack([points[:, [0, 1]], points[:, [0, 2]], points[:, [1, 2]]], dim=0)  # (3, N, 2)
        grid = grid.unsqueeze(1).to(triplane.dtype)  # (3, 1, N, 2)
        sampled = F.grid_sample(triplane, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        sampled = sampled.squeeze(2)  # (3, C, N)
        if self.cfg.feature_reduction == "concat":
            features = sampled.permute(2, 0, 1).reshape(points.shape[0], -1)  # (N, 3*C), plane-major
        else:
            features = sampled.mean(dim=0).transpose(0, 1)  # (N, C)
        return decoder(features)  # (N, 4)

    def query(
        self, decoder: NeRFMLP, triplane: torch.Tensor, positions: torch.Tensor, chunk_size: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Field at world positions (..., 3) for one scene code (3, C, H, W).

        Returns ``density`` (..., 1) raw (before activation, as upstream), ``features`` (..., 3) raw,
        ``density_act`` (..., 1) = exp(density + density_bias) computed in float32 (fp16 would overflow to inf above
        raw ~11), and ``color`` (..., 3) = sigmoid(features) in [0, 1]. All but density_act are in the triplane dtype.
        """
        if triplane.ndim != 4 or triplane.shape[0] != 3:
            raise ValueError(f"expected one scene code (3, C, H, W), got {tuple(triplane.shape)}")
        if positions.shape[-1] != 3:
            raise ValueError(f"positions must end in a dimension of 3, got {tuple(positions.shape)}")
        lead_shape = positions.shape[:-1]
        radius = self.cfg.radius
        points = positions.reshape(-1, 3).to(triplane.device)  # (N, 3)
        points = (points - (-radius)) / (2 * radius) * 2 + (-1)  # [-radius, radius] -> [-1, 1]
        # Callers that chunk already (mesh extraction, 2**18 points at a time) pass chunk_size=0: re-splitting their
        # chunks into 8192-point pieces would cost thousands of small kernel launches per mesh on a GPU.
        chunk = self.chunk_size if chunk_size is None else chunk_size
        if chunk > 0:
            raw = torch.cat(
                [
                    self._decode_points(decoder, triplane, points[i : i + chunk])
                    for i in range(0, points.shape[0], chunk)
                ]
            )  # (N, 4)
        else:
            raw = self._decode_points(decoder, triplane, points)  # (N, 4)
        density = raw[:, 0:1]  # (N, 1)
        features = raw[:, 1:4]  # (N, 3)
        out = {
            "density": density,
            "features": features,
            "density_act": torch.exp(density.float() + self.cfg.density_bias),
            "color": torch.sigmoid(features),
        }
        return {k: v.reshape(*lead_shape, v.shape[-1]) for k, v in out.items()}

    def forward(
        self, decoder: NeRFMLP, triplane: torch.Tensor, rays_o: torch.Tensor, rays_d: torch.Tensor
    ) -> torch.Tensor:
        """Render one scene code (3, C, H, W) along rays (..., 3) -> rgb (..., 3) on a white background, float32.

        Reproduces upstream: 128 midpoint samples between the ray's entry and exit of the (slightly shrunk) cube, and
        the alpha step is the normalised bin width 1 / num_samples, not the metric distance.
        """
        ray_shape = rays_o.shape[:-1]
        rays_o = rays_o.reshape(-1, 3).float()  # (R, 3)
        rays_d = rays_d.reshape(-1, 3).float()  # (R, 3)
        t_near, t_far, valid = rays_intersect_cube(rays_o, rays_d, self.cfg.radius)  # (R, 1), (R, 1), (R,)
        t_near, t_far = t_near[valid], t_far[valid]  # (Rv, 1)

        n = self.cfg.num_samples_per_ray
        t_vals = torch.linspace(0, 1, n + 1, device=rays_o.device)  # (n+1,)
        t_mid = (t_vals[:-1] + t_vals[1:]) / 2.0  # (n,)
        z_vals = t_near * (1 - t_mid[None]) + t_far * t_mid[None]  # (Rv, n)
        xyz = rays_o[valid][:, None, :] + z_vals[..., None] * rays_d[valid][:, None, :]  # (Rv, n, 3)

        field = self.query(decoder, triplane, xyz)
        deltas = t_vals[1:] - t_vals[:-1]  # (n,)
        alpha = 1 - torch.exp(-deltas * field["density_act"][..., 0])  # (Rv, n)
        transmittance = torch.cat(
            [torch.ones_like(alpha[:, :1]), torch.cumprod(1 - alpha[:, :-1] + 1e-10, dim=-1)], dim=-1
        )  # (Rv, n), exclusive product
        weights = alpha * transmittance  # (Rv, n)
        rgb_valid = (weights[..., None] * field["color"].float()).sum(dim=-2)  # (Rv, 3)

        rgb = torch.zeros(rays_o.shape[0], 3, device=rays_o.device)  # (R, 3)
        opacity = torch.zeros(rays_o.shape[0], device=rays_o.device)  # (R,)
        rgb[valid] = rgb_valid
        opacity[valid] = weights.sum(dim=-1)
        rgb = rgb + (1 - opacity[:, None])  # white background
        return rgb.reshape(*ray_shape, 3)


def rays_intersect_cube(rays_o: torch.Tensor, rays_d: torch.Tensor, radius: float, near: float = 0.0):
    """Slab test of rays (R, 3) against [-r, r]^3 shrunk by 1e-3 (so entry points lie inside the field).

    Returns t_near (R, 1), t_far (R, 1) and valid (R,), valid meaning the ray spends more than 0.01 inside; invalid
    rays get t_near = t_far = 0.
    """
    safe_d = torch.where(rays_d.abs() < 1e-6, torch.full_like(rays_d, 1e-6), rays_d)  # avoid division by zero
    bound = (1.0 - 1.0e-3) * radius
    t0 = (bound - rays_o) / safe_d  # (R, 3)
    t1 = (-bound - rays_o) / safe_d  # (R, 3)
    t_near = torch.minimum(t0, t1).amax(dim=-1).clamp_min(near)  # (R,)
    t_far = torch.maximum(t0, t1).amin(dim=-1)  # (R,)
    valid = t_far - t_near > 0.01
    t_near = torch.where(valid, t_near, torch.zeros_like(t_near))
    t_far = torch.where(valid, t_far, torch.zeros_like(t_far))
    return t_near[:, None], t_far[:, None], valid


def spherical_camera_rays(
    n_views: int, elevation_deg: float, camera_distance: float, fovy_deg: float, height: int, width: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rays of ``n_views`` cameras on a circle around the origin, float32 on CPU: origins and unit directions,
    each (n_views, height, width, 3), row 0 = top of the image.

    Azimuths are evenly spaced from 0 (360 excluded); azimuth 0 puts the camera on +x looking at the origin (the
    input view), world up is +z; OpenGL-style cameras (looking along their -z), pixel centres at +0.5.
    """
    azimuth = torch.linspace(0, 360.0, n_views + 1)[:n_views] * math.pi / 180  # (V,)
    elevation = torch.full_like(azimuth, elevation_deg) * math.pi / 180  # (V,)
    distance = torch.full_like(azimuth, camera_distance)  # (V,)
    position = torch.stack(
        [
            distance * torch.cos(elevation) * torch.cos(azimuth),
            distance * torch.cos(elevation) * torch.sin(azimuth),
            distance * torch.sin(elevation),
        ],
        dim=-1,
    )  # (V, 3)
    world_up = torch.tensor([0.0, 0.0, 1.0]).expand(n_views, 3)  # (V, 3)
    forward = F.normalize(-position, dim=-1)  # (V, 3), toward the origin
    right = F.normalize(torch.cross(forward, world_up, dim=-1), dim=-1)  # (V, 3)
    up = F.normalize(torch.cross(right, forward, dim=-1), dim=-1)  # (V, 3)
    rotation = torch.stack([right, up, -forward], dim=-1)  # (V, 3, 3): camera-to-world, columns = camera axes

    fovy = torch.full_like(azimuth, fovy_deg) * math.pi / 180  # (V,)
    focal = 0.5 * height / torch.tan(0.5 * fovy)  # (V,)
    cols, rows = torch.meshgrid(
        torch.arange(width, dtype=torch.float32) + 0.5, torch.arange(height, dtype=torch.float32) + 0.5, indexing="xy"
    )  # (H, W) each
    # Unit-focal directions are normalised first and then divided by the focal length, as upstream does.
    unit = F.normalize(torch.stack([cols - width / 2, -(rows - height / 2), -torch.ones_like(cols)], -1), dim=-1)
    directions = unit[None].repeat(n_views, 1, 1, 1)  # (V, H, W, 3)
    directions[..., :2] = directions[..., :2] / focal[:, None, None, None]
    rays_d = (directions[:, :, :, None, :] * rotation[:, None, None, :, :]).sum(-1)  # (V, H, W, 3)
    rays_d = F.normalize(rays_d, dim=-1)
    rays_o = position[:, None, None, :].expand(rays_d.shape)  # (V, H, W, 3)
    return rays_o, rays_d
