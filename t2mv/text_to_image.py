"""Text → image: a diffusers ``StableDiffusionPipeline`` (SD1.5 family) sampled with the PeRFlow scheduler.

Two ways to get a PeRFlow SD1.5 model (both sampled with ``prediction_type="diff_eps"``, 4 time windows, as every
upstream SD1.5 script does):

- a merged PeRFlow repo, e.g. ``hansyan/perflow-sd15-dreamshaper`` (the default), ``-realisticVisionV51``,
  ``-architectureexterior``, ``-disney``;
- any SD1.5 fine-tune plus the ΔW, e.g. ``model="Lykon/dreamshaper-8", delta="hansyan/perflow-sd15-delta-weights"``
  (upstream's text → multiview demo).

Hub ids and local folders both work (a folder with ``tokenizer/ text_encoder/ unet/ vae/ scheduler/``
subfolders, ``model_index.json`` optional). No safety checker is loaded: the product renders objects for 3D, and
upstream's demos pass ``safety_checker=None`` too. PeRFlow weights are CC-BY-NC-4.0.
"""

from __future__ import annotations

import gc
import json
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# The speed levers live in the leaf module `t2mv.accel` (shared with the multiview stage); re-exported here.
from .accel import (  # noqa: F401
    SDPA_PRIORITY,
    CompiledRun,
    compile_module,
    compile_unavailable_reason,
    enable_compile_on,
    is_compiled,
    preferred_sdpa,
    run_compile_warm_up,
    sdpa_choice,
    sdpa_kernels,
    uncompile_module,
)
from .perflow.delta import load_delta_weights, merge_delta_weights
from .perflow.hub import MissingWeightsError, resolve_pretrained
from .rectified_flow import KindDefaults, defaults_for, kind_of_folder

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "hansyan/perflow-sd15-dreamshaper"
DEFAULT_DELTA = "hansyan/perflow-sd15-delta-weights"
#: PeRFlow scheduler settings of every upstream SD1.5 route (merged models and ΔW alike).
PERFLOW_SD15_SCHEDULER = {"prediction_type": "diff_eps", "num_time_windows": 4}

#: Upstream's settings for the text → multiview chain (app/Wonder3D/sd15_t2mv_gradio.py): 4 steps, CFG 4.5, "" negative.
CHAIN_PRESET = {"num_inference_steps": 4, "guidance_scale": 4.5, "negative_prompt": ""}
#: Upstream's plain text-to-image settings (scripts/sd15_t2i_merged.py, README): 8 steps, CFG 7.5 and its negative.
T2I_NEGATIVE_PROMPT = (
    "distorted, blur, smooth, low-quality, warm, haze, over-saturated, high-contrast, out of focus, dark"
)
T2I_PROMPT_PREFIX = "RAW photo, 8k uhd, dslr, high quality, film grain, highly detailed, masterpiece; "
T2I_PRESET = {"num_inference_steps": 8, "guidance_scale": 7.5, "negative_prompt": T2I_NEGATIVE_PROMPT}

#: runwayml/stable-diffusion-v1-5 unet/config.json (the architecture every SD1.5 fine-tune and the ΔW share).
SD15_UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

# Tiny random pipeline for the smoke mode (same shapes as tests/fixtures/perflow_t2i_tiny/).
_TINY_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [16, 32],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "cross_attention_dim": 32,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}
_TINY_VAE_CONFIG: dict[str, Any] = {
    "block_out_channels": [4, 8, 8, 8],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 4,
    "sample_size": 64,
}
_TINY_CHARACTERS = "abcdefghijklmnopqrstuvwxyz0123456789,.;:!?'-()"

_WEIGHTS = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}
_OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class TextToImageOutput:
    """Result of [`TextToImage.__call__`].

    Attributes:
        images: ``list[PIL.Image]`` (``"pil"``), a ``(B, H, W, 3)`` array (``"np"``), a ``(B, 3, H, W)`` tensor in
            [0, 1] (``"pt"``) or the ``(B, 4, H/8, W/8)`` latents (``"latent"``); B = prompts × images per prompt.
        warnings: messages about the input (e.g. prompt text cut at CLIP's 77 tokens); also logged.
        timings: seconds, ``{"text_to_image": ...}``, plus ``"compile"`` on a compiled pipeline's first call at new
            shapes (the untimed warm-up call that compiled; see [`TextToImage.enable_compile`]).
        settings: everything needed to reproduce the call (model, ΔW, scheduler, steps, CFG, size, seed...).
    """

    images: Any
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)


