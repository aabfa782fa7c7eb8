"""The Gradio app (`t2mv.app`) in smoke mode: clear messages for bad input (handler and live server), uploads keep
their alpha, sliders read the settings' bounds, --share needs a login, request folders are cleaned, files are
readable, uploads are size-limited, and late failures keep the finished stages."""

import ast
import json
import os
import socket
import stat
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
import trimesh
from gradio.data_classes import FileData
from PIL import Image
from test_cli import _object_side

import t2mv.app as app
from t2mv.chain import TextTo3D
from t2mv.settings import GenerationSettings

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models on 2 shared cores: 1 thread is ~10x faster

REPO = Path(__file__).resolve().parents[1]
DEFAULTS = {
    "prompt": "a red teapot",
    "negative_prompt": "",
    "seed": 1,
    "randomize_seed": False,
    "image": None,
    "t2i_steps": 4,
    "t2i_guidance": 4.5,
    "mv_steps": 4,
    "mv_guidance": 1.0,
    "remove_background": True,
    "mv_foreground_ratio": 0.75,
    "mesh_foreground_ratio": 0.85,
    "mc_resolution": 32,
    "mc_threshold": 25.0,
    "texture_source": "views",
    "refine": False,
    "refine_iterations": 20,
    "bake_texture": False,
    "texture_size": 512,
    "simplify_faces": 0,
    "candidates": 1,
    "turntable": False,
    "upscale": 0,
}
OUT = {name: i for i, name in enumerate(app.OUTPUTS)}


