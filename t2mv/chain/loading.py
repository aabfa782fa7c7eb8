"""Building the chain's models: the pretrained loaders (hub ids or local folders), the tiny smoke-mode ones, the
low-memory wrappers, the one device/dtype choice, and the rembg memo session the two preprocessors share.

`TextTo3D.from_pretrained` / `TextTo3D.tiny` (`t2mv.chain`) compose these; nothing here runs a stage.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from ..errors import SMOKE_HINT, WeightsUnavailableError, is_missing_weights
from ..residency import free_memory

DEFAULT_T2I_MODEL = "hansyan/perflow-sd15-dreamshaper"  # DreamShaper-8 with the PeRFlow ΔW already merged
DEFAULT_MULTIVIEW_MODEL = "flamehaze1115/wonder3d-v1.0"
DEFAULT_MULTIVIEW_DELTA = "hansyan/perflow-sd15-delta-weights"  # the SD1.5 ΔW, merged into Wonder3D's UNet
DEFAULT_TRIPOSR_MODEL = "stabilityai/TripoSR"
logger = logging.getLogger(__name__)

STAGES = ("text_to_image", "multiview", "mesh")  # the model slots (what `stages=` of the builders names)

Loaders = dict[str, Callable[[], Any]]


def resolve_device_dtype(
    device: str | torch.device | None, dtype: torch.dtype | None
) -> tuple[torch.device, torch.dtype]:
    """The chain's one device/dtype choice: CUDA + float16 when there is a GPU, else CPU + float32."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype if dtype is not None else (torch.float16 if device.type == "cuda" else torch.float32)
    if device.type == "cpu" and dtype == torch.float16:
        raise ValueError("float16 is not supported on the CPU; use float32 (or bfloat16) there.")
    return device, dtype


def check_stages(stages: Sequence[str]) -> None:
    if not stages or set(stages) - set(STAGES):
        raise ValueError(f"stages must be a non-empty subset of {STAGES}, got {tuple(stages)}.")


class MemoSession:
    """Wraps a rembg session so the two preprocessors' calls on the same picture run the model once."""

    def __init__(self, session: Any):
        self.session = session
        self._key: str | None = None
        self._masks: list[Image.Image] | None = None

    def predict(self, img: Image.Image, *args, **kwargs) -> list[Image.Image]:
        key = hashlib.sha1(img.tobytes() + repr((img.mode, img.size, args, sorted(kwargs.items()))).encode())
        if key.hexdigest() != self._key:
            self._masks = self.session.predict(img, *args, **kwargs)
            self._key = key.hexdigest()
        return [mask.copy() for mask in self._masks]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.session, name)


class naming_stage:
    """Re-raise a stage loader's missing-weights error with the stage's name and the smoke-mode hint added.

    Only real missing-weights errors are renamed: the stages' own `MissingWeightsError`s, and a FileNotFoundError
    raised while loading (a model folder without a file). Anything else (a damaged file, out of memory) keeps its
    type, so it is not reported as "missing weights".
    """

    def __init__(self, stage: str, repo: Any):
        self.stage, self.repo = stage, str(repo)

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is not None and (is_missing_weights(exc) or isinstance(exc, FileNotFoundError)):
            raise WeightsUnavailableError(
                f"Could not load the {self.stage} model {self.repo!r}: {exc} {SMOKE_HINT}", repo=self.repo
            ) from exc
        return False


def multiview_size(pipe: Any) -> int:
    """The multiview stage's input side: its UNet's latent size times the VAE's scale (256 for Wonder3D)."""
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


def pretrained_loaders(
    *,
    t2i_model: str | os.PathLike,
    t2i_delta: str | os.PathLike | None,
    multiview_model: str | os.PathLike,
    multiview_delta: str | os.PathLike | None,
    delta_variant: str,
    triposr_model: str | os.PathLike,
    device: torch.device,
    dtype: torch.dtype,
    load_device: torch.device | str,
    local_files_only: bool | None,
) -> Loaders:
    """{slot: loader} for the three models from hub ids or local folders; each names its stage when weights are
    missing. The diffusion stages use xformers attention on CUDA when it imports (torch SDPA otherwise)."""

    def load_t2i():
        from ..text_to_image import TextToImage

        with naming_stage("text-to-image", t2i_model):
            stage = TextToImage.from_pretrained(
                str(t2i_model),
                delta=None if t2i_delta is None else str(t2i_delta),
                delta_variant=delta_variant,
                torch_dtype=dtype,
                device=str(load_device),
                local_files_only=local_files_only,
            )
        if device.type == "cuda":
            stage.enable_xformers()
        return stage

    def load_multiview():
        from wonder3d_perflow import MultiviewPipeline

        with naming_stage("multiview", multiview_model):
            stage = MultiviewPipeline.from_pretrained(
                str(multiview_model),
                delta=None if multiview_delta is None else str(multiview_delta),
                delta_variant=delta_variant,
                torch_dtype=dtype,
                device=str(load_device),
                local_files_only=local_files_only,
            )
        if device.type == "cuda":
            stage.enable_xformers_if_available()
        return stage

    def load_tsr():
        from triposr import TSR

        with naming_stage("mesh (TripoSR)", triposr_model):
            return TSR.from_pretrained(str(triposr_model), local_files_only=local_files_only)

    return {"text_to_image": load_t2i, "multiview": load_multiview, "mesh": load_tsr}


