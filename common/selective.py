"""Layer-wise selective upload (``--selective-layers [SHARE]``, Cedar's cost-efficient upload).

A *layer* is one module's parameters: the names up to their last dot (a convolution's weight and bias, a
batch norm's scale and shift). Each round a device adds its update to what it has not yet sent of every
layer, so that each layer holds its change since the device last sent it; it ranks the layers by that
change relative to the layer's size in the model it received (``‖change‖ / ‖θ_layer‖``) and sends the most
changed ones while they fit into SHARE of the model's parameters (always at least one). What it skips stays
in its Context state and joins the next round's change: nothing is lost, only delayed (as top-k's error
feedback). The server averages each layer over the devices that sent it and leaves a layer that no device
sent as it was (the outer optimizer does not step it), see ``metafleet.server.defenses.layerwise_aggregate``.

On the wire a selective update is the sent layers' tensors (or their q8 payload) plus one uint8 flag per
tensor of the model in name order (``SENT_KEY``), so that the server knows which tensors a payload holds.
"""

from __future__ import annotations

import numpy as np
import torch

from metafleet.common.meta import Params

SENT_KEY = "selective-sent"
SELECTIVE_DEFAULT = 0.75  # a bare --selective-layers (with q8: 5.8x fewer bytes up at -0.8 points, docs/benchmarks.md)


def layer_of(name: str) -> str:
    """The module a parameter belongs to: ``features.1.0.weight`` → ``features.1.0``."""
    return name.rpartition(".")[0] or name


def layers(names: list[str] | tuple[str, ...]) -> dict[str, list[str]]:
    """Every layer of a model and its parameter names, in the model's order."""
    grouped: dict[str, list[str]] = {}
    for name in names:
        grouped.setdefault(layer_of(name), []).append(name)
    return grouped


def select_layers(update: Params, pending: Params | None, params: Params, share: float
                  ) -> tuple[Params, Params]:
    """(what to send, what stays on the device). ``pending`` is what earlier rounds left unsent (or None)."""
    change = {name: update[name].detach().float() + (pending[name] if pending is not None else 0)
              for name in update}
    total = sum(tensor.numel() for tensor in change.values())
    budget = share * total

    def relative_change(names: list[str]) -> float:
        moved = float(torch.sqrt(sum((change[n].double() ** 2).sum() for n in names)))
        size = float(torch.sqrt(sum((params[n].double() ** 2).sum() for n in names)))
        return moved / max(size, 1e-12)

    grouped = layers(list(update))
    ranked = sorted(grouped, key=lambda layer: relative_change(grouped[layer]), reverse=True)
    chosen, spent = set(), 0
    for layer in ranked:
        size = sum(change[name].numel() for name in grouped[layer])
        if not chosen or spent + size <= budget:
            chosen.add(layer)
            spent += size
    sent = {name: change[name].to(update[name].dtype) for name in update if layer_of(name) in chosen}
    left = {name: (torch.zeros_like(change[name]) if layer_of(name) in chosen else change[name]) for name in update}
    return sent, left


def sent_flags(sent: Params, reference_names: list[str]) -> np.ndarray:
    """One uint8 per tensor of the model, in name order: 1 where ``sent`` holds it."""
    return np.array([name in sent for name in sorted(reference_names)], dtype=np.uint8)


def sent_reference(payload: dict[str, np.ndarray], reference: Params) -> tuple[dict[str, np.ndarray], Params]:
    """(payload without its flags, the part of ``reference`` it stands for); ``ValueError`` naming the problem
    if the flags are missing or malformed, select nothing, or cut a layer in two."""
    if SENT_KEY not in payload:
        raise ValueError(f"a selective-layers update must say which tensors it holds ('{SENT_KEY}')")
    flags = np.asarray(payload[SENT_KEY])
    names = sorted(reference)
    if flags.dtype != np.uint8 or flags.shape != (len(names),) or not np.all(flags <= 1):
        raise ValueError(f"'{SENT_KEY}' must be {len(names)} uint8 flags (one per tensor of the model), got "
                         f"{flags.dtype} {tuple(flags.shape)}")
    chosen = {name for name, flag in zip(names, flags, strict=True) if flag}
    if not chosen:
        raise ValueError("a selective-layers update must hold at least one layer")
    for layer, members in layers(list(reference)).items():
        if 0 < len(chosen.intersection(members)) < len(members):
            raise ValueError(f"a selective-layers update sends whole layers; it cut layer '{layer}'")
    rest = {key: value for key, value in payload.items() if key != SENT_KEY}
    return rest, {name: reference[name] for name in reference if name in chosen}
