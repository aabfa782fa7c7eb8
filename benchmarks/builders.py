"""What the benchmark cases are built from: the sizes each stage runs at (`Sizes`), one timed case (`Case`),
the synthetic inputs, and `Builder`, which builds each stage once at the tiny or the real architecture sizes (random
weights at the real shapes, from ``benchmarks.configs``).

A leaf of the benchmarks' case modules: ``stages`` (the registry) and ``mesh_speed``, ``view_refine``,
``view_texture`` (cases of their own) import it, and it imports none of them, so nothing imports in a circle.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from . import configs

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


def _tsr_modules(model) -> dict[str, torch.nn.Module]:
    return {
        "image_tokenizer": model.image_tokenizer,
        "backbone": model.backbone,
        "post_processor": model.post_processor,
        "decoder": model.decoder,
    }


def _mesh_info(mesh) -> dict[str, Any]:
    return {"vertices": int(len(mesh.vertices)), "faces": int(len(mesh.faces))}
