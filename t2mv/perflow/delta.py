"""ΔW tools: load a PeRFlow delta, merge it into a UNet (strict or tolerant), compute and save your own.

A PeRFlow "ΔW" is ``W_perflow - W_sd15``: a full SD1.5 ``UNet2DConditionModel`` state dict of differences (not a
LoRA). The published one, ``hansyan/perflow-sd15-delta-weights`` (CC-BY-NC-4.0), is stored in diffusers UNet layout
at the repo root: ``config.json`` + ``diffusion_pytorch_model.<variant>.safetensors`` (variant ``v0-1``, fp16).

Merge arithmetic follows upstream: each base tensor is cast to the delta's dtype, the delta is added, and the sum is
cast back to the base dtype. With an fp16 delta this is an fp16 add even for an fp32 UNet; pass a float32 delta
(``{k: v.float() for k, v in delta.items()}``) for a full-precision merge.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .hub import MissingWeightsError, resolve_pretrained

logger = logging.getLogger(__name__)

DEFAULT_DELTA_REPO = "hansyan/perflow-sd15-delta-weights"
WEIGHTS_NAME = "diffusion_pytorch_model"
# Upstream's own local cache of a delta computed from a merged model (src/utils_perflow.py).
UPSTREAM_LOCAL_DELTA_NAME = "delta_weights.safetensors"


def _weights_filename(variant: str | None, suffix: str = "safetensors") -> str:
    return f"{WEIGHTS_NAME}.{variant}.{suffix}" if variant else f"{WEIGHTS_NAME}.{suffix}"


@dataclass
class DeltaReport:
    """What a ΔW merge did, key by key.

    Attributes:
        applied: delta keys added to the UNet.
        skipped_shape: delta keys present in the UNet with a different shape, left unchanged (tolerant mode only;
            for a Wonder3D UNet this is exactly ``conv_in.weight``: 8 input channels against SD1.5's 4).
        missing: delta keys the UNet does not have (tolerant mode only).
        untouched: UNet keys the delta does not cover (e.g. Wonder3D's ``class_embedding.*``, ``attn_joint_mid.*``).
        shape_mismatches: for each skipped key, ``(unet_shape, delta_shape)``.
        alpha: the scale the delta was applied with.
        strict: whether the strict mode was used.
    """

    applied: list[str] = field(default_factory=list)
    skipped_shape: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    untouched: list[str] = field(default_factory=list)
    shape_mismatches: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    alpha: float = 1.0
    strict: bool = True

    @property
    def complete(self) -> bool:
        """True when every delta key was applied."""
        return not self.skipped_shape and not self.missing

    def summary(self) -> str:
        """One line: the counts, then the names of what was not applied (and a few untouched keys)."""
        mode = "strict" if self.strict else "tolerant"
        parts = [
            f"ΔW merge ({mode}, alpha={self.alpha:g}): {len(self.applied)} applied",
            f"{len(self.skipped_shape)} skipped for shape",
            f"{len(self.missing)} missing from the UNet",
            f"{len(self.untouched)} UNet tensors untouched",
        ]
        text = ", ".join(parts)
        if self.skipped_shape:
            shapes = "; ".join(
                f"{k}: unet {list(self.shape_mismatches[k][0])} vs delta {list(self.shape_mismatches[k][1])}"
                for k in self.skipped_shape
            )
            text += f". Skipped: {shapes}"
        if self.missing:
            text += f". Missing: {', '.join(self.missing[:8])}" + (" ..." if len(self.missing) > 8 else "")
        if self.untouched:
            prefixes = sorted({k.split(".")[0] for k in self.untouched})
            text += f". Untouched modules: {', '.join(prefixes[:8])}" + (" ..." if len(prefixes) > 8 else "")
        return text


def load_delta_weights(
    repo_or_path: str | os.PathLike = DEFAULT_DELTA_REPO,
    variant: str | None = "v0-1",
    *,
    revision: str | None = None,
    local_files_only: bool | None = None,
    device: str | torch.device = "cpu",
    lazy: bool = False,
) -> Mapping[str, torch.Tensor]:
    """Load a ΔW state dict from a hub id, a local folder or a ``.safetensors`` file, in its stored dtype.

    ``lazy=True`` returns a read-only mapping that reads each tensor from the (memory-mapped) safetensors file when
    it is asked for, so merging the 1.7 GB SD1.5 ΔW never holds more than one of its tensors in RAM (low-memory
    mode); ``.bin`` files are always read whole.

    In a folder (or hub snapshot) it reads ``diffusion_pytorch_model.<variant>.safetensors`` (``.bin`` as a
    fallback, loaded with ``weights_only=True``); ``variant=None`` reads ``diffusion_pytorch_model.safetensors``.
    A local folder holding upstream's ``delta_weights.safetensors`` also works.

    Raises:
        MissingWeightsError: the repo/folder or the weights file is not available (offline or missing).
    """
    path = Path(repo_or_path).expanduser()
    if path.is_file():
        return _load_tensors(path, device, lazy)

    names = [_weights_filename(variant), _weights_filename(variant, "bin"), UPSTREAM_LOCAL_DELTA_NAME]
    folder = resolve_pretrained(
        repo_or_path, allow_patterns=["config.json", *names[:2]], revision=revision, local_files_only=local_files_only
    )
    for name in names:
        if (folder / name).is_file():
            logger.info("Loading ΔW from %s", folder / name)
            return _load_tensors(folder / name, device, lazy)
    present = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise MissingWeightsError(
        str(repo_or_path),
        f"{folder} has no {names[0]} (variant {variant!r}); it holds {present or 'nothing'}",
        download_hint=f"huggingface-cli download {repo_or_path} config.json {names[0]}",
    )


class LazySafetensors(Mapping):
    """A safetensors file as a read-only {key: tensor} mapping; each tensor is read when it is looked up."""

    def __init__(self, file: str | os.PathLike, device: str | torch.device = "cpu"):
        self.file, self.device = Path(file), str(device)
        with safe_open(self.file, framework="pt", device=self.device) as f:
            self._keys = list(f.keys())
        self._key_set = set(self._keys)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._key_set:
            raise KeyError(key)
        with safe_open(self.file, framework="pt", device=self.device) as f:
            return f.get_tensor(key)

    def __contains__(self, key: object) -> bool:  # Mapping's default would read the tensor
        return key in self._key_set

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def items(self):
        # One short-lived handle per tensor: a handle's memory map keeps every page read through it resident until
        # it closes, which made one handle for the whole pass hold the whole file (+1.6 GiB for the SD1.5 ΔW,
        # measured at the real size during the Wonder3D merge).
        for key in self._keys:
            yield key, self[key]


def _load_tensors(file: Path, device: str | torch.device, lazy: bool = False) -> Mapping[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        return LazySafetensors(file, device) if lazy else load_file(file, device=str(device))
    state_dict = torch.load(file, map_location=device, weights_only=True)
    if not isinstance(state_dict, dict):
        raise ValueError(f"{file} does not hold a state dict (got {type(state_dict).__name__}).")
    return state_dict


def merge_delta_weights(
    unet: torch.nn.Module | MutableMapping[str, torch.Tensor],
    delta: Mapping[str, torch.Tensor],
    *,
    alpha: float = 1.0,
    strict: bool = True,
) -> DeltaReport:
    """Add ``alpha * delta`` to the UNet's weights in place and report what was merged.

    Args:
        unet: the UNet (its parameters are updated in place), or a state dict whose tensors are updated in place.
        delta: ΔW state dict (see `load_delta_weights`).
        alpha: scale of the delta (1.0 = the PeRFlow model; 0 leaves the weights as they are, up to the dtype
            round trip). At 1.0 the result is bit-identical to upstream's merge.
        strict: require identical key sets and shapes (upstream's ``merge_delta_weights_into_unet``; raises
            `ValueError` otherwise). With ``strict=False`` (upstream's Wonder3D app merge) the delta is applied
            where key and shape match; everything else is reported (and logged), never silently dropped.

    Returns:
        DeltaReport: applied / skipped_shape / missing / untouched keys.
    """
    target = unet.state_dict() if isinstance(unet, torch.nn.Module) else unet  # tensors share the module's storage
    report = DeltaReport(alpha=alpha, strict=strict)

    for key, value in delta.items():
        if key not in target:
            report.missing.append(key)
        elif target[key].shape != value.shape:
            report.skipped_shape.append(key)
            report.shape_mismatches[key] = (tuple(target[key].shape), tuple(value.shape))
    report.untouched = [key for key in target if key not in delta]

    if strict and (report.missing or report.skipped_shape or report.untouched):
        raise ValueError(
            "Strict ΔW merge needs the delta and the UNet to have identical keys and shapes. "
            + report.summary()
            + ". Pass strict=False to apply the delta where key and shape match (as for a Wonder3D UNet)."
        )

    skip = set(report.missing) | set(report.skipped_shape)
    with torch.no_grad():
        for key, value in delta.items():
            if key in skip:
                continue
            base = target[key]
            step = value.to(base.device)
            if alpha != 1.0:
                step = step * alpha
            base.copy_((base.to(value.dtype) + step).to(base.dtype))
            report.applied.append(key)

    if report.complete:
        logger.info(report.summary())
    else:
        logger.warning(report.summary())
    return report


def compute_delta(
    merged_state_dict: Mapping[str, torch.Tensor] | torch.nn.Module,
    base_state_dict: Mapping[str, torch.Tensor] | torch.nn.Module,
) -> dict[str, torch.Tensor]:
    """ΔW = merged - base, key by key, in the merged weights' dtype (upstream's recipe).

    Use it to turn your own PeRFlow-accelerated fine-tune into a delta that can be merged into other SD1.5 UNets.
    Both inputs may be modules or state dicts; their key sets and shapes must match exactly.
    """
    merged = merged_state_dict.state_dict() if isinstance(merged_state_dict, torch.nn.Module) else merged_state_dict
    base = base_state_dict.state_dict() if isinstance(base_state_dict, torch.nn.Module) else base_state_dict
    if set(merged) != set(base):
        only_merged = sorted(set(merged) - set(base))
        only_base = sorted(set(base) - set(merged))
        raise ValueError(
            "compute_delta needs two state dicts of the same architecture; "
            f"only in merged: {only_merged[:8]} ({len(only_merged)}), only in base: {only_base[:8]} ({len(only_base)})."
        )
    delta = {}
    for key, value in merged.items():
        if value.shape != base[key].shape:
            raise ValueError(
                f"compute_delta: {key} has shape {list(value.shape)} in merged, {list(base[key].shape)} in base."
            )
        delta[key] = (value - base[key].to(value.device, value.dtype)).contiguous()
    return delta


def save_delta(
    delta: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    variant: str | None = None,
    config: Mapping | None = None,
) -> Path:
    """Save a ΔW as safetensors; returns the weights file written.

    ``path`` ending in ``.safetensors`` is written as that file. Otherwise it is a folder in the published layout:
    ``diffusion_pytorch_model[.<variant>].safetensors`` plus, when `config` (e.g. ``dict(unet.config)``) is given,
    ``config.json``; `load_delta_weights(folder, variant=...)` reads it back.
    """
    path = Path(path)
    tensors = {key: value.detach().contiguous().cpu() for key, value in delta.items()}
    metadata = {"format": "pt", "content": "PeRFlow delta weights (W_perflow - W_base)"}
    if path.suffix == ".safetensors":
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, path, metadata=metadata)
        return path
    path.mkdir(parents=True, exist_ok=True)
    file = path / _weights_filename(variant)
    save_file(tensors, file, metadata=metadata)
    if config is not None:
        # Drop the loader's bookkeeping (a local path, the defaulted keys); keep the architecture.
        config = {k: v for k, v in dict(config).items() if k not in ("_name_or_path", "_use_default_values")}
        (path / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    return file
