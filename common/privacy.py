"""What a device does to its update before it leaves: bounds that secure aggregation and differential
privacy rely on. Pure torch, shared by the ClientApp and the tests."""

from __future__ import annotations

import math

import numpy as np
import torch

from metafleet.common.meta import Params, global_norm


def clip_to_norm(update: Params, max_norm: float) -> tuple[Params, bool]:
    """Scale ``update`` down to L2 norm ``max_norm`` if it is longer (DP-FedAvg's per-client clipping).

    Returns the update and whether it was clipped.
    """
    norm = global_norm(update)
    if norm <= max_norm:
        return update, False
    scale = max_norm / norm
    return {name: tensor * scale for name, tensor in update.items()}, True


def clip_values(update: Params, bound: float) -> tuple[Params, int]:
    """Clamp every value to ±``bound`` (SecAgg+'s clipping range), returning how many values were clamped.

    SecAgg+ clamps silently; clamping here first lets the device count it, so the run can say so.
    """
    clamped = 0
    result = {}
    for name, tensor in update.items():
        clamped += int((tensor.abs() > bound).sum())
        result[name] = tensor.clamp(-bound, bound)
    return result, clamped


def gaussian_noise_like(params: Params, std: float, generator: torch.Generator) -> Params:
    return {
        name: torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype) * std
        for name, tensor in params.items()
    }


def discrete_gaussian(shape: tuple[int, ...], sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Samples of the discrete Gaussian N_Z(0, sigma²) over the integers (int64), by the exact rejection
    sampler of Canonne, Kamath & Steinke ("The Discrete Gaussian for Differential Privacy", NeurIPS 2020,
    Algorithm 3): a discrete Laplace proposal of scale t = floor(sigma) + 1, kept with probability
    exp(-(|y| - sigma²/t)² / (2 sigma²)). Floating point stands in for their exact arithmetic."""
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    count = int(np.prod(shape, dtype=np.int64))
    out = np.empty(count, dtype=np.int64)
    filled, scale = 0, math.floor(sigma) + 1
    success = -math.expm1(-1.0 / scale)  # a geometric draw's success probability, 1 - e^{-1/t}
    while filled < count:
        batch = 2 * (count - filled) + 64
        # The difference of two geometric variables (failures before a success) is discrete Laplace(t).
        proposal = rng.geometric(success, batch) - rng.geometric(success, batch)
        keep = rng.random(batch) < np.exp(-((np.abs(proposal) - sigma**2 / scale) ** 2) / (2 * sigma**2))
        accepted = proposal[keep][: count - filled]
        out[filled:filled + len(accepted)] = accepted
        filled += len(accepted)
    return out.reshape(shape)


def distributed_dp_share(update: Params, clip_norm: float, noise_multiplier: float, shares: int, step: float,
                         rng: np.random.Generator) -> tuple[Params, float]:
    """A device's part of distributed DP (Kairouz, Liu & Steinke, "The Distributed Discrete Gaussian
    Mechanism for Federated Learning with Secure Aggregation", ICML 2021), on SecAgg+'s own lattice.

    The update (clipped to ``clip_norm`` already) is written in units of SecAgg+'s quantization ``step``,
    randomly rounded to integers (so SecAgg+'s own stochastic rounding, of an exact lattice point, changes
    nothing), and discrete Gaussian noise of std ``noise_multiplier · Δ / sqrt(shares)`` is added, Δ =
    clip_norm/step + sqrt(d) bounding the rounded vector's L2 norm (rounding moves each of d coordinates by
    less than 1). The sum of ``shares`` or more devices' noise then has std at least ``noise_multiplier · Δ``:
    the Gaussian mechanism of that multiplier on an L2 sensitivity of Δ; the sum of discrete Gaussians departs
    from a discrete Gaussian by a term exponentially small in the per-device std (their Theorem 1; at
    metafleet's steps the std is thousands of lattice units). Returns the noised update (floats on the
    lattice) and Δ."""
    dimension = sum(t.numel() for t in update.values())
    sensitivity = clip_norm / step + math.sqrt(dimension)
    sigma = noise_multiplier * sensitivity / math.sqrt(shares)
    noised = {}
    for name, tensor in update.items():
        scaled = tensor.detach().double().numpy() / step
        lower = np.floor(scaled)
        rounded = lower + (rng.random(scaled.shape) < scaled - lower)
        lattice = rounded.astype(np.int64) + discrete_gaussian(scaled.shape, sigma, rng)
        noised[name] = torch.from_numpy(lattice.astype(np.float64) * step).to(tensor.dtype)
    return noised, sensitivity
