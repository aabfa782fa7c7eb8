"""Condition-image preprocessing: alpha crop + recentre on white (Wonder3D), resize + whiten (PeRFlow demo),
and rembg only when there is no alpha (with a fake session: u2net is never downloaded in tests)."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from wonder3d_perflow import preprocess
from wonder3d_perflow.preprocess import has_alpha, preprocess_image


class FakeSession:
    """Stands in for a rembg session: rembg.remove(img, session=s) calls s.predict(img) for a list of "L" masks."""

    def __init__(self, box):
        self.box = box
        self.calls = 0

    def predict(self, image, *args, **kwargs):
        self.calls += 1
        mask = Image.new("L", image.size, 0)
        mask.paste(255, self.box)
        return [mask]


class ForbiddenSession:
    def predict(self, image, *args, **kwargs):
        raise AssertionError("rembg must not run on an image that has alpha")


def _rgba_object(size=(300, 200), box=(40, 30, 140, 90), color=(200, 30, 30)):
    image = Image.new("RGBA", size, (0, 255, 0, 0))  # transparent green: must never show
    image.paste(Image.new("RGBA", (box[2] - box[0], box[3] - box[1]), (*color, 255)), box[:2])
    return image


def _object_bbox(rgb, threshold=250):
    array = np.asarray(rgb).astype(int)
    ys, xs = np.nonzero((array < threshold).any(axis=2))
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def test_rgba_is_cropped_scaled_to_192_and_centred_on_white():
    out = preprocess_image(_rgba_object(), session=ForbiddenSession())
    assert out.mode == "RGB" and out.size == (256, 256)
    left, top, right, bottom = _object_bbox(out)
    assert right - left == 192  # longest side 0.75 · 256
    assert abs((bottom - top) - 192 * 60 / 100) <= 2
    assert abs((left + right) / 2 - 128) <= 1 and abs((top + bottom) / 2 - 128) <= 1
    array = np.asarray(out)
    assert (array[0, 0] == 255).all() and (array[-1, -1] == 255).all()  # white background
    assert tuple(array[128, 128]) == (200, 30, 30)
    assert not ((array[..., 1] > 200) & (array[..., 0] < 100)).any()  # hidden green never leaks


def test_foreground_ratio_and_size():
    out = preprocess_image(_rgba_object(), size=128, foreground_ratio=0.5)
    assert out.size == (128, 128)
    left, _, right, _ = _object_bbox(out)
    assert right - left == 64


def test_soft_alpha_is_composited_over_white():
    image = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    image.paste(Image.new("RGBA", (32, 32), (0, 0, 0, 128)), (16, 16))
    out = np.asarray(preprocess_image(image))
    assert abs(int(out[128, 128, 0]) - 127) <= 1  # 0 · a + 255 · (1 - a), a = 128/255


def test_rgb_image_goes_through_the_given_rembg_session():
    image = Image.new("RGB", (200, 200), (0, 0, 255))
    image.paste((10, 200, 10), (50, 60, 110, 160))
    session = FakeSession((50, 60, 110, 160))
    out = preprocess_image(image, session=session)
    assert session.calls == 1
    left, top, right, bottom = _object_bbox(out)
    assert bottom - top == 192 and abs((right - left) - 192 * 60 / 100) <= 2
    assert tuple(np.asarray(out)[128, 128]) == (10, 200, 10)
    assert (np.asarray(out)[:, :, 2] > 200).sum() > 0.5 * 256 * 256  # blue background replaced by white


def test_opaque_rgba_counts_as_no_alpha():
    opaque = Image.new("RGBA", (50, 50), (1, 2, 3, 255))
    assert not has_alpha(opaque) and has_alpha(_rgba_object()) and not has_alpha(opaque.convert("RGB"))
    session = FakeSession((10, 10, 40, 40))
    preprocess_image(opaque, session=session)
    assert session.calls == 1


def test_default_session_is_u2net(monkeypatch):
    import rembg

    made = []

    def fake_new_session(name, *args, **kwargs):
        made.append(name)
        return FakeSession((5, 5, 20, 20))

    monkeypatch.setattr(rembg, "new_session", fake_new_session)
    preprocess_image(Image.new("RGB", (32, 32), "gray"))
    assert made == ["u2net"]


def test_no_rembg_uses_the_whole_image():
    image = Image.new("RGB", (100, 50), (0, 0, 0))
    out = preprocess_image(image, remove_background=False, session=ForbiddenSession())
    left, top, right, bottom = _object_bbox(out)
    assert (right - left, bottom - top) == (192, 96)


def test_perflow_mode_resizes_and_whitens_low_alpha_only():
    image = Image.new("RGBA", (512, 512), (10, 20, 30, 3))  # alpha ≤ 5 → white
    image.paste(Image.new("RGBA", (256, 256), (100, 50, 25, 40)), (0, 0))  # alpha 40: colour kept as is
    out = preprocess_image(image, mode="perflow", session=ForbiddenSession())
    array = np.asarray(out)
    assert out.size == (256, 256) and out.mode == "RGB"
    assert tuple(array[200, 200]) == (255, 255, 255)
    assert tuple(array[50, 50]) == (100, 50, 25)  # no compositing, no recentring


def test_perflow_mode_runs_rembg_after_the_resize():
    session = FakeSession((0, 0, 128, 256))
    out = np.asarray(preprocess_image(Image.new("RGB", (512, 512), (9, 9, 9)), mode="perflow", session=session))
    assert session.calls == 1
    assert tuple(out[10, 10]) == (9, 9, 9) and tuple(out[10, 200]) == (255, 255, 255)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"mode": "sam"}, "mode must be one of"),
        ({"foreground_ratio": 0.0}, "foreground_ratio"),
        ({"size": 4}, "size must be"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        preprocess_image(_rgba_object(), **kwargs)


def test_not_an_image_and_empty_alpha():
    with pytest.raises(ValueError, match="PIL image"):
        preprocess_image(np.zeros((8, 8, 3)))
    with pytest.raises(ValueError, match="fully transparent"):
        preprocess_image(Image.new("RGBA", (32, 32), (0, 0, 0, 0)))


def test_rembg_is_not_imported_at_module_import():
    """rembg's first import compiles pymatting's numba kernels (about a minute after install): no import path of
    ours may load it, under any name, and neither may a background removal with a session of our own."""
    code = """if True:
        import sys
        from PIL import Image
        import t2mv, t2mv.inputs, t2mv.chain, t2mv.cli, t2mv.mesh_cli, t2mv.multiview_cli, t2mv.batch, t2mv.app
        import triposr.preprocess, wonder3d_perflow.preprocess
        from t2mv.tiny import FakeRembgSession
        loaded = sorted(name for name in ("rembg", "pymatting") if name in sys.modules)
        assert not loaded, f"imported at module import: {loaded}"
        image = Image.new("RGB", (64, 48), (250, 250, 250))
        image.paste((200, 30, 30), (20, 10, 44, 40))
        wonder3d_perflow.preprocess.preprocess_image(image, session=FakeRembgSession())
        triposr.preprocess.preprocess_image(image, session=FakeRembgSession())
        loaded = sorted(name for name in ("rembg", "pymatting") if name in sys.modules)
        assert not loaded, f"imported by a background removal with our own session: {loaded}"
    """
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]


def test_own_session_cut_out_is_rembg_remove_exactly():
    """Without rembg, a session of ours gives the cut-out rembg.remove gives (soft mask edges included)."""
    import rembg

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    mask = np.zeros((40, 56), np.uint8)
    mask[5:30, 10:40], mask[30:35, 10:40] = 255, 90  # an opaque block and a half-transparent fringe

    class Session:
        def predict(self, img, *args, **kwargs):
            return [Image.fromarray(mask)]

    ours = np.asarray(preprocess.remove_background(image, Session()))
    np.testing.assert_array_equal(ours, np.asarray(rembg.remove(image, session=Session())))
    assert ours.shape == (40, 56, 4) and set(np.unique(ours[..., 3])) == {0, 90, 255}
