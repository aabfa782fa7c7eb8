"""triposr.preprocess against upstream's run.py preprocessing (tests/fixtures/triposr_preprocess/)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from triposr.preprocess import (
    composite_on_grey,
    cut_out,
    has_alpha,
    preprocess_image,
    resize_foreground,
    resize_images,
)

CASES = ["ellipse", "tallbar", "border"]


@pytest.fixture
def pp_dir(fixtures_dir):
    return fixtures_dir / "triposr_preprocess"


def _png(path, mode=None):
    image = Image.open(path)
    return np.asarray(image.convert(mode) if mode else image)


class FakeSession:
    """Stands in for a rembg session: rembg.remove(img, session=s) calls s.predict(img) -> list of "L" masks."""

    def __init__(self, mask: Image.Image):
        self.mask = mask
        self.calls = 0

    def predict(self, img, *args, **kwargs):
        self.calls += 1
        assert img.size == self.mask.size
        return [self.mask]


class ExplodingSession:
    def predict(self, img, *args, **kwargs):
        raise AssertionError("rembg must not run on an image that already has alpha")


@pytest.mark.parametrize("name", CASES)
def test_matches_upstream_bit_exact(pp_dir, name):
    info = json.loads((pp_dir / "info.json").read_text())["cases"][name]
    rgba = Image.open(pp_dir / f"{name}_rgba.png")
    assert has_alpha(rgba)
    # The cut-out is the image itself (a session that would be called fails the test).
    cutout = cut_out(rgba, session=ExplodingSession())
    fg = resize_foreground(cutout, 0.85)
    assert list(fg.size[::-1]) == info["fg_hw"]
    np.testing.assert_array_equal(np.asarray(fg), _png(pp_dir / f"{name}_fg.png"))
    composite = composite_on_grey(fg)
    np.testing.assert_array_equal(np.asarray(composite), _png(pp_dir / f"{name}_composite.png"))
    assert int(np.asarray(composite, dtype=np.int64).sum()) == info["composite_u8_sum"]

    # The public entry point: native size is exactly upstream's input.png; 512 within one level of its float input.
    native = preprocess_image(rgba, session=ExplodingSession(), size=None)
    np.testing.assert_array_equal(np.asarray(native), _png(pp_dir / f"{name}_composite.png"))
    out = preprocess_image(rgba, session=ExplodingSession())
    assert out.mode == "RGB" and out.size == (512, 512)
    diff = np.abs(np.asarray(out, dtype=np.int16) - _png(pp_dir / f"{name}_input512.png", "RGB").astype(np.int16))
    assert diff.max() <= 1


def test_model_input_resize_matches_upstream(pp_dir):
    tensors = load_file(pp_dir / "ellipse_tensors.safetensors")
    composite = tensors["composite_u8"].float() / 255.0  # (163, 163, 3)
    resized = resize_images(composite.permute(2, 0, 1)[None], 512).permute(0, 2, 3, 1)  # (1, 512, 512, 3)
    torch.testing.assert_close(resized, tensors["model_input"], atol=1e-6, rtol=0)


def test_foreground_ratio_is_configurable(pp_dir):
    rgba = Image.open(pp_dir / "ellipse_rgba.png")
    assert resize_foreground(rgba, 1.0).size == (139, 139)  # the cropped 89x139 box padded to a square
    assert resize_foreground(rgba, 0.5).size == (278, 278)
    assert preprocess_image(rgba, foreground_ratio=0.5, size=None).size == (278, 278)


def _object_on_blue(size=(90, 60)):
    """An RGB photo-like image (no alpha) and the mask a background remover would return for it."""
    width, height = size
    rgb = np.zeros((height, width, 3), np.uint8)
    rgb[...] = (20, 40, 200)
    rgb[10:40, 30:70] = (250, 120, 10)
    mask = np.zeros((height, width), np.uint8)
    mask[10:40, 30:70] = 255
    return Image.fromarray(rgb, "RGB"), Image.fromarray(mask, "L")


def test_rembg_path_with_fake_session():
    rgb, mask = _object_on_blue()
    session = FakeSession(mask)
    out = preprocess_image(rgb, session=session, size=None)
    assert session.calls == 1
    # Same as cutting out by hand: object kept, background transparent, then the upstream steps.
    expected_rgba = np.dstack([np.asarray(rgb), np.asarray(mask)])
    expected_rgba[np.asarray(mask) == 0, :3] = 0
    expected = composite_on_grey(resize_foreground(Image.fromarray(expected_rgba, "RGBA"), 0.85))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))
    pixels = np.asarray(out)
    assert tuple(pixels[0, 0]) == (127, 127, 127)  # 0.5 grey background (truncated), the blue is gone
    assert not (pixels == (20, 40, 200)).all(axis=-1).any()


def test_opaque_alpha_counts_as_no_alpha():
    rgb, mask = _object_on_blue()
    session = FakeSession(mask)
    preprocess_image(rgb.convert("RGBA"), session=session)
    assert session.calls == 1


def test_default_session_is_u2net(monkeypatch):
    import rembg

    rgb, mask = _object_on_blue()
    created = []

    def fake_new_session(model_name, *args, **kwargs):
        created.append(model_name)
        return FakeSession(mask)

    monkeypatch.setattr(rembg, "new_session", fake_new_session)
    preprocess_image(rgb)
    assert created == ["u2net"]


def test_no_removal_uses_prepared_square_image_as_is():
    image = Image.fromarray(np.full((64, 64, 3), 90, np.uint8), "RGB")
    out = preprocess_image(image, remove_background=False, session=ExplodingSession())
    assert out.size == (512, 512)
    assert (np.asarray(out) == 90).all()
    with pytest.raises(ValueError, match="square"):
        preprocess_image(Image.new("RGB", (64, 32)), remove_background=False)


def test_degenerate_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="fully transparent"):
        preprocess_image(Image.new("RGBA", (32, 32), (255, 0, 0, 0)).convert("RGBA"), session=ExplodingSession())
    # An empty rembg mask is the same situation.
    rgb, _ = _object_on_blue()
    with pytest.raises(ValueError, match="fully transparent"):
        preprocess_image(rgb, session=FakeSession(Image.new("L", rgb.size, 0)))
    thin = np.zeros((32, 32, 4), np.uint8)
    thin[10, 5:20] = 255  # a one-row object: nothing is left after upstream's exclusive crop
    with pytest.raises(ValueError, match="too thin"):
        preprocess_image(Image.fromarray(thin, "RGBA"))
    ok = np.zeros((32, 32, 4), np.uint8)
    ok[5:20, 5:20] = 255
    for ratio in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError, match="foreground_ratio"):
            preprocess_image(Image.fromarray(ok, "RGBA"), foreground_ratio=ratio)
    with pytest.raises(TypeError, match="PIL"):
        preprocess_image(np.zeros((8, 8, 3), np.uint8))


def test_own_session_cut_out_is_rembg_remove_exactly():
    """Without importing rembg, a session of ours gives the cut-out rembg.remove gives (soft mask edges too)."""
    import rembg

    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (36, 50, 3), dtype=np.uint8))
    mask = np.zeros((36, 50), np.uint8)
    mask[4:28, 6:44], mask[28:32, 6:44] = 255, 120
    session = FakeSession(Image.fromarray(mask))
    ours = np.asarray(cut_out(image, session=session))
    np.testing.assert_array_equal(ours, np.asarray(rembg.remove(image, session=session)))
    assert session.calls == 2 and ours.shape == (36, 50, 4)
