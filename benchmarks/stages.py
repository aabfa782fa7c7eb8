"""Benchmark cases: the stages at tiny size (the stages' own ``tiny()`` builders) or at the real architecture
sizes with random weights (built from ``benchmarks.configs``), plus the whole chain.

Each :class:`Case` is one timed callable with the modules whose calls are logged (for FLOPs and the call
pattern), how to pull a comparable tensor out of its result (for the dtype / attention / compile variants) and
how to describe its result (mesh sizes, file sizes, the chain's own stage timings).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .builders import (  # noqa: F401  (re-exported: the cases' building blocks were defined here before)
    MESH_THRESHOLD,
    PROMPT,
    Builder,
    Case,
    Sizes,
    _generator,
    _mesh_info,
    _tsr_modules,
    calibrate_density,
    object_image,
    recalibrate_per_call,
    smooth_triplane_embeddings,
)
from .mesh_speed import mesh_speed_cases
from .view_refine import view_refine_cases
from .view_texture import view_texture_cases

STAGES = (
    "t2i",
    "multiview",
    "triposr",
    "mesh",
    "texture",
    "export",
    "chain",
    "mesh-speed",
    "view_texture",
    "view_refine",
)

# --------------------------------------------------------------------------------------------- cases


def t2i_cases(b: Builder, sizes: Sizes) -> list[Case]:
    t2i = b.t2i()
    pipe = t2i.pipe
    modules = {"text_encoder": pipe.text_encoder, "unet": pipe.unet, "vae.decoder": pipe.vae.decoder}
    cases = []
    for steps in sizes.t2i_steps:

        def run(steps=steps):
            return t2i(
                PROMPT,
                num_inference_steps=steps,
                guidance_scale=sizes.t2i_guidance,
                height=sizes.t2i_size,
                width=sizes.t2i_size,
                generator=_generator(),
                output_type="pt",
            )

        cases.append(
            Case(
                "t2i",
                f"t2i {sizes.t2i_size}² {steps} steps CFG {sizes.t2i_guidance}",
                {"size": sizes.t2i_size, "steps": steps, "guidance_scale": sizes.t2i_guidance, "batch": 1},
                run,
                modules,
                output=lambda r: torch.as_tensor(np.asarray(r.images) if not torch.is_tensor(r.images) else r.images),
                variant_target=pipe,
            )
        )
    return cases


def multiview_cases(b: Builder, sizes: Sizes) -> list[Case]:
    pipe = b.multiview()
    size = int(pipe.unet.config.sample_size * pipe.vae_scale_factor)
    image = object_image(size, (255, 255, 255))
    modules = {
        "image_encoder": pipe.image_encoder,
        "vae.encoder": pipe.vae.encoder,
        "unet": pipe.unet,
        "vae.decoder": pipe.vae.decoder,
    }
    cases = []
    for steps in sizes.mv_steps:

        def run(steps=steps):
            return pipe(
                image,
                num_inference_steps=steps,
                guidance_scale=sizes.mv_guidance,
                generator=_generator(),
                output_type="pt",
            )

        cases.append(
            Case(
                "multiview",
                f"multiview {size}² {steps} passes CFG {sizes.mv_guidance}",
                {"size": size, "steps": steps, "guidance_scale": sizes.mv_guidance, "views": 2 * pipe.num_views},
                run,
                modules,
                output=lambda r: torch.cat([r.normals_tensor, r.colors_tensor]),
                variant_target=pipe,
            )
        )
    return cases


def triposr_cases(b: Builder, sizes: Sizes) -> list[Case]:
    model = b.tsr()
    image = b.tsr_image()
    return [
        Case(
            "triposr",
            f"TripoSR forward {model.config.cond_image_size}²",
            {"image_size": model.config.cond_image_size, "batch": 1},
            lambda: model([image], device=b.device),
            _tsr_modules(model),
            output=lambda r: r,
            variant_target=model,
        )
    ]


def mesh_cases(b: Builder, sizes: Sizes) -> list[Case]:
    model = b.tsr()
    codes = b.scene_codes()
    cases = []
    for res in sizes.mc_resolutions:

        def run(res=res):
            mesh = model.extract_mesh(codes, resolution=res, threshold=MESH_THRESHOLD, has_vertex_color=True)[0]
            b.keep(f"mesh{res}-None", mesh)  # the texture and export stages reuse it
            return mesh

        cases.append(
            Case(
                "mesh",
                f"mesh R={res} + vertex colors",
                {"resolution": res, "threshold": MESH_THRESHOLD, "vertex_colors": True, "grid_points": res**3},
                run,
                {"decoder": model.decoder},
                describe=_mesh_info,
            )
        )
    return cases


def texture_cases(b: Builder, sizes: Sizes) -> list[Case]:
    from triposr.texture import bake_texture

    model = b.tsr()
    code = b.scene_codes()[0]
    mesh = b.mesh(sizes.texture_mc_resolution)
    cases = []
    for tex in sizes.texture_sizes:

        def run(tex=tex):
            with torch.no_grad():
                textured = bake_texture(model, code, mesh, texture_size=tex)
            b.keep(f"mesh{sizes.texture_mc_resolution}-{tex}", textured)  # the export stage reuses it
            return textured

        cases.append(
            Case(
                "texture",
                f"texture bake {tex}² (mesh R={sizes.texture_mc_resolution})",
                {"texture_size": tex, "mesh_resolution": sizes.texture_mc_resolution, **_mesh_info(mesh)},
                run,
                {"decoder": model.decoder},
                describe=_mesh_info,
            )
        )
    return cases


def export_cases(b: Builder, sizes: Sizes) -> list[Case]:
    from triposr.export import export_mesh

    res = sizes.texture_mc_resolution
    meshes = {"vertex colors": b.mesh(res), f"texture {sizes.texture_sizes[0]}²": b.mesh(res, sizes.texture_sizes[0])}
    out_dir = b.scratch / "export"
    cases = []
    for label, mesh in meshes.items():
        for fmt in sizes.export_formats:
            if fmt == "ply" and label.startswith("texture"):
                continue  # PLY keeps vertex colours only
            path = out_dir / f"{label.split()[0]}.{fmt}"

            def run(mesh=mesh, path=path):
                return export_mesh(mesh, path)

            def describe(files):
                return {"bytes": int(sum(Path(f).stat().st_size for f in files)), "files": len(files)}

            cases.append(
                Case(
                    "export",
                    f"export .{fmt} ({label}, R={res})",
                    {"format": fmt, "mesh": label, "mesh_resolution": res, **_mesh_info(mesh)},
                    run,
                    describe=describe,
                )
            )
    return cases


def chain_cases(b: Builder, sizes: Sizes) -> list[Case]:
    from t2mv.chain import TINY_DEFAULTS, ChainDefaults, TextTo3D
    from t2mv.tiny import FakeRembgSession

    t2i, mv, tsr = b.t2i(), b.multiview(), b.tsr()
    base = TINY_DEFAULTS if b.mode == "tiny" else ChainDefaults()
    defaults = ChainDefaults(
        **{
            **base.__dict__,
            "height": sizes.t2i_size,
            "width": sizes.t2i_size,
            "t2i_steps": sizes.t2i_steps[0],
            "t2i_guidance": sizes.t2i_guidance,
            "mv_steps": sizes.mv_steps[0],
            "mv_guidance": sizes.mv_guidance,
            "mc_resolution": sizes.chain_mc_resolution,
        }
    )
    if b.mode == "real" and "forward" not in tsr.__dict__:
        recalibrate_per_call(tsr)
    chain = TextTo3D(t2i, mv, tsr, device=b.device, dtype=b.dtype, rembg_session=FakeRembgSession(), defaults=defaults)
    modules = {
        "text_encoder": t2i.pipe.text_encoder,
        "t2i.unet": t2i.pipe.unet,
        "t2i.vae.decoder": t2i.pipe.vae.decoder,
        "image_encoder": mv.image_encoder,
        "mv.vae.encoder": mv.vae.encoder,
        "mv.unet": mv.unet,
        "mv.vae.decoder": mv.vae.decoder,
        **{f"tsr.{k}": v for k, v in _tsr_modules(tsr).items()},
    }

    def describe(result) -> dict[str, Any]:
        info = {"stage_timings_s": dict(result.timings), "memory_gib": dict(result.memory)}
        if result.mesh is not None:
            info.update(_mesh_info(result.mesh))
        # Random multiview weights draw noise views: record whether they textured the mesh or fell back to the field.
        info["texture_source"] = result.settings.get("texture_source")
        info["view_texture"] = result.info.get("view_texture")
        return info

    return [
        Case(
            "chain",
            f"chain text→{sizes.t2i_size}² ({sizes.t2i_steps[0]} steps) →12 views ({sizes.mv_steps[0]}) "
            f"→mesh R={sizes.chain_mc_resolution}",
            {
                "t2i_steps": sizes.t2i_steps[0],
                "t2i_size": sizes.t2i_size,
                "mv_steps": sizes.mv_steps[0],
                "mc_resolution": sizes.chain_mc_resolution,
                "texture": False,
                "background_removal": "weightless stand-in (FakeRembgSession): rembg's u2net is not timed",
                "density_recalibrated_per_run": b.mode == "real",
            },
            lambda: chain(PROMPT, seed=0),
            modules,
            describe=describe,
        )
    ]


CASE_BUILDERS: dict[str, Callable[[Builder, Sizes], list[Case]]] = {
    "t2i": t2i_cases,
    "multiview": multiview_cases,
    "triposr": triposr_cases,
    "mesh": mesh_cases,
    "texture": texture_cases,
    "export": export_cases,
    "chain": chain_cases,
    "mesh-speed": mesh_speed_cases,
    "view_texture": view_texture_cases,
    "view_refine": view_refine_cases,
}

# Which built objects each stage uses (so the runner can free them once no later stage needs them).
USES: dict[str, tuple[str, ...]] = {
    "t2i": ("t2i",),
    "multiview": ("multiview",),
    "triposr": ("tsr",),
    "mesh": ("tsr",),
    "texture": ("tsr",),
    "export": ("tsr",),
    "chain": ("t2i", "multiview", "tsr"),
    "mesh-speed": ("tsr",),
    "view_texture": (),
    "view_refine": (),
}
