"""TextTo3D in smoke mode (tiny random stages): composition, seeds, image input, timings, inputs, missing weights."""

import json
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from t2mv import chain as chain_module
from t2mv.chain import FAILED_MARKER, ChainResult, TextTo3D, _MemoSession, horizontal_strip
from t2mv.chain.runner import Runner, model_groups
from t2mv.chain.stages import (
    InputImage,
    Mesh,
    Multiview,
    Preprocess,
    Stage,
    StageContext,
    Texture,
    check_plan,
)
from t2mv.errors import BadInputError, StageFailedError, WeightsUnavailableError, describe, exit_code
from t2mv.inputs import MAX_IMAGE_PIXELS, open_image, write_text
from t2mv.residency import StageSlot
from t2mv.settings import GenerationSettings
from t2mv.tiny import SMOKE_BANNER, FakeRembgSession, smoke_requested

TINY_DEFAULTS = GenerationSettings.smoke()


def forged_png(path, width, height):
    """A PNG whose header claims width × height (nothing decodable behind it): tests size checks for free."""

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"") + chunk(b"IEND", b""))
    return path


def square_on_white(size=96, box=(30, 20, 70, 80), colour=(200, 30, 30)):
    image = Image.new("RGB", (size, size), (255, 255, 255))
    image.paste(colour, box)
    return image


class CountingSession(FakeRembgSession):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def predict(self, img, *args, **kwargs):
        self.calls += 1
        return super().predict(img, *args, **kwargs)


@pytest.fixture(scope="module")
def tiny_chain():
    return TextTo3D.tiny(seed=0)


@pytest.fixture(scope="module")
def text_result(tiny_chain):
    return tiny_chain("a red teapot", seed=7)


# ---------------------------------------------------------------------------------------------- smoke helpers
def test_fake_rembg_session_masks_the_object_and_works_through_rembg():
    import rembg

    image = square_on_white()
    (mask,) = FakeRembgSession().predict(image)
    assert mask.mode == "L" and mask.size == image.size
    expected = np.zeros((96, 96), bool)
    expected[20:80, 30:70] = True
    np.testing.assert_array_equal(np.asarray(mask) > 127, expected)

    cutout = rembg.remove(image, session=FakeRembgSession())
    alpha = np.asarray(cutout.getchannel("A"))
    assert alpha[50, 50] == 255 and alpha[5, 5] == 0

    (flat,) = FakeRembgSession().predict(Image.new("RGB", (32, 32), (9, 9, 9)))
    assert np.asarray(flat).min() == 255  # nothing to cut out: keep everything


def test_smoke_requested_by_flag_or_environment(monkeypatch):
    monkeypatch.delenv("T2MV_SMOKE", raising=False)
    assert not smoke_requested() and smoke_requested(True)
    monkeypatch.setenv("T2MV_SMOKE", "1")
    assert smoke_requested()
    monkeypatch.setenv("T2MV_SMOKE", "0")
    assert not smoke_requested()


# ---------------------------------------------------------------------------------------------- the chain
def test_text_chain_outputs(tiny_chain, text_result):
    r = text_result
    assert isinstance(r, ChainResult)
    assert r.image.size == (TINY_DEFAULTS.width, TINY_DEFAULTS.height)
    assert r.mv_input.size == (256, 256) and r.mv_input.mode == "RGB"
    assert r.mesh_input.size == (512, 512) and r.mesh_input.mode == "RGB"
    assert r.view_names == ("front", "front_right", "right", "back", "left", "front_left")
    assert len(r.normals) == len(r.colors) == 6 and r.normals[0].size == (256, 256)
    assert len(r.mesh.faces) > 0 and len(r.mesh.vertices) > 0
    for stage in ("text_to_image", "preprocess", "multiview", "mesh", "total"):
        assert r.timings[stage] > 0
    assert r.timings["total"] >= r.timings["multiview"] + r.timings["mesh"]
    for stage in ("text_to_image", "preprocess", "multiview", "mesh"):
        assert r.memory[f"{stage}.host_rss"] > 0
    assert r.memory["host_peak_rss"] >= r.memory["mesh.host_rss"] * 0.99
    assert r.warnings[0] == SMOKE_BANNER  # smoke mode says so with every result
    s = r.settings
    assert s["prompt"] == "a red teapot" and s["seed"] == 7 and s["smoke"] is True and s["input"] == "text"
    assert s["stages"] == ["text_to_image", "multiview", "mesh"]
    assert s["device"] == "cpu" and s["dtype"] == "float32"
    # The plan is the one list the progress bar, the app's timings table and the CLI summary read.
    assert r.plan == ["text_to_image", "preprocess", "multiview", "mesh", "texture"] == r.finished
    assert [row.stage for row in r.stage_rows()] == [*r.plan, "total"]


