"""PeRFlowScheduler: parity with upstream (tests/fixtures/perflow_scheduler/) and the diffusers contract."""

import json
import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from t2mv.perflow.scheduler import PeRFlowScheduler

FIXTURE = "perflow_scheduler"


@pytest.fixture(scope="module")
def meta(request):
    path = request.config.rootpath / "tests" / "fixtures" / FIXTURE / "cases.json"
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def tensors(request):
    return load_file(request.config.rootpath / "tests" / "fixtures" / FIXTURE / "trajectories.safetensors")


def _case_names():
    path = Path(__file__).parent / "fixtures" / FIXTURE / "cases.json"
    return [c["name"] for c in json.loads(path.read_text())["cases"]]


def test_alphas_cumprod_match_upstream(tensors):
    assert torch.equal(PeRFlowScheduler().alphas_cumprod, tensors["alphas_cumprod"])


@pytest.mark.parametrize("name", _case_names())
def test_trajectory_matches_upstream(name, meta, tensors):
    case = next(c for c in meta["cases"] if c["name"] == name)
    scheduler = PeRFlowScheduler(
        num_time_windows=case["num_time_windows"],
        prediction_type=case["prediction_type"],
        **meta["scheduler_constructor"],
    )
    scheduler.set_timesteps(case["num_inference_steps_requested"], device="cpu")
    assert scheduler.timesteps.dtype == torch.int64
    assert scheduler.timesteps.tolist() == case["timesteps"]

    sample = tensors.get(f"{name}/x_T", tensors["x_T"])
    model_outputs = tensors[f"{name}/model_outputs"]
    expected = tensors[f"{name}/samples"]
    assert len(model_outputs) == len(scheduler.timesteps) == case["num_steps_run"]
    for i, t in enumerate(scheduler.timesteps):
        sample = scheduler.step(model_outputs[i], t, sample).prev_sample
        assert sample.dtype == expected.dtype
        if case["dtype"] == "float16":
            torch.testing.assert_close(sample, expected[i], rtol=2e-3, atol=2e-3)
        else:
            error = ((sample - expected[i]).abs() / expected[i].abs().clamp(min=1)).max().item()
            assert error <= 1e-5, f"step {i}: relative error {error}"
    assert str(sample.dtype).removeprefix("torch.") == case["final_sample_dtype"]


