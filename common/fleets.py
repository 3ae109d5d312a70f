"""Builds the fleet a run configuration names."""

from __future__ import annotations

from metafleet.common.config import RunConfig
from metafleet.common.data import Fleet, held_out_client_ids
from metafleet.common.errors import ConfigError


def make_fleet(config: RunConfig) -> Fleet:
    if config.dataset == "sinusoid":
        from metafleet.common.sinusoid import SinusoidFleet

        return SinusoidFleet(config.clients, seed=config.seed)
    if config.dataset == "watch":
        from metafleet.common.watch import NUM_SUBJECTS, WatchFleet

        if config.clients != NUM_SUBJECTS:
            raise ConfigError("clients", config.clients, f"must be {NUM_SUBJECTS} for watch (one per subject)")
        return WatchFleet(held_out_client_ids(config.clients, config.held_out_clients, config.seed))
    raise ConfigError("dataset", config.dataset, "is not available in this version (sinusoid, watch are)")


def split_clients(config: RunConfig) -> tuple[list[int], list[int]]:
    """(training client ids, held-out client ids), identical on the server and on every device."""
    held_out = held_out_client_ids(config.clients, config.held_out_clients, config.seed)
    return [i for i in range(config.clients) if i not in set(held_out)], held_out
