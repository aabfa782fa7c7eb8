"""PeRFlow-Refiner: upscale a generated image (512² → 1024²) in 4 steps with ControlNet-Tile img2img.

Upstream (magic-research/piecewise-rectified-flow ``scripts/sd15_controlnet.py``, ``--control_type tile``):

- ``StableDiffusionControlNetImg2ImgPipeline`` on an SD1.5 fine-tune (``Lykon/dreamshaper-8``) with the PeRFlow ΔW
  merged, ControlNet ``lllyasviel/control_v11f1e_sd15_tile``;
- the PeRFlow scheduler built from the base's config with ``prediction_type="diff_eps"``, 4 time windows;
- the low-resolution input resized to the target (``controlnet_aux.util.resize_image``: shortest side → target,
  sides rounded to multiples of 64, OpenCV Lanczos-4 when enlarging) and passed as both ``image`` and
  ``control_image``; strength 1.0, 4 steps, CFG 4.5, ControlNet scale 0.8 (the pipeline's default);
- its own prompt prefix and negative prompt (`REFINER_PROMPT_PREFIX`, `REFINER_NEGATIVE_PROMPT`).

The merged ``hansyan/perflow-sd15-dreamshaper`` (our text-to-image default) is that same fine-tune + ΔW, so
`Refiner.from_text_to_image` shares a PeRFlow text-to-image stage's UNet, VAE and text encoder and loads only the
ControlNet. Loading is strict (every key, every shape); a missing ControlNet raises `MissingWeightsError` (exit 3).
PeRFlow weights are CC-BY-NC-4.0; the ControlNet is OpenRAIL.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from .accel import preferred_sdpa
from .perflow.hub import MissingWeightsError, resolve_pretrained
from .text_to_image import DEFAULT_MODEL, TextToImage

logger = logging.getLogger(__name__)

DEFAULT_CONTROLNET = "lllyasviel/control_v11f1e_sd15_tile"
REFINER_PROMPT_PREFIX = "raw photo, 8k uhd, dslr, high quality, hyper detailed masterpiece; "
REFINER_NEGATIVE_PROMPT = "distorted, blur, smooth, low-quality, warm, haze, over-saturated, high-contrast"
UPSCALE_SIZES = (1024,)  # what `--upscale` offers (upstream's script: 1024)
_CONTROLNET_WEIGHTS = "diffusion_pytorch_model"


@dataclass(frozen=True)
class RefinerConfig:
    """Upstream's refiner settings (scripts/sd15_controlnet.py)."""

    num_inference_steps: int = 4
    guidance_scale: float = 4.5
    strength: float = 1.0
    controlnet_conditioning_scale: float = 0.8
    prompt_prefix: str = REFINER_PROMPT_PREFIX
    negative_prompt: str = REFINER_NEGATIVE_PROMPT


@dataclass
class RefinerOutput:
    """Result of [`Refiner.__call__`]: ``images`` (PIL list, or a (B,3,H,W) tensor in [0,1] for ``"pt"``), the
    resized ``control`` image, ``timings`` (``{"upscale": s}``) and the ``settings`` used."""

    images: Any
    control: PIL.Image.Image
    timings: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)


def resize_for_tile(image: PIL.Image.Image, size: int) -> PIL.Image.Image:
    """Upstream's tile preprocessing: shortest side → `size`, both sides rounded to multiples of 64, OpenCV
    Lanczos-4 when enlarging and area averaging when shrinking (``controlnet_aux.util.resize_image``)."""
    import cv2  # opencv-python-headless (rembg's dependency)

    pixels = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
    height, width = pixels.shape[:2]
    k = float(size) / min(height, width)
    new_height = int(np.round(height * k / 64.0)) * 64
    new_width = int(np.round(width * k / 64.0)) * 64
    interpolation = cv2.INTER_LANCZOS4 if k > 1 else cv2.INTER_AREA
    return PIL.Image.fromarray(cv2.resize(pixels, (new_width, new_height), interpolation=interpolation))


def _controlnet_file(folder: Path, fp16: bool) -> Path | None:
    names = [f"{_CONTROLNET_WEIGHTS}.safetensors", f"{_CONTROLNET_WEIGHTS}.bin"]
    if fp16:
        names.insert(0, f"{_CONTROLNET_WEIGHTS}.fp16.safetensors")
    return next((folder / n for n in names if (folder / n).is_file()), None)


