"""Wonder3D + PeRFlow multiview stage: one image → 6 views × (normal, color) at 256².

Submodules load lazily (importing the package does not import diffusers):
`unet_mv2d` (UNetMV2DConditionModel), `cameras` (the 6-view table), `preprocess` (background removal, crop),
`pipeline` (MultiviewPipeline, MultiviewOutput). The `t2mv-multiview` command is `t2mv.multiview_cli` (it shares
the project's input checks and exit codes, which live above the stages).
"""

import importlib
import os

# diffusers 0.19 crashes on import when a current JAX is installed; we never use Flax (see t2mv/__init__.py).
os.environ.setdefault("USE_FLAX", "0")

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