@pytest.mark.parametrize("windows", [1, 2, 4])
@pytest.mark.parametrize("prediction_type", ["diff_eps", "ddim_eps", "velocity"])
def test_saved_config_matches_upstream(windows, prediction_type, meta, tmp_path):
    PeRFlowScheduler(num_time_windows=windows, prediction_type=prediction_type).save_config(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved == meta["save_config"][f"W{windows}_{prediction_type}"]


@pytest.mark.parametrize("windows", [1, 2, 4])
def test_window_gammas_match_upstream(windows, meta):
    scheduler = PeRFlowScheduler(num_time_windows=windows, prediction_type="diff_eps")
    for window in meta["windows"][f"W{windows}"]:
        t_start, t_end = scheduler.window_of(window["window_start"])
        assert (t_start, t_end) == (window["window_start"], window["window_end"])
        lambda_s, _ = scheduler.window_endpoint_map(t_start, t_end)
        assert 1.0 / lambda_s.item() == pytest.approx(window["gamma"], rel=1e-6)


def test_window_boundaries_belong_to_the_window_starting_there():
    scheduler = PeRFlowScheduler(num_time_windows=4)
    assert scheduler.window_of(1.0) == (1.0, 0.75)
    assert scheduler.window_of(0.75) == (0.75, 0.5)
    assert scheduler.window_of(0.751) == (1.0, 0.75)
    assert scheduler.window_of(0.125) == (0.25, 0.0)
    with pytest.raises(ValueError, match="outside"):
        scheduler.window_of(0.0)


def test_diff_eps_coefficients_match_the_research_table():
    # perflow.md §1.4: (lambda_t, eta_t) at each of the 8 timesteps for SD1.5 diff_eps, W=4.
    table = {
        1000: (3.48579, -3.33927),
        875: (1.55415, -0.74441),
        750: (2.21445, -1.97580),
        625: (1.37781, -0.61466),
        500: (1.55965, -1.19687),
        375: (1.21864, -0.46759),
        250: (1.21625, -0.69230),
        125: (1.09758, -0.31237),
    }
    scheduler = PeRFlowScheduler(prediction_type="diff_eps")
    scheduler.set_timesteps(8)
    x, eps = torch.zeros(1, 1), torch.ones(1, 1)
    for t in scheduler.timesteps:
        t_start, t_end = scheduler.window_of(t.item() / 1000)
        # With x = 0 and eps = 1 the predicted window end is eta_t; with x = 1, eps = 0 it is lambda_t.
        v_eta = scheduler.step(eps, t, x).prev_sample
        v_lambda = scheduler.step(x, t, torch.ones(1, 1)).prev_sample
        i = scheduler.timesteps.tolist().index(t.item())
        t_next = scheduler.timesteps[i + 1].item() if i + 1 < 8 else 0
        dt, span = (t_next - t.item()) / 1000, t_end - t.item() / 1000
        lambda_t = 1 + (v_lambda.item() - 1) / dt * span
        eta_t = v_eta.item() / dt * span
        assert (lambda_t, eta_t) == pytest.approx(table[t.item()], abs=2e-5)


def test_diff_eps_equals_the_old_epsilon_formula():
    # Before upstream renamed it, the window end was (x - (1 - r) sqrt(1 - g^2) eps) / (g + r (1 - g)).
    scheduler = PeRFlowScheduler(prediction_type="diff_eps")
    scheduler.set_timesteps(12)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    eps = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    for i, t in enumerate(scheduler.timesteps):
        tc = t.item() / 1000
        t_start, t_end = scheduler.window_of(tc)
        lambda_s, _ = scheduler.window_endpoint_map(t_start, t_end)
        g = 1 / lambda_s.item()
        r = (tc - t_start) / (t_end - t_start)
        z_end = (x - (1 - r) * math.sqrt(1 - g**2) * eps) / (g + r * (1 - g))
        t_next = scheduler.timesteps[i + 1].item() / 1000 if i + 1 < 12 else 0.0
        expected = x + (t_next - tc) * (z_end - x) / (t_end - tc)
        got = scheduler.step(eps, t, x).prev_sample
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_from_upstream_config_file(request):
    config = PeRFlowScheduler.load_config(request.config.rootpath / "tests" / "fixtures" / FIXTURE)
    scheduler = PeRFlowScheduler.from_config(config)
    assert scheduler.config.prediction_type == "diff_eps"
    assert scheduler.config.num_time_windows == 4
    scheduler.set_timesteps(1)
    assert scheduler.timesteps.tolist() == [1000, 750, 500, 250]


SD15_DDIM_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
    "prediction_type": "epsilon",
}


def test_from_sd_config_maps_epsilon_to_diff_eps_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="t2mv.perflow.scheduler"):
        scheduler = PeRFlowScheduler.from_config(SD15_DDIM_CONFIG)
    assert scheduler.config.prediction_type == "diff_eps"
    assert "'epsilon'" in caplog.text and "diff_eps" in caplog.text
    assert torch.equal(scheduler.alphas_cumprod, PeRFlowScheduler().alphas_cumprod)

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="t2mv.perflow.scheduler"):
        explicit = PeRFlowScheduler.from_config(SD15_DDIM_CONFIG, prediction_type="velocity", num_time_windows=2)
    assert (explicit.config.prediction_type, explicit.config.num_time_windows) == ("velocity", 2)
    assert "epsilon" not in caplog.text


def test_bad_config_values_are_rejected():
    with pytest.raises(ValueError, match="prediction_type"):
        PeRFlowScheduler(prediction_type="v_prediction")
    with pytest.raises(ValueError, match="num_time_windows"):
        PeRFlowScheduler(num_time_windows=0)
    with pytest.raises(NotImplementedError, match="beta_schedule"):
        PeRFlowScheduler(beta_schedule="sigmoid")


def test_too_few_steps_are_raised_to_the_window_count(caplog):
    scheduler = PeRFlowScheduler(num_time_windows=4)
    with caplog.at_level(logging.WARNING, logger="t2mv.perflow.scheduler"):
        scheduler.set_timesteps(1, device="cpu")
    assert "running 4 steps" in caplog.text
    assert scheduler.timesteps.tolist() == [1000, 750, 500, 250]
    assert scheduler.num_inference_steps == 4


