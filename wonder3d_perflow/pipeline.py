"""`MultiviewPipeline`: one condition image → 6 normal maps + 6 color images (Wonder3D v1.0, PeRFlow-accelerated).

Per call the UNet sees a batch of 12 items, ``[6 normals | 6 colors]`` in the view order of
`cameras.VIEW_NAMES`, or 24 with classifier-free guidance in upstream's fixed order
``[normal-uncond, normal-cond, color-uncond, color-cond]``. Each item gets:

- 8 input channels: its noisy latent and the VAE latent (distribution mode × scaling factor) of the condition;
- one cross-attention token: the CLIP image embedding (`image_encoder(...).image_embeds`);
- `class_labels`: the 10-d camera/domain embedding (`cameras.camera_embedding`).

The unconditional branch zeroes both the CLIP token and the condition latent (Wonder3D's training dropout). The
condition is encoded once and repeated; upstream encodes the same image 12 times, which gives the same numbers.

Schedulers: PeRFlow (`diff_eps`, 4 time windows; the default, with the SD1.5 PeRFlow ΔW merged into the UNet) or
the checkpoint's own DDIM. PeRFlow needs one UNet pass per window at least: 4 passes by default. Upstream's "one
step" demo asks for 1 step and silently runs 4; we raise instead of rounding up.

Normals: RGB = (n + 1) / 2 of unit normals in the **front (input) camera's frame** for all six views, OpenGL axes
(x right, y up, z towards the viewer); they do not rotate with each view's camera.
"""

from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline
from diffusers.utils import randn_tensor
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from t2mv.accel import CompiledRun, enable_compile_on, preferred_sdpa, run_compile_warm_up
from t2mv.perflow.hub import MissingWeightsError, resolve_pretrained
from t2mv.perflow.scheduler import PeRFlowScheduler

from .cameras import VIEW_NAMES, camera_embedding
from .unet_mv2d import UNetMV2DConditionModel, load_weights_file

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "flamehaze1115/wonder3d-v1.0"
DEFAULT_DELTA = "hansyan/perflow-sd15-delta-weights"
SCHEDULERS = ("perflow", "ddim")
# The PeRFlow SD1.5 ΔW was trained with 4 time windows; other counts are experimental.
TRAINED_TIME_WINDOWS = 4
COMPONENTS = ("unet", "vae", "image_encoder", "feature_extractor", "scheduler")


@dataclass
class MultiviewOutput:
    """Six normals and six colors, each in the order of `view_names`.

    `normals` / `colors` are PIL images (empty lists when ``output_type="pt"``); `normals_tensor` /
    `colors_tensor` are (6, 3, H, W) float32 CPU tensors in [0, 1]. Normals are in the front camera's frame,
    OpenGL axes (see the module docstring).
    """

    normals: list[Image.Image]
    colors: list[Image.Image]
    normals_tensor: torch.Tensor
    colors_tensor: torch.Tensor
    view_names: tuple[str, ...] = VIEW_NAMES
    timings: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)