def check_prompt(prompt: str, tokenizer) -> list[str]:
    """Validate a prompt against the CLIP tokenizer; return warnings (empty when all is well).

    Raises:
        ValueError: the prompt is not a string, or is empty / only whitespace.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"The prompt must be a string, got {type(prompt).__name__}.")
    if not prompt.strip():
        raise ValueError("The prompt is empty: describe the object to generate, e.g. 'a red sports car'.")
    return _truncation_warnings(prompt, tokenizer, what="Prompt")


#: How much of the cut end of a long prompt the warning quotes (a 2000-word prompt must not give a 12 KB warning).
CUT_QUOTE_CHARS = 60


def _truncation_warnings(text: str, tokenizer, what: str) -> list[str]:
    ids = tokenizer(text, truncation=False, verbose=False).input_ids  # with start and end tokens
    limit = tokenizer.model_max_length
    if len(ids) <= limit:
        return []
    # The pipeline keeps the start token, the first limit - 2 text tokens and an end token.
    cut_ids = ids[limit - 1 : -1]
    cut = tokenizer.decode(cut_ids)
    quote = repr(cut) if len(cut) <= CUT_QUOTE_CHARS else repr(cut[:CUT_QUOTE_CHARS]) + "…"
    return [
        f"{what} is {len(ids) - 2} tokens but CLIP reads at most {limit - 2}; the last {len(cut_ids)} tokens were "
        f"cut and ignored: {quote}"
    ]


def _is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda"


def _weights_file(folder: Path, component: str, fp16: bool) -> tuple[Path, str | None] | None:
    """The weights file of a component folder and its variant, preferring the fp16 variant when loading in fp16."""
    base = _WEIGHTS[component]
    candidates = [(f"{base}.safetensors", None), (f"{base}.bin", None)]
    if fp16:
        candidates = [(f"{base}.fp16.safetensors", "fp16"), *candidates, (f"{base}.fp16.bin", "fp16")]
    for name, variant in candidates:
        if (folder / component / name).is_file():
            return folder / component / name, variant
    return None


def _resolve_model(model: str | Path, fp16: bool, local_files_only: bool | None) -> Path:
    """Resolve the pipeline folder, downloading only one weights file per component (fp16 variant first)."""
    common = ["model_index.json", "scheduler/*.json", "tokenizer/*", *(f"{c}/config.json" for c in _WEIGHTS)]
    tiers = [[f"{c}/{b}.safetensors" for c, b in _WEIGHTS.items()], [f"{c}/{b}.bin" for c, b in _WEIGHTS.items()]]
    if fp16:
        tiers.insert(0, [f"{c}/{b}.fp16.safetensors" for c, b in _WEIGHTS.items()])
    folder = None
    for tier in tiers:
        folder = resolve_pretrained(model, allow_patterns=common + tier, local_files_only=local_files_only)
        if all(_weights_file(folder, c, fp16) for c in _WEIGHTS):
            break
        common = []  # configs are there after the first call
    missing = [c for c in _WEIGHTS if _weights_file(folder, c, fp16) is None]
    if missing or not (folder / "tokenizer").is_dir() or not (folder / "unet" / "config.json").is_file():
        raise MissingWeightsError(
            str(model),
            f"{folder} is not a complete SD1.5 pipeline folder (needs tokenizer/, text_encoder/, unet/, vae/ and "
            f"scheduler/; weights missing for {missing or 'none'})",
        )
    return folder


def _instantiate(cls, config: dict[str, Any]):
    """Build a diffusers model from its config (no weights). Call under ``torch.device("meta")`` for free."""
    return cls.from_config(config)


def _load_diffusers_component(cls, folder: Path, component: str, torch_dtype: torch.dtype):
    """Strictly load a diffusers model: config → meta-device architecture → state dict with ``strict=True``."""
    file, _ = _weights_file(folder, component, torch_dtype == torch.float16)
    config = cls.load_config(folder / component)
    with torch.device("meta"):
        model = _instantiate(cls, config)
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        state_dict = load_file(file)
    else:
        state_dict = torch.load(file, map_location="cpu", weights_only=True)
    # VAEs saved before diffusers 0.14 (e.g. sd-image-variations, which Wonder3D's VAE comes from) name their
    # attention query/key/value/proj_attn; diffusers' own loader maps those to to_q/to_k/to_v/to_out.0, and so do
    # we, with diffusers' own function (a no-op for current checkpoints). Everything else must match exactly.
    model._convert_deprecated_attention_blocks(state_dict)
    try:
        model.load_state_dict(state_dict, strict=True, assign=True)
    except RuntimeError as error:
        raise ValueError(f"{file} does not match the {cls.__name__} built from its config.json: {error}") from error
    return model.to(dtype=torch_dtype).eval()


def _load_text_encoder(folder: Path, torch_dtype: torch.dtype):
    """Load the CLIP text encoder with transformers and fail on any missing, unexpected or mismatched key."""
    from transformers import CLIPTextModel

    file, variant = _weights_file(folder, "text_encoder", torch_dtype == torch.float16)
    model, info = CLIPTextModel.from_pretrained(
        folder / "text_encoder",
        torch_dtype=torch_dtype,
        variant=variant,
        use_safetensors=file.suffix == ".safetensors",
        local_files_only=True,
        # Not low_cpu_mem_usage: with it a missing key leaves a meta tensor and fails before the report below.
        low_cpu_mem_usage=False,
        output_loading_info=True,
    )
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise ValueError(f"{file} does not match CLIPTextModel's config.json: {problems}")
    return model.eval()


def _perflow_scheduler(scheduler_folder: Path | None):
    """A PeRFlow scheduler with the model's betas (upstream keeps only the noise-schedule fields)."""
    from .perflow.scheduler import PeRFlowScheduler

    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
    config = {}
    if scheduler_folder is not None and (scheduler_folder / "scheduler_config.json").is_file():
        source = json.loads((scheduler_folder / "scheduler_config.json").read_text())
        config = {k: source[k] for k in keys if source.get(k) is not None}
    return PeRFlowScheduler(**config, **PERFLOW_SD15_SCHEDULER)


