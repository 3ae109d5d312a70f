"""Update compression for the uplink: what a device sends instead of its float32 update, and its decoding.

- ``q8``: unbiased stochastic 8-bit quantization, per tensor. A tensor's values are mapped onto 256 levels
  between its minimum and maximum, each rounded up or down at random with the probabilities that make the
  expectation exact (QSGD-style, Alistarh et al. 2017, on a min-max grid). Error: at most one level,
  (max − min)/255, per value; unbiased, so the errors of many devices average out.
- ``topk:F``: the largest fraction F of each tensor's coordinates by magnitude (at least one), as int32
  positions and float32 values; the rest stays on the device as *error feedback* (Stich et al. 2018) and is
  added to the next round's update before selecting, so nothing is lost, only delayed.

A compressed update is two flat numpy arrays (``encode``), carried in the reply's ArrayRecord as they are;
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
_Q8_CODES, _Q8_RANGE, _TOPK_POSITIONS, _TOPK_VALUES = "q8-codes", "q8-ranges", "topk-positions", "topk-values"


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
    """(payload, new residual). ``residual`` (topk's error feedback) is added before selecting; q8 keeps none.

    A compressed payload is two flat arrays for the whole update, the tensors in name order: every array
    of a message costs its own header and name (about 150 bytes), which for small tensors would outweigh the
    saving."""
    if compression.kind == "q8":
        return _encode_q8(update, rng), None
    if compression.kind == "topk":
        return _encode_topk(update, compression.fraction, residual)
    return {name: tensor.detach().cpu().numpy() for name, tensor in update.items()}, None


def decode(payload: dict[str, np.ndarray], compression: Compression, reference: Params) -> Params:
    """The update a payload stands for, shaped as ``reference``; ``ValueError`` if it does not fit."""
    if not compression.active:
        return {name: torch.from_numpy(np.asarray(value)) for name, value in payload.items()}
    expected = {_Q8_CODES, _Q8_RANGE} if compression.kind == "q8" else {_TOPK_POSITIONS, _TOPK_VALUES}
    if set(payload) != expected:
        raise ValueError(f"a {compression.kind} update must hold the arrays {sorted(expected)}, got "
                         f"{sorted(payload)[:4]}")
    names = sorted(reference)
    sizes = [reference[name].numel() for name in names]
    if compression.kind == "q8":
        flat = _decode_q8(payload[_Q8_CODES], payload[_Q8_RANGE], sizes)
    else:
        flat = _decode_topk(payload[_TOPK_POSITIONS], payload[_TOPK_VALUES], sum(sizes))
    decoded, start = {}, 0
    for name, size in zip(names, sizes, strict=True):
        decoded[name] = torch.from_numpy(flat[start:start + size]).to(reference[name].dtype).reshape(
            reference[name].shape)
        start += size
    return {name: decoded[name] for name in reference}


def _encode_q8(update: Params, rng: np.random.Generator) -> dict[str, np.ndarray]:
    codes, ranges = [], []
    for name in sorted(update):
        values = update[name].detach().cpu().double().numpy().ravel()
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        # The grid as the server will read it (float32), so that every code decodes within [low, high].
        low = float(np.float32(low))
        step = float(np.float32((high - low) / 255)) if high > low else 0.0
        if step > 0:
            scaled = (values - low) / step
            levels = np.floor(scaled + rng.random(values.size))  # up with probability frac(scaled): unbiased
            codes.append(np.clip(levels, 0, 255).astype(np.uint8))
        else:
            codes.append(np.zeros(values.size, dtype=np.uint8))
        ranges.append((low, step))
    return {_Q8_CODES: np.concatenate(codes) if codes else np.zeros(0, np.uint8),
            _Q8_RANGE: np.array(ranges, dtype=np.float32).reshape(-1, 2)}


def _decode_q8(codes: np.ndarray, ranges: np.ndarray, sizes: list[int]) -> np.ndarray:
    if codes.dtype != np.uint8 or codes.shape != (sum(sizes),):
        raise ValueError(f"q8 codes must be {sum(sizes)} uint8 values (the model's size), got {codes.dtype} "
                         f"{tuple(codes.shape)}")
    if ranges.shape != (len(sizes), 2) or not np.all(np.isfinite(ranges)) or np.any(ranges[:, 1] < 0):
        raise ValueError(f"q8 ranges must be a finite (minimum, step >= 0) pair for each of the model's "
                         f"{len(sizes)} tensors, got shape {tuple(ranges.shape)}")
    lows = np.repeat(ranges[:, 0].astype(np.float64), sizes)
    steps = np.repeat(ranges[:, 1].astype(np.float64), sizes)
    return lows + steps * codes.astype(np.float64)


def _encode_topk(update: Params, fraction: float, residual: Params | None) -> tuple[dict[str, np.ndarray], Params]:
    positions, values, remaining, offset = [], [], {}, 0
    for name in sorted(update):
        tensor = update[name]
        corrected = tensor.detach().cpu().float() + (residual[name] if residual is not None else 0)
        flat = corrected.ravel()
        keep = max(1, int(round(fraction * flat.numel())))
        chosen = torch.topk(flat.abs(), keep, sorted=False).indices
        positions.append(chosen.numpy().astype(np.int64) + offset)
        values.append(flat[chosen].numpy().astype(np.float32))
        left = flat.clone()
        left[chosen] = 0
        remaining[name] = left.reshape(tensor.shape)
        offset += flat.numel()
    return {_TOPK_POSITIONS: np.concatenate(positions).astype(np.int32),
            _TOPK_VALUES: np.concatenate(values)}, {name: remaining[name] for name in update}


def _decode_topk(positions: np.ndarray, values: np.ndarray, size: int) -> np.ndarray:
    if positions.ndim != 1 or values.shape != positions.shape or positions.dtype != np.int32:
        raise ValueError("top-k positions (int32) and values must be two vectors of one length")
    out_of_range = positions.size and (positions.min() < 0 or positions.max() >= size)
    if out_of_range or len(np.unique(positions)) != positions.size:
        raise ValueError(f"top-k positions must be distinct and lie in [0, {size}) (the model's size)")
    if not np.all(np.isfinite(values)):
        raise ValueError("top-k values must be finite")
    dense = np.zeros(size, dtype=np.float64)
    dense[positions.astype(np.int64)] = values
    return dense
