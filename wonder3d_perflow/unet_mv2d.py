"""Wonder3D's multiview UNet (`UNetMV2DConditionModel`), built from diffusers 0.19.3 parts.

The Wonder3D v1.0 UNet is the stock SD-style `UNet2DConditionModel` (8 input channels: noisy latent + condition
latent; 768-d cross-attention to one CLIP image token; a 10-input projection class embedding for the camera/domain
label) in which every transformer block is changed in two ways:

1. multiview self-attention: `attn1` of each view attends over the tokens of all `num_views` views of its group
   (the batch is a sequence of groups of `num_views` consecutive items, in the view order of `cameras.VIEW_NAMES`);
2. a cross-domain ("joint") attention after `attn1`: `hidden = attn_joint_mid(norm_joint_mid(hidden)) + hidden`, in
   which item ``i`` of the first half of the batch (normals) and item ``i + N/2`` (the same view, colors) attend
   over the union of their two token sets. The batch must therefore be laid out as ``[normals | colors]``; with
   classifier-free guidance ``[normal-uncond, normal-cond, color-uncond, color-cond]`` (upstream's fixed order).

Both attentions are computed by regrouping tokens in the block (``(N, L, C) -> (N/6, 6L, C)`` and
``(N, L, C) -> (N/2, 2L, C)``) and running ordinary self-attention over each group. Keys and values are the same
linear maps as upstream's, so this is the same function, with one attention call per group instead of six
repeated key/value copies. Because the regrouping lives in the block and not in an attention processor, any
diffusers processor stays correct: SDPA (`AttnProcessor2_0`, the default), or xformers via
`enable_xformers_memory_efficient_attention()`.

The state dict has exactly upstream's 802 keys and shapes (`tests/fixtures/manifests/wonder3d_unet_keys.json`),
so the published `diffusion_pytorch_model.bin` loads strictly, without renaming.
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention
from torch import nn

from t2mv.perflow.hub import MissingWeightsError, resolve_pretrained

from .weights import read_state_dict

logger = logging.getLogger(__name__)

# Upstream block names → the stock diffusers blocks they equal (with our transformer blocks swapped in).
_DOWN_BLOCKS = {"CrossAttnDownBlockMV2D": "CrossAttnDownBlock2D", "DownBlock2D": "DownBlock2D"}
_MID_BLOCKS = {"UNetMidBlockMV2DCrossAttn": "UNetMidBlock2DCrossAttn"}
_UP_BLOCKS = {"CrossAttnUpBlockMV2D": "CrossAttnUpBlock2D", "UpBlock2D": "UpBlock2D"}

# Config keys written by older upstream code that the v1.0 `unet/config.json` still carries. Upstream's current
# constructor ignores them (diffusers logs "not expected and will be ignored"); we accept and ignore them too.
LEGACY_CONFIG_KEYS = ("joint_attention", "joint_attention_twice", "cross_domain_attention")


class MVTransformerBlock(nn.Module):
    """A stock `BasicTransformerBlock` with multiview `attn1` and the cross-domain joint attention.

    It adopts the stock block's layers (`norm1`, `attn1`, `norm2`, `attn2`, `norm3`, `ff`; same parameters, same
    key names) and adds `attn_joint_mid` / `norm_joint_mid` when `cd_attention_mid` is set. Order:
    attn1 (over the views of a group) → joint (normal↔color) → attn2 (the CLIP token) → feed-forward.
    """

    def __init__(
        self,
        block: BasicTransformerBlock,
        *,
        num_views: int,
        multiview_attention: bool = True,
        cd_attention_mid: bool = True,
    ):
        super().__init__()
        if block.only_cross_attention or block.use_ada_layer_norm or block.use_ada_layer_norm_zero:
            raise ValueError(
                "MVTransformerBlock supports the SD-style block only (layer norms, self-attention attn1)."
            )
        self.num_views = num_views
        self.multiview_attention = multiview_attention
        self.norm1, self.attn1 = block.norm1, block.attn1
        self.norm2, self.attn2 = block.norm2, block.attn2
        self.norm3, self.ff = block.norm3, block.ff
        if cd_attention_mid:
            dim = block.norm1.normalized_shape[0]
            heads = block.attn1.heads
            self.attn_joint_mid = Attention(
                query_dim=dim,
                heads=heads,
                dim_head=dim // heads,
                bias=False,
                upcast_attention=block.attn1.upcast_attention,
            )
            # Upstream zero-initialises the output so that a freshly added layer starts as the identity.
            nn.init.zeros_(self.attn_joint_mid.to_out[0].weight)
            self.norm_joint_mid = nn.LayerNorm(dim)
        else:
            self.attn_joint_mid = None
            self.norm_joint_mid = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        timestep: torch.Tensor | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # Signature of BasicTransformerBlock.forward, which Transformer2DModel calls. A mask has no meaning once
        # views are grouped, and the SD-style UNet never passes one.
        if attention_mask is not None:
            raise ValueError("MVTransformerBlock: attention_mask is not supported (multiview attention).")
        cross_attention_kwargs = cross_attention_kwargs or {}
        batch, tokens, channels = hidden_states.shape
        group = self.num_views if self.multiview_attention else 1
        if batch % group != 0:
            raise ValueError(
                f"Multiview UNet: batch {batch} is not a multiple of num_views={group}; pass whole groups of views."
            )

        # 1. Multiview self-attention: each view's queries attend over all views of its group.
        norm_hidden_states = self.norm1(hidden_states)
        grouped = norm_hidden_states.reshape(batch // group, group * tokens, channels)  # (N/V, V·L, C)
        attn_output = self.attn1(grouped, **cross_attention_kwargs)
        hidden_states = attn_output.reshape(batch, tokens, channels) + hidden_states  # (N, L, C)

        # 2. Cross-domain attention: item i (normal) and item i + N/2 (color) attend over both token sets.
        if self.attn_joint_mid is not None:
            if batch % 2 != 0:
                raise ValueError(
                    f"Multiview UNet: batch {batch} must hold normals then colors (an even number of items)."
                )
            half = batch // 2
            norm_hidden_states = self.norm_joint_mid(hidden_states)
            paired = torch.cat([norm_hidden_states[:half], norm_hidden_states[half:]], dim=1)  # (N/2, 2L, C)
            attn_output = self.attn_joint_mid(paired)
            attn_output = torch.cat([attn_output[:, :tokens], attn_output[:, tokens:]], dim=0)  # (N, L, C)
            hidden_states = attn_output + hidden_states

        # 3. Cross-attention to the CLIP image token.
        norm_hidden_states = self.norm2(hidden_states)
        attn_output = self.attn2(
            norm_hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=encoder_attention_mask,
            **cross_attention_kwargs,
        )
        hidden_states = attn_output + hidden_states

        # 4. Feed-forward.
        hidden_states = self.ff(self.norm3(hidden_states)) + hidden_states
        return hidden_states


class UNetMV2DConditionModel(UNet2DConditionModel):
    """Wonder3D's multiview UNet. Defaults are the `flamehaze1115/wonder3d-v1.0` architecture.

    Every `unet/config.json` key is a constructor argument: the stock `UNet2DConditionModel` arguments plus
    `num_views`, `multiview_attention`, `cd_attention_mid`, and the upstream flags that v1.0 leaves off
    (`cd_attention_last`, `sparse_mv_attention`, `mvcd_attention`: only `False` is accepted). The legacy keys
    `joint_attention`, `joint_attention_twice`, `cross_domain_attention` are accepted and ignored, as upstream
    does. Unknown keys raise `ValueError` (see `check_config`).

    Block types use upstream's names (`CrossAttnDownBlockMV2D`, `UNetMidBlockMV2DCrossAttn`,
    `CrossAttnUpBlockMV2D`, plus the stock `DownBlock2D` / `UpBlock2D`).

    Do not call `set_attn_processor` expecting upstream's `MVAttnProcessor`: the multiview and joint grouping is
    done in `MVTransformerBlock`, so any stock processor (SDPA, xformers, plain) computes the right thing.
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int | None = 32,
        in_channels: int = 8,
        out_channels: int = 4,
        center_input_sample: bool = False,
        flip_sin_to_cos: bool = True,
        freq_shift: int = 0,
        down_block_types: tuple[str, ...] = (
            "CrossAttnDownBlockMV2D",
            "CrossAttnDownBlockMV2D",
            "CrossAttnDownBlockMV2D",
            "DownBlock2D",
        ),
        mid_block_type: str = "UNetMidBlockMV2DCrossAttn",
        up_block_types: tuple[str, ...] = (
            "UpBlock2D",
            "CrossAttnUpBlockMV2D",
            "CrossAttnUpBlockMV2D",
            "CrossAttnUpBlockMV2D",
        ),
        only_cross_attention: bool = False,
        block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280),
        layers_per_block: int = 2,
        downsample_padding: int = 1,
        mid_block_scale_factor: float = 1,
        act_fn: str = "silu",
        norm_num_groups: int | None = 32,
        norm_eps: float = 1e-5,
        cross_attention_dim: int = 768,
        transformer_layers_per_block: int = 1,
        encoder_hid_dim: int | None = None,
        encoder_hid_dim_type: str | None = None,
        attention_head_dim: int = 8,
        num_attention_heads: int | None = None,
        dual_cross_attention: bool = False,
        use_linear_projection: bool = False,
        class_embed_type: str | None = "projection",
        addition_embed_type: str | None = None,
        addition_time_embed_dim: int | None = None,
        num_class_embeds: int | None = None,
        upcast_attention: bool = False,
        resnet_time_scale_shift: str = "default",
        resnet_skip_time_act: bool = False,
        resnet_out_scale_factor: float = 1.0,
        time_embedding_type: str = "positional",
        time_embedding_dim: int | None = None,
        time_embedding_act_fn: str | None = None,
        timestep_post_act: str | None = None,
        time_cond_proj_dim: int | None = None,
        conv_in_kernel: int = 3,
        conv_out_kernel: int = 3,
        projection_class_embeddings_input_dim: int | None = 10,
        class_embeddings_concat: bool = False,
        mid_block_only_cross_attention: bool | None = None,
        cross_attention_norm: str | None = None,
        addition_embed_type_num_heads: int = 64,
        # Wonder3D
        num_views: int = 6,
        multiview_attention: bool = True,
        cd_attention_mid: bool = True,
        cd_attention_last: bool = False,
        sparse_mv_attention: bool = False,
        mvcd_attention: bool = False,
        # Legacy keys of older upstream configs: accepted, ignored (see LEGACY_CONFIG_KEYS).
        joint_attention: bool | None = None,
        joint_attention_twice: bool | None = None,
        cross_domain_attention: bool | None = None,
    ):
        unsupported = {
            "cd_attention_last": cd_attention_last,
            "sparse_mv_attention": sparse_mv_attention,
            "mvcd_attention": mvcd_attention,
            "dual_cross_attention": dual_cross_attention,
            "only_cross_attention": only_cross_attention,
        }
        on = [name for name, value in unsupported.items() if value]
        if on:
            raise ValueError(
                f"UNetMV2DConditionModel: {on} must be false (Wonder3D v1.0 leaves them off; they are not implemented)."
            )
        if not isinstance(num_views, int) or num_views < 1:
            raise ValueError(f"UNetMV2DConditionModel: num_views must be a positive int, got {num_views!r}.")
        stock_down = [_map_block(name, _DOWN_BLOCKS, "down_block_types") for name in down_block_types]
        stock_mid = _map_block(mid_block_type, _MID_BLOCKS, "mid_block_type")
        stock_up = [_map_block(name, _UP_BLOCKS, "up_block_types") for name in up_block_types]

        super().__init__(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=out_channels,
            center_input_sample=center_input_sample,
            flip_sin_to_cos=flip_sin_to_cos,
            freq_shift=freq_shift,
            down_block_types=tuple(stock_down),
            mid_block_type=stock_mid,
            up_block_types=tuple(stock_up),
            only_cross_attention=only_cross_attention,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            downsample_padding=downsample_padding,
            mid_block_scale_factor=mid_block_scale_factor,
            act_fn=act_fn,
            norm_num_groups=norm_num_groups,
            norm_eps=norm_eps,
            cross_attention_dim=cross_attention_dim,
            transformer_layers_per_block=transformer_layers_per_block,
            encoder_hid_dim=encoder_hid_dim,
            encoder_hid_dim_type=encoder_hid_dim_type,
            attention_head_dim=attention_head_dim,
            num_attention_heads=num_attention_heads,
            dual_cross_attention=dual_cross_attention,
            use_linear_projection=use_linear_projection,
            class_embed_type=class_embed_type,
            addition_embed_type=addition_embed_type,
            addition_time_embed_dim=addition_time_embed_dim,
            num_class_embeds=num_class_embeds,
            upcast_attention=upcast_attention,
            resnet_time_scale_shift=resnet_time_scale_shift,
            resnet_skip_time_act=resnet_skip_time_act,
            resnet_out_scale_factor=resnet_out_scale_factor,
            time_embedding_type=time_embedding_type,
            time_embedding_dim=time_embedding_dim,
            time_embedding_act_fn=time_embedding_act_fn,
            timestep_post_act=timestep_post_act,
            time_cond_proj_dim=time_cond_proj_dim,
            conv_in_kernel=conv_in_kernel,
            conv_out_kernel=conv_out_kernel,
            projection_class_embeddings_input_dim=projection_class_embeddings_input_dim,
            class_embeddings_concat=class_embeddings_concat,
            mid_block_only_cross_attention=mid_block_only_cross_attention,
            cross_attention_norm=cross_attention_norm,
            addition_embed_type_num_heads=addition_embed_type_num_heads,
        )
        # The stock __init__ registered the stock block names; keep upstream's names in our config so that
        # save_config writes a config the real loader (and upstream) accepts.
        self.register_to_config(
            down_block_types=tuple(down_block_types),
            mid_block_type=mid_block_type,
            up_block_types=tuple(up_block_types),
        )

        # Swap every transformer block for its multiview version (adopting the stock layers, no re-init).
        for module in self.modules():
            blocks = getattr(module, "transformer_blocks", None)
            if isinstance(blocks, nn.ModuleList):
                for i, block in enumerate(blocks):
                    blocks[i] = MVTransformerBlock(
                        block,
                        num_views=num_views,
                        multiview_attention=multiview_attention,
                        cd_attention_mid=cd_attention_mid,
                    )

    @classmethod
    def check_config(cls, config: dict[str, Any]) -> None:
        """Raise `ValueError` for keys our constructor does not know (private `_*` keys are allowed)."""
        class_name = config.get("_class_name")
        if class_name is not None and class_name != cls.__name__:
            raise ValueError(
                f"This config is for {class_name!r}, not {cls.__name__!r}: point at the Wonder3D `unet` folder."
            )
        known = set(inspect.signature(cls.__init__).parameters) - {"self"}
        unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
        if unknown:
            raise ValueError(f"{cls.__name__}: unknown config keys {unknown}; expected a subset of {sorted(known)}.")

    @classmethod
    def from_config(cls, config: dict[str, Any], **kwargs: Any) -> UNetMV2DConditionModel:
        """Build the architecture from a config dict, rejecting unknown keys (diffusers would only log them)."""
        config = {**dict(config), **kwargs}
        cls.check_config(config)
        return super().from_config(config)

    @classmethod
    def from_pretrained(
        cls,
        repo_or_path: str | Path,
        *,
        subfolder: str | None = "unet",
        torch_dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        revision: str | None = None,
        local_files_only: bool | None = None,
    ) -> UNetMV2DConditionModel:
        """Load a Wonder3D UNet strictly from a checkpoint folder (or hub id) holding `config.json` and weights.

        The architecture is built on the meta device (no memory, no random init), then the weights are assigned
        with `load_state_dict(strict=True)`: every key of the file must match the model and vice versa.
        Weights: `diffusion_pytorch_model.safetensors`, else `diffusion_pytorch_model.bin` (the published fp16
        pickle), read one tensor at a time and cast to `torch_dtype` as read (`weights.read_state_dict`).
        """
        prefix = f"{subfolder}/" if subfolder else ""
        root = resolve_pretrained(
            repo_or_path,
            allow_patterns=[f"{prefix}config.json", f"{prefix}diffusion_pytorch_model.*"],
            revision=revision,
            local_files_only=local_files_only,
        )
        folder = Path(root) / subfolder if subfolder else Path(root)
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise MissingWeightsError(str(folder), "no config.json: expected a Wonder3D `unet` folder")
        config = json.loads(config_file.read_text())
        with torch.device("meta"):
            model = cls.from_config(config)
        state_dict = load_weights_file(folder, dtype=torch_dtype)
        model.load_state_dict(state_dict, strict=True, assign=True)
        return model.to(device=device, dtype=torch_dtype).eval()


def _map_block(name: str, table: dict[str, str], field: str) -> str:
    if name not in table:
        raise ValueError(f"UNetMV2DConditionModel: unsupported {field} entry {name!r}; expected one of {list(table)}.")
    return table[name]


def load_weights_file(
    folder: str | Path, stem: str = "diffusion_pytorch_model", dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """Read `<stem>.safetensors` (preferred) or `<stem>.bin` from `folder`, one tensor at a time, floating tensors
    cast to `dtype` as they are read (`weights.read_state_dict`: the fp16 file and its fp32 copy never coexist)."""
    folder = Path(folder)
    for suffix in ("safetensors", "bin"):
        if (folder / f"{stem}.{suffix}").is_file():
            return read_state_dict(folder / f"{stem}.{suffix}", dtype)
    raise MissingWeightsError(str(folder), f"no {stem}.safetensors or {stem}.bin in this folder")
