"""TextTo3D: text → image → (six normals + six colors, mesh), every model resident in one process.

The text-to-image result (or an image the user gives instead of a prompt) feeds both the multiview stage
(Wonder3D + PeRFlow) and the mesh stage (TripoSR), each through its own preprocessing. Both preprocessors
get the chain's single rembg session, and that session remembers its last mask, so u2net loads once and
runs once per image.

The chain is the one place that picks device and dtype (CUDA float16, CPU float32), can offload stages
(each moves to the GPU only while it runs), seeds every stage from one seed, and measures per-stage time and
peak memory. The app, the command line and the batch tool are thin shells over ``TextTo3D.__call__``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
import warnings as warnings_module
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .tiny import SMOKE_BANNER, FakeRembgSession, warn_smoke

logger = logging.getLogger(__name__)

DEFAULT_T2I_MODEL = "hansyan/perflow-sd15-dreamshaper"  # DreamShaper-8 with the PeRFlow ΔW already merged
DEFAULT_MULTIVIEW_MODEL = "flamehaze1115/wonder3d-v1.0"
DEFAULT_MULTIVIEW_DELTA = "hansyan/perflow-sd15-delta-weights"  # the SD1.5 ΔW, merged into Wonder3D's UNet
DEFAULT_TRIPOSR_MODEL = "stabilityai/TripoSR"
STAGES = ("text_to_image", "multiview", "mesh")

# Input images: large enough to hold an object, small enough to decode without exhausting memory. PIL's own
# decompression-bomb guard only fires at 179 M pixels; this limit is checked from the header, before decoding.
MIN_IMAGE_SIDE = 16
MAX_IMAGE_PIXELS = 8192 * 8192
MAX_SEED = 2**63 - 1

SMOKE_HINT = (
    "To try the program without any weights, run it in smoke mode (`--tiny`, or T2MV_SMOKE=1): tiny random "
    "models whose output is noise."
)


class WeightsUnavailableError(FileNotFoundError):
    """A model of the chain could not be loaded: the message names the stage, the repo and the fixes."""


@dataclass(frozen=True)
class ChainDefaults:
    """Default generation settings; the UI and the command line show these. Smoke mode uses smaller ones."""

    height: int = 512
    width: int = 512
    t2i_steps: int = 4  # PeRFlow's four time windows
    t2i_guidance: float = 4.5  # the PeRFlow text-to-multiview demo
    mv_steps: int = 4  # upstream asks for 1 step but its scheduler runs 4 (one per time window)
    mv_guidance: float = 1.0  # no classifier-free guidance, as the demo
    mv_foreground_ratio: float = 0.75  # Wonder3D's recentring ratio
    mesh_foreground_ratio: float = 0.85  # TripoSR's
    mc_resolution: int = 256
    mc_threshold: float = 25.0
    texture_size: int = 1024


TINY_DEFAULTS = ChainDefaults(height=64, width=64, mc_resolution=32, texture_size=512)

# Allowed ranges, checked once in TextTo3D.check_inputs (the UI sliders use the same numbers).
LIMITS: dict[str, tuple[float, float]] = {
    "t2i_steps": (1, 100),
    "t2i_guidance": (0.0, 30.0),
    "mv_steps": (1, 100),
    "mv_guidance": (0.0, 30.0),
    "height": (64, 1024),
    "width": (64, 1024),
    "mv_foreground_ratio": (0.3, 1.0),
    "mesh_foreground_ratio": (0.3, 1.0),
    "mc_resolution": (32, 512),
    "texture_size": (512, 4096),
    "simplify_faces": (100, 10_000_000),
}


@dataclass
class ChainResult:
    """Everything one run produced, plus how long each stage took and how much memory it used.

    Attributes:
        image: the text-to-image output, or the given input image (RGB or RGBA).
        mv_input: the multiview condition (RGB 256², white background), None when the stage did not run.
        mesh_input: the TripoSR condition (RGB 512², grey background), None when the stage did not run.
        normals, colors: six PIL images each, in the order of `view_names` (empty when the stage did not run).
        mesh: a `trimesh.Trimesh` in the glTF frame (+Y up, front +Z), None when the stage did not run.
        timings: seconds per stage (``text_to_image``, ``preprocess``, ``multiview``, ``mesh``, ``texture``,
            ``total``) and the stages' own finer timings (``multiview.denoise``, ...).
        memory: GiB, per stage: ``<stage>.gpu_peak`` (torch.cuda.max_memory_allocated, CUDA only) and
            ``<stage>.host_rss`` (resident set size after the stage), and ``host_peak_rss`` for the process.
        settings: everything needed to reproduce the run (prompt, seed, steps, models, device, versions).
        warnings: messages for the user (e.g. a prompt longer than CLIP's 77 tokens was truncated).
    """

    image: Image.Image
    mv_input: Image.Image | None = None
    mesh_input: Image.Image | None = None
    normals: list[Image.Image] = field(default_factory=list)
    colors: list[Image.Image] = field(default_factory=list)
    mesh: Any = None
    view_names: tuple[str, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def save(self, folder: str | os.PathLike, *, mesh_formats: Sequence[str] = ("glb",)) -> dict[str, Path]:
        """Write the result into `folder` (created) and return {name: path}.

        Files: ``image.png``; ``mv_input.png``, ``normal_<i>_<view>.png`` and ``color_<i>_<view>.png`` (12 views),
        ``normals.png`` / ``colors.png`` (the six views side by side); ``mesh_input.png`` and ``mesh.<fmt>`` for
        each of `mesh_formats` (``glb``, ``obj`` (+ ``.mtl`` and texture when baked), ``ply``);
        ``settings.json`` (deterministic: same settings, same file) and ``timings.json`` (timings, memory).
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths: dict[str, Path] = {}

        def put(name: str, image: Image.Image) -> None:
            paths[name] = folder / f"{name}.png"
            image.save(paths[name])

        put("image", self.image)
        if self.mv_input is not None:
            put("mv_input", self.mv_input)
        for kind, views in (("normal", self.normals), ("color", self.colors)):
            for i, (view, name) in enumerate(zip(views, self.view_names)):
                put(f"{kind}_{i}_{name}", view)
            if views:
                put(f"{kind}s", horizontal_strip(views))
        if self.mesh_input is not None:
            put("mesh_input", self.mesh_input)
        if self.mesh is not None:
            from triposr.export import export_mesh

            for fmt in mesh_formats:
                fmt = fmt.lower().lstrip(".")
                if fmt not in ("glb", "obj", "ply"):
                    raise ValueError(f"mesh format must be glb, obj or ply, got {fmt!r}.")
                for written in export_mesh(self.mesh, folder / f"mesh.{fmt}"):  # .obj also writes .mtl (+ .png)
                    paths[written.name] = written
        paths["settings"] = folder / "settings.json"
        paths["settings"].write_text(json.dumps(self.settings, indent=2, sort_keys=True, default=str) + "\n")
        paths["timings"] = folder / "timings.json"
        record = {"timings": self.timings, "memory": self.memory, "warnings": self.warnings}
        paths["timings"].write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        return paths


def horizontal_strip(images: Sequence[Image.Image]) -> Image.Image:
    """The images side by side, left to right (all of the first image's size)."""
    width, height = images[0].size
    strip = Image.new("RGB", (width * len(images), height), (255, 255, 255))
    for i, image in enumerate(images):
        strip.paste(image.convert("RGB").resize((width, height)), (i * width, 0))
    return strip


def open_image(source: str | os.PathLike | Image.Image) -> Image.Image:
    """Open and check an input image; return it as RGB, or RGBA when it carries transparency.

    Raises ValueError with what to do for: a file that is not an image, fewer than ``MIN_IMAGE_SIDE`` pixels
    on a side, more than ``MAX_IMAGE_PIXELS`` pixels (checked from the header before decoding), and modes that
    cannot be converted. Greyscale, palette, CMYK, 16-bit and LA/RGBA inputs are converted.
    """
    if isinstance(source, Image.Image):
        image = source
    else:
        try:
            with warnings_module.catch_warnings():
                # Our own pixel limit below is lower than PIL's; its DecompressionBombWarning would only repeat it.
                warnings_module.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(source)
        except Image.DecompressionBombError as e:
            raise ValueError(
                f"The image is too large ({e}). Use an image of at most {MAX_IMAGE_PIXELS:,} pixels "
                f"(e.g. {int(MAX_IMAGE_PIXELS**0.5)}×{int(MAX_IMAGE_PIXELS**0.5)})."
            ) from e
        except (OSError, SyntaxError) as e:  # UnidentifiedImageError is an OSError
            raise ValueError(
                f"{Path(source).name} is not an image PIL can read ({e}). Upload a PNG, JPEG or WebP image."
            ) from e
    width, height = image.size
    if min(width, height) < MIN_IMAGE_SIDE:
        raise ValueError(
            f"The image is {width}×{height} pixels; it needs at least {MIN_IMAGE_SIDE} pixels on each side. "
            "Use a larger image (256×256 or more works best)."
        )
    if width * height > MAX_IMAGE_PIXELS:
        raise ValueError(
            f"The image is {width}×{height} = {width * height:,} pixels, more than the {MAX_IMAGE_PIXELS:,} allowed. "
            "Downscale it (1024×1024 is plenty: the models see 256² and 512²)."
        )
    try:
        image.load()
    except (OSError, SyntaxError) as e:
        raise ValueError(f"The image file is damaged or truncated ({e}). Re-export it and upload it again.") from e
    return _normalise_mode(image)


def _normalise_mode(image: Image.Image) -> Image.Image:
    import numpy as np

    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        return image.convert("RGBA")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit / float greyscale: PIL's convert("RGB") clips at 255, so scale to 8 bits first.
        pixels = np.asarray(image, dtype=np.float64)  # (H, W)
        top = pixels.max() if pixels.max() > 255 else 255.0
        pixels = np.clip(pixels / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(pixels).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, RGB


def _has_transparency(image: Image.Image) -> bool:
    return image.mode == "RGBA" and image.getchannel("A").getextrema()[0] < 255


class _MemoSession:
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


def _host_rss_gib() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**30
    except ImportError:  # psutil comes with accelerate; /proc is the Linux fallback
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30


def _host_peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _move(stage: Any, device: torch.device | str, dtype: torch.dtype | None = None) -> None:
    """Move a stage's weights: an object holding a diffusers ``.pipe``, a diffusers pipeline, or an nn.Module."""
    if isinstance(stage, torch.nn.Module):
        stage.to(device=device, dtype=dtype)
    else:  # DiffusionPipeline.to(torch_device, torch_dtype) in diffusers 0.19
        pipe = getattr(stage, "pipe", stage)
        pipe.to(device, dtype)


def resolve_device_dtype(
    device: str | torch.device | None, dtype: torch.dtype | None
) -> tuple[torch.device, torch.dtype]:
    """The chain's one device/dtype choice: CUDA + float16 when there is a GPU, else CPU + float32."""
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype if dtype is not None else (torch.float16 if device.type == "cuda" else torch.float32)
    if device.type == "cpu" and dtype == torch.float16:
        raise ValueError("float16 is not supported on the CPU; use float32 (or bfloat16) there.")
    return device, dtype


def _check_stages(stages: Sequence[str]) -> None:
    if not stages or set(stages) - set(STAGES):
        raise ValueError(f"stages must be a non-empty subset of {STAGES}, got {tuple(stages)}.")


class TextTo3D:
    """The chain: text (or an image) → image → six normals + six colors, and a mesh.

    Build it with `from_pretrained` (real weights) or `tiny` (smoke mode: noise, runs on a CPU in seconds),
    or hand in stage objects. Any stage may be None when it is not needed (e.g. no text-to-image for
    image-to-mesh), and the matching outputs are then skipped.

    Args:
        text_to_image: a `t2mv.text_to_image.TextToImage` (or None).
        multiview: a `wonder3d_perflow.MultiviewPipeline` (or None).
        reconstructor: a `triposr.TSR` (or None).
        device: where the stages run. Default: CUDA when available, else CPU.
        dtype: of the diffusion stages. Default float16 on CUDA, float32 on CPU. TripoSR always runs in float32
            (its density threshold and marching cubes are tuned in float32, as upstream runs it).
        offload: keep stages on the CPU and move each to `device` only while it runs (for small GPUs).
        rembg_session: a rembg session for background removal; None creates ``rembg.new_session("u2net")``
            on first use (smoke mode: a weightless fake).
        smoke: smoke mode (tiny random weights); logged loudly and recorded in every result.
        model_ids: recorded in the results' settings.
        defaults: the generation settings the UI and command line start from.
    """

    def __init__(
        self,
        text_to_image: Any = None,
        multiview: Any = None,
        reconstructor: Any = None,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        offload: bool = False,
        rembg_session: Any = None,
        smoke: bool = False,
        model_ids: dict[str, Any] | None = None,
        defaults: ChainDefaults | None = None,
    ):
        if text_to_image is None and multiview is None and reconstructor is None:
            raise ValueError("TextTo3D needs at least one stage (text_to_image, multiview or reconstructor).")
        self.device, self.dtype = resolve_device_dtype(device, dtype)
        self.offload = bool(offload) and self.device.type != "cpu"
        self.text_to_image = text_to_image
        self.multiview = multiview
        self.reconstructor = reconstructor
        self.smoke = smoke
        self.model_ids = dict(model_ids or {})
        self.defaults = defaults or (TINY_DEFAULTS if smoke else ChainDefaults())
        self._rembg_session = None if rembg_session is None else _MemoSession(rembg_session)
        if smoke:
            warn_smoke()
        # Without offload every stage lives on the device for the chain's lifetime; with it, on the CPU.
        home = "cpu" if self.offload else self.device
        for stage in (text_to_image, multiview):
            if stage is not None:
                _move(stage, home, self.dtype)
        if reconstructor is not None:
            _move(reconstructor, home, torch.float32)

    # ------------------------------------------------------------------------------------------ building
    @classmethod
    def from_pretrained(
        cls,
        t2i_model: str | os.PathLike = DEFAULT_T2I_MODEL,
        *,
        t2i_delta: str | os.PathLike | None = None,
        multiview_model: str | os.PathLike = DEFAULT_MULTIVIEW_MODEL,
        multiview_delta: str | os.PathLike | None = DEFAULT_MULTIVIEW_DELTA,
        delta_variant: str = "v0-1",
        triposr_model: str | os.PathLike = DEFAULT_TRIPOSR_MODEL,
        stages: Sequence[str] = STAGES,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        offload: bool = False,
        local_files_only: bool | None = None,
    ) -> TextTo3D:
        """Load the stages named in `stages` (hub ids or local folders) and compose them.

        `t2i_model` may already contain the PeRFlow ΔW (the default does); for a plain SD1.5 model such as
        ``Lykon/dreamshaper-8`` pass ``t2i_delta="hansyan/perflow-sd15-delta-weights"``.
        Missing weights raise `WeightsUnavailableError`, naming the repo, the fixes and smoke mode.
        """
        _check_stages(stages)
        device, dtype = resolve_device_dtype(device, dtype)  # checked before gigabytes are loaded
        load_device = "cpu" if offload else device
        model_ids: dict[str, Any] = {}
        t2i = mv = tsr = None
        if "text_to_image" in stages:
            from .text_to_image import TextToImage

            with _naming_stage("text-to-image", t2i_model):
                t2i = TextToImage.from_pretrained(
                    str(t2i_model),
                    delta=None if t2i_delta is None else str(t2i_delta),
                    delta_variant=delta_variant,
                    torch_dtype=dtype,
                    device=str(load_device),
                    local_files_only=local_files_only,
                )
            model_ids.update(t2i_model=str(t2i_model), t2i_delta=None if t2i_delta is None else str(t2i_delta))
        if "multiview" in stages:
            from wonder3d_perflow import MultiviewPipeline

            with _naming_stage("multiview", multiview_model):
                mv = MultiviewPipeline.from_pretrained(
                    str(multiview_model),
                    delta=None if multiview_delta is None else str(multiview_delta),
                    delta_variant=delta_variant,
                    torch_dtype=dtype,
                    device=str(load_device),
                    local_files_only=local_files_only,
                )
            model_ids.update(
                multiview_model=str(multiview_model),
                multiview_delta=None if multiview_delta is None else str(multiview_delta),
            )
        if "mesh" in stages:
            from triposr import TSR

            with _naming_stage("mesh (TripoSR)", triposr_model):
                tsr = TSR.from_pretrained(str(triposr_model), local_files_only=local_files_only)
            model_ids.update(triposr_model=str(triposr_model))
        model_ids["delta_variant"] = delta_variant
        if device.type == "cuda":  # xformers attention when it imports; both stages fall back to torch SDPA
            for stage, method in ((t2i, "enable_xformers"), (mv, "enable_xformers_if_available")):
                if stage is not None and hasattr(stage, method):
                    getattr(stage, method)()
        return cls(t2i, mv, tsr, device=device, dtype=dtype, offload=offload, model_ids=model_ids)

    @classmethod
    def tiny(
        cls,
        seed: int = 0,
        *,
        stages: Sequence[str] = STAGES,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        offload: bool = False,
    ) -> TextTo3D:
        """Smoke mode: tiny random weights for every stage and a weightless background remover. Output is noise."""
        from triposr import TSR
        from wonder3d_perflow import MultiviewPipeline

        from .text_to_image import TextToImage

        _check_stages(stages)
        resolve_device_dtype(device, dtype)
        t2i = TextToImage.tiny(seed=seed) if "text_to_image" in stages else None
        mv = MultiviewPipeline.tiny(seed=seed) if "multiview" in stages else None
        tsr = TSR.tiny(seed=seed) if "mesh" in stages else None
        tiny_id = f"tiny(seed={seed})"
        return cls(
            t2i,
            mv,
            tsr,
            device=device,
            dtype=dtype,
            offload=offload,
            rembg_session=FakeRembgSession(),
            smoke=True,
            model_ids={"t2i_model": tiny_id, "multiview_model": tiny_id, "triposr_model": tiny_id},
        )

    @property
    def rembg_session(self) -> Any:
        """The chain's one background-removal session, created on first use (u2net, or a fake in smoke mode)."""
        if self._rembg_session is None:
            if self.smoke:
                session: Any = FakeRembgSession()
            else:
                try:
                    import rembg

                    session = rembg.new_session("u2net")
                except Exception as e:  # rembg downloads u2net.onnx on first use; offline that fails
                    u2net_home = os.environ.get("U2NET_HOME", os.path.expanduser("~/.u2net"))
                    raise WeightsUnavailableError(
                        f"The background-removal model u2net could not be loaded ({type(e).__name__}: {e}). "
                        f"rembg looks for {u2net_home}/u2net.onnx and downloads it when missing. Fix: run once "
                        "with network access, or copy u2net.onnx into that folder (or set U2NET_HOME); or turn "
                        "background removal off, or give an image with a transparent background (RGBA)."
                    ) from e
            self._rembg_session = _MemoSession(session)
        return self._rembg_session

    @property
    def stages(self) -> tuple[str, ...]:
        present = (self.text_to_image, self.multiview, self.reconstructor)
        return tuple(name for name, stage in zip(STAGES, present) if stage is not None)

    # ------------------------------------------------------------------------------------------ running
    def check_inputs(self, prompt: str | None, image: Any, **numbers: Any) -> None:
        """Raise ValueError (saying what is allowed) for a missing prompt/image or an out-of-range setting."""
        if image is None:
            if prompt is None or not str(prompt).strip():
                raise ValueError("Enter a prompt (or give an image instead of a prompt).")
            if self.text_to_image is None:
                raise ValueError("This chain was built without the text-to-image stage: give an image instead.")
        for name, value in numbers.items():
            if value is None:
                continue
            low, high = LIMITS[name]
            if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
                raise ValueError(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}.")
            if not low <= value <= high:
                raise ValueError(f"{name} must be in [{low:g}, {high:g}], got {value:g}.")
        for name in ("height", "width"):
            if numbers.get(name) is not None and numbers[name] % 8:
                raise ValueError(f"{name} must be a multiple of 8, got {numbers[name]}.")

    def __call__(
        self,
        prompt: str | None = None,
        *,
        image: Image.Image | str | os.PathLike | None = None,
        negative_prompt: str | None = None,
        seed: int = 0,
        t2i_steps: int | None = None,
        t2i_guidance: float | None = None,
        height: int | None = None,
        width: int | None = None,
        mv_steps: int | None = None,
        mv_guidance: float | None = None,
        remove_background: bool = True,
        mv_foreground_ratio: float | None = None,
        mesh_foreground_ratio: float | None = None,
        mv_preprocess: str = "wonder3d",
        mc_resolution: int | None = None,
        mc_threshold: float | None = None,
        bake_texture: bool = False,
        texture_size: int | None = None,
        simplify_faces: int | None = None,
        multiview: bool = True,
        mesh: bool = True,
        callback: Callable[[str, int, int], None] | None = None,
    ) -> ChainResult:
        """Run the chain: prompt (or `image`) → image → multiview and mesh.

        Args:
            prompt: the text; ignored (with a warning) when `image` is given.
            image: a PIL image or a path, used instead of the text-to-image stage.
            negative_prompt: for the text-to-image stage.
            seed: every stage draws its noise from its own CPU generator seeded with this, so results do not
                depend on the device's RNG or on what ran before.
            t2i_steps, t2i_guidance, height, width: text-to-image settings (None: `self.defaults`).
            mv_steps, mv_guidance: multiview settings.
            remove_background: cut the object out with rembg when the image has no transparency (generated
                images have none). False uses such an image whole; a transparent background is always used.
            mv_foreground_ratio, mesh_foreground_ratio: object size after recentring, per stage.
            mv_preprocess: ``"wonder3d"`` (crop and recentre the object) or ``"perflow"`` (the PeRFlow demo's
                resize and whiten, no recentring; `mv_foreground_ratio` is then unused).
            mc_resolution, mc_threshold: marching cubes grid and density level.
            bake_texture, texture_size: bake a UV texture instead of vertex colours.
            simplify_faces: decimate the mesh to about this many faces (None or 0: keep all).
            multiview, mesh: run these stages (when the chain has them).
            callback: called as ``callback(stage_name, index, total)`` before each stage (for progress bars).
        """
        d = self.defaults
        settings = {
            "t2i_steps": d.t2i_steps if t2i_steps is None else t2i_steps,
            "t2i_guidance": d.t2i_guidance if t2i_guidance is None else t2i_guidance,
            "height": d.height if height is None else height,
            "width": d.width if width is None else width,
            "mv_steps": d.mv_steps if mv_steps is None else mv_steps,
            "mv_guidance": d.mv_guidance if mv_guidance is None else mv_guidance,
            "mv_foreground_ratio": d.mv_foreground_ratio if mv_foreground_ratio is None else mv_foreground_ratio,
            "mesh_foreground_ratio": d.mesh_foreground_ratio
            if mesh_foreground_ratio is None
            else mesh_foreground_ratio,
            "mc_resolution": d.mc_resolution if mc_resolution is None else mc_resolution,
            "texture_size": d.texture_size if texture_size is None else texture_size,
            "simplify_faces": simplify_faces or None,
        }
        mc_threshold = d.mc_threshold if mc_threshold is None else mc_threshold
        # 1. Check inputs.
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed must be an integer in [0, {MAX_SEED}], got {seed!r}.")
        self.check_inputs(prompt, image, **settings)
        if mv_preprocess not in ("wonder3d", "perflow"):
            raise ValueError(f"mv_preprocess must be 'wonder3d' or 'perflow', got {mv_preprocess!r}.")
        run_multiview = multiview and self.multiview is not None
        run_mesh = mesh and self.reconstructor is not None
        messages: list[str] = []
        if image is not None and prompt is not None and str(prompt).strip():
            messages.append("An image was given, so the prompt was not used.")
        if image is not None:
            image = open_image(image)
        stage_names = (["text_to_image"] if image is None else []) + (
            ["preprocess"] if run_multiview or run_mesh else []
        )
        stage_names += (["multiview"] if run_multiview else []) + (["mesh"] if run_mesh else [])
        stage_names += ["texture"] if run_mesh and bake_texture else []

        timings: dict[str, float] = {}
        memory: dict[str, float] = {}
        started = time.perf_counter()

        def enter(name: str) -> None:
            if callback is not None:
                callback(name, stage_names.index(name), len(stage_names))
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)

        def leave(name: str, start: float) -> None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                memory[f"{name}.gpu_peak"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            timings[name] = time.perf_counter() - start
            memory[f"{name}.host_rss"] = _host_rss_gib()

        # 2. Text to image.
        if image is None:
            enter("text_to_image")
            start = time.perf_counter()
            with self._on_device(self.text_to_image, self.dtype):
                out = self.text_to_image(
                    str(prompt),
                    negative_prompt=negative_prompt,
                    num_inference_steps=settings["t2i_steps"],
                    guidance_scale=settings["t2i_guidance"],
                    height=settings["height"],
                    width=settings["width"],
                    generator=torch.Generator("cpu").manual_seed(seed),
                )
            image = out.images[0]
            messages += list(getattr(out, "warnings", []))
            timings.update({f"text_to_image.{k}": v for k, v in getattr(out, "timings", {}).items()})
            leave("text_to_image", start)

        # 3. Preprocess for both stages (one rembg pass, shared through the memo session).
        if run_multiview or run_mesh:
            enter("preprocess")
            start = time.perf_counter()
        # The session (u2net, downloaded on first use) is only needed when rembg will actually run.
        needs_rembg = (run_multiview or run_mesh) and remove_background and not _has_transparency(image)
        session = self.rembg_session if needs_rembg else None
        mv_input = mesh_input = None
        if run_multiview:
            from wonder3d_perflow.preprocess import preprocess_image as multiview_preprocess

            mv_input = multiview_preprocess(
                image,
                session=session,
                remove_background=remove_background,
                size=self._multiview_size(),
                mode=mv_preprocess,
                foreground_ratio=settings["mv_foreground_ratio"],
            )
        if run_mesh:
            from triposr.preprocess import preprocess_image as mesh_preprocess

            mesh_input = mesh_preprocess(
                image,
                session=session,
                remove_background=remove_background,
                foreground_ratio=settings["mesh_foreground_ratio"],
            )
        if run_multiview or run_mesh:
            leave("preprocess", start)

        # 4. Six normals and six colors.
        normals: list[Image.Image] = []
        colors: list[Image.Image] = []
        view_names: tuple[str, ...] = ()
        if run_multiview:
            enter("multiview")
            start = time.perf_counter()
            with self._on_device(self.multiview, self.dtype):
                mv_out = self.multiview(
                    mv_input,
                    num_inference_steps=settings["mv_steps"],
                    guidance_scale=settings["mv_guidance"],
                    generator=torch.Generator("cpu").manual_seed(seed),
                )
            normals, colors, view_names = list(mv_out.normals), list(mv_out.colors), tuple(mv_out.view_names)
            timings.update({f"multiview.{k}": v for k, v in getattr(mv_out, "timings", {}).items()})
            leave("multiview", start)

        # 5. Mesh (and texture, while TripoSR is on the device).
        result_mesh = None
        if run_mesh:
            enter("mesh")
            start = time.perf_counter()
            with self._on_device(self.reconstructor, torch.float32):
                scene_codes = self.reconstructor([mesh_input], device=self.device)  # (1, 3, C, H, W)
                result_mesh = self.reconstructor.extract_mesh(
                    scene_codes,
                    resolution=settings["mc_resolution"],
                    threshold=mc_threshold,
                    has_vertex_color=True,
                )[0]
                if settings["simplify_faces"]:
                    from triposr.mesh import simplify

                    result_mesh = simplify(result_mesh, int(settings["simplify_faces"]))
                leave("mesh", start)
                if bake_texture:
                    from triposr.texture import bake_texture as bake

                    enter("texture")
                    start = time.perf_counter()
                    result_mesh = bake(
                        self.reconstructor, scene_codes[0], result_mesh, texture_size=settings["texture_size"]
                    )
                    leave("texture", start)
        timings["total"] = time.perf_counter() - started
        memory["host_peak_rss"] = _host_peak_rss_gib()

        record = {
            "prompt": None if "text_to_image" not in stage_names else str(prompt),
            "negative_prompt": negative_prompt if "text_to_image" in stage_names else None,
            "input": "text" if "text_to_image" in stage_names else "image",
            "seed": seed,
            **settings,
            "mc_threshold": mc_threshold,
            "mv_preprocess": mv_preprocess,
            "remove_background": remove_background,
            "bake_texture": bool(bake_texture and run_mesh),
            "stages": [s for s in stage_names if s not in ("preprocess", "texture")],
            "models": self.model_ids,
            "device": self.device.type,
            "dtype": str(self.dtype).removeprefix("torch."),
            "offload": self.offload,
            "smoke": self.smoke,
            "versions": _versions(),
        }
        if self.smoke:
            messages.insert(0, SMOKE_BANNER)
        return ChainResult(
            image=image,
            mv_input=mv_input,
            mesh_input=mesh_input,
            normals=normals,
            colors=colors,
            mesh=result_mesh,
            view_names=view_names,
            timings=timings,
            memory=memory,
            settings=record,
            warnings=messages,
        )

    def _multiview_size(self) -> int:
        unet_config = self.multiview.unet.config
        return int(unet_config.sample_size * self.multiview.vae_scale_factor)

    def _on_device(self, stage: Any, dtype: torch.dtype) -> _Placement:
        return _Placement(stage, self.device, dtype, self.offload)

    def with_defaults(self, **changes: Any) -> TextTo3D:
        """Change the default settings (e.g. ``chain.with_defaults(mc_resolution=128)``); returns self."""
        names = {f.name for f in fields(ChainDefaults)}
        unknown = set(changes) - names
        if unknown:
            raise ValueError(f"unknown default(s) {sorted(unknown)}; known: {sorted(names)}.")
        self.defaults = replace(self.defaults, **changes)
        return self


class _Placement:
    """Context manager: with offload, move a stage to the device for the block and back to the CPU after."""

    def __init__(self, stage: Any, device: torch.device, dtype: torch.dtype, offload: bool):
        self.stage, self.device, self.dtype, self.offload = stage, device, dtype, offload

    def __enter__(self) -> None:
        if self.offload:
            _move(self.stage, self.device, self.dtype)

    def __exit__(self, *exc: Any) -> None:
        if self.offload:
            _move(self.stage, "cpu")
            torch.cuda.empty_cache()


class _naming_stage:
    """Re-raise a stage's missing-weights error with the stage's name and the smoke-mode hint added."""

    def __init__(self, stage: str, repo: Any):
        self.stage, self.repo = stage, str(repo)

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> bool:
        if exc is not None and isinstance(exc, OSError) and not isinstance(exc, PermissionError):
            raise WeightsUnavailableError(
                f"Could not load the {self.stage} model {self.repo!r}: {exc}\n{SMOKE_HINT}"
            ) from exc
        return False


def _versions() -> dict[str, str]:
    import diffusers

    from . import __version__

    return {
        "t2mv": __version__,
        "torch": torch.__version__.split("+")[0],
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
    }
