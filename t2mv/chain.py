"""TextTo3D: text → image → (six normals + six colors, mesh), every model resident in one process.

The text-to-image result (or an image the user gives instead of a prompt) feeds both the multiview stage
(Wonder3D + PeRFlow) and the mesh stage (TripoSR), each through its own preprocessing. Both preprocessors
get the chain's single rembg session, and that session remembers its last mask, so u2net loads once and
runs once per image.

The chain is the one place that picks device and dtype (CUDA float16, CPU float32), can offload stages
(each moves to the GPU only while it runs), seeds every stage from one seed, and measures per-stage time and
peak memory. The app, the command line and the batch tool are thin shells over ``TextTo3D.__call__``.

Where things live: the options and their bounds in `t2mv.settings` (`GenerationSettings`, validated once before
any stage runs), the input-image and output-path checks in `t2mv.inputs`, error classes and exit codes in
`t2mv.errors`; this module only composes and runs the stages. Given an ``output_dir``, a run writes each stage's
files as soon as the stage ends, so a late failure (no surface at the threshold, out of memory) keeps the image and
the views, with a ``FAILED.json`` marker naming the stage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .errors import SMOKE_HINT, BadInputError, StageFailedError, WeightsUnavailableError, is_missing_weights
from .inputs import (
    MAX_IMAGE_PIXELS,
    MIN_IMAGE_SIDE,
    check_output_folder,
    has_alpha,
    new_rembg_session,
    open_image,
    write_image,
    write_text,
)
from .residency import StageSlot, auto_low_memory, free_memory, move_stage
from .settings import MAX_SEED, SMOKE_SETTINGS, GenerationSettings
from .tiny import SMOKE_BANNER, FakeRembgSession, warn_smoke

logger = logging.getLogger(__name__)

DEFAULT_T2I_MODEL = "hansyan/perflow-sd15-dreamshaper"  # DreamShaper-8 with the PeRFlow ΔW already merged
DEFAULT_MULTIVIEW_MODEL = "flamehaze1115/wonder3d-v1.0"
DEFAULT_MULTIVIEW_DELTA = "hansyan/perflow-sd15-delta-weights"  # the SD1.5 ΔW, merged into Wonder3D's UNet
DEFAULT_TRIPOSR_MODEL = "stabilityai/TripoSR"
STAGES = ("text_to_image", "multiview", "mesh")
MESH_FORMATS = ("glb", "obj", "ply")
FAILED_MARKER = "FAILED.json"

# Kept only so existing callers (benchmarks/stages.py) run unchanged; new code uses GenerationSettings.
ChainDefaults = GenerationSettings
TINY_DEFAULTS = SMOKE_SETTINGS

__all__ = [
    "FAILED_MARKER",
    "MAX_IMAGE_PIXELS",
    "MAX_SEED",
    "MIN_IMAGE_SIDE",
    "STAGES",
    "ChainResult",
    "GenerationSettings",
    "StageFailedError",
    "TextTo3D",
    "WeightsUnavailableError",
    "horizontal_strip",
    "open_image",
    "resolve_device_dtype",
]


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
        finished: the stages that finished, in order (``text_to_image``/``input``, ``preprocess``, ...).
        field_mesh: the mesh with TripoSR's field colours (vertex colours), kept beside a views-textured `mesh`
            for comparison (None otherwise).
        info: what the view stages measured: ``view_texture`` (coverage, per-view silhouette IoU and share,
            the fitted camera, texture source used) and ``refine`` (accepted, losses summary, timings).
    """

    image: Image.Image | None = None
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
    finished: list[str] = field(default_factory=list)
    field_mesh: Any = None
    info: dict[str, Any] = field(default_factory=dict)

    def save_stage(
        self, stage: str, folder: str | os.PathLike, *, mesh_formats: Sequence[str] = ("glb",)
    ) -> dict[str, Path]:
        """Write one finished stage's files into `folder` (created), each atomically; return {name: path}.

        Stages and their files: ``text_to_image`` / ``input``: ``image.png``; ``preprocess``: ``mv_input.png``,
        ``mesh_input.png``; ``multiview``: ``normal_<i>_<view>.png``, ``color_<i>_<view>.png`` and the strips
        ``normals.png`` / ``colors.png``; ``mesh`` / ``refine`` / ``texture``: ``mesh.<fmt>`` for each of
        `mesh_formats` (``.obj`` also writes ``.mtl`` and the texture when textured), and with a views texture
        ``mesh_field.glb`` (the field-coloured mesh, for comparison); ``record``: ``settings.json`` (deterministic:
        same settings, same file), ``timings.json`` and ``info.json`` (coverage, per-view IoU, camera, refinement
        losses).
        """
        folder = Path(folder)
        paths: dict[str, Path] = {}

        def put(name: str, image: Image.Image) -> None:
            paths[name] = write_image(image, folder / f"{name}.png")

        if stage in ("text_to_image", "input") and self.image is not None:
            put("image", self.image)
        elif stage == "preprocess":
            if self.mv_input is not None:
                put("mv_input", self.mv_input)
            if self.mesh_input is not None:
                put("mesh_input", self.mesh_input)
        elif stage == "multiview":
            for kind, views in (("normal", self.normals), ("color", self.colors)):
                for i, (view, name) in enumerate(zip(views, self.view_names)):
                    put(f"{kind}_{i}_{name}", view)
                if views:
                    put(f"{kind}s", horizontal_strip(views))
        elif stage in ("mesh", "refine", "texture") and self.mesh is not None:
            from triposr.export import export_mesh

            folder.mkdir(parents=True, exist_ok=True)
            for fmt in check_mesh_formats(mesh_formats):
                for written in export_mesh(self.mesh, folder / f"mesh.{fmt}"):  # atomic; .obj also .mtl (+ .png)
                    paths[written.name] = written
            if stage == "texture" and self.field_mesh is not None:
                for written in export_mesh(self.field_mesh, folder / "mesh_field.glb"):
                    paths[written.name] = written
        elif stage == "record":
            paths["settings"] = write_text(_json(self.settings), folder / "settings.json")
            record = {"timings": self.timings, "memory": self.memory, "warnings": self.warnings}
            paths["timings"] = write_text(_json(record), folder / "timings.json")
            if self.info:
                paths["info"] = write_text(_json(self.info), folder / "info.json")
        return paths

    def save(self, folder: str | os.PathLike, *, mesh_formats: Sequence[str] = ("glb",)) -> dict[str, Path]:
        """Write the whole result into `folder` (created) and return {name: path} (see `save_stage` for the files).

        A ``FAILED.json`` left in `folder` by an earlier failed run is removed: the folder is now complete.
        """
        check_mesh_formats(mesh_formats)
        paths: dict[str, Path] = {}
        for stage in ("input", "preprocess", "multiview", "mesh", "record"):
            paths.update(self.save_stage(stage, folder, mesh_formats=mesh_formats))
        (Path(folder) / FAILED_MARKER).unlink(missing_ok=True)
        return paths


