"""Client data: each device's private support and query pools, episode sampling, held-out clients.

A client owns one or more *splits*, each a (support pool, query pool) pair that share no recording, so
that overlapping sensor windows never leak from support into query. An episode draws K examples per class
(``per-class`` sampling, the few-shot protocol) or K examples in all (``uniform`` sampling: regression, and
classification where a client's own label distribution is what personalization must learn) from the
support pool of one split and its query set from the same split's query pool.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from metafleet.common.errors import DataError
from metafleet.common.meta import Batch, Episode

SAMPLINGS = ("per-class", "uniform")
# Applied to a training episode's inputs with the episode's generator; evaluation episodes never see it.
Augmentation = Callable[[torch.Tensor, np.random.Generator], torch.Tensor]


@dataclass(frozen=True)
class Split:
    """A support pool and a query pool that share no recording."""

    support: Batch
    query: Batch


@dataclass(frozen=True)
class ClientData:
    """One device's private data. ``num_classes`` is None for regression.

    ``augment``, if set, transforms the inputs of every training episode (``sample_episode``), never those
    of evaluation episodes: a device may augment what it trains on, but is measured on what it recorded."""

    client_id: int
    splits: tuple[Split, ...]
    num_classes: int | None
    sampling: str = "per-class"
    augment: Augmentation | None = None

    def __post_init__(self) -> None:
        if self.sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, not {self.sampling!r}")

    @property
    def _uniform(self) -> bool:
        return self.num_classes is None or self.sampling == "uniform"

    def _episode_classes(self, rng: np.random.Generator, ways: int | None) -> np.ndarray:
        if ways is None:
            return np.arange(self.num_classes)
        return rng.choice(self.num_classes, min(ways, self.num_classes), replace=False)

    def validate(self, input_shape: tuple[int, ...]) -> None:
        """Raise ``DataError`` naming the client and the problem if any pool is unusable."""
        if not self.splits:
            raise DataError(f"client {self.client_id} has no data")
        for index, split in enumerate(self.splits):
            for role, batch in (("support", split.support), ("query", split.query)):
                validate_batch(batch, input_shape, self.num_classes, f"client {self.client_id} split {index} {role}")

    def sample_episode(
        self, rng: np.random.Generator, shots: int, query_shots: int, ways: int | None = None
    ) -> Episode:
        """A random episode: ``shots`` support and ``query_shots`` query examples per class (or in all).

        With ``ways`` set, the episode uses that many of the client's classes, relabelled 0..ways-1 (all of
        them, fewer than ``ways``, on a client that has fewer classes).
        """
        split = self.splits[rng.integers(len(self.splits))]
        if self._uniform:
            episode = Episode(_take(split.support, rng, shots), _take(split.query, rng, query_shots))
        else:
            classes = self._episode_classes(rng, ways)
            episode = Episode(
                _per_class(split.support, classes, shots, rng, self.client_id),
                _per_class(split.query, classes, query_shots, rng, self.client_id),
            )
        if self.augment is None:
            return episode
        (xs, ys), (xq, yq) = episode.support, episode.query
        return Episode((self.augment(xs, rng), ys), (self.augment(xq, rng), yq))

    def evaluation_episodes(self, shots: int, seed: int, ways: int | None = None, per_split: int = 1) -> list[Episode]:
        """Fixed episodes for personalization evaluation: ``per_split`` per split, each with the split's whole
        query pool (restricted to the episode's classes) as query set."""
        rng = np.random.default_rng([seed, self.client_id, 7])
        episodes = []
        for split in self.splits:
            for _ in range(per_split):
                if self._uniform:
                    episodes.append(Episode(_take(split.support, rng, shots), split.query))
                    continue
                classes = self._episode_classes(rng, ways)
                support = _per_class(split.support, classes, shots, rng, self.client_id)
                episodes.append(Episode(support, _relabel(split.query, classes)))
        return episodes


def _take(batch: Batch, rng: np.random.Generator, count: int) -> Batch:
    x, y = batch
    index = torch.from_numpy(rng.choice(len(x), size=min(count, len(x)), replace=False))
    return x[index], y[index]


def _per_class(batch: Batch, classes: np.ndarray, shots: int, rng: np.random.Generator, client_id: int) -> Batch:
    x, y = batch
    labels = y.numpy()
    chosen, new_labels = [], []
    for new_label, cls in enumerate(classes):
        candidates = np.flatnonzero(labels == cls)
        if len(candidates) == 0:
            raise DataError(f"client {client_id} has no example of class {int(cls)} in a pool it samples from")
        chosen.append(rng.choice(candidates, size=shots, replace=len(candidates) < shots))
        new_labels.append(np.full(shots, new_label))
    index = torch.from_numpy(np.concatenate(chosen))
    return x[index], torch.from_numpy(np.concatenate(new_labels)).long()


def _relabel(batch: Batch, classes: np.ndarray) -> Batch:
    x, y = batch
    keep = torch.from_numpy(np.isin(y.numpy(), classes))
    mapping = {int(cls): new for new, cls in enumerate(classes)}
    return x[keep], torch.tensor([mapping[int(label)] for label in y[keep]], dtype=torch.long)


def validate_batch(batch: Batch, input_shape: tuple[int, ...], num_classes: int | None, where: str) -> None:
    """Raise ``DataError`` if a batch is empty, wrongly shaped, not finite, or has labels out of range."""
    x, y = batch
    if len(x) == 0:
        raise DataError(f"{where} is empty")
    if tuple(x.shape[1:]) != tuple(input_shape):
        raise DataError(f"{where} has examples of shape {tuple(x.shape[1:])}, expected {tuple(input_shape)}")
    if len(y) != len(x):
        raise DataError(f"{where} has {len(x)} examples but {len(y)} labels")
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise DataError(f"{where} holds NaN or Inf values")
    if num_classes is None:
        if not torch.isfinite(y).all():
            raise DataError(f"{where} holds NaN or Inf targets")
    elif y.min() < 0 or y.max() >= num_classes:
        raise DataError(f"{where} has labels outside [0, {num_classes})")


class Fleet(ABC):
    """A federated data set: clients ``0..num_clients-1``, each a device with private data.

    The model and the objective belong to the task (``metafleet.common.task``); a fleet is only the data."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int | None
    # How its clients draw episodes: "per-class" (shots per class) or "uniform" (shots in all).
    sampling: str = "per-class"

    @property
    @abstractmethod
    def num_clients(self) -> int: ...

    @abstractmethod
    def client(self, client_id: int) -> ClientData:
        """The client's data, validated."""

    def device_name(self, client_id: int) -> str:
        """What reports call the client (a folder fleet's device folder; else its number)."""
        return str(client_id)

    def check_client_id(self, client_id: int) -> None:
        if not 0 <= client_id < self.num_clients:
            raise DataError(f"{self.name} has clients 0..{self.num_clients - 1}, not {client_id}")


def locate_data(
    env_var: str, candidates: Sequence[Path], problem: Callable[[Path], str | None], what: str, hint: str
) -> Path:
    """Where a data set lies: the path in ``env_var`` if it is set, else the first usable candidate.

    ``problem(path)`` says what is wrong with a path (None when usable). Every failure is a ``DataError``
    naming the place looked at, what is wrong and ``hint``, the command that fetches the data.
    """
    override = os.environ.get(env_var)
    if override:
        trouble = problem(Path(override))
        if trouble:
            raise DataError(f"{env_var}={override} {trouble}; {hint}")
        return Path(override)
    for path in candidates:
        if problem(path) is None:
            return path
    places = ", ".join(str(path) for path in candidates) or "no default place"
    raise DataError(f"found no {what} ({env_var} is not set; looked in {places}); {hint}")


def file_problem(path: Path) -> str | None:
    return None if path.is_file() else "does not exist"


# The permutation folds are cut from. A fixed seed, not the run's: a device's fold belongs to the fleet, so a
# second training seed tests the same devices (and never lands on validation devices). Seed 0's old folds.
FOLD_PERMUTATION_SEED = (0, 1234)


def held_out_client_ids(num_clients: int, held_out: int, fold: int = 0) -> list[int]:
    """The clients never trained on: the same on the server and on every device, whatever the run's seed.

    Fold ``f`` holds out block ``f`` of one fixed permutation, so folds 0..num_clients//held_out-1 hold
    out disjoint sets and, when ``held_out`` divides ``num_clients``, every client exactly once.
    """
    if not 1 <= held_out < num_clients:
        raise DataError(f"cannot hold out {held_out} of {num_clients} clients")
    if not 0 <= fold < num_clients // held_out:
        raise DataError(f"fold {fold} does not exist: {num_clients} clients give {num_clients // held_out} folds")
    permutation = np.random.default_rng(list(FOLD_PERMUTATION_SEED)).permutation(num_clients)
    return sorted(int(i) for i in permutation[fold * held_out : (fold + 1) * held_out])


def mean_and_ci95(values: Sequence[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% confidence interval (Student t; 0 for a single value)."""
    array = np.asarray(values, dtype=float)
    if array.size == 0:
        raise ValueError("no values to summarize")
    if array.size == 1:
        return float(array[0]), 0.0
    sem = array.std(ddof=1) / np.sqrt(array.size)
    return float(array.mean()), float(_t_quantile_975(array.size - 1) * sem)


def _t_quantile_975(dof: int) -> float:
    # Two-sided 95% Student t quantiles; beyond 30 degrees of freedom the normal value is within 2%.
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
             10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110,
             18: 2.101, 19: 2.093, 20: 2.086, 25: 2.060, 30: 2.042}
    if dof in table:
        return table[dof]
    if dof < 30:
        return table[max(k for k in table if k < dof)]
    return 1.96 + 2.4 / dof
