"""PeRFlow-Refiner: parity with upstream's ControlNet-Tile img2img script on tests/fixtures/instaflow_tiny/, the
tile resize, strict ControlNet loading and the missing-ControlNet error (exit 3)."""

import json
import shutil

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file, save_file

from t2mv.errors import EXIT_NO_WEIGHTS, exit_code
from t2mv.perflow.hub import MissingWeightsError
from t2mv.refiner import REFINER_NEGATIVE_PROMPT, REFINER_PROMPT_PREFIX, Refiner, load_controlnet, resize_for_tile
from t2mv.text_to_image import TextToImage


@pytest.fixture(scope="module")
def fixture_dir(request):
    return request.config.rootpath / "tests" / "fixtures" / "instaflow_tiny"


@pytest.fixture(scope="module")
def expected(fixture_dir):
    return load_file(fixture_dir / "outputs.safetensors")


@pytest.fixture(scope="module")
def case(fixture_dir):
    return json.loads((fixture_dir / "cases.json").read_text())["refiner"]


@pytest.fixture(scope="module")
def refiner(fixture_dir):
    return Refiner.from_pretrained(
        fixture_dir / "sd_base", controlnet=fixture_dir / "controlnet", delta=fixture_dir / "delta"
    )


def test_upstream_prompt_and_settings(case):
    assert REFINER_PROMPT_PREFIX == case["prompt_prefix"] and REFINER_NEGATIVE_PROMPT == case["negative_prompt"]


def test_tile_resize_matches_upstream_exactly(fixture_dir, expected):
    control = resize_for_tile(PIL.Image.open(fixture_dir / "refiner_input.png"), 128)
    assert control.size == (128, 128)
    assert np.array_equal(np.asarray(control), expected["refiner/control"].permute(1, 2, 0).numpy())
    # shortest side → size, sides rounded to multiples of 64
    assert resize_for_tile(PIL.Image.new("RGB", (96, 64)), 128).size == (192, 128)


def test_refined_image_and_step_latents_match_upstream(refiner, fixture_dir, expected, case):
    image = PIL.Image.open(fixture_dir / "refiner_input.png")
    out = refiner(image, case["prompt"], size=case["size"], seed=case["seed"], output_type="pt")
    assert out.settings["timesteps"] == expected["refiner/timesteps"].tolist() == [1000, 750, 500, 250]
    assert (out.settings["num_inference_steps"], out.settings["guidance_scale"]) == (4, 4.5)
    assert out.images.shape == (1, 3, 128, 128)
    torch.testing.assert_close(out.images, expected["refiner/images"], rtol=0, atol=1e-4)

    steps = []
    refiner.pipe(
        prompt=[REFINER_PROMPT_PREFIX + case["prompt"]],
        negative_prompt=[REFINER_NEGATIVE_PROMPT],
        image=out.control,
        control_image=out.control,
        strength=1.0,
        height=128,
        width=128,
        num_inference_steps=4,
        guidance_scale=4.5,
        generator=torch.Generator().manual_seed(case["seed"]),
        output_type="latent",
        callback=lambda i, t, latents: steps.append(latents.clone()),
    )
    reference = expected["refiner/step_latents"]
    assert len(steps) == len(reference)
    for i, latents in enumerate(steps):
        error = (latents - reference[i]).abs().max().item()
        assert error <= 1e-4 + 1e-5 * reference[i].abs().max().item(), f"step {i}: {error}"


def test_refiner_shares_a_perflow_stage_and_refuses_rectified_flow(fixture_dir):
    t2i = TextToImage.tiny(seed=0)
    net = Refiner.tiny(seed=0).pipe.controlnet
    refiner = Refiner.from_text_to_image(t2i, net)
    assert refiner.pipe.unet is t2i.pipe.unet and refiner.pipe.vae is t2i.pipe.vae
    out = refiner(PIL.Image.new("RGB", (64, 64), (200, 30, 30)), "a red car", size=128, seed=0)
    assert out.images[0].size == (128, 128) and out.timings["upscale"] > 0
    with pytest.raises(ValueError, match="rectified_flow"):
        Refiner.from_text_to_image(TextToImage.tiny(seed=0, kind="rectified_flow"), net)


def test_bad_calls_are_value_errors():
    refiner = Refiner.tiny(seed=0)
    image = PIL.Image.new("RGB", (64, 64))
    for kwargs, match in (
        ({"size": 100}, "multiple of 64"),
        ({"num_inference_steps": 3}, r"\[4, 100\]"),
        ({"output_type": "np"}, "output_type"),
        ({"seed": 1, "generator": torch.Generator()}, "either seed or generator"),
    ):
        with pytest.raises(ValueError, match=match):
            refiner(image, "a red car", **kwargs)


def test_missing_controlnet_is_missing_weights(tmp_path, fixture_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(MissingWeightsError) as info:
        Refiner.from_pretrained(fixture_dir / "sd_base", controlnet="lllyasviel/control_v11f1e_sd15_tile")
    assert exit_code(info.value) == EXIT_NO_WEIGHTS and "control_v11f1e_sd15_tile" in str(info.value)
    empty = tmp_path / "controlnet"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(MissingWeightsError, match="ControlNet-Tile"):
        load_controlnet(empty)


def test_controlnet_is_loaded_strictly(tmp_path, fixture_dir):
    folder = tmp_path / "controlnet"
    shutil.copytree(fixture_dir / "controlnet", folder)
    file = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(file)
    state.pop("controlnet_mid_block.bias")
    save_file(state, file)
    with pytest.raises(ValueError, match="controlnet_mid_block.bias"):
        load_controlnet(folder)


def test_chain_upscale_writes_image_side_png_beside_image_png(tmp_path):
    from t2mv.chain import TextTo3D

    chain = TextTo3D(TextToImage.tiny(seed=0), smoke=True)
    result = chain("a red car", upscale=128, output_dir=tmp_path)
    assert result.image.size == (64, 64)  # the 3D stages keep the image as made
    assert result.image_upscaled.size == (128, 128) and "upscale" in result.finished
    assert (tmp_path / "image.png").is_file() and (tmp_path / "image_128.png").is_file()
    assert result.info["upscale"]["size"] == [128, 128]
    # a rectified-flow chain refines with a separate PeRFlow model (smoke: the tiny one)
    rf = TextTo3D(TextToImage.tiny(seed=0, kind="rectified_flow"), smoke=True)
    assert rf("a red car", upscale=128).image_upscaled.size == (128, 128)


def test_chain_upscale_with_a_missing_controlnet_fails_before_any_stage(tmp_path, monkeypatch):
    from t2mv.chain import TextTo3D
    from t2mv.errors import exit_code

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    chain = TextTo3D(TextToImage.tiny(seed=0))  # not smoke: the real ControlNet is asked for
    with pytest.raises(MissingWeightsError, match="control_v11f1e_sd15_tile") as info:
        chain("a red car", upscale=1024, output_dir=tmp_path / "out")
    assert exit_code(info.value) == EXIT_NO_WEIGHTS
    assert not (tmp_path / "out" / "image.png").exists()  # nothing ran
