"""Robust aggregation of a round's plaintext updates: the server side of ``--defense``.

- ``median``: coordinate-wise median (Yin et al., ICML 2018), Flower's ``aggregate_median``;
- ``trimmed-mean:B``: coordinate-wise mean after cutting the share B (default 0.2) from each end (Yin et al.
  2018), Flower's ``aggregate_trimmed_avg``;
- ``krum:F`` / ``multi-krum:F``: the update (Krum) or the mean of the n − f updates (Multi-Krum) closest to
  their n − f − 2 nearest neighbours, with f = ⌈F·n⌉ devices assumed malicious, at most (n − 3)/2 (Blanchard
  et al., NeurIPS 2017), Flower's ``aggregate_krum``;
- ``norm-bound[:C]``: every update clipped to L2 norm C (Sun et al. 2019), then the weighted mean; honest
  devices clip already, the server clips what arrives whether or not its sender did. Without C, the bound is
  the round's median update norm (an honest majority sets it).

Each takes the round's validated updates and weights and returns the update the outer optimizer applies,
with what it kept for metrics.jsonl. Under SecAgg+ the server sees only the sum: ``norm-bound:C`` then works
through the devices' own clipping, and the others are refused by the config.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from flwr.server.strategy.aggregate import aggregate_krum, aggregate_median, aggregate_trimmed_avg

from metafleet.common.meta import Params, global_norm
from metafleet.common.privacy import clip_to_norm
from metafleet.common.robust import Defense
from metafleet.common.selective import layers
from metafleet.common.training import weighted_mean


def robust_aggregate(updates: Sequence[Params], weights: Sequence[float], defense: Defense
                     ) -> tuple[Params, dict[str, float]]:
    """(aggregate, metrics) of a round's updates under ``defense``."""
    if defense.kind == "none":
        return weighted_mean(updates, weights), {}
    if defense.kind == "norm-bound":
        norms = [global_norm(update) for update in updates]
        bound = defense.parameter or float(np.median(norms))
        clipped = [clip_to_norm(update, bound)[0] if norm > bound else update for update, norm in zip(
            updates, norms, strict=True)]
        return weighted_mean(clipped, weights), {"defense-bound": bound,
                                                 "defense-clipped": float(sum(norm > bound for norm in norms))}
    names = list(updates[0])
    results = [([update[name].detach().cpu().double().numpy() for name in names], int(max(1, round(weight))))
               for update, weight in zip(updates, weights, strict=True)]
    metrics: dict[str, float] = {}
    if defense.kind == "median":
        arrays = aggregate_median(results)
    elif defense.kind == "trimmed-mean":
        arrays = aggregate_trimmed_avg(results, defense.parameter)
    else:
        count = len(updates)
        assumed = min(math.ceil(defense.parameter * count), max(0, (count - 3) // 2))
        keep = count - assumed if defense.kind == "multi-krum" else 0
        arrays = aggregate_krum(results, assumed, keep)
        metrics = {"defense-assumed-attackers": float(assumed), "defense-kept": float(keep or 1)}
    reference = updates[0]
    return {name: torch.as_tensor(np.asarray(array)).to(reference[name].dtype).reshape(reference[name].shape)
            for name, array in zip(names, arrays, strict=True)}, metrics


def layerwise_aggregate(updates: Sequence[Params], weights: Sequence[float], defense: Defense, names: list[str]
                        ) -> tuple[Params, dict[str, float]]:
    """--selective-layers: each layer aggregated under ``defense`` over the devices that sent it (Krum then
    compares devices layer by layer). A layer no device sent is left out, and so keeps its value."""
    aggregate: Params = {}
    senders_per_layer: list[float] = []
    gathered: dict[str, list[float]] = {}
    for members in layers(names).values():
        senders = [index for index, update in enumerate(updates) if members[0] in update]
        if not senders:
            continue
        part, metrics = robust_aggregate([{name: updates[i][name] for name in members} for i in senders],
                                         [weights[i] for i in senders], defense)
        aggregate.update(part)
        senders_per_layer.append(float(len(senders)))
        for key, value in metrics.items():
            gathered.setdefault(key, []).append(value)
    # The model's order, as robust_aggregate keeps it.
    aggregate = {name: aggregate[name] for name in names if name in aggregate}
    summary = {key: float(np.mean(values)) for key, values in gathered.items()}
    layer_count = len(layers(names))
    summary["layers-unsent"] = float(layer_count - len(senders_per_layer))
    summary["layer-senders-mean"] = float(np.mean(senders_per_layer)) if senders_per_layer else 0.0
    return aggregate, summary
