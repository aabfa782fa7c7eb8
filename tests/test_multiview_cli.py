"""`t2mv-multiview` (t2mv.multiview_cli) in smoke mode: the output folder, the strips, the settings JSON, errors, --help."""

import json

import pytest
from PIL import Image

from t2mv import chain as chain_module
from t2mv.multiview_cli import main
from wonder3d_perflow.cameras import VIEW_NAMES

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def rgba_image(tmp_path):
    image = Image.new("RGBA", (120, 90), (0, 0, 0, 0))
    image.paste((200, 40, 40, 255), (30, 20, 90, 80))
    path = tmp_path / "object.png"
    image.save(path)
    return path


def test_tiny_smoke_run_writes_the_folder(tmp_path, rgba_image, capsys):
    out = tmp_path / "views"
    assert main([str(rgba_image), "-o", str(out), "--tiny", "--seed", "3", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "SMOKE MODE" in captured.err and "NOISE" in captured.err

    names = {p.name for p in out.iterdir()}
    views = {f"{kind}_{view}.png" for kind in ("normal", "color") for view in VIEW_NAMES}
    assert views | {"normals.png", "colors.png", "input.png", "settings.json"} == names
    for name in views:
        assert Image.open(out / name).size == (256, 256)
    normals = Image.open(out / "normals.png")
    assert normals.size == (1536, 256)  # 256 high, 6 × 256 wide
    assert normals.crop((256 * 3, 0, 256 * 4, 256)).tobytes() == Image.open(out / "normal_back.png").tobytes()

    settings = json.loads((out / "settings.json").read_text())
    assert settings["smoke_mode_random_weights"] is True and settings["seed"] == 3
    assert settings["view_names"] == list(VIEW_NAMES)
    assert settings["pipeline"]["unet_passes"] == 4 and settings["pipeline"]["guidance_scale"] == 1.0
    assert {"load", "encode", "denoise", "decode", "total"} <= set(settings["timings"])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".views.")] == []  # no staging left


def test_existing_output_needs_overwrite(tmp_path, rgba_image):
    out = tmp_path / "views"
    out.mkdir()
    (out / "old.txt").write_text("old")
    assert main([str(rgba_image), "-o", str(out), "--tiny"]) == 2
    assert main([str(rgba_image), "-o", str(out), "--tiny", "--overwrite", "--scheduler", "ddim", "--steps", "2"]) == 0
    assert not (out / "old.txt").exists()
    assert json.loads((out / "settings.json").read_text())["pipeline"]["scheduler"] == "DDIMScheduler"


def test_too_few_steps_is_refused_before_loading(tmp_path, rgba_image, capsys):
    assert main([str(rgba_image), "-o", str(tmp_path / "views"), "--tiny", "--steps", "2"]) == 2
    assert "--steps >= 4" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [rgba_image]


def test_failure_while_writing_leaves_nothing_behind(tmp_path, rgba_image, monkeypatch):
    def broken_strip(images):
        raise OSError("disk full")

    monkeypatch.setattr(chain_module, "horizontal_strip", broken_strip)
    assert main([str(rgba_image), "-o", str(tmp_path / "views"), "--tiny"]) == 1
    assert list(tmp_path.iterdir()) == [rgba_image]  # neither the output nor the staging folder


def test_missing_weights_is_a_clear_error(tmp_path, rgba_image, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    code = main([str(rgba_image), "-o", str(tmp_path / "views"), "--model", "nobody/no-such-model", "--no-delta"])
    assert code == 3 and "nobody/no-such-model" in capsys.readouterr().err  # 3: missing weights, as for t2mv
    assert not (tmp_path / "views").exists()


def test_missing_input(tmp_path, capsys):
    assert main([str(tmp_path / "nope.png"), "-o", str(tmp_path / "out"), "--tiny"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_help_shows_defaults(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    for expected in ("flamehaze1115/wonder3d-v1.0", "hansyan/perflow-sd15-delta-weights", "--no-rembg", "--revision"):
        assert expected in text
    assert "default: 4" in text and "default: 0" in text and "EXPERIMENTAL" in text
