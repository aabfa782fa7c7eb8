"""t2mv.inputs: the one input path turns photos upright by their EXIF orientation; outputs get ordinary modes."""

import os

import numpy as np
import pytest
from PIL import Image

from t2mv import inputs

ORIENTATION = 0x0112


def asymmetric_photo() -> np.ndarray:
    """(48, 96, 3): a blue block near the top-left corner and a red bar along the bottom edge; no symmetry maps it
    onto itself, so every wrong rotation or flip changes the pixels."""
    pixels = np.full((48, 96, 3), 235, np.uint8)
    pixels[6:22, 8:40] = (30, 30, 200)
    pixels[38:46, 50:90] = (200, 30, 30)
    return pixels


# EXIF orientation → the array as a viewer displays it (independent of PIL: numpy's rotations, k>0 is anticlockwise).
DISPLAYED = {
    1: lambda a: a,
    3: lambda a: np.rot90(a, 2),
    6: lambda a: np.rot90(a, -1),  # "rotate 90° clockwise to display" (a phone held upright)
    8: lambda a: np.rot90(a, 1),
    2: lambda a: a[:, ::-1],
}


@pytest.mark.parametrize("orientation", sorted(DISPLAYED))
@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_open_image_applies_the_exif_orientation(tmp_path, orientation, suffix):
    pixels = asymmetric_photo()
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    path = tmp_path / f"photo{suffix}"
    Image.fromarray(pixels).save(path, exif=exif, quality=95)
    got = np.asarray(inputs.open_image(path), dtype=np.float64)
    expected = DISPLAYED[orientation](pixels).astype(np.float64)
    assert got.shape == expected.shape
    assert np.abs(got - expected).mean() < 3.0  # JPEG noise only
    for other, display in DISPLAYED.items():  # the picture differs under every other orientation
        candidate = display(pixels)
        if candidate.shape == expected.shape and not np.array_equal(candidate, expected):
            assert np.abs(got - candidate).mean() > 20.0, other


def test_an_already_opened_upload_is_turned_upright_too(tmp_path):
    pixels = asymmetric_photo()
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    Image.fromarray(pixels).save(tmp_path / "phone.png", exif=exif)
    got = np.asarray(inputs.open_image(Image.open(tmp_path / "phone.png")))
    np.testing.assert_array_equal(got, np.rot90(pixels, -1))


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_get_the_ordinary_mode_less_the_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        image = inputs.write_image(Image.new("RGB", (16, 16)), tmp_path / "image.png")
        text = inputs.write_text("{}", tmp_path / "info.json")
    finally:
        os.umask(previous)
    assert oct(image.stat().st_mode & 0o777) == oct(text.stat().st_mode & 0o777) == oct(0o666 & ~umask)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.png", "info.json"]  # no temporary left