def tiny_loaders(seed: int) -> Loaders:
    """{slot: loader} for smoke mode: each stage's own tiny random build."""
    from triposr import TSR
    from wonder3d_perflow import MultiviewPipeline

    from ..text_to_image import TextToImage

    return {
        "text_to_image": lambda: TextToImage.tiny(seed=seed),
        "multiview": lambda: MultiviewPipeline.tiny(seed=seed),
        "mesh": lambda: TSR.tiny(seed=seed),
    }


def low_memory_loaders(loaders: Loaders) -> Loaders:
    """Loaders for low-memory mode. The multiview stage is the largest (5.2 GB of float32 weights): it releases its
    CLIP and VAE encoders once the condition is encoded (1.3 GB: the stage is rebuilt for the next run anyway) and
    decodes its 12 views one at a time (the decoder's 256² activations for 12 views at once are ~2.5 GB). The
    text-to-image stage releases its text encoder once the prompts are encoded."""

    def multiview():
        stage = loaders["multiview"]()
        stage.decode_batch_size = 1
        stage.release_encoders_after_use = True
        return stage

    def text_to_image():
        stage = loaders["text_to_image"]()
        stage.release_encoders_after_use = True  # the text encoder, once the prompts are encoded
        return stage

    wrapped = {"multiview": multiview, "text_to_image": text_to_image}
    return {name: wrapped.get(name, load) for name, load in loaders.items()}


def check_loaders(loaders: Loaders) -> int | None:
    """Low-memory mode: load each stage once, one at a time, and free it, so that missing or broken weights fail
    at construction rather than minutes into a run. Returns the multiview stage's input size (None without it)."""
    size = None
    for name, load in loaders.items():
        stage = load()
        if name == "multiview":
            size = multiview_size(stage)
        del stage
        free_memory()
    return size


def enable_compile(slots: dict[str, Any], low_memory: bool, offload: bool) -> dict[str, bool]:
    """Compiled mode for the diffusion stages (UNet + VAE decoder, static shapes; each stage's `enable_compile`),
    compiled on the first call at new shapes and reused. Off, with a warning, when stages are rebuilt (low-memory)
    or moved (offload) per run: they would recompile every time. Returns {stage: compiled}."""
    if low_memory or offload:
        logger.warning(
            "--compile is ignored with %s: stages are rebuilt or moved per run, which would recompile every time.",
            "low-memory mode" if low_memory else "offload",
        )
        return {}
    compiled = {}
    for name in ("text_to_image", "multiview"):
        stage = slots[name].stage
        if stage is not None and hasattr(stage, "enable_compile"):
            compiled[name] = bool(stage.enable_compile())
    return compiled


def versions() -> dict[str, str]:
    """The versions a run's ``settings.json`` records."""
    import diffusers

    from .. import __version__

    return {
        "t2mv": __version__,
        "torch": torch.__version__.split("+")[0],
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
    }


def model_ids(
    stages: Sequence[str],
    t2i_model: Any,
    t2i_delta: Any,
    multiview_model: Any,
    multiview_delta: Any,
    triposr_model: Any,
    delta_variant: str,
) -> dict[str, Any]:
    """The models of `stages` as ``settings.json`` records them (``models``)."""
    ids = {
        "text_to_image": {"t2i_model": str(t2i_model), "t2i_delta": None if t2i_delta is None else str(t2i_delta)},
        "multiview": {
            "multiview_model": str(multiview_model),
            "multiview_delta": None if multiview_delta is None else str(multiview_delta),
        },
        "mesh": {"triposr_model": str(triposr_model)},
    }
    found = {key: value for name in STAGES if name in stages for key, value in ids[name].items()}
    return {**found, "delta_variant": delta_variant}


def describe_chain(chain: Any) -> dict[str, Any]:
    """What a run's record says about the chain itself (a `TextTo3D`): models, device, dtype, residency, versions."""
    return {
        "models": chain.model_ids,
        "device": chain.device.type,
        "dtype": str(chain.dtype).removeprefix("torch."),
        "offload": chain.offload,
        "low_memory": chain.low_memory,
        "compiled": chain.compiled,
        "smoke": chain.smoke,
        "versions": versions(),
    }


def slot_stage(name: str) -> property:
    """`TextTo3D`'s property for the resident stage of slot `name` (None when absent or loaded per run); settable."""
    return property(
        lambda chain: chain._slots[name].stage, lambda chain, stage: setattr(chain._slots[name], "stage", stage)
    )
