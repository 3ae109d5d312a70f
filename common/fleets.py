"""Builds the fleet a run configuration names."""

from __future__ import annotations

import torch
from torch import nn

from metafleet.common.config import RunConfig
from metafleet.common.data import Fleet, held_out_client_ids
from metafleet.common.errors import ConfigError
from metafleet.common.meta import FunctionalModel


def fleet_class(dataset: str) -> type[Fleet]:
    if dataset == "sinusoid":
        from metafleet.common.sinusoid import SinusoidFleet

        return SinusoidFleet
    if dataset == "watch":
        from metafleet.common.watch import WatchFleet

        return WatchFleet
    if dataset == "omniglot":
        from metafleet.common.omniglot import OmniglotFleet

        return OmniglotFleet
    if dataset == "fashion-mnist":
        from metafleet.common.fashion_mnist import FashionMnistFleet

        return FashionMnistFleet
    if dataset == "shakespeare":
        from metafleet.common.shakespeare import ShakespeareFleet

        return ShakespeareFleet
    raise ConfigError("dataset", dataset, "is not a data set metafleet knows")


def make_fleet(config: RunConfig) -> Fleet:
    return fleet_class(config.dataset).build(config, split_clients(config)[1])


def make_model(config: RunConfig) -> nn.Module:
    """The run's model, built without reading any data (the server has none)."""
    return fleet_class(config.dataset).make_model(config.head_ways)


def functional_model(config: RunConfig, device: torch.device | str = "cpu") -> FunctionalModel:
    """The run's model as the meta-learning core uses it, with the run's head initialization."""
    fleet = fleet_class(config.dataset)
    return FunctionalModel(fleet.make_model(config.head_ways).to(device), fleet.objective, config.head_init)


def split_clients(config: RunConfig) -> tuple[list[int], list[int]]:
    """(training client ids, held-out client ids), identical on the server and on every device."""
    held_out = held_out_client_ids(config.clients, config.held_out_clients, config.seed, config.fold)
    excluded = set(held_out)
    return [i for i in range(config.clients) if i not in excluded], held_out
