"""Fake checkpoints laid out as the published repositories are (random weights at the real shapes, or tiny).

So that a benchmark loads through the real `from_pretrained` code paths and file formats instead of building its
models in memory (the formats decide the loading peak: a 1.82 GB fp16 pickle run in fp32 is not a safetensors):

- ``wonder3d/`` (flamehaze1115/wonder3d-v1.0, main): ``model_index.json``; ``unet/`` and ``vae/``: ``config.json`` +
  ``diffusion_pytorch_model.bin``; ``image_encoder/``: ``config.json`` + ``pytorch_model.bin``;
  ``feature_extractor/``, ``scheduler/``. The .bin files are torch zip pickles in fp16 (the UNet's is documented as
  HalfStorage, 1.82 GB; we assume the same for the VAE and image encoder, saved from the same fp16 pipeline).
- ``delta/`` (hansyan/perflow-sd15-delta-weights): ``config.json`` + ``diffusion_pytorch_model.v0-1.safetensors``,
  fp16, the SD1.5 UNet's keys and shapes (zeros: only the shapes and the merge matter here).
- ``triposr/`` (stabilityai/TripoSR at c1cf771): ``config.yaml`` + ``model.ckpt``, a torch zip pickle in fp32.

    python -m benchmarks.published_layouts OUT_DIR [--mode tiny|real]

`write_layouts` writes into a folder once (a ``layout.json`` marks it complete) and returns the files' table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from . import configs

WONDER3D_ONLY = ("attn_joint_mid", "norm_joint_mid", "class_embedding")  # not in SD1.5: the ΔW has no such keys
REPO_ROOT = Path(__file__).resolve().parent.parent


def _save_half(module: torch.nn.Module, path: Path) -> None:
    """The module's state dict in fp16 as a torch zip pickle; the module's own weights are dropped as they go."""
    state = module.state_dict()
    half = {}
    for key in list(state):
        half[key] = state.pop(key).detach().to(torch.float16)
    del state
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(half, path)


def _wonder3d(root: Path, mode: str, seed: int) -> dict[str, torch.Size]:
    """Writes the Wonder3D folder component by component (one model in memory at a time); returns the UNet's
    shapes (for the ΔW)."""
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from wonder3d_perflow import MultiviewPipeline
    from wonder3d_perflow.pipeline import clip_feature_extractor
    from wonder3d_perflow.unet_mv2d import UNetMV2DConditionModel

    tiny = MultiviewPipeline.tiny(seed=seed) if mode == "tiny" else None
    torch.manual_seed(seed)
    builds = {
        "unet": lambda: tiny.unet if tiny else UNetMV2DConditionModel.from_config(configs.WONDER3D_UNET),
        "vae": lambda: tiny.vae if tiny else AutoencoderKL(**{**configs.SD_VAE, "sample_size": 256}),
        "image_encoder": lambda: tiny.image_encoder
        if tiny
        else CLIPVisionModelWithProjection(CLIPVisionConfig(**configs.CLIP_L_VISION)),
    }
    shapes: dict[str, torch.Size] = {}
    for name, build in builds.items():
        model = build()
        if name == "unet":
            shapes = {key: value.shape for key, value in model.state_dict().items()}
        if name == "image_encoder":
            model.config.save_pretrained(root / name)
            _save_half(model, root / name / "pytorch_model.bin")
        else:
            model.save_config(root / name)
            _save_half(model, root / name / "diffusion_pytorch_model.bin")
        del model
    (tiny.feature_extractor if tiny else clip_feature_extractor(224)).save_pretrained(root / "feature_extractor")
    scheduler = {k: v for k, v in configs.PERFLOW_SCHEDULER.items() if k in ("num_train_timesteps", "beta_start")}
    DDIMScheduler(
        **scheduler, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1, prediction_type="epsilon",
    ).save_config(root / "scheduler")  # fmt: skip
    (root / "model_index.json").write_text(
        json.dumps({"_class_name": "MVDiffusionImagePipeline", "_diffusers_version": "0.19.3"}, indent=2)
    )
    return shapes


def _delta(root: Path, unet_shapes: dict[str, torch.Size]) -> None:
    from safetensors.torch import save_file

    delta = {}
    for key, shape in unet_shapes.items():
        if any(part in key for part in WONDER3D_ONLY):
            continue
        if key == "conv_in.weight":  # SD1.5 has 4 input channels; Wonder3D 8 (the merge skips this key)
            shape = (shape[0], 4, *shape[2:])
        delta[key] = torch.zeros(shape, dtype=torch.float16)
    root.mkdir(parents=True, exist_ok=True)
    save_file(delta, root / "diffusion_pytorch_model.v0-1.safetensors")
    (root / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", **configs.SD15_UNET}))


def _triposr(root: Path, mode: str, seed: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    if mode == "tiny":
        fixture = REPO_ROOT / "tests" / "fixtures" / "triposr_tiny"
        shutil.copy(fixture / "config.yaml", root / "config.yaml")
        shutil.copytree(fixture / "vit_tiny", root / "vit_tiny", dirs_exist_ok=True)
        shutil.copy(fixture / "model.ckpt", root / "model.ckpt")
        return
    from .builders import Builder

    model = Builder("real", torch.device("cpu"), torch.float32, seed)._build_tsr()  # smoothed + density-calibrated
    shutil.copy(REPO_ROOT / "tests" / "fixtures" / "manifests" / "triposr_config.yaml", root / "config.yaml")
    torch.save(model.state_dict(), root / "model.ckpt")  # fp32, as published


def describe(root: Path) -> dict[str, Any]:
    """The weights files under `root`: path, format, stored dtype(s), size."""
    from wonder3d_perflow.weights import describe_file

    files = sorted(p for p in root.rglob("*") if p.suffix in (".bin", ".ckpt", ".safetensors"))
    return {str(p.relative_to(root)): describe_file(p) for p in files}


def write_layouts(root: str | Path, mode: str = "real", seed: int = 0) -> dict[str, Any]:
    """`root`/{wonder3d,delta,triposr} as published; reused when a complete one is already there."""
    root = Path(root)
    marker = root / "layout.json"
    if marker.is_file():
        record = json.loads(marker.read_text())
        if record.get("mode") == mode and record.get("seed") == seed:
            return record
    shapes = _wonder3d(root / "wonder3d", mode, seed)
    _delta(root / "delta", shapes)
    _triposr(root / "triposr", mode, seed)
    record = {"mode": mode, "seed": seed, "root": str(root), "files": describe(root)}
    marker.write_text(json.dumps(record, indent=2))
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--mode", choices=("tiny", "real"), default="real")
    args = parser.parse_args(argv)
    print(json.dumps(write_layouts(args.out, args.mode), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
