"""Many devices' local updates at once: each algorithm's update (``metafleet.common.meta``) written as one pure
function of (θ, support, query) and mapped over devices with ``torch.func.vmap``.

Devices whose episodes share shapes are stacked and computed together; the others, and models that vmap
cannot batch (an RNN's fused kernels have no batching rule), go through the ordinary one-device code, so the
result is always there. The values are the one-device functions' within float rounding (the tests compare
them): the same episode in, the same pseudo-gradient, example count and losses out.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from torch.func import grad, grad_and_value, vmap

from metafleet.common.meta import (
    Episode,
    FunctionalModel,
    LocalUpdate,
    Params,
    StepSize,
    join_learned_rates,
    local_update,
    prototype_head,
    sgd_step,
    split_learned_rates,
)

log = logging.getLogger("metafleet.vectorized")
# (θ, support x, support y, query x, query y) -> (pseudo-gradient, loss before, loss after), for one device.
DeviceUpdate = Callable[[Params, Tensor, Tensor, Tensor, Tensor], tuple[Params, Tensor, Tensor]]


def vmappable_adapt(fmodel: FunctionalModel, params: Params, support: tuple[Tensor, Tensor], steps: int, lr: StepSize,
           differentiable: bool) -> Params:
    # meta.adapt's steps, by torch.func.grad (eager autograd cannot run under vmap); first-order methods cut
    # each step from the tape as meta.adapt does.
    loss_grad = grad(fmodel.loss)
    if not differentiable:
        params = {name: t.detach() for name, t in params.items()}
    for _ in range(steps):
        params = sgd_step(params, loss_grad(params, support), lr)
        if not differentiable:
            params = {name: t.detach() for name, t in params.items()}
    return params


def device_update(algorithm: str, fmodel: FunctionalModel, steps: int, lr: float) -> DeviceUpdate:
    """One device's update as a pure function, for ``vmap``."""

    def fedavg(theta: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor):
        data = (torch.cat([sx, qx]), torch.cat([sy, qy]))
        trained = vmappable_adapt(fmodel, theta, data, steps, lr, differentiable=False)
        return ({name: theta[name] - trained[name] for name in theta}, fmodel.loss(theta, data),
                fmodel.loss(trained, data))

    def reptile(theta: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor):
        start = fmodel.start({name: t.detach() for name, t in theta.items()}, (sx, sy))
        start = {name: t.detach() for name, t in start.items()}
        adapted = vmappable_adapt(fmodel, start, (sx, sy), steps, lr, differentiable=False)
        delta = fmodel.without_replaced({name: start[name] - adapted[name] for name in start})
        return delta, fmodel.loss(start, (qx, qy)), fmodel.loss(adapted, (qx, qy))

    def fomaml(theta: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor):
        start = fmodel.start({name: t.detach() for name, t in theta.items()}, (sx, sy))
        start = {name: t.detach() for name, t in start.items()}
        adapted = vmappable_adapt(fmodel, start, (sx, sy), steps, lr, differentiable=False)
        if not fmodel.replaced:
            query_grad, query_loss = grad_and_value(fmodel.loss)(adapted, (qx, qy))
            return query_grad, fmodel.loss(start, (qx, qy)), query_loss
        # meta._first_order_prototype_grad_and_loss: the head's value is the adapted one, its gradient flows
        # back through the prototypes into the features.
        trained = {name: t for name, t in adapted.items() if name not in fmodel.replaced}

        def query_loss_of(leaves: Params) -> Tensor:
            prototypes = prototype_head(fmodel, {**adapted, **leaves}, (sx, sy))
            head = {name: prototypes[name] + (adapted[name] - prototypes[name]).detach() for name in fmodel.replaced}
            return fmodel.loss({**leaves, **head}, (qx, qy))

        grads, query_loss = grad_and_value(query_loss_of)(trained)
        return (fmodel.without_replaced({**adapted, **grads}), fmodel.loss(start, (qx, qy)), query_loss)

    def maml(theta: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor):
        def query_loss_after_adaptation(params: Params) -> Tensor:
            start = fmodel.start(params, (sx, sy))
            return fmodel.loss(vmappable_adapt(fmodel, start, (sx, sy), steps, lr, differentiable=True), (qx, qy))

        meta_grad, query_loss = grad_and_value(query_loss_after_adaptation)(
            {name: t.detach() for name, t in theta.items()})
        loss_before = fmodel.loss(fmodel.start(theta, (sx, sy)), (qx, qy))
        return fmodel.without_replaced(meta_grad), loss_before, query_loss

    def per_fedavg(theta: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor):
        # meta.per_fedavg_update: each step a support step to θ_tmp, then θ moves by the query gradient there.
        loss_grad = grad(fmodel.loss)
        received = {name: t.detach() for name, t in theta.items()}

        def one_step_query_loss(params: Params) -> Tensor:
            return fmodel.loss(vmappable_adapt(fmodel, params, (sx, sy), 1, lr, differentiable=False), (qx, qy))

        current = received
        for _ in range(steps):
            support_grad = loss_grad(current, (sx, sy))
            temporary = {name: (p - lr * support_grad[name]).detach() for name, p in current.items()}
            query_grad = loss_grad(temporary, (qx, qy))
            current = {name: (p - lr * query_grad[name]).detach() for name, p in current.items()}
        delta = {name: received[name] - current[name] for name in received}
        return delta, one_step_query_loss(received), one_step_query_loss(current)


    def meta_sgd(theta_and_rates: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor):
        # meta.meta_sgd_update: maml's meta-gradient, for θ and log α, through steps of θ − α ⊙ ∇L.
        theta, log_rates = split_learned_rates({name: t.detach() for name, t in theta_and_rates.items()})

        def query_loss_after_adaptation(params: Params, log_rates: Params) -> Tensor:
            start = fmodel.start(params, (sx, sy))
            rates = {name: torch.exp(t) for name, t in log_rates.items()}
            return fmodel.loss(vmappable_adapt(fmodel, start, (sx, sy), steps, rates, differentiable=True), (qx, qy))

        (theta_grad, rate_grad), query_loss = grad_and_value(query_loss_after_adaptation, argnums=(0, 1))(
            theta, log_rates)
        loss_before = fmodel.loss(fmodel.start(theta, (sx, sy)), (qx, qy))
        pseudo_grad = join_learned_rates(fmodel.without_replaced(theta_grad), rate_grad, theta_and_rates)
        return pseudo_grad, loss_before, query_loss

    updates = {"fedavg": fedavg, "reptile": reptile, "fomaml": fomaml, "maml": maml, "meta-sgd": meta_sgd,
               "per-fedavg": per_fedavg}
    if algorithm not in updates:
        raise ValueError(f"the vectorized backend has no update for algorithm {algorithm!r}")
    return updates[algorithm]


