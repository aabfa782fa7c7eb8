"""ΔW tools: bit-exact strict merge (tests/fixtures/perflow_t2i_tiny/), tolerant merge into the Wonder3D layout
(tests/fixtures/manifests/delta_map.json), load / save / compute round trips, offline hub resolution."""

import json
import logging

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from t2mv.perflow.delta import (
    DeltaReport,
    compute_delta,
    load_delta_weights,
    merge_delta_weights,
    save_delta,
)
from t2mv.perflow.hub import MissingWeightsError


@pytest.fixture(scope="module")
def tiny(request):
    return request.config.rootpath / "tests" / "fixtures" / "perflow_t2i_tiny"


@pytest.fixture
def tiny_unet(tiny):
    return UNet2DConditionModel.from_pretrained(tiny / "unet")


def test_strict_merge_is_bit_exact_with_upstream(tiny, tiny_unet):
    delta = load_delta_weights(tiny / "delta_merge_delta.safetensors")
    expected = load_file(tiny / "delta_merge_merged.safetensors")
    unet = tiny_unet.half()
    report = merge_delta_weights(unet, delta)
    assert report.complete and len(report.applied) == len(expected) == 208
    assert report.untouched == [] and report.strict
    merged = unet.state_dict()
    assert set(merged) == set(expected)
    for key, value in expected.items():
        assert merged[key].dtype == torch.float16
        assert torch.equal(merged[key], value), key


def test_fp32_unet_gets_upstreams_fp16_add_and_stays_fp32(tiny, tiny_unet):
    delta = load_delta_weights(tiny / "delta_merge_delta.safetensors")
    expected = load_file(tiny / "delta_merge_merged.safetensors")
    merge_delta_weights(tiny_unet, delta)
    for key, value in tiny_unet.state_dict().items():
        assert value.dtype == torch.float32
        assert torch.equal(value, expected[key].float()), key


def test_strict_merge_rejects_a_different_key_set(tiny_unet):
    delta = {k: torch.zeros_like(v) for k, v in tiny_unet.state_dict().items()}
    delta.pop("conv_out.bias")
    delta["extra.weight"] = torch.zeros(3)
    before = tiny_unet.conv_in.weight.clone()
    with pytest.raises(ValueError, match="strict=False") as info:
        merge_delta_weights(tiny_unet, {**delta, "conv_in.weight": torch.ones(1)})
    assert "extra" in str(info.value) and "conv_in.weight" in str(info.value)
    assert torch.equal(tiny_unet.conv_in.weight, before)  # nothing merged on failure


def test_tolerant_merge_reports_and_logs_everything(tiny_unet, caplog):
    state = tiny_unet.state_dict()
    delta = {k: torch.ones_like(v) for k, v in state.items() if not k.startswith("conv_out")}
    delta["conv_in.weight"] = torch.ones(16, 3, 3, 3)
    delta["not_in_unet.bias"] = torch.ones(4)
    before = {k: v.clone() for k, v in state.items()}
    with caplog.at_level(logging.INFO, logger="t2mv.perflow.delta"):
        report = merge_delta_weights(tiny_unet, delta, strict=False)
    assert report.skipped_shape == ["conv_in.weight"]
    assert report.shape_mismatches["conv_in.weight"] == ((16, 4, 3, 3), (16, 3, 3, 3))
    assert report.missing == ["not_in_unet.bias"]
    assert sorted(report.untouched) == ["conv_out.bias", "conv_out.weight"]
    assert len(report.applied) == len(state) - 3 and not report.complete
    after = tiny_unet.state_dict()
    assert torch.equal(after["conv_in.weight"], before["conv_in.weight"])
    assert torch.equal(after["conv_out.weight"], before["conv_out.weight"])
    torch.testing.assert_close(after["conv_in.bias"], before["conv_in.bias"] + 1)
    warning = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning and "conv_in.weight" in warning[0].getMessage() and "not_in_unet.bias" in warning[0].getMessage()


def test_tolerant_merge_into_the_wonder3d_layout_matches_upstream(request):
    manifests = request.config.rootpath / "tests" / "fixtures" / "manifests"
    sd15 = json.loads((manifests / "sd15_unet_keys.json").read_text())["keys"]
    wonder3d = json.loads((manifests / "wonder3d_unet_keys.json").read_text())["keys"]
    expected = json.loads((manifests / "delta_map.json").read_text())
    # Real shapes on the meta device: the merge arithmetic runs, no memory is used.
    target = {k: torch.empty(s, dtype=torch.float16, device="meta") for k, s in wonder3d.items()}
    delta = {k: torch.empty(s, dtype=torch.float16, device="meta") for k, s in sd15.items()}
    report = merge_delta_weights(target, delta, strict=False)
    assert report.applied == expected["applied"]
    assert report.skipped_shape == [s["key"] for s in expected["skipped"]] == ["conv_in.weight"]
    assert report.shape_mismatches["conv_in.weight"] == ((320, 8, 3, 3), (320, 4, 3, 3))
    assert sorted(report.untouched) == sorted(expected["wonder3d_untouched"])
    assert report.missing == expected["sd15_keys_missing_in_wonder3d"] == []
    summary = report.summary()
    assert "685 applied" in summary and "1 skipped" in summary and "116 UNet tensors untouched" in summary
    assert "class_embedding" in summary and "[320, 8, 3, 3]" in summary


