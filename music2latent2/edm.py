"""EDM / consistency-model scalings and noise schedules (docs/design.md section 3)."""

from __future__ import annotations

from typing import Tuple, Union

import torch

__all__ = ["consistency_scalings", "sigma_from_index", "index_from_sigma", "karras_sigmas"]


def consistency_scalings(sigma: torch.Tensor, sigma_data: float,
                         sigma_min: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_skip, c_out, c_in) for ``f(x, sigma) = c_skip x + c_out F(c_in x)``; f(x, sigma_min) = x."""
    c_skip = sigma_data ** 2 / ((sigma - sigma_min) ** 2 + sigma_data ** 2)
    c_out = sigma_data * (sigma - sigma_min) / (sigma_data ** 2 + sigma ** 2).sqrt()
    c_in = 1 / (sigma ** 2 + sigma_data ** 2).sqrt()
    return c_skip, c_out, c_in


def sigma_from_index(i: Union[torch.Tensor, float], sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """Continuous noise index i in [0, 1] -> sigma, Karras-spaced (i=0: sigma_min, i=1: sigma_max)."""
    i = torch.as_tensor(i, dtype=torch.float32)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (lo + i * (hi - lo)) ** rho


def index_from_sigma(sigma: torch.Tensor, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """Inverse of :func:`sigma_from_index`."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (sigma ** (1 / rho) - lo) / (hi - lo)


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float) -> torch.Tensor:
    """``steps`` decreasing noise levels starting at sigma_max, evenly spaced in index units,
    excluding sigma_min itself (used for multi-step consistency sampling)."""
    i = torch.linspace(1.0, 0.0, steps + 1)[:-1]
    return sigma_from_index(i, sigma_min, sigma_max, rho)
