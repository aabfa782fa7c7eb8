"""triposr.TSR: config, strict loading, state-dict manifest, and parity with upstream at a tiny config
(tests/fixtures/triposr_tiny/, tolerances from its README)."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file, save_file

from triposr import TSR, MissingWeightsError, TSRConfig, ViTConfig
from triposr.config import DINO_VITB16
from triposr.image_tokenizer import interpolate_pos_encoding_legacy
from triposr.nerf import spherical_camera_rays


@pytest.fixture(scope="module")
def tiny_dir(request):
    return request.config.rootpath / "tests" / "fixtures" / "triposr_tiny"


@pytest.fixture(scope="module")
def manifests(request):
    return request.config.rootpath / "tests" / "fixtures" / "manifests"


@pytest.fixture(scope="module")
def tiny_model(tiny_dir):
    return TSR.from_pretrained(tiny_dir, "config.yaml", "model.ckpt")


@pytest.fixture(scope="module")
def ref(tiny_dir):
    return load_file(tiny_dir / "outputs.safetensors")


@pytest.fixture(scope="module")
def image(tiny_dir):
    return load_file(tiny_dir / "inputs.safetensors")["image"]  # (1, 3, 64, 64)


def _published(manifests) -> dict:
    return OmegaConf.to_container(OmegaConf.load(manifests / "triposr_config.yaml"))


# ---------------------------------------------------------------- config


def test_published_config_parses(manifests):
    config = TSRConfig.from_yaml_file(manifests / "triposr_config.yaml")
    assert config.cond_image_size == 512
    assert config.backbone.in_channels == 1024  # ${tokenizer.num_channels} resolved
    assert (config.backbone.num_layers, config.backbone.num_attention_heads, config.backbone.attention_head_dim) == (
        16,
        16,
        64,
    )
    assert config.decoder.in_channels == 120 and config.decoder.activation == "silu"
    assert config.renderer.radius == 0.87 and config.renderer.density_activation == "exp"
    assert config.renderer.num_samples_per_ray == 128


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda c: c["decoder"].update(n_layers=3), "n_layers"),
        (lambda c: c.update(extra_top_level=1), "extra_top_level"),
        (lambda c: c.update(decoder_cls="my.module.Decoder"), "decoder_cls"),
        (lambda c: c["decoder"].update(n_neurons="many"), "n_neurons"),
        (lambda c: c.pop("tokenizer"), "tokenizer"),
        (lambda c: c["renderer"].update(density_activation="relu"), "density_activation"),
        (lambda c: c["decoder"].update(in_channels=121), "decoder.in_channels"),
        (lambda c: c["backbone"].update(in_channels=512), "backbone.in_channels"),
    ],
)
def test_config_rejects_bad_values(manifests, edit, match):
    values = _published(manifests)
    edit(values)
    with pytest.raises(ValueError, match=match):
        TSRConfig.from_dict(values)


def test_dino_config_built_in_matches_manifest(manifests):
    assert ViTConfig.from_json_file(manifests / "triposr_dino_vitb16_config.json") == DINO_VITB16
    with pytest.raises(ValueError, match="hidden_sizes"):
        ViTConfig.from_dict({"hidden_sizes": 3})


def test_state_dict_matches_manifest_on_meta(manifests):
    manifest = json.loads((manifests / "triposr_keys.json").read_text())
    config = TSRConfig.from_yaml_file(manifests / "triposr_config.yaml")
    with torch.device("meta"):
        model = TSR(config)  # the DINO config is built in: no hub access
    state = model.state_dict()
    assert list(state) == list(manifest["keys"])  # names and order
    assert {k: list(v.shape) for k, v in state.items()} == manifest["keys"]
    assert len(state) == manifest["num_tensors"] == 549
    assert sum(v.numel() for v in state.values()) == manifest["num_params"]
    assert all(v.dtype == torch.float32 for v in state.values())
    buffers = {name: b for name, b in model.named_buffers()}
    assert set(buffers) == set(manifest["non_persistent_buffers_not_in_checkpoint"])
    assert all(b.device.type == "meta" for b in buffers.values())

    # Real-size shapes through the whole network, still on meta (no memory, no compute): 512 input -> 32x32 DINO
    # patches (legacy interpolation of the 14x14 table) -> scene codes (B, 3, 40, 64, 64).
    images = torch.empty(2, 3, 600, 500, device="meta")  # resized to cond_image_size first
    assert model.image_tokenizer(torch.empty(2, 3, 512, 512, device="meta")).shape == (2, 768, 1025)
    assert model(images, device="meta").shape == (2, 3, 40, 64, 64)
    field = model.query_triplane(torch.empty(3, 40, 64, 64, device="meta"), torch.empty(5, 7, 3, device="meta"))
    assert field["density"].shape == (5, 7, 1) and field["color"].shape == (5, 7, 3)


# ---------------------------------------------------------------- loading


def test_ckpt_and_safetensors_load_the_same_weights(tiny_dir, tiny_model):
    other = TSR.from_pretrained(tiny_dir, weight_name="model.safetensors")
    for (name, a), (_, b) in zip(tiny_model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), name
    assert tiny_model.device.type == "cpu" and tiny_model.dtype == torch.float32
    torch.testing.assert_close(tiny_model.image_tokenizer.image_std.flatten(), torch.tensor([0.229, 0.224, 0.225]))


def _copy_tiny(tiny_dir, tmp_path, state):
    shutil.copy(tiny_dir / "config.yaml", tmp_path / "config.yaml")
    shutil.copytree(tiny_dir / "vit_tiny", tmp_path / "vit_tiny")
    save_file(state, str(tmp_path / "model.safetensors"))
    return tmp_path


@pytest.mark.parametrize("change", ["extra", "missing", "shape"])
def test_loading_is_strict(tiny_dir, tmp_path, change):
    state = load_file(tiny_dir / "model.safetensors")
    if change == "extra":
        state["decoder.layers.6.weight"] = torch.zeros(4, 16)
    elif change == "missing":
        del state["image_tokenizer.model.pooler.dense.bias"]
    else:
        state["tokenizer.embeddings"] = torch.zeros(3, 32, 5, 5)
    folder = _copy_tiny(tiny_dir, tmp_path, state)
    with pytest.raises(RuntimeError, match="does not match"):
        TSR.from_pretrained(folder, weight_name="model.safetensors")


def test_missing_files_raise_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(MissingWeightsError, match="does not exist"):
        TSR.from_pretrained(str(tmp_path / "nope"))
    with pytest.raises(MissingWeightsError, match="config.yaml"):
        TSR.from_pretrained(tmp_path)  # existing but empty folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MissingWeightsError) as info:
        TSR.from_pretrained("t2mv-tests/no-such-triposr-repo")
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "t2mv-tests/no-such-triposr-repo" in message and "cache folder" in message
    assert "go online once" in message and "local folder" in message


def test_unknown_image_tokenizer_needs_a_vit_config(tiny_dir):
    config = TSRConfig.from_yaml_file(tiny_dir / "config.yaml")
    with pytest.raises(ValueError, match="vit_tiny"):
        TSR(config)  # "vit_tiny" is only resolvable next to config.yaml, i.e. by from_pretrained
    TSR(config, ViTConfig.from_json_file(tiny_dir / "vit_tiny" / "config.json"))


# ---------------------------------------------------------------- parity with upstream (tiny config)


def test_legacy_position_interpolation(tiny_model, ref):
    table = tiny_model.image_tokenizer.model.embeddings.position_embeddings  # (1, 5, 32): 2x2 patches + CLS
    ours = interpolate_pos_encoding_legacy(table, 64, 64, 16)  # (1, 17, 32)
    torch.testing.assert_close(ours, ref["vit_pos_embed_interp"], atol=5e-5, rtol=0)
    # The newer size=(4, 4) resize (transformers >= 4.45) is measurably different, so this test can tell them apart.
    grid = table[:, 1:].reshape(1, 2, 2, 32).permute(0, 3, 1, 2)
    newer = (
        F.interpolate(grid, size=(4, 4), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 16, 32)
    )
    assert (newer - ref["vit_pos_embed_interp"][:, 1:]).abs().max() > 0.05


def test_image_tokens_and_backbone(tiny_model, ref, image):
    tokenizer = tiny_model.image_tokenizer
    normalised = (image - tokenizer.image_mean) / tokenizer.image_std
    torch.testing.assert_close(tokenizer.model(normalised), ref["vit_last_hidden_state"], atol=5e-5, rtol=0)
    tokens = tokenizer(image)  # (1, 32, 17)
    torch.testing.assert_close(tokens, ref["image_tokens"][:, 0], atol=5e-5, rtol=0)
    queries = tiny_model.tokenizer(1)  # (1, 32, 48)
    torch.testing.assert_close(queries, ref["triplane_query_tokens"], atol=1e-5, rtol=0)
    with torch.no_grad():
        out = tiny_model.backbone(queries, encoder_hidden_states=tokens.transpose(1, 2))
    torch.testing.assert_close(out, ref["backbone_out"], atol=1e-5, rtol=0)


def test_scene_codes_from_tensor_and_pil(tiny_model, ref, image, tiny_dir):
    codes = tiny_model(image, device="cpu")  # (1, 3, 8, 8, 8)
    assert codes.shape == (1, 3, 8, 8, 8) and not codes.requires_grad
    torch.testing.assert_close(codes, ref["scene_codes"], atol=1e-5, rtol=0)
    codes_pil = tiny_model([Image.open(tiny_dir / "input.png")])
    torch.testing.assert_close(codes_pil, ref["scene_codes"], atol=1e-5, rtol=0)
    batch = tiny_model(torch.cat([image, image.flip(-1)]))  # (2, 3, 8, 8, 8): batch items are independent
    torch.testing.assert_close(batch[0], codes[0], atol=1e-5, rtol=0)
    assert (batch[1] - batch[0]).abs().max() > 1e-3


def test_field_queries(tiny_model, ref):
    code, points = ref["scene_codes"][0], ref["query_points"]  # (3, 8, 8, 8), (4096, 3)
    out = tiny_model.query_triplane(code, points)
    assert out["density"].shape == (4096, 1) and out["color"].shape == (4096, 3)
    torch.testing.assert_close(out["density"], ref["query_density"], atol=2e-4, rtol=0)
    torch.testing.assert_close(out["features"], ref["query_features"], atol=2e-5, rtol=0)
    torch.testing.assert_close(out["density_act"], ref["query_density_act"], rtol=2e-4, atol=0)
    torch.testing.assert_close(out["color"], ref["query_color"], atol=2e-5, rtol=0)
    assert 0 <= out["color"].min() and out["color"].max() <= 1

    # Leading shapes are kept; a batch of codes takes (B, ..., 3) positions; chunking changes nothing.
    grid = tiny_model.query_triplane(code, points.view(16, 16, 16, 3))
    torch.testing.assert_close(grid["density"], out["density"].view(16, 16, 16, 1))
    batched = tiny_model.query_triplane(ref["scene_codes"].expand(2, -1, -1, -1, -1), points.view(2, 2048, 3))
    torch.testing.assert_close(batched["color"], out["color"].view(2, 2048, 3))
    renderer = tiny_model.renderer
    old = renderer.chunk_size
    try:
        renderer.set_chunk_size(1000)
        torch.testing.assert_close(tiny_model.query_triplane(code, points)["density"], out["density"])
    finally:
        renderer.set_chunk_size(old)
    with pytest.raises(ValueError, match="same B"):
        tiny_model.query_triplane(ref["scene_codes"], points)
    assert renderer.cfg.radius == 0.87


def test_render_matches_upstream(tiny_model, ref, tiny_dir):
    rays_o, rays_d = spherical_camera_rays(1, 0.0, 1.9, 40.0, 32, 32)
    torch.testing.assert_close(rays_o, ref["render_rays_o"], atol=1e-6, rtol=0)
    torch.testing.assert_close(rays_d, ref["render_rays_d"], atol=1e-6, rtol=0)
    rgb = tiny_model.render(ref["scene_codes"], 1, height=32, width=32, output_type="pt")[0][0]  # (32, 32, 3)
    torch.testing.assert_close(rgb, ref["render_rgb"], atol=2e-5, rtol=0)
    png = tiny_model.render(ref["scene_codes"], 1, height=32, width=32)[0][0]
    expected = np.asarray(Image.open(tiny_dir / "render.png").convert("RGB"), dtype=np.int16)
    assert np.abs(np.asarray(png, dtype=np.int16) - expected).max() <= 1
    views = tiny_model.render(ref["scene_codes"], 3, height=8, width=8, output_type="np")
    assert len(views) == 1 and len(views[0]) == 3 and views[0][2].shape == (8, 8, 3)


# ---------------------------------------------------------------- tiny smoke model and input checks


def test_tiny_is_seeded_and_has_a_surface():
    rng_before = torch.random.get_rng_state()
    a, b, c = TSR.tiny(seed=0), TSR.tiny(seed=0), TSR.tiny(seed=1)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the global RNG is left alone
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.decoder.layers[0].weight, c.decoder.layers[0].weight)

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 100, 3), dtype=np.uint8), "RGB")
    codes = a([image, image.convert("L")])  # (2, 3, 8, 8, 8); greyscale is accepted as RGB
    assert codes.shape == (2, 3, 8, 8, 8)
    axis = torch.linspace(-0.87, 0.87, 24)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1)  # (24, 24, 24, 3)
    above = (a.query_triplane(codes[0], grid)["density_act"] > 25.0).float().mean()
    assert 0.005 < above < 0.5  # a mesh at the default threshold is neither empty nor the whole box


def test_bad_images_raise(tiny_model):
    with pytest.raises(ValueError, match="preprocess_image"):
        tiny_model([Image.new("RGBA", (64, 64))])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        tiny_model(torch.full((1, 3, 64, 64), 255.0))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tiny_model(torch.zeros(3, 64, 64))
    with pytest.raises(ValueError, match="empty"):
        tiny_model([])


def test_low_precision_keeps_dtypes_consistent(ref, image):
    # bfloat16 stands in for CUDA fp16 on CPU: parameters, inputs and sampled positions must all follow the model.
    model = TSR.tiny(seed=0).to(torch.bfloat16)
    codes = model(image)
    assert codes.dtype == torch.bfloat16
    field = model.query_triplane(codes[0], ref["query_points"])
    assert field["density"].dtype == torch.bfloat16 and field["density_act"].dtype == torch.float32
    rgb = model.render(codes, 1, height=8, width=8, output_type="pt")[0][0]
    assert torch.isfinite(rgb).all()


def test_half_precision_choice(tiny_dir):
    model = TSR.tiny(seed=0)
    assert model.half_precision is None  # the per-device default
    assert model.half_dtype("cpu") is None and model.half_dtype() is None  # CPU: float32
    assert model.half_dtype("cuda") == torch.float16  # CUDA: float16 (resolved without a GPU)
    model.half_precision = True
    assert model.half_dtype("cpu") == torch.bfloat16 and model.half_dtype("cuda") == torch.float16
    model.half_precision = torch.float16  # CUDA's numerics on the CPU (slow kernels, tiny models only)
    assert model.half_dtype("cpu") == torch.float16
    model.half_precision = False
    assert model.half_dtype("cuda") is None
    whole = TSR.tiny(seed=0).to(torch.bfloat16)  # a model cast as a whole runs as it is
    whole.half_precision = True
    assert whole.half_dtype("cpu") is None
    loaded = TSR.from_pretrained(tiny_dir, weight_name="model.safetensors", half_precision=True)
    assert loaded.half_precision is True and loaded.dtype == torch.float32
    assert loaded.half_dtype("cpu", half_precision=False) is None  # a per-call choice wins over the model's
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(loaded(image), loaded(image, half_precision=False))
    torch.testing.assert_close(loaded(image, half_precision=False), TSR.from_pretrained(tiny_dir)(image))


def _occupancy(model, code, resolution=64):
    from triposr.mesh import scene_code_query_fn, sparse_level_grid

    level, _ = sparse_level_grid(
        scene_code_query_fn(model, code),
        radius=0.87,
        resolution=resolution,
        threshold=25.0,
        chunk_size=2**18,
        device="cpu",
    )
    return level > 0


@pytest.mark.parametrize(
    "dtype, max_abs, min_iou",
    [(torch.float16, 2e-3, 0.995), (torch.bfloat16, 1.5e-2, 0.98)],  # measured: 7e-4 / 0.999, 5e-3 / 0.991
)
def test_half_precision_trunk_keeps_the_mesh(tiny_dir, tiny_model, ref, image, dtype, max_abs, min_iou):
    """Image tokenizer + transformer in half (float16 is CUDA's default, run here through the same autocast path),
    upsampler and decoder in float32: scene codes stay float32 and close to float32's; the mesh's occupancy grid
    (R=64, the fixture field) keeps its IoU with float32's."""
    model = TSR.from_pretrained(tiny_dir, weight_name="model.safetensors", half_precision=dtype)
    seen = {}

    def record(name):
        def hook(module, args, output):
            seen[name] = output.dtype

        return hook

    hooks = [
        model.backbone.proj_in.register_forward_hook(record("transformer")),
        model.post_processor.register_forward_hook(record("upsampler")),
    ]
    codes = model(image)
    for h in hooks:
        h.remove()
    assert seen == {"transformer": dtype, "upsampler": torch.float32} and codes.dtype == torch.float32
    diff = (codes - ref["scene_codes"]).abs().max()
    assert 0 < diff < max_abs
    inside, inside_ref = _occupancy(model, codes[0]), _occupancy(tiny_model, ref["scene_codes"][0])
    iou = (inside & inside_ref).sum() / (inside | inside_ref).sum()
    assert iou > min_iou
    assert all(p.dtype == torch.float32 for p in model.parameters())  # weights untouched


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_default_half_on_cuda_matches_fp32(image):
    cuda = TSR.tiny(seed=0).to("cuda")
    assert cuda.half_dtype() == torch.float16
    codes = cuda(image)
    assert codes.dtype == torch.float32
    torch.testing.assert_close(codes.cpu(), TSR.tiny(seed=0)(image), atol=5e-3, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_cuda_matches_fp32(image):
    fp16 = TSR.tiny(seed=0).to("cuda", torch.float16)
    fp32 = TSR.tiny(seed=0)
    torch.testing.assert_close(fp16(image).float().cpu(), fp32(image), atol=5e-2, rtol=5e-2)


# ---------------------------------------------------------------- real checkpoint (only when cached)


@pytest.mark.slow
def test_real_checkpoint_loads_strictly_and_runs():
    try:
        model = TSR.from_pretrained("stabilityai/TripoSR")
    except MissingWeightsError as e:
        pytest.fail(f"RUN_SLOW=1 asked for the real TripoSR, but it is not in the local cache: {e}")
    image = Image.new("RGB", (512, 512), (128, 128, 128))
    codes = model([image])
    assert codes.shape == (1, 3, 40, 64, 64) and torch.isfinite(codes).all()


def test_extract_mesh_is_one_mesh_per_scene_code():
    model = TSR.tiny(seed=0)
    codes = model(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))  # (2, 3, 8, 8, 8)
    meshes = model.extract_mesh(codes, resolution=32)
    assert len(meshes) == 2 and all(len(m.faces) > 0 for m in meshes)
    radius = model.renderer.cfg.radius
    assert all(np.abs(m.vertices).max() <= radius + 1e-5 for m in meshes)
    assert meshes[0].visual.vertex_colors.shape == (len(meshes[0].vertices), 4)
    (single,) = model.extract_mesh(codes[1], resolution=32, has_vertex_color=False)  # one (3, C, H, W) code
    np.testing.assert_allclose(single.vertices, meshes[1].vertices, atol=1e-6)
    with pytest.raises(ValueError, match="scene_codes"):
        model.extract_mesh(codes[0, 0])


def test_mesh_speed_benchmark_runs_at_tiny_size(tmp_path, one_thread):
    """benchmarks/mesh_speed.py (stage "mesh-speed"): every case runs and reports its comparison."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.run import main

    out = tmp_path / "mesh-speed.json"
    argv = ["--stages", "mesh-speed", "--tiny", "--runs", "1", "--warmup", "0", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    cases = {c["params"].get("method") or c["params"].get("backend") or c["params"]["precision"]: c for c in
             json.loads(out.read_text())["cases"]}  # fmt: skip
    sparse = cases["sparse"]["result"]
    assert sparse["sparse"]["points_queried"] < sparse["sparse"]["points_total"]
    versus_dense = sparse["vs_dense_torch"]
    # An empty mesh (or two: their distance reads 0) must fail: faces on both sides, most of the dense mesh's, and
    # a finite distance (an empty side gives inf).
    assert sparse["faces"] == versus_dense["faces"] > 0 and versus_dense["reference_faces"] > 0, versus_dense
    assert versus_dense["faces"] >= 0.5 * versus_dense["reference_faces"], versus_dense
    assert 0.0 <= versus_dense["hausdorff_voxels"] < float("inf"), versus_dense
    assert cases["torch"]["result"]["faces"] == cases["pymcubes"]["result"]["faces"] > 0
    emulated = next(c["result"] for name, c in cases.items() if "emulated" in name)
    assert 0 < emulated["scene_code_vs_float32"]["max_abs_diff"] < 2e-3
    assert emulated["vs_float32"]["mesh_iou"] > 0.99 and not emulated["float16_overflow"]


def test_emulated_fp16_rounds_and_restores(tiny_model, image):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.mesh_speed import emulated_fp16

    weight = tiny_model.backbone.proj_in.weight
    before = weight.detach().clone()
    with emulated_fp16([tiny_model.backbone]) as stats:
        assert torch.equal(weight, before.half().float()) and not torch.equal(weight, before)
        codes = tiny_model(image, half_precision=False)
    assert torch.equal(weight, before) and stats["max_abs_output"] > 0
    assert 0 < (codes - tiny_model(image, half_precision=False)).abs().max() < 2e-3
