"""Input image → the 256² RGB, white-background condition image Wonder3D expects.

Two paths:

- ``mode="wonder3d"`` (default; Wonder3D's own `SingleImageDataset`): crop to the alpha bounding box, scale the
  longest side to ``foreground_ratio * size`` (192 of 256, upstream's `crop_size`), centre it on a transparent
  ``size²`` canvas, composite over white. Difference: upstream's crop drops the box's last row and column (an
  exclusive max index); we keep them.
- ``mode="perflow"`` (the PeRFlow demo, `sd15_t2mv_gradio.py`): resize to ``size²``, set pixels whose alpha is
  ≤ 5 to white, drop alpha. No recentring. Non-square inputs are first padded to a square (transparent), which
  the demo never needed (its input is a square 512² render).

The background is removed with rembg only when the image has no usable alpha (no alpha channel, or a fully
opaque one): ``rembg.remove(image, session=session)``, with ``session=None`` meaning
``rembg.new_session("u2net")``. rembg is imported only then, and only for rembg's own sessions (see
`remove_background`). Pass a session to reuse the u2net model across calls.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageChops

MODES = ("wonder3d", "perflow")
# The PeRFlow demo whitens pixels whose alpha is at most this value and keeps all others as they are.
PERFLOW_ALPHA_THRESHOLD = 5


def remove_background(image: Image.Image, session: Any = None) -> Image.Image:
    """RGBA cut-out of `image` by rembg (u2net unless another session is given).

    A session that is not rembg's own (smoke mode's fake, a wrapper, a test's stand-in) only has to answer
    ``predict(image) -> [L masks]``; its cut-out is made here as `rembg.remove` makes it (the mask becomes the
    alpha), without importing rembg: its first import compiles pymatting's numba kernels, about a minute.
    """
    rgb = image.convert("RGB")
    if session is not None and not _is_rembg_session(session):
        return _naive_cutout(rgb, session.predict(rgb))
    import rembg

    if session is None:
        session = rembg.new_session("u2net")
    return rembg.remove(rgb, session=session).convert("RGBA")


def _is_rembg_session(session: Any) -> bool:
    return type(session).__module__.split(".")[0] == "rembg"


def _naive_cutout(rgb: Image.Image, masks: list[Image.Image]) -> Image.Image:
    """rembg's default cut-out (no matting, no mask post-processing): the image over transparency through the
    mask; several masks are joined (their union) rather than stacked as rembg would."""
    if not masks:
        raise ValueError("preprocess_image: the background remover returned no mask.")
    mask = masks[0].convert("L")
    for other in masks[1:]:
        mask = ImageChops.lighter(mask, other.convert("L"))
    if mask.size != rgb.size:
        raise ValueError("preprocess_image: the background remover returned a mask of a different size.")
    return Image.composite(rgb, Image.new("RGBA", rgb.size, 0), mask)  # RGBA, as rembg.bg.naive_cutout


def has_alpha(image: Image.Image) -> bool:
    """True when the image has an alpha channel that is not fully opaque."""
    if image.mode not in ("RGBA", "LA", "PA") and not (image.mode == "P" and "transparency" in image.info):
        return False
    alpha_min, _ = image.convert("RGBA").getchannel("A").getextrema()
    return alpha_min < 255


def preprocess_image(
    image: Image.Image,
    *,
    session: Any = None,
    remove_background: bool = True,
    mode: str = "wonder3d",
    size: int = 256,
    foreground_ratio: float = 0.75,
) -> Image.Image:
    """Return the RGB ``size × size`` condition image on a white background.

    Args:
        image: any PIL image. An alpha channel that is not fully opaque is used as the object mask.
        session: a rembg session (e.g. ``rembg.new_session("u2net")``), used only when rembg runs.
        remove_background: run rembg when the image has no usable alpha. When False such an image is used whole.
        mode: ``"wonder3d"`` (crop + recentre, default) or ``"perflow"`` (resize + whiten, no recentring).
        size: output side in pixels (256 for Wonder3D).
        foreground_ratio: longest side of the object relative to `size` (``"wonder3d"`` mode only).
    """
    if not isinstance(image, Image.Image):
        raise ValueError(f"preprocess_image expects a PIL image, got {type(image).__name__}; use PIL.Image.open().")
    if mode not in MODES:
        raise ValueError(f"preprocess_image: mode must be one of {MODES}, got {mode!r}.")
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"preprocess_image: size must be an int >= 8, got {size!r}.")
    if not 0.0 < foreground_ratio <= 1.0:
        raise ValueError(f"preprocess_image: foreground_ratio must be in (0, 1], got {foreground_ratio!r}.")

    if has_alpha(image):
        rgba = image.convert("RGBA")
    elif remove_background:
        rgba = None  # the perflow path removes the background after its resize, as the demo does
    else:
        rgba = image.convert("RGB").convert("RGBA")

    if mode == "perflow":
        source = rgba if rgba is not None else image.convert("RGB")
        source = _pad_to_square(source.convert("RGBA"))
        # Colour and alpha resized separately (no premultiplication), as the demo resizes an RGB tensor.
        rgb = source.convert("RGB").resize((size, size), Image.BILINEAR)
        source = Image.merge("RGBA", (*rgb.split(), source.getchannel("A").resize((size, size), Image.BILINEAR)))
        if rgba is None:
            source = _remove_background(source, session)
        pixels = np.array(source)  # (size, size, 4) uint8
        pixels[pixels[..., 3] <= PERFLOW_ALPHA_THRESHOLD, :3] = 255
        return Image.fromarray(pixels[..., :3], "RGB")

    if rgba is None:
        rgba = _remove_background(image, session)
    bbox = rgba.getchannel("A").getbbox()  # alpha != 0, (left, top, right, bottom), right/bottom exclusive
    if bbox is None:
        raise ValueError(
            "preprocess_image: the image is fully transparent (no object found). Pass an image with a visible "
            "object, or remove_background=False for an opaque image."
        )
    crop = rgba.crop(bbox)
    target = max(1, int(round(size * foreground_ratio)))
    scale = target / max(crop.size)
    crop = crop.resize((max(1, int(scale * crop.width)), max(1, int(scale * crop.height))), Image.BICUBIC)
    canvas = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    canvas.paste(crop, ((size - crop.width) // 2, (size - crop.height) // 2))
    return _over_white(canvas)


def _remove_background(image: Image.Image, session: Any) -> Image.Image:
    rgba = remove_background(image, session)
    if rgba.size != image.size:
        raise ValueError("preprocess_image: the background remover returned an image of a different size.")
    return rgba


def _pad_to_square(image: Image.Image) -> Image.Image:
    side = max(image.size)
    if image.width == image.height:
        return image
    canvas = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas


def _over_white(rgba: Image.Image) -> Image.Image:
    pixels = np.asarray(rgba, dtype=np.float32) / 255.0  # (H, W, 4)
    alpha = pixels[..., 3:4]
    rgb = pixels[..., :3] * alpha + (1.0 - alpha)  # composite over white, as upstream's bg_color "white"
    return Image.fromarray(np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8), "RGB")
