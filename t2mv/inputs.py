"""Input images and output paths: the checks every command runs before any model loads, and atomic writes.

One path for ``t2mv`` (every subcommand), ``t2mv-multiview``, ``t2mv-mesh``, the batch tool and the app:

- `open_image`: readable, not a decompression bomb (checked from the header, before decoding), at least
  ``MIN_IMAGE_SIDE`` pixels a side, not fully transparent; any mode, bit depth or animation becomes one RGB
  (or RGBA, when it carries transparency) frame, turned upright by its EXIF orientation.
- `check_output_folder` / `check_output_file`: the path is not an existing file (or folder), its nearest existing
  parent is a folder we can write to. Nothing is created by the checks.
- `write_image`, `write_text`: write to a temporary name next to the target and rename, so a crash never leaves a
  half-written file under the final name.
- `new_rembg_session`: the one place a rembg (u2net) session is created; a missing model is a
  `WeightsUnavailableError` (exit 3) with the fixes.

Every check raises `BadInputError` (a ValueError; exit code 2) with what to do. Importing this module imports no
torch.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from .errors import BadInputError, WeightsUnavailableError

# Large enough to hold an object, small enough to decode without exhausting memory. PIL's own decompression-bomb
# guard only fires at 179 M pixels; this limit is read from the header, before decoding.
MIN_IMAGE_SIDE = 16
MAX_IMAGE_PIXELS = 8192 * 8192
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
WRITABLE_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
REMBG_MODEL = "u2net"  # named explicitly: newer rembg versions default to a different model

__all__ = [
    "MAX_IMAGE_PIXELS",
    "MIN_IMAGE_SIDE",
    "check_output_file",
    "check_output_folder",
    "has_alpha",
    "image_output_path",
    "new_rembg_session",
    "open_image",
    "write_image",
    "write_text",
]


# ---------------------------------------------------------------------------------------------- input images
def open_image(source: str | os.PathLike | Image.Image, *, name: str | None = None) -> Image.Image:
    """Open and check an input image; return one RGB frame, or RGBA when it carries transparency.

    Args:
        source: a path or an already opened PIL image (an upload).
        name: how to call the image in messages (default: the file name, or "The image").

    Returns:
        A loaded PIL image, upright (EXIF orientation applied), mode RGB or RGBA (only when some pixel is not
        opaque). Greyscale, palette, CMYK,
        16-bit and float images are converted (16-bit scaled to 8 bits, not clipped); an animation gives its
        first frame.

    Raises:
        BadInputError: not a file, not an image, damaged, fewer than ``MIN_IMAGE_SIDE`` pixels on a side, more
            than ``MAX_IMAGE_PIXELS`` pixels, or fully transparent (nothing to reconstruct).
    """
    if isinstance(source, Image.Image):
        image, label = source, name or "The image"
    else:
        path = Path(source)
        label = name or path.name or str(path)
        if not path.exists():
            raise BadInputError(f"{path} does not exist. Give the path of a PNG, JPEG or WebP image.")
        if not path.is_file():
            raise BadInputError(f"{path} is not a file. Give the path of a PNG, JPEG or WebP image.")
        if path.stat().st_size == 0:
            raise BadInputError(f"{label} is empty (0 bytes). Give a PNG, JPEG or WebP image.")
        try:
            with warnings.catch_warnings():
                # Our own pixel limit below is lower than PIL's; its DecompressionBombWarning would only repeat it.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(path)
        except Image.DecompressionBombError as e:
            raise BadInputError(
                f"{label} is too large to open safely ({e}). Use an image of at most {MAX_IMAGE_PIXELS:,} pixels "
                f"(e.g. {int(MAX_IMAGE_PIXELS**0.5)}×{int(MAX_IMAGE_PIXELS**0.5)}; 1024×1024 is plenty)."
            ) from e
        except (OSError, SyntaxError, ValueError) as e:  # UnidentifiedImageError is an OSError
            raise BadInputError(f"{label} is not an image PIL can read ({e}). Give a PNG, JPEG or WebP image.") from e
    width, height = image.size
    if min(width, height) < MIN_IMAGE_SIDE:
        raise BadInputError(
            f"{label} is {width}×{height} pixels; it needs at least {MIN_IMAGE_SIDE} pixels on each side. "
            "Use a larger image (256×256 or more works best)."
        )
    if width * height > MAX_IMAGE_PIXELS:
        raise BadInputError(
            f"{label} is {width}×{height} = {width * height:,} pixels, more than the {MAX_IMAGE_PIXELS:,} "
            "allowed. Downscale it (1024×1024 is plenty: the models see 256² and 512²)."
        )
    try:
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)  # an animation (GIF, APNG, WebP): its first frame
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise BadInputError(f"{label} is damaged or truncated ({e}). Re-export it and try again.") from e
    converted = _normalise_mode(_upright(image))
    if converted.mode == "RGBA" and converted.getchannel("A").getextrema()[1] == 0:
        raise BadInputError(
            f"{label} is fully transparent: there is no object to reconstruct. Give an image whose object is "
            "opaque (a cut-out with a transparent background works best)."
        )
    return converted


def _upright(image: Image.Image) -> Image.Image:
    """The image as it is meant to be displayed: phones store "rotate me" in the EXIF orientation tag, which every
    viewer applies; the models must see the same picture. A damaged EXIF block is ignored (the pixels are fine)."""
    try:
        return ImageOps.exif_transpose(image)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError):
        return image


def _normalise_mode(image: Image.Image) -> Image.Image:
    """RGBA when the image has an alpha channel or a transparent palette entry, else RGB (8 bits per channel)."""
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        return image.convert("RGBA")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        # 16-bit / float greyscale: PIL's convert("RGB") clips at 255, so scale to 8 bits first.
        pixels = np.asarray(image, dtype=np.float64)  # (H, W)
        pixels = np.nan_to_num(pixels, nan=0.0, posinf=0.0, neginf=0.0)
        top = pixels.max() if pixels.max() > 255 else 255.0
        pixels = np.clip(pixels / top * 255.0, 0, 255).astype(np.uint8)  # (H, W)
        return Image.fromarray(pixels).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, RGB


def has_alpha(image: Image.Image) -> bool:
    """True when the image carries a usable cut-out: some pixel is not fully opaque (any alpha-capable mode)."""
    from wonder3d_perflow.preprocess import has_alpha as stage_has_alpha

    return stage_has_alpha(image)


# ---------------------------------------------------------------------------------------------- output paths
def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(".")


def _check_writable_parent(path: Path, what: str) -> None:
    """`path` (an existing folder) or its nearest existing ancestor is a folder we can create files in.

    Probed by creating and deleting a file, not guessed from permission bits (root ignores those; read-only mounts
    do not show in them).
    """
    existing = path if path.is_dir() else _nearest_existing(path.parent)
    if not existing.is_dir():
        raise BadInputError(
            f"Cannot write the {what} {path}: {existing} is a file, not a folder. Choose another path."
        )
    try:
        fd, probe = tempfile.mkstemp(prefix=".t2mv-write-test-", dir=existing)
    except OSError as e:
        raise BadInputError(
            f"Cannot write the {what} {path}: the folder {existing} is not writable ({e.strerror or e}). "
            "Choose a folder you can write to."
        ) from None
    os.close(fd)
    os.unlink(probe)


def check_output_folder(path: str | os.PathLike, *, may_exist: bool = True, what: str = "output folder") -> Path:
    """Check that `path` can become (or already is) the output folder; create nothing.

    Args:
        path: the folder the command will write into.
        may_exist: an existing folder is fine (its files are replaced); False: it must not exist yet.
        what: how to call it in messages.

    Returns:
        The path, user-expanded.

    Raises:
        BadInputError: the path is an existing file, an existing folder when `may_exist` is False, or under a
            file or a folder that cannot be written.
    """
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise BadInputError(f"The {what} {folder} is an existing file. Give a folder path (it is created).")
    if folder.is_dir() and not may_exist:
        raise BadInputError(f"The {what} {folder} already exists. Choose a new folder, or pass --overwrite.")
    _check_writable_parent(folder, what)
    return folder


def check_output_file(
    path: str | os.PathLike, *, suffixes: tuple[str, ...] = WRITABLE_IMAGE_SUFFIXES, what: str = "output file"
) -> Path:
    """Check that `path` can be written as a file with one of `suffixes` (an existing file is replaced).

    Raises:
        BadInputError: the path is a folder, has another suffix, or its folder cannot be written.
    """
    file = Path(path).expanduser()
    if file.is_dir():
        raise BadInputError(f"The {what} {file} is a folder. Give a file path ending in {', '.join(suffixes)}.")
    if file.suffix.lower() not in suffixes:
        raise BadInputError(
            f"The {what} {file} has the extension {file.suffix or '(none)'!r}; use one of {', '.join(suffixes)}."
        )
    _check_writable_parent(file, what)
    return file


def image_output_path(path: str | os.PathLike, *, default_name: str = "image.png") -> Path:
    """Where ``t2mv image -o PATH`` writes: PATH itself when it names an image file, else ``PATH/image.png``.

    A path that is an existing folder, ends with a separator, or has no extension is a folder. The path is checked
    (`check_output_file`) before any model loads.
    """
    text = os.fspath(path)
    target = Path(text).expanduser()
    if target.is_dir() or text.endswith((os.sep, "/")) or not target.suffix:
        check_output_folder(target)
        target = target / default_name
    return check_output_file(target, what="output image")


# ---------------------------------------------------------------------------------------------- atomic writes
def _atomic(path: Path, write: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # Created 0666 less the umask, as any ordinary output (tempfile.mkstemp would make it 0600).
    temporary = path.parent / f".{path.name}.{secrets.token_hex(6)}.partial"
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        write(temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def write_image(image: Image.Image, path: str | os.PathLike) -> Path:
    """Save `image` at `path` (format from the suffix) via a temporary file: never half-written. Returns path."""
    path = Path(path)
    image_format = Image.registered_extensions().get(path.suffix.lower(), "PNG")
    return _atomic(path, lambda temporary: image.save(temporary, format=image_format))


def write_text(text: str, path: str | os.PathLike) -> Path:
    """Write UTF-8 `text` at `path` via a temporary file: never half-written. Returns path."""
    return _atomic(Path(path), lambda temporary: temporary.write_text(text, encoding="utf-8"))


# ---------------------------------------------------------------------------------------------- background removal
def new_rembg_session(model: str = REMBG_MODEL, *, off_switch: str = "turn background removal off") -> Any:
    """A rembg session for `model` (u2net); the one place the project creates one.

    rembg downloads the model into ``$U2NET_HOME`` (default ``~/.u2net``) on first use; offline that fails.

    Args:
        model: the rembg model name.
        off_switch: how the caller turns background removal off (a command's flag), for the message.

    Raises:
        WeightsUnavailableError: rembg is not installed or the model cannot be loaded (exit code 3), with the fixes.
    """
    try:
        import rembg

        return rembg.new_session(model)
    except Exception as e:  # missing package, no network for the download, onnxruntime errors
        u2net_home = os.environ.get("U2NET_HOME", os.path.expanduser("~/.u2net"))
        raise WeightsUnavailableError(
            f"The background-removal model {model} could not be loaded ({type(e).__name__}: {e}). rembg looks for "
            f"{u2net_home}/{model}.onnx and downloads it when missing. Fix: run once with network access, or copy "
            f"{model}.onnx into that folder (or set U2NET_HOME); or {off_switch}, or give an image with a "
            "transparent background (RGBA).",
            repo=model,
        ) from e