def forged_png(path, width, height):
    """A PNG whose header claims width × height (nothing decodable behind it)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"") + chunk(b"IEND", b""))
    return str(path)


def cut_out(path, size=80):
    """An RGBA cut-out: a red square on a fully transparent background."""
    image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    image.paste((200, 40, 40, 255), (size // 4, size // 5, 3 * size // 4, 4 * size // 5))
    image.save(path)
    return str(path)


def call(generate, **overrides):
    return generate(**{**DEFAULTS, **overrides})


class NoRembg:
    """A background remover that must not run (the upload's alpha is the mask)."""

    def predict(self, *args, **kwargs):
        raise AssertionError("rembg ran on an image that has its own alpha")


@pytest.fixture(scope="module")
def mesh_chain():
    return TextTo3D.tiny(stages=("mesh",))


@pytest.fixture(scope="module")
def t2i_chain():
    return TextTo3D.tiny(stages=("text_to_image",))


@pytest.fixture(scope="module")
def views_and_mesh_chain():
    return TextTo3D.tiny(stages=("multiview", "mesh"))


@pytest.fixture
def toasts(monkeypatch):
    shown = []
    monkeypatch.setattr(gr, "Warning", lambda message, *a, **k: shown.append(message))
    return shown


def test_import_has_no_side_effects(tmp_path):
    code = (
        "import sys, os, app, t2mv.app; assert 'gradio' not in sys.modules; "
        "assert 'GRADIO_ANALYTICS_ENABLED' not in os.environ; assert app.main is t2mv.app.main"
    )
    env = {k: v for k, v in os.environ.items() if k != "GRADIO_ANALYTICS_ENABLED"}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not (REPO / "app.pyi").exists() and not (REPO / "t2mv" / "app.pyi").exists()


def _imports(path):
    """Every module a file imports, at any depth (function-level imports included), relative ones resolved."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ("t2mv." if node.level else "") + (node.module or "")
            found.add(base.rstrip("."))
    return found


def test_no_import_circle_between_the_app_and_the_cli():
    """The UI is `t2mv.app`, app.py a shell over it: nothing in the package reaches back up to app.py, and the app
    takes the shared CLI parts from `t2mv.cli_common`, never from `t2mv.cli` (which runs `t2mv app`)."""
    assert _imports(REPO / "app.py") == {"sys", "t2mv.app"}
    assert "t2mv.cli" not in _imports(REPO / "t2mv" / "app.py")  # the shared CLI parts come from t2mv.cli_common
    for module in sorted((REPO / "t2mv").rglob("*.py")):
        assert "app" not in _imports(module), f"{module.relative_to(REPO)} imports the top-level app.py"


def test_prompt_checks(t2i_chain, tmp_path, toasts):
    generate = app.make_generate(t2i_chain, tmp_path)
    for empty in ("", "   ", None):
        with pytest.raises(gr.Error, match="Enter a prompt"):
            call(generate, prompt=empty)
    with pytest.raises(gr.Error, match="at most 2000"):
        call(generate, prompt="a" * 2001)
    out = call(generate, prompt=" ".join(["teapot"] * 60))  # > 77 CLIP tokens: generated, with a warning
    assert Image.open(out[OUT["image"]]).size == (64, 64)
    assert out[OUT["normals"]] == [] and out[OUT["mesh"]] is None and out[OUT["downloads"]] == []
    assert any("tokens" in message and "CLIP" in message for message in toasts)
    assert all("SMOKE MODE" not in message for message in toasts)  # the page shows that one permanently


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"seed": -1}, r"Seed must be an integer in \[0, 4294967295\], got -1"),
        ({"seed": 2**40}, "Seed must be"),
        ({"seed": None}, "Seed is missing"),
        ({"t2i_steps": 2.5}, "Text-to-image steps must be an integer"),
        ({"mv_steps": 1000}, r"Multiview steps must be an integer in \[4, 100\]"),
        ({"mv_steps": 2}, r"Multiview steps must be an integer in \[4, 100\]"),  # no silent raise to 4
        ({"t2i_guidance": float("nan")}, "Text-to-image CFG must be a finite number"),
        ({"mv_guidance": "lots"}, "Multiview CFG"),
        ({"mc_resolution": 9999}, r"Marching-cubes resolution must be an integer in \[32, 512\]"),
        ({"mc_threshold": float("inf")}, "Density threshold must be a finite number"),
        ({"texture_size": 8}, "Texture size"),
        ({"simplify_faces": -5}, "Simplify"),
        ({"mesh_foreground_ratio": 3.0}, r"Foreground ratio \(mesh\)"),
        ({"t2i_guidance": 99.0}, r"Text-to-image CFG must be a finite number in \[0, 30\]"),
    ],
)
def test_out_of_range_numbers_name_the_control(t2i_chain, tmp_path, overrides, match):
    with pytest.raises(gr.Error, match=match):
        call(app.make_generate(t2i_chain, tmp_path), **overrides)
    assert not list(tmp_path.iterdir())  # rejected before any request folder was made


def test_sliders_allow_exactly_what_the_settings_allow(mesh_chain, tmp_path):
    demo = app.build_demo(mesh_chain, output_dir=tmp_path)
    specs = GenerationSettings.bounds()
    assert list(demo.t2mv_controls) == list(app.SETTING_CONTROLS)
    sliders = 0
    for name, control in demo.t2mv_controls.items():
        spec = specs[name]
        assert control.label == spec.label and control.value == getattr(mesh_chain.defaults, name)
        if isinstance(control, gr.Slider):
            sliders += 1
            assert (control.minimum, control.maximum) == (spec.low, spec.high), name
        elif isinstance(control, gr.Number) and spec.low is not None:
            assert control.minimum == (0 if spec.zero_allowed else spec.low), name
    assert sliders >= 8
    assert demo.t2mv_controls["mc_resolution"].maximum == 512 and demo.t2mv_controls["mv_steps"].minimum == 4


def test_bad_uploads(mesh_chain, tmp_path):
    generate = app.make_generate(mesh_chain, tmp_path / "runs")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(gr.Error, match="not an image"):
        call(generate, image=str(tmp_path / "notes.png"), prompt="")
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    with pytest.raises(gr.Error, match="at least 16 pixels"):
        call(generate, image=str(tmp_path / "dot.png"), prompt="")
    with pytest.raises(gr.Error, match="pixels"):
        call(generate, image=forged_png(tmp_path / "huge.png", 20000, 20000), prompt="")
    Image.new("RGBA", (64, 64), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    with pytest.raises(gr.Error, match="fully transparent"):
        call(generate, image=str(tmp_path / "clear.png"), prompt="")
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_the_upload_component_keeps_alpha_and_the_original_file(tmp_path):
    """gradio's Image in RGB mode re-encodes uploads without alpha; ours passes the file on untouched."""
    component = app._checked_image(label="in")
    path = cut_out(tmp_path / "cut.png")
    received = component.preprocess(FileData(path=path, orig_name="cut.png"))
    with Image.open(received) as image:
        assert image.mode == "RGBA" and image.getchannel("A").getextrema() == (0, 255)
    bomb = forged_png(tmp_path / "bomb.png", 30000, 30000)  # beyond what PIL opens at all
    with pytest.raises(gr.Error, match="too large"):
        component.preprocess(FileData(path=bomb, orig_name="bomb.png"))
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(gr.Error, match="not an image"):
        component.preprocess(FileData(path=str(tmp_path / "notes.png"), orig_name="notes.png"))


def test_a_cut_out_skips_background_removal(views_and_mesh_chain, tmp_path, monkeypatch, toasts):
    monkeypatch.setattr(views_and_mesh_chain, "_rembg_session", NoRembg())
    generate = app.make_generate(views_and_mesh_chain, tmp_path)
    ratios = {"mv_foreground_ratio": 0.5, "mesh_foreground_ratio": 0.6}  # not the defaults, 0.75 and 0.85
    out = call(generate, image=cut_out(tmp_path / "cut.png"), prompt="", **ratios)
    status = out[OUT["status"]]
    assert "transparency was used" in status and "background removal skipped" in status
    settings = (Path(out[OUT["mesh"]]).parent / "settings.json").read_text()
    assert '"object_mask": "input alpha"' in settings and '"remove_background": false' in settings
    with Image.open(out[OUT["image"]]) as kept:
        assert kept.mode == "RGBA"  # the input image is shown (and saved) with its alpha
    assert len(out[OUT["normals"]]) == 6 and len(trimesh.load(out[OUT["mesh"]], force="mesh").faces) > 0
    # The page's ratios reached the preprocessing (issue 20, item 8): the object spans that share of each input.
    assert abs(_object_side(out[OUT["mv_input"]], 255, 256) - 0.5) < 0.02
    assert abs(_object_side(out[OUT["mesh_input"]], 127, 512) - 0.6) < 0.02


@pytest.mark.parametrize("mode", ["L", "CMYK", "P"])
def test_uploads_in_other_modes_are_converted(mesh_chain, tmp_path, toasts, mode):
    image = Image.new("RGB", (80, 80), (255, 255, 255))
    image.paste((200, 40, 40), (20, 15, 60, 70))
    image = image.convert(mode)
    path = tmp_path / ("in.jpg" if mode == "CMYK" else "in.png")
    image.save(path)
    out = call(app.make_generate(mesh_chain, tmp_path / "runs"), image=str(path), prompt="")
    assert Image.open(out[OUT["mesh_input"]]).size == (512, 512)
    assert len(trimesh.load(out[OUT["mesh"]], force="mesh").faces) > 0
    assert {Path(p).name for p in out[OUT["downloads"]]} == {"mesh.glb", "mesh_obj.zip", "mesh.ply", "mesh.stl"}
    assert out[OUT["seed"]] == 1 and "Background: background removed" in out[OUT["status"]]
    assert not toasts


def test_timings_are_a_table_and_files_are_readable(mesh_chain, tmp_path, toasts):
    image = tmp_path / "in.png"
    Image.new("RGB", (64, 64), (90, 90, 200)).save(image)
    out = call(app.make_generate(mesh_chain, tmp_path / "runs"), image=str(image), prompt="")
    table = out[OUT["timings"]]
    assert table["headers"] == app.TIMING_HEADERS
    stages = [row[0] for row in table["data"]]
    assert stages == ["preprocess", "mesh", "total"] and all(row[1] >= 0 for row in table["data"])
    assert table["data"][-1][1] > 0
    folder = Path(out[OUT["mesh"]]).parent
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*")}
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert {"mesh.glb", "mesh.ply", "mesh.obj", "mesh_obj.zip", "image.png", "settings.json"} <= set(modes)
    assert all(mode == 0o644 for mode in modes.values()), modes


def test_each_request_gets_its_own_folder_and_random_seeds(mesh_chain, t2i_chain, tmp_path, toasts):
    generate = app.make_generate(mesh_chain, tmp_path)
    image = tmp_path / "in.png"
    Image.new("RGB", (64, 64), (90, 90, 200)).save(image)
    first = call(generate, image=str(image), randomize_seed=True)
    second = call(generate, image=str(image), randomize_seed=True)
    assert Path(first[OUT["mesh"]]).parent != Path(second[OUT["mesh"]]).parent
    assert Path(first[OUT["mesh"]]).parent.parent == tmp_path
    seeds = [out[OUT["seed"]] for out in (first, second)]
    assert all(isinstance(seed, int) and 0 <= seed <= 2**32 - 1 for seed in seeds)
    # Drawn, not the page's seed (1): two uniform draws from 2^32 values collide with probability 2.3e-10.
    assert seeds[0] != seeds[1]
    for out, seed in zip((first, second), seeds):
        assert json.loads((Path(out[OUT["mesh"]]).parent / "settings.json").read_text())["seed"] == seed
    assert toasts[0].startswith("An image was uploaded, so the prompt is not used")

    # The seed shown is the one the image was made with: asking for it again gives the same image.
    generate = app.make_generate(t2i_chain, tmp_path)
    drawn = call(generate, randomize_seed=True)
    again = call(generate, seed=drawn[OUT["seed"]])
    assert again[OUT["seed"]] == drawn[OUT["seed"]]
    assert np.array_equal(np.asarray(Image.open(drawn[OUT["image"]])), np.asarray(Image.open(again[OUT["image"]])))


def test_old_request_folders_are_cleaned_and_nothing_else(mesh_chain, tmp_path, toasts):
    root = tmp_path / "runs"
    mine = [app.new_request_folder(root) for _ in range(3)]
    old = time.time() - 3 * 3600
    os.utime(mine[0], (old, old))
    (root / "user-notes").mkdir()  # not made by the app: never touched
    (root / "run-by-hand").mkdir()
    deleted = app.clean_request_folders(root, max_age_s=3600, max_count=10)
    assert deleted == [mine[0]] and not mine[0].exists() and mine[1].exists()

    image = tmp_path / "in.png"
    Image.new("RGB", (64, 64), (90, 90, 200)).save(image)
    generate = app.make_generate(mesh_chain, root, keep_requests=2, keep_hours=1.0)
    for _ in range(3):
        out = call(generate, image=str(image), prompt="")
    kept = sorted(p.name for p in root.iterdir() if (p / app.REQUEST_MARKER).exists())
    assert len(kept) == 2 and Path(out[OUT["mesh"]]).parent.name in kept
    assert (root / "user-notes").is_dir() and (root / "run-by-hand").is_dir()


class _Raising:
    defaults = GenerationSettings.smoke()

    def __init__(self, error):
        self.error = error

    def __call__(self, *args, **kwargs):
        raise self.error


def test_out_of_gpu_memory_and_failures_become_one_message(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(gr.Error, match="--offload"):
        call(app.make_generate(_Raising(oom), tmp_path))
    with pytest.raises(gr.Error, match="Generation failed .*something unexpected") as info:
        call(app.make_generate(_Raising(RuntimeError("something\nunexpected\n  at line 3")), tmp_path))
    assert "\n" not in str(info.value) and "Traceback" not in str(info.value)
    assert not list(tmp_path.iterdir())  # the empty request folders are gone


def test_a_late_failure_keeps_the_finished_stages(views_and_mesh_chain, tmp_path, monkeypatch, toasts):
    def no_surface(*args, **kwargs):
        raise ValueError("no surface found at threshold 25.0; lower the density threshold")

    monkeypatch.setattr(views_and_mesh_chain.reconstructor, "extract_mesh", no_surface)
    # The app has no control for the multiview preprocessing: the chain's default is the one used.
    perflow = views_and_mesh_chain.defaults.with_changes(mv_preprocess="perflow")
    monkeypatch.setattr(views_and_mesh_chain, "defaults", perflow)
    image = tmp_path / "in.png"
    Image.new("RGB", (64, 64), (90, 90, 200)).save(image)
    out = call(app.make_generate(views_and_mesh_chain, tmp_path / "runs"), image=str(image), prompt="")
    assert "The mesh stage failed" in out[OUT["status"]] and "no surface" in out[OUT["status"]]
    assert len(out[OUT["normals"]]) == 6 and len(out[OUT["colors"]]) == 6 and out[OUT["mesh"]] is None
    assert [Path(p).name for p in out[OUT["downloads"]]] == ["multiview.zip"]
    assert (Path(out[OUT["image"]]).parent / "FAILED.json").is_file()
    assert toasts and "mesh stage failed" in toasts[-1]
    # perflow resizes the whole (flat) image to 256²; wonder3d would centre it at 0.75 in a white frame.
    assert _object_side(out[OUT["mv_input"]], 255, 256) == 1.0


def test_missing_background_removal_weights_offline(tmp_path, monkeypatch):
    import rembg

    chain = TextTo3D.tiny(stages=("mesh",))
    chain.smoke, chain._rembg_session = False, None  # as a real chain before its first request

    def offline(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'github.com'")

    monkeypatch.setattr(rembg, "new_session", offline)
    image = tmp_path / "in.png"
    Image.new("RGB", (64, 64), (90, 90, 200)).save(image)
    with pytest.raises(gr.Error, match="u2net"):
        call(app.make_generate(chain, tmp_path), image=str(image), prompt="")


def test_main_without_weights_says_how_to_fix_it(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("T2MV_SMOKE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(SystemExit) as info:
        app.main(["--port", "0"])
    assert info.value.code == 3
    err = capsys.readouterr().err
    assert "hansyan/perflow-sd15-dreamshaper" in err and "--tiny" in err and "Traceback" not in err


@pytest.fixture
def launched(monkeypatch, mesh_chain):
    """Runs `main` up to `launch` with the smoke chain; records launch's keyword arguments instead of serving."""
    import t2mv.cli_common

    calls = {}
    monkeypatch.setattr(t2mv.cli_common, "load_chain", lambda args, stages: calls.setdefault("chain", mesh_chain))
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: calls.update(launch=kwargs))
    monkeypatch.delenv(app.AUTH_ENV, raising=False)
    return calls


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--share"], "--auth USER:PASSWORD"),
        (["--share", "--auth", "nocolon"], "USER:PASSWORD"),
        (["--auth", ":secret"], "USER:PASSWORD"),
        (["--keep-requests", "0"], "--keep-requests"),
        (["--max-upload-mb", "-1"], "--max-upload-mb"),
    ],
)
def test_bad_app_flags_are_refused_before_loading(launched, capsys, argv, match):
    with pytest.raises(SystemExit) as info:
        app.main(["--tiny", *argv])
    assert info.value.code == 2 and "chain" not in launched and "launch" not in launched
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("t2mv app: error: ") and match in err[0]


def test_share_with_a_login_and_the_upload_limit_reach_launch(launched, capsys, tmp_path, monkeypatch):
    assert app.main(["--tiny", "--share", "--auth", "ann:pa:ss", "--max-upload-mb", "2", "--output", "o"]) == 0
    options = launched["launch"]
    assert options["share"] is True and options["auth"] == ("ann", "pa:ss")
    assert options["max_file_size"] == 2 * 1024 * 1024 and options["allowed_paths"] == ["o"]
    monkeypatch.setenv(app.AUTH_ENV, "bob:secret")  # the password kept out of the process list
    assert app.main(["--tiny", "--share"]) == 0 and launched["launch"]["auth"] == ("bob", "secret")
    monkeypatch.delenv(app.AUTH_ENV)
    assert app.main(["--tiny", "--share", "--i-know"]) == 0 and launched["launch"]["auth"] is None
    assert "WITHOUT a login" in capsys.readouterr().err


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_live_server_reports_bad_input_keeps_alpha_and_keeps_serving(tmp_path):
    from gradio_client import Client, handle_file

    chain = TextTo3D.tiny(stages=("text_to_image", "mesh"))
    chain._rembg_session = NoRembg()  # every upload below that reaches the chain has its own alpha
    demo = app.build_demo(chain, output_dir=tmp_path / "runs")
    config = str(demo.config)
    assert "SMOKE MODE" in config and "Source Sans" not in config
    assert "fonts.googleapis" not in demo.theme._get_theme_css()
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, max_file_size=200_000)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        args = list(DEFAULTS.values())
        image_at = list(DEFAULTS).index("image")

        def with_upload(path):
            return [*args[:image_at], handle_file(str(path)), *args[image_at + 1 :]]

        with pytest.raises(Exception, match="Enter a prompt"):
            client.predict(*(["", *args[1:]]), api_name="/generate")
        (tmp_path / "notes.png").write_text("not an image")
        with pytest.raises(Exception, match="not an image"):
            client.predict(*with_upload(tmp_path / "notes.png"), api_name="/generate")
        with pytest.raises(Exception, match="pixels"):
            client.predict(*with_upload(forged_png(tmp_path / "bomb.png", 20000, 20000)), api_name="/generate")
        Image.new("RGBA", (64, 64), (0, 0, 0, 0)).save(tmp_path / "clear.png")
        with pytest.raises(Exception, match="fully transparent"):
            client.predict(*with_upload(tmp_path / "clear.png"), api_name="/generate")
        big = tmp_path / "big.png"
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (400, 400, 3), dtype=np.uint8)).save(big)
        assert big.stat().st_size > 200_000
        with pytest.raises(Exception, match="(?i)size"):
            client.predict(*with_upload(big), api_name="/generate")
        mc = list(DEFAULTS).index("mc_resolution")
        with pytest.raises(Exception, match="Marching-cubes"):
            client.predict(*args[:mc], 5000, *args[mc + 1 :], api_name="/generate")
        out = client.predict(*with_upload(cut_out(tmp_path / "cut.png")), api_name="/generate")  # still serving
        assert len(trimesh.load(out[OUT["mesh"]], force="mesh").faces) > 0
        assert "transparency was used" in out[OUT["status"]]
        assert out[OUT["timings"]]["data"][-1][0] == "total"
    finally:
        demo.close()


