"""UNetMV2DConditionModel: exact upstream key→shape map, config handling, strict loading, upstream parity."""

import json

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor
from safetensors.torch import load_file, save_file

from t2mv.perflow.hub import MissingWeightsError
from wonder3d_perflow.unet_mv2d import MVTransformerBlock, UNetMV2DConditionModel

CASES = ("b12_t1000", "b12_t250", "b24_cfg_t500")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def manifest(request):
    path = request.config.rootpath / "tests/fixtures/manifests/wonder3d_unet_keys.json"
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def tiny_dir(request):
    return request.config.rootpath / "tests/fixtures/wonder3d_unet_tiny"


@pytest.fixture(scope="module")
def tiny_unet(tiny_dir):
    unet = UNetMV2DConditionModel.from_config(json.loads((tiny_dir / "config.json").read_text()))
    unet.load_state_dict(load_file(tiny_dir / "weights.safetensors"), strict=True)
    return unet.eval()


@pytest.fixture(scope="module")
def tiny_io(tiny_dir):
    return load_file(tiny_dir / "inputs.safetensors"), load_file(tiny_dir / "outputs.safetensors")


def _run(unet, inputs, case):
    with torch.no_grad():
        return unet(
            inputs[f"{case}/sample"],
            inputs[f"{case}/timestep"],
            encoder_hidden_states=inputs[f"{case}/encoder_hidden_states"],
            class_labels=inputs[f"{case}/class_labels"],
        ).sample


def test_real_config_gives_exact_upstream_state_dict_on_meta(manifest):
    with torch.device("meta"):
        unet = UNetMV2DConditionModel.from_config(manifest["config_fed_to_from_config"])
    shapes = {key: list(value.shape) for key, value in unet.state_dict().items()}
    assert list(shapes) == list(manifest["keys"])  # same keys, same order
    assert shapes == manifest["keys"]
    assert len(shapes) == manifest["num_tensors"] == 802
    assert sum(p.numel() for p in unet.parameters()) == manifest["num_params"]
    assert list(unet.buffers()) == []  # everything is in the state dict, so meta build + assign loads it all
    assert sum(isinstance(m, MVTransformerBlock) for m in unet.modules()) == 16


@pytest.mark.parametrize("batch", [12, 24])
def test_real_size_forward_shapes_on_meta(manifest, batch):
    # The whole real-size forward (multiview groups of 6 × 1024 tokens at the top level, joint pairs) on the meta
    # device: shapes only, no memory.
    with torch.device("meta"):
        unet = UNetMV2DConditionModel.from_config(manifest["config_fed_to_from_config"])
        out = unet(
            torch.empty(batch, 8, 32, 32),
            torch.tensor(1000),
            encoder_hidden_states=torch.empty(batch, 1, 768),
            class_labels=torch.empty(batch, 10),
        ).sample
    assert out.shape == (batch, 4, 32, 32)


def test_defaults_are_the_v1_architecture(manifest):
    with torch.device("meta"):
        unet = UNetMV2DConditionModel()
    assert {k: list(v.shape) for k, v in unet.state_dict().items()} == manifest["keys"]


def test_config_keeps_upstream_names_and_round_trips(tmp_path, manifest):
    config = {**manifest["config_fed_to_from_config"], "_name_or_path": "/somewhere/ckpts"}
    with torch.device("meta"):
        unet = UNetMV2DConditionModel.from_config(config)
    assert unet.config.down_block_types[0] == "CrossAttnDownBlockMV2D"
    assert unet.config.mid_block_type == "UNetMidBlockMV2DCrossAttn"
    assert unet.config.joint_attention_twice is True  # legacy key accepted (and ignored)
    unet.save_config(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["_class_name"] == "UNetMV2DConditionModel"
    assert saved["up_block_types"] == manifest["config_fed_to_from_config"]["up_block_types"]
    with torch.device("meta"):
        again = UNetMV2DConditionModel.from_config(saved)
    assert again.state_dict().keys() == unet.state_dict().keys()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"unknown_flag": True}, "unknown config keys"),
        ({"_class_name": "UNet2DConditionModel"}, "not 'UNetMV2DConditionModel'"),
        ({"sparse_mv_attention": True}, "must be false"),
        ({"cd_attention_last": True}, "must be false"),
        ({"down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"]}, "unsupported down_block_types"),
    ],
)
def test_bad_configs_are_rejected(manifest, change, message):
    config = {**manifest["config_fed_to_from_config"], **change}
    with pytest.raises(ValueError, match=message), torch.device("meta"):
        UNetMV2DConditionModel.from_config(config)


@pytest.mark.parametrize("case", CASES)
def test_tiny_matches_upstream(tiny_unet, tiny_io, case):
    inputs, outputs = tiny_io
    error = (_run(tiny_unet, inputs, case) - outputs[f"{case}/out"]).abs().max().item()
    assert error <= 1e-4, f"{case}: max |Δ| = {error:.2e}"