def _rf_scheduler():
    """InstaFlow's sampler: Euler steps on the predicted velocity (imported here: it imports diffusers)."""
    from .perflow.rf_scheduler import RectifiedFlowScheduler

    return RectifiedFlowScheduler()


class TextToImage:
    """SD1.5 + PeRFlow text-to-image.

    Build it with [`from_pretrained`] (real weights) or [`tiny`] (random, for smoke tests), or wrap an existing
    ``StableDiffusionPipeline`` whose scheduler is a ``PeRFlowScheduler``. ``.pipe`` is that pipeline.
    """

    def __init__(
        self,
        pipe,
        *,
        settings: dict[str, Any] | None = None,
        default_size: int = 512,
        defaults: KindDefaults | None = None,
    ):
        self.pipe = pipe
        self.settings = dict(settings or {})
        self.default_size = default_size
        self.kind = "rectified_flow" if type(pipe.scheduler).__name__ == "RectifiedFlowScheduler" else "perflow"
        # The model's own sampling defaults and step bounds (`__call__` uses them for arguments left at None).
        windows = getattr(pipe.scheduler.config, "num_time_windows", 4)
        self.defaults = defaults or defaults_for(self.kind, self.settings.get("model", ""), perflow_windows=windows)
        self._compiled: CompiledRun | None = None
        # Low-memory callers that build the stage for one call: the text encoder is moved to the meta device once the
        # prompts are encoded, freeing its memory for the UNet and the decode.
        # The stage cannot encode again afterwards.
        self.release_encoders_after_use = False

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.unet.dtype

    @classmethod
    def from_pretrained(
        cls,
        model: str | Path = DEFAULT_MODEL,
        *,
        delta: str | Path | None = None,
        delta_variant: str | None = "v0-1",
        torch_dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        local_files_only: bool | None = None,
    ) -> TextToImage:
        """Load an SD1.5-family pipeline (hub id or local folder), merge the ΔW if given, set the PeRFlow scheduler.

        Args:
            model: a merged PeRFlow model (default ``hansyan/perflow-sd15-dreamshaper``) or, with `delta`, any SD1.5
                fine-tune (e.g. ``Lykon/dreamshaper-8``).
            delta: ΔW repo or folder (``hansyan/perflow-sd15-delta-weights``); merged strictly into the UNet.
                In fp16 this is upstream's fp16 add, bit for bit; in fp32 the fp16 delta is added in fp32.
            delta_variant: ΔW file variant (``v0-1``: ``diffusion_pytorch_model.v0-1.safetensors``).
            torch_dtype: ``torch.float32`` (default, CPU-safe) or ``torch.float16`` (CUDA; loads fp16 files when the
                repo has them).
            device: where the pipeline runs (default CPU).
            local_files_only: never download; `None` follows ``HF_HUB_OFFLINE``.

        Raises:
            MissingWeightsError: the model or ΔW is neither a folder nor in the hub cache (and cannot be downloaded).
        """
        from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTokenizer

        if torch_dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"torch_dtype must be torch.float32, torch.float16 or torch.bfloat16, got {torch_dtype}.")
        if delta is not None and "perflow" in Path(str(model)).name.lower():
            logger.warning("%s looks like a merged PeRFlow model already; adding the ΔW %s again.", model, delta)
        started = time.perf_counter()
        folder = _resolve_model(model, torch_dtype == torch.float16, local_files_only)
        kind = kind_of_folder(folder)  # ValueError for a pipeline that is neither kind
        if kind == "rectified_flow" and delta is not None:
            raise ValueError(
                f"{model} is a rectified-flow model (InstaFlow / 2-rectified flow); the PeRFlow ΔW {delta} is for "
                "SD1.5 fine-tunes and cannot be merged into it: drop --t2i-delta."
            )
        delta_weights = None
        if delta is not None:
            delta_weights = load_delta_weights(delta, delta_variant, local_files_only=local_files_only)

        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
        text_encoder = _load_text_encoder(folder, torch_dtype)
        unet = _load_diffusers_component(UNet2DConditionModel, folder, "unet", torch_dtype)
        vae = _load_diffusers_component(AutoencoderKL, folder, "vae", torch_dtype)
        # A RectifiedFlowPipeline folder holds SD1.5's components; only the sampler differs (t2mv.rectified_flow).
        scheduler = _rf_scheduler() if kind == "rectified_flow" else _perflow_scheduler(folder / "scheduler")
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe = pipe.to(device)
        report = None
        if delta_weights is not None:
            # Cast the delta to the UNet dtype: a no-op for fp16 (upstream's fp16 add), full precision for fp32.
            delta_weights = {k: v.to(torch_dtype) for k, v in delta_weights.items()}
            report = merge_delta_weights(pipe.unet, delta_weights, strict=True)
            del delta_weights
        _use_sdpa(pipe)
        pipe.set_progress_bar_config(disable=True)

        settings = {
            "model": str(model),
            "model_folder": str(folder),
            "delta": None if delta is None else str(delta),
            "delta_variant": delta_variant if delta is not None else None,
            "delta_report": None if report is None else report.summary(),
            "torch_dtype": str(torch_dtype).removeprefix("torch."),
            "device": str(torch.device(device)),
            "kind": kind,
            **(
                {"scheduler": "RectifiedFlowScheduler"}
                if kind == "rectified_flow"
                else {"scheduler": "PeRFlowScheduler", **PERFLOW_SD15_SCHEDULER}
            ),
            "safety_checker": None,
            "load_seconds": round(time.perf_counter() - started, 3),
        }
        # 512 for SD1.5 (sample_size 64 × VAE factor 8), as diffusers' own default.
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        return cls(pipe, settings=settings, default_size=size, defaults=defaults_for(kind, model))

    @classmethod
    def tiny(cls, seed: int = 0, *, kind: str = "perflow") -> TextToImage:
        """A tiny random pipeline (char-level CLIP tokenizer, 2-layer text encoder, 2-block UNet, 4-block VAE).

        No files or network. Images default to 64² (latents 8²); CPU/float32. Output is noise-like: it exists to
        exercise the code paths (smoke mode, tests), not to make pictures. ``kind="rectified_flow"`` samples it
        as InstaFlow does (one Euler step, no guidance by default).
        """
        if kind not in ("perflow", "rectified_flow"):
            raise ValueError(f"kind must be 'perflow' or 'rectified_flow', got {kind!r}.")
        from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

        from .perflow.scheduler import PeRFlowScheduler

        vocab = {c: i for i, c in enumerate(_TINY_CHARACTERS)}
        vocab.update({f"{c}</w>": i + len(_TINY_CHARACTERS) for i, c in enumerate(_TINY_CHARACTERS)})
        bos, eos = len(vocab), len(vocab) + 1
        vocab.update({"<|startoftext|>": bos, "<|endoftext|>": eos})
        # CLIPTokenizer reads its vocabulary from files; it keeps everything in memory afterwards.
        with tempfile.TemporaryDirectory() as scratch:
            (Path(scratch) / "vocab.json").write_text(json.dumps(vocab))
            (Path(scratch) / "merges.txt").write_text("#version: 0.2\n")
            tokenizer = CLIPTokenizer(
                str(Path(scratch) / "vocab.json"),
                str(Path(scratch) / "merges.txt"),
                pad_token="<|endoftext|>",
                model_max_length=77,
            )
        text_config = CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            projection_dim=32,
            bos_token_id=bos,
            eos_token_id=eos,
            pad_token_id=eos,
        )
        with torch.random.fork_rng(devices=[]):  # seed the default init without touching the caller's RNG
            torch.manual_seed(seed)
            text_encoder = CLIPTextModel(text_config).eval()
            unet = UNet2DConditionModel(**_TINY_UNET_CONFIG).eval()
            vae = AutoencoderKL(**_TINY_VAE_CONFIG).eval()
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=_rf_scheduler() if kind == "rectified_flow" else PeRFlowScheduler(**PERFLOW_SD15_SCHEDULER),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        _use_sdpa(pipe)
        pipe.set_progress_bar_config(disable=True)
        sampler = (
            {"scheduler": "RectifiedFlowScheduler"}
            if kind == "rectified_flow"
            else {"scheduler": "PeRFlowScheduler", **PERFLOW_SD15_SCHEDULER}
        )
        settings = {
            "model": f"tiny(seed={seed})" if kind == "perflow" else f"tiny-instaflow(seed={seed})",
            "delta": None,
            "torch_dtype": "float32",
            "device": "cpu",
            "kind": kind,
            **sampler,
            "safety_checker": None,
        }
        return cls(pipe, settings=settings, default_size=64)

    def to(self, device: str | torch.device) -> TextToImage:
        """Move the pipeline to `device`; returns self."""
        self.pipe.to(device)
        self.settings["device"] = str(torch.device(device))
        return self

    def enable_xformers(self) -> bool:
        """Use xformers attention when on CUDA and xformers imports; otherwise log why and keep SDPA.

        Returns:
            True when xformers attention is now on.
        """
        if not _is_cuda(self.device):
            logger.info("xformers not enabled: the pipeline is on %s, not CUDA; keeping PyTorch SDPA.", self.device)
            return False
        try:
            import xformers  # noqa: F401
        except ImportError:
            logger.info("xformers not enabled: it is not installed (pip install t2mv[cuda]); keeping PyTorch SDPA.")
            return False
        self.pipe.enable_xformers_memory_efficient_attention()
        self.settings["attention"] = "xformers"
        return True

    def enable_compile(self, *, mode: str | None = None, backend: str = "inductor") -> bool:
        """Opt-in compiled mode: ``torch.compile`` the UNet and the VAE decoder with static shapes.

        Compiled once per process and shape: the first call at a new (batch, height, width, guidance on/off)
        runs an untimed warm-up call that compiles (reported as ``timings["compile"]``); later calls reuse it.
        Without a compiler (CPU inductor needs g++, CUDA needs Triton) or when compilation fails, one warning
        is logged and the pipeline runs eagerly.

        Args:
            mode: torch.compile mode (None = inductor's default; ``"reduce-overhead"`` adds CUDA graphs on CUDA,
                ``"max-autotune"`` tunes kernels at a much longer compile).
            backend: torch.compile backend (``"inductor"``; ``"aot_eager"`` traces without generating code).

        Returns:
            True when compiled mode is on.
        """
        modules = {"unet": self.pipe.unet, "vae.decoder": self.pipe.vae.decoder}
        self._compiled = enable_compile_on(self, modules, self.device, backend=backend, mode=mode, logger_=logger)
        self.settings["compile"] = None if self._compiled is None else self._compiled.describe()
        return self._compiled is not None

    def disable_compile(self) -> None:
        """Back to eager calls (compiled code stays cached in this process for a later `enable_compile`)."""
        if self._compiled is not None:
            self._compiled.undo()
        self._compiled = None
        self.settings["compile"] = None

    def encode_prompts(
        self, prompts: list[str], negatives: list[str], do_classifier_free_guidance: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """CLIP embeddings of the prompts and, with guidance, their negatives: one text-encoder batch of the
        distinct texts (diffusers encodes prompt and negative in two calls; the numbers are the same).

        Returns:
            ``(prompt_embeds (P, 77, D), negative_embeds (P, 77, D) or None)``.
        """
        tokenizer, encoder = self.pipe.tokenizer, self.pipe.text_encoder
        texts = list(dict.fromkeys([*negatives, *prompts] if do_classifier_free_guidance else prompts))
        tokens = tokenizer(
            texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        )
        mask = tokens.attention_mask.to(self.device) if getattr(encoder.config, "use_attention_mask", False) else None
        embeds = encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]  # (T, 77, D)
        row = {text: i for i, text in enumerate(texts)}
        prompt_embeds = embeds[[row[text] for text in prompts]]  # (P, 77, D)
        if not do_classifier_free_guidance:
            return prompt_embeds, None
        return prompt_embeds, embeds[[row[text] for text in negatives]]  # (P, 77, D)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        *,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        seed: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
    ) -> TextToImageOutput:
        """Generate images.

        Args:
            prompt: one prompt or a list (one image per prompt, times `num_images_per_prompt`).
            negative_prompt: one for all prompts, or one per prompt; `None` = empty (upstream's chain default).
            num_inference_steps: steps; None = the model's own default (`self.defaults`: PeRFlow 4, InstaFlow 1,
                2-rectified flow 25). PeRFlow takes at least one step per time window (4), rectified flow at
                least 1, both at most 100. Upstream PeRFlow: 4 for the 3D chain (`CHAIN_PRESET`), 8 for plain
                text-to-image (`T2I_PRESET`).
            guidance_scale: classifier-free guidance (≤ 1 turns it off); None = the model's default (PeRFlow 4.5,
                InstaFlow 0, 2-rectified flow 1.5). Upstream PeRFlow: 4.5 at 4 steps, 7.5 at 8.
            height, width: image size, multiples of 8; default: the UNet's native size (512 for SD1.5, 64 for
                `tiny`).
            num_images_per_prompt: images per prompt.
            seed: seed a CPU generator (reproducible on every device); exclusive with `generator`.
            generator: torch generator(s) for the initial latents.
            latents: initial latents ``(B, 4, H/8, W/8)`` instead of random ones.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
        """
        # 1. Check inputs.
        prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, list | tuple) else None
        if not prompts:
            raise ValueError("prompt must be a non-empty string or a non-empty list of strings.")
        warnings = []
        for text in prompts:
            warnings += check_prompt(text, self.pipe.tokenizer)
        if negative_prompt is None:
            negatives = [""] * len(prompts)
        elif isinstance(negative_prompt, str):
            negatives = [negative_prompt] * len(prompts)
        else:
            negatives = list(negative_prompt)
            if len(negatives) != len(prompts):
                raise ValueError(
                    f"Got {len(negatives)} negative prompts for {len(prompts)} prompts; give one or one each."
                )
        for text in dict.fromkeys(negatives):  # each distinct negative once, in order
            if not isinstance(text, str):
                raise ValueError(f"negative_prompt must be a string, got {type(text).__name__}.")
            warnings += _truncation_warnings(text, self.pipe.tokenizer, what="Negative prompt")
        height = self.default_size if height is None else height
        width = self.default_size if width is None else width
        if height <= 0 or width <= 0 or height % 8 or width % 8:
            raise ValueError(f"height and width must be positive multiples of 8, got {height}×{width}.")
        num_inference_steps = self.defaults.num_inference_steps if num_inference_steps is None else num_inference_steps
        guidance_scale = self.defaults.guidance_scale if guidance_scale is None else guidance_scale
        low, high = self.defaults.min_steps, self.defaults.max_steps
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
            raise ValueError(f"num_inference_steps must be an int, got {num_inference_steps!r}.")
        if not low <= num_inference_steps <= high:
            why = " (one per PeRFlow time window at least)" if self.kind == "perflow" else ""
            raise ValueError(f"num_inference_steps must be in [{low}, {high}]{why}, got {num_inference_steps}.")
        if guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0 (1 or less turns guidance off), got {guidance_scale}.")
        if output_type not in _OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {_OUTPUT_TYPES}, got {output_type!r}.")
        if seed is not None and generator is not None:
            raise ValueError("Pass either seed or generator, not both.")
        factor = self.pipe.vae_scale_factor
        latent_shape = (len(prompts) * num_images_per_prompt, self.pipe.unet.config.in_channels)
        latent_shape += (height // factor, width // factor)
        if latents is not None and tuple(latents.shape) != latent_shape:
            raise ValueError(
                f"latents must have shape {latent_shape} for these prompts and size, got {tuple(latents.shape)}."
            )
        if seed is not None:
            generator = torch.Generator("cpu").manual_seed(seed)
        for message in warnings:
            logger.warning(message)

        # 2-6. Encode (ours: one text-encoder batch), prepare latents, denoise, decode: diffusers'
        # StableDiffusionPipeline with the PeRFlow scheduler. Prompts go in as embeddings, so diffusers neither
        # re-tokenizes nor repeats the truncation warning.
        do_cfg = guidance_scale > 1.0  # diffusers' rule

        def generate(generator, latents):
            prompt_embeds, negative_embeds = self.encode_prompts(prompts, negatives, do_cfg)
            if self.release_encoders_after_use:
                # Emptied in place, not moved to "meta": diffusers 0.19 takes the pipeline's device and dtype from the
                # text encoder's first weight, so it must stay a CPU/CUDA module of the right dtype.
                for tensor in [*self.pipe.text_encoder.parameters(), *self.pipe.text_encoder.buffers()]:
                    tensor.data = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
                gc.collect()
            return self.pipe(
                prompt_embeds=prompt_embeds,
                negative_prompt_embeds=negative_embeds,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                height=height,
                width=width,
                num_images_per_prompt=num_images_per_prompt,
                generator=generator,
                latents=latents,
                output_type=output_type,
            )

        timings = {}
        with preferred_sdpa(self.device):
            if self._compiled is not None:
                # Untimed warm-up at this call's shapes; its own noise, so the caller's generator is not consumed.
                rows = len(prompts) * num_images_per_prompt * (2 if do_cfg else 1)
                # Device and dtype too: moving or casting the pipeline recompiles (dynamo guards on both).
                shape = (rows, height, width, output_type != "latent", str(self.device), self.dtype)
                warm_latents = None if latents is None else latents.clone()
                seconds = run_compile_warm_up(
                    self, shape, lambda: generate(torch.Generator("cpu").manual_seed(0), warm_latents), logger
                )
                if seconds is not None:
                    timings["compile"] = seconds
            started = time.perf_counter()
            result = generate(generator, latents)
            if _is_cuda(self.device):
                torch.cuda.synchronize(self.device)
            elapsed = time.perf_counter() - started

        # 7. Output.
        settings = {
            **self.settings,
            "prompts": prompts,
            "negative_prompts": negatives,
            "num_inference_steps": num_inference_steps,
            "timesteps": self.pipe.scheduler.timesteps.tolist(),
            "guidance_scale": guidance_scale,
            "height": height,
            "width": width,
            "num_images_per_prompt": num_images_per_prompt,
            "seed": seed,
            "output_type": output_type,
            "compiled": self._compiled is not None,
        }
        return TextToImageOutput(
            images=result.images, warnings=warnings, timings={"text_to_image": elapsed, **timings}, settings=settings
        )


def _use_sdpa(pipe) -> None:
    """PyTorch scaled-dot-product attention in the UNet and VAE (diffusers' default on torch 2; made explicit)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe.unet.set_attn_processor(AttnProcessor2_0())
    pipe.vae.set_attn_processor(AttnProcessor2_0())