def test_baked_texture_download_holds_obj_mtl_and_texture(mesh_chain, tmp_path):
    import zipfile

    image = tmp_path / "in.png"
    Image.new("RGB", (64, 64), (255, 255, 255)).save(image)
    with Image.open(image) as im:
        im.paste((200, 30, 30), (16, 16, 48, 48))
        im.save(image)
    out = call(app.make_generate(mesh_chain, tmp_path / "runs"), image=str(image), prompt="", bake_texture=True)
    obj_zip = next(p for p in out[OUT["downloads"]] if p.endswith("mesh_obj.zip"))
    with zipfile.ZipFile(obj_zip) as archive:
        names = set(archive.namelist())
        assert names == {"mesh.obj", "mesh.mtl", "mesh.png"}
        assert "map_Kd mesh.png" in archive.read("mesh.mtl").decode()
    assert trimesh.load(out[OUT["mesh"]], force="mesh").visual.kind == "texture"


def test_every_flag_start_sh_mentions_exists():
    import re

    comments = "\n".join(line for line in (REPO / "scripts" / "start.sh").read_text().splitlines() if line[:1] == "#")
    mentioned = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", comments))
    known = {flag for action in app.build_parser()._actions for flag in action.option_strings}
    assert mentioned and mentioned <= known, mentioned - known


