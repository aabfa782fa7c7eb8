"""Rectified-flow text-to-image (InstaFlow, 2-rectified flow): the scheduler, parity with upstream's
RectifiedFlowPipeline on tests/fixtures/instaflow_tiny/, the model-kind dispatch and each kind's defaults."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from t2mv.errors import EXIT_BAD_INPUT, exit_code
from t2mv.perflow.rf_scheduler import RectifiedFlowScheduler
from t2mv.perflow.scheduler import PeRFlowScheduler
from t2mv.rectified_flow import INSTAFLOW_DEFAULTS, RECTIFIED_FLOW_DEFAULTS, defaults_for, kind_of_folder
from t2mv.text_to_image import TextToImage


@pytest.fixture(scope="module")
def fixture_dir(request):
    return request.config.rootpath / "tests" / "fixtures" / "instaflow_tiny"


@pytest.fixture(scope="module")
def expected(fixture_dir):
    return load_file(fixture_dir / "outputs.safetensors")


@pytest.fixture(scope="module")
def cases(fixture_dir):
    return json.loads((fixture_dir / "cases.json").read_text())


@pytest.fixture(scope="module")
def instaflow(fixture_dir):
    return TextToImage.from_pretrained(fixture_dir / "instaflow")


# --- the scheduler --------------------------------------------------------------------------------------------


def test_timesteps_are_upstreams_floats_and_dt_is_one_over_n():
    scheduler = RectifiedFlowScheduler()
    for n in (1, 2, 3, 7):
        scheduler.set_timesteps(n)
        expected = torch.tensor([(1.0 - i / n) * 1000.0 for i in range(n)], dtype=torch.float32)
        assert scheduler.timesteps.dtype == torch.float32 and torch.equal(scheduler.timesteps, expected)
        assert scheduler.dt == 1.0 / n
    scheduler.set_timesteps(3)
    assert scheduler.timesteps[1].item() == pytest.approx(666.6667, abs=1e-3)  # not truncated to an int


def test_step_is_one_euler_step_on_the_velocity():
    scheduler = RectifiedFlowScheduler()
    scheduler.set_timesteps(4)
    sample, velocity = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    out = scheduler.step(velocity, scheduler.timesteps[0], sample).prev_sample
    assert torch.equal(out, sample + 0.25 * velocity)
    assert scheduler.step(velocity, 1000.0, sample, return_dict=False)[0].shape == (1, 4, 8, 8)
    assert scheduler.init_noise_sigma == 1.0 and torch.equal(scheduler.scale_model_input(sample, 1000.0), sample)


def test_scheduler_rejects_bad_step_counts_and_step_before_set_timesteps():
    with pytest.raises(ValueError, match="set_timesteps"):
        RectifiedFlowScheduler().step(torch.zeros(1), 1000.0, torch.zeros(1))
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="positive int"):
            RectifiedFlowScheduler().set_timesteps(bad)


# --- parity with upstream -------------------------------------------------------------------------------------


def test_fixture_loads_as_a_rectified_flow_model_with_instaflow_defaults(instaflow):
    assert instaflow.kind == "rectified_flow" and isinstance(instaflow.pipe.scheduler, RectifiedFlowScheduler)
    assert instaflow.defaults == INSTAFLOW_DEFAULTS  # the folder is called "instaflow": 1 step, no guidance
    assert instaflow.settings["scheduler"] == "RectifiedFlowScheduler" and "num_time_windows" not in instaflow.settings
    assert instaflow.default_size == 64


@pytest.mark.parametrize("case", ["n1_cfg0", "n2_cfg1.5_neg", "n3_cfg1"])
def test_images_and_step_latents_match_upstream(case, instaflow, expected, cases):
    spec = next(c for c in cases["rf_cases"] if c["name"] == case)
    if spec["latents"] == "given":
        start = {"latents": expected["initial_latents"]}
    else:  # upstream drew the initial latents from this CPU generator: checks the init as well
        start = {"seed": cases["latent_seed"] + 1}
    kwargs = {"num_inference_steps": spec["num_inference_steps"], "guidance_scale": spec["guidance_scale"]}
    out = instaflow(cases["prompt"], spec["negative_prompt"], output_type="pt", **kwargs, **start)
    n = spec["num_inference_steps"]
    assert out.settings["timesteps"] == pytest.approx([(1 - i / n) * 1000 for i in range(n)])
    torch.testing.assert_close(out.images, expected[f"{case}/images"], rtol=0, atol=1e-4)

    steps = []
    generator = torch.Generator().manual_seed(start["seed"]) if "seed" in start else None
    instaflow.pipe(
        cases["prompt"],
        negative_prompt=spec["negative_prompt"],
        latents=start.get("latents"),
        generator=generator,
        output_type="latent",
        callback=lambda i, t, latents: steps.append(latents.clone()),
        **kwargs,
    )
    reference = expected[f"{case}/step_latents"]
    assert len(steps) == len(reference) == n
    for i, latents in enumerate(steps):
        torch.testing.assert_close(latents, reference[i], rtol=0, atol=1e-4)


def test_defaults_are_the_models_own(instaflow, expected, cases):
    # No arguments: InstaFlow's 1 step without guidance, i.e. upstream's n1_cfg0 case.
    out = instaflow(cases["prompt"], seed=cases["latent_seed"] + 1, output_type="pt")
    assert out.settings["num_inference_steps"] == 1 and out.settings["guidance_scale"] == 0.0
    torch.testing.assert_close(out.images, expected["n1_cfg0/images"], rtol=0, atol=1e-4)


# --- kinds, defaults and bounds -------------------------------------------------------------------------------


def test_defaults_for_each_kind():
    assert defaults_for("rectified_flow", "XCLiu/instaflow_0_9B_from_sd_1_5") == INSTAFLOW_DEFAULTS
    assert defaults_for("rectified_flow", "XCLiu/2_rectified_flow_from_sd_1_5") == RECTIFIED_FLOW_DEFAULTS
    perflow = defaults_for("perflow", "hansyan/perflow-sd15-dreamshaper")
    assert (perflow.num_inference_steps, perflow.guidance_scale, perflow.min_steps) == (4, 4.5, 4)
    assert INSTAFLOW_DEFAULTS.min_steps == RECTIFIED_FLOW_DEFAULTS.min_steps == 1
    with pytest.raises(ValueError, match="kind"):
        defaults_for("ddim")


def test_step_bounds_follow_the_kind(instaflow):
    perflow = TextToImage.tiny(seed=0)
    assert perflow.kind == "perflow" and isinstance(perflow.pipe.scheduler, PeRFlowScheduler)
    with pytest.raises(ValueError, match=r"\[4, 100\].*time window"):
        perflow("a red car", num_inference_steps=3)
    for bad in (0, 101):
        with pytest.raises(ValueError, match=r"\[1, 100\]"):
            instaflow("a red car", num_inference_steps=bad)


def test_tiny_rectified_flow_model():
    tiny = TextToImage.tiny(seed=0, kind="rectified_flow")
    assert tiny.kind == "rectified_flow" and tiny.defaults == INSTAFLOW_DEFAULTS
    out = tiny("a red car", seed=1)
    assert out.settings["timesteps"] == [1000.0] and out.images[0].size == (64, 64)
    with pytest.raises(ValueError, match="kind"):
        TextToImage.tiny(kind="sdxl")


@pytest.fixture
def instaflow_copy(fixture_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(fixture_dir / "instaflow", folder)
    return folder


def test_a_pipeline_that_is_neither_kind_is_bad_input(instaflow_copy):
    index = json.loads((instaflow_copy / "model_index.json").read_text())
    (instaflow_copy / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ValueError, match="StableDiffusionXLPipeline.*RectifiedFlowPipeline") as info:
        TextToImage.from_pretrained(instaflow_copy)
    assert exit_code(info.value) == EXIT_BAD_INPUT


def test_no_model_index_is_a_plain_sd15_folder(instaflow_copy):
    assert kind_of_folder(instaflow_copy) == "rectified_flow"
    (instaflow_copy / "model_index.json").unlink()
    assert kind_of_folder(instaflow_copy) == "perflow"


def test_the_perflow_delta_is_refused_for_a_rectified_flow_model(instaflow_copy, fixture_dir):
    with pytest.raises(ValueError, match="rectified-flow model.*--t2i-delta"):
        TextToImage.from_pretrained(instaflow_copy, delta=fixture_dir / "delta")


def test_rectified_flow_unet_is_loaded_strictly(instaflow_copy):
    from safetensors.torch import save_file

    file = instaflow_copy / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(file)
    state.pop("conv_out.bias")
    save_file(state, file)
    with pytest.raises(ValueError, match="conv_out.bias"):
        TextToImage.from_pretrained(instaflow_copy)


# --- the chain ------------------------------------------------------------------------------------------------


def test_chain_smoke_with_a_tiny_rectified_flow_model(tmp_path):
    from t2mv.chain import TextTo3D
    from t2mv.errors import BadInputError
    from t2mv.tiny import FakeRembgSession
    from triposr import TSR

    t2i = TextToImage.tiny(seed=0, kind="rectified_flow")
    chain = TextTo3D(t2i, None, TSR.tiny(seed=0), smoke=True, rembg_session=FakeRembgSession())
    # the model's own defaults become the chain's: 1 step, no guidance
    assert (chain.defaults.t2i_steps, chain.defaults.t2i_guidance) == (1, 0.0)
    result = chain("a red car", output_dir=tmp_path)
    assert result.image.size == (64, 64) and result.mesh is not None and len(result.mesh.faces) > 0
    assert (tmp_path / "image.png").is_file() and (tmp_path / "mesh.glb").is_file()
    assert "upscale" not in result.finished and not list(tmp_path.glob("image_*.png"))
    # a PeRFlow chain keeps one step per time window: 2 steps are refused before any stage runs
    perflow = TextTo3D(TextToImage.tiny(seed=0), smoke=True)
    with pytest.raises(BadInputError, match=r"t2i_steps must be an integer in \[4, 100\] for a PeRFlow model"):
        perflow("a red car", t2i_steps=2)
    assert chain("a red car", t2i_steps=2, mesh=False).image.size == (64, 64)  # rectified flow: 1..100