def test_same_seed_reproduces_and_other_seed_differs(tiny_chain, text_result):
    # (the multiview stage's reproducibility is covered by test_image_replaces_the_prompt)
    again = tiny_chain("a red teapot", seed=7, multiview=False)
    assert np.array_equal(np.asarray(again.image), np.asarray(text_result.image))
    # With the views the mesh is textured from them (its vertices split along UV seams); compare the field mesh.
    field_mesh = text_result.mesh if text_result.field_mesh is None else text_result.field_mesh
    np.testing.assert_array_equal(again.mesh.vertices, field_mesh.vertices)
    assert again.normals == [] and "multiview" not in again.timings
    other = tiny_chain("a red teapot", seed=8, multiview=False, mesh=False)
    assert other.mesh is None and "mesh" not in other.timings
    assert not np.array_equal(np.asarray(other.image), np.asarray(text_result.image))


def test_image_replaces_the_prompt_and_rembg_runs_once(tiny_chain, text_result, tmp_path):
    # The generated image, given back as an input with the same seed, yields the same views and mesh; the one
    # rembg session serves both preprocessors and runs once per image.
    session = CountingSession()
    tiny_chain._rembg_session = _MemoSession(session)
    path = tmp_path / "input.png"
    text_result.image.save(path)
    r = tiny_chain(image=path, seed=7)
    assert session.calls == 1 and tiny_chain.rembg_session.session is session
    assert r.settings["input"] == "image" and r.settings["prompt"] is None
    assert "text_to_image" not in r.timings
    for a, b in zip(r.normals + r.colors, text_result.normals + text_result.colors):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(r.mesh.vertices, text_result.mesh.vertices)
    with_prompt = tiny_chain("ignored", image=square_on_white(), seed=7, multiview=False)
    assert any("prompt was not used" in w for w in with_prompt.warnings)
    assert session.calls == 2


def test_rgba_input_or_no_removal_never_needs_a_session(monkeypatch):
    chain = TextTo3D.tiny(stages=("mesh",))
    chain._rembg_session = None
    chain.smoke = False  # a real chain would now try to load u2net, which must not happen here

    def boom(*args, **kwargs):
        raise AssertionError("u2net must not be loaded")

    import rembg

    monkeypatch.setattr(rembg, "new_session", boom)
    rgba = square_on_white().convert("RGBA")
    alpha = Image.new("L", rgba.size, 0)
    alpha.paste(255, (30, 20, 70, 80))
    rgba.putalpha(alpha)
    assert chain(image=rgba, seed=0).mesh is not None
    assert chain(image=square_on_white(), seed=0, remove_background=False).mesh is not None


def test_missing_u2net_names_the_model_and_the_fixes(monkeypatch):
    chain = TextTo3D.tiny(stages=("mesh",))
    chain._rembg_session = None
    chain.smoke = False
    import rembg

    def offline(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'github.com'")

    monkeypatch.setattr(rembg, "new_session", offline)
    with pytest.raises(WeightsUnavailableError, match="u2net") as info:
        chain(image=square_on_white(), seed=0)
    assert "u2net.onnx" in str(info.value) and "background removal off" in str(info.value)


def test_missing_weights_offline_names_repo_and_smoke_mode(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(WeightsUnavailableError) as info:
        TextTo3D.from_pretrained("hansyan/perflow-sd15-dreamshaper", stages=("text_to_image",), device="cpu")
    message = str(info.value)
    assert "hansyan/perflow-sd15-dreamshaper" in message and "--tiny" in message and "T2MV_SMOKE=1" in message
    with pytest.raises(WeightsUnavailableError, match="stabilityai/TripoSR"):
        TextTo3D.from_pretrained(stages=("mesh",), device="cpu")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prompt": "  "}, "Enter a prompt"),
        ({"prompt": None}, "Enter a prompt"),
        ({"prompt": "x", "seed": -1}, "seed"),
        ({"prompt": "x", "seed": 1.5}, "seed"),
        ({"prompt": "x", "t2i_steps": 0}, "t2i_steps"),
        ({"prompt": "x", "mv_guidance": float("nan")}, "mv_guidance"),
        ({"prompt": "x", "mc_resolution": 4096}, "mc_resolution"),
        ({"prompt": "x", "height": 100}, "multiple of 8"),
        ({"prompt": "x", "texture_size": 16}, "texture_size"),
        ({"prompt": "x", "mesh_foreground_ratio": 1.5}, "mesh_foreground_ratio"),
        ({"prompt": "x", "mv_preprocess": "center"}, "mv_preprocess"),
    ],
)
def test_bad_settings_raise_clear_errors(tiny_chain, kwargs, match):
    kwargs = dict(kwargs)
    with pytest.raises(ValueError, match=match):
        tiny_chain(kwargs.pop("prompt"), **kwargs)