def test_an_upload_is_turned_upright_by_its_exif_orientation(mesh_chain, tmp_path, toasts):
    """gradio used to apply EXIF orientation while re-encoding uploads; now the file arrives as is, so we do."""
    pixels = np.full((48, 96, 3), 240, np.uint8)  # (H, W, 3): a blue block near the top-left corner
    pixels[10:38, 10:40] = (30, 30, 200)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    Image.fromarray(pixels).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    out = call(app.make_generate(mesh_chain, tmp_path / "runs"), image=str(tmp_path / "phone.jpg"), prompt="")
    shown = np.asarray(Image.open(out[OUT["image"]]).convert("RGB"), dtype=np.float64)
    upright, wrong_way = np.rot90(pixels, -1), np.rot90(pixels, 1)  # clockwise (numpy's k<0), anticlockwise
    assert shown.shape == upright.shape
    assert np.abs(shown - upright).mean() < 3.0 < 20.0 < np.abs(shown - wrong_way).mean()


def test_the_app_starts_without_u2net_and_says_what_still_works(launched, monkeypatch, capsys):
    import rembg

    import t2mv.cli_common

    chain = TextTo3D.tiny(stages=("mesh",))
    chain.smoke, chain._rembg_session = False, None  # as a real chain: u2net is loaded at start-up

    def offline(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'github.com'")

    monkeypatch.setattr(rembg, "new_session", offline)
    monkeypatch.setattr(t2mv.cli_common, "load_chain", lambda args, stages: chain)
    assert app.main(["--tiny"]) == 0 and "launch" in launched
    err = capsys.readouterr().err
    assert "warning:" in err and "u2net" in err and "transparent background" in err


def test_views_textured_mesh_with_the_field_mesh_to_compare_and_the_fit_table(tmp_path):
    """The page gets the views-textured GLB, the field-coloured GLB for the toggle, and the per-view fit table."""
    from test_chain_views import ViewsStage, ellipsoid, object_image, render_normals, render_views

    chain = TextTo3D.tiny(seed=0, stages=("multiview", "mesh"))
    chain.reconstructor.extract_mesh = lambda *args, **kwargs: [ellipsoid()]
    field = chain(image=object_image(), texture_source="field", remove_background=False)
    size = chain._multiview_size()
    chain.multiview = ViewsStage(chain.multiview, render_views(field.mesh, size), render_normals(field.mesh, size))
    path = tmp_path / "object.png"
    object_image().save(path)
    out = call(app.make_generate(chain, tmp_path / "runs"), image=str(path), prompt="", remove_background=False)
    glb, field_glb, report = out[OUT["mesh"]], out[OUT["field_mesh"]], out[OUT["view_report"]]
    assert glb.endswith("mesh.glb") and field_glb.endswith("mesh_field.glb")
    assert trimesh.load(glb, force="mesh").visual.kind == "texture"
    rows = {row[0]: row for row in report}
    assert list(rows)[:6] == ["front", "front_right", "right", "back", "left", "front_left"]
    assert all(rows[v][1] > 0.9 for v in list(rows)[:6]) and rows["coverage (all views)"][2] > 0.8
    assert "textured from the six views" in out[OUT["status"]]
    # field colours only: no comparison mesh, an empty table, and the status says so
    out = call(app.make_generate(chain, tmp_path / "runs"), image=str(path), prompt="", texture_source="field")
    assert out[OUT["field_mesh"]] is None and out[OUT["view_report"]] == []
    assert "TripoSR's field" in out[OUT["status"]]


def _event_chain(demo, trigger_id, event):
    """The functions an event runs, in order: the one it triggers, then each `.then` after it."""
    deps = demo.config["dependencies"]
    current = next(d for d in deps if [trigger_id, event] in [list(t) for t in d["targets"]])
    chain = [current]
    while True:
        after = [d for d in deps if d.get("trigger_after") == current["id"]]
        if not after:
            return [(demo.fns[d["id"]].fn, d) for d in chain]
        assert not after[0]["trigger_only_on_success"]  # runs after a failed request too
        current = after[0]
        chain.append(current)


def test_after_a_failed_request_the_status_line_no_longer_says_done(mesh_chain, tmp_path):
    """A request that fails returns no values (gradio shows the error), so the status line is set around it: while
    it runs it says so, and after a failure it says the request failed instead of the previous request's "Done"."""
    demo = app.build_demo(mesh_chain, output_dir=tmp_path)
    status_id = next(b._id for b in demo.blocks.values() if getattr(b, "elem_id", None) == "status")
    button = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "generate")
    prompt = next(b for b in demo.blocks.values() if getattr(b, "label", None) == "Prompt")
    for trigger, event in ((button._id, "click"), (prompt._id, "submit")):
        steps = _event_chain(demo, trigger, event)
        assert len(steps) == 3 and steps[1][0].__name__ == "generate"
        for failed in (True, False):
            status = "Done in 1.0 s · seed 1."  # the previous request's line
            for fn, dep in steps:
                if fn.__name__ == "generate":
                    if not failed:  # a request that succeeds sets its own line
                        status = "Done in 2.0 s · seed 2."
                    continue
                assert dep["outputs"] == [status_id]
                status = fn(*[status for _ in dep["inputs"]])
            if failed:
                assert "Done" not in status and "failed" in status, status
            else:
                assert status == "Done in 2.0 s · seed 2."


