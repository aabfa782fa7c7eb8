"""t2mv-mesh (t2mv.mesh_cli) in smoke mode: files, colours, orientation, options, errors, atomic output."""

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from t2mv import mesh_cli as cli
from triposr import mesh as tmesh
from triposr.export import load_mesh
from triposr.system import TSR

FAST = ["--tiny", "--mc-resolution", "32", "--device", "cpu"]


def rgba_image(path, color=(200, 60, 60), size=(80, 64)):
    """A cut-out (alpha) of a disc and a bar: no background removal needed."""
    image = Image.new("RGBA", size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.ellipse((10, 8, 58, 56), fill=(*color, 255))
    draw.rectangle((50, 20, 75, 30), fill=(40, 90, 200, 255))
    image.save(path)
    return path


def tiny_field(input_png):
    """The field the CLI meshed: TSR.tiny(seed=0) on the saved model input."""
    model = TSR.tiny(seed=0)
    with torch.no_grad():
        scene_code = model([Image.open(input_png).convert("RGB")])[0]
    return tmesh.scene_code_query_fn(model, scene_code)


def test_help_shows_defaults_under_the_chains_names(capsys):
    assert cli.main(["--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for expected in (
        "(default: 256;",
        "(default: 25.0;",
        "(default: 1024;",
        "(default: 0.85;",
        "(default: glb obj ply)",
    ):
        assert expected in text
    flags = ("--bake-texture", "--no-remove-bg", "--keep-largest", "--simplify", "--tiny", "--mesh-foreground-ratio")
    for flag in (*flags, "--mc-resolution", "--mc-threshold", "--triposr-model", "--dtype", "--local-files-only"):
        assert flag in text
    for old in ("--bake ", "--no-rembg", "--resolution", "--threshold", "--output-dir", "--model ", "--seed"):
        assert old not in text.replace("--mc-resolution", "").replace("--mc-threshold", "")


def test_smoke_all_formats_with_colors_in_documented_orientation(tmp_path, capsys):
    image = rgba_image(tmp_path / "red thing.png")
    out = tmp_path / "out"
    flags = ["--format", "glb,obj", "-f", "ply", "--mc-threshold", "25", "--mesh-foreground-ratio", "0.7"]
    assert cli.main([*FAST, str(image), "-o", str(out), *flags]) == 0
    captured = capsys.readouterr()
    assert "SMOKE MODE" in captured.err and "NOISE" in captured.err
    assert "extract_mesh" in captured.out and "1/1 meshes" in captured.out
    folder = out / "red thing"
    names = sorted(p.name for p in folder.iterdir())
    chain_files = ["image.png", "info.json", "mesh_input.png", "settings.json", "timings.json"]
    assert names == sorted([*chain_files, "mesh.glb", "mesh.obj", "mesh.ply"])
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no leftover temporary folders
    settings = json.loads((folder / "settings.json").read_text())
    assert settings["mc_resolution"] == 32 and settings["stages"] == ["mesh"] and settings["input"] == "image"
    assert json.loads((folder / "timings.json").read_text())["timings"]["mesh.model"] >= 0
    info = json.loads((folder / "info.json").read_text())["mesh"]
    assert info["faces"] == len(load_mesh(folder / "mesh.glb").faces)

    # --mesh-foreground-ratio reached the preprocessing: the object spans 0.7 of the input's side (0.85 by default).
    model_input = np.asarray(Image.open(folder / "mesh_input.png").convert("RGB")).astype(int)  # (512, 512, 3)
    rows, cols = np.nonzero(np.abs(model_input - 127).max(axis=-1) > 2)  # not the 0.5-grey background
    assert abs(max(np.ptp(rows), np.ptp(cols)) / 512 - 0.7) < 0.02

    field = tiny_field(folder / "mesh_input.png")
    glb = load_mesh(folder / "mesh.glb")
    for fmt in ("glb", "obj", "ply"):
        mesh = load_mesh(folder / f"mesh.{fmt}")
        assert mesh.visual.kind == "vertex" and len(mesh.faces) == len(glb.faces)
        np.testing.assert_allclose(mesh.vertices, glb.vertices, atol=1e-5)
        assert np.abs(mesh.visual.vertex_colors.astype(int) - glb.visual.vertex_colors.astype(int)).max() <= 1
    # Orientation: the files hold export-frame vertices; mapped back to the model frame they lie on the density-25
    # surface of the field, and their colours are the field's colours there.
    # (Marching cubes interpolates the exponential density linearly, so at 32^3 vertices sit a little inside.)
    exported = torch.from_numpy(np.asarray(glb.vertices, dtype=np.float32))
    with torch.no_grad():
        values = field(tmesh.export_to_native(exported))
        # Files in upstream's CLI frame (native) or app frame ((x, y, z) -> (-y, z, -x), inverted here) would pass:
        app_to_native = torch.stack([-exported[:, 2], -exported[:, 0], exported[:, 1]], dim=-1)
        other_frames = [field(exported), field(app_to_native)]
    assert (values["density_act"].log() - np.log(25.0)).abs().median() < 0.3
    for wrong in other_frames:
        assert (wrong["density_act"].log() - np.log(25.0)).abs().median() > 1.0
    colors = glb.visual.vertex_colors[:, :3] / 255.0
    assert np.abs(colors - values["color"].numpy()).max() < 1 / 255 + 1e-3


def test_bake_keep_largest_simplify(tmp_path):
    image = rgba_image(tmp_path / "a.png")
    out = tmp_path / "out"
    argv = [*FAST, str(image), "-o", str(out), "-f", "glb,obj", "--bake-texture", "--texture-size", "512"]
    assert cli.main([*argv, "--keep-largest", "--simplify", "600"]) == 0
    folder = out / "a"
    assert {"mesh.glb", "mesh.obj", "mesh.mtl", "mesh.png"} <= {p.name for p in folder.iterdir()}
    glb = load_mesh(folder / "mesh.glb")
    assert glb.visual.kind == "texture" and glb.visual.material.baseColorTexture.size == (512, 512)
    assert len(glb.faces) <= 600  # (a baked mesh is cut along its UV seams: its parts are not counted here)
    obj = load_mesh(folder / "mesh.obj")
    assert obj.visual.kind == "texture" and obj.visual.material.image.size == (512, 512)

    # --keep-largest alone against the same run without it: the noise field meshes into several parts, and the
    # one kept is the part with the most faces, unchanged.
    for name, flags in (("plain", []), ("largest", ["--keep-largest"])):
        assert cli.main([*FAST, str(image), "-o", str(tmp_path / name), "-f", "ply", *flags]) == 0
    parts = load_mesh(tmp_path / "plain" / "a" / "mesh.ply").split(only_watertight=False)
    largest = max(parts, key=lambda part: len(part.faces))
    kept = load_mesh(tmp_path / "largest" / "a" / "mesh.ply")
    assert len(parts) > 1 and len(kept.split(only_watertight=False)) == 1
    assert len(kept.faces) == len(largest.faces) < sum(len(part.faces) for part in parts)
    np.testing.assert_allclose(np.sort(kept.vertices, axis=0), np.sort(largest.vertices, axis=0), atol=1e-6)


def test_folder_input_and_duplicate_names(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rgba_image(folder / "x.png")
    rgba_image(folder / "y.png", color=(30, 160, 60))
    (folder / "notes.txt").write_text("not an image, ignored in folders")
    other = tmp_path / "other"
    other.mkdir()
    rgba_image(other / "x.png")
    out = tmp_path / "out"
    auto = [*FAST[:-2], "--device", "auto"]  # "auto" = no --device: CUDA when available
    assert cli.main([*auto, str(folder), str(other / "x.png"), "-o", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["x", "x_2", "y"]
    assert (out / "x_2" / "mesh.glb").is_file()


@pytest.mark.parametrize("content", [b"this is not a png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_broken_image_is_a_clear_error_before_any_work(tmp_path, capsys, content):
    bad = tmp_path / "broken.png"
    bad.write_bytes(content)
    good = rgba_image(tmp_path / "good.png")
    assert cli.main([*FAST, str(good), str(bad), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "not an image" in err and "broken.png" in err and "SMOKE" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--mc-resolution", "16"], "--mc-resolution must be an integer in [32, 512]"),
        (["--texture-size", "8192"], "--texture-size must be an integer in [512, 4096]"),
        (["--format", "fbx"], "unknown mesh format 'fbx'"),
        (["--mesh-foreground-ratio", "0"], "--mesh-foreground-ratio"),
        (["--simplify", "2"], "--simplify"),
        (["--mc-threshold", "nan"], "--mc-threshold must be a finite number"),
        (["--resolution", "64"], "--resolution is now --mc-resolution"),
        (["--device", "nonsense"], "--device 'nonsense' is not a device"),
    ],
)
def test_bad_options(tmp_path, capsys, extra, message):
    image = rgba_image(tmp_path / "a.png")
    assert cli.main([*FAST, str(image), "-o", str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_missing_path(tmp_path, capsys):
    assert cli.main([*FAST, str(tmp_path / "nope.png")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_missing_weights_is_a_clear_error(tmp_path, capsys):
    image = rgba_image(tmp_path / "a.png")
    missing = tmp_path / "no-model-here"
    missing.mkdir()
    argv = [str(image), "--triposr-model", str(missing), "-o", str(tmp_path / "out"), "--device", "cpu"]
    assert cli.main([*argv, "--local-files-only"]) == 3
    err = capsys.readouterr().err
    assert "config.yaml" in err and str(missing) in err


def test_failure_leaves_nothing_half_written(tmp_path, capsys):
    good = rgba_image(tmp_path / "good.png")
    out = tmp_path / "out"
    # No surface at this threshold: the image fails after preprocessing and the model ran; nothing is kept.
    assert cli.main([*FAST, str(good), "-o", str(out), "--mc-threshold", "1e30"]) == 2
    assert "no surface at threshold" in capsys.readouterr().err
    assert list(out.iterdir()) == []


def test_non_square_image_without_alpha_and_no_rembg(tmp_path, capsys):
    image = tmp_path / "rgb.jpg"
    Image.new("RGB", (80, 60), (128, 128, 128)).save(image)
    assert cli.main([*FAST, str(image), "-o", str(tmp_path / "out"), "--no-remove-bg"]) == 2
    assert "square" in capsys.readouterr().err


@pytest.mark.slow
def test_real_model_front_faces_plus_z_and_image_right_is_plus_x(tmp_path):
    """With the real checkpoint (only when cached): a cube-ish cut-out, red on the image's left, blue on its right.
    The reconstructed front (+Z facing) shows red at -X and blue at +X."""
    from triposr.system import MissingWeightsError

    try:
        TSR.from_pretrained("stabilityai/TripoSR")
    except MissingWeightsError as e:
        pytest.fail(f"RUN_SLOW=1 asked for the real TripoSR, but it is not in the local cache: {e}")
    image = Image.new("RGBA", (512, 512), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.rectangle((128, 128, 255, 383), fill=(220, 30, 30, 255))
    draw.rectangle((256, 128, 383, 383), fill=(30, 30, 220, 255))
    image.save(tmp_path / "two.png")
    out = tmp_path / "out"
    assert cli.main([str(tmp_path / "two.png"), "-o", str(out), "--mc-resolution", "128", "--device", "cpu"]) == 0
    mesh = load_mesh(out / "two" / "mesh.glb")
    front = mesh.vertex_normals[:, 2] > 0.7
    rgb = mesh.visual.vertex_colors[:, :3].astype(float)
    redness = rgb[:, 0] - rgb[:, 2]
    left, right = front & (mesh.vertices[:, 0] < -0.05), front & (mesh.vertices[:, 0] > 0.05)
    assert left.sum() > 20 and right.sum() > 20
    assert redness[left].mean() > 50 and redness[right].mean() < -50


def test_rembg_unavailable_is_a_clear_error(tmp_path, capsys, monkeypatch):
    import rembg

    def no_session(*args, **kwargs):
        raise ConnectionError("offline: cannot download u2net.onnx")

    monkeypatch.setattr(rembg, "new_session", no_session)
    image = tmp_path / "rgb.png"
    Image.new("RGB", (64, 64), (10, 200, 10)).save(image)
    argv = [str(image), "-o", str(tmp_path / "out"), "--mc-resolution", "32", "--device", "cpu"]
    monkeypatch.setattr(TSR, "from_pretrained", classmethod(lambda cls, *a, **k: TSR.tiny()))
    assert cli.main(argv) == 3  # missing weights (u2net), found before the model loads
    err = capsys.readouterr().err
    assert "background-removal model u2net" in err and "--no-remove-bg" in err and "offline" in err
