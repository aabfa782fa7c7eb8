"""The Gradio app in smoke mode: bad input gives clear messages (handler and live server) and it keeps serving."""

import os
import socket
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
import trimesh
from PIL import Image

import app
from t2mv.chain import TextTo3D

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
    "bake_texture": False,
    "texture_size": 512,
    "simplify_faces": 0,
}


def forged_png(path, width, height):
    """A PNG whose header claims width × height (nothing decodable behind it)."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"") + chunk(b"IEND", b""))
    return str(path)


def call(generate, **overrides):
    return generate(**{**DEFAULTS, **overrides})


@pytest.fixture(scope="module")
def mesh_chain():
    return TextTo3D.tiny(stages=("mesh",))


@pytest.fixture(scope="module")
def t2i_chain():
    return TextTo3D.tiny(stages=("text_to_image",))


@pytest.fixture
def toasts(monkeypatch):
    shown = []
    monkeypatch.setattr(gr, "Warning", lambda message, *a, **k: shown.append(message))
    return shown


def test_import_has_no_side_effects(tmp_path):
    code = (
        "import sys, os, app; assert 'gradio' not in sys.modules; assert 'GRADIO_ANALYTICS_ENABLED' not in os.environ"
    )
    env = {k: v for k, v in os.environ.items() if k != "GRADIO_ANALYTICS_ENABLED"}
    env["PYTHONPATH"] = str(REPO)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert not (REPO / "app.pyi").exists()


def test_prompt_checks(t2i_chain, tmp_path, toasts):
    generate = app.make_generate(t2i_chain, tmp_path)
    for empty in ("", "   ", None):
        with pytest.raises(gr.Error, match="Enter a prompt"):
            call(generate, prompt=empty)
    with pytest.raises(gr.Error, match="at most 2000"):
        call(generate, prompt="a" * 2001)
    out = call(generate, prompt=" ".join(["teapot"] * 60))  # > 77 CLIP tokens: generated, with a warning
    assert Image.open(out[0]).size == (64, 64)
    assert out[3] == [] and out[5] is None and out[6] == []  # no multiview or mesh stage in this chain
    assert any("tokens" in message and "CLIP" in message for message in toasts)
    assert all("SMOKE MODE" not in message for message in toasts)  # the page shows that one permanently


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"seed": -1}, "Seed"),
        ({"seed": 2**40}, "Seed"),
        ({"seed": None}, "Seed is missing"),
        ({"t2i_steps": 2.5}, "Text-to-image steps"),
        ({"mv_steps": 1000}, "Multiview steps"),
        ({"t2i_guidance": float("nan")}, "finite"),
        ({"mv_guidance": "lots"}, "must be a number"),
        ({"mc_resolution": 9999}, "Marching-cubes resolution"),
        ({"texture_size": 8}, "Texture size"),
        ({"simplify_faces": -5}, "Simplify"),
        ({"mesh_foreground_ratio": 3.0}, "mesh_foreground_ratio must be in"),
        ({"t2i_guidance": 99.0}, "t2i_guidance must be in"),
    ],
)
def test_out_of_range_numbers(t2i_chain, tmp_path, overrides, match):
    with pytest.raises(gr.Error, match=match):
        call(app.make_generate(t2i_chain, tmp_path), **overrides)


def test_bad_uploads(mesh_chain, tmp_path):
    generate = app.make_generate(mesh_chain, tmp_path)

    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(gr.Error, match="not an image"):
        call(generate, image=str(tmp_path / "notes.png"), prompt="")
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    with pytest.raises(gr.Error, match="at least 16 pixels"):
        call(generate, image=str(tmp_path / "dot.png"), prompt="")
    with pytest.raises(gr.Error, match="too large"):
        call(generate, image=forged_png(tmp_path / "huge.png", 20000, 20000), prompt="")


@pytest.mark.parametrize("mode", ["L", "CMYK", "RGBA", "P"])
def test_uploads_in_other_modes_are_converted(mesh_chain, tmp_path, toasts, mode):
    image = Image.new("RGB", (80, 80), (255, 255, 255))
    image.paste((200, 40, 40), (20, 15, 60, 70))
    if mode == "RGBA":
        image.putalpha(Image.fromarray((np.asarray(image)[..., 1] < 200).astype(np.uint8) * 255))
    image = image.convert(mode)
    path = tmp_path / ("in.jpg" if mode == "CMYK" else "in.png")
    image.save(path)
    out = call(app.make_generate(mesh_chain, tmp_path / "runs"), image=str(path), prompt="")
    assert Image.open(out[2]).size == (512, 512)  # the mesh input
    assert len(trimesh.load(out[5], force="mesh").faces) > 0
    assert {Path(p).name for p in out[6]} == {"mesh.glb", "mesh_obj.zip", "mesh.ply"}
    assert out[7]["seed"] == 1 and out[8] == 1
    assert not toasts


def test_each_request_gets_its_own_folder_and_random_seeds(mesh_chain, tmp_path, toasts):
    generate = app.make_generate(mesh_chain, tmp_path)
    image = tmp_path / "in.png"
    Image.new("RGB", (64, 64), (90, 90, 200)).save(image)
    first = call(generate, image=str(image), randomize_seed=True)
    second = call(generate, image=str(image), randomize_seed=True)
    assert Path(first[5]).parent != Path(second[5]).parent
    assert Path(first[5]).parent.parent == tmp_path
    assert 0 <= first[8] <= app.MAX_UI_SEED and isinstance(first[8], int)
    assert toasts[0].startswith("An image was uploaded, so the prompt is not used")


def test_out_of_gpu_memory_and_failures_become_messages(mesh_chain, tmp_path, monkeypatch):
    class OutOfMemoryChain:
        def __call__(self, *args, **kwargs):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    with pytest.raises(gr.Error, match="--offload"):
        call(app.make_generate(OutOfMemoryChain(), tmp_path))

    class BrokenChain:
        def __call__(self, *args, **kwargs):
            raise RuntimeError("something unexpected")

    with pytest.raises(gr.Error, match="Generation failed .*something unexpected"):
        call(app.make_generate(BrokenChain(), tmp_path))


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
    assert "hansyan/perflow-sd15-dreamshaper" in err and "--tiny" in err


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_live_server_reports_bad_input_and_keeps_serving(tmp_path):
    from gradio_client import Client, handle_file

    chain = TextTo3D.tiny(stages=("text_to_image", "mesh"))
    demo = app.build_demo(chain, output_dir=tmp_path / "runs")
    config = str(demo.config)
    assert "SMOKE MODE" in config and "Source Sans" not in config
    assert "fonts.googleapis" not in demo.theme._get_theme_css()
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        args = list(DEFAULTS.values())
        with pytest.raises(Exception, match="Enter a prompt"):
            client.predict(*(["", *args[1:]]), api_name="/generate")
        (tmp_path / "notes.png").write_text("not an image")
        bad_upload = [*args[:4], handle_file(str(tmp_path / "notes.png")), *args[5:]]
        with pytest.raises(Exception, match="not an image"):
            client.predict(*bad_upload, api_name="/generate")
        bomb = [*args[:4], handle_file(forged_png(tmp_path / "bomb.png", 20000, 20000)), *args[5:]]
        with pytest.raises(Exception, match="too many pixels"):
            client.predict(*bomb, api_name="/generate")
        with pytest.raises(Exception, match="Marching-cubes"):
            client.predict(*args[:12], 5000, *args[13:], api_name="/generate")
        out = client.predict(*args, api_name="/generate")  # still serving after all of that
        assert len(trimesh.load(out[5], force="mesh").faces) > 0
        assert out[7]["seconds"]["total"] > 0
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
    obj_zip = next(p for p in out[6] if p.endswith("mesh_obj.zip"))
    with zipfile.ZipFile(obj_zip) as archive:
        names = set(archive.namelist())
        assert names == {"mesh.obj", "mesh.mtl", "mesh.png"}
        assert "map_Kd mesh.png" in archive.read("mesh.mtl").decode()
    assert trimesh.load(out[5], force="mesh").visual.kind == "texture"