def test_candidates_gallery_then_make_3d_from_another_one(tmp_path, toasts):
    """N images in a gallery, the chosen one marked; "Make 3D" from another runs the 3D stages from it without
    making the images again; the turntable video and the STL come with the mesh."""
    chain = TextTo3D.tiny(stages=("text_to_image", "mesh"))
    out = call(app.make_generate(chain, tmp_path), prompt="a red chair", candidates=3, turntable=True)
    gallery, chosen = out[OUT["candidates"]], out[OUT["chosen"]]
    assert len(gallery) == 3 and "chosen" in gallery[chosen][1] and "score" in gallery[0][1]
    assert out[OUT["turntable"]].endswith("turntable.mp4")
    assert any(str(p).endswith("mesh.stl") for p in out[OUT["downloads"]])
    other = (chosen + 1) % 3
    make_3d = app.make_generate(chain, tmp_path, from_candidates=True)
    again = call(make_3d, prompt="a red chair", candidates=3, candidate_images=gallery, chosen_candidate=other)
    assert again[OUT["chosen"]] == other and "chosen" in again[OUT["candidates"]][other][1]
    np.testing.assert_array_equal(
        np.asarray(Image.open(again[OUT["image"]])), np.asarray(Image.open(gallery[other][0]))
    )
    assert "text_to_image" not in [row[0] for row in again[OUT["timings"]]["data"]]  # no images made again
    settings = json.loads((Path(again[OUT["image"]]).parent / "settings.json").read_text())
    assert (settings["prompt"], settings["chosen"], settings["chosen_by"]) == ("a red chair", other, "choose")
    assert len(trimesh.load(again[OUT["mesh"]], force="mesh").faces) > 0
    with pytest.raises(gr.Error, match="no candidates yet"):
        call(make_3d, prompt="a red chair", candidate_images=[], chosen_candidate=0)