def test_alpha_scales_the_delta():
    base = {"w": torch.tensor([1.0, 2.0, 3.0])}
    report = merge_delta_weights(base, {"w": torch.tensor([2.0, 2.0, -2.0])}, alpha=0.25)
    assert torch.equal(base["w"], torch.tensor([1.5, 2.5, 2.5]))
    assert report.alpha == 0.25 and "alpha=0.25" in report.summary()


def test_compute_delta_inverts_the_merge(tiny, tiny_unet):
    base = {k: v.clone() for k, v in tiny_unet.state_dict().items()}
    fine_tuned = {k: v + 0.01 * torch.randn_like(v) for k, v in base.items()}
    delta = compute_delta(fine_tuned, tiny_unet)
    assert set(delta) == set(base) and all(d.dtype == torch.float32 for d in delta.values())
    merge_delta_weights(tiny_unet, delta)
    for key, value in tiny_unet.state_dict().items():
        torch.testing.assert_close(value, fine_tuned[key], rtol=0, atol=1e-6)


def test_compute_delta_rejects_different_architectures():
    with pytest.raises(ValueError, match="only in merged"):
        compute_delta({"a": torch.zeros(1), "b": torch.zeros(1)}, {"a": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        compute_delta({"a": torch.zeros(2)}, {"a": torch.zeros(3)})


def test_save_and_load_round_trip(tmp_path, tiny_unet):
    delta = {k: torch.randn_like(v).half() for k, v in tiny_unet.state_dict().items()}
    file = save_delta(delta, tmp_path / "mine", variant="v0-1", config=tiny_unet.config)
    assert file.name == "diffusion_pytorch_model.v0-1.safetensors"
    assert json.loads((tmp_path / "mine" / "config.json").read_text())["block_out_channels"] == [16, 32]
    loaded = load_delta_weights(tmp_path / "mine")
    assert set(loaded) == set(delta) and all(torch.equal(loaded[k], delta[k]) for k in delta)

    single = save_delta(delta, tmp_path / "one.safetensors")
    assert torch.equal(load_delta_weights(single)["conv_in.weight"], delta["conv_in.weight"])
    save_delta(delta, tmp_path / "plain")
    assert set(load_delta_weights(tmp_path / "plain", variant=None)) == set(delta)


def test_upstream_local_delta_file_is_read(tmp_path):
    save_delta({"w": torch.ones(2)}, tmp_path / "delta_weights.safetensors")
    assert torch.equal(load_delta_weights(tmp_path)["w"], torch.ones(2))


def test_load_from_the_offline_hub_cache(tmp_path, monkeypatch):
    commit = "f" * 40
    repo = tmp_path / "hub" / "models--hansyan--perflow-sd15-delta-weights"
    save_delta({"conv_in.bias": torch.full((3,), 0.5).half()}, repo / "snapshots" / commit, variant="v0-1")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    delta = load_delta_weights()  # the default repo and variant
    assert delta["conv_in.bias"].dtype == torch.float16 and delta["conv_in.bias"].tolist() == [0.5] * 3

    with pytest.raises(MissingWeightsError, match="v0-0") as info:
        load_delta_weights(variant="v0-0")
    assert "huggingface-cli download hansyan/perflow-sd15-delta-weights" in str(info.value)


def test_missing_delta_repo_raises_missing_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(MissingWeightsError, match="'nobody/no-delta'"):
        load_delta_weights("nobody/no-delta")


def test_report_defaults():
    report = DeltaReport()
    assert report.complete and report.summary().startswith("ΔW merge (strict, alpha=1): 0 applied")


def test_lazy_delta_merges_like_the_eager_one(tiny):
    """Low-memory mode reads the ΔW one tensor at a time; the merge must not change."""
    from t2mv.perflow.delta import LazySafetensors

    eager = load_delta_weights(tiny / "delta_merge_delta.safetensors")
    lazy = load_delta_weights(tiny / "delta_merge_delta.safetensors", lazy=True)
    assert isinstance(lazy, LazySafetensors)
    assert set(lazy) == set(eager) and len(lazy) == len(eager)
    assert "not-a-key" not in lazy
    base = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(0)) for k, v in eager.items()}
    a = {k: v.clone() for k, v in base.items()}
    b = {k: v.clone() for k, v in base.items()}
    merge_delta_weights(a, eager)
    merge_delta_weights(b, lazy)
    assert all(torch.equal(a[k], b[k]) for k in a)
