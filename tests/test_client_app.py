"""The ClientApp's handlers, called in-process on real sinusoid data."""

import math

import pytest
import torch
from flwr.app import ConfigRecord, MessageType, RecordDict

from metafleet.client import app as client_app
from metafleet.common.config import RunConfig
from metafleet.common.fleets import split_clients
from metafleet.common.records import from_array_record, to_array_record
from metafleet.server.app import initial_params
from tests.flower_messages import device_context, instruction

CONFIG = RunConfig.resolve(dataset="sinusoid", algorithm="maml", clients=20, rounds=3, inner_steps=2)
TRAINING, HELD_OUT = split_clients(CONFIG)


def _train_message(params) -> object:
    return instruction(RecordDict({"arrays": to_array_record(params), "config": ConfigRecord({"server-round": 1})}))


def test_train_returns_a_finite_pseudo_gradient_in_the_array_record_only():
    params = initial_params(CONFIG)
    reply = client_app.train(_train_message(params), device_context(TRAINING[0], CONFIG.to_run_config()))
    update = from_array_record(reply.content["arrays"])
    assert set(update) == set(params)
    assert all(update[k].shape == params[k].shape and torch.isfinite(update[k]).all() for k in params)
    assert any(update[k].abs().sum() > 0 for k in params)
    metrics = dict(reply.content["metrics"])
    assert metrics["num-examples"] == CONFIG.shots + CONFIG.query_shots
    # Metrics are not masked by secure aggregation: nothing array-valued may travel there.
    assert all(isinstance(v, (int, float)) for v in metrics.values())


def test_a_held_out_client_refuses_to_train_and_says_why():
    with pytest.raises(RuntimeError, match="held out"):
        client_app.train(_train_message(initial_params(CONFIG)), device_context(HELD_OUT[0], CONFIG.to_run_config()))


def test_non_finite_or_misshapen_parameters_are_refused():
    params = initial_params(CONFIG)
    poisoned = {**params, "net.0.bias": torch.full_like(params["net.0.bias"], math.nan)}
    with pytest.raises(ValueError, match="received unusable parameters.*NaN"):
        client_app.train(_train_message(poisoned), device_context(TRAINING[0], CONFIG.to_run_config()))
    misshapen = {**params, "net.0.bias": torch.zeros(3)}
    with pytest.raises(ValueError, match="shape"):
        client_app.train(_train_message(misshapen), device_context(TRAINING[0], CONFIG.to_run_config()))


def test_evaluate_reports_the_personalization_curve():
    message = instruction(
        RecordDict({"arrays": to_array_record(initial_params(CONFIG)), "config": ConfigRecord({"server-round": 3})}),
        MessageType.EVALUATE,
    )
    reply = client_app.evaluate(message, device_context(HELD_OUT[0], CONFIG.to_run_config()))
    metrics = dict(reply.content["metrics"])
    assert [f"step-{s}" for s in CONFIG.eval_steps] == [k for k in metrics if k.startswith("step-")]
    curve = [metrics[f"step-{s}"] for s in CONFIG.eval_steps]
    assert all(math.isfinite(v) and v > 0 for v in curve) and len(set(curve)) == len(curve)
    guarded = [metrics[f"guarded-step-{s}"] for s in CONFIG.eval_steps]
    # The guard either keeps a step count's adapted value or falls back to the unadapted one.
    assert guarded[0] == curve[0] and all(g in (c, curve[0]) for g, c in zip(guarded, curve, strict=True))
    assert metrics["client-id"] == HELD_OUT[0]


def test_query_says_who_the_device_is():
    context = device_context(HELD_OUT[0], CONFIG.to_run_config())
    reply = client_app.query(instruction(RecordDict(), MessageType.QUERY), context)
    info = reply.content["info"]
    assert (info["client-id"], info["role"]) == (HELD_OUT[0], "held-out")


def test_a_node_without_partition_id_gets_a_clear_error():
    context = device_context(0, CONFIG.to_run_config())
    context.node_config.clear()
    with pytest.raises(Exception, match="partition-id"):
        client_app.query(instruction(RecordDict(), MessageType.QUERY), context)


@pytest.mark.parametrize(
    ("name", "problem"),
    [("gpu0", "not a device name torch knows"), ("cuda", "sees no CUDA device")],
)
def test_an_unusable_torch_device_is_named(name, problem, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a device without CUDA, on any machine
    context = device_context(TRAINING[0], CONFIG.to_run_config())
    context.node_config["torch-device"] = name
    with pytest.raises(Exception, match=problem):
        client_app.train(_train_message(initial_params(CONFIG)), context)
    monkeypatch.setenv("METAFLEET_TORCH_DEVICE", name)
    del context.node_config["torch-device"]
    with pytest.raises(Exception, match=problem):
        client_app.train(_train_message(initial_params(CONFIG)), context)


def test_simulated_devices_data_is_kept_within_its_bounds():
    from metafleet.client.app import _ClientDataCache

    config = RunConfig.resolve(dataset="sinusoid", algorithm="reptile", clients=50)
    cache = _ClientDataCache(max_bytes=10**9, max_devices=3)
    first = cache.get(config, 0)
    assert cache.get(config, 0) is first  # built once
    for client_id in (1, 2, 3):
        cache.get(config, client_id)
    assert cache.get(config, 0) is not first  # the least recently used went first
    one_device = sum(t.nbytes for split in first.splits for batch in (split.support, split.query) for t in batch)
    small = _ClientDataCache(max_bytes=2 * one_device, max_devices=100)
    kept = [small.get(config, client_id) for client_id in range(5)]
    assert small.get(config, 4) is kept[4] and small.get(config, 3) is kept[3] and small.get(config, 0) is not kept[0]
