"""The PeRFlow-Refiner stage: the generated image → ``image_<N>.png`` at N² (``settings.upscale``, 0 = off).

The refiner (`t2mv.refiner`) is ControlNet-Tile img2img on a PeRFlow SD1.5 model. With a PeRFlow text-to-image stage
it shares that stage's UNet, VAE and text encoder (the default ``hansyan/perflow-sd15-dreamshaper`` is upstream's
refiner base: DreamShaper + ΔW) and adds only the ControlNet; with a rectified-flow stage (InstaFlow) it loads the
PeRFlow model beside it. Both are loaded once per chain, on the first request that asks for an upscale, before any
stage runs, so a missing ControlNet is one clear error (exit 3) and not a failure after the image was made.

The 3D stages keep taking the image at its own size: the upscale is an extra output, not their input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..inputs import write_image
from .stages import Files, Stage, StageContext

SCRATCH_KEY = "refiner_parts"  # where the chain hands the loaded parts to the stage (StageContext.scratch)


@dataclass
class RefinerParts:
    """What the refiner adds to the chain: the ControlNet and, for a rectified-flow chain, a PeRFlow base stage."""

    controlnet: Any
    base: Any = None  # a PeRFlow TextToImage; None: the chain's own text-to-image stage


def load_refiner_parts(
    t2i: Any,
    *,
    smoke: bool,
    controlnet: str,
    base_model: str,
    device: Any,
    dtype: Any,
    local_files_only: bool | None,
) -> RefinerParts:
    """Load the ControlNet-Tile (strictly) and, when `t2i` is not a PeRFlow stage, the PeRFlow base model.

    Raises:
        MissingWeightsError: the ControlNet (or the base) is not available; the message names it (exit 3).
    """
    from ..refiner import Refiner, load_controlnet
    from ..text_to_image import TextToImage

    perflow = getattr(t2i, "kind", "perflow") == "perflow"
    if smoke:  # tiny random parts; a rectified-flow chain gets the tiny PeRFlow model as its base
        tiny = Refiner.tiny(seed=0)
        return RefinerParts(tiny.pipe.controlnet, None if perflow else TextToImage.tiny(seed=0))
    net = load_controlnet(controlnet, torch_dtype=dtype, local_files_only=local_files_only).to(device)
    base = None
    if not perflow:
        base = TextToImage.from_pretrained(
            base_model, torch_dtype=dtype, device=str(device), local_files_only=local_files_only
        )
    return RefinerParts(net, base)


def chain_refiner(chain: Any) -> RefinerParts:
    """The PeRFlow-Refiner's parts for `chain` (a `TextTo3D`), loaded on its first request that asks and kept.

    Raises:
        BadInputError: low-memory mode (the refiner shares the text-to-image stage, which is not kept loaded).
        WeightsUnavailableError: the ControlNet-Tile (or the PeRFlow base of a rectified-flow chain) is missing.
    """
    from ..errors import BadInputError
    from .loading import naming_stage

    if chain._refiner_parts is None:
        t2i = chain._slots["text_to_image"].stage
        if t2i is None:
            raise BadInputError("--upscale needs the text-to-image stage kept loaded: leave out --low-memory.")
        with naming_stage("upscale (PeRFlow-Refiner)", chain.refiner_controlnet):
            chain._refiner_parts = load_refiner_parts(
                t2i,
                smoke=chain.smoke,
                controlnet=chain.refiner_controlnet,
                base_model=chain.refiner_base,
                device=chain.device,
                dtype=chain.dtype,
                local_files_only=chain.local_files_only,
            )
    return chain._refiner_parts


def upscaled_name(result: Any) -> str:
    """``image_1024.png`` for a 1024² upscale (``image_<W>x<H>.png`` for a non-square one)."""
    width, height = result.image_upscaled.size
    return f"image_{width}.png" if width == height else f"image_{width}x{height}.png"


def _write_upscaled(result: Any, folder: Path, mesh_formats: Sequence[str]) -> Files:
    image = getattr(result, "image_upscaled", None)
    return {} if image is None else {"image_upscaled": write_image(image, folder / upscaled_name(result))}


@dataclass
class Upscale(Stage):
    """The image → the PeRFlow-Refiner's ``settings.upscale``² version (4 steps, CFG 4.5, ControlNet-Tile)."""

    prompt: str = ""
    name: ClassVar[str] = "upscale"
    model: ClassVar[str | None] = "text_to_image"
    needs: ClassVar[tuple[str, ...]] = ("image",)
    adds: ClassVar[tuple[str, ...]] = ("image_upscaled",)
    write = staticmethod(_write_upscaled)

    def run(self, ctx: StageContext, model: Any) -> None:
        from ..refiner import Refiner

        parts: RefinerParts = ctx.scratch[SCRATCH_KEY]
        base = parts.base if parts.base is not None else model
        refiner = Refiner.from_text_to_image(base, parts.controlnet)
        out = refiner(ctx.result.image, self.prompt, size=ctx.settings.upscale, seed=ctx.settings.seed)
        ctx.result.image_upscaled = out.images[0]
        ctx.result.info["upscale"] = {k: out.settings[k] for k in ("size", "input_size", "num_inference_steps")}
        ctx.result.timings.update({f"upscale.{k}": v for k, v in out.timings.items() if k != "upscale"})
