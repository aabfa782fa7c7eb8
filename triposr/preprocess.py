"""TripoSR input preprocessing: cut out (rembg, only without alpha), recentre, 0.5 grey background, 512 resize.

Reproduces upstream run.py bit for bit on images with alpha: the alpha box crop (upstream uses the last object
row/column as an exclusive end, so it is dropped), two centred paddings (square, then side / foreground_ratio), the
float32 grey composite with a truncating uint8 cast, and torch's antialiased bilinear resize.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageChops
import torch
import torch.nn.functional as F

REMBG_MODEL = "u2net"  # named explicitly: newer rembg versions default to a different model


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) float -> (B, 3, size, size): bilinear, antialiased, align_corners False (upstream's resize)."""
    return F.interpolate(images, (size, size), mode="bilinear", align_corners=False, antialias=True)


def _to_rgba_if_transparent(image: PIL.Image.Image) -> PIL.Image.Image:
    if image.mode in ("LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        return image.convert("RGBA")
    return image


def has_alpha(image: PIL.Image.Image) -> bool:
    """True when the image carries a usable cut-out: RGBA with at least one alpha value below 255 (as upstream)."""
    image = _to_rgba_if_transparent(image)
    return image.mode == "RGBA" and image.getextrema()[3][0] < 255


def cut_out(image: PIL.Image.Image, session: Any = None) -> PIL.Image.Image:
    """RGBA cut-out: the image itself when it already has alpha, else ``rembg.remove(image, session=session)``.

    ``session=None`` creates ``rembg.new_session("u2net")`` (downloads the model on first use); pass a session to
    reuse it across images. rembg is imported only here, and only for rembg's own sessions: any other session
    (smoke mode's fake, a wrapper) only answers ``predict(image) -> [L masks]`` and its cut-out is made here as
    `rembg.remove` makes it, since rembg's first import compiles pymatting's numba kernels (about a minute).
    """
    image = _to_rgba_if_transparent(image)
    if has_alpha(image):
        return image
    rgb = image.convert("RGB")
    if session is not None and type(session).__module__.split(".")[0] != "rembg":
        return _naive_cutout(rgb, session.predict(rgb))
    import rembg

    if session is None:
        session = rembg.new_session(REMBG_MODEL)
    cutout = rembg.remove(rgb, session=session)
    if not isinstance(cutout, PIL.Image.Image) or cutout.mode != "RGBA":
        raise ValueError(
            f"rembg returned {type(cutout).__name__} {getattr(cutout, 'mode', '')}, expected an RGBA image"
        )
    return cutout


def _naive_cutout(rgb: PIL.Image.Image, masks: list[PIL.Image.Image]) -> PIL.Image.Image:
    """rembg's default cut-out (no matting, no mask post-processing): the image over transparency through the
    mask (RGBA); several masks are joined (their union) rather than stacked as rembg would."""
    if not masks:
        raise ValueError("the background remover returned no mask")
    mask = masks[0].convert("L")
    for other in masks[1:]:
        mask = PIL.ImageChops.lighter(mask, other.convert("L"))
    if mask.size != rgb.size:
        raise ValueError(f"the background remover returned a {mask.size} mask for a {rgb.size} image")
    return PIL.Image.composite(rgb, PIL.Image.new("RGBA", rgb.size, 0), mask)


def resize_foreground(image: PIL.Image.Image, foreground_ratio: float = 0.85) -> PIL.Image.Image:
    """Crop an RGBA image to its alpha box, pad it to a centred square, then pad so the object fills
    ``foreground_ratio`` of the side. Padding is transparent black. Returns RGBA, square."""
    if image.mode != "RGBA":
        raise ValueError(f"resize_foreground needs an RGBA image, got mode {image.mode}")
    if not 0.0 < foreground_ratio <= 1.0:
        raise ValueError(f"foreground_ratio must be in (0, 1], got {foreground_ratio}")
    pixels = np.asarray(image)  # (H, W, 4) uint8
    rows, cols = np.nonzero(pixels[..., 3] > 0)
    if rows.size == 0:
        raise ValueError(
            "The image is fully transparent (alpha is 0 everywhere): there is no object to reconstruct. "
            "Pass an image with a visible object, or an RGB image so its background is removed."
        )
    # Upstream slices with the last index as an exclusive end; kept for parity with the published pipeline.
    crop = pixels[rows.min() : rows.max(), cols.min() : cols.max()]  # (h, w, 4)
    height, width = crop.shape[:2]
    if height == 0 or width == 0:
        raise ValueError(
            f"The visible object spans {rows.max() - rows.min() + 1} row(s) x {cols.max() - cols.min() + 1} "
            "column(s), too thin to crop; pass an image with a larger object."
        )
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    square = np.pad(crop, ((top, side - height - top), (left, side - width - left), (0, 0)))  # (side, side, 4)
    new_side = int(side / foreground_ratio)
    before = (new_side - side) // 2
    after = new_side - side - before
    padded = np.pad(square, ((before, after), (before, after), (0, 0)))  # (new_side, new_side, 4)
    return PIL.Image.fromarray(padded, mode="RGBA")


def composite_on_grey(image: PIL.Image.Image) -> PIL.Image.Image:
    """RGBA -> RGB over 0.5 grey, in float32 with a truncating uint8 cast (exactly upstream's numbers)."""
    if image.mode != "RGBA":
        raise ValueError(f"composite_on_grey needs an RGBA image, got mode {image.mode}")
    pixels = np.asarray(image).astype(np.float32) / 255.0  # (H, W, 4)
    alpha = pixels[:, :, 3:4]
    rgb = pixels[:, :, :3] * alpha + (1 - alpha) * 0.5  # float32 on purpose: float64 flips truncated values
    return PIL.Image.fromarray((rgb * 255.0).astype(np.uint8), mode="RGB")


def preprocess_image(
    image: PIL.Image.Image,
    *,
    session: Any = None,
    remove_background: bool = True,
    foreground_ratio: float = 0.85,
    size: int | None = 512,
) -> PIL.Image.Image:
    """Prepare one image for TSR: RGB, object centred at ``foreground_ratio`` of a square on 0.5 grey, size².

    - Image with alpha (some alpha < 255): used as the cut-out; rembg is not run.
    - Image without alpha: ``remove_background=True`` cuts it out with rembg (``session``, default u2net);
      ``remove_background=False`` takes it as already prepared (grey background, object centred): it must be
      square and is only resized.
    - ``size=None`` returns the composite at its own size: feeding that to TSR reproduces upstream exactly (TSR
      resizes in float). At ``size=512`` the resized image is rounded to uint8 (within 1 level of upstream's float
      input).
    """
    if not isinstance(image, PIL.Image.Image):
        raise TypeError(f"preprocess_image expects a PIL image, got {type(image).__name__}")
    if image.width == 0 or image.height == 0:
        raise ValueError("The image is empty (0 pixels).")
    if size is not None and size < 1:
        raise ValueError(f"size must be a positive int or None, got {size}")
    if not 0.0 < foreground_ratio <= 1.0:
        raise ValueError(f"foreground_ratio must be in (0, 1], got {foreground_ratio}")

    if has_alpha(image) or remove_background:
        cutout = cut_out(image, session=session)
        composite = composite_on_grey(resize_foreground(cutout, foreground_ratio))
    else:
        if image.width != image.height:
            raise ValueError(
                f"Without alpha and with remove_background=False the image is used as is, so it must be square "
                f"(got {image.width}x{image.height}). Pass remove_background=True or an RGBA cut-out."
            )
        composite = image.convert("RGB")

    if size is None or composite.size == (size, size):
        return composite
    pixels = torch.from_numpy(np.asarray(composite).astype(np.float32) / 255.0).permute(2, 0, 1)[None]  # (1,3,H,W)
    resized = resize_images(pixels, size)[0].permute(1, 2, 0)  # (size, size, 3) in [0, 1]
    return PIL.Image.fromarray((resized * 255.0).round().clamp(0, 255).to(torch.uint8).numpy(), mode="RGB")
