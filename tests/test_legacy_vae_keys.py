"""VAEs saved before diffusers 0.14 (old attention names) load strictly in both diffusion stages."""

import json

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import save_file

TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
    up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
    block_out_channels=[8, 16],
    latent_channels=4,
    norm_num_groups=4,
    sample_size=16,
)
NEW_TO_OLD = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


def _legacy_vae_folder(tmp_path):
    vae = AutoencoderKL(**TINY_VAE).eval()
    state = {}
    renamed = 0
    for key, value in vae.state_dict().items():
        for new, old in NEW_TO_OLD.items():
            if "mid_block.attentions" in key and f".{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
                renamed += 1
        state[key] = value.contiguous()
    assert renamed == 16  # encoder + decoder mid-block attention: 4 projections × weight/bias × 2
    folder = tmp_path / "vae"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL", **TINY_VAE}))
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    return vae, folder


def test_wonder3d_vae_loader_accepts_legacy_attention_names(tmp_path):
    from wonder3d_perflow.pipeline import _load_vae

    reference, folder = _legacy_vae_folder(tmp_path)
    loaded = _load_vae(folder, torch.float32)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)


def test_text_to_image_vae_loader_accepts_legacy_attention_names(tmp_path):
    from t2mv.text_to_image import _load_diffusers_component

    reference, folder = _legacy_vae_folder(tmp_path)
    loaded = _load_diffusers_component(AutoencoderKL, tmp_path, "vae", torch.float32)
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)


def test_a_truly_foreign_key_still_fails(tmp_path):
    from wonder3d_perflow.pipeline import _load_vae

    _, folder = _legacy_vae_folder(tmp_path)
    from safetensors.torch import load_file

    state = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    state["decoder.extra.weight"] = torch.zeros(1)
    save_file(state, str(folder / "diffusion_pytorch_model.safetensors"))
    with pytest.raises((RuntimeError, ValueError)):
        _load_vae(folder, torch.float32)
