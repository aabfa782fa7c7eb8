"""Mesh-stage speed cases (stage ``mesh-speed``): the levers of issue 10 side by side in one run.

- the mesh stage (field, marching cubes, vertex colours): dense grid vs coarse-to-fine (``method="sparse"``), both
  with torch marching cubes; the sparse case records whether its mesh equals the dense one (same triangles in the
  same order) or, if not, the symmetric Hausdorff distance between them in voxels, and how much it queried;
- marching cubes alone on one level grid: torch (on the field's device) vs PyMCubes (host, the previous default;
  the two give the same triangles);
- TripoSR forward in float32 vs half precision (autocast: float16 on CUDA, bfloat16 on CPU) and, on the CPU,
  float16 emulated (CUDA autocast numerics: see ``emulated_fp16``); each records the scene-code difference to
  float32 and the voxelised mesh IoU (occupancy of the level grid at the case's resolution) against float32.

``python -m benchmarks.run --stages mesh-speed --real --runs 2 --warmup 1 --out benchmarks/results/<name>.json``
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .builders import MESH_THRESHOLD, Builder, Case, Sizes, _tsr_modules
from .harness import max_diffs

FP16_MAX = 65504.0


def same_mesh(mesh, reference, voxel: float) -> dict[str, Any]:
    """Compare two trimesh meshes: identical triangles in the same order (vertex numbering free), else the
    symmetric Hausdorff distance between their vertex sets, in voxels."""
    tri = np.asarray(mesh.vertices, dtype=np.float64)[mesh.faces]  # (F, 3, 3)
    ref = np.asarray(reference.vertices, dtype=np.float64)[reference.faces]
    info: dict[str, Any] = {"faces": int(len(mesh.faces)), "reference_faces": int(len(reference.faces))}
    if tri.shape == ref.shape:
        diff = float(np.abs(tri - ref).max()) / voxel if len(tri) else 0.0
        info["max_vertex_diff_voxels"] = diff
        info["same_triangles"] = diff < 1e-3
        if info["same_triangles"]:
            info["hausdorff_voxels"] = diff
            return info
    else:
        info["same_triangles"] = False
    from scipy.spatial import cKDTree

    a, b = np.asarray(mesh.vertices), np.asarray(reference.vertices)
    d_ab = cKDTree(b).query(a)[0].max() if len(a) and len(b) else float("inf")
    d_ba = cKDTree(a).query(b)[0].max() if len(a) and len(b) else float("inf")
    info["hausdorff_voxels"] = float(max(d_ab, d_ba)) / voxel
    return info


def occupancy(model, scene_code: torch.Tensor, resolution: int) -> torch.Tensor:
    """Inside (density above the mesh threshold) at every point of the resolution^3 grid, (R, R, R) bool; the
    coarse-to-fine grid gives every point's side exactly where the surface is traced (see sparse_level_grid)."""
    from triposr.mesh import scene_code_query_fn, sparse_level_grid

    level, _ = sparse_level_grid(
        scene_code_query_fn(model, scene_code),
        radius=float(model.renderer.cfg.radius),
        resolution=resolution,
        threshold=MESH_THRESHOLD,
        chunk_size=2**18,
        device=scene_code.device,
    )
    return level > 0


def occupancy_iou(a: torch.Tensor, b: torch.Tensor) -> dict[str, Any]:
    union = int((a | b).sum())
    return {
        "mesh_iou": int((a & b).sum()) / union if union else 1.0,
        "voxels_inside": int(a.sum()),
        "voxels_flipped": int((a ^ b).sum()),
    }


@contextlib.contextmanager
def emulated_fp16(modules: list[torch.nn.Module]) -> Iterator[dict[str, float]]:
    """CUDA float16 autocast numerics on a CPU (whose float16 matmuls are ~100x slower than float32).

    Every ``nn.Linear`` / ``nn.Conv2d`` in ``modules`` computes with float16-rounded inputs, weight and bias,
    accumulates in float32 (as cuBLAS / cuDNN do) and returns a float16-rounded output; norms, softmax and the
    residual adds stay float32, as under autocast. Yields a dict whose "max_abs_output" is the largest |output|
    seen (float16 overflows above 65504).
    """
    stats = {"max_abs_output": 0.0}
    saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
    handles = []

    def pre_hook(module, args):
        return tuple(a.half().float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args)

    def post_hook(module, args, output):
        stats["max_abs_output"] = max(stats["max_abs_output"], float(output.detach().abs().max()))
        return output.half().float()

    try:
        for root in modules:
            for module in root.modules():
                if isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
                    for p in module.parameters(recurse=False):
                        saved.append((p, p.data))
                        p.data = p.data.half().float()
                    handles.append(module.register_forward_pre_hook(pre_hook))
                    handles.append(module.register_forward_hook(post_hook))
        yield stats
    finally:
        for h in handles:
            h.remove()
        for p, data in saved:
            p.data = data


