"""PeRFlow scheduler: Euler steps along a piecewise-linear (per time window) rectified flow.

Written from the maths in the PeRFlow paper (Yan et al., "PeRFlow: Piecewise Rectified Flow as Universal
Plug-and-Play Accelerator", arXiv 2405.07510) and checked against the upstream scheduler's behaviour
(tests/fixtures/perflow_scheduler/).

Notation (time ``t`` in [0, 1], 1 = pure noise; a train timestep is ``t * num_train_timesteps``):

- The time axis is cut into ``W = num_time_windows`` windows ``(t_s -> t_e)``: starts ``W/W, (W-1)/W, ..., 1/W``,
  each ending where the next starts, the last one at ``t_clean``.
- Inside a window the flow is a straight line from ``z_s`` (at ``t_s``) to ``z_e`` (at ``t_e``), so the point at
  time ``t`` is ``x_t = z_s + r (z_e - z_s)`` with ``r = (t - t_s) / (t_e - t_s)``.
- ``alpha_bar_s = alphas_cumprod[t_s * 1000 - 1]`` and ``alpha_bar_e = alphas_cumprod[max(t_e * 1000 - 1, 0)]``;
  ``gamma = sqrt(alpha_bar_s / alpha_bar_e)``.
- An epsilon-type prediction defines the window-end map ``z_e = lambda_s z_s + eta_s eps``:
    * ``diff_eps``: ``lambda_s = 1/gamma``, ``eta_s = -sqrt(1 - gamma^2)/gamma`` (the noise of the "difference"
      diffusion ``z_s = gamma z_e + sqrt(1 - gamma^2) eps``). Used by every SD1.5 PeRFlow model and the ΔW.
    * ``ddim_eps``: ``lambda_s = sqrt(abar_e/abar_s)``, ``eta_s = sqrt(1 - abar_e) - sqrt(abar_e (1 - abar_s)/abar_s)``
      (a DDIM jump with a standard SD epsilon). Used by the SDXL PeRFlow models.
  From ``x_t`` the same map reads ``z_e = lambda_t x_t + eta_t eps`` with
  ``D = lambda_s (t - t_s) + (t_e - t)``, ``lambda_t = lambda_s (t_e - t_s)/D``, ``eta_t = eta_s (t_e - t)/D``;
  the velocity is ``v = (z_e - x_t) / (t_e - t)``.
- ``velocity``: the model output is ``v`` itself (``hansyan/perflow-sd21-artius``).

Every type then takes the Euler step ``x_next = x_t + (t_next - t) v``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput

logger = logging.getLogger(__name__)

PredictionType = Literal["diff_eps", "ddim_eps", "velocity"]
PREDICTION_TYPES = ("diff_eps", "ddim_eps", "velocity")

# Half a train-timestep grid cell would also do; upstream tests ``t - 0.1 / num_train_timesteps <= t_end``, so a
# time point lying on a window boundary belongs to the window that *starts* there (the less noisy one).
_BOUNDARY_TOLERANCE = 0.1


@dataclass
class PeRFlowSchedulerOutput(BaseOutput):
    """Output of [`PeRFlowScheduler.step`].

    Args:
        prev_sample (`torch.Tensor`): the sample at the next (less noisy) timestep, in the dtype of the input sample.
        pred_original_sample (`None`): PeRFlow does not estimate x_0; kept for the diffusers output contract.
    """

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Glide's cosine schedule (Nichol & Dhariwal 2021, eq. 17), as diffusers' ``squaredcos_cap_v2``."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_train_timesteps) / alpha_bar(i / num_train_timesteps), max_beta)
        for i in range(num_train_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float32)


class PeRFlowScheduler(SchedulerMixin, ConfigMixin):
    """Sampler for PeRFlow-accelerated diffusion models (piecewise rectified flow, Euler steps per window).

    Args:
        num_train_timesteps (`int`, defaults to 1000): number of diffusion steps the base model was trained with.
        beta_start (`float`, defaults to 0.00085): first beta of the base model's noise schedule.
        beta_end (`float`, defaults to 0.012): last beta.
        beta_schedule (`str`, defaults to `"scaled_linear"`): `"linear"`, `"scaled_linear"` or
            `"squaredcos_cap_v2"`.
        trained_betas (`list[float]`, *optional*): explicit betas; override the schedule.
        set_alpha_to_one (`bool`, defaults to `False`): kept for config compatibility; only sets
            `final_alpha_cumprod`, which sampling does not use.
        prediction_type (`str`, defaults to `"ddim_eps"`): `"diff_eps"`, `"ddim_eps"` or `"velocity"` (see the
            module docstring). The old name `"epsilon"`, which every SD scheduler config carries, is read as
            `"diff_eps"` (upstream renamed it; the two are the same map) with a warning.
        t_noise (`float`, defaults to 1): noisy end of the time axis (only checked against `t_clean`).
        t_clean (`float`, defaults to 0): clean end of the last window.
        num_time_windows (`int`, defaults to 4): number of piecewise-linear windows the model was trained with;
            it is also the minimum number of sampling steps.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: np.ndarray | list[float] | None = None,
        set_alpha_to_one: bool = False,
        prediction_type: str = "ddim_eps",
        t_noise: float = 1,
        t_clean: float = 0,
        num_time_windows: int = 4,
    ):
        if prediction_type == "epsilon":
            logger.warning(
                "PeRFlowScheduler: prediction_type 'epsilon' (the old PeRFlow name, and the value in every SD "
                "scheduler config) is read as 'diff_eps'. Pass prediction_type='diff_eps' (SD1.5 PeRFlow / ΔW), "
                "'ddim_eps' (SDXL PeRFlow) or 'velocity' (SD2.1 PeRFlow) explicitly to silence this."
            )
            prediction_type = "diff_eps"
            self.register_to_config(prediction_type=prediction_type)
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"PeRFlowScheduler: unknown prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}. "
                "When building from another scheduler's config, pass it explicitly, e.g. "
                "PeRFlowScheduler.from_config(config, prediction_type='diff_eps')."
            )
        if not isinstance(num_time_windows, int) or num_time_windows < 1:
            raise ValueError(f"PeRFlowScheduler: num_time_windows must be a positive int, got {num_time_windows!r}.")
        if not 0 <= t_clean < t_noise <= 1:
            raise ValueError(
                f"PeRFlowScheduler: need 0 <= t_clean < t_noise <= 1, got t_clean={t_clean}, t_noise={t_noise}."
            )

        if trained_betas is not None:
            self.betas = torch.tensor(trained_betas, dtype=torch.float32)
        elif beta_schedule == "linear":
            self.betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        elif beta_schedule == "scaled_linear":
            # The latent-diffusion schedule: linear in sqrt(beta).
            self.betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
        elif beta_schedule == "squaredcos_cap_v2":
            self.betas = _cosine_betas(num_train_timesteps)
        else:
            raise NotImplementedError(f"PeRFlowScheduler: beta_schedule {beta_schedule!r} is not implemented.")

        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # (num_train_timesteps,) float32, on CPU
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0

        # Window k runs from starts[k] down to ends[k].
        self.window_starts = [(num_time_windows - k) / num_time_windows for k in range(num_time_windows)]
        self.window_ends = self.window_starts[1:] + [float(t_clean)]

        self.num_inference_steps: int | None = None
        self._step_index: int | None = None
        self.timesteps = torch.from_numpy(
            np.arange(num_train_timesteps, 0, -1, dtype=np.int64)
        )  # placeholder until set_timesteps

    def __len__(self) -> int:
        return self.config.num_train_timesteps

    def scale_model_input(self, sample: torch.Tensor, timestep: int | torch.Tensor | None = None) -> torch.Tensor:
        """PeRFlow needs no input scaling; returns `sample` unchanged (diffusers interchangeability)."""
        return sample

    def window_of(self, t: float) -> tuple[float, float]:
        """The window ``(t_start, t_end)`` that time point ``t`` in (0, 1] belongs to.

        A point on a boundary belongs to the window that starts there (``0.75 -> (0.75, 0.5)``).
        """
        tolerance = _BOUNDARY_TOLERANCE / self.config.num_train_timesteps
        for t_start, t_end in zip(self.window_starts, self.window_ends):
            if t - tolerance > t_end:
                return t_start, t_end
        raise ValueError(f"PeRFlowScheduler: time point {t} lies outside the sampling range (t_clean, 1].")

    def window_endpoint_map(self, t_start: float, t_end: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lambda_s, eta_s)`` of the window-end map ``z_e = lambda_s z_s + eta_s eps`` (float32, 0-dim).

        Only defined for the epsilon-type predictions (``diff_eps``, ``ddim_eps``).
        """
        n = self.config.num_train_timesteps
        idx_start = int(t_start * n - 1)
        idx_end = max(int(t_end * n - 1), 0)
        abar_s = self.alphas_cumprod[idx_start]
        abar_e = self.alphas_cumprod[idx_end]
        gamma = (abar_s / abar_e).sqrt()
        if self.config.prediction_type == "diff_eps":
            lambda_s = 1.0 / gamma
            eta_s = -(1.0 - gamma**2).sqrt() / gamma
        elif self.config.prediction_type == "ddim_eps":
            lambda_s = (abar_e / abar_s).sqrt()
            eta_s = (1.0 - abar_e).sqrt() - (abar_e * (1.0 - abar_s) / abar_s).sqrt()
        else:
            raise ValueError("window_endpoint_map is only defined for 'diff_eps' and 'ddim_eps'.")
        return lambda_s, eta_s

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Place `num_inference_steps` timesteps, evenly inside each window, each window start included.

        Requests below `num_time_windows` are raised to it (one step per window is the minimum). Leftover steps
        go to the noisiest windows. Timesteps are ``int(t * num_train_timesteps)`` (truncated), e.g. 20 steps
        with 4 windows end in ..., 150, 99, 49.
        """
        num_windows = self.config.num_time_windows
        if num_inference_steps < num_windows:
            logger.warning(
                "PeRFlowScheduler: %d inference steps requested but the model has %d time windows; running %d "
                "steps (one per window is the minimum).",
                num_inference_steps,
                num_windows,
                num_windows,
            )
            num_inference_steps = num_windows

        points = []
        for k, (t_start, t_end) in enumerate(zip(self.window_starts, self.window_ends)):
            steps_in_window = num_inference_steps // num_windows + (1 if k < num_inference_steps % num_windows else 0)
            points.append(np.linspace(t_start, t_end, num=steps_in_window, endpoint=False))  # float64
        timesteps = (np.concatenate(points) * self.config.num_train_timesteps).astype(np.int64)
        if len(np.unique(timesteps)) != len(timesteps):
            raise ValueError(
                f"PeRFlowScheduler: {num_inference_steps} steps do not fit on the {self.config.num_train_timesteps}-step "
                "train grid (two steps would share a timestep); use fewer steps."
            )
        self.num_inference_steps = num_inference_steps
        self._timesteps_cpu = torch.from_numpy(timesteps)  # (num_inference_steps,) int64, read by step()
        self._step_index = None
        self.timesteps = self._timesteps_cpu.to(device)  # (num_inference_steps,) int64

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> PeRFlowSchedulerOutput | tuple[torch.Tensor]:
        """One Euler step of the piecewise rectified flow from `timestep` to the next scheduled timestep.

        Args:
            model_output (`torch.Tensor`): the UNet output (an epsilon of the type `prediction_type`, or a velocity).
            timestep (`int` or 0-dim `torch.Tensor`): the current timestep, one of `self.timesteps`.
            sample (`torch.Tensor`): the current sample ``x_t``; the result keeps its dtype and device.
            return_dict (`bool`): return a [`PeRFlowSchedulerOutput`] rather than a tuple.
        """
        if self.num_inference_steps is None:
            raise ValueError("PeRFlowScheduler: call set_timesteps(num_inference_steps) before step().")
        n = self.config.num_train_timesteps

        # 1. Where we are: position in the schedule and the next timestep (0 after the last one).
        # A timestep living on an accelerator is not read back (that would sync the host once per step): after
        # the first step of a schedule, steps are taken in order. Python ints and CPU tensors are always looked up.
        schedule = self._timesteps_cpu
        on_device = isinstance(timestep, torch.Tensor) and timestep.device.type != "cpu"
        if on_device and self._step_index is not None and self._step_index < len(schedule):
            i = self._step_index
        else:
            timestep = torch.as_tensor(timestep).detach().cpu().to(torch.int64)  # 0-dim
            matches = (schedule == timestep).nonzero().flatten()
            if len(matches) != 1:
                raise ValueError(f"PeRFlowScheduler: timestep {int(timestep)} is not one of the scheduled timesteps.")
            i = int(matches[0])
        self._step_index = i + 1
        timestep = schedule[i]  # 0-dim int64, CPU
        t_next = schedule[i + 1] if i + 1 < len(schedule) else torch.zeros_like(timestep)

        # 2. Velocity at t (float32 0-dim coefficients; applied in the sample's dtype).
        t = timestep / n  # float32 0-dim
        if self.config.prediction_type == "velocity":
            velocity = model_output
        else:
            t_start, t_end = self.window_of(float(t))
            lambda_s, eta_s = self.window_endpoint_map(t_start, t_end)
            t_s = torch.tensor(t_start, dtype=torch.float32)
            t_e = torch.tensor(t_end, dtype=torch.float32)
            denominator = lambda_s * (t - t_s) + (t_e - t)
            lambda_t = lambda_s * (t_e - t_s) / denominator
            eta_t = eta_s * (t_e - t) / denominator
            z_end = lambda_t * sample + eta_t * model_output  # predicted window end, same shape as sample
            velocity = (z_end - sample) / (t_e - t)

        # 3. Euler step; dt < 0 since time runs from noise (1) to clean (0).
        dt = ((t_next - timestep) / n).to(sample.dtype)  # 0-dim CPU tensor: used as a scalar, no transfer
        prev_sample = (sample + dt * velocity).to(sample.dtype)

        if not return_dict:
            return (prev_sample,)
        return PeRFlowSchedulerOutput(prev_sample=prev_sample)

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor | int
    ) -> torch.Tensor:
        """Noise clean samples to `timesteps` (DDPM forward process; a timestep ``T`` in [1, 1000] uses
        ``alphas_cumprod[T - 1]``, so ``T = 1000`` is the noisiest level, as in PeRFlow training)."""
        timesteps = torch.as_tensor(timesteps, device=original_samples.device).to(torch.int64).flatten()
        if ((timesteps < 1) | (timesteps > self.config.num_train_timesteps)).any():
            raise ValueError(
                f"PeRFlowScheduler.add_noise: timesteps must lie in [1, {self.config.num_train_timesteps}], "
                f"got {timesteps.tolist()}."
            )
        alphas_cumprod = self.alphas_cumprod.to(original_samples.device, original_samples.dtype)
        abar = alphas_cumprod[timesteps - 1]  # (B,) or (1,)
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        sqrt_abar = abar.sqrt().reshape(shape)
        sqrt_one_minus_abar = (1 - abar).sqrt().reshape(shape)
        return sqrt_abar * original_samples + sqrt_one_minus_abar * noise
