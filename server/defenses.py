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

- ``rsa[:cluster]``: Cedar's representational-similarity weighting (You et al., Nat. Commun. 16:3739, 2025),
  ``RepresentationalSimilarity`` below.

Each takes the round's validated updates and weights and returns the update the outer optimizer applies,
with what it kept for metrics.jsonl. Under SecAgg+ the server sees only the sum: ``norm-bound:C`` then works
through the devices' own clipping, and the others are refused by the config.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from flwr.server.strategy.aggregate import aggregate_krum, aggregate_median, aggregate_trimmed_avg

from metafleet.common.config import RunConfig
from metafleet.common.errors import ConfigError
from metafleet.common.meta import FunctionalModel, Params, global_norm, split_learned_rates
from metafleet.common.privacy import clip_to_norm
from metafleet.common.robust import Defense
from metafleet.common.selective import layers
from metafleet.common.training import weighted_mean


def robust_aggregate(updates: Sequence[Params], weights: Sequence[float], defense: Defense
                     ) -> tuple[Params, dict[str, float]]:
    """(aggregate, metrics) of a round's updates under ``defense``."""
    if defense.kind == "none":
        return weighted_mean(updates, weights), {}
    if defense.kind == "rsa":
        raise ValueError("rsa weighs updates by the models they lead to: use RepresentationalSimilarity.aggregate")
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


class RepresentationalSimilarity:
    """Cedar's safeguarded aggregation (You et al., Nat. Commun. 16:3739, 2025): each update weighted by how
    much the model it leads to represents a public stimulus set as the global model does.

    The server holds a few inputs per class that no device holds (the task's ``stimuli()`` or
    ``--rsa-stimuli``). For θ and for each device's model — θ − g for fedavg, reptile and per-fedavg, whose
    update g is θ minus the device's adapted model, and θ − α·g (α the inner lr) for fomaml and maml, whose update is a
    meta-gradient — it computes the representational dissimilarity matrix: the Euclidean distances between
    the model's outputs (class probabilities for a classifier) for every pair of stimuli. A device's score
    is the Pearson correlation of its matrix's upper triangle with θ's; its weight is its example count times
    max(score, 0). ``rsa:cluster`` first splits the scores into two groups (exact one-dimensional 2-means) and
    drops the lower group when it holds fewer than half of the devices: the outlier cluster the paper drops.
    ``rsa:consensus`` (not Cedar's) compares each device's matrix with the round's coordinate-wise median matrix
    instead of θ's: an untrained θ's geometry says nothing (every score is then near 0, and a first-round
    attack passes), while an honest majority's median does.

    GOLF, Cedar's reference code (generic_and_open_learning_federator, function.py ``Cedarsyn``), compares
    cosine-similarity matrices of softmax outputs over the whole matrix, and its filter zeroes the weights of
    the *most common* KMeans cluster, keeping the minority: the opposite of what the paper describes and of
    what an honest majority needs. This follows the paper.
    """

    def __init__(self, fmodel: FunctionalModel, stimuli: torch.Tensor, step: float, drop_outliers: bool,
                 consensus: bool = False):
        if stimuli.shape[0] < 3:
            raise ValueError(f"rsa needs at least 3 stimuli to compare representations, got {stimuli.shape[0]}")
        self.fmodel, self.stimuli, self.step, self.drop_outliers = fmodel, stimuli, step, drop_outliers
        self.consensus = consensus

    def dissimilarities(self, params: Params) -> np.ndarray:
        """The upper triangle of the model's representational dissimilarity matrix on the stimuli."""
        with torch.no_grad():
            outputs = self.fmodel.forward(params, self.stimuli).reshape(len(self.stimuli), -1).double()
        if self.fmodel.objective.class_targets:
            outputs = torch.softmax(outputs, dim=-1)
        distances = torch.cdist(outputs, outputs).numpy()
        return distances[np.triu_indices(len(distances), k=1)]

    def scores(self, theta: Params, updates: Sequence[Params]) -> np.ndarray:
        theta = split_learned_rates(theta)[0]  # meta-sgd's rates shape no representation: the model is θ
        matrices = [self.dissimilarities({name: theta[name] - self.step * update[name].to(theta[name].dtype)
                                          for name in theta}) for update in updates]
        reference = np.median(np.stack(matrices), axis=0) if self.consensus else self.dissimilarities(theta)
        return np.array([_pearson(matrix, reference) for matrix in matrices])

    def aggregate(self, theta: Params, updates: Sequence[Params], weights: Sequence[float]
                  ) -> tuple[Params, dict[str, float]]:
        scores = self.scores(theta, updates)
        kept = np.ones(len(scores), dtype=bool)
        if self.drop_outliers:
            kept = ~_low_minority(scores)
        combined = np.asarray(weights, dtype=np.float64) * np.clip(scores, 0, None) * kept
        metrics = {"defense-rsa-score-min": float(scores.min()), "defense-rsa-score-median": float(np.median(scores)),
                   "defense-dropped": float((~kept).sum())}
        if not combined.sum() > 0:
            # No device represents the stimuli as θ does (θ is untrained and says the same for all): the
            # similarity cannot tell devices apart, so this round is a plain mean.
            metrics["defense-rsa-fallback"] = 1.0
            return weighted_mean(updates, weights), metrics
        chosen = [index for index, weight in enumerate(combined) if weight > 0]
        return weighted_mean([updates[i] for i in chosen], [float(combined[i]) for i in chosen]), metrics


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    scale = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / scale) if scale > 0 else 0.0


def _low_minority(scores: np.ndarray) -> np.ndarray:
    """Which scores form the lower of the best two-group split (exact 1-D 2-means), where that group holds
    fewer than half of them; none otherwise."""
    order = np.argsort(scores, kind="stable")
    ordered = scores[order]
    best, split = np.inf, 0
    for cut in range(1, len(ordered)):
        low, high = ordered[:cut], ordered[cut:]
        cost = ((low - low.mean()) ** 2).sum() + ((high - high.mean()) ** 2).sum()
        if cost < best:
            best, split = cost, cut
    dropped = np.zeros(len(scores), dtype=bool)
    if 0 < split < len(scores) / 2 and ordered[split] > ordered[split - 1]:
        dropped[order[:split]] = True
    return dropped


def load_stimuli(config: RunConfig, fmodel: FunctionalModel) -> torch.Tensor:
    """rsa's stimulus set, checked against the model; ``ConfigError`` naming the problem."""
    source = config.rsa_stimuli or f"task {config.task_definition.name}'s stimuli()"
    try:
        if config.rsa_stimuli:
            with np.load(Path(config.rsa_stimuli), allow_pickle=False) as archive:
                values = archive["x"]
        else:
            values = config.task_definition.stimuli()
        stimuli = torch.as_tensor(np.asarray(values, dtype=np.float32))
        with torch.no_grad():
            outputs = fmodel.forward(fmodel.init_params(), stimuli)
    except Exception as error:  # noqa: BLE001 - a user's file or task: one line naming it
        raise ConfigError("rsa_stimuli", source, f"could not be used: {type(error).__name__}: {error}") from None
    if not torch.isfinite(stimuli).all() or outputs.shape[0] != stimuli.shape[0]:
        raise ConfigError("rsa_stimuli", source, "must be finite inputs, one model output each")
    return stimuli
