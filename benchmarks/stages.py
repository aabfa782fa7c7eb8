"""Benchmark cases: the stages at tiny size (the stages' own ``tiny()`` builders) or at the real architecture
sizes with random weights (built from ``benchmarks.configs``), plus the whole chain.

Each :class:`Case` is one timed callable with the modules whose calls are logged (for FLOPs and the call
pattern), how to pull a comparable tensor out of its result (for the dtype / attention / compile variants) and
how to describe its result (mesh sizes, file sizes, the chain's own stage timings).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from . import configs

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
PROMPT = "a photo of a red ceramic teapot on a wooden table, studio lighting"
MESH_THRESHOLD = 25.0


@dataclass
class Sizes:
    """What each stage runs at; ``tiny`` and ``real`` presets, each overridable from the command line."""

    t2i_size: int
    t2i_steps: tuple[int, ...]
    t2i_guidance: float
    mv_steps: tuple[int, ...]
    mv_guidance: float
    mc_resolutions: tuple[int, ...]
    texture_mc_resolution: int
    texture_sizes: tuple[int, ...]
    export_formats: tuple[str, ...]
    chain_mc_resolution: int

    @classmethod
    def preset(cls, mode: str) -> Sizes:
        if mode == "tiny":
            return cls(64, (4, 8), 4.5, (4, 8), 1.0, (32, 64), 32, (512,), ("glb", "obj", "ply"), 32)
        if mode == "real":
            return cls(512, (4, 8), 4.5, (4, 8), 1.0, (128, 256, 512), 256, (1024, 2048), ("glb", "obj", "ply"), 256)
        raise ValueError(f"mode must be 'tiny' or 'real', got {mode!r}")


@dataclass
class Case:
    stage: str
    name: str
    params: dict[str, Any]
    fn: Callable[[], Any]
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)
    output: Callable[[Any], torch.Tensor] | None = None  # comparable tensor, for the variant checks
    describe: Callable[[Any], dict[str, Any]] | None = None  # sizes etc. of a result
    variant_target: Any = None  # the object the variants (dtype, attention, compile) are applied to


# --------------------------------------------------------------------------------------------- inputs


def object_image(size: int, background: tuple[int, int, int]) -> Image.Image:
    """A synthetic object: a shaded disc and a box on a plain background (what the preprocessors produce)."""
    image = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(image)
    s = size / 256
    draw.ellipse((60 * s, 50 * s, 196 * s, 186 * s), fill=(200, 60, 40))
    draw.rectangle((90 * s, 150 * s, 166 * s, 214 * s), fill=(60, 90, 170))
    return image


# --------------------------------------------------------------------------------------------- builders


class Builder:
    """Builds each stage once (lazily) at the requested mode, device and dtype; ``release`` frees one."""

    def __init__(self, mode: str, device: torch.device, dtype: torch.dtype, seed: int = 0):
        if mode not in ("tiny", "real"):
            raise ValueError(f"mode must be 'tiny' or 'real', got {mode!r}")
        self.mode = mode
        self.device = device
        self.dtype = dtype
        self.seed = seed
        self._cache: dict[str, Any] = {}
        self._scratch = tempfile.TemporaryDirectory(prefix="t2mv-bench-")
        self.scratch = Path(self._scratch.name)

    def release(self, *names: str) -> None:
        for name in names:
            self._cache.pop(name, None)

    def close(self) -> None:
        self._cache.clear()
        self._scratch.cleanup()

    def keep(self, name: str, value: Any) -> None:
        self._cache[name] = value

    def _get(self, name: str, build: Callable[[], Any]) -> Any:
        if name not in self._cache:
            self._cache[name] = build()
        return self._cache[name]

    # text to image ------------------------------------------------------------------------------------------
    def t2i(self):
        return self._get("t2i", self._build_t2i)

    def _build_t2i(self):
        from t2mv.text_to_image import TextToImage

        if self.mode == "tiny":
            t2i = TextToImage.tiny(seed=self.seed)
        else:
            from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
            from diffusers.models.attention_processor import AttnProcessor2_0
            from transformers import CLIPTextConfig, CLIPTextModel

            from t2mv.perflow.scheduler import PeRFlowScheduler

            tokenizer = configs.standin_clip_tokenizer(self.scratch / "tokenizer")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                text_encoder = CLIPTextModel(CLIPTextConfig(**configs.CLIP_L_TEXT)).eval()
                unet = UNet2DConditionModel(**configs.SD15_UNET).eval()
                vae = AutoencoderKL(**configs.SD_VAE).eval()
            pipe = StableDiffusionPipeline(
                vae=vae,
                text_encoder=text_encoder,
                tokenizer=tokenizer,
                unet=unet,
                scheduler=PeRFlowScheduler(**configs.PERFLOW_SCHEDULER),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
            pipe.unet.set_attn_processor(AttnProcessor2_0())
            pipe.vae.set_attn_processor(AttnProcessor2_0())
            pipe.set_progress_bar_config(disable=True)
            t2i = TextToImage(pipe, settings={"model": "random weights, SD1.5 architecture"}, default_size=512)
        t2i.pipe.to(self.device, self.dtype)
        return t2i

    # multiview ----------------------------------------------------------------------------------------------
    def multiview(self):
        return self._get("multiview", self._build_multiview)

    def _build_multiview(self):
        from wonder3d_perflow import MultiviewPipeline

        if self.mode == "tiny":
            pipe = MultiviewPipeline.tiny(seed=self.seed)
        else:
            from diffusers import AutoencoderKL
            from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

            from t2mv.perflow.scheduler import PeRFlowScheduler
            from wonder3d_perflow.pipeline import clip_feature_extractor
            from wonder3d_perflow.unet_mv2d import UNetMV2DConditionModel

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                unet = UNetMV2DConditionModel.from_config(configs.WONDER3D_UNET).eval()
                vae = AutoencoderKL(**{**configs.SD_VAE, "sample_size": 256}).eval()
                image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(**configs.CLIP_L_VISION)).eval()
            feature_extractor = clip_feature_extractor(224)
            pipe = MultiviewPipeline(
                vae=vae,
                image_encoder=image_encoder,
                feature_extractor=feature_extractor,
                unet=unet,
                scheduler=PeRFlowScheduler(**configs.PERFLOW_SCHEDULER),
            )
        pipe.set_progress_bar_config(disable=True)
        pipe.to(self.device, self.dtype)
        return pipe

    # TripoSR ------------------------------------------------------------------------------------------------
    def tsr(self):
        return self._get("tsr", self._build_tsr)

    def _build_tsr(self):
        from triposr import TSR

        if self.mode == "tiny":
            model = TSR.tiny(seed=self.seed)
        else:
            from triposr.config import TSRConfig

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                model = TSR(TSRConfig.from_dict(configs.TRIPOSR)).eval()
                smooth_triplane_embeddings(model)
        # TripoSR runs in float32 in the chain (density threshold and marching cubes are tuned for it).
        model = model.to(self.device)
        if self.mode == "real":
            # Calibrating changes the decoder only, so the scene code it needs is kept for the mesh stages.
            with torch.no_grad():
                codes = model([object_image(model.config.cond_image_size, (127, 127, 127))], device=self.device)
            calibrate_density(model, codes[0])
            self._cache["scene_codes"] = codes
        return model

    def tsr_image(self) -> Image.Image:
        return object_image(self.tsr().config.cond_image_size, (127, 127, 127))

    def scene_codes(self) -> torch.Tensor:
        model = self.tsr()  # (real mode: builds and caches the scene code too)

        def build():
            with torch.no_grad():
                return model([self.tsr_image()], device=self.device)  # (1, 3, C, H, W)

        return self._get("scene_codes", build)

    def mesh(self, resolution: int, textured_size: int | None = None):
        def build():
            mesh = self.tsr().extract_mesh(
                self.scene_codes(), resolution=resolution, threshold=MESH_THRESHOLD, has_vertex_color=True
            )[0]
            if textured_size is None:
                return mesh
            from triposr.texture import bake_texture

            with torch.no_grad():
                return bake_texture(self.tsr(), self.scene_codes()[0], mesh, texture_size=textured_size)

        return self._get(f"mesh{resolution}-{textured_size}", build)


@torch.no_grad()
def smooth_triplane_embeddings(model) -> None:
    """Make a random-weight TripoSR produce an object-like (smooth) field instead of per-token noise.

    The learned triplane tokens (3, C, P, P) get low-frequency values (a few random cosines of the plane
    coordinates per channel); with everything downstream random but smooth in its input, the density field is
    then a blob rather than noise, so marching cubes, vertex colours and baking see object-sized surfaces.
    Only values change, never shapes, so timing and FLOPs are those of the real model.
    """
    emb = model.tokenizer.embeddings  # (3, C, P, P)
    planes, channels, p, _ = emb.shape
    axis = torch.linspace(-1, 1, p)
    u, v = torch.meshgrid(axis, axis, indexing="ij")  # (P, P)
    freq = torch.randint(0, 3, (planes, channels, 2, 2)).float() * math.pi / 2  # (3, C, 2 terms, (fu, fv))
    phase = torch.rand(planes, channels, 2) * 2 * math.pi
    field = torch.zeros(planes, channels, p, p)
    for term in range(2):
        fu = freq[:, :, term, 0, None, None]
        fv = freq[:, :, term, 1, None, None]
        field += torch.cos(fu * u + fv * v + phase[:, :, term, None, None])
    field += 1.5 * (1 - (u**2 + v**2))  # a common radial bump: the same "object" on every plane
    emb.copy_((field - field.mean()) / field.std().clamp_min(1e-6))
    # The 2x upsampling transposed conv gives each of the 4 output pixels of a token its own random weights,
    # a checkerboard at the plane's full resolution; sharing one tap makes it a smooth (nearest) upsampling.
    for module in model.post_processor.modules():
        if isinstance(module, torch.nn.ConvTranspose2d):
            module.weight.copy_(module.weight[..., :1, :1].clone().expand_as(module.weight))


@torch.no_grad()
def calibrate_density(model, scene_code: torch.Tensor, *, above_fraction: float = 0.08, grid: int = 24) -> None:
    """Rescale the density row of the decoder's last layer so that ``above_fraction`` of the box lies above the
    mesh threshold for ``scene_code`` (3, C, H, W) (random weights give densities far below it: empty meshes)."""
    radius = float(model.renderer.cfg.radius)
    axis = torch.linspace(-radius, radius, grid)
    points = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1)  # (g, g, g, 3)
    raw = model.query_triplane(scene_code, points)["density"].flatten().float()  # (g³,)
    last = model.decoder.layers[-1]
    scale = 3.0 / raw.std().clamp_min(1e-6)
    last.weight[0] *= scale
    last.bias[0] *= scale
    target = math.log(MESH_THRESHOLD) - float(model.renderer.cfg.density_bias)
    last.bias[0] += target - torch.quantile(raw * scale, 1.0 - above_fraction)


# --------------------------------------------------------------------------------------------- cases


def recalibrate_per_call(tsr) -> None:
    """Random weights: the density level depends on the input image, so a chain's own mesh input could give an
    empty (or full) grid at the fixed threshold. Re-calibrate the decoder on every scene code the model produces
    (a 24³ query, milliseconds) so the chain's mesh is object-sized like the mesh stage's."""
    forward = tsr.forward

    def calibrated_forward(*args, **kwargs):
        codes = forward(*args, **kwargs)
        with torch.no_grad():
            calibrate_density(tsr, codes[0])
        return codes

    tsr.forward = calibrated_forward


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


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


def _tsr_modules(model) -> dict[str, torch.nn.Module]:
    return {
        "image_tokenizer": model.image_tokenizer,
        "backbone": model.backbone,
        "post_processor": model.post_processor,
        "decoder": model.decoder,
    }


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


def _mesh_info(mesh) -> dict[str, Any]:
    return {"vertices": int(len(mesh.vertices)), "faces": int(len(mesh.faces))}


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


def mesh_speed_cases(b: Builder, sizes: Sizes) -> list[Case]:
    from .mesh_speed import mesh_speed_cases as cases  # imports this module: loaded on use

    return cases(b, sizes)


def view_refine_cases(b: Builder, sizes: Sizes) -> list[Case]:
    from .view_refine import view_refine_cases as cases  # imports this module: loaded on use

    return cases(b, sizes)


def view_texture_cases(b: Builder, sizes: Sizes) -> list[Case]:
    from .view_texture import view_texture_cases as cases  # imports this module: loaded on use

    return cases(b, sizes)


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
