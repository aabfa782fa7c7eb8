"""Wonder3D + PeRFlow multiview stage: one image → 6 views × (normal, color) at 256².

Submodules load lazily (importing the package does not import diffusers):
`unet_mv2d` (UNetMV2DConditionModel), `cameras` (the 6-view table), `preprocess` (background removal, crop),
`pipeline` (MultiviewPipeline, MultiviewOutput), `cli` (`t2mv-multiview`).
"""

import importlib

from .cameras import VIEW_NAMES

__all__ = [
    "VIEW_NAMES",
    "MultiviewOutput",
    "MultiviewPipeline",
    "UNetMV2DConditionModel",
    "preprocess_image",
]

_LAZY = {
    "MultiviewOutput": ".pipeline",
    "MultiviewPipeline": ".pipeline",
    "UNetMV2DConditionModel": ".unet_mv2d",
    "preprocess_image": ".preprocess",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
