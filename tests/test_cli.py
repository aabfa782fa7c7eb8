"""The `t2mv` command line in smoke mode: help texts, each subcommand's files, exit codes for bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import trimesh
from PIL import Image

from t2mv.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_NO_WEIGHTS, main


@pytest.mark.parametrize(
    "command, expected",
    [
        ([], ["image", "text-to-mesh", "image-to-mesh", "batch", "app"]),
        (["image"], ["--t2i-steps", "(default: 4; an integer in [4, 100])", "--tiny", "--device", "--dtype"]),
        (["text-to-mesh"], ["--mc-resolution", "--bake-texture", "(default: 1.0;", "--offload", "--debug"]),
        (["image-to-mesh"], ["--no-remove-bg", "(default: 0.85;", "--simplify", "diffusion_pytorch_model.<variant>"]),
        (["batch"], ["prompt file", "--mesh", "(default: outputs/batch)", "torchrun"]),
        (["app"], ["--host", "(default: 127.0.0.1)", "--port", "--share", "--tiny"]),
    ],
)
def test_every_command_has_help_with_defaults(capsys, command, expected):
    assert main([*command, "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    for text in expected:
        assert text in out


def test_image_command_in_smoke_mode_from_the_environment(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("T2MV_SMOKE", "1")
    output = tmp_path / "teapot.png"
    assert main(["image", "a red teapot", "-o", str(output), "--seed", "3"]) == 0
    assert Image.open(output).size == (64, 64)
    settings = json.loads(output.with_suffix(".json").read_text())
    assert settings["seed"] == 3 and settings["smoke"] is True and settings["stages"] == ["text_to_image"]
    captured = capsys.readouterr()
    assert "SMOKE MODE" in captured.err and "wrote 2 files" in captured.out


def test_text_to_mesh_writes_views_strips_and_meshes(tmp_path):
    out = tmp_path / "teapot"
    args = ["--format", "glb", "obj", "--mc-resolution", "32", "--mv-preprocess", "perflow"]
    code = main(["text-to-mesh", "a red teapot", "--tiny", "-o", str(out), *args])
    assert code == 0
    names = {p.name for p in out.iterdir()}
    assert {
        "image.png",
        "mv_input.png",
        "normals.png",
        "colors.png",
        "mesh_input.png",
        "mesh.glb",
        "mesh.obj",
    } <= names
    assert len([n for n in names if n.startswith(("normal_", "color_"))]) == 12
    assert "mesh.ply" not in names
    settings = json.loads((out / "settings.json").read_text())
    assert settings["mv_preprocess"] == "perflow" and settings["mc_resolution"] == 32
    loaded = trimesh.load(out / "mesh.glb", force="mesh")
    assert len(loaded.faces) > 0


def test_image_to_mesh_and_its_bad_inputs(tmp_path, capsys):
    image = tmp_path / "in.png"
    Image.new("RGB", (64, 64), (250, 250, 250)).save(image)
    out = tmp_path / "out"
    assert main(["image-to-mesh", str(image), "--tiny", "--no-multiview", "-o", str(out), "--format", "ply"]) == 0
    assert (out / "mesh.ply").exists() and not (out / "mv_input.png").exists()

    (tmp_path / "notes.png").write_text("hello")
    assert main(["image-to-mesh", str(tmp_path / "notes.png"), "--tiny", "-o", str(out)]) == EXIT_BAD_INPUT
    assert "not an image" in capsys.readouterr().err
    assert main(["image-to-mesh", str(image), "--tiny", "--mc-resolution", "8", "-o", str(out)]) == EXIT_BAD_INPUT
    assert "--mc-resolution must be an integer in [32, 512], got 8" in capsys.readouterr().err
    assert main(["batch", str(tmp_path / "absent.txt"), "--tiny"]) == EXIT_BAD_INPUT
    assert "does not exist" in capsys.readouterr().err


def test_missing_weights_offline_exit_with_the_fix(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("T2MV_SMOKE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert main(["image", "a cat", "-o", str(tmp_path / "x.png")]) == EXIT_NO_WEIGHTS
    err = capsys.readouterr().err
    assert "hansyan/perflow-sd15-dreamshaper" in err and "--tiny" in err
    assert not (tmp_path / "x.png").exists()


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "t2mv"
    # scripts/install.sh installs the package (pip install -e .): a missing script is an install defect, not a skip
    assert script.exists(), f"{script} is missing: the package's console scripts were not installed"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "text-to-mesh" in done.stdout


# ---------------------------------------------------------------------------------------------- issue 11
def test_image_output_may_be_a_folder(tmp_path, capsys):
    folder = tmp_path / "pictures"
    folder.mkdir()
    assert main(["image", "a cat", "--tiny", "-o", str(folder)]) == 0
    assert Image.open(folder / "image.png").size == (64, 64) and (folder / "image.json").is_file()
    assert main(["image", "a cat", "--tiny", "-o", str(tmp_path / "new")]) == 0  # no suffix: a folder
    assert (tmp_path / "new" / "image.png").is_file()
    assert main(["image", "a cat", "--tiny", "-o", str(tmp_path / "cat.txt")]) == EXIT_BAD_INPUT
    assert "use one of .png, .jpg, .jpeg, .webp" in capsys.readouterr().err


def test_bad_output_paths_fail_before_any_model_loads(tmp_path, capsys, monkeypatch):
    from t2mv import cli

    def no_loading(*args, **kwargs):
        raise AssertionError("no model may load for a bad output path")

    monkeypatch.setattr(cli, "load_chain", no_loading)
    existing = tmp_path / "taken"
    existing.write_text("mine")
    for argv in (
        ["text-to-mesh", "a cat", "-o", str(existing)],
        ["text-to-mesh", "a cat", "-o", str(existing / "below-a-file")],
        ["text-to-mesh", "a cat", "-o", "/proc/t2mv-read-only"],  # read-only even for root
        ["image", "a cat", "-o", "/proc/t2mv.png"],
        ["batch", str(existing), "-o", str(existing)],
    ):
        assert main([*argv, "--tiny"]) == EXIT_BAD_INPUT, argv
        err = capsys.readouterr().err
        assert err.count("error:") == 1 and "Traceback" not in err, err
    assert existing.read_text() == "mine"


def test_a_file_not_found_that_is_not_weights_is_not_exit_3(tmp_path, capsys, monkeypatch):
    from t2mv import chain as chain_module

    def lost(*args, **kwargs):
        raise FileNotFoundError("[Errno 2] No such file or directory: '/tmp/scratch/x.npy'")

    monkeypatch.setattr(chain_module.ChainResult, "save_stage", lost)
    assert main(["text-to-mesh", "a cat", "--tiny", "-o", str(tmp_path / "out"), "--no-multiview"]) == EXIT_FAILED
    err = capsys.readouterr().err
    assert "FileNotFoundError" in err and "--debug" in err and "Traceback" not in err


def test_debug_prints_the_trace(tmp_path, capsys):
    argv = ["image-to-mesh", str(tmp_path / "absent.png"), "--tiny", "-o", str(tmp_path / "out")]
    assert main(argv) == EXIT_BAD_INPUT
    assert "Traceback" not in capsys.readouterr().err
    assert main([*argv, "--debug"]) == EXIT_BAD_INPUT
    assert "Traceback" in capsys.readouterr().err


def test_missing_u2net_is_reported_before_the_models_load(tmp_path, capsys, monkeypatch):
    import rembg

    from t2mv.chain import TextTo3D

    monkeypatch.delenv("T2MV_SMOKE", raising=False)

    def offline(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'github.com'")

    def no_loading(*args, **kwargs):
        raise AssertionError("the models must not load before u2net is found")

    monkeypatch.setattr(rembg, "new_session", offline)
    monkeypatch.setattr(TextTo3D, "from_pretrained", no_loading)
    assert main(["text-to-mesh", "a cat", "-o", str(tmp_path / "out")]) == EXIT_NO_WEIGHTS
    err = capsys.readouterr().err
    assert "u2net" in err and "--no-remove-bg" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_views_options_reach_the_chain_and_are_checked_first(tmp_path, capsys):
    image = tmp_path / "in.png"
    Image.new("RGB", (64, 64), (250, 250, 250)).save(image)
    out = tmp_path / "field"
    args = ["image-to-mesh", str(image), "--tiny", "--no-remove-bg", "--mc-resolution", "32"]
    assert main([*args, "-o", str(out), "--texture-source", "field"]) == 0
    settings = json.loads((out / "settings.json").read_text())
    assert settings["texture_source"] == "field" and settings["refine"] is False
    assert not (out / "mesh_field.glb").exists()
    capsys.readouterr()
    for bad in (["--texture-source", "photo"], ["--refine", "--refine-iterations", "5"]):
        assert main([*args, "-o", str(tmp_path / "bad"), *bad]) == EXIT_BAD_INPUT
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in err[0], err
        assert not (tmp_path / "bad").exists()  # checked before anything was written