def test_the_api_from_python_with_gradio_client(tmp_path):
    """docs/usage.md's recipe: the named endpoints /generate and /make_3d, called by keyword from gradio_client."""
    from gradio_client import Client, handle_file

    chain = TextTo3D.tiny(stages=("text_to_image", "mesh"))
    demo = app.build_demo(chain, output_dir=tmp_path / "runs")
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
        assert {"/generate", "/make_3d"} <= set(endpoints)
        parameters = {p["parameter_name"] for p in endpoints["/generate"]["parameters"]}
        assert {"t2i_model", "upscale"} <= parameters  # docs/usage.md's keywords
        # Keywords by the inputs' names; the settings left out keep the page's defaults.
        out = client.predict(prompt="a red chair", negative_prompt="", image=None, candidates=2, api_name="/generate")
        assert len(out[OUT["candidates"]]) == 2 and out[OUT["mesh"]].endswith(".glb")
        gallery = [{"image": handle_file(item["image"]), "caption": None} for item in out[OUT["candidates"]]]
        again = client.predict(
            prompt="a red chair",
            negative_prompt="",
            image=None,
            candidate_images=gallery,
            chosen_candidate=1,
            api_name="/make_3d",
        )
        assert again[OUT["chosen"]] == 1
        newest = max((tmp_path / "runs").glob("run-*"), key=lambda folder: folder.stat().st_mtime)
        settings = json.loads((newest / "settings.json").read_text())
        assert (settings["chosen"], settings["candidates"], settings["chosen_by"]) == (1, 2, "choose")
    finally:
        demo.close()


