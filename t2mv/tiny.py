"""Smoke mode: the whole chain with tiny random weights, so it runs on a CPU in seconds without any download.

Smoke-mode output is noise. It exists to check the plumbing (UI, command line, batch, sharding, exports), never
the models. Every entry point that uses it says so loudly: a log warning, a banner on stderr, a banner in the UI.

Each stage owns its own tiny constructor (``TextToImage.tiny``, ``MultiviewPipeline.tiny``, ``TSR.tiny``);
this module adds what the chain and the three commands need on top: the switch (``--tiny`` / ``T2MV_SMOKE=1``),
the banner (one text for every command), and a background remover that needs no weights (u2net cannot be
downloaded here).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

import numpy as np
from PIL import Image

logger = logging.getLogger(__name__)

SMOKE_ENV = "T2MV_SMOKE"
SMOKE_BANNER = (
    "SMOKE MODE: tiny random weights for every stage. The images, views and meshes are NOISE; "
    "this mode only checks that the program runs. Drop --tiny / T2MV_SMOKE=1 to use the real models."
)


def smoke_requested(flag: bool = False) -> bool:
    """True when smoke mode is asked for by a flag or by the environment variable ``T2MV_SMOKE=1``."""
    return bool(flag) or os.environ.get(SMOKE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def warn_smoke() -> None:
    """Log the smoke-mode warning (the CLI and the UI add their own banners)."""
    logger.warning(SMOKE_BANNER)


def print_smoke_banner(stream: TextIO | None = None) -> None:
    """The command lines' smoke-mode banner on stderr (one for ``t2mv``, ``t2mv-multiview`` and ``t2mv-mesh``)."""
    print(f"\n*** {SMOKE_BANNER} ***\n", file=stream if stream is not None else sys.stderr, flush=True)


class FakeRembgSession:
    """A weightless stand-in for a rembg session, for smoke mode and tests.

    rembg's ``remove(img, session=s)`` only calls ``s.predict(img, *args, **kwargs)`` and expects a list of
    PIL "L" masks of the image's size, so this duck-types as a rembg session. The mask is the set of pixels
    whose colour is far from the border colour (the median of the outermost pixel ring), which is enough to
    cut a plain-background product shot out and to exercise the crop/recentre code on anything else.
    """

    def __init__(self, threshold: float = 24.0):
        self.threshold = threshold  # L2 distance in 0-255 RGB units

    def predict(self, img: Image.Image, *args, **kwargs) -> list[Image.Image]:
        rgb = np.asarray(img.convert("RGB"), dtype=np.float32)  # (H, W, 3)
        border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]], axis=0)  # (2H + 2W, 3)
        background = np.median(border, axis=0)  # (3,)
        distance = np.linalg.norm(rgb - background, axis=-1)  # (H, W)
        mask = distance > self.threshold  # (H, W) bool
        if not mask.any():
            # A flat image has no foreground to find; keep everything rather than hand the
            # preprocessors an empty mask (their bounding-box crop needs at least one pixel).
            mask[:] = True
        return [Image.fromarray(mask.astype(np.uint8) * 255)]  # "L"