def _shape_key(episode: Episode) -> tuple:
    (sx, sy), (qx, qy) = episode.support, episode.query
    return tuple((tuple(t.shape), t.dtype) for t in (sx, sy, qx, qy))


def batched_updates(algorithm: str, fmodel: FunctionalModel, params: Params, episodes: Sequence[Episode],
                    steps: int, lr: float) -> list[LocalUpdate]:
    """Every episode's ``local_update``, computed for groups of same-shaped episodes at once."""
    results: list[LocalUpdate | None] = [None] * len(episodes)
    groups: dict[tuple, list[int]] = {}
    for index, episode in enumerate(episodes):
        groups.setdefault(_shape_key(episode), []).append(index)
    mapped = vmap(device_update(algorithm, fmodel, steps, lr), in_dims=(None, 0, 0, 0, 0))
    detached = {name: t.detach() for name, t in params.items()}
    for members in groups.values():
        if len(members) == 1 or not vmappable(fmodel):
            for index in members:
                results[index] = local_update(algorithm, fmodel, params, episodes[index], steps, lr)
            continue
        stacked = [torch.stack([_part(episodes[i], part) for i in members]) for part in range(4)]
        try:
            grads, before, after = mapped(detached, *stacked)
        except RuntimeError as error:  # an operation vmap has no batching rule for: the loop still works
            log.warning("vmap could not batch this model (%s); its devices run one at a time", error)
            _NOT_VMAPPABLE.add(id(fmodel))
            for index in members:
                results[index] = local_update(algorithm, fmodel, params, episodes[index], steps, lr)
            continue
        for position, index in enumerate(members):
            results[index] = LocalUpdate(
                {name: t[position].detach() for name, t in grads.items()}, episodes[index].num_examples,
                {"loss-before": float(before[position]), "loss-after": float(after[position])})
    return [result for result in results if result is not None]


_NOT_VMAPPABLE: set[int] = set()


def vmappable(fmodel: FunctionalModel) -> bool:
    return not fmodel.has_rnn and id(fmodel) not in _NOT_VMAPPABLE


def _part(episode: Episode, part: int) -> Tensor:
    (sx, sy), (qx, qy) = episode.support, episode.query
    return (sx, sy, qx, qy)[part]