def load_controlnet(
    repo_or_path: str | Path = DEFAULT_CONTROLNET,
    *,
    torch_dtype: torch.dtype = torch.float32,
    local_files_only: bool | None = None,
):
    """Strictly load a diffusers ``ControlNetModel`` (``config.json`` + one weights file at the folder's root).

    Raises:
        MissingWeightsError: the repo is neither a folder nor in the hub cache, or holds no weights file.
        ValueError: the weights do not match the architecture built from config.json (names the keys).
    """
    from diffusers import ControlNetModel

    fp16 = torch_dtype == torch.float16
    patterns = ["config.json", f"{_CONTROLNET_WEIGHTS}.safetensors"]
    if fp16:
        patterns.append(f"{_CONTROLNET_WEIGHTS}.fp16.safetensors")
    folder = resolve_pretrained(repo_or_path, allow_patterns=patterns, local_files_only=local_files_only)
    file = _controlnet_file(folder, fp16)
    if file is None or not (folder / "config.json").is_file():
        raise MissingWeightsError(
            str(repo_or_path),
            f"the PeRFlow-Refiner's ControlNet-Tile folder {folder} needs config.json and "
            f"{_CONTROLNET_WEIGHTS}.safetensors",
        )
    config = json.loads((folder / "config.json").read_text())
    with torch.device("meta"):
        model = ControlNetModel.from_config(config)
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state_dict = load_file(file)
    else:
        state_dict = torch.load(file, map_location="cpu", weights_only=True)
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as error:
        raise ValueError(f"{file} does not match the ControlNetModel built from its config.json: {error}") from error
    return model.to(dtype=torch_dtype).eval()


