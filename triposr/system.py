"""``TSR``: TripoSR image -> triplane scene codes -> density/colour field, previews and meshes."""

from __future__ import annotations

import contextlib
import os
import zipfile
from pathlib import Path
from typing import Union

import numpy as np
import PIL.Image
import torch
from torch import nn

from .backbone import Transformer1D, Triplane1DTokenizer, TriplaneUpsampleNetwork
from .config import (
    KNOWN_VIT_CONFIGS,
    BackboneConfig,
    DecoderConfig,
    ImageTokenizerConfig,
    PostProcessorConfig,
    RendererConfig,
    TriplaneTokenizerConfig,
    TSRConfig,
    ViTConfig,
)
from .image_tokenizer import DINOSingleImageTokenizer
from .nerf import NeRFMLP, TriplaneNeRFRenderer, spherical_camera_rays
from .preprocess import resize_images

DEFAULT_REPO = "stabilityai/TripoSR"

# Half precision of the image tokenizer + transformer (autocast), per device type; the upsampler, the density
# decoder and marching cubes always run in float32. "cuda": float16; "cpu": bfloat16 (float16 matmuls are
# emulated, ~100x slower, on CPUs without native support). See TSR.half_dtype.
HALF_DTYPES = {"cuda": torch.float16, "cpu": torch.bfloat16}
# On by default where the mesh stays the same (voxelised IoU >= 0.99 against float32). Measured (benchmarks
# mesh-speed, real sizes, random weights, object-like field, R=256): float16 (CUDA numerics, emulated on the CPU)
# moves the scene code by 6.0e-3 max abs (0.06% of its range), IoU 0.998; on the tiny fixture 7e-4, IoU 0.999.
# bfloat16 moves it by 0.083 (0.9%), IoU 0.977 (fixture: 5e-3, 0.991) for a 1.4-1.7x faster CPU forward: opt-in.
DEFAULT_HALF_PRECISION = {"cuda": True, "cpu": False}

ImageInput = Union[PIL.Image.Image, list[PIL.Image.Image], torch.Tensor]


class MissingWeightsError(FileNotFoundError):
    """A TripoSR file is neither in the given folder nor in the local Hugging Face cache (or cannot be fetched)."""


def _offline(local_files_only: bool | None) -> bool:
    if local_files_only is not None:
        return local_files_only
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~", "\\")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def resolve_file(repo_or_folder: str | os.PathLike, filename: str, *, local_files_only: bool | None = None) -> Path:
    """Local folder -> ``folder/filename``; hub id -> ``hf_hub_download`` (cache only when offline).

    Raises ``MissingWeightsError`` naming the repo or folder, the cache folder and the two fixes.
    """
    name = os.fspath(repo_or_folder)
    folder = Path(name).expanduser()
    if folder.is_dir():
        path = folder / filename
        if not path.is_file():
            raise MissingWeightsError(
                f"{filename!r} not found in the local folder {folder}. Put the file there or pass a folder "
                "that has it."
            )
        return path
    if _looks_like_path(name):
        raise MissingWeightsError(
            f"The folder {name!r} does not exist. Pass an existing folder with {filename!r}, or a Hugging Face "
            f"repo id such as {DEFAULT_REPO!r}."
        )

    from huggingface_hub import constants, hf_hub_download

    offline = _offline(local_files_only)
    try:
        return Path(hf_hub_download(repo_id=name, filename=filename, local_files_only=offline))
    except (OSError, ValueError) as e:  # hub errors derive from OSError; an invalid repo id is a ValueError
        where = "is not in the local Hugging Face cache" if offline else "could not be downloaded"
        raise MissingWeightsError(
            f"{filename!r} of the Hugging Face repo {name!r} {where} (cache folder: {constants.HF_HUB_CACHE}; "
            f"HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}). Fix: (1) go online once (unset "
            f"HF_HUB_OFFLINE, or pass local_files_only=False) so it is downloaded into the cache, or (2) pass a local "
            f"folder that contains {filename!r}. Cause: {type(e).__name__}: {e}"
        ) from e


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    # weights_only: the published model.ckpt is a plain OrderedDict of tensors; never unpickle arbitrary objects.
    # mmap (torch's zip format only): the fp32 tensors are assigned to the model as they lie in the file, so the
    # 1.68 GB are never copied into a second buffer (pages are read as the model first uses them).
    return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))


