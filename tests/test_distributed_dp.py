"""Distributed DP: each device adds a discrete Gaussian share before SecAgg+ masks; the server sees a noised sum."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from metafleet.common.errors import ConfigError
from metafleet.common.privacy import clip_to_norm, discrete_gaussian, distributed_dp_share
from metafleet.common.training import weighted_mean
from tests.test_secure_aggregation import CONFIG, Fleet, _flat

DP = CONFIG.replace(dp_noise_multiplier=1.0, dp_clip_norm=0.5, dp_mode="distributed", min_replies=2)


@pytest.mark.parametrize("sigma", [3.0, 50.0, 4000.0])
def test_the_discrete_gaussian_has_mean_zero_and_the_stated_scale(sigma):
    samples = discrete_gaussian((100_000,), sigma, np.random.default_rng(1))
    assert samples.dtype == np.int64
    assert abs(samples.mean()) < 4 * sigma / math.sqrt(len(samples))
    assert abs(samples.std() / sigma - 1) < 0.02


def test_a_share_lies_on_secaggs_lattice():
    update = {"w": torch.randn(300) * 0.01, "b": torch.randn(7) * 0.01}
    update, _ = clip_to_norm(update, 0.5)
    noised, sensitivity = distributed_dp_share(update, 0.5, 1.0, 2, DP.secagg_step, np.random.default_rng(0))
    assert sensitivity == pytest.approx(0.5 / DP.secagg_step + math.sqrt(307))
    for name, tensor in noised.items():
        units = tensor.double() / DP.secagg_step
        assert torch.equal(units, units.round()), name  # SecAgg+'s own rounding then changes nothing
        assert tensor.dtype == update[name].dtype


def test_the_server_sees_the_sum_noised_by_the_devices_at_the_stated_scale_and_epsilon_is_the_accountants():
    from opacus.accountants import RDPAccountant

    fleet = Fleet(DP)
    theta = fleet.run_round()
    (mean, contributors), = fleet.received
    assert contributors == 5
    clipped = [clip_to_norm(update, DP.dp_clip_norm)[0] for update in fleet.plaintext_updates(1, theta).values()]
    residual = (_flat(mean) - _flat(weighted_mean(clipped, [1.0] * len(clipped)))).numpy()
    dimension = residual.size
    # Each device: std σ·Δ/sqrt(min_replies) in lattice units; the mean of 5 divides their sum by 5.
    sensitivity = DP.dp_clip_norm / DP.secagg_step + math.sqrt(dimension)
    expected = math.sqrt(contributors) * DP.dp_noise_multiplier * sensitivity / math.sqrt(DP.min_replies)
    expected *= DP.secagg_step / contributors
    assert abs(residual.std() / expected - 1) < 0.1, (residual.std(), expected)
    assert abs(residual.mean()) < 5 * expected / math.sqrt(dimension)

    accountant = RDPAccountant()
    accountant.history = [(DP.dp_noise_multiplier, DP.clients_per_round / DP.training_clients, 1)]
    assert fleet.strategy.privacy.epsilon == pytest.approx(accountant.get_epsilon(DP.dp_delta))
    assert fleet.strategy.last_round.metrics["epsilon"] == pytest.approx(fleet.strategy.privacy.epsilon)


def test_distributed_dp_needs_secure_aggregation_and_noise():
    with pytest.raises(ConfigError, match="'distributed' needs secure aggregation"):
        DP.replace(secure_aggregation=False, min_replies=1)
    with pytest.raises(ConfigError, match="dp_mode"):
        DP.replace(dp_mode="local")
