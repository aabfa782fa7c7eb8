"""Typed configuration of TripoSR.

The published ``config.yaml`` (stabilityai/TripoSR) names each part by an upstream dotted class path plus a dict of
options. We parse it into dataclasses with an OmegaConf structured merge, so a misspelt or unknown key is an error
instead of being silently ignored, and we accept only the six class paths upstream uses (mapped to our own classes;
nothing is imported from a config string).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# The class paths of the published config, checked verbatim (they are identifiers, not something we import).
IMAGE_TOKENIZER_CLS = "tsr.models.tokenizers.image.DINOSingleImageTokenizer"
TOKENIZER_CLS = "tsr.models.tokenizers.triplane.Triplane1DTokenizer"
BACKBONE_CLS = "tsr.models.transformer.transformer_1d.Transformer1D"
POST_PROCESSOR_CLS = "tsr.models.network_utils.TriplaneUpsampleNetwork"
DECODER_CLS = "tsr.models.network_utils.NeRFMLP"
RENDERER_CLS = "tsr.models.nerf_renderer.TriplaneNeRFRenderer"


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass
class ViTConfig:
    """The subset of a Hugging Face ``ViTConfig`` that the DINO image tokenizer needs (``config.json`` values)."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    qkv_bias: bool = True

    # config.json keys that describe the file, not the architecture.
    _METADATA_KEYS = ("architectures", "model_type", "torch_dtype", "transformers_version", "_name_or_path")

    def __post_init__(self) -> None:
        _require(self.hidden_act == "gelu", f"ViT hidden_act must be 'gelu' (exact GELU), got {self.hidden_act!r}.")
        _require(
            self.hidden_size % self.num_attention_heads == 0,
            f"ViT hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}.",
        )
        _require(
            self.image_size % self.patch_size == 0,
            f"ViT image_size {self.image_size} is not a multiple of patch_size {self.patch_size}.",
        )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ViTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known - set(cls._METADATA_KEYS))
        _require(not unknown, f"Unknown keys in the ViT config.json: {unknown}. Known keys: {sorted(known)}.")
        return cls(**{k: v for k, v in values.items() if k in known})

    @classmethod
    def from_json_file(cls, path: str | Path) -> ViTConfig:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


# facebook/dino-vitb16 config.json (tests/fixtures/manifests/triposr_dino_vitb16_config.json); qkv_bias is absent
# there, so transformers' default (True) applies. Built in so that no constructor touches the hub.
DINO_VITB16 = ViTConfig()
KNOWN_VIT_CONFIGS: dict[str, ViTConfig] = {"facebook/dino-vitb16": DINO_VITB16}


@dataclass
class ImageTokenizerConfig:
    pretrained_model_name_or_path: str = "facebook/dino-vitb16"
    # Training-only upstream option; accepted so upstream configs parse, it has no effect on inference.
    enable_gradient_checkpointing: bool = False


@dataclass
class TriplaneTokenizerConfig:
    plane_size: int = MISSING
    num_channels: int = MISSING


@dataclass
class BackboneConfig:
    """Transformer1D options (upstream names and defaults); values the published model never uses are rejected."""

    num_attention_heads: int = 16
    attention_head_dim: int = 88
    in_channels: Optional[int] = None
    out_channels: Optional[int] = None  # upstream ignores it: proj_out always maps back to in_channels
    num_layers: int = 1
    dropout: float = 0.0
    norm_num_groups: int = 32
    cross_attention_dim: Optional[int] = None
    attention_bias: bool = False
    activation_fn: str = "geglu"
    only_cross_attention: bool = False
    double_self_attention: bool = False
    upcast_attention: bool = False
    norm_type: str = "layer_norm"
    norm_elementwise_affine: bool = True
    gradient_checkpointing: bool = False  # training-only, no effect here

    def validate(self) -> None:
        _require(self.in_channels is not None, "backbone.in_channels is required.")
        _require(self.cross_attention_dim is not None, "backbone.cross_attention_dim is required.")
        _require(self.activation_fn == "geglu", f"backbone.activation_fn must be 'geglu', got {self.activation_fn!r}.")
        _require(self.norm_type == "layer_norm", f"backbone.norm_type must be 'layer_norm', got {self.norm_type!r}.")
        for name in ("only_cross_attention", "double_self_attention", "upcast_attention"):
            _require(not getattr(self, name), f"backbone.{name}=True is not supported (TripoSR uses False).")
        _require(
            self.in_channels % self.norm_num_groups == 0,
            f"backbone.in_channels {self.in_channels} is not divisible by norm_num_groups {self.norm_num_groups}.",
        )


@dataclass
class PostProcessorConfig:
    in_channels: int = MISSING
    out_channels: int = MISSING


