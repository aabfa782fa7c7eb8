"""t2mv: text → image (SD1.5 + PeRFlow) → multiview (Wonder3D + PeRFlow) → mesh (TripoSR).

Importing `t2mv` is cheap: the public names below load their modules (and diffusers) on first use.
"""

import importlib
import os

# diffusers 0.19 imports JAX when it finds it, and crashes on a current JAX (`jax.random.KeyArray` is gone). We never
# use Flax: say so before any submodule imports diffusers (a user's own USE_FLAX still wins).
os.environ.setdefault("USE_FLAX", "0")

__version__ = "0.1.0"

_LAZY = {
    "PeRFlowScheduler": "t2mv.perflow.scheduler",
    "TextToImage": "t2mv.text_to_image",
    "TextToImageOutput": "t2mv.text_to_image",
    "MissingWeightsError": "t2mv.perflow.hub",
    "TextTo3D": "t2mv.chain",
    "GenerationSettings": "t2mv.settings",
    "BadInputError": "t2mv.errors",
    "WeightsUnavailableError": "t2mv.errors",
    "open_image": "t2mv.inputs",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
