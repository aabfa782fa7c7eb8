"""Benchmark case "view_refine": refine a mesh from six normal maps and masks (`t2mv.view_refine.refine_mesh`).

The inputs are synthetic and need no model: the ground truth is a sphere with 18 Gaussian bumps (an 80k-face
icosphere; tiny mode: 5k), its six 256² normal maps and masks (tiny: 128²) rendered by the module's renderer at a
Wonder3D-like framing; the mesh to refine is a plain 20k-face sphere (tiny: 1.3k), like a TripoSR mesh that lost the
detail. Real mode runs the issue's budget case: 40k faces (the start remeshed at 2 px, capped at 40k), 200
iterations. A second case starts from the same sphere as the chain hands it over: marching cubes at R=256 (~160k
faces; tiny: R=64), so the remeshing's time (gpytoolbox, on the host whatever the device) is measured at the input
size it really gets. The result records the stage's own time split and how much of the gap to the ground truth the
refinement closed.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
import trimesh
from PIL import Image


def bump_centres() -> np.ndarray:
    """18 unit vectors at latitudes -30, 0, 30 degrees, offset in longitude so that no view is symmetric."""
    centres = []
    for lat in (-30, 0, 30):
        for lon in range(0, 360, 60):
            la, lo = math.radians(lat), math.radians(lon + lat + 10)
            centres.append([math.cos(la) * math.sin(lo), math.sin(la), math.cos(la) * math.cos(lo)])
    return np.array(centres)  # (18, 3)


def bumpy_sphere(subdivisions: int, radius: float = 0.5, height: float = 0.1, width: float = 0.04) -> trimesh.Trimesh:
    """Icosphere whose radius along unit direction d is radius * (1 + height * sum_j exp((d . c_j - 1) / width))."""
    sphere = trimesh.creation.icosphere(subdivisions=subdivisions)
    d = sphere.vertices / np.linalg.norm(sphere.vertices, axis=1, keepdims=True)  # (V, 3)
    r = radius * (1.0 + height * np.exp((d @ bump_centres().T - 1.0) / width).sum(-1))  # (V,)
    return trimesh.Trimesh(d * r[:, None], sphere.faces, process=False)


def render_maps(mesh: trimesh.Trimesh, camera) -> tuple[list[Image.Image], list[Image.Image]]:
    """The six normal maps (RGB = (n + 1) / 2, white background) and masks of `mesh`, as the multiview stage gives."""
    from t2mv import view_refine as vr

    size = camera.image_size
    x = torch.from_numpy(np.asarray(mesh.vertices, dtype=np.float32))  # (V, 3)
    topo = vr.mesh_topology(torch.from_numpy(np.asarray(mesh.faces, dtype=np.int64)), len(x))
    vis = vr.visibility(x, topo, camera, size)
    with torch.no_grad():
        normal, _ = vr.render(x, topo, camera, vis).images()  # (6, S * S, 3)
    hard = vis.hard[..., None]  # (6, S * S, 1)
    rgb = torch.where(hard, ((normal + 1.0) / 2.0 * 255.0).round(), torch.full_like(normal, 255.0))
    rgb = rgb.clamp(0, 255).byte().reshape(6, size, size, 3).numpy()
    masks = (vis.hard.reshape(6, size, size).numpy() * 255).astype(np.uint8)
    return [Image.fromarray(a) for a in rgb], [Image.fromarray(m) for m in masks]


def marching_cubes_sphere(resolution: int, radius: float = 0.51) -> trimesh.Trimesh:
    """A sphere as TripoSR's mesh stage makes surfaces: the project's marching cubes over [-1, 1]^3 at `resolution`
    grid points per side (R=256: ~160k faces), outward faces."""
    from triposr.marching_cubes import marching_cubes

    axis = torch.linspace(-1.0, 1.0, resolution, dtype=torch.float64)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1)  # (R, R, R, 3)
    vertices, faces = marching_cubes(radius - grid.norm(dim=-1))  # level > 0 inside
    vertices = vertices.double() * (2.0 / (resolution - 1)) - 1.0  # (V, 3) grid index units -> [-1, 1]
    mesh = trimesh.Trimesh(vertices.numpy(), faces.numpy(), process=True)
    if mesh.volume < 0:
        mesh.invert()
    return mesh


def view_refine_cases(b, sizes) -> list:
    """Two cases, 200 iterations, 256² maps (tiny: 50, 128²): refine_mesh on a 20k-face sphere (tiny: 1.3k) and on a
    marching-cubes sphere at R=256 (~160k faces; tiny: R=64, ~10k)."""
    from t2mv.view_refine import refine_mesh
    from t2mv.view_texture import ViewCamera

    from .builders import Case

    real = b.mode == "real"
    gt_sub, start_sub, mc_resolution, size, iterations = (6, 5, 256, 256, 200) if real else (4, 3, 64, 128, 50)
    camera = ViewCamera(scale=1.4, center=(0.01, 0.02, -0.01), image_size=size)
    gt = b._get(f"view_refine_gt{gt_sub}", lambda: bumpy_sphere(gt_sub))
    normals, masks = b._get(f"view_refine_maps{gt_sub}-{size}", lambda: render_maps(gt, camera))
    # The budget case is 40k faces: the 2 px remesh of this sphere would hold ~60k, so it is capped there.
    max_faces = 40_000 if real else 60_000
    starts = {
        "icosphere": trimesh.creation.icosphere(subdivisions=start_sub, radius=0.51),
        "marching-cubes": b._get(f"view_refine_mc{mc_resolution}", lambda: marching_cubes_sphere(mc_resolution)),
    }

    def radial_error(mesh: trimesh.Trimesh) -> float:
        """Mean |radius - ground truth radius| over the vertices (both star-shaped about the origin)."""
        v = np.asarray(mesh.vertices)
        d = v / np.linalg.norm(v, axis=1, keepdims=True)
        r_gt = 0.5 * (1.0 + 0.1 * np.exp((d @ bump_centres().T - 1.0) / 0.04).sum(-1))
        return float(np.abs(np.linalg.norm(v, axis=1) - r_gt).mean())

    def case(kind: str, start: trimesh.Trimesh) -> Case:
        cpu = {}

        def run():
            t = time.process_time()
            result = refine_mesh(
                start, normals, masks, camera, iterations=iterations, device=b.device, max_faces=max_faces
            )
            cpu["s"] = time.process_time() - t  # on a shared machine: the CPU time this process got, all threads
            return result

        def describe(result) -> dict[str, Any]:
            return {
                "stage_timings_s": {k: round(v, 4) for k, v in result.timings.items()},
                "accepted": result.accepted,
                "warnings": list(result.warnings),
                "data_loss_initial": result.losses["initial"]["data"],
                "data_loss_final": result.losses.get("final", {}).get("data"),
                "rasterisations": result.losses.get("rasterisations"),
                "radial_error_start": radial_error(start),
                "radial_error_result": radial_error(result.mesh),
                "faces_fitted": [r["faces"] for r in result.losses.get("rounds", [])],
                "torch_threads": torch.get_num_threads(),
                "process_cpu_time_s": cpu.get("s"),
            }

        # The first name is the GPU goal's case (`benchmarks.gpu_check`: "k-face start").
        label = f"{len(start.faces) // 1000}k-face start" if kind == "icosphere" else (
            f"{len(start.faces) // 1000}k-face marching-cubes start (R={mc_resolution})"
        )  # fmt: skip
        return Case(
            "view_refine",
            f"view refine {label} (remeshed, ≤ {max_faces // 1000}k), {iterations} it, 6 × {size}² maps",
            {"start": kind, "faces": int(len(start.faces)), "max_faces": max_faces, "iterations": iterations,
             "view_size": size},
            run,
            describe=describe,
        )  # fmt: skip

    return [case(kind, start) for kind, start in starts.items()]