def _json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str) + "\n"


def check_mesh_formats(formats: Sequence[str]) -> list[str]:
    """Normalised mesh formats (``"GLB"``, ``".obj"`` → ``"glb"``, ``"obj"``); BadInputError for unknown ones."""
    names = [str(fmt).lower().lstrip(".") for fmt in formats]
    unknown = [name for name in names if name not in MESH_FORMATS]
    if unknown:
        raise BadInputError(f"mesh format must be glb, obj or ply, got {', '.join(map(repr, unknown))}.")
    return list(dict.fromkeys(names))


def horizontal_strip(images: Sequence[Image.Image]) -> Image.Image:
    """The images side by side, left to right, all at the first image's size: six 256² views → 1536×256 RGB."""
    width, height = images[0].size
    strip = Image.new("RGB", (width * len(images), height), (255, 255, 255))
    for i, image in enumerate(images):
        strip.paste(image.convert("RGB").resize((width, height)), (i * width, 0))
    return strip


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
        defaults: the `GenerationSettings` a call without `settings` uses (and the UI starts from); default
            `GenerationSettings()`, or `GenerationSettings.smoke()` in smoke mode.
        loaders: low-memory mode: {stage name: callable returning the stage} for stages that are loaded when
            they run and freed right after (``text_to_image``, ``multiview``, ``mesh``), instead of built stages.
        multiview_size: the multiview stage's input side when it comes from a loader (measured by
            `from_pretrained`/`tiny`, which check every loader once).
        compile: compiled mode for the diffusion stages (`TextToImage.enable_compile`,
            `MultiviewPipeline.enable_compile`); the first call at new shapes compiles (reported as
            ``<stage>.compile`` in the timings). Ignored, with a warning, in low-memory and offload modes.
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
        defaults: GenerationSettings | None = None,
        loaders: dict[str, Callable[[], Any]] | None = None,
        multiview_size: int | None = None,
        compile: bool = False,
    ):
        loaders = dict(loaders or {})
        if set(loaders) - set(STAGES):
            raise ValueError(f"loaders: unknown stage(s) {sorted(set(loaders) - set(STAGES))}; known: {STAGES}.")
        built = {"text_to_image": text_to_image, "multiview": multiview, "mesh": reconstructor}
        if not any(v is not None for v in built.values()) and not loaders:
            raise ValueError("TextTo3D needs at least one stage (text_to_image, multiview or reconstructor).")
        self.device, self.dtype = resolve_device_dtype(device, dtype)
        self.offload = bool(offload) and self.device.type != "cpu"
        # One slot per stage: a built stage (resident) or a loader (low-memory mode: loaded per run, freed after).
        # TripoSR always runs in float32 (its density threshold and marching cubes are tuned in float32).
        self._slots = {
            name: StageSlot(
                name, built[name], loaders.get(name), dtype=torch.float32 if name == "mesh" else self.dtype
            )
            for name in STAGES
        }
        self.low_memory = bool(loaders)
        self._multiview_size_hint = multiview_size
        self.smoke = smoke
        self.model_ids = dict(model_ids or {})
        self.defaults = defaults if defaults is not None else GenerationSettings.defaults(smoke)
        self._rembg_session = None if rembg_session is None else _MemoSession(rembg_session)
        if smoke:
            warn_smoke()
        # Without offload every resident stage lives on the device for the chain's lifetime; with it, on the CPU.
        home = "cpu" if self.offload else self.device
        for slot in self._slots.values():
            if slot.resident:
                move_stage(slot.stage, home, slot.dtype)
        self.compiled = self._enable_compile() if compile else {}

    def _enable_compile(self) -> dict[str, bool]:
        """Compiled mode for the diffusion stages (UNet + VAE decoder, static shapes; each stage's
        `enable_compile`), compiled on the first call at new shapes and reused. Returns {stage: compiled}."""
        if self.low_memory or self.offload:
            logger.warning(
                "--compile is ignored with %s: stages are rebuilt or moved per run, which would recompile every time.",
                "low-memory mode" if self.low_memory else "offload",
            )
            return {}
        compiled = {}
        for name in ("text_to_image", "multiview"):
            stage = self._slots[name].stage
            if stage is not None and hasattr(stage, "enable_compile"):
                compiled[name] = bool(stage.enable_compile())
        return compiled

    # The resident stages (None for a stage that is absent or loaded per run in low-memory mode: use `stages`).
    text_to_image = property(
        lambda self: self._slots["text_to_image"].stage,
        lambda self, stage: setattr(self._slots["text_to_image"], "stage", stage),
    )
    multiview = property(
        lambda self: self._slots["multiview"].stage,
        lambda self, stage: setattr(self._slots["multiview"], "stage", stage),
    )
    reconstructor = property(
        lambda self: self._slots["mesh"].stage, lambda self, stage: setattr(self._slots["mesh"], "stage", stage)
    )

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
        rembg_session: Any = None,
        low_memory: bool | None = False,
        compile: bool = False,
    ) -> TextTo3D:
        """Load the stages named in `stages` (hub ids or local folders) and compose them.

        `t2i_model` may already contain the PeRFlow ΔW (the default does); for a plain SD1.5 model such as
        ``Lykon/dreamshaper-8`` pass ``t2i_delta="hansyan/perflow-sd15-delta-weights"``.
        Missing weights raise `WeightsUnavailableError`, naming the repo, the fixes and smoke mode. `rembg_session`: a
        background-removal session loaded beforehand (`t2mv.inputs.new_rembg_session`), so a missing u2net is
        reported before gigabytes load; None loads it on first use.

        `low_memory`: keep at most one stage in memory: each stage is loaded when it runs and freed after it (the
        background remover stays shared). None decides by itself (`t2mv.residency.auto_low_memory`: on the CPU
        when the host has less RAM available than the resident chain needs). In low-memory mode every stage is
        still loaded once here, one at a time, so missing or broken weights fail now, before any work.
        """
        _check_stages(stages)
        device, dtype = resolve_device_dtype(device, dtype)  # checked before gigabytes are loaded
        if low_memory is None:
            low_memory = auto_low_memory(device, dtype)
            if low_memory:
                logger.warning(
                    "Less RAM available than the resident chain needs: low-memory mode (one stage at a time)."
                )
        load_device = "cpu" if offload or low_memory else device
        model_ids: dict[str, Any] = {}

        def load_t2i():
            from .text_to_image import TextToImage

            with _naming_stage("text-to-image", t2i_model):
                stage = TextToImage.from_pretrained(
                    str(t2i_model),
                    delta=None if t2i_delta is None else str(t2i_delta),
                    delta_variant=delta_variant,
                    torch_dtype=dtype,
                    device=str(load_device),
                    local_files_only=local_files_only,
                )
            if device.type == "cuda":  # xformers attention when it imports; torch SDPA otherwise
                stage.enable_xformers()
            return stage

        def load_multiview():
            from wonder3d_perflow import MultiviewPipeline

            with _naming_stage("multiview", multiview_model):
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

            with _naming_stage("mesh (TripoSR)", triposr_model):
                return TSR.from_pretrained(str(triposr_model), local_files_only=local_files_only)

        loaders = {"text_to_image": load_t2i, "multiview": load_multiview, "mesh": load_tsr}
        loaders = {name: fn for name, fn in loaders.items() if name in stages}
        if "text_to_image" in stages:
            model_ids.update(t2i_model=str(t2i_model), t2i_delta=None if t2i_delta is None else str(t2i_delta))
        if "multiview" in stages:
            model_ids.update(
                multiview_model=str(multiview_model),
                multiview_delta=None if multiview_delta is None else str(multiview_delta),
            )
        if "mesh" in stages:
            model_ids.update(triposr_model=str(triposr_model))
        model_ids["delta_variant"] = delta_variant
        common = dict(
            device=device,
            dtype=dtype,
            offload=offload,
            model_ids=model_ids,
            rembg_session=rembg_session,
            compile=compile,
        )
        if low_memory:
            return cls(loaders=_low_memory_loaders(loaders), multiview_size=_check_loaders(loaders), **common)
        built = {name: fn() for name, fn in loaders.items()}
        return cls(built.get("text_to_image"), built.get("multiview"), built.get("mesh"), **common)

    @classmethod
    def tiny(
        cls,
        seed: int = 0,
        *,
        stages: Sequence[str] = STAGES,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        offload: bool = False,
        low_memory: bool = False,
        compile: bool = False,
    ) -> TextTo3D:
        """Smoke mode: tiny random weights for every stage and a weightless background remover. Output is noise.
        `low_memory` builds each stage when it runs and frees it after (as `from_pretrained(low_memory=True)`)."""
        from triposr import TSR
        from wonder3d_perflow import MultiviewPipeline

        from .text_to_image import TextToImage

        _check_stages(stages)
        resolve_device_dtype(device, dtype)
        loaders = {
            "text_to_image": lambda: TextToImage.tiny(seed=seed),
            "multiview": lambda: MultiviewPipeline.tiny(seed=seed),
            "mesh": lambda: TSR.tiny(seed=seed),
        }
        loaders = {name: fn for name, fn in loaders.items() if name in stages}
        tiny_id = f"tiny(seed={seed})"
        common = dict(
            device=device,
            dtype=dtype,
            offload=offload,
            rembg_session=FakeRembgSession(),
            smoke=True,
            model_ids={"t2i_model": tiny_id, "multiview_model": tiny_id, "triposr_model": tiny_id},
            compile=compile,
        )
        if low_memory:
            return cls(loaders=_low_memory_loaders(loaders), multiview_size=_check_loaders(loaders), **common)
        built = {name: fn() for name, fn in loaders.items()}
        return cls(built.get("text_to_image"), built.get("multiview"), built.get("mesh"), **common)

    @property
    def rembg_session(self) -> Any:
        """The chain's one background-removal session, created on first use (u2net, or a fake in smoke mode).

        Raises:
            WeightsUnavailableError: u2net cannot be loaded (offline and not in ``$U2NET_HOME``), with the fixes.
        """
        if self._rembg_session is None:
            self._rembg_session = _MemoSession(FakeRembgSession() if self.smoke else new_rembg_session())
        return self._rembg_session

    @property
    def stages(self) -> tuple[str, ...]:
        """The stages this chain has (resident or loaded per run)."""
        return tuple(name for name in STAGES if self._slots[name].present)

    # ------------------------------------------------------------------------------------------ running
    def settings_for(self, settings: GenerationSettings | None = None, **options: Any) -> GenerationSettings:
        """`settings` (default: `self.defaults`) with `options` applied (None values ignored), validated.

        Raises:
            BadInputError: an unknown option, or an option out of its bounds (the message says what is allowed).
        """
        base = self.defaults if settings is None else settings
        if not isinstance(base, GenerationSettings):
            raise BadInputError(f"settings must be a GenerationSettings, got {type(base).__name__}.")
        return base.with_changes(**options).validate()

    def check_request(self, prompt: str | None, image: Any) -> None:
        """Raise BadInputError when there is neither a prompt nor an image, or text for a chain without that stage."""
        if image is None:
            if prompt is None or not str(prompt).strip():
                raise BadInputError("Enter a prompt (or give an image instead of a prompt).")
            if "text_to_image" not in self.stages:
                raise BadInputError("This chain was built without the text-to-image stage: give an image instead.")

    def needs_background_removal(
        self, image: Image.Image | None, settings: GenerationSettings, *, multiview: bool = True, mesh: bool = True
    ) -> bool:
        """Whether a run will call rembg: a preprocessing stage runs, removal is on, and the image has no alpha
        (a generated image, `image=None`, never has)."""
        preprocessing = (multiview and "multiview" in self.stages) or (mesh and "mesh" in self.stages)
        return preprocessing and settings.remove_background and (image is None or not has_alpha(image))

    def __call__(
        self,
        prompt: str | None = None,
        *,
        image: Image.Image | str | os.PathLike | None = None,
        settings: GenerationSettings | None = None,
        negative_prompt: str | None = None,
        multiview: bool = True,
        mesh: bool = True,
        callback: Callable[[str, int, int], None] | None = None,
        output_dir: str | os.PathLike | None = None,
        mesh_formats: Sequence[str] = ("glb",),
        on_stage_done: Callable[[str, ChainResult], None] | None = None,
        **options: Any,
    ) -> ChainResult:
        """Run the chain: prompt (or `image`) → image → multiview and mesh.

        Args:
            prompt: the text; ignored (with a warning) when `image` is given.
            image: a PIL image or a path, used instead of the text-to-image stage (checked by `open_image`).
            settings: the generation settings (default: `self.defaults`); validated here, before any stage runs.
                Every stage draws its noise from its own CPU generator seeded with ``settings.seed``, so results do
                not depend on the device's RNG or on what ran before.
            negative_prompt: for the text-to-image stage.
            multiview, mesh: run these stages (when the chain has them).
            callback: called as ``callback(stage_name, index, total)`` before each stage (for progress bars).
            output_dir: write each stage's files here as soon as the stage ends (`ChainResult.save_stage`), and
                ``settings.json`` / ``timings.json`` at the end. When a stage fails after others finished, their
                files stay, ``FAILED.json`` names the stage and the error, and `StageFailedError` is raised.
            mesh_formats: the mesh files written into `output_dir` (``glb``, ``obj``, ``ply``).
            on_stage_done: called as ``on_stage_done(stage_name, partial_result)`` after each stage.
            **options: `GenerationSettings` fields overriding `settings` (``seed=3, mc_resolution=128``): a shim
                for keyword callers; unknown names raise `BadInputError`.

        Returns:
            The `ChainResult` (``settings`` holds everything needed to reproduce it).

        Raises:
            BadInputError: bad settings, no prompt/image, an unusable image or output folder (before any stage).
            WeightsUnavailableError: background removal is needed and u2net is missing (before any stage).
            StageFailedError: a stage failed after earlier ones were written to `output_dir` (its ``cause`` is the
                original error). Without `output_dir` the original error is raised.
        """
        # 1. Check everything before the first stage: settings, request, image, output folder, background removal.
        settings = self.settings_for(settings, **options)
        self.check_request(prompt, image)
        formats = check_mesh_formats(mesh_formats)
        folder = None if output_dir is None else check_output_folder(output_dir)
        run_multiview = multiview and "multiview" in self.stages
        run_mesh = mesh and "mesh" in self.stages
        messages: list[str] = []
        if image is not None and prompt is not None and str(prompt).strip():
            messages.append("An image was given, so the prompt was not used.")
        if image is not None:
            image = open_image(image)
        use_rembg = self.needs_background_removal(image, settings, multiview=run_multiview, mesh=run_mesh)
        session = self.rembg_session if use_rembg else None  # loads u2net now, not after minutes of work

        text_input = image is None
        stage_names = (["text_to_image"] if text_input else []) + (["preprocess"] if run_multiview or run_mesh else [])
        stage_names += (["multiview"] if run_multiview else []) + (["mesh"] if run_mesh else [])
        # Colours from the views need the views; without the multiview stage the field's colours are used.
        views_texture = run_mesh and run_multiview and settings.texture_source == "views"
        refine = views_texture and settings.refine
        # "views" is the default texture source whenever the views exist; only an explicit refine request is told.
        if run_mesh and not run_multiview and settings.refine:
            messages.append("The multiview stage did not run, so the mesh keeps TripoSR's field colours and shape.")
        stage_names += ["refine"] if refine else []
        stage_names += ["texture"] if views_texture or (run_mesh and settings.bake_texture) else []
        if (run_multiview or run_mesh) and settings.remove_background and not use_rembg:
            object_mask = "input alpha"  # the cut-out the user gave; rembg did not run
        else:
            object_mask = "rembg u2net" if use_rembg else "none (whole image)"
        result = ChainResult(image=image, warnings=messages)
        result.settings = {
            "prompt": str(prompt) if text_input else None,
            "negative_prompt": negative_prompt if text_input else None,
            "input": "text" if text_input else "image",
            **settings.to_dict(),
            "remove_background": use_rembg,  # what happened: False when the input's alpha was used
            "object_mask": object_mask,
            "simplify_faces": settings.simplify_faces or None,
            "bake_texture": bool(settings.bake_texture and run_mesh and not views_texture),
            "texture_source": ("views" if views_texture else "field") if run_mesh else None,
            "refine": refine,
            "stages": [s for s in stage_names if s not in ("preprocess", "texture")],
            "models": self.model_ids,
            "device": self.device.type,
            "dtype": str(self.dtype).removeprefix("torch."),
            "offload": self.offload,
            "low_memory": self.low_memory,
            "compiled": self.compiled,
            "smoke": self.smoke,
            "versions": _versions(),
        }
        timings, memory = result.timings, result.memory
        started = time.perf_counter()
        current = "input"

        def enter(name: str) -> float:
            nonlocal current
            current = name
            if callback is not None:
                callback(name, stage_names.index(name), len(stage_names))
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            return time.perf_counter()

        def leave(name: str, start: float) -> None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                memory[f"{name}.gpu_peak"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            timings[name] = time.perf_counter() - start
            memory[f"{name}.host_rss"] = _host_rss_gib()
            done(name)

        def done(name: str) -> None:
            if folder is not None:
                result.save_stage(name, folder, mesh_formats=formats)
            result.finished.append(name)  # on disk now (when there is a folder)
            if on_stage_done is not None:
                on_stage_done(name, result)

        try:
            if not text_input:
                done("input")
            else:  # 2. Text to image.
                start = enter("text_to_image")
                out = self._slots["text_to_image"].run(
                    self.device,
                    lambda text_to_image: text_to_image(
                        str(prompt),
                        negative_prompt=negative_prompt,
                        num_inference_steps=settings.t2i_steps,
                        guidance_scale=settings.t2i_guidance,
                        height=settings.height,
                        width=settings.width,
                        generator=torch.Generator("cpu").manual_seed(settings.seed),
                    ),
                    offload=self.offload,
                )
                result.image = out.images[0]
                messages += list(getattr(out, "warnings", []))
                timings.update({f"text_to_image.{k}": v for k, v in getattr(out, "timings", {}).items()})
                leave("text_to_image", start)

            # 3. Preprocess for both stages (one rembg pass, shared through the memo session).
            if run_multiview or run_mesh:
                start = enter("preprocess")
                if run_multiview:
                    from wonder3d_perflow.preprocess import preprocess_image as multiview_preprocess

                    result.mv_input = multiview_preprocess(
                        result.image,
                        session=session,
                        remove_background=settings.remove_background,
                        size=self._multiview_size(),
                        mode=settings.mv_preprocess,
                        foreground_ratio=settings.mv_foreground_ratio,
                    )
                if run_mesh:
                    from triposr.preprocess import preprocess_image as mesh_preprocess

                    result.mesh_input = mesh_preprocess(
                        result.image,
                        session=session,
                        remove_background=settings.remove_background,
                        foreground_ratio=settings.mesh_foreground_ratio,
                    )
                leave("preprocess", start)

            # 4. Six normals and six colors.
            if run_multiview:
                start = enter("multiview")
                mv_out = self._slots["multiview"].run(
                    self.device,
                    lambda multiview_stage: multiview_stage(
                        result.mv_input,
                        num_inference_steps=settings.mv_steps,
                        guidance_scale=settings.mv_guidance,
                        generator=torch.Generator("cpu").manual_seed(settings.seed),
                    ),
                    offload=self.offload,
                )
                result.normals, result.colors = list(mv_out.normals), list(mv_out.colors)
                result.view_names = tuple(mv_out.view_names)
                timings.update({f"multiview.{k}": v for k, v in getattr(mv_out, "timings", {}).items()})
                leave("multiview", start)

            # 5. Mesh (and texture, while TripoSR is on the device).
            if run_mesh:
                start = enter("mesh")
                self._slots["mesh"].run(
                    self.device,
                    lambda reconstructor: self._mesh_stages(
                        reconstructor, result, settings, start, views_texture, refine, enter, leave
                    ),
                    offload=self.offload,
                )
        except BaseException as error:
            if folder is None or not result.finished:
                raise
            self._mark_failed(folder, current, error, result)
            if not isinstance(error, Exception):  # KeyboardInterrupt, SystemExit: files kept, marker written
                raise
            raise StageFailedError(current, folder, error) from error

        timings["total"] = time.perf_counter() - started
        memory["host_peak_rss"] = _host_peak_rss_gib()
        if self.smoke:
            messages.insert(0, SMOKE_BANNER)
        if folder is not None:
            result.save_stage("record", folder)
            (folder / FAILED_MARKER).unlink(missing_ok=True)  # an earlier failed run's marker: the folder is whole now
        return result

    def _mesh_stages(
        self,
        reconstructor: Any,
        result: ChainResult,
        settings: GenerationSettings,
        start: float,
        views_texture: bool,
        refine: bool,
        enter: Callable[[str], float],
        leave: Callable[[str, float], None],
    ) -> None:
        """Steps 5–7 while TripoSR is on the device: scene code → mesh (+ simplify), then the views' refinement and
        texture, or the field's baked texture. Results go into `result`."""
        scene_codes = reconstructor([result.mesh_input], device=self.device)  # (1, 3, C, H, W)
        result_mesh = reconstructor.extract_mesh(
            scene_codes, resolution=settings.mc_resolution, threshold=settings.mc_threshold
        )[0]
        if settings.simplify_faces:
            from triposr.mesh import simplify

            result_mesh = simplify(result_mesh, settings.simplify_faces)
        result.mesh = result_mesh
        leave("mesh", start)
        if views_texture:
            self._views_to_mesh(result, settings, reconstructor, scene_codes[0], refine, enter, leave)
        elif settings.bake_texture:
            from triposr.texture import bake_texture

            start = enter("texture")
            result.mesh = bake_texture(reconstructor, scene_codes[0], result_mesh, texture_size=settings.texture_size)
            leave("texture", start)

    def _views_to_mesh(
        self,
        result: ChainResult,
        settings: GenerationSettings,
        reconstructor: Any,
        scene_code: torch.Tensor,
        refine: bool,
        enter: Callable[[str], float],
        leave: Callable[[str, float], None],
    ) -> None:
        """Steps 6–7: the six views shape (optionally) and texture the TripoSR mesh, in place on `result`.

        The silhouette fit (`fit_camera`) aligns the mesh with the views; refinement fits the vertices to the normal
        maps (rejected, with a warning, when it fits worse); the texture is projected from the colour views onto the
        (refined) mesh, with TripoSR's colour field where no view sees the surface. Views that cannot be aligned
        leave the field's colours, with a warning: the mesh and the views are kept either way.
        """
        from triposr.mesh import scene_code_query_fn
        from triposr.texture import bake_texture, field_color_fn

        from .view_texture import ViewTextureError, fit_camera, texture_from_views, view_masks

        field_mesh = result.mesh
        if refine:
            from .view_refine import refine_mesh

            start = enter("refine")
            masks = view_masks(result.colors)  # 6 x (S, S) bool: the generated views' white background
            try:
                camera, _ = fit_camera(field_mesh, masks, device=self.device)
                refined = refine_mesh(
                    field_mesh,
                    result.normals,
                    torch.stack(masks).float(),
                    camera,
                    iterations=settings.refine_iterations,
                    device=self.device,
                    seed=settings.seed,
                )
            except ValueError as e:  # the views cannot be aligned: the TripoSR shape stays
                result.warnings.append(f"Refinement skipped: {e}")
                result.info["refine"] = {"accepted": False, "error": str(e)}
            else:
                result.warnings += [f"Refinement: {w}" for w in refined.warnings]
                field_mesh = result.mesh = refined.mesh
                result.info["refine"] = {
                    "accepted": refined.accepted,
                    "losses": {k: v for k, v in refined.losses.items() if k != "history"},
                    "loss_first_last": _first_last(refined.losses.get("history")),
                    "timings": refined.timings,
                }
                result.timings.update({f"refine.{k}": v for k, v in refined.timings.items()})
            leave("refine", start)

        start = enter("texture")
        with torch.no_grad():
            fallback = field_color_fn(scene_code_query_fn(reconstructor, scene_code))
            try:
                textured = texture_from_views(
                    field_mesh,
                    result.colors,
                    texture_size=settings.texture_size,
                    fallback=fallback,
                    device=self.device,
                )
            except ViewTextureError as e:
                result.warnings.append(f"The views could not texture the mesh ({e}); it keeps TripoSR's colours.")
                result.info["view_texture"] = {"texture_source": "field", "error": str(e)}
                result.settings["texture_source"] = "field"
                if settings.bake_texture:
                    result.mesh = bake_texture(
                        reconstructor, scene_code, field_mesh, texture_size=settings.texture_size
                    )
            else:
                result.field_mesh, result.mesh = field_mesh, textured.mesh
                result.warnings += [f"View texture: {w}" for w in textured.warnings]
                result.info["view_texture"] = {
                    "texture_source": "views",
                    "coverage": textured.coverage,
                    "view_iou": dict(zip(result.view_names, textured.view_iou)),
                    "view_share": dict(zip(result.view_names, textured.view_share)),
                    "camera": {"scale": textured.camera.scale, "center": list(textured.camera.center)},
                }
                result.timings.update({f"texture.{k}": v for k, v in textured.timings.items()})
        leave("texture", start)

    @staticmethod
    def _mark_failed(folder: Path, stage: str, error: BaseException, result: ChainResult) -> None:
        """Write FAILED.json (which stage failed, why, what finished) and the settings next to the kept files."""
        marker = {
            "failed_stage": stage,
            "error_type": type(error).__name__,
            "error": " ".join(str(error).split()),
            "finished_stages": list(result.finished),
            "timings": result.timings,
        }
        try:
            write_text(_json(marker), folder / FAILED_MARKER)
            result.save_stage("record", folder)
        except OSError as e:  # the disk itself failed: the original error matters more than the marker
            logger.warning("could not write %s: %s", folder / FAILED_MARKER, e)

    def _multiview_size(self) -> int:
        if self.multiview is None:  # low-memory mode: measured when the stage was checked at construction
            return int(self._multiview_size_hint)
        return _multiview_size(self.multiview)

    def with_defaults(self, **changes: Any) -> TextTo3D:
        """Change the default settings (e.g. ``chain.with_defaults(mc_resolution=128)``), validated; returns self."""
        self.defaults = self.defaults.with_changes(**changes).validate()
        return self


class _naming_stage:
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


def _first_last(history: Sequence[float] | None) -> list[float] | None:
    """The first and last of a loss history (info.json keeps the summary, not every iteration)."""
    return None if not history else [float(history[0]), float(history[-1])]


def _multiview_size(pipe: Any) -> int:
    """The multiview stage's input side: its UNet's latent size times the VAE's scale (256 for Wonder3D)."""
    return int(pipe.unet.config.sample_size * pipe.vae_scale_factor)


def _low_memory_loaders(loaders: dict[str, Callable[[], Any]]) -> dict[str, Callable[[], Any]]:
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


def _check_loaders(loaders: dict[str, Callable[[], Any]]) -> int | None:
    """Low-memory mode: load each stage once, one at a time, and free it, so that missing or broken weights fail
    at construction rather than minutes into a run. Returns the multiview stage's input size (None without it)."""
    size = None
    for name, load in loaders.items():
        stage = load()
        if name == "multiview":
            size = _multiview_size(stage)
        del stage
        free_memory()
    return size


def _versions() -> dict[str, str]:
    import diffusers

    from . import __version__

    return {
        "t2mv": __version__,
        "torch": torch.__version__.split("+")[0],
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
    }
