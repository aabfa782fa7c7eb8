"""Real-architecture configs (values of the published checkpoints' config files) and an offline tokenizer.

Benchmarks build every model at its real size with random weights from these values, so no download is
needed: the timings and FLOPs depend on shapes only. tests/test_benchmarks.py checks the parameter counts of
the models built from these values against tests/fixtures/manifests/.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Stable Diffusion 1.5 UNet (runwayml/stable-diffusion-v1-5 unet/config.json; diffusers defaults elsewhere).
SD15_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "act_fn": "silu",
}
SD15_UNET_PARAMS = 859_520_964  # tests/fixtures/manifests/sd15_unet_keys.json

# SD VAE (AutoencoderKL of SD1.x; Wonder3D's lambdalabs VAE is the same architecture with sample_size 256).
SD_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

# CLIP ViT-L/14 text encoder as shipped with SD1.5 (text_encoder/config.json).
CLIP_L_TEXT: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "projection_dim": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}

# CLIP ViT-L/14 vision tower + projection (Wonder3D image_encoder, from lambdalabs/sd-image-variations).
CLIP_L_VISION: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "projection_dim": 768,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 14,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
}

# Wonder3D v1.0 unet/config.json (the values that matter; legacy flags as in tests/fixtures/manifests).
WONDER3D_UNET: dict[str, Any] = {
    "sample_size": 32,
    "in_channels": 8,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlockMV2D", "CrossAttnDownBlockMV2D", "CrossAttnDownBlockMV2D", "DownBlock2D"],
    "mid_block_type": "UNetMidBlockMV2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlockMV2D", "CrossAttnUpBlockMV2D", "CrossAttnUpBlockMV2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "class_embed_type": "projection",
    "projection_class_embeddings_input_dim": 10,
    "num_views": 6,
    "multiview_attention": True,
    "cd_attention_mid": True,
    "cd_attention_last": False,
    "sparse_mv_attention": False,
    "mvcd_attention": False,
}
WONDER3D_UNET_PARAMS = 910_785_284  # tests/fixtures/manifests/wonder3d_unet_keys.json

# stabilityai/TripoSR config.yaml (resolved) and the facebook/dino-vitb16 ViT config it builds on.
TRIPOSR: dict[str, Any] = {
    "cond_image_size": 512,
    "image_tokenizer_cls": "tsr.models.tokenizers.image.DINOSingleImageTokenizer",
    "image_tokenizer": {"pretrained_model_name_or_path": "facebook/dino-vitb16"},
    "tokenizer_cls": "tsr.models.tokenizers.triplane.Triplane1DTokenizer",
    "tokenizer": {"plane_size": 32, "num_channels": 1024},
    "backbone_cls": "tsr.models.transformer.transformer_1d.Transformer1D",
    "backbone": {
        "in_channels": 1024,
        "num_attention_heads": 16,
        "attention_head_dim": 64,
        "num_layers": 16,
        "cross_attention_dim": 768,
    },
    "post_processor_cls": "tsr.models.network_utils.TriplaneUpsampleNetwork",
    "post_processor": {"in_channels": 1024, "out_channels": 40},
    "decoder_cls": "tsr.models.network_utils.NeRFMLP",
    "decoder": {"in_channels": 120, "n_neurons": 64, "n_hidden_layers": 9, "activation": "silu"},
    "renderer_cls": "tsr.models.nerf_renderer.TriplaneNeRFRenderer",
    "renderer": {
        "radius": 0.87,
        "feature_reduction": "concat",
        "density_activation": "exp",
        "density_bias": -1.0,
        "num_samples_per_ray": 128,
    },
}
DINO_VITB16: dict[str, Any] = {
    "architectures": ["ViTModel"],
    "attention_probs_dropout_prob": 0.0,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.0,
    "hidden_size": 768,
    "image_size": 224,
    "initializer_range": 0.02,
    "intermediate_size": 3072,
    "layer_norm_eps": 1e-12,
    "model_type": "vit",
    "num_attention_heads": 12,
    "num_channels": 3,
    "num_hidden_layers": 12,
    "patch_size": 16,
    "torch_dtype": "float32",
}
TRIPOSR_PARAMS = 419_275_628  # tests/fixtures/manifests/triposr_keys.json

# PeRFlow scheduler as both pipelines build it: SD/DDIM betas, diff_eps, 4 windows.
PERFLOW_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "diff_eps",
    "num_time_windows": 4,
}

CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77


def _bytes_to_unicode() -> list[str]:
    """The 256 printable stand-ins CLIP's byte-level BPE uses for bytes (same table as GPT-2)."""
    bs = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_standin_clip_tokenizer(folder: str | Path) -> Path:
    """Write vocab.json / merges.txt of a stand-in CLIP tokenizer with the real vocab size (49408).

    The vocab holds the 256 byte symbols with and without the end-of-word mark, then filler entries, then
    ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407) as in OpenAI CLIP; there are no merges, so text
    tokenizes into characters. Timing depends only on the padded 77-token length, not on token identity.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _bytes_to_unicode()
    tokens = symbols + [s + "</w>" for s in symbols]
    tokens += [f"<|filler{i}|>" for i in range(CLIP_VOCAB_SIZE - 2 - len(tokens))]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    assert len(vocab) == CLIP_VOCAB_SIZE
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "special_tokens_map.json").write_text(
        json.dumps(
            {
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
            }
        )
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": CLIP_MAX_LENGTH,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
            }
        )
    )
    return folder


def standin_clip_tokenizer(folder: str | Path):
    """A ``transformers.CLIPTokenizer`` over :func:`write_standin_clip_tokenizer`'s files."""
    from transformers import CLIPTokenizer

    folder = write_standin_clip_tokenizer(folder)
    return CLIPTokenizer(
        vocab_file=str(folder / "vocab.json"),
        merges_file=str(folder / "merges.txt"),
        model_max_length=CLIP_MAX_LENGTH,
        pad_token="<|endoftext|>",
    )
