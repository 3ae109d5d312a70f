"""Update compression for the uplink: what a device sends instead of its float32 update, and its decoding.

- ``q8``: unbiased stochastic 8-bit quantization, per tensor. A tensor's values are mapped onto 256 levels
  between its minimum and maximum, each rounded up or down at random with the probabilities that make the
  expectation exact (QSGD-style, Alistarh et al. 2017, on a min-max grid). Error: at most one level,
  (max − min)/255, per value; unbiased, so the errors of many devices average out.
- ``topk:F``: the largest fraction F of each tensor's coordinates by magnitude (at least one), as int32
  positions and float32 values; the rest stays on the device as *error feedback* (Stich et al. 2018) and is
  added to the next round's update before selecting, so nothing is lost, only delayed.

A compressed update is a flat dict of numpy arrays (``encode``), carried in the reply's ArrayRecord as it is;
``decode`` restores the update's tensors and refuses a payload that does not fit the model, naming the
problem. Compression saves uplink bytes on the plain path only: SecAgg+ masks every value as a 32-bit word
of its own quantization, so the config refuses the two together.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from metafleet.common.meta import Params

COMPRESSIONS = ("none", "q8", "topk")
_Q8_CODES, _Q8_RANGE, _TOPK_POSITIONS, _TOPK_VALUES = "q8", "q8-range", "topk-positions", "topk-values"
_SEPARATOR = "#"  # parameter names are module paths (dots), never this


@dataclass(frozen=True)
class Compression:
    """A parsed ``--compress`` value."""

    kind: str = "none"
    fraction: float = 1.0  # topk's share of coordinates kept

    @classmethod
    def parse(cls, text: str) -> Compression:
        """``none``, ``q8`` or ``topk:F`` with 0 < F < 1; ``ValueError`` naming the problem otherwise."""
        kind, _, argument = (text or "none").strip().partition(":")
        if kind not in COMPRESSIONS:
            raise ValueError("must be one of none, q8, topk:F")
        if kind != "topk":
            if argument:
                raise ValueError(f"{kind} takes no argument")
            return cls(kind)
        try:
            fraction = float(argument)
        except ValueError:
            raise ValueError("topk needs the fraction of coordinates to keep, as topk:0.1") from None
        if not 0 < fraction < 1:
            raise ValueError("topk's fraction must lie strictly between 0 and 1")
        return cls(kind, fraction)

    @property
    def active(self) -> bool:
        return self.kind != "none"


def encode(update: Params, compression: Compression, rng: np.random.Generator,
           residual: Params | None = None) -> tuple[dict[str, np.ndarray], Params | None]:
    """(payload, new residual). ``residual`` (topk's error feedback) is added before selecting; q8 keeps none."""
    if compression.kind == "q8":
        return _encode_q8(update, rng), None
    if compression.kind == "topk":
        return _encode_topk(update, compression.fraction, residual)
    return {name: tensor.detach().cpu().numpy() for name, tensor in update.items()}, None


def decode(payload: dict[str, np.ndarray], compression: Compression, reference: Params) -> Params:
    """The update a payload stands for, shaped as ``reference``; ``ValueError`` if it does not fit."""
    if not compression.active:
        return {name: torch.from_numpy(np.asarray(value)) for name, value in payload.items()}
    expected = ({f"{name}{_SEPARATOR}{_Q8_CODES}" for name in reference}
                | {f"{name}{_SEPARATOR}{_Q8_RANGE}" for name in reference}) if compression.kind == "q8" else (
        {f"{name}{_SEPARATOR}{_TOPK_POSITIONS}" for name in reference}
        | {f"{name}{_SEPARATOR}{_TOPK_VALUES}" for name in reference})
    if set(payload) != expected:
        missing, extra = sorted(expected - set(payload))[:3], sorted(set(payload) - expected)[:3]
        raise ValueError(f"a {compression.kind} update must hold two arrays per parameter; missing {missing}, "
                         f"unexpected {extra}")
    decoded = {}
    for name, tensor in reference.items():
        key = f"{name}{_SEPARATOR}"
        if compression.kind == "q8":
            decoded[name] = _decode_q8(name, payload[key + _Q8_CODES], payload[key + _Q8_RANGE], tensor)
        else:
            decoded[name] = _decode_topk(name, payload[key + _TOPK_POSITIONS], payload[key + _TOPK_VALUES], tensor)
    return decoded


def _encode_q8(update: Params, rng: np.random.Generator) -> dict[str, np.ndarray]:
    payload = {}
    for name, tensor in update.items():
        values = tensor.detach().cpu().double().numpy().ravel()
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        # The grid as the server will read it (float32), so that every code decodes within [low, high].
        low = float(np.float32(low))
        step = float(np.float32((high - low) / 255)) if high > low else 0.0
        if step > 0:
            scaled = (values - low) / step
            codes = np.floor(scaled + rng.random(values.size))  # up with probability frac(scaled): unbiased
            codes = np.clip(codes, 0, 255).astype(np.uint8)
        else:
            codes = np.zeros(values.size, dtype=np.uint8)
        payload[f"{name}{_SEPARATOR}{_Q8_CODES}"] = codes.reshape(tuple(tensor.shape))
        payload[f"{name}{_SEPARATOR}{_Q8_RANGE}"] = np.array([low, step], dtype=np.float32)
    return payload


def _decode_q8(name: str, codes: np.ndarray, value_range: np.ndarray, reference: torch.Tensor) -> torch.Tensor:
    if codes.dtype != np.uint8 or tuple(codes.shape) != tuple(reference.shape):
        raise ValueError(f"'{name}': q8 codes must be uint8 of shape {tuple(reference.shape)}, got "
                         f"{codes.dtype} {tuple(codes.shape)}")
    if value_range.shape != (2,) or not np.all(np.isfinite(value_range)) or value_range[1] < 0:
        raise ValueError(f"'{name}': a q8 range must be a finite (minimum, step ≥ 0) pair, got {value_range!r}")
    low, step = float(value_range[0]), float(value_range[1])
    return torch.from_numpy(low + step * codes.astype(np.float64)).to(reference.dtype)


def _encode_topk(update: Params, fraction: float, residual: Params | None) -> tuple[dict[str, np.ndarray], Params]:
    payload, remaining = {}, {}
    for name, tensor in update.items():
        corrected = tensor.detach().cpu().float() + (residual[name] if residual is not None else 0)
        flat = corrected.ravel()
        keep = max(1, int(round(fraction * flat.numel())))
        positions = torch.topk(flat.abs(), keep, sorted=False).indices
        values = flat[positions]
        left = flat.clone()
        left[positions] = 0
        remaining[name] = left.reshape(tensor.shape)
        payload[f"{name}{_SEPARATOR}{_TOPK_POSITIONS}"] = positions.numpy().astype(np.int32)
        payload[f"{name}{_SEPARATOR}{_TOPK_VALUES}"] = values.numpy().astype(np.float32)
    return payload, remaining


def _decode_topk(name: str, positions: np.ndarray, values: np.ndarray, reference: torch.Tensor) -> torch.Tensor:
    size = reference.numel()
    if positions.ndim != 1 or values.shape != positions.shape or positions.dtype != np.int32:
        raise ValueError(f"'{name}': top-k positions (int32) and values must be two vectors of one length")
    out_of_range = positions.size and (positions.min() < 0 or positions.max() >= size)
    if out_of_range or len(np.unique(positions)) != positions.size:
        raise ValueError(f"'{name}': top-k positions must be distinct and lie in [0, {size})")
    if not np.all(np.isfinite(values)):
        raise ValueError(f"'{name}': top-k values must be finite")
    dense = torch.zeros(size, dtype=reference.dtype)
    dense[torch.from_numpy(positions.astype(np.int64))] = torch.from_numpy(values).to(reference.dtype)
    return dense.reshape(reference.shape)