def test_any_stock_processor_gives_the_same_result(tiny_dir, tiny_io):
    # The view grouping lives in the block, so replacing SDPA by the plain bmm processor changes nothing.
    unet = UNetMV2DConditionModel.from_config(json.loads((tiny_dir / "config.json").read_text()))
    unet.load_state_dict(load_file(tiny_dir / "weights.safetensors"))
    unet.set_attn_processor(AttnProcessor())
    inputs, outputs = tiny_io
    assert (_run(unet.eval(), inputs, "b24_cfg_t500") - outputs["b24_cfg_t500/out"]).abs().max() <= 1e-4


def test_views_and_domains_interact(tiny_unet, tiny_io):
    inputs, _ = tiny_io
    case = "b12_t1000"
    base = _run(tiny_unet, inputs, case)
    changed = dict(inputs)
    sample = inputs[f"{case}/sample"].clone()
    sample[3] += 1.0  # the back normal only
    changed[f"{case}/sample"] = sample
    out = _run(tiny_unet, changed, case)
    moved = (out - base).flatten(1).abs().amax(1)
    assert (moved[:6] > 1e-3).all()  # multiview attention: every normal view sees the back normal
    assert moved[9] > 1e-3  # joint attention: the back color sees the back normal


def test_permuting_views_permutes_outputs(tiny_unet, tiny_io):
    # Attention over a group is symmetric in its views: reorder views in both domains, outputs follow.
    inputs, _ = tiny_io
    case = "b12_t250"
    order = torch.tensor([2, 0, 1, 5, 3, 4])
    index = torch.cat([order, order + 6])
    permuted = {k: (v[index] if k.startswith(case) and v.dim() > 0 else v) for k, v in inputs.items()}
    assert torch.allclose(_run(tiny_unet, permuted, case), _run(tiny_unet, inputs, case)[index], atol=1e-5)


def test_batch_must_hold_whole_view_groups(tiny_unet, tiny_io):
    inputs, _ = tiny_io
    case = "b12_t1000"
    with pytest.raises(ValueError, match="num_views=6"), torch.no_grad():
        tiny_unet(
            inputs[f"{case}/sample"][:5],
            1000,
            encoder_hidden_states=inputs[f"{case}/encoder_hidden_states"][:5],
            class_labels=inputs[f"{case}/class_labels"][:5],
        )


@pytest.mark.parametrize("suffix", ["safetensors", "bin"])
def test_from_pretrained_loads_strictly(tmp_path, tiny_dir, tiny_io, suffix):
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_dir / "config.json").read_text())
    weights = load_file(tiny_dir / "weights.safetensors")
    if suffix == "bin":
        torch.save({k: v.half() for k, v in weights.items()}, folder / "diffusion_pytorch_model.bin")
    else:
        save_file(weights, folder / "diffusion_pytorch_model.safetensors")
    unet = UNetMV2DConditionModel.from_pretrained(tmp_path)
    assert unet.dtype == torch.float32 and unet.device.type == "cpu" and not unet.training
    inputs, outputs = tiny_io
    tolerance = 1e-4 if suffix == "safetensors" else 5e-2  # the .bin copy was rounded to fp16
    assert (_run(unet, inputs, "b12_t1000") - outputs["b12_t1000/out"]).abs().max() <= tolerance


@pytest.mark.parametrize("suffix", ["safetensors", "bin"])
@pytest.mark.parametrize("change", ["missing", "extra", "both"])
def test_from_pretrained_rejects_missing_or_extra_keys(tmp_path, tiny_dir, suffix, change):
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_dir / "config.json").read_text())
    weights = load_file(tiny_dir / "weights.safetensors")
    if change in ("missing", "both"):
        weights.pop(next(k for k in weights if "attn_joint_mid" in k))
    if change in ("extra", "both"):  # e.g. an older release's name for a block this architecture does not have
        weights["mid_block.attentions.0.transformer_blocks.0.attn_joint_twice.to_q.weight"] = torch.zeros(4, 4)
    if suffix == "bin":
        torch.save({k: v.half() for k, v in weights.items()}, folder / "diffusion_pytorch_model.bin")
    else:
        save_file(weights, folder / "diffusion_pytorch_model.safetensors")
    expected = {"missing": "Missing key", "extra": "Unexpected key", "both": "Missing key.*Unexpected key"}[change]
    with pytest.raises(RuntimeError, match=f"(?s){expected}"):
        UNetMV2DConditionModel.from_pretrained(tmp_path)


def test_from_pretrained_without_weights_says_so(tmp_path, tiny_dir):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text((tiny_dir / "config.json").read_text())
    with pytest.raises(MissingWeightsError, match="diffusion_pytorch_model"):
        UNetMV2DConditionModel.from_pretrained(tmp_path)
    with pytest.raises(MissingWeightsError):
        UNetMV2DConditionModel.from_pretrained(tmp_path / "nowhere")