def test_image_only_chain_asks_for_an_image():
    chain = TextTo3D.tiny(stages=("mesh",))
    assert chain.stages == ("mesh",)
    with pytest.raises(ValueError, match="give an image"):
        chain("a prompt")
    with pytest.raises(ValueError, match="subset"):
        TextTo3D.tiny(stages=("text", "mesh"))


def test_offload_moves_each_stage_only_while_it_runs(monkeypatch):
    from t2mv import residency
    from t2mv.residency import StageSlot

    moves = []
    monkeypatch.setattr(residency, "move_stage", lambda stage, device, dtype=None: moves.append((stage, str(device))))
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    stage = object()
    slot = StageSlot("toy", stage, dtype=torch.float16)
    slot.run(torch.device("cuda"), lambda s: moves.append("ran") or s, offload=True)
    assert moves == [(stage, "cuda"), "ran", (stage, "cpu")]
    slot.run(torch.device("cuda"), lambda s: s, offload=False)
    assert len(moves) == 3
    assert not TextTo3D.tiny(stages=("mesh",), offload=True).offload  # nothing to offload to on a CPU


# No one_thread here: it is module-scoped, and text_result (made at the default thread count) must be reproduced
# at the same count (float sums differ across thread counts), as must the later low-memory comparison.
def test_save_writes_every_file_and_deterministic_settings(tiny_chain, text_result, tmp_path):
    paths = text_result.save(tmp_path / "a", mesh_formats=("glb", "obj", "ply"))
    names = {p.name for p in (tmp_path / "a").iterdir()}
    for kind in ("normal", "color"):
        for i, view in enumerate(text_result.view_names):
            assert f"{kind}_{i}_{view}.png" in names
        strip = Image.open(tmp_path / "a" / f"{kind}s.png")
        assert strip.size == (6 * 256, 256)
    assert {"image.png", "mv_input.png", "mesh_input.png", "mesh.glb", "mesh.obj", "mesh.ply"} <= names
    assert {"settings.json", "timings.json"} <= names and paths["mesh.glb"].stat().st_size > 0
    # A second run with the same seed writes the same files, byte for byte (timings aside).
    tiny_chain("a red teapot", seed=7).save(tmp_path / "b", mesh_formats=("glb", "obj", "ply"))
    assert names == {p.name for p in (tmp_path / "b").iterdir()}
    for name in sorted(names - {"timings.json"}):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    # ... and another seed another image (the image stage alone: the seed reaches it).
    other = tiny_chain("a red teapot", seed=8, multiview=False, mesh=False)
    assert other.settings["seed"] == 8 and not np.array_equal(np.asarray(other.image), np.asarray(text_result.image))
    with pytest.raises(ValueError, match="glb, obj, ply or stl"):
        text_result.save(tmp_path / "c", mesh_formats=("fbx",))
    assert horizontal_strip(text_result.normals).size == (1536, 256)


# ---------------------------------------------------------------------------------------------- input images
def test_open_image_rejects_non_images_and_bad_sizes(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match="not an image"):
        open_image(tmp_path / "notes.png")
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    with pytest.raises(ValueError, match="at least 16 pixels"):
        open_image(tmp_path / "dot.png")
    side = int(MAX_IMAGE_PIXELS**0.5) + 100  # above our limit, below PIL's own bomb guard
    with pytest.raises(ValueError, match="Downscale"):
        open_image(forged_png(tmp_path / "big.png", side, side))
    with pytest.raises(ValueError, match="too large"):  # PIL's decompression-bomb error, reworded
        open_image(forged_png(tmp_path / "bomb.png", 20000, 20000))
    good = tmp_path / "good.png"
    square_on_white().save(good)
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:200])
    with pytest.raises(ValueError, match="damaged or truncated"):
        open_image(tmp_path / "cut.png")