def _with_instaflow(chain):
    """`chain` plus the tiny rectified-flow (InstaFlow-like) text-to-image model, as ``--fast-t2i-model`` makes it."""
    from t2mv.text_to_image import TextToImage

    fast = TextTo3D(TextToImage.tiny(kind="rectified_flow"), smoke=True, model_ids={"t2i_model": "tiny-instaflow"})
    return app.with_text_to_image(chain, fast)


def _change_handler(demo, trigger):
    """The function and output components of `trigger`'s change event in `demo`."""
    fns = demo.fns.values() if isinstance(demo.fns, dict) else demo.fns
    for fn in fns:
        if (trigger._id, "change") in [tuple(target) for target in fn.targets]:
            return fn.fn, fn.outputs
    raise AssertionError("no change handler on the model choice")


def test_instaflow_is_offered_only_when_configured_and_runs_with_its_own_defaults(tmp_path, toasts):
    chain = TextTo3D.tiny(stages=("text_to_image",))
    assert app.build_demo(chain, output_dir=tmp_path).t2mv_model_choice.visible is False  # PeRFlow alone: no choice
    fast = _with_instaflow(chain)
    demo = app.build_demo(chain, output_dir=tmp_path, more_t2i=[fast])
    choice = demo.t2mv_model_choice
    labels = [c[0] for c in choice.choices]
    assert choice.visible and labels == ["PeRFlow SD1.5 (best)", "InstaFlow (fastest)"] and choice.value == labels[0]
    # Choosing a model sets the steps and guidance controls to that model kind's defaults.
    change, targets = _change_handler(demo, choice)
    assert targets == [demo.t2mv_controls["t2i_steps"], demo.t2mv_controls["t2i_guidance"]]
    assert tuple(change("InstaFlow (fastest)")) == (1, 0.0) and tuple(change("PeRFlow SD1.5 (best)")) == (4, 4.5)

    choices = app.t2i_choices(chain, [fast])
    generate = app.make_generate(chain, tmp_path, choices=choices)
    out = call(generate, t2i_model="InstaFlow (fastest)", t2i_steps=1, t2i_guidance=0.0, seed=2)
    settings = json.loads((Path(out[OUT["image"]]).parent / "settings.json").read_text())
    assert settings["models"]["t2i_model"] == "tiny-instaflow" and (
        settings["t2i_steps"],
        settings["t2i_guidance"],
    ) == (1, 0.0)
    direct = fast("a red teapot", settings=fast.defaults.with_changes(seed=2)).image  # the rectified-flow model's own
    np.testing.assert_array_equal(np.asarray(Image.open(out[OUT["image"]]).convert("RGB")), np.asarray(direct))
    with pytest.raises(gr.Error, match=r"\[4, 100\]"):  # PeRFlow keeps one step per window: 1 step is refused
        call(generate, t2i_model="PeRFlow SD1.5 (best)", t2i_steps=1, t2i_guidance=0.0)
    with pytest.raises(gr.Error, match="Unknown text-to-image model"):
        call(generate, t2i_model="Stable Cascade")
    # A rectified-flow --t2i-model alone: shown as the only choice, the settings start at its defaults.
    alone = app.build_demo(TextTo3D(fast.text_to_image, smoke=True), output_dir=tmp_path)
    assert [c[0] for c in alone.t2mv_model_choice.choices] == ["InstaFlow (fastest)"]
    assert alone.t2mv_model_choice.visible and alone.t2mv_controls["t2i_steps"].value == 1


