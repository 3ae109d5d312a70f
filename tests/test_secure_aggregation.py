"""Secure aggregation with Flower's real SecAgg+ (server workflow and client mod), delivered in-process so
that the tests see every byte a client sends and can make a device vanish mid-protocol."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.secaggplus_constants import Stage

from metafleet.client import app as client_module
from metafleet.common.config import RunConfig
from metafleet.common.errors import ConfigError
from metafleet.common.fleets import functional_model, make_fleet, split_clients
from metafleet.common.privacy import clip_values
from metafleet.common.training import client_train, weighted_mean
from metafleet.server.app import initial_params
from metafleet.server.grid import MeteredGrid
from metafleet.server.secure import SecureAggregation
from metafleet.server.strategy import make_strategy
from metafleet.simulations.inprocess import RUN_ID, InProcessGrid, device_contexts, stage_of

# Outer SGD with step 1: θ moves by exactly the aggregate, so the aggregate can be read back from θ.
CONFIG = RunConfig.resolve(
    dataset="sinusoid", algorithm="reptile", clients=8, held_out_clients=2, clients_per_round=5,
    outer_optimizer="sgd", outer_lr=1.0, secure_aggregation=True,
)
# SecAgg+ quantizes every value in steps of 2·range/2^22; stochastic rounding errs by less than one step.
STEP = 2 * CONFIG.secagg_range / 2**22


class Fleet:
    """A secure server-side strategy and five devices, with every update the devices compute in plaintext."""

    def __init__(self, config: RunConfig = CONFIG, vanish_at: dict[int, str] | None = None, node_config=None,
                 client_app=None):
        self.config = config
        training, _ = split_clients(config)
        self.client_ids = training[: config.clients_per_round]
        contexts = device_contexts(config.to_run_config(), self.client_ids, node_config)
        self.grid = InProcessGrid(client_app or client_module.app, contexts, vanish_at=vanish_at or {})
        self.metered = MeteredGrid(self.grid)
        self.strategy = make_strategy(config, initial_params(config))
        self.strategy.training_nodes = sorted(contexts)
        self.received: list[tuple[dict, int]] = []
        apply = self.strategy.apply_aggregate

        def recording_apply(mean, contributors):
            self.received.append(({k: v.clone() for k, v in mean.items()}, contributors))
            apply(mean, contributors)

        self.strategy.apply_aggregate = recording_apply
        self.secure = SecureAggregation(self.strategy, RUN_ID, timeout=None)

    def plaintext_updates(self, server_round: int, theta) -> dict[int, dict]:
        """What each device computes before masking (the same seeded episode as in its train handler)."""
        fleet = make_fleet(self.config)
        fmodel = functional_model(self.config)
        seed = self.config.seed
        return {
            1000 + position: client_train(
                fmodel, theta, fleet.client(cid), self.config, np.random.default_rng([seed, server_round, cid])
            ).pseudo_grad
            for position, cid in enumerate(self.client_ids)
        }

    def run_round(self, server_round: int = 1):
        theta = {k: v.clone() for k, v in self.strategy.params.items()}
        self.secure.train_round(self.metered, server_round)
        return theta


def _flat(params) -> torch.Tensor:
    return torch.cat([t.flatten().double() for t in params.values()])


def test_only_the_aggregate_reaches_the_strategy_and_it_is_the_plaintext_mean():
    fleet = Fleet()
    theta = fleet.run_round()
    updates = fleet.plaintext_updates(1, theta)

    assert len(fleet.received) == 1, "the strategy must see one aggregate a round, nothing per client"
    mean, contributors = fleet.received[0]
    assert contributors == 5
    expected = weighted_mean(list(updates.values()), [1.0] * len(updates))
    error = (_flat(mean) - _flat(expected)).abs().max().item()
    assert error < STEP, f"secure aggregate differs from the plaintext mean by {error:.2e} (step {STEP:.2e})"
    relative = ((_flat(mean) - _flat(expected)).norm() / _flat(expected).norm()).item()
    assert relative < 1e-4
    # θ moved by exactly that aggregate (outer SGD, step 1, θ ← θ − ū with ū = θ − θ'): the meta-update ran once.
    assert (_flat(theta) - _flat(fleet.strategy.params) - _flat(mean)).abs().max().item() < 1e-6
    # Where the round's time went, for metrics.jsonl: each stage's exchange and the server's own work.
    timing = {key: value for key, value in fleet.strategy.last_round.metrics.items()
              if key.startswith("secagg-") and key.endswith("-seconds")}
    assert set(timing) == {"secagg-setup-seconds", "secagg-share-keys-seconds",
                           "secagg-collect-masked-vectors-seconds", "secagg-unmask-seconds", "secagg-server-seconds"}
    assert all(value >= 0 for value in timing.values())
    assert timing["secagg-collect-masked-vectors-seconds"] > timing["secagg-setup-seconds"]  # the devices train

    # Everything the devices sent: no array in it is any device's update, or close to one.
    sent_vectors = []
    for reply in fleet.grid.replies:
        assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
        assert not any(len(record) for record in reply.content.array_records.values()), "plaintext arrays were sent"
        for record in reply.content.config_records.values():
            for value in record.values():
                values = value if isinstance(value, list) else [value]
                for item in values:
                    if isinstance(item, bytes) and item[:6] == b"\x93NUMPY":
                        sent_vectors.append(bytes_to_ndarray(item))
    assert len(sent_vectors) >= 5 * len(expected), "expected every device's masked vectors"
    for node, update in updates.items():
        for name, tensor in update.items():
            plain = tensor.flatten().double().numpy()
            for vector in sent_vectors:
                if vector.size != plain.size or plain.size < 8:
                    continue
                correlation = abs(np.corrcoef(vector.astype(np.float64).ravel(), plain)[0, 1])
                assert correlation < 0.9, f"a masked vector correlates with node {node}'s '{name}'"


@pytest.mark.parametrize("algorithm", ["fedavg", "fomaml", "maml"])
def test_every_algorithm_s_update_travels_masked_and_aggregates_to_its_plaintext_mean(algorithm):
    config = CONFIG.replace(algorithm=algorithm)
    fleet = Fleet(config)
    theta = fleet.run_round()
    updates = fleet.plaintext_updates(1, theta)
    (mean, contributors), = fleet.received
    # What a device sends is its update with values clamped to ±clipping range (and counted, so the run
    # can warn); with each algorithm's default range nothing is clamped.
    sent = [clip_values(update, config.secagg_range) for update in updates.values()]
    assert sum(count for _, count in sent) == 0
    expected = weighted_mean([update for update, _ in sent], [1.0] * len(sent))
    assert contributors == 5
    assert (_flat(mean) - _flat(expected)).abs().max().item() < 2 * config.secagg_range / 2**22
    assert fleet.strategy.last_round.metrics["secagg-clamped"] == sum(count for _, count in sent)
    assert all(not any(len(r) for r in reply.content.array_records.values()) for reply in fleet.grid.replies)


def test_a_device_vanishing_after_the_key_exchange_leaves_the_mean_of_the_other_four(caplog):
    vanishing = 1002
    fleet = Fleet(vanish_at={vanishing: Stage.COLLECT_MASKED_VECTORS})
    with caplog.at_level(logging.WARNING, logger="metafleet"):
        theta = fleet.run_round()
    updates = fleet.plaintext_updates(1, theta)
    survivors = [u for node, u in updates.items() if node != vanishing]
    (mean, contributors), = fleet.received
    assert contributors == 4 and fleet.strategy.last_round.accepted == 4 and not fleet.strategy.last_round.skipped
    expected = weighted_mean(survivors, [1.0] * 4)
    assert (_flat(mean) - _flat(expected)).abs().max().item() < STEP
    assert [r.node_id for r in fleet.strategy.rejections] == [vanishing]
    assert "dropped out of secure aggregation" in caplog.text


def test_past_the_threshold_the_round_fails_cleanly_and_the_next_one_runs(caplog):
    # 5 shares, threshold 3: three devices vanishing leave two, too few to unmask.
    vanishing = {1000 + position: Stage.COLLECT_MASKED_VECTORS for position in (0, 1, 2)}
    fleet = Fleet(vanish_at=vanishing)
    theta = {k: v.clone() for k, v in fleet.strategy.params.items()}
    with caplog.at_level(logging.WARNING, logger="metafleet"):
        fleet.run_round(1)
    assert fleet.strategy.last_round.skipped and not fleet.received
    assert _flat(theta).equal(_flat(fleet.strategy.params)), "a failed round must leave θ unchanged"
    assert "round 1 skipped: secure aggregation" in caplog.text

    fleet.grid.vanish_at.clear()
    fleet.grid._vanished.clear()
    fleet.run_round(2)
    assert not fleet.strategy.last_round.skipped and fleet.received[-1][1] == 5


def test_a_malformed_protocol_reply_costs_one_round_not_the_run(caplog):
    def garbling_mod(msg, context, call_next):
        stage = stage_of(msg)  # read first: secaggplus_mod consumes the stage key
        reply = call_next(msg, context)
        if context.node_id == 1001 and stage == Stage.SHARE_KEYS:
            return Message(RecordDict({"secaggplus_configs": ConfigRecord({"nonsense": 1})}), reply_to=msg)
        return reply

    app = ClientApp(mods=[garbling_mod, client_module.secure_aggregation_mod])
    app.query()(client_module.query)
    app.train()(client_module.train)
    app.evaluate()(client_module.evaluate)
    fleet = Fleet(client_app=app)
    theta = {k: v.clone() for k, v in fleet.strategy.params.items()}
    with caplog.at_level(logging.WARNING, logger="metafleet"):
        fleet.run_round(1)
    assert fleet.strategy.last_round.skipped and _flat(theta).equal(_flat(fleet.strategy.params))
    assert "secure aggregation failed (KeyError" in caplog.text

    fleet.grid.client_app = client_module.app
    fleet.run_round(2)
    assert not fleet.strategy.last_round.skipped and fleet.received[-1][1] == 5


def test_a_device_with_a_non_finite_update_refuses_to_send_it(monkeypatch):
    poisoned = split_clients(CONFIG)[0][3]
    real_train = client_module.client_train

    def train_with_a_nan(fmodel, params, data, config, rng):
        update = real_train(fmodel, params, data, config, rng)
        if data.client_id == poisoned:
            first = next(iter(update.pseudo_grad))
            update.pseudo_grad[first] = update.pseudo_grad[first] * float("nan")
        return update

    monkeypatch.setattr(client_module, "client_train", train_with_a_nan)
    fleet = Fleet()
    fleet.run_round()
    (mean, contributors), = fleet.received
    assert contributors == 4
    assert all(torch.isfinite(t).all() for t in mean.values())
    (rejection,) = fleet.strategy.rejections
    assert rejection.node_id == 1003 and "NaN" in rejection.reason


def test_a_device_that_requires_secure_aggregation_refuses_a_plain_server():
    plain = CONFIG.replace(secure_aggregation=False, min_replies=1)
    fleet = Fleet(plain, node_config={"secure-aggregation": True})
    theta = {k: v.clone() for k, v in fleet.strategy.params.items()}
    messages = fleet.strategy.configure_train(1, client_module.to_array_record(theta), ConfigRecord(), fleet.metered)
    fleet.strategy.aggregate_train(1, fleet.metered.send_and_receive(messages))
    assert fleet.strategy.last_round.skipped
    reasons = {r.reason for r in fleet.strategy.rejections}
    assert len(fleet.strategy.rejections) == 5
    assert all("set up for secure aggregation" in reason and "plain training request" in reason for reason in reasons)


def test_a_secure_server_names_the_devices_set_up_without_it(caplog):
    fleet = Fleet(node_config={"secure-aggregation": False})
    with caplog.at_level(logging.WARNING, logger="metafleet"):
        fleet.run_round()
    assert fleet.strategy.last_round.skipped and not fleet.received
    assert len(fleet.strategy.rejections) == 5
    assert all("set up without it" in r.reason for r in fleet.strategy.rejections)
    assert "round 1 skipped: secure aggregation" in caplog.text


def test_bytes_are_counted_for_the_secure_protocol():
    fleet = Fleet()
    fleet.run_round()
    up, down = fleet.metered.take_bytes()
    parameters = sum(t.numel() for t in fleet.strategy.params.values())
    # Each device uploads at least its masked vector (8-byte integers) and downloads θ.
    assert up > 5 * parameters * 4 and down > 5 * parameters * 4
    assert fleet.metered.take_bytes() == (0, 0)


def test_secure_aggregation_needs_three_clients_a_round():
    with pytest.raises(ConfigError, match="clients_per_round"):
        RunConfig.resolve(dataset="sinusoid", clients=8, held_out_clients=2, clients_per_round=2,
                          secure_aggregation=True)
    with pytest.raises(ConfigError, match="secagg_shares"):
        CONFIG.replace(secagg_shares=4)
