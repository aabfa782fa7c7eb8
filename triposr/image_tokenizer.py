"""DINO ViT-B/16 image tokenizer of TripoSR.

Our own ViT with the parameter names of transformers 4.35 ``ViTModel`` (the names stored in model.ckpt), so the real
checkpoint loads strictly whatever transformers version is installed. The position-embedding interpolation is the
4.35 ("legacy") one: bicubic with ``scale_factor=(n + 0.1) / n0``; transformers >= 4.45 resizes to an explicit size,
which gives different numbers, and TripoSR was trained with the legacy formula.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ViTConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def interpolate_pos_encoding_legacy(position_embeddings: torch.Tensor, height: int, width: int, patch_size: int):
    """Resize ViT position embeddings (1, 1 + n0*n0, C) to a (height/patch) x (width/patch) patch grid.

    Reproduces transformers 4.35 ``ViTEmbeddings.interpolate_pos_encoding``: the CLS embedding is kept, the n0 x n0
    patch grid is resized by bicubic interpolation with ``scale_factor = (h + 0.1) / n0`` (DINO's +0.1 avoids a
    floor rounding to h - 1). Passing a scale factor (not a size) also changes the sampling positions, which is why
    the result differs from ``size=(h, w)``.
    """
    num_positions = position_embeddings.shape[1] - 1
    grid = int(math.sqrt(num_positions))
    if grid * grid != num_positions:
        raise ValueError(f"position embeddings hold {num_positions} patches, which is not a square grid")
    h0 = height // patch_size
    w0 = width // patch_size
    if h0 * w0 == num_positions and height == width:
        return position_embeddings
    dim = position_embeddings.shape[-1]
    class_pos_embed = position_embeddings[:, :1]  # (1, 1, C)
    patch_pos_embed = position_embeddings[:, 1:].reshape(1, grid, grid, dim).permute(0, 3, 1, 2)  # (1, C, n0, n0)
    # Bicubic in float32: the fp16 kernels are not available on every device and the table is tiny.
    patch_pos_embed = F.interpolate(
        patch_pos_embed.float(),
        scale_factor=((h0 + 0.1) / grid, (w0 + 0.1) / grid),
        mode="bicubic",
        align_corners=False,
    ).to(position_embeddings.dtype)  # (1, C, h0, w0)
    if patch_pos_embed.shape[-2:] != (h0, w0):
        raise RuntimeError(f"legacy position interpolation gave {tuple(patch_pos_embed.shape[-2:])}, not {(h0, w0)}")
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).reshape(1, h0 * w0, dim)  # (1, h0*w0, C), row-major
    return torch.cat([class_pos_embed, patch_pos_embed], dim=1)  # (1, 1 + h0*w0, C)


class ViTPatchEmbeddings(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.projection = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # (B, 3, H, W) -> (B, C, H/p, W/p) -> (B, H/p * W/p, C)
        return self.projection(pixel_values).flatten(2).transpose(1, 2)


class ViTEmbeddings(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        num_patches = (config.image_size // config.patch_size) ** 2
        self.patch_size = config.patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.patch_embeddings = ViTPatchEmbeddings(config)
        self.position_embeddings = nn.Parameter(torch.zeros(1, num_patches + 1, config.hidden_size))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = pixel_values.shape
        patches = self.patch_embeddings(pixel_values)  # (B, N, C)
        cls = self.cls_token.expand(batch, -1, -1)  # (B, 1, C)
        tokens = torch.cat([cls, patches], dim=1)  # (B, 1 + N, C)
        return tokens + interpolate_pos_encoding_legacy(self.position_embeddings, height, width, self.patch_size)


class ViTSelfAttention(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.key = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.value = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, tokens, channels = hidden_states.shape
        head_dim = channels // self.num_heads

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, tokens, self.num_heads, head_dim).transpose(1, 2)  # (B, heads, T, d)

        q, k, v = heads(self.query(hidden_states)), heads(self.key(hidden_states)), heads(self.value(hidden_states))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, d); softmax(q k^T / sqrt(d)) v
        return out.transpose(1, 2).reshape(batch, tokens, channels)  # (B, T, C)


class ViTSelfOutput(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dense(hidden_states)


class ViTAttention(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.attention = ViTSelfAttention(config)
        self.output = ViTSelfOutput(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.output(self.attention(hidden_states))


class ViTIntermediate(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(hidden_states))  # exact (erf) GELU, as "gelu" in transformers


class ViTOutput(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.dense(hidden_states)


class ViTLayer(nn.Module):
    """Pre-norm transformer layer: x + attn(LN(x)), then h + mlp(LN(h))."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.attention = ViTAttention(config)
        self.intermediate = ViTIntermediate(config)
        self.output = ViTOutput(config)
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.attention(self.layernorm_before(hidden_states))
        return hidden_states + self.output(self.intermediate(self.layernorm_after(hidden_states)))


class ViTEncoder(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.layer = nn.ModuleList([ViTLayer(config) for _ in range(config.num_hidden_layers)])

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            hidden_states = layer(hidden_states)
        return hidden_states


class ViTPooler(nn.Module):
    """Present only because the checkpoint stores its weights (ViTModel's default pooler); TripoSR never uses it."""

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)


class ViTModel(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        self.embeddings = ViTEmbeddings(config)
        self.encoder = ViTEncoder(config)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.pooler = ViTPooler(config)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels -> last hidden state (B, 1 + H/p * W/p, C), CLS first."""
        pixel_values = pixel_values.to(self.embeddings.patch_embeddings.projection.weight.dtype)
        return self.layernorm(self.encoder(self.embeddings(pixel_values)))


class DINOSingleImageTokenizer(nn.Module):
    """Images in [0, 1] -> DINO tokens, channels first: (B, 3, H, W) -> (B, C, 1 + H/16 * W/16)."""

    def __init__(self, vit_config: ViTConfig):
        super().__init__()
        self.model = ViTModel(vit_config)
        # Non-persistent: the checkpoint does not hold them. Created on the current default device (meta included).
        self.register_buffer("image_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("image_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def reset_normalization(self) -> None:
        """Materialise the mean/std buffers on the CPU after a meta-device build whose weights were loaded with
        ``assign=True`` (they are not in the checkpoint, so loading leaves them on the meta device)."""
        if self.image_mean.device.type == "meta":
            self.image_mean = torch.tensor(IMAGENET_MEAN, dtype=self.image_mean.dtype).view(1, 3, 1, 1)
            self.image_std = torch.tensor(IMAGENET_STD, dtype=self.image_std.dtype).view(1, 3, 1, 1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = (images - self.image_mean) / self.image_std  # (B, 3, H, W)
        tokens = self.model(images)  # (B, Nt, C)
        return tokens.transpose(1, 2)  # (B, C, Nt)