class MultiviewPipeline(DiffusionPipeline):
    """Wonder3D image → multiview normals and colors, with PeRFlow or DDIM sampling.

    Build with `MultiviewPipeline.from_pretrained(...)` (real weights) or `MultiviewPipeline.tiny()` (random tiny
    components for smoke tests), or pass the components yourself.
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        image_encoder: CLIPVisionModelWithProjection,
        feature_extractor: CLIPImageProcessor,
        unet: UNetMV2DConditionModel,
        scheduler: PeRFlowScheduler | DDIMScheduler,
    ):
        super().__init__()
        self.register_modules(
            vae=vae, image_encoder=image_encoder, feature_extractor=feature_extractor, unet=unet, scheduler=scheduler
        )
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.num_views = unet.config.num_views
        # Views decoded per VAE call (None: all 12 at once). The decoder's activations at 256² dominate the stage's
        # peak memory beside the weights (~0.2 GB per view in float32), so a memory-bound caller decodes fewer at a time.
        self.decode_batch_size: int | None = None
        # Low-memory callers that build the pipeline for one call: once the condition is encoded, the CLIP image
        # encoder (1.2 GB in float32) and the VAE encoder are moved to the meta device, freeing their memory for the
        # denoising loop. The pipeline cannot encode again afterwards.
        self.release_encoders_after_use = False
        # What the loader did (repo, revision, ΔW report); copied into every output's settings.
        self.load_settings: dict[str, Any] = {}
        self.delta_report = None
        self._compiled: CompiledRun | None = None

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        repo_or_path: str | Path = DEFAULT_MODEL,
        *,
        delta: str | Path | None = DEFAULT_DELTA,
        delta_variant: str | None = "v0-1",
        scheduler: str = "perflow",
        torch_dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        revision: str | None = None,
        local_files_only: bool | None = None,
        num_time_windows: int = TRAINED_TIME_WINDOWS,
    ) -> MultiviewPipeline:
        """Load Wonder3D component by component from a checkpoint folder or hub id, then merge the PeRFlow ΔW.

        Not `DiffusionPipeline.from_pretrained`: the checkpoint's `model_index.json` names upstream's Python
        module for the UNet. Each component loads strictly (UNet and VAE: every key, `strict=True`; CLIP:
        transformers' loader, with any missing, unexpected or mismatched key an error).

        Args:
            repo_or_path: Wonder3D diffusers folder (unet/, vae/, image_encoder/, feature_extractor/, scheduler/)
                or hub id. Pin `revision` for reproducible downloads.
            delta: SD1.5 PeRFlow ΔW (hub id or folder), merged into every SD-named UNet key of equal shape
                (`conv_in.weight`, 8 input channels here, and the Wonder3D-only keys are left as they are); the
                report is logged and kept in `pipe.delta_report`. `None` keeps the original Wonder3D UNet.
            delta_variant: variant of the ΔW files (`diffusion_pytorch_model.<variant>.safetensors`).
            scheduler: ``"perflow"`` (PeRFlow, `diff_eps`, from the checkpoint's DDIM config) or ``"ddim"``.
            torch_dtype / device: where the pipeline runs (float16 on CUDA for speed; float32 on CPU).
            revision: hub revision (branch, tag or commit) of `repo_or_path`.
            local_files_only: never download; `None` follows ``HF_HUB_OFFLINE``.
            num_time_windows: PeRFlow windows. 4 (trained); 1 is an experimental single-pass mode.

        Raises:
            t2mv.perflow.hub.MissingWeightsError: weights not found (names the repo and the fix).
        """
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}.")
        root = resolve_pretrained(
            repo_or_path,
            allow_patterns=[f"{name}/*" for name in COMPONENTS],
            revision=revision,
            local_files_only=local_files_only,
        )
        for name in COMPONENTS:
            if not (root / name).is_dir():
                raise MissingWeightsError(
                    str(repo_or_path), f"the `{name}/` folder is missing in {root} (expected a Wonder3D checkpoint)"
                )

        delta_weights = None
        if delta is not None:  # fetched first, so that a missing ΔW fails before the 1.8 GB UNet loads
            from t2mv.perflow.delta import load_delta_weights

            # lazy: read one ΔW tensor at a time while merging (the whole 1.7 GB ΔW never sits in RAM)
            delta_weights = load_delta_weights(
                delta, variant=delta_variant, local_files_only=local_files_only, lazy=True
            )

        # The UNet last: it is read one tensor at a time (no transient beyond one tensor), while transformers'
        # loader briefly holds the CLIP file's pages next to its fp32 copy; this order keeps the load's peak at the
        # three models' own size (--low-memory).
        image_encoder = _load_image_encoder(root / "image_encoder", torch_dtype)
        vae = _load_vae(root / "vae", torch_dtype)
        unet = UNetMV2DConditionModel.from_pretrained(root, subfolder="unet", torch_dtype=torch_dtype)
        feature_extractor = CLIPImageProcessor.from_pretrained(root / "feature_extractor")
        ddim = DDIMScheduler.from_pretrained(root, subfolder="scheduler")
        sampler = ddim if scheduler == "ddim" else _perflow_from(ddim.config, num_time_windows)

        delta_report = None
        if delta_weights is not None:
            # Tolerant merge, as upstream's Wonder3D app; we keep the report on the pipeline and log it once.
            delta_report = _merge_and_log(unet, delta_weights, delta)

        pipe = cls(
            vae=vae, image_encoder=image_encoder, feature_extractor=feature_extractor, unet=unet, scheduler=sampler
        )
        pipe.delta_report = delta_report
        pipe.load_settings = {
            "model": str(repo_or_path),
            "revision": revision,
            "delta": None if delta is None else str(delta),
            "delta_variant": delta_variant if delta is not None else None,
            "delta_summary": None if delta_report is None else delta_report.summary(),
        }
        pipe.to(device)
        if torch.device(device).type == "cuda":
            pipe.enable_xformers_if_available()
        return pipe

    def enable_compile(self, *, mode: str | None = None, backend: str = "inductor") -> bool:
        """Opt-in compiled mode: ``torch.compile`` the UNet and the VAE decoder with static shapes.

        Compiled once per process and shape: the first call with (or without) guidance runs an untimed warm-up
        call that compiles, reported as ``timings["compile"]``; later calls reuse it. Without a compiler (CPU
        inductor needs g++, CUDA needs Triton) or when compilation fails, one warning is logged and the pipeline
        runs eagerly.

        Args:
            mode: torch.compile mode (None = inductor's default; ``"reduce-overhead"`` adds CUDA graphs on CUDA).
            backend: torch.compile backend (``"inductor"``; ``"eager"`` only captures graphs, for tests).

        Returns:
            True when compiled mode is on.
        """
        modules = {"unet": self.unet, "vae.decoder": self.vae.decoder}
        self._compiled = enable_compile_on(self, modules, self.device, backend=backend, mode=mode, logger_=logger)
        self.load_settings["compile"] = None if self._compiled is None else self._compiled.describe()
        return self._compiled is not None

    def disable_compile(self) -> None:
        """Back to eager calls (compiled code stays cached in this process for a later `enable_compile`)."""
        if self._compiled is not None:
            self._compiled.undo()
        self._compiled = None
        self.load_settings["compile"] = None

    def enable_xformers_if_available(self) -> bool:
        """Use xformers attention in the UNet when it is installed (CUDA only); SDPA otherwise. Returns whether."""
        import importlib.util

        if self.device.type != "cuda" or importlib.util.find_spec("xformers") is None:
            return False
        self.unet.enable_xformers_memory_efficient_attention()
        return True

    @classmethod
    def tiny(cls, seed: int = 0, *, scheduler: str = "perflow", num_time_windows: int = TRAINED_TIME_WINDOWS):
        """Tiny random components built in code (no files): 256² output in about a second on CPU.

        Smoke mode only: the output is noise from random weights. The UNet keeps every Wonder3D flag (6 views,
        joint attention, 8 input channels, 10-d camera embedding); attention runs at the 16² latent level only
        to stay cheap.
        """
        if scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}.")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            unet = UNetMV2DConditionModel(
                sample_size=32,
                block_out_channels=(16, 32),
                down_block_types=("DownBlock2D", "CrossAttnDownBlockMV2D"),
                up_block_types=("CrossAttnUpBlockMV2D", "UpBlock2D"),
                layers_per_block=1,
                norm_num_groups=8,
                cross_attention_dim=32,
            )
            # Random, not zero, joint-attention outputs, so that the cross-domain path is exercised.
            for module in unet.modules():
                if getattr(module, "attn_joint_mid", None) is not None:
                    torch.nn.init.normal_(module.attn_joint_mid.to_out[0].weight, std=0.1)
            vae = AutoencoderKL(
                block_out_channels=(8, 16, 16, 16),
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=1,
                norm_num_groups=4,
                latent_channels=4,
                sample_size=256,
            )
            image_encoder = CLIPVisionModelWithProjection(
                CLIPVisionConfig(
                    hidden_size=32,
                    intermediate_size=37,
                    num_hidden_layers=2,
                    num_attention_heads=4,
                    image_size=32,
                    patch_size=8,
                    projection_dim=32,
                    hidden_act="quick_gelu",
                )
            )
        feature_extractor = clip_feature_extractor(32)
        ddim = DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        )
        sampler = ddim if scheduler == "ddim" else _perflow_from(ddim.config, num_time_windows)
        pipe = cls(
            vae=vae.eval(),
            image_encoder=image_encoder.eval(),
            feature_extractor=feature_extractor,
            unet=unet.eval(),
            scheduler=sampler,
        )
        pipe.load_settings = {"model": f"tiny(seed={seed})", "revision": None, "delta": None, "delta_variant": None}
        return pipe

    # ------------------------------------------------------------------------------------------------ call
    @torch.no_grad()
    def __call__(
        self,
        image: Image.Image,
        *,
        num_inference_steps: int = 4,
        guidance_scale: float = 1.0,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
        latents: torch.Tensor | None = None,
        eta: float = 0.0,
    ) -> MultiviewOutput:
        """Generate the 6 normals and 6 colors of the object in `image`.

        Args:
            image: the condition, already preprocessed (`preprocess.preprocess_image`): RGB, white background,
                ``H × W`` = the model's size (256² for Wonder3D).
            num_inference_steps: UNet passes. PeRFlow: at least `num_time_windows` (4); 4 or 8 are sensible.
            guidance_scale: classifier-free guidance; 1.0 (the PeRFlow demo) runs no unconditional branch,
                upstream Wonder3D suggests 1 to 3.
            generator: seeds the initial noise (and DDIM's noise when `eta > 0`).
            output_type: ``"pil"`` (PIL images and tensors) or ``"pt"`` (tensors only).
            latents: initial noise, (12, 4, H/8, W/8); drawn from `generator` when `None`.
            eta: DDIM only (0 = deterministic). PeRFlow steps are deterministic.
        """
        size = self.unet.config.sample_size * self.vae_scale_factor
        latent_shape = (2 * self.num_views, 4, size // self.vae_scale_factor, size // self.vae_scale_factor)

        # 1. Check inputs.
        self._check_inputs(image, size, num_inference_steps, guidance_scale, output_type, latents, latent_shape)
        compile_seconds = None
        if self._compiled is not None:
            # Untimed warm-up at these shapes (UNet batch 12 or 24); its own noise, the caller's generator untouched.
            warm = torch.Generator("cpu").manual_seed(0) if latents is None else None
            compile_seconds = run_compile_warm_up(
                self,
                (guidance_scale > 1.0, size, str(self._execution_device), self.unet.dtype),  # new key: compile
                lambda: self._generate(image, num_inference_steps, guidance_scale, warm, "pt", latents, eta),
                logger,
            )
        out = self._generate(image, num_inference_steps, guidance_scale, generator, output_type, latents, eta)
        if compile_seconds is not None:
            out.timings["compile"] = compile_seconds
        return out

    def _generate(
        self,
        image: Image.Image,
        num_inference_steps: int,
        guidance_scale: float,
        generator: torch.Generator | None,
        output_type: str,
        latents: torch.Tensor | None,
        eta: float,
    ) -> MultiviewOutput:
        """Steps 2-7 of `__call__` on checked inputs."""
        start = time.perf_counter()
        device = self._execution_device
        dtype = self.unet.dtype
        size = self.unet.config.sample_size * self.vae_scale_factor
        latent_shape = (2 * self.num_views, 4, size // self.vae_scale_factor, size // self.vae_scale_factor)
        do_cfg = guidance_scale > 1.0
        with preferred_sdpa(device):  # flash first on CUDA; nothing changes on CPU
            latents, timesteps, step_parameters, encode_done, denoise_done = self._denoise(
                image, num_inference_steps, guidance_scale, generator, latents, eta, latent_shape
            )
            # 6. Decode all 12 views (in groups of `decode_batch_size`: each view decodes on its own, so the same).
            scaled = latents.to(self.vae.dtype) / self.vae.config.scaling_factor  # (12, 4, h, w)
            chunk = self.decode_batch_size or scaled.shape[0]
            decoded = torch.cat([self.vae.decode(part).sample for part in scaled.split(chunk)])  # (12, 3, H, W)
        images = (decoded.float() / 2 + 0.5).clamp(0, 1).cpu()  # (12, 3, H, W) in [0, 1]
        decode_done = time.perf_counter()
        views = self.num_views

        # 7. Output.
        normals_tensor, colors_tensor = images[:views], images[views:]
        normals = _to_pil(normals_tensor) if output_type == "pil" else []
        colors = _to_pil(colors_tensor) if output_type == "pil" else []
        settings = {
            **self.load_settings,
            "scheduler": type(self.scheduler).__name__,
            "num_time_windows": getattr(self.scheduler.config, "num_time_windows", None),
            "num_inference_steps": num_inference_steps,
            "timesteps": [int(t) for t in timesteps],
            "unet_passes": len(timesteps),
            "unet_batch": 4 * views if do_cfg else 2 * views,
            "guidance_scale": guidance_scale,
            "eta": eta if "eta" in step_parameters else None,
            "size": size,
            "dtype": str(dtype).replace("torch.", ""),
            "device": str(device),
            "compiled": self._compiled is not None,
        }
        timings = {
            "encode": encode_done - start,
            "denoise": denoise_done - encode_done,
            "decode": decode_done - denoise_done,
            "total": time.perf_counter() - start,
        }
        return MultiviewOutput(
            normals=normals,
            colors=colors,
            normals_tensor=normals_tensor,
            colors_tensor=colors_tensor,
            view_names=VIEW_NAMES,
            timings=timings,
            settings=settings,
        )

    def _denoise(self, image, num_inference_steps, guidance_scale, generator, latents, eta, latent_shape):
        """Steps 2-5: encode the condition, then the denoising loop. Returns the final latents (12, 4, h, w), the
        timesteps, the scheduler step's parameter names and the times at which encoding and denoising ended."""
        device = self._execution_device
        dtype = self.unet.dtype
        do_cfg = guidance_scale > 1.0
        # 2. Encode the condition once: one CLIP token and one VAE latent.
        pixel_values = self.feature_extractor(images=image, return_tensors="pt").pixel_values
        pixel_values = pixel_values.to(device=device, dtype=self.image_encoder.dtype)  # (1, 3, 224, 224)
        clip_embeds = self.image_encoder(pixel_values).image_embeds.unsqueeze(1)  # (1, 1, D)
        image_tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
        image_tensor = image_tensor.to(device=device, dtype=self.vae.dtype) * 2.0 - 1.0  # (1, 3, H, W) in [-1, 1]
        cond_latents = self.vae.encode(image_tensor).latent_dist.mode() * self.vae.config.scaling_factor
        # (1, 4, h, w)

        # 3. Batch conditioning: [normals | colors], or [normal-uc, normal-c, color-uc, color-c] with guidance.
        views = self.num_views
        cond_embeds = clip_embeds.to(dtype).expand(views, -1, -1)  # (6, 1, D)
        cond_image = cond_latents.to(dtype).expand(views, -1, -1, -1)  # (6, 4, h, w)
        if do_cfg:
            encoder_hidden_states = torch.cat([torch.zeros_like(cond_embeds), cond_embeds] * 2)  # (24, 1, D)
            image_latents = torch.cat([torch.zeros_like(cond_image), cond_image] * 2)  # (24, 4, h, w)
        else:
            encoder_hidden_states = torch.cat([cond_embeds] * 2)  # (12, 1, D)
            image_latents = torch.cat([cond_image] * 2)  # (12, 4, h, w)
        class_labels = camera_embedding(classifier_free_guidance=do_cfg, dtype=dtype, device=device)  # (12|24, 10)
        if self.release_encoders_after_use:
            self.image_encoder.to("meta")
            self.vae.encoder.to("meta")
            self.vae.quant_conv.to("meta")
            import gc

            gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        encode_done = time.perf_counter()

        # 4. Initial latents and timesteps.
        if latents is None:
            latents = randn_tensor(latent_shape, generator=generator, device=device, dtype=dtype)
        latents = latents.to(device=device, dtype=dtype) * self.scheduler.init_noise_sigma  # (12, 4, h, w)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        step_kwargs = {}
        step_parameters = set(inspect.signature(self.scheduler.step).parameters)
        if "eta" in step_parameters:
            step_kwargs["eta"] = eta
        if "generator" in step_parameters:
            step_kwargs["generator"] = generator

        # 5. Denoising loop: one UNet pass per timestep.
        for t in self.progress_bar(timesteps):
            if do_cfg:
                normals, colors = latents[:views], latents[views:]
                model_input = torch.cat([normals, normals, colors, colors])  # (24, 4, h, w)
            else:
                model_input = latents  # (12, 4, h, w)
            model_input = self.scheduler.scale_model_input(model_input, t)
            model_input = torch.cat([model_input, image_latents], dim=1)  # (12|24, 8, h, w)
            noise_pred = self.unet(
                model_input, t, encoder_hidden_states=encoder_hidden_states, class_labels=class_labels
            ).sample  # (12|24, 4, h, w)
            if do_cfg:
                n_uc, n_c, c_uc, c_c = noise_pred.chunk(4)
                noise_pred = torch.cat(
                    [n_uc + guidance_scale * (n_c - n_uc), c_uc + guidance_scale * (c_c - c_uc)]
                )  # (12, 4, h, w)
            latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs).prev_sample
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        denoise_done = time.perf_counter()
        return latents, timesteps, step_parameters, encode_done, denoise_done

    def _check_inputs(self, image, size, num_inference_steps, guidance_scale, output_type, latents, latent_shape):
        if not isinstance(image, Image.Image):
            raise ValueError(
                f"image must be a PIL image, got {type(image).__name__}; load it with PIL.Image.open and pass it "
                "through wonder3d_perflow.preprocess.preprocess_image first."
            )
        if image.mode != "RGB" or image.size != (size, size):
            raise ValueError(
                f"image must be RGB {size}x{size} (got {image.mode} {image.size[0]}x{image.size[1]}); "
                "run wonder3d_perflow.preprocess.preprocess_image(image) first."
            )
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}.")
        windows = getattr(self.scheduler.config, "num_time_windows", None)
        if windows is not None and num_inference_steps < windows:
            raise ValueError(
                f"PeRFlow with {windows} time windows needs at least {windows} UNet passes; got "
                f"num_inference_steps={num_inference_steps}. (Upstream's 'one-step' demo silently runs {windows}.) "
                f"Use {windows} or {2 * windows}."
            )
        if guidance_scale < 1.0:
            raise ValueError(f"guidance_scale must be >= 1.0 (1.0 = no guidance), got {guidance_scale!r}.")
        if output_type not in ("pil", "pt"):
            raise ValueError(f"output_type must be 'pil' or 'pt', got {output_type!r}.")
        if latents is not None and tuple(latents.shape) != latent_shape:
            raise ValueError(f"latents must have shape {latent_shape}, got {tuple(latents.shape)}.")


def clip_feature_extractor(size: int = 224) -> CLIPImageProcessor:
    """The checkpoint's `feature_extractor` settings (bicubic resize + centre crop to `size`, OpenAI CLIP mean/std),
    for models built in code (tiny, benchmarks); real checkpoints load theirs from `feature_extractor/`."""
    return CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        resample=3,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )


class _Capture(logging.Filter):
    """Holds back the records of one logger (the ΔW merge's own report) so that they are logged once, at the
    level they deserve."""

    def __init__(self):
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        self.records.append(record)
        return False


def _merge_and_log(unet: UNetMV2DConditionModel, delta_weights: dict[str, torch.Tensor], delta) -> Any:
    """Tolerant ΔW merge into the Wonder3D UNet, its report logged once: at INFO when it is the expected map of the
    SD1.5 PeRFlow delta (only ``conv_in.weight`` skipped: 8 input channels against SD's 4; nothing missing), at
    WARNING otherwise (a different or broken delta)."""
    from t2mv.perflow.delta import logger as delta_logger
    from t2mv.perflow.delta import merge_delta_weights

    capture = _Capture()
    delta_logger.addFilter(capture)
    try:
        report = merge_delta_weights(unet, delta_weights, strict=False)
    finally:
        delta_logger.removeFilter(capture)
    summary = report.summary()
    for record in capture.records:  # anything else the merge said, as it said it
        if record.getMessage() != summary:
            delta_logger.handle(record)
    if not report.missing and report.skipped_shape == ["conv_in.weight"]:
        logger.info("ΔW %s merged into the Wonder3D UNet as expected: %s", delta, summary)
    else:
        logger.warning(
            "The ΔW at %s does not map onto the Wonder3D UNet like the SD1.5 PeRFlow delta (expected exactly "
            "conv_in.weight skipped and nothing missing): %s",
            delta,
            summary,
        )
    return report


def _perflow_from(ddim_config, num_time_windows: int) -> PeRFlowScheduler:
    if num_time_windows != TRAINED_TIME_WINDOWS:
        logger.warning(
            "PeRFlow with %d time windows is experimental: the SD1.5 PeRFlow ΔW was trained with %d.",
            num_time_windows,
            TRAINED_TIME_WINDOWS,
        )
    return PeRFlowScheduler.from_config(ddim_config, prediction_type="diff_eps", num_time_windows=num_time_windows)


def _load_vae(folder: Path, torch_dtype: torch.dtype) -> AutoencoderKL:
    """AutoencoderKL built on the meta device and loaded with `strict=True`.

    Wonder3D's VAE comes from sd-image-variations, saved before diffusers 0.14 renamed the VAE attention weights
    (query/key/value/proj_attn → to_q/to_k/to_v/to_out.0). diffusers' own loader maps the old names; we call the
    same diffusers function (a no-op on current checkpoints), then every key must match.
    """
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(folder))
    state_dict = load_weights_file(folder, dtype=torch_dtype)
    vae._convert_deprecated_attention_blocks(state_dict)
    vae.load_state_dict(state_dict, strict=True, assign=True)
    return vae.to(dtype=torch_dtype).eval()


def _load_image_encoder(folder: Path, torch_dtype: torch.dtype) -> CLIPVisionModelWithProjection:
    """transformers' loader, with every missing, unexpected or mismatched key turned into an error."""
    if not any((folder / name).is_file() for name in ("model.safetensors", "pytorch_model.bin")):
        raise MissingWeightsError(str(folder), "no model.safetensors or pytorch_model.bin in this folder")
    model, info = CLIPVisionModelWithProjection.from_pretrained(
        folder, torch_dtype=torch_dtype, output_loading_info=True
    )
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise ValueError(f"image_encoder in {folder} does not match CLIPVisionModelWithProjection: {problems}")
    return model.eval()


def _to_pil(images: torch.Tensor) -> list[Image.Image]:
    array = (images.permute(0, 2, 3, 1).numpy() * 255.0).round().astype(np.uint8)  # (N, H, W, 3)
    return [Image.fromarray(item) for item in array]
