"""The `t2mv` command line in smoke mode: help texts, each subcommand's files, exit codes for bad input."""

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from t2mv.cli import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_NO_WEIGHTS, main


@pytest.mark.parametrize(
    "command, expected",
    [
        ([], ["image", "text-to-mesh", "image-to-mesh", "batch", "app"]),
        (["image"], ["--t2i-steps", "(default: 4; an integer in [1, 100])", "--tiny", "--device", "--dtype"]),
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


def _object_side(path, background, size):
    """The longest side of the object's box in a preprocessed input, as a fraction of the image side."""
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(int)  # (size, size, 3)
    rows, cols = np.nonzero(np.abs(pixels - background).max(axis=-1) > 2)
    assert pixels.shape[:2] == (size, size)
    return (max(rows.max() - rows.min(), cols.max() - cols.min()) + 1) / size


def test_text_to_mesh_writes_views_strips_and_meshes(tmp_path):
    out = tmp_path / "teapot"
    args = ["--format", "glb", "obj", "--mc-resolution", "32", "--mv-preprocess", "perflow", "--no-remove-bg"]
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
    # The preprocessing options reached the images, not only settings.json (issue 20, item 8). perflow with the
    # whole image as the object: the image resized to the full 256² (wonder3d would centre it in a white frame).
    assert _object_side(out / "mv_input.png", 255, 256) == 1.0

    # wonder3d at non-default ratios, the background cut out: the object fills the asked share of each input.
    out = tmp_path / "ratios"
    ratios = ["--mv-preprocess", "wonder3d", "--mv-foreground-ratio", "0.5", "--mesh-foreground-ratio", "0.6"]
    args = ["--format", "glb", "--texture-source", "field", *ratios]
    assert main(["text-to-mesh", "a red teapot", "--tiny", "-o", str(out), *args]) == 0
    assert abs(_object_side(out / "mv_input.png", 255, 256) - 0.5) < 0.02  # 0.75 by default
    assert abs(_object_side(out / "mesh_input.png", 127, 512) - 0.6) < 0.02  # 0.85 by default


# ---------------------------------------------------------------------------------------------- issue 18
def _parsers() -> dict[str, argparse.ArgumentParser]:
    """Every command's parser: the t2mv subcommands, the app, and the two stage commands."""
    from t2mv import app, cli, mesh_cli, multiview_cli

    top = cli.build_parser()
    sub = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    found = {f"t2mv {name}": parser for name, parser in sub.choices.items() if name != "app"}
    found["t2mv app"] = app.build_parser()
    found["t2mv-multiview"] = multiview_cli.build_parser()
    found["t2mv-mesh"] = mesh_cli.build_parser()
    return found


def _flags(parser: argparse.ArgumentParser) -> dict[str, tuple[str, ...]]:
    """dest → its option strings, for every optional argument the parser offers (not --help)."""
    return {
        a.dest: tuple(sorted(a.option_strings))
        for a in parser._actions
        if a.option_strings and a.dest != "help" and a.help != argparse.SUPPRESS
    }


def test_a_setting_has_one_flag_name_on_every_command():
    from t2mv.cli_common import RENAMED_FLAGS
    from t2mv.settings import GenerationSettings

    parsers = _parsers()
    names: dict[str, set[tuple[str, ...]]] = {}
    dests: dict[str, set[str]] = {}
    for parser in parsers.values():
        for dest, strings in _flags(parser).items():
            names.setdefault(dest, set()).add(strings)
            for string in strings:
                dests.setdefault(string, set()).add(dest)
    assert {dest: spelled for dest, spelled in names.items() if len(spelled) > 1} == {}  # one name per setting
    assert {flag: ds for flag, ds in dests.items() if len(ds) > 1} == {}  # one setting per name
    for spec in GenerationSettings.bounds().values():  # and the name is the declared one
        assert names.get(spec.name, {(spec.flag,)}) == {(spec.flag,)}, spec.name
    used = set(dests)
    assert not used & set(RENAMED_FLAGS), used & set(RENAMED_FLAGS)  # the old stage-command names are gone
    for same in ("mc_resolution", "mc_threshold", "bake_texture", "remove_background", "format", "output"):
        assert sum(same in _flags(p) for p in parsers.values()) >= 2, same  # shared by the chain and a stage


@pytest.mark.parametrize(
    "command, offered, absent",
    [
        (
            "t2mv image",
            ["--t2i-steps", "--height", "--seed", "--t2i-model", "--compile"],
            [
                "--multiview-model",
                "--multiview-delta",
                "--triposr-model",
                "--mc-resolution",
                "--mv-steps",
                "--no-remove-bg",
                "--format",
                "--offload",
                "--texture-source",
                "--mesh-foreground-ratio",
            ],
        ),
        (
            "t2mv image-to-mesh",
            ["--mv-steps", "--mc-resolution", "--multiview-model", "--triposr-model", "--texture-source", "--offload"],
            ["--t2i-model", "--t2i-delta", "--t2i-steps", "--height", "--negative-prompt"],
        ),
        (
            "t2mv text-to-mesh",
            ["--t2i-steps", "--mv-steps", "--mc-resolution", "--t2i-model", "--multiview-model", "--triposr-model"],
            [],
        ),
        (
            "t2mv-multiview",
            [
                "--mv-steps",
                "--mv-guidance",
                "--mv-preprocess",
                "--mv-foreground-ratio",
                "--no-remove-bg",
                "--seed",
                "--multiview-model",
                "--multiview-delta",
            ],
            [
                "--mesh-foreground-ratio",
                "--mc-resolution",
                "--triposr-model",
                "--t2i-model",
                "--format",
                "--texture-source",
                "--refine",
                "--height",
                "--t2i-steps",
                "--offload",
            ],
        ),
        (
            "t2mv-mesh",
            [
                "--mc-resolution",
                "--mc-threshold",
                "--bake-texture",
                "--mesh-foreground-ratio",
                "--no-remove-bg",
                "--triposr-model",
                "--simplify",
                "--texture-size",
                "--format",
            ],
            [
                "--mv-steps",
                "--mv-preprocess",
                "--mv-foreground-ratio",
                "--multiview-model",
                "--t2i-model",
                "--seed",
                "--texture-source",
                "--refine",
                "--height",
                "--offload",
                "--compile",
                "--delta-variant",
                "--turntable",
            ],
        ),
    ],
)
def test_each_command_lists_only_the_options_it_uses(command, offered, absent, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    text = _parsers()[command].format_help()
    flags = set(re.findall(r"(?<![\w-])--?[a-z][a-z0-9-]*", text))
    assert set(offered) <= flags, set(offered) - flags
    assert not set(absent) & flags, set(absent) & flags


def test_every_command_takes_output_device_dtype_and_local_files_only():
    for name, parser in _parsers().items():
        strings = {s for strings in _flags(parser).values() for s in strings}
        expected = {"-o", "--output", "--device", "--dtype", "--local-files-only", "--tiny", "--debug"}
        assert expected <= strings, (name, expected - strings)
        writes_meshes = name in ("t2mv text-to-mesh", "t2mv image-to-mesh", "t2mv batch", "t2mv-mesh")
        assert ({"-f", "--format"} <= strings) == writes_meshes, name


@pytest.mark.parametrize("command", ["t2mv text-to-mesh", "t2mv image-to-mesh", "t2mv batch", "t2mv-mesh"])
def test_format_takes_spaces_commas_and_repeats(command, capsys):
    parser = _parsers()[command]
    positional = ["x.png"] if "image" in command or command == "t2mv-mesh" else ["x"]
    default = parser.parse_args(positional).format
    for given, expected in [
        (["--format", "glb", "obj"], ["glb", "obj"]),
        (["--format", "glb,obj"], ["glb", "obj"]),
        (["-f", "ply", "-f", "OBJ,.glb"], ["ply", "obj", "glb"]),
        (["--format", "obj", "obj,glb"], ["obj", "glb"]),
    ]:
        assert parser.parse_args([*positional, *given]).format == expected, given
    assert parser.parse_args(positional).format == default  # the default is not changed by earlier parses
    with pytest.raises(SystemExit) as done:
        parser.parse_args([*positional, "--format", "glb,fbx"])
    assert done.value.code == 2 and "unknown mesh format 'fbx'" in capsys.readouterr().err


def test_an_old_flag_is_answered_with_its_new_name(tmp_path, capsys):
    from t2mv import mesh_cli, multiview_cli

    assert mesh_cli.main(["x.png", "--resolution", "64", "--bake"]) == 2
    err = capsys.readouterr().err
    assert "--resolution is now --mc-resolution" in err and "--bake is now --bake-texture" in err
    assert multiview_cli.main(["x.png", "-o", str(tmp_path / "v"), "--delta", "some/repo"]) == 2  # not --delta-variant
    assert "--delta is now --multiview-delta" in capsys.readouterr().err


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


def test_image_candidates_are_written_and_the_summary_names_the_chosen_one(tmp_path, capsys):
    # A named output keeps its candidates beside it under its own stem; image.png's are candidate_<k>.png.
    output = tmp_path / "teapot.png"
    assert main(["image", "a red teapot", "--tiny", "-o", str(output), "--candidates", "3", "--seed", "5"]) == 0
    settings = json.loads(output.with_suffix(".json").read_text())
    chosen = settings["chosen"]
    paths = [tmp_path / f"teapot_candidate_{k}.png" for k in range(3)]
    pixels = [np.asarray(Image.open(p)) for p in paths]
    assert np.array_equal(pixels[chosen], np.asarray(Image.open(output)))  # image.png is the chosen candidate
    assert not np.array_equal(pixels[0], pixels[1])  # each candidate its own seed
    out = capsys.readouterr().out
    assert "wrote 5 files" in out and f"chose candidate {chosen} of 3 (" in out and "best score" in out

    folder = tmp_path / "out"
    assert main(["image", "a red teapot", "--tiny", "-o", f"{folder}/", "--candidates", "2", "--choose", "1"]) == 0
    assert sorted(p.name for p in folder.glob("*.png")) == ["candidate_0.png", "candidate_1.png", "image.png"]
    assert np.array_equal(
        np.asarray(Image.open(folder / "candidate_1.png")), np.asarray(Image.open(folder / "image.png"))
    )
    assert "chose candidate 1 of 2 (" in capsys.readouterr().out  # --choose is named too