class Refiner:
    """ControlNet-Tile img2img with the PeRFlow scheduler: one generated image → the same picture at 1024².

    Build it with [`from_pretrained`], [`from_text_to_image`] (shares a PeRFlow stage's models) or [`tiny`].
    ``.pipe`` is the diffusers ``StableDiffusionControlNetImg2ImgPipeline``.
    """

    def __init__(self, pipe, *, settings: dict[str, Any] | None = None, config: RefinerConfig | None = None):
        self.pipe = pipe
        self.settings = dict(settings or {})
        self.config = config or RefinerConfig()

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    @classmethod
    def from_text_to_image(cls, t2i: TextToImage, controlnet, *, settings: dict[str, Any] | None = None) -> Refiner:
        """Wrap a PeRFlow `TextToImage` stage's tokenizer, text encoder, UNet, VAE and scheduler with `controlnet`
        (a loaded ``ControlNetModel``; moved to the stage's device and dtype). No weights are copied.

        Raises:
            ValueError: `t2i` is a rectified-flow model (InstaFlow has no PeRFlow UNet to refine with).
        """
        from diffusers import StableDiffusionControlNetImg2ImgPipeline

        if t2i.kind != "perflow":
            raise ValueError(
                "The PeRFlow-Refiner needs an SD1.5 PeRFlow model; this text-to-image stage is "
                f"{t2i.kind}: load the refiner with Refiner.from_pretrained()."
            )
        source = t2i.pipe
        pipe = StableDiffusionControlNetImg2ImgPipeline(
            vae=source.vae,
            text_encoder=source.text_encoder,
            tokenizer=source.tokenizer,
            unet=source.unet,
            controlnet=controlnet.to(device=t2i.device, dtype=t2i.dtype),
            scheduler=source.scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        base = {k: t2i.settings.get(k) for k in ("model", "delta", "torch_dtype", "device", "scheduler")}
        return cls(pipe, settings={**base, **(settings or {})})

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path = DEFAULT_MODEL,
        *,
        controlnet: str | Path = DEFAULT_CONTROLNET,
        delta: str | Path | None = None,
        delta_variant: str | None = "v0-1",
        torch_dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        local_files_only: bool | None = None,
    ) -> Refiner:
        """Load the refiner: a PeRFlow SD1.5 model (merged, or a fine-tune + `delta`, as upstream's
        ``Lykon/dreamshaper-8`` + ΔW) and the ControlNet-Tile, all strictly.

        Raises:
            MissingWeightsError: the model, ΔW or ControlNet is not available (exit 3).
            ValueError: `model` is not an SD1.5 PeRFlow model, or a checkpoint does not match its config.
        """
        started = time.perf_counter()
        net = load_controlnet(controlnet, torch_dtype=torch_dtype, local_files_only=local_files_only)
        t2i = TextToImage.from_pretrained(
            model,
            delta=delta,
            delta_variant=delta_variant,
            torch_dtype=torch_dtype,
            device=device,
            local_files_only=local_files_only,
        )
        extra = {"controlnet": str(controlnet), "load_seconds": round(time.perf_counter() - started, 3)}
        return cls.from_text_to_image(t2i, net, settings=extra)

    @classmethod
    def tiny(cls, seed: int = 0) -> Refiner:
        """A tiny random refiner (TextToImage.tiny's models + a tiny ControlNet) for smoke mode and tests."""
        from diffusers import ControlNetModel

        from .text_to_image import _TINY_UNET_CONFIG

        t2i = TextToImage.tiny(seed=seed)
        keys = ("block_out_channels", "layers_per_block", "down_block_types", "cross_attention_dim")
        keys += ("attention_head_dim", "norm_num_groups", "in_channels")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            net = ControlNetModel(
                **{k: _TINY_UNET_CONFIG[k] for k in keys}, conditioning_embedding_out_channels=(4, 8, 8, 16)
            ).eval()
        return cls.from_text_to_image(t2i, net, settings={"controlnet": f"tiny(seed={seed})"})

    @torch.no_grad()
    def __call__(
        self,
        image: PIL.Image.Image,
        prompt: str,
        *,
        size: int = 1024,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        output_type: str = "pil",
    ) -> RefinerOutput:
        """Refine `image` to `size` (its shortest side; sides multiples of 64) under `prompt`.

        Args:
            image: the generated image (any mode; RGB is used).
            prompt: the object's prompt; upstream's prefix is put in front of it.
            size: the target shortest side (1024 upstream), a positive multiple of 64.
            num_inference_steps, guidance_scale: None = upstream's 4 steps and CFG 4.5 (at least 4 steps: one per
                PeRFlow time window).
            seed: seeds a CPU generator (exclusive with `generator`).
            output_type: ``"pil"`` or ``"pt"``.
        """
        cfg = self.config
        steps = cfg.num_inference_steps if num_inference_steps is None else num_inference_steps
        guidance = cfg.guidance_scale if guidance_scale is None else guidance_scale
        windows = getattr(self.pipe.scheduler.config, "num_time_windows", 1)
        if not isinstance(image, PIL.Image.Image):
            raise ValueError(f"image must be a PIL image, got {type(image).__name__}.")
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or size % 64:
            raise ValueError(f"size must be a positive multiple of 64, got {size!r}.")
        if isinstance(steps, bool) or not isinstance(steps, int) or not windows <= steps <= 100:
            raise ValueError(f"num_inference_steps must be an integer in [{windows}, 100], got {steps!r}.")
        if output_type not in ("pil", "pt"):
            raise ValueError(f"output_type must be 'pil' or 'pt', got {output_type!r}.")
        if seed is not None and generator is not None:
            raise ValueError("Pass either seed or generator, not both.")
        if seed is not None:
            generator = torch.Generator("cpu").manual_seed(seed)

        control = resize_for_tile(image, size)  # upstream: the same resized image is the input and the control
        started = time.perf_counter()
        with preferred_sdpa(self.device):
            result = self.pipe(
                prompt=[cfg.prompt_prefix + prompt],
                negative_prompt=[cfg.negative_prompt],
                image=control,
                control_image=control,
                strength=cfg.strength,
                height=control.height,
                width=control.width,
                num_inference_steps=steps,
                guidance_scale=guidance,
                controlnet_conditioning_scale=cfg.controlnet_conditioning_scale,
                generator=generator,
                output_type=output_type,
            )
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - started
        settings = {
            **self.settings,
            "prompt": cfg.prompt_prefix + prompt,
            "negative_prompt": cfg.negative_prompt,
            "size": [control.width, control.height],
            "input_size": list(image.size),
            "num_inference_steps": steps,
            "guidance_scale": guidance,
            "strength": cfg.strength,
            "controlnet_conditioning_scale": cfg.controlnet_conditioning_scale,
            "timesteps": self.pipe.scheduler.timesteps.tolist(),
            "seed": seed,
        }
        return RefinerOutput(images=result.images, control=control, timings={"upscale": elapsed}, settings=settings)