def mesh_speed_cases(b: Builder, sizes: Sizes) -> list[Case]:
    from triposr.mesh import scene_code_query_fn, sparse_level_grid
    from triposr.system import HALF_DTYPES

    model = b.tsr()
    codes = b.scene_codes()  # (1, 3, C, H, W), float32
    res = sizes.chain_mc_resolution
    radius = float(model.renderer.cfg.radius)
    voxel = 2 * radius / (res - 1)
    state: dict[str, Any] = {}
    cases: list[Case] = []

    # Field evaluation + marching cubes (+ vertex colours): the whole mesh stage.
    for method, backend in (("dense", "torch"), ("sparse", "torch")):

        def run(method=method, backend=backend):
            return model.extract_mesh(
                codes, resolution=res, threshold=MESH_THRESHOLD, has_vertex_color=True, method=method, backend=backend
            )[0]

        def describe(mesh, key=(method, backend)):
            if key == ("dense", "torch"):
                state["dense"] = mesh
            reference = state.get("dense")
            info = {"vertices": int(len(mesh.vertices)), "faces": int(len(mesh.faces))}
            if reference is not None and key != ("dense", "torch"):
                info["vs_dense_torch"] = same_mesh(mesh, reference, voxel)
            if key[0] == "sparse":
                _, counts = sparse_level_grid(
                    scene_code_query_fn(model, codes[0]),
                    radius=radius,
                    resolution=res,
                    threshold=MESH_THRESHOLD,
                    chunk_size=2**18,
                    device=codes.device,
                )
                info["sparse"] = counts
            return info

        cases.append(
            Case(
                "mesh-speed",
                f"mesh R={res} {method} field, {backend} marching cubes, vertex colours",
                {"resolution": res, "method": method, "backend": backend, "threshold": MESH_THRESHOLD},
                run,
                {"decoder": model.decoder},
                describe=describe,
            )
        )

    # Marching cubes alone, on one level grid (the coarse-to-fine one: the same triangles as the dense grid's),
    # built here so that no timed call includes it.
    with torch.no_grad():
        level, _ = sparse_level_grid(
            scene_code_query_fn(model, codes[0]),
            radius=radius,
            resolution=res,
            threshold=MESH_THRESHOLD,
            chunk_size=2**18,
            device=codes.device,
        )

    def mc_torch():
        from triposr.marching_cubes import marching_cubes

        return marching_cubes(level)

    def mc_pymcubes():
        import mcubes

        return mcubes.marching_cubes(level.cpu().numpy(), 0.0)  # the host copy is part of its cost

    for name, fn in (("torch", mc_torch), ("pymcubes", mc_pymcubes)):
        cases.append(
            Case(
                "mesh-speed",
                f"marching cubes only R={res}: {name}",
                {"resolution": res, "backend": name, "device": str(codes.device)},
                fn,
                describe=lambda r: {"faces": int(len(r[1]))},
            )
        )

    # TripoSR forward: float32 vs half precision.
    image = b.tsr_image()
    half = HALF_DTYPES.get(b.device.type)
    variants: list[tuple[str, Any]] = [
        ("float32", False),
        (f"half ({str(half).removeprefix('torch.')} autocast)", half),
    ]
    if b.device.type == "cpu":
        variants.append(("float16 emulated (CUDA autocast numerics)", "emulated"))
    for label, choice in variants:

        def forward(choice=choice):
            saved = model.half_precision
            model.half_precision = False if choice == "emulated" else choice
            try:
                if choice == "emulated":
                    with emulated_fp16([model.image_tokenizer, model.backbone]) as stats:
                        out = model([image], device=b.device)
                    state["emulated_max_abs"] = stats["max_abs_output"]
                    return out
                return model([image], device=b.device)
            finally:
                model.half_precision = saved

        def describe(out, choice=choice):
            # The fp32 reference is the builder's scene code (the benchmark's density calibration was made on it).
            info: dict[str, Any] = {"scene_code_vs_float32": max_diffs(out.float(), codes)}
            if choice is not False:
                if "occupancy" not in state:
                    state["occupancy"] = occupancy(model, codes[0], res)
                info["vs_float32"] = occupancy_iou(occupancy(model, out[0].float(), res), state["occupancy"])
                info["resolution"] = res
            if choice == "emulated":
                info["max_abs_linear_output"] = state.get("emulated_max_abs")
                info["float16_overflow"] = bool(state.get("emulated_max_abs", 0.0) > FP16_MAX)
            return info

        cases.append(
            Case(
                "mesh-speed",
                f"TripoSR forward {model.config.cond_image_size}², {label}",
                {"precision": label, "image_size": model.config.cond_image_size},
                forward,
                _tsr_modules(model),
                describe=describe,
            )
        )
    return cases
