"""Builds the fleet and the model a run configuration names: one lookup over built-in and user tasks."""

from __future__ import annotations

import torch
from torch import nn

from metafleet.common.config import RunConfig
from metafleet.common.data import Fleet, held_out_client_ids
from metafleet.common.errors import ConfigError
from metafleet.common.meta import FunctionalModel


def make_fleet(config: RunConfig) -> Fleet:
    """The run's devices: a folder fleet (``config.data``), else the task's own data."""
    task = config.task_definition
    held_out = split_clients(config)[1]
    if config.data:
        from metafleet.common.folder_fleet import FolderFleet

        return FolderFleet(task, config.data, held_out, config.head_ways)
    if task.make_fleet is None:
        raise ConfigError("data", "", f"is needed: task {task.name} has no data of its own; give a folder fleet "
                          "with --data FLEET_DIR")
    return task.make_fleet(config, held_out)


def make_model(config: RunConfig) -> nn.Module:
    """The run's model, built without reading any data (the server has none)."""
    return config.task_definition.make_model(config.head_ways)


def functional_model(config: RunConfig, device: torch.device | str = "cpu") -> FunctionalModel:
    """The run's model as the meta-learning core uses it, with the run's head initialization."""
    return FunctionalModel(make_model(config).to(device), config.task_definition.objective, config.head_init)


def split_clients(config: RunConfig) -> tuple[list[int], list[int]]:
    """(training client ids, held-out client ids), identical on the server and on every device."""
    if config.held_out_names:
        from metafleet.common.folder_fleet import fleet_devices

        devices = fleet_devices(config.data)
        held_out = sorted(devices.index(name) for name in config.held_out_names)
    else:
        held_out = held_out_client_ids(config.clients, config.held_out_clients, config.fold)
    excluded = set(held_out)
    return [i for i in range(config.clients) if i not in excluded], held_out
