"""resolve_pretrained: local folders, a hand-built offline hub cache, and the MissingWeightsError message."""

import json
import os
import pickle

import pytest

from t2mv.perflow.hub import MissingWeightsError, resolve_pretrained

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An HF hub cache with one repo, `fake-org/fake-model`, laid out as huggingface_hub writes it."""
    cache = tmp_path / "hub"
    repo = cache / "models--fake-org--fake-model"
    snapshot = repo / "snapshots" / COMMIT
    (snapshot / "unet").mkdir(parents=True)
    (snapshot / "unet" / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_tests_run_offline():
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_local_folder_is_returned_as_is(tmp_path):
    assert resolve_pretrained(tmp_path) == tmp_path
    assert resolve_pretrained(str(tmp_path), local_files_only=False) == tmp_path


def test_cached_repo_resolves_offline(hub_cache):
    folder = resolve_pretrained("fake-org/fake-model", allow_patterns=["unet/*"])
    assert folder == hub_cache / "models--fake-org--fake-model" / "snapshots" / COMMIT
    assert (folder / "unet" / "config.json").is_file()
    assert resolve_pretrained("fake-org/fake-model", revision=COMMIT) == folder


def test_cached_repo_resolves_with_local_files_only_even_when_env_allows_network(hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    folder = resolve_pretrained("fake-org/fake-model", local_files_only=True)
    assert folder.name == COMMIT


def test_missing_repo_raises_a_helpful_error(hub_cache):
    with pytest.raises(MissingWeightsError) as info:
        resolve_pretrained("fake-org/not-downloaded", allow_patterns=["*.json"])
    error = info.value
    assert isinstance(error, FileNotFoundError)
    message = str(error)
    assert "'fake-org/not-downloaded'" in message
    assert str(hub_cache) in message and "HF_HUB_CACHE" in message
    assert 'huggingface-cli download fake-org/not-downloaded --include "*.json"' in message
    assert "local folder" in message
    assert error.repo == "fake-org/not-downloaded" and error.cache_dir == hub_cache


def test_missing_revision_of_a_cached_repo_raises(hub_cache):
    with pytest.raises(MissingWeightsError, match="--revision v9"):
        resolve_pretrained("fake-org/fake-model", revision="v9")


@pytest.mark.parametrize("path", ["./no/such/folder", "/no/such/folder", "a/b/c"])
def test_missing_local_folder_raises(path, hub_cache):
    with pytest.raises(MissingWeightsError, match="no such local folder"):
        resolve_pretrained(path)


def test_a_file_is_not_a_model_folder(tmp_path):
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"")
    with pytest.raises(MissingWeightsError, match="pass the folder"):
        resolve_pretrained(file)


def test_error_survives_pickling():
    error = pickle.loads(pickle.dumps(MissingWeightsError("org/name", "gone")))
    assert error.repo == "org/name" and "gone" in str(error)


# --- the published layouts of the rectified-flow models and the refiner's ControlNet ----------------------------
# File names and configs as the repositories publish them (weights are stand-ins: their real shapes are checked
# on the meta device below, against the SD1.5 manifest and the ControlNet's own config).

RF_MODEL_INDEX = {
    "_class_name": "RectifiedFlowPipeline",
    "_diffusers_version": "0.21.4",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "requires_safety_checker": True,
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
RF_FILES = (
    "model_index.json",
    "feature_extractor/preprocessor_config.json",
    "safety_checker/config.json",
    "safety_checker/model.safetensors",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",  # 3.44 GB: float32 SD1.5 UNet
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
)
# lllyasviel/control_v11f1e_sd15_tile config.json (the architecture fields).
TILE_CONFIG = {
    "_class_name": "ControlNetModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "class_embed_type": None,
    "conditioning_embedding_out_channels": [16, 32, 96, 256],
    "controlnet_conditioning_channel_order": "rgb",
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "global_pool_conditions": False,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "projection_class_embeddings_input_dim": None,
    "resnet_time_scale_shift": "default",
    "upcast_attention": False,
    "use_linear_projection": False,
}
TILE_FILES = (
    "config.json",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
    "diffusion_pytorch_model.fp16.safetensors",
    "diffusion_pytorch_model.safetensors",
)


def _cache_repo(cache, repo_id, files, contents):
    snapshot = cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / COMMIT
    for name in files:
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_text(json.dumps(contents[name]) if name in contents else "")
    (snapshot.parent.parent / "refs").mkdir(exist_ok=True)
    (snapshot.parent.parent / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def published_cache(tmp_path, monkeypatch):
    from t2mv.text_to_image import SD15_UNET_CONFIG

    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    contents = {"model_index.json": RF_MODEL_INDEX, "unet/config.json": SD15_UNET_CONFIG}
    for repo_id in ("XCLiu/instaflow_0_9B_from_sd_1_5", "XCLiu/2_rectified_flow_from_sd_1_5"):
        _cache_repo(cache, repo_id, RF_FILES, contents)
    _cache_repo(cache, "lllyasviel/control_v11f1e_sd15_tile", TILE_FILES, {"config.json": TILE_CONFIG})
    return cache


@pytest.mark.parametrize(
    ("repo_id", "steps", "guidance"),
    [("XCLiu/instaflow_0_9B_from_sd_1_5", 1, 0.0), ("XCLiu/2_rectified_flow_from_sd_1_5", 25, 1.5)],
)
def test_rectified_flow_repos_resolve_offline_as_their_kind(published_cache, repo_id, steps, guidance):
    from t2mv.rectified_flow import defaults_for, kind_of_folder
    from t2mv.text_to_image import _WEIGHTS, _weights_file

    folder = resolve_pretrained(repo_id, allow_patterns=["model_index.json", "*/config.json"])
    assert kind_of_folder(folder) == "rectified_flow"
    defaults = defaults_for("rectified_flow", repo_id)
    assert (defaults.num_inference_steps, defaults.guidance_scale, defaults.min_steps) == (steps, guidance, 1)
    # our loader finds one weights file per component in the published layout (no fp16 variants there)
    for component in _WEIGHTS:
        assert _weights_file(folder, component, fp16=False)[0].parent.name == component
        assert _weights_file(folder, component, fp16=True)[1] is None


def test_rectified_flow_unet_config_has_the_sd15_shapes(published_cache, request):
    import torch
    from diffusers import UNet2DConditionModel

    folder = resolve_pretrained("XCLiu/instaflow_0_9B_from_sd_1_5")
    config = json.loads((folder / "unet" / "config.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    manifest = request.config.rootpath / "tests" / "fixtures" / "manifests" / "sd15_unet_keys.json"
    expected = json.loads(manifest.read_text())["keys"]  # key → shape of the real SD1.5 UNet (686 tensors)
    assert {k: list(v.shape) for k, v in unet.state_dict().items()} == expected


def test_tile_controlnet_layout_and_shapes(published_cache):
    import torch
    from diffusers import ControlNetModel

    from t2mv.refiner import _controlnet_file

    folder = resolve_pretrained("lllyasviel/control_v11f1e_sd15_tile", allow_patterns=["config.json", "*.safetensors"])
    assert _controlnet_file(folder, fp16=False).name == "diffusion_pytorch_model.safetensors"
    assert _controlnet_file(folder, fp16=True).name == "diffusion_pytorch_model.fp16.safetensors"
    with torch.device("meta"):
        net = ControlNetModel.from_config(json.loads((folder / "config.json").read_text()))
    state = net.state_dict()
    assert tuple(state["controlnet_cond_embedding.conv_in.weight"].shape) == (16, 3, 3, 3)
    assert tuple(state["controlnet_cond_embedding.conv_out.weight"].shape) == (320, 256, 3, 3)
    assert tuple(state["controlnet_mid_block.weight"].shape) == (1280, 1280, 1, 1)
    assert len([k for k in state if k.startswith("controlnet_down_blocks.") and k.endswith(".weight")]) == 12
    # the published files: 1.45 GB in float32, 723 MB in float16
    count = sum(v.numel() for v in state.values())
    assert abs(count * 4 - 1.45e9) < 0.01e9 and abs(count * 2 - 723e6) < 1e6


def test_missing_tile_controlnet_names_the_repo(published_cache):
    from t2mv.refiner import load_controlnet

    with pytest.raises(MissingWeightsError, match="lllyasviel/control_v11f1e_sd15_other"):
        load_controlnet("lllyasviel/control_v11f1e_sd15_other")
