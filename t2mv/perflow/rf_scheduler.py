"""RectifiedFlowScheduler: rectified-flow sampling (InstaFlow, 2-rectified flow) in the diffusers scheduler contract.

Upstream (gnobitab/InstaFlow ``code/pipeline_rf.py``, ``RectifiedFlowPipeline``) is SD1.5's pipeline with its own
loop: the UNet predicts a velocity ``v``, and N Euler steps go from noise (t = 1000) towards the image::

    timesteps = [(1 - i/N) * 1000 for i in range(N)]     # floats: 1000, 666.67, 333.33 for N = 3
    dt = 1/N
    latents = latents + dt * v_pred                        # v_pred with classifier-free guidance when scale > 1

Its initial latents are ``randn * scheduler.init_noise_sigma`` with the repositories' PNDMScheduler, whose
``init_noise_sigma`` is 1. This scheduler is exactly that loop (``set_timesteps`` / ``step`` /
``scale_model_input`` / ``init_noise_sigma``), so diffusers' own ``StableDiffusionPipeline`` samples it unchanged:
same prompt encoding, CFG batch order ([negative, positive]), latents and VAE decode as upstream's copy of that
pipeline. The model kinds and their defaults are in `t2mv.rectified_flow` (no diffusers import there).
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput


class RectifiedFlowScheduler(SchedulerMixin, ConfigMixin):
    """Euler steps on a rectified-flow velocity: t from 1000 down in N equal steps, ``x ← x + v / N``.

    The timesteps are floats, exactly upstream's ``(1 - i/N) * 1000`` (float32, as its ``ones(B) * t``).
    """

    order = 1
    init_noise_sigma = 1.0

    @register_to_config
    def __init__(self, num_train_timesteps: int = 1000):
        self.timesteps = torch.empty(0)
        self.num_inference_steps: int | None = None
        self.dt: float | None = None

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """N timesteps ``(1 - i/N) * num_train_timesteps`` and the step size ``dt = 1/N``.

        Raises:
            ValueError: N is not a positive int.
        """
        if (
            isinstance(num_inference_steps, bool)
            or not isinstance(num_inference_steps, int)
            or num_inference_steps < 1
        ):
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}.")
        n, scale = num_inference_steps, float(self.config.num_train_timesteps)
        # Python floats first, then float32: the same rounding as upstream's `torch.ones(B) * t`.
        points = [(1.0 - i / n) * scale for i in range(n)]
        self.timesteps = torch.tensor(points, dtype=torch.float32, device=device)  # (N,)
        self.num_inference_steps = n
        self.dt = 1.0 / n

    def scale_model_input(self, sample: torch.Tensor, timestep: torch.Tensor | float | None = None) -> torch.Tensor:
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep: torch.Tensor | float,
        sample: torch.Tensor,
        return_dict: bool = True,
        **_: object,
    ) -> SchedulerOutput | tuple[torch.Tensor]:
        """One Euler step: ``sample + dt * model_output`` (the velocity, already guided)."""
        if self.dt is None:
            raise ValueError("Call set_timesteps(num_inference_steps) before step().")
        prev_sample = sample + self.dt * model_output  # (B, 4, h, w)
        if not return_dict:
            return (prev_sample,)
        return SchedulerOutput(prev_sample=prev_sample)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
