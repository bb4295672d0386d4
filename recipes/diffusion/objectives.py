"""Diffusion objectives shared by the families, written once.

- `sample_latents`: a draw from the VAE posterior (mean and logvar are what the encoders -- and the cache --
  keep, so every step still draws fresh latents), times the VAE's scaling factor.
- `v_prediction_loss`: the CogVideoX-style DDPM objective (CogVideoX, CogView3-Plus): `t ~ U{0..T-1}`,
  `x_t = sqrt(abar) x0 + sqrt(1 - abar) eps`, the network predicts v, and the loss is the official CogVideo
  finetune's `mean((1 / (1 - abar)) (x0_hat - x0)^2)` with `x0_hat = sqrt(abar) x_t - sqrt(1 - abar) v_hat`,
  which equals the v-MSE (docs/objectives.md#cogvideox-text-to-video).
- `FlowMatching`: rectified flow with a resolution shift (CogView4): sigma density, the shifted noise level,
  the timestep convention the pipeline feeds the network, and the loss weighting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


def sample_latents(encoded: dict, scaling_factor: float) -> torch.Tensor:
    """`latent_dist.sample() * scaling_factor` from the cached posterior parameters, in fp32."""
    mean, logvar = encoded["latent_mean"].float(), encoded["latent_logvar"].float()
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))  # the clamp of diffusers' DiagonalGaussianDistribution
    return (mean + std * torch.randn_like(mean)) * scaling_factor


def v_prediction_loss(predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], scheduler, x0: torch.Tensor,
                      noise: torch.Tensor | None = None, timesteps: torch.Tensor | None = None) -> torch.Tensor:
    """The mean over the batch of each sample's `mean((1 / (1 - abar)) (x0_hat - x0)^2)`.

    `predict(x_t, timesteps)` returns v_hat; `scheduler` is a CogVideoX-style DDPM/DDIM scheduler (its
    `alphas_cumprod`, `add_noise`, `get_velocity`). Timesteps and noise are drawn when not given."""
    batch = x0.shape[0]
    if timesteps is None:
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), device=x0.device)
    noise = torch.randn_like(x0) if noise is None else noise
    x_t = scheduler.add_noise(x0, noise, timesteps)
    v_hat = predict(x_t, timesteps).float()
    x0_hat = scheduler.get_velocity(v_hat, x_t, timesteps)  # sqrt(abar) x_t - sqrt(1 - abar) v_hat
    abar = scheduler.alphas_cumprod.to(x0.device)[timesteps].float()
    weights = (1.0 / (1.0 - abar)).view(batch, *([1] * (x0.dim() - 1)))
    return (weights * (x0_hat - x0) ** 2).reshape(batch, -1).mean(dim=1).mean()


SIGMA_SAMPLING = ("uniform", "logit_normal")
LOSS_WEIGHTING = ("none", "cosmap")


@dataclass
class FlowMatching:
    """Flow matching with a resolution-dependent shift, as CogView4 (docs/objectives.md#cogview4).

    `sigma ~ density`, shifted by the scheduler's own `time_shift(mu)` to the noise level `s`;
    `x_t = (1 - s) x0 + s eps`; target `eps - x0`; MSE, optionally weighted.

    Args:
        scheduler: a `FlowMatchEulerDiscreteScheduler` (its `time_shift` and config).
        sigma_sampling: `uniform` (CogKit) or `logit_normal` (SD3; more weight mid-noise).
        logit_mean, logit_std: the logit-normal density's parameters.
        loss_weighting: `none` (plain MSE) or `cosmap` (SD3, Esser et al. 2024, section 3.1, on the shifted sigma).
        timestep_shifted: whether the network is told the shifted sigma (False: the unshifted `sigma * T`, what
            `CogView4Pipeline` of diffusers 0.42.1 feeds it; a test reads the pipeline's behaviour).
    """

    scheduler: object
    sigma_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    loss_weighting: str = "none"
    timestep_shifted: bool = False

    def __post_init__(self):
        if self.sigma_sampling not in SIGMA_SAMPLING or self.loss_weighting not in LOSS_WEIGHTING:
            raise ValueError(f"model.sigma_sampling={self.sigma_sampling!r} / model.loss_weighting="
                             f"{self.loss_weighting!r}: use one of {SIGMA_SAMPLING} / {LOSS_WEIGHTING}")

    def sample_sigmas(self, n: int, device: torch.device) -> torch.Tensor:
        if self.sigma_sampling == "uniform":
            return torch.rand(n, device=device)
        return torch.sigmoid(self.logit_mean + self.logit_std * torch.randn(n, device=device))

    def shifted(self, sigma: torch.Tensor, mu: float) -> torch.Tensor:
        """The noise level for `sigma`: the scheduler's own time shift (linear for CogView4)."""
        return self.scheduler.time_shift(mu, 1.0, sigma)

    def timestep(self, sigma: torch.Tensor, shifted: torch.Tensor) -> torch.Tensor:
        return (shifted if self.timestep_shifted else sigma) * self.scheduler.config.num_train_timesteps

    def per_sample_loss(self, predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor,
                        mu: float, noise: torch.Tensor | None = None,
                        sigmas: torch.Tensor | None = None) -> torch.Tensor:
        """`predict(x_t, timestep)` returns the velocity; one loss per sample."""
        batch = x0.shape[0]
        sigmas = self.sample_sigmas(batch, x0.device) if sigmas is None else sigmas.to(x0.device).float()
        noise = torch.randn_like(x0) if noise is None else noise
        shifted = self.shifted(sigmas.float(), mu)
        s = shifted.view(batch, *([1] * (x0.dim() - 1)))
        pred = predict((1.0 - s) * x0 + s * noise, self.timestep(sigmas, shifted)).float()
        per_sample = ((pred - (noise - x0)) ** 2).reshape(batch, -1).mean(dim=1)
        if self.loss_weighting == "cosmap":
            per_sample = per_sample * 2.0 / (torch.pi * (1.0 - 2.0 * shifted + 2.0 * shifted**2))
        return per_sample
