"""TextTo3D: text → image → (six normals + six colors, mesh), every model resident in one process.

The text-to-image result (or an image the user gives instead of a prompt) feeds both the multiview stage
(Wonder3D + PeRFlow) and the mesh stage (TripoSR), each through its own preprocessing. Both preprocessors
get the chain's single rembg session, and that session remembers its last mask, so u2net loads once and
runs once per image.

The chain is the one place that picks device and dtype (CUDA float16, CPU float32), can offload stages
(each moves to the GPU only while it runs), seeds every stage from one seed, and measures per-stage time and
peak memory. The app, the command line and the batch tool are thin shells over ``TextTo3D.__call__``.

The package: `stages` (one small class per stage: what it needs, adds, runs and writes), `runner` (progress,
timings, memory, files as each stage ends, ``FAILED.json``, loading and freeing the models), `result`
(`ChainResult`), `loading` (the models' loaders, device/dtype), `files` (file conventions). This module loads the
models, plans the stages for a request and hands them to the runner. Where else things live: the options and their
bounds in `t2mv.settings` (`GenerationSettings`, validated once before any stage runs), the input-image and
output-path checks in `t2mv.inputs`, error classes and exit codes in `t2mv.errors`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from PIL import Image

from ..errors import BadInputError, StageFailedError, WeightsUnavailableError
from ..inputs import MAX_IMAGE_PIXELS, MIN_IMAGE_SIDE, check_output_folder, has_alpha, new_rembg_session, open_image
from ..residency import StageSlot, auto_low_memory, move_stage
from ..settings import MAX_SEED, SMOKE_SETTINGS, GenerationSettings
from ..tiny import SMOKE_BANNER, FakeRembgSession, warn_smoke
from .extra_stages import SMOKE_TURNTABLE_SIZE, Choose, GivenCandidates, Turntable, given_candidates
from .files import FAILED_MARKER, MESH_FORMATS, check_mesh_formats, horizontal_strip, to_json
from .loading import (
    DEFAULT_MULTIVIEW_DELTA,
    DEFAULT_MULTIVIEW_MODEL,
    DEFAULT_T2I_MODEL,
    DEFAULT_TRIPOSR_MODEL,
    STAGES,
    MemoSession,
    check_loaders,
    check_stages,
    describe_chain,
    enable_compile,
    low_memory_loaders,
    model_ids,
    multiview_size,
    naming_stage,
    pretrained_loaders,
    resolve_device_dtype,
    slot_stage,
    tiny_loaders,
)
from .result import ChainResult, StageRow, run_record
from .runner import Runner
from .stages import (
    STAGE_TYPES,
    InputImage,
    Mesh,
    Multiview,
    Preprocess,
    Stage,
    StageContext,
    TextToImageStage,
    Texture,
)

logger = logging.getLogger(__name__)

# Kept only so existing callers run unchanged; new code uses GenerationSettings.
ChainDefaults = GenerationSettings
TINY_DEFAULTS = SMOKE_SETTINGS
# The names this module had before it became a package (tests and benchmarks import them).
_json, _MemoSession, _naming_stage = to_json, MemoSession, naming_stage
_low_memory_loaders, _check_loaders = low_memory_loaders, check_loaders

__all__ = [
    "DEFAULT_MULTIVIEW_DELTA",
    "DEFAULT_MULTIVIEW_MODEL",
    "DEFAULT_T2I_MODEL",
    "DEFAULT_TRIPOSR_MODEL",
    "FAILED_MARKER",
    "MAX_IMAGE_PIXELS",
    "MAX_SEED",
    "MESH_FORMATS",
    "MIN_IMAGE_SIDE",
    "STAGES",
    "STAGE_TYPES",
    "ChainResult",
    "GenerationSettings",
    "Stage",
    "StageContext",
    "StageFailedError",
    "StageRow",
    "TextTo3D",
    "WeightsUnavailableError",
    "check_mesh_formats",
    "horizontal_strip",
    "open_image",
    "resolve_device_dtype",
]


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
        # One slot per model: a built stage (resident) or a loader (low-memory mode: loaded per run, freed after).
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
        t2i = self._slots["text_to_image"].stage
        if defaults is None and getattr(t2i, "kind", "perflow") != "perflow":
            # A rectified-flow text-to-image model (InstaFlow) brings its own steps and guidance as the defaults.
            from ..settings import t2i_model_defaults

            self.defaults = self.defaults.with_changes(**t2i_model_defaults(t2i.kind, t2i.settings.get("model", "")))
        # The PeRFlow-Refiner (--upscale): what `t2mv.chain.upscale` loads on the first request that asks for it.
        from ..refiner import DEFAULT_CONTROLNET

        self.refiner_controlnet, self.refiner_base = DEFAULT_CONTROLNET, DEFAULT_T2I_MODEL
        self.local_files_only: bool | None = None
        self._refiner_parts = None
        self._rembg_session = None if rembg_session is None else MemoSession(rembg_session)
        if smoke:
            warn_smoke()
        # Without offload every resident stage lives on the device for the chain's lifetime; with it, on the CPU.
        home = "cpu" if self.offload else self.device
        for slot in self._slots.values():
            if slot.resident:
                move_stage(slot.stage, home, slot.dtype)
        self.compiled = enable_compile(self._slots, self.low_memory, self.offload) if compile else {}

    # The resident stages (None for a stage that is absent or loaded per run in low-memory mode: use `stages`).
    text_to_image, multiview, reconstructor = map(slot_stage, ("text_to_image", "multiview", "mesh"))

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
        check_stages(stages)
        device, dtype = resolve_device_dtype(device, dtype)  # checked before gigabytes are loaded
        if low_memory is None:
            low_memory = auto_low_memory(device, dtype)
            if low_memory:
                logger.warning(
                    "Less RAM available than the resident chain needs: low-memory mode (one stage at a time)."
                )
        ids = model_ids(stages, t2i_model, t2i_delta, multiview_model, multiview_delta, triposr_model, delta_variant)
        loaders = pretrained_loaders(
            t2i_model=t2i_model,
            t2i_delta=t2i_delta,
            multiview_model=multiview_model,
            multiview_delta=multiview_delta,
            delta_variant=delta_variant,
            triposr_model=triposr_model,
            device=device,
            dtype=dtype,
            load_device="cpu" if offload or low_memory else device,
            local_files_only=local_files_only,
        )
        common = dict(device=device, dtype=dtype, offload=offload, rembg_session=rembg_session, compile=compile)
        return cls._build(loaders, stages, bool(low_memory), model_ids=ids, **common)

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
        check_stages(stages)
        resolve_device_dtype(device, dtype)
        tiny_id = f"tiny(seed={seed})"
        return cls._build(
            tiny_loaders(seed),
            stages,
            low_memory,
            device=device,
            dtype=dtype,
            offload=offload,
            rembg_session=FakeRembgSession(),
            smoke=True,
            model_ids={"t2i_model": tiny_id, "multiview_model": tiny_id, "triposr_model": tiny_id},
            compile=compile,
        )

    @classmethod
    def _build(cls, loaders: dict[str, Callable[[], Any]], stages: Sequence[str], low_memory: bool, **common):
        """The chain from {slot: loader} for `stages`: each loaded now (resident), or checked once and loaded per
        run (low-memory mode)."""
        loaders = {name: fn for name, fn in loaders.items() if name in stages}
        if low_memory:
            return cls(loaders=low_memory_loaders(loaders), multiview_size=check_loaders(loaders), **common)
        built = {name: fn() for name, fn in loaders.items()}
        return cls(built.get("text_to_image"), built.get("multiview"), built.get("mesh"), **common)

    @property
    def rembg_session(self) -> Any:
        """The chain's one background-removal session, created on first use (u2net, or a fake in smoke mode).

        Raises:
            WeightsUnavailableError: u2net cannot be loaded (offline and not in ``$U2NET_HOME``), with the fixes.
        """
        if self._rembg_session is None:
            self._rembg_session = MemoSession(FakeRembgSession() if self.smoke else new_rembg_session())
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
        settings = base.with_changes(**options).validate()
        t2i = self._slots["text_to_image"].stage
        from ..settings import t2i_kind_problem  # the steps against the loaded model's kind (PeRFlow: ≥ 4)

        problem = None if t2i is None else t2i_kind_problem(settings, getattr(t2i, "kind", "perflow"))
        if problem:
            raise BadInputError(problem)
        return settings

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
        """Whether a run will call rembg: a preprocessing stage runs or generated candidates are scored (the
        score reads the object mask the 3D stages would cut, so `t2mv image` and `text-to-mesh` choose alike),
        removal is on, and the image has no alpha (a generated image, `image=None`, never has)."""
        preprocessing = (multiview and "multiview" in self.stages) or (mesh and "mesh" in self.stages)
        scoring = image is None and settings.candidates > 1
        return (preprocessing or scoring) and settings.remove_background and (image is None or not has_alpha(image))

    def plan(
        self,
        settings: GenerationSettings,
        *,
        prompt: str | None = None,
        negative_prompt: str | None = None,
        text_input: bool = True,
        multiview: bool = True,
        mesh: bool = True,
        candidates: Sequence[Image.Image] | None = None,
    ) -> list[Stage]:
        """The stages a request runs, in order: the image (generated or given), preprocessing, the views, the mesh,
        then the views' refinement and the texture (from the views when they exist, else TripoSR's baked field)."""
        run_multiview = multiview and "multiview" in self.stages
        run_mesh = mesh and "mesh" in self.stages
        if candidates:  # made earlier from this prompt (the app's "Make 3D" from another candidate)
            plan: list[Stage] = [GivenCandidates(list(candidates)), Choose()]
        elif text_input:
            plan = [TextToImageStage(str(prompt), negative_prompt, settings.candidates)]
            plan += [Choose()] if settings.candidates > 1 else []
        else:
            plan = [InputImage()]
        if settings.upscale and plan[0].name != "input":  # the PeRFlow-Refiner refines a prompt's image
            from .upscale import Upscale

            plan.append(Upscale(str(prompt)))
        if run_multiview or run_mesh:
            plan.append(Preprocess(multiview=run_multiview, mesh=run_mesh))
        plan += [Multiview()] if run_multiview else []
        if run_mesh:
            plan.append(Mesh())
            # Colours from the views need the views; without the multiview stage the field's colours are used.
            if run_multiview and settings.texture_source == "views":
                plan.append(Texture("views", refine=settings.refine))
            elif settings.bake_texture:
                plan.append(Texture("field"))
        if run_mesh and settings.turntable:  # smoke mode: a small video of a noise mesh, quickly
            plan.append(Turntable(size=SMOKE_TURNTABLE_SIZE) if self.smoke else Turntable())
        return plan

    def __call__(
        self,
        prompt: str | None = None,
        *,
        image: Image.Image | str | os.PathLike | None = None,
        candidates: Sequence[Image.Image | str | os.PathLike] | None = None,
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
            candidates: images made earlier from `prompt` (a best-of-N run's ``candidate_<k>.png``), used instead
                of making new ones: ``settings.choose`` picks one (-1: scored again), the 3D stages run from it.
            settings: the generation settings (default: `self.defaults`); validated here, before any stage runs.
                Every stage draws its noise from its own CPU generator seeded with ``settings.seed``, so results do
                not depend on the device's RNG or on what ran before.
            negative_prompt: for the text-to-image stage.
            multiview, mesh: run these stages (when the chain has them).
            callback: called as ``callback(stage_name, index, total)`` before each stage (for progress bars).
            output_dir: write each stage's files here as soon as the stage ends (`ChainResult.save_stage`), and
                ``settings.json`` / ``timings.json`` at the end. When a stage fails after others finished, their
                files stay, ``FAILED.json`` names the stage and the error, and `StageFailedError` is raised.
            mesh_formats: the mesh files written into `output_dir` (``glb``, ``obj``, ``ply``, ``stl``).
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
        # Check everything before the first stage: settings, request, image, output folder, background removal.
        settings = self.settings_for(settings, **options)
        self.check_request(prompt, image)
        if candidates is not None:
            candidates, settings = given_candidates(image, candidates, settings)
        formats = check_mesh_formats(mesh_formats)
        folder = None if output_dir is None else check_output_folder(output_dir)
        run_multiview = multiview and "multiview" in self.stages
        run_mesh = mesh and "mesh" in self.stages
        warnings: list[str] = [SMOKE_BANNER] if self.smoke else []
        if image is not None and prompt is not None and str(prompt).strip():
            warnings.append("An image was given, so the prompt was not used.")
        if image is not None:
            image = open_image(image)
        use_rembg = self.needs_background_removal(image, settings, multiview=run_multiview, mesh=run_mesh)
        session = self.rembg_session if use_rembg else None  # loads u2net now, not after minutes of work
        if run_mesh and not run_multiview and settings.refine:  # only an explicit refine request is told
            warnings.append("The multiview stage did not run, so the mesh keeps TripoSR's field colours and shape.")

        text_input = image is None
        plan = self.plan(
            settings,
            prompt=prompt,
            negative_prompt=negative_prompt,
            text_input=text_input,
            multiview=multiview,
            mesh=mesh,
            candidates=candidates,
        )
        result = ChainResult(image=image, warnings=warnings)
        result.settings = run_record(
            settings, plan, prompt if text_input else None, negative_prompt, use_rembg, describe_chain(self)
        )
        ctx = StageContext(result, settings, self.device, session, self._multiview_size() if run_multiview else None)
        if any(stage.name == "upscale" for stage in plan):
            from .upscale import chain_refiner

            ctx.scratch["refiner_parts"] = chain_refiner(self)  # before any stage: a missing ControlNet is exit 3
        runner = Runner(
            self._slots,
            self.device,
            offload=self.offload,
            callback=callback,
            on_stage_done=on_stage_done,
            folder=folder,
            mesh_formats=formats,
        )
        return runner.run(plan, ctx)

    def _multiview_size(self) -> int:
        if self.multiview is None:  # low-memory mode: measured when the stage was checked at construction
            return int(self._multiview_size_hint)
        return multiview_size(self.multiview)

    def with_defaults(self, **changes: Any) -> TextTo3D:
        """Change the default settings (e.g. ``chain.with_defaults(mc_resolution=128)``), validated; returns self."""
        self.defaults = self.defaults.with_changes(**changes).validate()
        return self
