"""Many held-out devices' personalization at once: ``meta.personalization_curve`` and the on-device guard
(``meta.guard_decisions``) as one pure function of (θ, support, query), mapped over episodes with
``torch.func.vmap``.

Episodes are computed together where they share shapes and, for the guard, the same cross-validation
folds (a regression support set's folds depend only on its size; a classification one's on its labels'
order); the rest, and models vmap cannot batch, go through the one-device functions. Values match those
within float rounding, except that the guard's decision can flip where adapting changes the held-out loss
by less than that rounding (the one-device code sums the losses in double precision).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor
from torch.func import vmap

from metafleet.common.meta import (
    Episode,
    FunctionalModel,
    Params,
    StepSize,
    check_eval_steps,
    cross_validation_folds,
    guarded_curve,
    personalization_curve,
)
from metafleet.common.vectorized import vmappable, vmappable_adapt

log = logging.getLogger("metafleet.vectorized")
Curves = tuple[list[float], list[float]]  # (plain curve, guarded curve) over the evaluation's step counts


def _one_device(fmodel: FunctionalModel, steps: Sequence[int], lr: StepSize, folds: Sequence[Tensor], count: int):
    """(θ, sx, sy, qx, qy) -> (curve, adapted held-out loss per step count, unadapted held-out loss)."""
    rests = []
    for held in folds:
        keep = torch.ones(count, dtype=torch.bool)
        keep[held.cpu()] = False
        rests.append(torch.nonzero(keep).flatten())

    def personalize(theta: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor):
        theta = {name: t.detach() for name, t in theta.items()}
        adapted, done, curve = fmodel.start(theta, (sx, sy)), 0, []
        adapted = {name: t.detach() for name, t in adapted.items()}
        for target in steps:
            adapted = vmappable_adapt(fmodel, adapted, (sx, sy), target - done, lr, differentiable=False)
            done = target
            # FunctionalModel.metric returns a Python float, which vmap cannot give: the same value as a tensor.
            curve.append(fmodel.objective.metric(fmodel.forward(adapted, qx), qy))
        adapted_loss = [torch.zeros((), dtype=sx.dtype, device=sx.device) for _ in steps]
        base_loss = torch.zeros((), dtype=sx.dtype, device=sx.device)
        for held, rest in zip(folds, rests, strict=True):
            held, rest = held.to(sx.device), rest.to(sx.device)
            held_batch, rest_batch = (sx[held], sy[held]), (sx[rest], sy[rest])
            unadapted = {name: t.detach() for name, t in fmodel.start(theta, rest_batch).items()}
            base_loss = base_loss + fmodel.loss(unadapted, held_batch) * len(held)
            fold_adapted, done = unadapted, 0
            for index, target in enumerate(steps):
                fold_adapted = vmappable_adapt(fmodel, fold_adapted, rest_batch, target - done, lr,
                                               differentiable=False)
                done = target
                adapted_loss[index] = adapted_loss[index] + fmodel.loss(fold_adapted, held_batch) * len(held)
        return torch.stack([v.to(sx.dtype) for v in curve]), torch.stack(adapted_loss), base_loss

    return personalize


def _guarded(curve: list[float], adapted_loss: list[float], base_loss: float, steps: Sequence[int],
             has_folds: bool) -> list[float]:
    if not has_folds:  # meta.guard_decisions keeps adaptation where the support set cannot be split
        return list(curve)
    return [value if step == 0 or loss < base_loss else curve[0]
            for value, step, loss in zip(curve, steps, adapted_loss, strict=True)]


def batched_personalization(fmodel: FunctionalModel, params: Params, episodes: Sequence[Episode],
                            steps: Sequence[int], lr: StepSize) -> list[Curves]:
    """For each episode: its plain and guarded personalization curves, as ``meta.personalization_curve`` and
    ``meta.guarded_curve`` give them."""
    check_eval_steps(steps)
    results: list[Curves | None] = [None] * len(episodes)
    groups: dict[tuple, list[int]] = {}
    for index, episode in enumerate(episodes):
        folds = cross_validation_folds(episode.support, fmodel.objective)
        key = (tuple(tuple(part.shape) for part in (*episode.support, *episode.query)),
               tuple(tuple(f.tolist()) for f in folds))
        groups.setdefault(key, []).append(index)
    for members in groups.values():
        first = episodes[members[0]]
        folds = cross_validation_folds(first.support, fmodel.objective)
        if len(members) > 1 and vmappable(fmodel):
            parts = [torch.stack([getattr(episodes[i], side)[k] for i in members])
                     for side in ("support", "query") for k in (0, 1)]
            personalize = _one_device(fmodel, steps, lr, folds, len(first.support[1]))
            curves, adapted, base = vmap(personalize, in_dims=(None, 0, 0, 0, 0))(params, *parts)
            for row, index in enumerate(members):
                curve = [float(v) for v in curves[row]]
                results[index] = (curve, _guarded(curve, [float(v) for v in adapted[row]], float(base[row]), steps,
                                                  bool(folds)))
        else:
            for index in members:
                episode = episodes[index]
                curve = [float(v) for v in personalization_curve(fmodel, params, episode.support, episode.query,
                                                                 steps, lr)]
                results[index] = (curve, guarded_curve(fmodel, params, episode.support, curve, steps, lr))
    return results  # type: ignore[return-value]
