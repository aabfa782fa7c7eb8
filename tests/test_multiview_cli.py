"""`t2mv-multiview` (t2mv.multiview_cli) in smoke mode: the output folder, the strips, the settings JSON, errors, --help."""

import json

import pytest
from PIL import Image

from t2mv.chain import ChainResult
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


def test_tiny_smoke_run_writes_the_chains_files(tmp_path, rgba_image, capsys):
    """The chain's option names, the chain's files: the same names, settings.json keys and pixels as the chain's
    multiview stage run on the same image with the same settings, and both folders read by the same reader."""
    from t2mv.chain import TextTo3D
    from t2mv.chain.files import read_views
    from t2mv.settings import GenerationSettings

    out = tmp_path / "views"
    flags = ["--seed", "3", "--mv-steps", "4", "--mv-guidance", "1.0", "--mv-preprocess", "wonder3d"]
    argv = [str(rgba_image), "-o", str(out), "--tiny", "--device", "cpu", "--dtype", "float32"]
    assert main([*argv, *flags, "--mv-foreground-ratio", "0.6", "--no-remove-bg"]) == 0
    captured = capsys.readouterr()
    assert "SMOKE MODE" in captured.err and "NOISE" in captured.err

    names = {p.name for p in out.iterdir()}
    views = {f"{kind}_{i}_{view}.png" for kind in ("normal", "color") for i, view in enumerate(VIEW_NAMES)}
    assert views | {"normals.png", "colors.png", "image.png", "mv_input.png", "settings.json", "timings.json"} == names
    normals = Image.open(out / "normals.png")
    assert normals.size == (6 * 256, 256)
    assert normals.crop((256 * 3, 0, 256 * 4, 256)).tobytes() == Image.open(out / "normal_3_back.png").tobytes()
    settings = json.loads((out / "settings.json").read_text())
    assert settings["smoke"] is True and settings["seed"] == 3 and settings["stages"] == ["multiview"]
    assert settings["mv_foreground_ratio"] == 0.6 and settings["object_mask"] == "none (whole image)"
    assert settings["command"]["pipeline"]["unet_passes"] == 4
    assert {"load", "preprocess", "multiview", "multiview.denoise", "total"} <= set(
        json.loads((out / "timings.json").read_text())["timings"]
    )
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".views.")] == []  # no staging left

    chain_out = tmp_path / "chain"
    chain = TextTo3D.tiny(stages=("multiview",))
    chain(
        image=rgba_image,
        settings=GenerationSettings.smoke(seed=3, mv_foreground_ratio=0.6, remove_background=False),
        output_dir=chain_out,
    )
    chain_names = {p.name for p in chain_out.iterdir()}
    assert {n for n in chain_names if n.startswith(("normal_", "color_"))} == views
    assert {"image.png", "mv_input.png", "normals.png", "colors.png", "settings.json"} <= chain_names
    chain_settings = json.loads((chain_out / "settings.json").read_text())
    assert set(chain_settings) <= set(settings)  # the same record (plus this command's own options)
    same = ("seed", "mv_steps", "mv_guidance", "mv_preprocess", "mv_foreground_ratio", "object_mask", "input")
    assert {k: settings[k] for k in same} == {k: chain_settings[k] for k in same}
    ours, theirs = read_views(out), read_views(chain_out)
    assert ours.view_names == theirs.view_names == tuple(VIEW_NAMES)
    for a, b in zip(ours.normals + ours.colors, theirs.normals + theirs.colors):
        assert a.tobytes() == b.tobytes()  # same weights, same seed, same input: the same views


def test_read_views_refuses_a_folder_without_a_complete_set(tmp_path):
    from t2mv.chain.files import read_views
    from t2mv.errors import BadInputError

    for i, view in enumerate(VIEW_NAMES):
        Image.new("RGB", (8, 8)).save(tmp_path / f"normal_{i}_{view}.png")
        if i != 2:
            Image.new("RGB", (8, 8)).save(tmp_path / f"color_{i}_{view}.png")
    with pytest.raises(BadInputError, match="no complete set of views"):
        read_views(tmp_path)
    Image.new("RGB", (8, 8)).save(tmp_path / "color_2_right.png")
    assert read_views(tmp_path).view_names == tuple(VIEW_NAMES)


def test_existing_output_needs_overwrite(tmp_path, rgba_image):
    out = tmp_path / "views"
    out.mkdir()
    (out / "old.txt").write_text("old")
    assert main([str(rgba_image), "-o", str(out), "--tiny"]) == 2
    argv = [str(rgba_image), "-o", str(out), "--tiny", "--overwrite", "--scheduler", "ddim", "--mv-steps", "2"]
    assert main(argv) == 0
    assert not (out / "old.txt").exists()
    assert json.loads((out / "settings.json").read_text())["command"]["pipeline"]["scheduler"] == "DDIMScheduler"


def test_too_few_steps_is_refused_before_loading(tmp_path, rgba_image, capsys):
    assert main([str(rgba_image), "-o", str(tmp_path / "views"), "--tiny", "--mv-steps", "2"]) == 2
    assert "--mv-steps >= 4" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == [rgba_image]


def test_failure_while_writing_leaves_nothing_behind(tmp_path, rgba_image, monkeypatch):
    original = ChainResult.save_stage

    def disk_full_at_the_views(self, stage, folder, **kwargs):
        if stage == "multiview":  # after the image and the multiview input were written
            raise OSError("disk full")
        return original(self, stage, folder, **kwargs)

    monkeypatch.setattr(ChainResult, "save_stage", disk_full_at_the_views)
    assert main([str(rgba_image), "-o", str(tmp_path / "views"), "--tiny"]) == 1
    assert list(tmp_path.iterdir()) == [rgba_image]  # neither the output nor the staging folder


def test_missing_weights_is_a_clear_error(tmp_path, rgba_image, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    argv = [str(rgba_image), "-o", str(tmp_path / "views"), "--multiview-model", "nobody/no-such-model"]
    code = main([*argv, "--no-multiview-delta"])
    assert code == 3 and "nobody/no-such-model" in capsys.readouterr().err  # 3: missing weights, as for t2mv
    assert not (tmp_path / "views").exists()


def test_missing_input(tmp_path, capsys):
    assert main([str(tmp_path / "nope.png"), "-o", str(tmp_path / "out"), "--tiny"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_help_shows_defaults_under_the_chains_names(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")  # no wrapping inside the hub ids
    assert main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for expected in ("flamehaze1115/wonder3d-v1.0", "hansyan/perflow-sd15-delta-weights", "--no-remove-bg"):
        assert expected in text
    for flag in ("--mv-steps", "--mv-guidance", "--mv-preprocess", "--mv-foreground-ratio", "--multiview-revision"):
        assert flag in text
    assert "(default: 4;" in text and "(default: 0;" in text and "EXPERIMENTAL" in text
    for old in ("--steps ", "--cfg", "--no-rembg", "--no-delta", "--model ", "--revision "):
        assert old not in text  # the stage command's old names are gone (one name per setting)