@pytest.mark.parametrize(
    "mode, expected",
    [("L", "RGB"), ("1", "RGB"), ("P", "RGB"), ("CMYK", "RGB"), ("RGBA", "RGBA"), ("LA", "RGBA"), ("I;16", "RGB")],
)
def test_open_image_converts_modes(tmp_path, mode, expected):
    if mode == "I;16":
        image = Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16))
    else:
        image = square_on_white(64, (10, 10, 40, 50)).convert(mode)
    suffix = ".tif" if mode == "CMYK" else ".png"
    image.save(tmp_path / f"in{suffix}")
    out = open_image(tmp_path / f"in{suffix}")
    assert out.mode == expected and out.size == (64, 64)
    if mode == "I;16":  # scaled to 8 bits, not clipped at 255
        assert np.asarray(out)[-1, -1, 0] == 255 and np.asarray(out)[0, 0, 0] == 0


def test_from_pretrained_calls_each_stage_loader_with_its_own_signature(monkeypatch):
    """The chain's loader matches the stages' from_pretrained signatures (real files are tested by each stage)."""
    import inspect

    from t2mv.text_to_image import TextToImage
    from triposr import TSR
    from wonder3d_perflow import MultiviewPipeline

    calls = {}
    for cls, tiny in ((TextToImage, TextToImage.tiny), (MultiviewPipeline, MultiviewPipeline.tiny), (TSR, TSR.tiny)):
        signature = inspect.signature(cls.from_pretrained)

        def fake(*args, _cls=cls, _signature=signature, _tiny=tiny, **kwargs):
            calls[_cls.__name__] = _signature.bind(*args, **kwargs).arguments  # TypeError on a mismatch
            return _tiny(seed=0)

        monkeypatch.setattr(cls, "from_pretrained", fake)
    chain = TextTo3D.from_pretrained(
        "Lykon/dreamshaper-8", t2i_delta="hansyan/perflow-sd15-delta-weights", device="cpu", local_files_only=True
    )
    assert chain.stages == ("text_to_image", "multiview", "mesh") and not chain.smoke
    t2i, mv, tsr = calls["TextToImage"], calls["MultiviewPipeline"], calls["TSR"]
    assert t2i["model"] == "Lykon/dreamshaper-8" and t2i["delta"] == "hansyan/perflow-sd15-delta-weights"
    assert mv["repo_or_path"] == "flamehaze1115/wonder3d-v1.0" and mv["delta"] == "hansyan/perflow-sd15-delta-weights"
    assert tsr["repo_or_folder"] == "stabilityai/TripoSR"
    assert t2i["torch_dtype"] == mv["torch_dtype"] == torch.float32
    assert t2i["local_files_only"] is mv["local_files_only"] is tsr["local_files_only"] is True
    assert chain.model_ids["t2i_model"] == "Lykon/dreamshaper-8"
    assert chain.model_ids["triposr_model"] == "stabilityai/TripoSR"


def test_device_and_dtype_are_chosen_once():
    device, dtype = chain_module.resolve_device_dtype("cpu", None)
    assert device == torch.device("cpu") and dtype == torch.float32
    assert chain_module.resolve_device_dtype("cuda:1", None) == (torch.device("cuda:1"), torch.float16)
    assert chain_module.resolve_device_dtype("cpu", torch.bfloat16)[1] == torch.bfloat16
    with pytest.raises(ValueError, match="float16 is not supported on the CPU"):
        TextTo3D.tiny(stages=("mesh",), dtype=torch.float16)


