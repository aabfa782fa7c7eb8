"""t2mv.inputs: the one input path turns photos upright by their EXIF orientation; outputs get ordinary modes.

The second half checks the module against hand-computed answers: mode conversion values, size bounds at their edges,
output paths, atomic writes (format, mode, no leftovers, nothing replaced on failure). Written to kill the mutants
benchmarks/mutation.py found surviving here (benchmarks/results/mutation/inputs.json)."""

import os
import stat

import numpy as np
import pytest
from PIL import Image

from t2mv import inputs
from t2mv.errors import BadInputError
from t2mv.inputs import (
    MIN_IMAGE_SIDE,
    check_output_file,
    check_output_folder,
    image_output_path,
    open_image,
    write_image,
    write_text,
)

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


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def test_sixteen_bit_greyscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 16384, 32768, 65535]] * 16, dtype=np.uint16)  # (16, 4) → padded below to 16 px wide
    values = np.tile(values, (1, 4))  # (16, 16)
    Image.fromarray(values, mode="I;16").save(tmp_path / "depth.png")
    out = open_image(tmp_path / "depth.png")
    assert out.mode == "RGB"
    row = _pixels(out)[0, :4, 0]
    np.testing.assert_array_equal(row, [0, 63, 127, 255])  # v / 65535 * 255, truncated
    assert (_pixels(out)[..., 0] == _pixels(out)[..., 2]).all()  # grey stays grey


def test_integer_image_within_eight_bits_keeps_its_values():
    values = np.tile(np.array([[0, 100, 200, 255]], dtype=np.int32), (16, 4))  # (16, 16), max 255: no rescale
    out = open_image(Image.fromarray(values, mode="I"))
    np.testing.assert_array_equal(_pixels(out)[0, :4, 1], [0, 100, 200, 255])


def test_float_image_with_nan_and_inf_becomes_black_there():
    values = np.full((16, 16), 510.0, dtype=np.float32)
    values[0, 0], values[0, 1], values[0, 2] = np.nan, np.inf, 255.0
    out = _pixels(open_image(Image.fromarray(values, mode="F")))
    assert out[0, 0, 0] == 0 and out[0, 1, 0] == 0  # nan and inf are not the maximum
    assert out[0, 2, 0] == 127 and out[5, 5, 0] == 255  # 255 / 510 * 255 and the maximum


@pytest.mark.parametrize(
    ("mode", "fill", "expected_mode", "expected"),
    [
        ("L", 90, "RGB", (90, 90, 90)),
        ("LA", (90, 128), "RGBA", (90, 90, 90, 128)),
        ("RGBA", (10, 20, 30, 40), "RGBA", (10, 20, 30, 40)),
        ("RGB", (10, 20, 30), "RGB", (10, 20, 30)),
        ("CMYK", (0, 0, 0, 0), "RGB", (255, 255, 255)),
    ],
)
def test_modes_become_rgb_or_rgba_with_the_same_colours(mode, fill, expected_mode, expected):
    out = open_image(Image.new(mode, (20, 20), fill))
    assert out.mode == expected_mode and out.getpixel((3, 3)) == expected


def test_palette_with_a_transparent_entry_keeps_its_cut_out():
    image = Image.new("P", (20, 20), 0)
    image.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    image.paste(1, (0, 0, 10, 20))
    image.info["transparency"] = 1
    out = open_image(image)
    assert out.mode == "RGBA" and out.getpixel((2, 2))[3] == 0 and out.getpixel((15, 2)) == (255, 0, 0, 255)
    image.info.pop("transparency")
    assert open_image(image).mode == "RGB"


def test_size_bounds_at_their_edges():
    assert open_image(Image.new("RGB", (MIN_IMAGE_SIDE, 200))).size == (MIN_IMAGE_SIDE, 200)
    with pytest.raises(BadInputError, match=f"at least {MIN_IMAGE_SIDE} pixels"):
        open_image(Image.new("RGB", (200, MIN_IMAGE_SIDE - 1)))


def test_an_animation_gives_its_first_frame(tmp_path):
    frames = [Image.new("RGB", (20, 20), c) for c in ((200, 0, 0), (0, 0, 200))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50, loop=0)
    out = open_image(tmp_path / "anim.gif")
    r, g, b = out.getpixel((5, 5))[:3]
    assert r > 150 and b < 50


def test_a_partly_transparent_image_is_kept_and_an_opaque_alpha_is_rgba_too():
    image = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    image.putpixel((3, 3), (1, 2, 3, 255))
    out = open_image(image)
    assert out.mode == "RGBA" and out.getpixel((3, 3)) == (1, 2, 3, 255)
    with pytest.raises(BadInputError, match="fully transparent"):
        open_image(Image.new("RGBA", (20, 20), (9, 9, 9, 0)))


def test_image_output_path_folder_or_file(tmp_path):
    assert image_output_path(tmp_path) == tmp_path / "image.png"
    assert image_output_path(f"{tmp_path}/new/") == tmp_path / "new" / "image.png"
    assert image_output_path(tmp_path / "noext") == tmp_path / "noext" / "image.png"
    assert image_output_path(tmp_path / "cat.JPG") == tmp_path / "cat.JPG"
    assert image_output_path(tmp_path, default_name="x.webp") == tmp_path / "x.webp"
    with pytest.raises(BadInputError, match="extension '.gif'"):
        image_output_path(tmp_path / "cat.gif")
    assert not (tmp_path / "new").exists()  # checks create nothing


def test_output_checks(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(BadInputError, match="is an existing file"):
        check_output_folder(tmp_path / "file.txt")
    with pytest.raises(BadInputError, match="already exists"):
        check_output_folder(tmp_path, may_exist=False)
    assert check_output_folder(tmp_path / "a" / "b", may_exist=False) == tmp_path / "a" / "b"
    with pytest.raises(BadInputError, match="is a file, not a folder"):
        check_output_folder(tmp_path / "file.txt" / "sub")
    with pytest.raises(BadInputError, match="is a folder"):
        check_output_file(tmp_path)
    assert check_output_file(tmp_path / "mesh.obj", suffixes=(".obj",)) == tmp_path / "mesh.obj"
    with pytest.raises(BadInputError, match=r"\(none\)"):
        check_output_file(tmp_path / "mesh")
    assert sorted(os.listdir(tmp_path)) == ["file.txt"]  # the write probe left nothing behind


def test_atomic_writes_format_mode_and_no_leftovers(tmp_path):
    old = os.umask(0o022)
    try:
        jpg = write_image(Image.new("RGB", (20, 20), (255, 0, 0)), tmp_path / "sub" / "a.jpg")
        png = write_image(Image.new("RGB", (20, 20)), tmp_path / "a.unknown")
        txt = write_text("héllo", tmp_path / "t.json")
    finally:
        os.umask(old)
    assert jpg.read_bytes()[:3] == b"\xff\xd8\xff" and png.read_bytes()[:4] == b"\x89PNG"
    assert txt.read_bytes() == "héllo".encode()
    for path in (jpg, png, txt):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a.jpg", "a.unknown", "sub", "t.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_partial(tmp_path):
    target = write_text("old", tmp_path / "info.json")

    class Broken(Image.Image):
        def save(self, *args, **kwargs):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_image(Broken(), tmp_path / "info.png")
    assert target.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["info.json"]
