"""What a device does to its update before it leaves: bounds that secure aggregation and differential
privacy rely on. Pure torch, shared by the ClientApp and the tests."""

from __future__ import annotations

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