@pytest.mark.slow
def test_real_chain_end_to_end(tmp_path):
    """Real weights (downloaded once, or HF_HUB_OFFLINE with a filled cache), on the GPU when there is one."""
    try:
        chain = TextTo3D.from_pretrained()
    except WeightsUnavailableError as e:
        pytest.fail(f"RUN_SLOW=1 asked for the real chain, but the weights are unavailable: {e}")
    try:
        assert chain.rembg_session is not None  # loads u2net
    except WeightsUnavailableError as e:
        pytest.fail(f"RUN_SLOW=1 asked for the real chain, but u2net is unavailable: {e}")
    result = chain("a red teapot", seed=0, mc_resolution=128)
    assert result.image.size == (512, 512) and len(result.normals) == 6 and len(result.mesh.faces) > 1000
    # The object was cut out: the multiview input's border is white, the mesh input's is 0.5 grey.
    mv = np.asarray(result.mv_input)
    assert (mv[0] == 255).all() and (mv[-1] == 255).all()
    assert abs(int(np.asarray(result.mesh_input)[0, 0, 0]) - 127) <= 1
    again = chain("a red teapot", seed=0, mesh=False)
    assert np.array_equal(np.asarray(again.image), np.asarray(result.image))
    paths = result.save(tmp_path, mesh_formats=("glb", "obj", "ply"))
    assert paths["mesh.glb"].stat().st_size > 10_000


# ---------------------------------------------------------------------------------------------- issue 11: nothing lost
class Exploding:
    """Stands in for a stage: records that it was called, then fails like the given error."""

    def __init__(self, error):
        self.error, self.calls = error, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        raise self.error


def test_settings_object_is_validated_before_any_stage_runs():
    chain = TextTo3D.tiny(stages=("text_to_image", "mesh"))
    spy = Exploding(AssertionError("text-to-image must not run"))
    real, chain.text_to_image = chain.text_to_image, spy
    for bad in ({"mc_threshold": float("nan")}, {"mv_steps": 2}, {"seed": 2**70}, {"t2i_steps": 3}):
        with pytest.raises(BadInputError):
            chain("a red teapot", settings=GenerationSettings.smoke(**bad))
    with pytest.raises(BadInputError, match="unknown setting"):
        chain("a red teapot", mc_resolutoin=64)  # the keyword shim refuses typos instead of ignoring them
    assert spy.calls == 0
    chain.text_to_image = real


def test_late_failure_keeps_finished_stages_and_writes_a_marker(tmp_path):
    chain = TextTo3D.tiny(seed=0)
    out = tmp_path / "run"
    seen = []
    with pytest.raises(StageFailedError) as info:  # no surface at this threshold: the mesh stage fails
        chain(
            "a red teapot",
            settings=GenerationSettings.smoke(mc_threshold=1e30),
            output_dir=out,
            on_stage_done=lambda stage, result: seen.append(stage),
        )
    assert info.value.stage == "mesh" and exit_code(info.value) == 2  # classified by its cause (a ValueError)
    assert seen == ["text_to_image", "preprocess", "multiview"]
    names = {p.name for p in out.iterdir()}
    assert {"image.png", "mv_input.png", "mesh_input.png", "normals.png", "colors.png", "settings.json"} <= names
    assert len([n for n in names if n.startswith(("normal_", "color_"))]) == 12
    assert not [n for n in names if n.startswith(("mesh.", "."))]  # no mesh, no temporary file
    marker = json.loads((out / FAILED_MARKER).read_text())
    assert marker["failed_stage"] == "mesh" and "no surface" in marker["error"]
    assert marker["finished_stages"] == ["text_to_image", "preprocess", "multiview"]
    # The same folder, run again successfully: complete, and the marker is gone.
    chain("a red teapot", settings=GenerationSettings.smoke(), output_dir=out)
    assert (out / "mesh.glb").is_file() and not (out / FAILED_MARKER).exists()


def test_keep_largest_drops_the_floaters_in_the_chain_too(tiny_chain, text_result):
    """`keep_largest` (one setting for every command: the app, t2mv, t2mv-mesh) drops what TripoSR's field leaves
    floating: the tiny model's noise field meshes into several parts, and only the largest reaches the views stage."""
    parts = lambda m: len(m.split(only_watertight=False))  # noqa: E731
    # The tiny model's noise views texture nothing (no silhouette), so the result is the field-coloured mesh itself;
    # `field_mesh` is that mesh when views did texture it.
    shape = lambda r: r.mesh if r.field_mesh is None else r.field_mesh  # noqa: E731
    assert parts(shape(text_result)) > 1  # the case: floaters without the setting
    kept = tiny_chain("a red teapot", seed=7, keep_largest=True)
    assert parts(shape(kept)) == 1 and kept.settings["keep_largest"] is True
    largest = max(shape(text_result).split(only_watertight=False), key=lambda m: len(m.faces))
    assert len(shape(kept).faces) == len(largest.faces)


