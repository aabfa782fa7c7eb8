"""Best of N images: seeds for N candidates and a 3D-suitability score from each candidate's object mask.

The 3D stages are only as good as the one image they start from. An object cut by the frame, two objects, a
speck, or a background the remover cannot separate each give a poor mesh, and all four can be read off the object
mask (the background remover's alpha, the same one the preprocessors use):

- dominance: the share of the foreground in its largest connected piece (two equal objects: 0.5);
- framing: how much of the frame's edges the foreground covers (an object cut by the frame covers a side);
- size: the largest piece's bounding box against the image (a speck has too few pixels to lift to 3D);
- clean: the alpha is decisive (few half-transparent pixels) and the background around the object is plain.

Each factor is in [0, 1]; the score is their product, so one bad property sinks a candidate. Everything here is
plain array code; the only model involved is the rembg session the caller passes to `object_mask`.

Seeds: candidate k uses ``(seed + k) mod 2**32``, so candidate 0 is the image a single-candidate run makes, and any
candidate is reproduced alone with ``--seed seed+k --candidates 1`` (diffusers draws each image's initial noise
from its own generator when given a list, in batch order).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

MAX_CANDIDATES = 8
SEED_MODULUS = 2**32  # the settings' seed range (0 .. 2**32 - 1)


@dataclass(frozen=True)
class ScoreConfig:
    """Where each factor starts and stops penalising (fractions of the image or of the foreground).

    Attributes:
        threshold: alpha at or above which a pixel is foreground.
        dominance_zero, dominance_full: the dominance factor ramps from 0 at `dominance_zero` to 1 at `dominance_full`.
        frame_cut_zero: the framing factor falls linearly to 0 when a side of the frame is this much foreground.
        size_zero, size_full: the size factor ramps from 0 to 1 between these bounding-box extents (longest side over
            the image side); larger objects are judged by the framing factor instead.
        uncertain_zero: the alpha factor falls to 0 when half-transparent pixels are this share of the foreground.
        busy_scale: mean background gradient (colour units in [0, 1] per pixel) at which the plainness factor is 0.5.
        background_margin: pixels around the object left out of the background measure (its own soft edge).
    """

    threshold: float = 0.5
    dominance_zero: float = 0.4
    dominance_full: float = 0.95
    frame_cut_zero: float = 0.25
    size_zero: float = 0.05
    size_full: float = 0.3
    uncertain_zero: float = 0.5
    busy_scale: float = 0.05
    background_margin: int = 3


@dataclass(frozen=True)
class CandidateScore:
    """One candidate's 3D-suitability score (the product of the factors) and the factors themselves, all in [0, 1].

    `weakest` names the factor that cost the most (``none`` when all are 1), for the UI and info.json.
    """

    score: float
    dominance: float
    framing: float
    size: float
    clean: float
    weakest: str

    def to_dict(self) -> dict[str, Any]:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


def candidate_seeds(seed: int, count: int) -> list[int]:
    """The seeds of `count` candidates: ``seed + k`` (mod 2**32), candidate 0 = `seed`."""
    if not 1 <= count <= MAX_CANDIDATES:
        raise ValueError(f"the number of candidates must be between 1 and {MAX_CANDIDATES}, got {count}")
    return [(int(seed) + k) % SEED_MODULUS for k in range(count)]


def candidate_generators(seed: int, count: int) -> list[torch.Generator]:
    """One CPU generator per candidate (CPU noise is the same on every device), for one batched diffusers call."""
    return [torch.Generator("cpu").manual_seed(s) for s in candidate_seeds(seed, count)]


def object_mask(image: Image.Image, session: Any) -> np.ndarray:
    """The background remover's alpha for `image`: (H, W) float32 in [0, 1].

    `session` is a rembg session (or anything with rembg's ``predict(img) -> [PIL "L" mask]``), the same one the
    preprocessors use, so the chosen image's mask is the one they cut it out with.
    """
    mask = session.predict(image.convert("RGB"))[0].convert("L")
    if mask.size != image.size:
        mask = mask.resize(image.size, Image.Resampling.BILINEAR)
    return np.asarray(mask, dtype=np.float32) / 255.0  # (H, W)


def _ramp(value: float, zero: float, full: float) -> float:
    """0 at `zero`, 1 at `full`, linear between (either direction), clipped."""
    return float(np.clip((value - zero) / (full - zero), 0.0, 1.0))


def _background_busyness(image: np.ndarray, foreground: np.ndarray, margin: int) -> float:
    """Mean colour gradient (per pixel, colours in [0, 1]) over the background away from the object's edge."""
    rgb = image[..., :3].astype(np.float32) / 255.0  # (H, W, 3)
    grad_x = np.abs(np.diff(rgb, axis=1)).sum(axis=-1)  # (H, W-1)
    grad_y = np.abs(np.diff(rgb, axis=0)).sum(axis=-1)  # (H-1, W)
    grad = np.zeros(rgb.shape[:2], dtype=np.float32)  # (H, W)
    grad[:, :-1] += grad_x
    grad[:-1] += grad_y
    from scipy import ndimage

    near_object = ndimage.binary_dilation(foreground, iterations=margin + 1) if foreground.any() else foreground
    background = ~near_object  # (H, W) bool
    if not background.any():
        return 0.0  # nothing but object: the framing factor already judges that
    return float(grad[background].mean())


def score_mask(
    mask: np.ndarray, image: np.ndarray | Image.Image | None = None, config: ScoreConfig | None = None
) -> CandidateScore:
    """Score one candidate from its object mask (H, W) in [0, 1] and, optionally, its RGB image (H, W, 3) uint8.

    Without an image the background-plainness part of `clean` is left out (only the alpha's decisiveness counts).
    """
    from scipy import ndimage

    cfg = config or ScoreConfig()
    alpha = np.asarray(mask, dtype=np.float32)
    if alpha.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {alpha.shape}")
    height, width = alpha.shape
    foreground = alpha >= cfg.threshold  # (H, W) bool
    area = int(foreground.sum())
    if area == 0:
        return CandidateScore(0.0, 0.0, 0.0, 0.0, 0.0, "no object")

    labels, count = ndimage.label(foreground, structure=np.ones((3, 3)))  # 8-connected pieces
    sizes = np.bincount(labels.ravel())[1:]  # (count,)
    largest = labels == (int(sizes.argmax()) + 1)  # (H, W) bool
    dominance = _ramp(sizes.max() / area, cfg.dominance_zero, cfg.dominance_full)

    sides = (foreground[0], foreground[-1], foreground[:, 0], foreground[:, -1])
    cut = max(float(side.mean()) for side in sides)  # the most-covered side of the frame
    framing = _ramp(cut, cfg.frame_cut_zero, 0.0)

    rows, cols = np.nonzero(largest)
    extent = max((rows.max() - rows.min() + 1) / height, (cols.max() - cols.min() + 1) / width)
    size = _ramp(extent, cfg.size_zero, cfg.size_full)

    uncertain = float(((alpha > 0.1) & (alpha < 0.9)).sum()) / area
    clean = _ramp(uncertain, cfg.uncertain_zero, 0.0)
    if image is not None:
        pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
        if pixels.shape[:2] != alpha.shape:
            raise ValueError(f"image {pixels.shape[:2]} and mask {alpha.shape} differ in size")
        busy = _background_busyness(pixels, foreground, cfg.background_margin)
        clean *= 1.0 / (1.0 + (busy / cfg.busy_scale) ** 2)

    factors = {"dominance": dominance, "framing": framing, "size": size, "clean": clean}
    weakest = min(factors, key=factors.get) if min(factors.values()) < 1.0 else "none"
    score = float(np.prod(list(factors.values())))
    return CandidateScore(score=score, weakest=weakest, **factors)


def score_images(
    images: Sequence[Image.Image], session: Any, config: ScoreConfig | None = None
) -> list[CandidateScore]:
    """Score each image from its mask under `session` (see `object_mask`)."""
    return [score_mask(object_mask(image, session), image, config) for image in images]


def choose(scores: Sequence[CandidateScore], override: int | None = None) -> int:
    """The candidate that goes on to 3D: `override` when given (checked), else the best score (ties: lowest index)."""
    if not scores:
        raise ValueError("no candidates to choose from")
    if override is not None:
        if not 0 <= override < len(scores):
            raise ValueError(
                f"--choose {override} is out of range: there are {len(scores)} candidates (0..{len(scores) - 1})"
            )
        return int(override)
    values = [s.score for s in scores]
    return int(np.argmax(values))  # argmax returns the first of equal maxima
