"""The round logic shared by every path: aggregation, the outer step, personalization evaluation.

The federated server, the secure-aggregation path and the centralized reference loop all call these, so
the meta-update exists once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from metafleet.common.config import RunConfig
from metafleet.common.data import ClientData, Fleet
from metafleet.common.finetune import adapter, finetuned_and_guarded
from metafleet.common.meta import (
    Episode,
    FunctionalModel,
    LocalUpdate,
    Params,
    guarded_curve,
    local_update,
    meta_parameters,
    params_device,
    personalization_curve,
    project_learned_rates,
    step_sizes,
)
from metafleet.common.optim import OuterOptimizer, make_outer_optimizer


def weighted_mean(updates: Sequence[Params], weights: Sequence[float]) -> Params:
    """The weighted mean of pseudo-gradients (weights: example counts), as FedAvg aggregates."""
    if not updates:
        raise ValueError("no updates to aggregate")
    total = float(sum(weights))
    if not total > 0:
        raise ValueError(f"aggregation weights must sum to > 0, got {list(weights)}")
    # One weighted sum per tensor over the stacked updates, not one multiply-add per update and tensor (600
    # small kernels for a round of 100 devices of a 6-tensor model, a twentieth of a vectorized round).
    fractions = torch.tensor([weight / total for weight in weights], dtype=torch.float64)
    mean = {}
    for name in updates[0]:
        stacked = torch.stack([update[name] for update in updates])
        if not stacked.is_floating_point():
            stacked = stacked.to(torch.get_default_dtype())
        mean[name] = torch.tensordot(fractions.to(stacked.dtype), stacked, dims=1)
    return mean


def client_train(
    fmodel: FunctionalModel, params: Params, client: ClientData, config: RunConfig, rng: np.random.Generator
) -> LocalUpdate:
    """One client's work in one round: sample an episode from its data, run the algorithm's local update.

    The episode goes to the device ``params`` live on (a Jetson's GPU, say); the data stays where it is."""
    episode = training_episode(client, config, rng).to(params_device(params))
    return local_update(config.algorithm, fmodel, params, episode, config.inner_steps, config.inner_lr)


def training_rng(config: RunConfig, server_round: int, client_id: int) -> np.random.Generator:
    """A device's randomness in a training round: the same on every backend, so that they agree."""
    return np.random.default_rng([config.seed, server_round, client_id])


def training_episode(client: ClientData, config: RunConfig, rng: np.random.Generator) -> Episode:
    """The episode a client trains on in a round (``rng``: ``training_rng``)."""
    return client.sample_episode(rng, config.training_shots, config.query_shots, config.training_ways or None)


def client_personalization(
    fmodel: FunctionalModel, params: Params, client: ClientData, config: RunConfig
) -> tuple[list[float], list[float]]:
    """The client's query metric after each of ``config.eval_steps`` adaptation steps, mean over its episodes:
    (plain curve, the curve with the personalization guard deciding on the device whether to adapt)."""
    # A meta-sgd model adapts with the rates it learned, not with one scalar step size.
    theta, lr = step_sizes(params, config.adaptation_lr)

    def curves(episode: Episode) -> tuple[list[float], list[float]]:
        curve = personalization_curve(fmodel, theta, episode.support, episode.query, config.eval_steps, lr)
        return curve, guarded_curve(fmodel, theta, episode.support, curve, config.eval_steps, lr)

    return _mean_over_episodes(client, config, params_device(params), curves)


def client_finetuning(
    fmodel: FunctionalModel, params: Params, client: ClientData, config: RunConfig, mode: str,
    head: frozenset[str] = frozenset(),
) -> tuple[list[float], list[float]]:
    """``client_personalization`` for fine-tuning ``mode`` (``metafleet.common.config.FINETUNES``) on the
    same evaluation episodes: "full" is ``client_personalization`` itself; "head" adapts only ``head`` with
    the head lr; "prox" adapts every parameter with the fine-tuning lr, pulled towards the received
    ``params`` by ``config.prox_lambda``."""
    if mode == "full":
        return client_personalization(fmodel, params, client, config)
    lr = config.head_adaptation_lr if mode == "head" else config.adaptation_lr
    adapt = adapter(mode, fmodel, params, lr, head=head, prox_lambda=config.prox_lambda)
    return _mean_over_episodes(client, config, params_device(params), lambda episode: finetuned_and_guarded(
        fmodel, params, episode.support, episode.query, config.eval_steps, adapt))


Curves = tuple[list[float], list[float]]  # (plain curve, guarded curve) over the eval steps


def _mean_over_episodes(client: ClientData, config: RunConfig, device: torch.device,
                        curves: Callable[[Episode], Curves]) -> Curves:
    plain, guarded = [], []
    for episode in client.evaluation_episodes(config.shots, config.seed, config.ways or None, config.eval_episodes):
        curve, kept = curves(episode.to(device))
        plain.append(curve)
        guarded.append(kept)
    return [float(v) for v in np.mean(plain, axis=0)], [float(v) for v in np.mean(guarded, axis=0)]


@dataclass
class CentralizedResult:
    params: Params
    losses: list[float]


def meta_train_centralized(
    fleet: Fleet,
    config: RunConfig,
    client_ids: Sequence[int],
    on_round: Callable[[int, float], None] | None = None,
) -> CentralizedResult:
    """The federated algorithm without a network: each round, sample clients, average their updates, step.

    A reference for tests and for checking that the federated path changes nothing.
    """
    torch.manual_seed(config.seed)
    from metafleet.common.fleets import functional_model

    fmodel = functional_model(config)
    params = meta_parameters(config.algorithm, fmodel.init_params(), config.inner_lr)
    optimizer: OuterOptimizer = make_outer_optimizer(config.outer_optimizer, config.outer_lr)
    rng = np.random.default_rng(config.seed)
    clients = {i: fleet.client(i) for i in client_ids}
    losses = []
    for round_number in range(1, config.rounds + 1):
        sampled = rng.choice(list(client_ids), size=config.clients_per_round, replace=False)
        updates = [client_train(fmodel, params, clients[int(i)], config, rng) for i in sampled]
        mean = weighted_mean([u.pseudo_grad for u in updates], [u.num_examples for u in updates])
        params = project_learned_rates(optimizer.step(params, mean))
        losses.append(float(np.mean([u.metrics["loss-after"] for u in updates])))
        if on_round is not None:
            on_round(round_number, losses[-1])
    return CentralizedResult(params, losses)