def test_out_of_memory_in_the_mesh_stage_keeps_the_inputs(tmp_path):
    chain = TextTo3D.tiny(seed=0, stages=("mesh",))  # (the views' case is the no-surface test above)
    chain.reconstructor.extract_mesh = Exploding(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    with pytest.raises(StageFailedError) as info:
        chain(image=square_on_white(), output_dir=tmp_path / "run", mesh_formats=("glb", "ply"))
    assert exit_code(info.value) == 4 and "--offload" in describe(info.value)
    assert {"image.png", "mesh_input.png", FAILED_MARKER} <= {p.name for p in (tmp_path / "run").iterdir()}


def test_failure_of_the_first_stage_writes_nothing(tmp_path):
    chain = TextTo3D.tiny(stages=("text_to_image",))
    chain.text_to_image = Exploding(RuntimeError("boom"))
    with pytest.raises(RuntimeError, match="boom"):
        chain("a red teapot", output_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_missing_u2net_is_found_before_text_to_image_runs(monkeypatch):
    import rembg

    chain = TextTo3D.tiny(stages=("text_to_image", "mesh"))
    chain._rembg_session, chain.smoke = None, False
    spy = Exploding(AssertionError("text-to-image must not run"))
    chain.text_to_image = spy

    def offline(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'github.com'")

    monkeypatch.setattr(rembg, "new_session", offline)
    with pytest.raises(WeightsUnavailableError, match="u2net"):
        chain("a red teapot")
    assert spy.calls == 0 and exit_code(WeightsUnavailableError("x")) == 3


def test_settings_json_says_when_the_inputs_alpha_was_used(tiny_chain):
    rgba = square_on_white().convert("RGBA")
    alpha = Image.new("L", rgba.size, 0)
    alpha.paste(255, (30, 20, 70, 80))
    rgba.putalpha(alpha)
    used_alpha = tiny_chain(image=rgba, multiview=False).settings
    assert used_alpha["remove_background"] is False and used_alpha["object_mask"] == "input alpha"
    cut = tiny_chain(image=square_on_white(), multiview=False).settings
    assert cut["remove_background"] is True and cut["object_mask"] == "rembg u2net"


def test_only_real_missing_weights_become_weights_unavailable():
    from t2mv.perflow.hub import MissingWeightsError
    from triposr.system import MissingWeightsError as TriposrMissing

    for error in (MissingWeightsError("some/repo", "offline"), TriposrMissing("no model.ckpt")):
        with pytest.raises(WeightsUnavailableError, match="--tiny"):
            with chain_module._naming_stage("mesh", "some/repo"):
                raise error
    for error in (OSError("disk on fire"), PermissionError("read-only cache"), RuntimeError("bad checkpoint")):
        with pytest.raises(type(error)):
            with chain_module._naming_stage("mesh", "some/repo"):
                raise error
        assert exit_code(error) == 1


def test_fully_transparent_and_animated_images(tmp_path):
    Image.new("RGBA", (64, 64), (255, 0, 0, 0)).save(tmp_path / "clear.png")
    with pytest.raises(BadInputError, match="fully transparent"):
        open_image(tmp_path / "clear.png")
    frames = [square_on_white(64, (10, 10, 40, 50), colour) for colour in ((200, 0, 0), (0, 0, 200))]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    out = open_image(tmp_path / "anim.gif")
    assert out.mode == "RGB" and out.size == (64, 64) and out.getpixel((20, 20))[0] > 150  # the first frame
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(BadInputError, match="empty"):
        open_image(tmp_path / "empty.png")


def test_low_memory_chain_equals_the_resident_chain_and_keeps_no_stage(tiny_chain, text_result):
    """Low-memory mode loads each stage when it runs and frees it after; the outputs do not change."""
    import gc
    import weakref

    from t2mv.text_to_image import TextToImage

    alive = []
    real_tiny = TextToImage.tiny

    chain = TextTo3D.tiny(seed=0, low_memory=True)
    assert chain.low_memory and chain.stages == ("text_to_image", "multiview", "mesh")
    assert chain.text_to_image is None and chain.multiview is None and chain.reconstructor is None  # none resident

    def tracked_tiny(seed=0):
        stage = real_tiny(seed=seed)
        alive.append(weakref.ref(stage))
        return stage

    chain._slots["text_to_image"].loader = lambda: tracked_tiny(seed=0)
    load_multiview = chain._slots["multiview"].loader
    freed_before_next = []

    def checking_multiview_loader():
        gc.collect()
        freed_before_next.append(alive[0]() is None)  # text-to-image is gone before the next stage loads
        return load_multiview()

    chain._slots["multiview"].loader = checking_multiview_loader
    result = chain("a red teapot", settings=tiny_chain.defaults, seed=7)
    assert freed_before_next == [True]
    assert result.settings["low_memory"] is True and text_result.settings["low_memory"] is False
    assert np.array_equal(np.asarray(result.image), np.asarray(text_result.image))
    # Low-memory mode decodes the views one at a time: batch-size-dependent conv kernels round differently (~5e-6),
    # which moves a rare 8-bit value by one.
    for a, b in zip(result.normals + result.colors, text_result.normals + text_result.colors):
        diff = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int))
        assert diff.max() <= 1 and (diff == 0).mean() > 0.999
    assert np.array_equal(result.mesh.faces, text_result.mesh.faces)
    assert np.allclose(result.mesh.vertices, text_result.mesh.vertices)


def test_low_memory_from_pretrained_checks_every_stage_once_at_construction(monkeypatch):
    """Missing weights fail when the chain is built, not minutes into a run; each stage is then loaded per run."""
    from t2mv.text_to_image import TextToImage
    from triposr import TSR
    from wonder3d_perflow import MultiviewPipeline

    loads = []
    for cls in (TextToImage, MultiviewPipeline, TSR):
        monkeypatch.setattr(
            cls, "from_pretrained", lambda *a, _cls=cls, **k: loads.append(_cls.__name__) or _cls.tiny(seed=0)
        )
    chain = TextTo3D.from_pretrained(device="cpu", local_files_only=True, low_memory=True)
    assert loads == ["TextToImage", "MultiviewPipeline", "TSR"] and chain.low_memory
    assert chain._multiview_size() == MultiviewPipeline.tiny(seed=0).unet.config.sample_size * 8

    def missing(*args, **kwargs):
        raise FileNotFoundError("no model.ckpt")

    monkeypatch.setattr(TSR, "from_pretrained", missing)
    with pytest.raises(WeightsUnavailableError, match="TripoSR"):
        TextTo3D.from_pretrained(device="cpu", local_files_only=True, low_memory=True)


def test_low_memory_is_chosen_automatically_when_ram_is_short(monkeypatch):
    from t2mv import residency
    from t2mv.text_to_image import TextToImage
    from triposr import TSR
    from wonder3d_perflow import MultiviewPipeline

    for cls in (TextToImage, MultiviewPipeline, TSR):
        monkeypatch.setattr(cls, "from_pretrained", lambda *a, _cls=cls, **k: _cls.tiny(seed=0))
    monkeypatch.setattr(residency, "available_host_memory_gib", lambda: 4.0)
    assert TextTo3D.from_pretrained(device="cpu", low_memory=None).low_memory
    monkeypatch.setattr(residency, "available_host_memory_gib", lambda: 64.0)
    assert not TextTo3D.from_pretrained(device="cpu", low_memory=None).low_memory


def test_compile_turns_on_each_diffusion_stages_compiled_mode(monkeypatch):
    from t2mv.text_to_image import TextToImage
    from wonder3d_perflow import MultiviewPipeline

    called = []
    for cls in (TextToImage, MultiviewPipeline):
        monkeypatch.setattr(cls, "enable_compile", lambda self, _n=cls.__name__, **k: called.append(_n) or True)
    chain = TextTo3D.tiny(stages=("text_to_image", "multiview"), compile=True)
    assert called == ["TextToImage", "MultiviewPipeline"]
    assert chain.compiled == {"text_to_image": True, "multiview": True}
    called.clear()
    assert TextTo3D.tiny(stages=("text_to_image",), compile=True, low_memory=True).compiled == {}
    assert called == []  # a stage rebuilt per run would recompile every run: compiled mode is off there


# ---------------------------------------------------------------------------------------------- stages and runner
class Echo(Stage):
    """A stage added by a test: one class, nothing else changes. Needs the image, adds `mesh_input`, writes a file."""

    name = "echo_test"
    model = "toy"
    needs = ("image",)
    adds = ("mesh_input",)

    def run(self, ctx, model):
        ctx.result.mesh_input = ctx.result.image.copy()
        ctx.result.info.setdefault("models", []).append(model)

    @staticmethod
    def write(result, folder, mesh_formats):
        return {"echo": write_text(f"{result.mesh_input.size}\n", folder / "echo.txt")}


class Later(Echo):
    name = "later_test"
    needs = ("mesh_input",)

    @staticmethod
    def write(result, folder, mesh_formats):
        return {}


def toy_runner(tmp_path, loads, **kwargs):
    def load():
        loads.append(torch.nn.Identity())
        return loads[-1]

    slots = {"toy": StageSlot("toy", loader=load, dtype=torch.float32)}
    return Runner(slots, torch.device("cpu"), folder=tmp_path, **kwargs)


def test_a_new_stage_is_one_class_and_the_runner_does_the_rest(tmp_path):
    """Progress, timings, memory, files as it ends, `finished`, the timings rows and its model come from the
    runner; consecutive stages of one model share one load (low-memory mode loads it once for both)."""
    from t2mv.chain import STAGE_TYPES

    progress, done, loads = [], [], []
    runner = toy_runner(
        tmp_path, loads, callback=lambda *a: progress.append(a), on_stage_done=lambda name, r: done.append(name)
    )
    result = ChainResult(image=square_on_white())
    ctx = StageContext(result, TINY_DEFAULTS, torch.device("cpu"))
    runner.run([InputImage(), Echo(), Later()], ctx)
    assert STAGE_TYPES["echo_test"] is Echo
    assert progress == [("echo_test", 0, 2), ("later_test", 1, 2)]
    assert done == result.finished == ["input", "echo_test", "later_test"]
    assert result.plan == ["echo_test", "later_test"]
    assert [row.stage for row in result.stage_rows()] == ["echo_test", "later_test", "total"]
    assert result.timings["echo_test"] > 0 and result.memory["echo_test.host_rss"] > 0
    assert (tmp_path / "echo.txt").read_text() == "(96, 96)\n" and (tmp_path / "image.png").is_file()
    assert (tmp_path / "settings.json").is_file() and not (tmp_path / FAILED_MARKER).exists()
    assert len(loads) == 1 and result.info["models"] == [loads[0], loads[0]]  # one load for the two stages
    assert [len(group) for group in model_groups([InputImage(), Echo(), Later(), InputImage(), Echo()])] == [
        1,
        2,
        1,
        1,
    ]


def test_a_plan_that_needs_what_no_earlier_stage_adds_is_refused_before_it_runs(tmp_path):
    check_plan([InputImage(), Preprocess(), Multiview(), Mesh(), Texture("views")])
    with pytest.raises(ValueError, match="mesh stage needs mesh_input"):
        check_plan([InputImage(), Preprocess(mesh=False), Mesh()])
    with pytest.raises(ValueError, match="texture stage needs colors, normals, view_names"):
        check_plan([InputImage(), Preprocess(), Mesh(), Texture("views")])
    check_plan([InputImage(), Preprocess(multiview=False), Mesh(), Texture("field")])
    loads = []
    with pytest.raises(ValueError, match="later_test stage needs mesh_input"):
        toy_runner(tmp_path, loads).run([InputImage(), Later()], StageContext(ChainResult(), TINY_DEFAULTS, "cpu"))
    assert loads == [] and not list(tmp_path.iterdir())  # nothing ran, nothing written


def test_a_failing_added_stage_gets_the_marker_and_its_name(tmp_path):
    class Broken(Echo):
        name = "broken_test"

        def run(self, ctx, model):
            raise RuntimeError("no luck")

    loads = []
    with pytest.raises(StageFailedError) as info:
        toy_runner(tmp_path, loads).run(
            [InputImage(), Broken()], StageContext(ChainResult(image=square_on_white()), TINY_DEFAULTS, "cpu")
        )
    marker = json.loads((tmp_path / FAILED_MARKER).read_text())
    assert info.value.stage == marker["failed_stage"] == "broken_test" and marker["finished_stages"] == ["input"]
