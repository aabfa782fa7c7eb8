"""The text-to-image model kinds (PeRFlow SD1.5, rectified flow), what tells them apart, and each one's defaults.

Rectified flow is upstream's (gnobitab/InstaFlow) own Euler loop over the UNet's velocity; the sampler is
`t2mv.perflow.rf_scheduler.RectifiedFlowScheduler` (its docstring gives the loop), which diffusers' own
``StableDiffusionPipeline`` samples unchanged.

Published models (CC-BY-NC-4.0): ``XCLiu/instaflow_0_9B_from_sd_1_5`` (one step, no guidance, no negative prompt)
and ``XCLiu/2_rectified_flow_from_sd_1_5`` (few steps; upstream's example: 25 steps, guidance 1.5). Both are
``model_index.json`` → ``RectifiedFlowPipeline`` folders with SD1.5's components.

This module is a light leaf (no torch, no diffusers), so the settings can import the kinds' bounds cheaply.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

#: ``model_index.json`` ``_class_name`` → the text-to-image kind it loads as.
PIPELINE_KINDS = {"StableDiffusionPipeline": "perflow", "RectifiedFlowPipeline": "rectified_flow"}
KINDS = ("perflow", "rectified_flow")
MAX_STEPS = 100


@dataclass(frozen=True)
class KindDefaults:
    """A text-to-image model's own sampling defaults and step bounds.

    Attributes:
        num_inference_steps: the default step count; `min_steps`..`max_steps` the allowed range.
        guidance_scale: the default classifier-free guidance (≤ 1: off).
        negative_prompt: the default negative prompt.
    """

    num_inference_steps: int
    guidance_scale: float
    negative_prompt: str
    min_steps: int
    max_steps: int = MAX_STEPS


#: InstaFlow-0.9B: one step, no guidance (upstream: "only allows num_inference_steps=1 and guidance_scale=0.0").
INSTAFLOW_DEFAULTS = KindDefaults(1, 0.0, "", min_steps=1)
#: 2-rectified flow: upstream's example call (25 steps, guidance 1.5; "extremely few steps, e.g. 2-8" work too).
RECTIFIED_FLOW_DEFAULTS = KindDefaults(25, 1.5, "", min_steps=1)


def defaults_for(kind: str, model: str | Path = "", *, perflow_windows: int = 4) -> KindDefaults:
    """The sampling defaults of a model of `kind` (`model` tells InstaFlow from 2-rectified flow by its name).

    PeRFlow: 4 steps, CFG 4.5, "" negative (upstream's text → multiview chain), at least one step per window.
    """
    if kind == "perflow":
        return KindDefaults(4, 4.5, "", min_steps=perflow_windows)
    if kind != "rectified_flow":
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}.")
    return INSTAFLOW_DEFAULTS if "instaflow" in str(model).lower() else RECTIFIED_FLOW_DEFAULTS


def kind_of_index(model_index: dict | None, where: str = "the model") -> str:
    """The kind a ``model_index.json`` names (no file: a plain SD1.5 folder, i.e. PeRFlow).

    Raises:
        ValueError: the file names another pipeline (one line naming it and the two that load).
    """
    if model_index is None:
        return "perflow"
    name = model_index.get("_class_name")
    if name not in PIPELINE_KINDS:
        raise ValueError(
            f"{where} is a {name or 'pipeline without _class_name'} (model_index.json); text-to-image loads an SD1.5 "
            "StableDiffusionPipeline (PeRFlow, merged or with --t2i-delta) or a RectifiedFlowPipeline (InstaFlow, "
            "2-rectified flow)."
        )
    return PIPELINE_KINDS[name]


def kind_of_folder(folder: str | Path) -> str:
    """`kind_of_index` of a local folder's ``model_index.json`` (absent: PeRFlow)."""
    path = Path(folder) / "model_index.json"
    index = json.loads(path.read_text()) if path.is_file() else None
    return kind_of_index(index, where=str(folder))


def kind_of_model(model: str | Path, *, local_files_only: bool | None = None) -> str:
    """The kind of a ``--t2i-model`` (hub id or folder) from its ``model_index.json`` alone, before any weights load.

    Raises:
        MissingWeightsError: a hub id that is not cached and cannot be downloaded (offline).
        ValueError: the model_index.json names a pipeline that is neither kind.
    """
    from .perflow.hub import resolve_pretrained

    folder = resolve_pretrained(model, allow_patterns=["model_index.json"], local_files_only=local_files_only)
    return kind_of_folder(folder)