def test_upscale_writes_and_shows_image_1024_and_low_memory_is_a_clear_error(tmp_path, toasts):
    chain = TextTo3D.tiny(stages=("text_to_image",))
    control = app.build_demo(chain, output_dir=tmp_path).t2mv_controls["upscale"]
    assert [c[1] for c in control.choices] == [0, 1024] and control.value == 0  # off / 1024
    assert call(app.make_generate(chain, tmp_path), upscale=0)[OUT["image_upscaled"]] is None
    out = call(app.make_generate(chain, tmp_path), upscale=128)  # 1024 in the UI; 128 keeps the test fast
    upscaled = out[OUT["image_upscaled"]]
    assert Path(upscaled).name == "image_128.png" and Image.open(upscaled).size == (128, 128)
    assert upscaled in [str(p) for p in out[OUT["downloads"]]]
    low_memory = TextTo3D.tiny(stages=("text_to_image",), low_memory=True)
    with pytest.raises(gr.Error, match="low-memory"):  # the chain's refusal (exit 2 on the command line), one line
        call(app.make_generate(low_memory, tmp_path), upscale=128)


def test_fast_t2i_model_flag_adds_instaflow_in_smoke_mode(tmp_path, monkeypatch):
    launched = {}
    monkeypatch.setattr(app, "build_demo", lambda chain, **kw: launched.update(kw, chain=chain) or _NoLaunch())
    assert app.main(["--tiny", "--fast-t2i-model", "XCLiu/instaflow_0_9B_from_sd_1_5", "-o", str(tmp_path)]) == 0
    (fast,) = launched["more_t2i"]
    assert app.t2i_label(fast) == "InstaFlow (fastest)" and fast.defaults.t2i_steps == 1
    assert fast.rembg_session is launched["chain"].rembg_session  # one background remover for both


def test_a_fast_t2i_model_that_is_not_rectified_flow_is_refused_before_loading(launched, capsys, tmp_path):
    folder = tmp_path / "perflow"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(SystemExit) as info:
        app.main(["--fast-t2i-model", str(folder)])
    assert info.value.code == 2 and "chain" not in launched
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a rectified-flow model" in err[0]


class _NoLaunch:
    t2mv_output_root = None

    def launch(self, **kwargs):
        pass
