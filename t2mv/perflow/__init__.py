"""PeRFlow building blocks: the scheduler, ΔW (delta weight) tools and hub resolution.

Leaf package: imports nothing else of ours. Submodules load lazily, so `t2mv.perflow.hub` does not pull in
diffusers.
"""

import importlib

__all__ = ["PeRFlowScheduler", "delta", "hub", "scheduler"]


def __getattr__(name: str):
    if name == "PeRFlowScheduler":
        return importlib.import_module(".scheduler", __name__).PeRFlowScheduler
    if name in ("delta", "hub", "scheduler"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