def test_too_many_steps_are_rejected():
    with pytest.raises(ValueError, match="fewer steps"):
        PeRFlowScheduler(num_time_windows=4).set_timesteps(2000)


def test_step_needs_set_timesteps_and_a_scheduled_timestep():
    scheduler = PeRFlowScheduler()
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(x, 1000, x)
    scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match="not one of the scheduled"):
        scheduler.step(x, 999, x)
    out = scheduler.step(x, 1000, x, return_dict=False)
    assert isinstance(out, tuple) and out[0].shape == x.shape


@pytest.mark.parametrize("prediction_type", ["diff_eps", "ddim_eps", "velocity"])
def test_fp16_latents_stay_fp16(prediction_type):
    scheduler = PeRFlowScheduler(prediction_type=prediction_type)
    scheduler.set_timesteps(4)
    x = torch.randn(1, 4, 4, 4).half()
    for t in scheduler.timesteps:
        x = scheduler.step(torch.randn(1, 4, 4, 4).half(), t, x).prev_sample
        assert x.dtype == torch.float16
    assert torch.isfinite(x).all()


def test_a_perfect_model_lands_on_the_window_ends():
    # For diff_eps, feeding the true "difference" noise makes each window's last step land on z_e exactly
    # (Euler is exact on a straight line), whatever the number of steps in the window.
    scheduler = PeRFlowScheduler(prediction_type="diff_eps", num_time_windows=2)
    z_clean = torch.randn(1, 4, 4, 4, dtype=torch.float64)
    # Build z_s for the two windows backwards from the clean end: z_s = g z_e + sqrt(1 - g^2) eps.
    eps = [torch.randn_like(z_clean) for _ in range(2)]
    gammas = [
        1 / scheduler.window_endpoint_map(*w)[0].item() for w in zip(scheduler.window_starts, scheduler.window_ends)
    ]
    z_mid = gammas[1] * z_clean + math.sqrt(1 - gammas[1] ** 2) * eps[1]
    z_noise = gammas[0] * z_mid + math.sqrt(1 - gammas[0] ** 2) * eps[0]
    scheduler.set_timesteps(6)
    assert scheduler.timesteps.tolist() == [1000, 833, 666, 500, 333, 166]
    x = z_noise
    for t in scheduler.timesteps:
        x = scheduler.step(eps[0 if t > 500 else 1], t, x).prev_sample
        if t == 666:  # the last step of the first window lands on its end
            torch.testing.assert_close(x, z_mid, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x, z_clean, rtol=1e-5, atol=1e-5)


def test_add_noise_uses_index_t_minus_one():
    scheduler = PeRFlowScheduler()
    x0, noise = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    noisy = scheduler.add_noise(x0, noise, torch.tensor([1000, 1]))
    abar = scheduler.alphas_cumprod[[999, 0]].reshape(2, 1, 1, 1)
    torch.testing.assert_close(noisy, abar.sqrt() * x0 + (1 - abar).sqrt() * noise)
    with pytest.raises(ValueError, match=r"\[1, 1000\]"):
        scheduler.add_noise(x0, noise, 0)


def test_diffusers_contract_attributes():
    scheduler = PeRFlowScheduler()
    x = torch.randn(1, 4, 2, 2)
    assert scheduler.scale_model_input(x, 1000) is x
    assert (scheduler.init_noise_sigma, scheduler.order, len(scheduler)) == (1.0, 1, 1000)
    assert {"DDIMScheduler", "PNDMScheduler", "DEISMultistepScheduler"} <= {c.__name__ for c in scheduler.compatibles}


def test_step_with_accelerator_timesteps_follows_schedule_without_reading_them():
    """Timesteps on a non-CPU device are never read back (no host sync); results equal the CPU path."""
    from t2mv.perflow.scheduler import PeRFlowScheduler

    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    results = []
    for device in ("cpu", "meta"):  # "meta" stands in for CUDA: its values cannot be read at all
        scheduler = PeRFlowScheduler(prediction_type="diff_eps")
        scheduler.set_timesteps(8, device="cpu")
        x = scheduler.step(eps, scheduler.timesteps[0], sample).prev_sample  # the first step looks its timestep up
        for t in scheduler.timesteps.to(device)[1:]:
            x = scheduler.step(eps, t, x).prev_sample
        results.append(x)
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)
