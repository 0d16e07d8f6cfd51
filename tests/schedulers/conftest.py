"""Shared pieces of the scheduler parity tests: a deterministic stand-in for the model, the two
sampler loops (difforge's and diffusers' pipelines'), and the tolerance."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

TOL = 1e-6  # max abs difference allowed against diffusers (on the CPU the built-ins are bit-exact)


def fake_velocity(x: torch.Tensor, i: int) -> torch.Tensor:
    """A fixed, non-linear function of the sample and the step index, standing in for the model."""
    return torch.sin(1.3 * x + 0.37 * i) - 0.5 * x + 0.05 * i


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double().cpu() - b.double().cpu()).abs().max().item()


def run_ours(scheduler, x: torch.Tensor) -> torch.Tensor:
    """The difforge loop: ``step(v, i, x)`` for every timestep left after set_timesteps."""
    for i in range(len(scheduler.timesteps)):
        x = scheduler.step(fake_velocity(x, i), i, x)
    return x


def run_diffusers(scheduler, timesteps: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The diffusers pipelines' loop: ``step(v, t, x)`` over the timesteps the pipeline kept."""
    for i, t in enumerate(timesteps):
        x = scheduler.step(fake_velocity(x, i), t, x, return_dict=False)[0]
    return x


@pytest.fixture
def parity() -> SimpleNamespace:
    return SimpleNamespace(tol=TOL, diff=max_diff, run_ours=run_ours, run_diffusers=run_diffusers)


@pytest.fixture
def latents() -> tuple[torch.Tensor, torch.Tensor]:
    """``(x0, noise)`` in a 4-D image latent layout."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 16, 6, 8, generator=g), torch.randn(2, 16, 6, 8, generator=g)
