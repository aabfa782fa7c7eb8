"""Triplane tokens, the image-conditioned 1-D transformer and the triplane upsampler of TripoSR.

Module and parameter names follow the checkpoint (``tokenizer.embeddings``,
``backbone.transformer_blocks.N.attn1.to_q``, ``post_processor.upsample``...), so model.ckpt loads strictly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import BackboneConfig, PostProcessorConfig, TriplaneTokenizerConfig


class Triplane1DTokenizer(nn.Module):
    """Learned triplane queries, flattened to a token sequence in (plane, row, column) order."""

    def __init__(self, config: TriplaneTokenizerConfig):
        super().__init__()
        self.plane_size = config.plane_size
        self.num_channels = config.num_channels
        self.embeddings = nn.Parameter(
            torch.randn(3, config.num_channels, config.plane_size, config.plane_size) / config.num_channels**0.5
        )  # (3, C, P, P)

    def forward(self, batch_size: int) -> torch.Tensor:
        tokens = self.embeddings.permute(1, 0, 2, 3).reshape(self.num_channels, -1)  # (C, 3*P*P)
        return tokens.unsqueeze(0).expand(batch_size, -1, -1)  # (B, C, 3*P*P)

    def detokenize(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, channels, length = tokens.shape
        if channels != self.num_channels or length != 3 * self.plane_size**2:
            raise ValueError(
                f"expected tokens (B, {self.num_channels}, {3 * self.plane_size**2}), got {tuple(tokens.shape)}"
            )
        planes = tokens.reshape(batch, channels, 3, self.plane_size, self.plane_size)  # (B, C, 3, P, P)
        return planes.permute(0, 2, 1, 3, 4)  # (B, 3, C, P, P)


class Attention(nn.Module):
    """Multi-head (self or cross) attention with diffusers' names: to_q/to_k/to_v, to_out.0 (+ a no-op dropout)."""

    def __init__(self, query_dim: int, context_dim: int, heads: int, head_dim: int, bias: bool, dropout: float):
        super().__init__()
        inner = heads * head_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(dropout)])

    def forward(self, hidden_states: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = hidden_states if context is None else context
        batch = hidden_states.shape[0]

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.view(batch, x.shape[1], self.heads, -1).transpose(1, 2)  # (B, heads, T, d)

        q, k, v = heads(self.to_q(hidden_states)), heads(self.to_k(context)), heads(self.to_v(context))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, Tq, d)
        out = out.transpose(1, 2).reshape(batch, hidden_states.shape[1], -1)  # (B, Tq, heads*d)
        return self.to_out[1](self.to_out[0](out))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)  # first half is the value, second half the gate
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, dropout: float, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.net:
            x = module(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention to the image tokens, GEGLU feed-forward, each residual."""

    def __init__(self, dim: int, config: BackboneConfig):
        super().__init__()
        heads, head_dim = config.num_attention_heads, config.attention_head_dim
        affine = config.norm_elementwise_affine
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=affine)
        self.attn1 = Attention(dim, dim, heads, head_dim, config.attention_bias, config.dropout)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=affine)
        self.attn2 = Attention(dim, config.cross_attention_dim, heads, head_dim, config.attention_bias, config.dropout)
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=affine)
        self.ff = FeedForward(dim, config.dropout)

    def forward(self, hidden_states: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.attn1(self.norm1(hidden_states))
        hidden_states = hidden_states + self.attn2(self.norm2(hidden_states), context)
        return hidden_states + self.ff(self.norm3(hidden_states))


class Transformer1D(nn.Module):
    """Tokens (B, C, N) attend to image tokens (B, Nt, Cc).

    Output (B, C, N) = input + transformer(GroupNorm(input)).
    """

    def __init__(self, config: BackboneConfig):
        super().__init__()
        inner = config.num_attention_heads * config.attention_head_dim
        self.norm = nn.GroupNorm(config.norm_num_groups, config.in_channels, eps=1e-6, affine=True)
        self.proj_in = nn.Linear(config.in_channels, inner)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, config) for _ in range(config.num_layers)]
        )
        self.proj_out = nn.Linear(inner, config.in_channels)

    def forward(self, tokens: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        residual = tokens  # (B, C, N): the residual is the raw, un-normalised input
        hidden = self.norm(tokens).transpose(1, 2)  # (B, N, C)
        hidden = self.proj_in(hidden)  # (B, N, inner)
        for block in self.transformer_blocks:
            hidden = block(hidden, encoder_hidden_states)
        hidden = self.proj_out(hidden).transpose(1, 2)  # (B, C, N)
        return hidden + residual


class TriplaneUpsampleNetwork(nn.Module):
    """Per plane 2x upsampling: (B, 3, Cin, P, P) -> (B, 3, Cout, 2P, 2P) with a stride-2 transposed convolution."""

    def __init__(self, config: PostProcessorConfig):
        super().__init__()
        self.upsample = nn.ConvTranspose2d(config.in_channels, config.out_channels, kernel_size=2, stride=2)

    def forward(self, triplanes: torch.Tensor) -> torch.Tensor:
        batch, planes = triplanes.shape[:2]
        out = self.upsample(triplanes.flatten(0, 1))  # (B*3, Cout, 2P, 2P): planes folded into the batch
        return out.unflatten(0, (batch, planes))  # (B, 3, Cout, 2P, 2P)