@dataclass
class DecoderConfig:
    in_channels: int = MISSING
    n_neurons: int = MISSING
    n_hidden_layers: int = MISSING
    activation: str = "relu"
    bias: bool = True
    weight_init: Optional[str] = "kaiming_uniform"
    bias_init: Optional[str] = None

    def validate(self) -> None:
        _require(
            self.activation in ("relu", "silu"), f"decoder.activation must be relu or silu, got {self.activation!r}."
        )
        _require(self.n_hidden_layers >= 1, f"decoder.n_hidden_layers must be >= 1, got {self.n_hidden_layers}.")
        _require(
            self.weight_init in (None, "kaiming_uniform"),
            f"decoder.weight_init must be None or 'kaiming_uniform', got {self.weight_init!r}.",
        )
        _require(
            self.bias_init in (None, "zero"), f"decoder.bias_init must be None or 'zero', got {self.bias_init!r}."
        )


@dataclass
class RendererConfig:
    radius: float = MISSING
    feature_reduction: str = "concat"
    # Upstream's default "trunc_exp" only differs from exp in its gradient; the published config says "exp".
    density_activation: str = "trunc_exp"
    density_bias: float = -1.0
    color_activation: str = "sigmoid"
    num_samples_per_ray: int = 128
    randomized: bool = False  # training-only jitter, no effect here

    def validate(self) -> None:
        _require(self.radius > 0, f"renderer.radius must be positive, got {self.radius}.")
        _require(
            self.feature_reduction in ("concat", "mean"),
            f"renderer.feature_reduction must be 'concat' or 'mean', got {self.feature_reduction!r}.",
        )
        _require(
            self.density_activation in ("exp", "trunc_exp"),
            f"renderer.density_activation must be 'exp' (or 'trunc_exp'), got {self.density_activation!r}.",
        )
        _require(
            self.color_activation == "sigmoid",
            f"renderer.color_activation must be 'sigmoid', got {self.color_activation!r}.",
        )
        _require(self.num_samples_per_ray >= 1, "renderer.num_samples_per_ray must be >= 1.")


@dataclass
class TSRConfig:
    cond_image_size: int = MISSING
    image_tokenizer_cls: str = IMAGE_TOKENIZER_CLS
    image_tokenizer: ImageTokenizerConfig = field(default_factory=ImageTokenizerConfig)
    tokenizer_cls: str = TOKENIZER_CLS
    tokenizer: TriplaneTokenizerConfig = field(default_factory=TriplaneTokenizerConfig)
    backbone_cls: str = BACKBONE_CLS
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    post_processor_cls: str = POST_PROCESSOR_CLS
    post_processor: PostProcessorConfig = field(default_factory=PostProcessorConfig)
    decoder_cls: str = DECODER_CLS
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    renderer_cls: str = RENDERER_CLS
    renderer: RendererConfig = field(default_factory=RendererConfig)

    def validate(self) -> None:
        """Check values and cross-part consistency (called by ``from_dict`` and by ``TSR``)."""
        for part in (self.backbone, self.decoder, self.renderer):
            part.validate()
        expected = {
            "image_tokenizer_cls": IMAGE_TOKENIZER_CLS,
            "tokenizer_cls": TOKENIZER_CLS,
            "backbone_cls": BACKBONE_CLS,
            "post_processor_cls": POST_PROCESSOR_CLS,
            "decoder_cls": DECODER_CLS,
            "renderer_cls": RENDERER_CLS,
        }
        for name, value in expected.items():
            _require(
                getattr(self, name) == value,
                f"{name} is {getattr(self, name)!r}; only the TripoSR class {value!r} is supported.",
            )
        channels = self.tokenizer.num_channels
        _require(
            self.backbone.in_channels == channels,
            f"backbone.in_channels ({self.backbone.in_channels}) must equal tokenizer.num_channels ({channels}).",
        )
        _require(
            self.post_processor.in_channels == channels,
            f"post_processor.in_channels ({self.post_processor.in_channels}) must equal tokenizer.num_channels "
            f"({channels}).",
        )
        planes = 3 if self.renderer.feature_reduction == "concat" else 1
        _require(
            self.decoder.in_channels == planes * self.post_processor.out_channels,
            f"decoder.in_channels ({self.decoder.in_channels}) must be {planes} x post_processor.out_channels "
            f"({self.post_processor.out_channels}) for feature_reduction={self.renderer.feature_reduction!r}.",
        )
        _require(self.cond_image_size > 0, f"cond_image_size must be positive, got {self.cond_image_size}.")

    @classmethod
    def from_dict(cls, values: Any) -> TSRConfig:
        """Strict structured merge: unknown keys, wrong types and missing required values raise ``ValueError``.

        ``${...}`` interpolations (the published config has ``${tokenizer.num_channels}``) are resolved.
        """
        try:
            merged = OmegaConf.merge(OmegaConf.structured(cls), values)
            config = OmegaConf.to_object(merged)
        except OmegaConfBaseException as e:
            raise ValueError(f"Invalid TripoSR config: {e}") from e
        config.validate()
        return config

    @classmethod
    def from_yaml_file(cls, path: str | Path) -> TSRConfig:
        try:
            values = OmegaConf.load(path)
        except OmegaConfBaseException as e:
            raise ValueError(f"Could not parse the TripoSR config {path}: {e}") from e
        return cls.from_dict(values)