def _resolve_vit_config(name: str, config_dir: Path | None, local_files_only: bool | None) -> ViTConfig:
    """Built-in config for facebook/dino-vitb16; otherwise ``name/config.json`` next to config.yaml, a folder, or a
    hub repo's config.json (only from ``from_pretrained``; constructors never touch the hub)."""
    if name in KNOWN_VIT_CONFIGS:
        return KNOWN_VIT_CONFIGS[name]
    if config_dir is not None and (config_dir / name / "config.json").is_file():
        return ViTConfig.from_json_file(config_dir / name / "config.json")
    return ViTConfig.from_json_file(resolve_file(name, "config.json", local_files_only=local_files_only))


class TSR(nn.Module):
    """TripoSR. Build from a ``TSRConfig`` (architecture only, random weights) or load with ``from_pretrained``.

    Shapes for the published config: images (B, 3, 512, 512) -> DINO tokens (B, 1025, 768) -> triplane tokens
    (B, 1024, 3*32*32) -> scene codes (B, 3, 40, 64, 64): three 64x64 feature planes (xy, xz, yz) of 40 channels.
    """

    def __init__(self, config: TSRConfig, vit_config: ViTConfig | None = None):
        super().__init__()
        config.validate()
        if vit_config is None:
            name = config.image_tokenizer.pretrained_model_name_or_path
            if name not in KNOWN_VIT_CONFIGS:
                raise ValueError(
                    f"No built-in ViT config for image tokenizer {name!r} (known: {sorted(KNOWN_VIT_CONFIGS)}). "
                    "Pass vit_config=ViTConfig(...) or load with TSR.from_pretrained, which reads <name>/config.json."
                )
            vit_config = KNOWN_VIT_CONFIGS[name]
        if config.backbone.cross_attention_dim != vit_config.hidden_size:
            raise ValueError(
                f"backbone.cross_attention_dim ({config.backbone.cross_attention_dim}) must equal the image "
                f"tokenizer's hidden size ({vit_config.hidden_size})."
            )
        self.config = config
        self.vit_config = vit_config
        self.image_tokenizer = DINOSingleImageTokenizer(vit_config)
        self.tokenizer = Triplane1DTokenizer(config.tokenizer)
        self.backbone = Transformer1D(config.backbone)
        self.post_processor = TriplaneUpsampleNetwork(config.post_processor)
        self.decoder = NeRFMLP(config.decoder)
        self.renderer = TriplaneNeRFRenderer(config.renderer)
        # True / False / a dtype, or None for the per-device default (DEFAULT_HALF_PRECISION); see half_dtype().
        self.half_precision: bool | torch.dtype | None = None

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(
        cls,
        repo_or_folder: str | os.PathLike = DEFAULT_REPO,
        config_name: str = "config.yaml",
        weight_name: str = "model.ckpt",
        *,
        local_files_only: bool | None = None,
        device: str | torch.device = "cpu",
        torch_dtype: torch.dtype = torch.float32,
        half_precision: bool | torch.dtype | None = None,
    ) -> TSR:
        """Load config and weights from a hub id or a local folder; the weights must match exactly (strict).

        ``weight_name`` may be a ``.ckpt``/``.bin`` (``torch.load(weights_only=True)``, memory-mapped) or a
        ``.safetensors`` file.
        ``local_files_only=None`` follows ``HF_HUB_OFFLINE``. ``half_precision``: see ``TSR.half_dtype`` (None: the
        per-device default, float16 on CUDA; keep ``torch_dtype`` float32 so that only the trunk runs in half).
        """
        config_path = resolve_file(repo_or_folder, config_name, local_files_only=local_files_only)
        config = TSRConfig.from_yaml_file(config_path)
        vit_config = _resolve_vit_config(
            config.image_tokenizer.pretrained_model_name_or_path, config_path.parent, local_files_only
        )
        weight_path = resolve_file(repo_or_folder, weight_name, local_files_only=local_files_only)
        state_dict = _load_state_dict(weight_path)
        # Build on the meta device (no random init, no second 1.7 GB copy), then adopt the loaded tensors.
        with torch.device("meta"):
            model = cls(config, vit_config)
        try:
            model.load_state_dict(state_dict, strict=True, assign=True)
        except RuntimeError as e:
            raise RuntimeError(f"{weight_path} does not match the TripoSR architecture of {config_path}: {e}") from e
        model.image_tokenizer.reset_normalization()
        model.half_precision = half_precision
        return model.to(device=device, dtype=torch_dtype).eval()

    @classmethod
    def tiny(cls, seed: int = 0) -> TSR:
        """A tiny random TripoSR (~90k parameters, 64x64 input, 3x8x8x8 scene codes) for smoke tests; no files.

        The decoder's density output is rescaled so that about 10% of the field is above the mesh threshold 25
        (for a plain input image), so meshes and renders are not empty.
        """
        config = TSRConfig(
            cond_image_size=64,
            image_tokenizer=ImageTokenizerConfig(pretrained_model_name_or_path="tiny-vit"),
            tokenizer=TriplaneTokenizerConfig(plane_size=4, num_channels=32),
            backbone=BackboneConfig(
                in_channels=32, num_attention_heads=2, attention_head_dim=16, num_layers=2, cross_attention_dim=32
            ),
            post_processor=PostProcessorConfig(in_channels=32, out_channels=8),
            decoder=DecoderConfig(in_channels=24, n_neurons=16, n_hidden_layers=2, activation="silu"),
            renderer=RendererConfig(radius=0.87, density_activation="exp", num_samples_per_ray=16),
        )
        vit_config = ViTConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(config, vit_config).eval()
            embeddings = model.image_tokenizer.model.embeddings
            with torch.no_grad():
                embeddings.cls_token.normal_()
                embeddings.position_embeddings.normal_()
            model._calibrate_density(threshold=25.0, above_fraction=0.1)
        return model

    @torch.no_grad()
    def _calibrate_density(self, threshold: float, above_fraction: float) -> None:
        # Random weights give raw densities near 0 (exp(-1) << 25): rescale the density row of the last decoder layer
        # so the raw density on a 16^3 grid has std 3 and the given fraction lies above the threshold.
        scene_code = self([PIL.Image.new("RGB", (64, 64), (128, 128, 128))])[0]  # (3, C, H, W)
        axis = torch.linspace(-self.renderer.cfg.radius, self.renderer.cfg.radius, 16)
        grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1)  # (16, 16, 16, 3)
        raw = self.query_triplane(scene_code, grid)["density"].flatten()  # (4096,)
        last = self.decoder.layers[-1]
        scale = 3.0 / raw.std().clamp_min(1e-6)
        last.weight[0] *= scale
        last.bias[0] *= scale
        target = float(np.log(threshold)) - self.renderer.cfg.density_bias
        last.bias[0] += target - torch.quantile(raw * scale, 1.0 - above_fraction)

    # ------------------------------------------------------------------ properties

    @property
    def device(self) -> torch.device:
        return self.tokenizer.embeddings.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tokenizer.embeddings.dtype

    def half_dtype(
        self, device: str | torch.device | None = None, half_precision: bool | torch.dtype | None = None
    ) -> torch.dtype | None:
        """The autocast dtype of the image tokenizer + triplane transformer on ``device`` (default: the model's), or
        None when they run in the model's own dtype.

        From ``half_precision`` (default: ``self.half_precision``): True: ``HALF_DTYPES`` (float16 on CUDA, bfloat16 on CPU); a dtype: that one
        (e.g. float16 on the CPU, to check CUDA's numerics there, slowly); False: never; None (default):
        ``DEFAULT_HALF_PRECISION`` of the device type. Only a float32 model runs a half trunk (a model cast to
        float16/bfloat16 as a whole runs as it is). The weights stay float32; autocast runs the transformer's
        matmuls and attention in half and its norms and residual stream in float32; the upsampler, the density
        decoder and marching cubes stay float32.
        """
        device = self.device if device is None else torch.device(device)
        choice = self.half_precision if half_precision is None else half_precision
        if choice is None:
            choice = DEFAULT_HALF_PRECISION.get(device.type, False)
        if choice is False or self.dtype != torch.float32 or device.type not in HALF_DTYPES:
            return None
        return HALF_DTYPES[device.type] if choice is True else choice

    # ------------------------------------------------------------------ image -> scene codes

    def _images_to_tensor(self, images: ImageInput) -> torch.Tensor:
        """PIL image(s) or a (B, 3, H, W) tensor in [0, 1] -> (B, 3, S, S) float32, S = cond_image_size.

        As upstream: PIL images become float32 x/255 on the CPU, then an antialiased bilinear resize
        (align_corners False) to S x S, done by torch (not PIL).
        """
        size = self.config.cond_image_size
        if isinstance(images, PIL.Image.Image):
            images = [images]
        if isinstance(images, list | tuple):
            if not images:
                raise ValueError("images is an empty list; pass at least one image.")
            batch = []
            for i, image in enumerate(images):
                if not isinstance(image, PIL.Image.Image):
                    raise TypeError(f"images[{i}] is a {type(image).__name__}; pass PIL images or one tensor.")
                if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                    raise ValueError(
                        f"images[{i}] has transparency (mode {image.mode}); composite it first with "
                        "triposr.preprocess.preprocess_image (0.5 grey background)."
                    )
                array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0  # (H, W, 3)
                batch.append(resize_images(torch.from_numpy(array).permute(2, 0, 1)[None], size))  # (1, 3, S, S)
            return torch.cat(batch)  # (B, 3, S, S)
        if isinstance(images, torch.Tensor):
            if images.ndim != 4 or images.shape[1] != 3:
                raise ValueError(f"image tensor must be (B, 3, H, W), got {tuple(images.shape)}")
            images = images.float()
            if images.device.type != "meta" and images.numel() and (images.min() < 0 or images.max() > 1):
                raise ValueError("image tensor values must be in [0, 1] (divide uint8 images by 255).")
            return resize_images(images, size)  # (B, 3, S, S)
        raise TypeError(f"images must be a PIL image, a list of PIL images or a tensor, got {type(images).__name__}")

    @torch.no_grad()
    def forward(
        self,
        images: ImageInput,
        device: str | torch.device | None = None,
        half_precision: bool | torch.dtype | None = None,
    ) -> torch.Tensor:
        """Images -> scene codes (B, 3, C, 2P, 2P) on ``device`` (default: the model's) in the model's dtype.

        ``images``: PIL RGB image(s) already preprocessed (object centred on 0.5 grey, see preprocess_image), or a
        float tensor (B, 3, H, W) in [0, 1]; either is resized to cond_image_size. The image tokenizer and the
        transformer run in ``half_dtype(device, half_precision)`` when that is set (autocast; ``half_precision``
        None: the model's ``half_precision``), the upsampler in the model's dtype.
        """
        device = self.device if device is None else torch.device(device)
        pixels = self._images_to_tensor(images).to(device=device, dtype=self.dtype)  # (B, 3, S, S)
        batch = pixels.shape[0]
        half = self.half_dtype(device, half_precision)
        autocast = torch.autocast(device.type, dtype=half) if half is not None else contextlib.nullcontext()
        with autocast:
            image_tokens = self.image_tokenizer(pixels).transpose(1, 2)  # (B, Nt, Cv): cross-attention context
            tokens = self.tokenizer(batch)  # (B, C, 3*P*P)
            tokens = self.backbone(tokens, encoder_hidden_states=image_tokens)  # (B, C, 3*P*P)
        planes = self.tokenizer.detokenize(tokens.to(self.dtype))  # (B, 3, C, P, P)
        return self.post_processor(planes)  # (B, 3, Cout, 2P, 2P)

    # ------------------------------------------------------------------ field queries

    def query_triplane(
        self, scene_code: torch.Tensor, positions: torch.Tensor, chunk_size: int | None = None
    ) -> dict[str, torch.Tensor]:
        """Density and colour at world positions in TripoSR's native frame (+z up, input view from +x).

        ``scene_code`` (3, C, H, W) with ``positions`` (..., 3), or a batch (B, 3, C, H, W) with positions
        (B, ..., 3). Points outside [-radius, radius]^3 (radius = ``self.renderer.cfg.radius``, 0.87) see zero
        features. Returns a dict of (..., k) tensors on the scene code's device:
        ``density`` (..., 1) raw, before activation (as upstream); ``density_act`` (..., 1) = exp(density - 1),
        float32, the quantity thresholded at 25 for meshes; ``features`` (..., 3) raw; ``color`` (..., 3) in [0, 1].
        ``chunk_size`` overrides the renderer's points per decoder call (0 = all at once; None = the renderer's).
        Not wrapped in no_grad: callers' entry points decide.
        """
        if scene_code.ndim == 4:
            return self.renderer.query(self.decoder, scene_code, positions, chunk_size)
        if scene_code.ndim == 5:
            if positions.ndim < 2 or positions.shape[0] != scene_code.shape[0]:
                raise ValueError(
                    f"batched scene codes {tuple(scene_code.shape)} need positions (B, ..., 3) with the same B, "
                    f"got {tuple(positions.shape)}"
                )
            outs = [
                self.renderer.query(self.decoder, code, pos, chunk_size) for code, pos in zip(scene_code, positions)
            ]
            return {k: torch.stack([o[k] for o in outs]) for k in outs[0]}
        raise ValueError(f"scene_code must be (3, C, H, W) or (B, 3, C, H, W), got {tuple(scene_code.shape)}")

    # ------------------------------------------------------------------ meshes

    @torch.no_grad()
    def extract_mesh(
        self,
        scene_codes: torch.Tensor,
        *,
        resolution: int = 256,
        threshold: float = 25.0,
        has_vertex_color: bool = True,
        method: str = "sparse",
        backend: str = "auto",
    ) -> list:
        """One ``trimesh.Trimesh`` per scene code (B, 3, C, H, W): marching cubes of density_act at ``threshold`` on
        a ``resolution``^3 grid over [-radius, radius]^3, in the export frame (glTF: +Y up, input view facing +Z).
        The work is done by ``triposr.mesh.extract_mesh`` (``method`` "sparse" | "dense", ``backend`` "auto" |
        "torch" | "pymcubes" | "skimage"), on the scene codes' device."""
        from .mesh import extract_mesh_from_scene_code

        if scene_codes.ndim == 4:
            scene_codes = scene_codes[None]
        if scene_codes.ndim != 5:
            raise ValueError(f"scene_codes must be (B, 3, C, H, W), got {tuple(scene_codes.shape)}")
        return [
            extract_mesh_from_scene_code(
                self,
                code,
                resolution=resolution,
                threshold=threshold,
                has_vertex_color=has_vertex_color,
                method=method,
                backend=backend,
            )
            for code in scene_codes
        ]

    # ------------------------------------------------------------------ previews

    @torch.no_grad()
    def render(
        self,
        scene_codes: torch.Tensor,
        n_views: int,
        elevation_deg: float = 0.0,
        camera_distance: float = 1.9,
        fovy_deg: float = 40.0,
        height: int = 256,
        width: int = 256,
        output_type: str = "pil",
    ) -> list[list]:
        """Volume-rendered previews on white: for each scene code, ``n_views`` images around the object (view 0 =
        the input view). ``output_type`` "pil" (uint8, truncated as upstream), "pt" ((H, W, 3) float32 tensors in
        [0, 1]) or "np" (same as numpy)."""
        if output_type not in ("pil", "pt", "np"):
            raise ValueError(f"output_type must be 'pil', 'pt' or 'np', got {output_type!r}")
        if scene_codes.ndim != 5:
            raise ValueError(f"scene_codes must be (B, 3, C, H, W), got {tuple(scene_codes.shape)}")
        if n_views < 1:
            raise ValueError(f"n_views must be >= 1, got {n_views}")
        rays_o, rays_d = spherical_camera_rays(n_views, elevation_deg, camera_distance, fovy_deg, height, width)
        rays_o, rays_d = rays_o.to(scene_codes.device), rays_d.to(scene_codes.device)  # (V, H, W, 3)
        results = []
        for scene_code in scene_codes:
            views = []
            for i in range(n_views):
                image = self.renderer(self.decoder, scene_code, rays_o[i], rays_d[i])  # (H, W, 3) float32
                if output_type == "pt":
                    views.append(image)
                elif output_type == "np":
                    views.append(image.cpu().numpy())
                else:
                    views.append(PIL.Image.fromarray((image.cpu().numpy() * 255.0).astype(np.uint8)))
            results.append(views)
        return results
