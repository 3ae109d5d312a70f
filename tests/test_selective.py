"""--selective-layers: devices send the layers that changed most since they last sent them; the server
averages each layer over its senders and leaves the others as they were."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from metafleet.client import app as client_module
from metafleet.common.config import RunConfig
from metafleet.common.errors import ConfigError
from metafleet.common.fleets import split_clients
from metafleet.common.optim import OuterAdam, OuterSGD
from metafleet.common.records import to_array_record
from metafleet.common.robust import Defense
from metafleet.common.selective import (
    SELECTIVE_DEFAULT,
    SENT_KEY,
    layers,
    select_layers,
    sent_flags,
    sent_reference,
)
from metafleet.server.app import initial_params
from metafleet.server.defenses import layerwise_aggregate
from metafleet.server.grid import MeteredGrid
from metafleet.server.strategy import make_strategy
from metafleet.simulations.inprocess import InProcessGrid, device_contexts

SINUSOID = dict(dataset="sinusoid", algorithm="reptile", clients=24, held_out_clients=4, clients_per_round=10)


def _model() -> dict[str, torch.Tensor]:
    return {"a.weight": torch.ones(4, 4), "a.bias": torch.ones(4), "b.weight": torch.ones(4, 4),
            "b.bias": torch.ones(4), "c.weight": torch.ones(8)}


def test_a_device_sends_its_most_changed_whole_layers_within_the_share_and_keeps_the_rest():
    params = _model()
    update = {name: torch.full_like(t, 0.01) for name, t in params.items()}
    update["b.weight"] += 1.0  # layer b changed most relative to its size
    sent, left = select_layers(update, None, params, share=0.5)  # 20 of 48 values fit, b is 20
    assert set(sent) == {"b.weight", "b.bias"}
    # Nothing is lost: what is sent and what stays add up to the update.
    for name in update:
        assert torch.equal(sent.get(name, torch.zeros_like(update[name])) + left[name], update[name])
    # Next round the skipped layers carry their earlier change: a small new one tips layer c over.
    second = {name: torch.zeros_like(t) for name, t in params.items()}
    second["c.weight"] += 0.5
    sent, left = select_layers(second, left, params, share=0.5)  # c (8 values) fits; a (20) would not
    assert set(sent) == {"c.weight"}
    assert torch.allclose(sent["c.weight"], torch.full((8,), 0.51))
    assert torch.equal(left["b.weight"], torch.zeros(4, 4))


def test_a_layer_larger_than_the_share_is_still_sent_when_it_changed_most():
    params = _model()
    update = {name: torch.zeros_like(t) for name, t in params.items()}
    update["a.weight"] += 1.0
    sent, _ = select_layers(update, None, params, share=0.1)  # 4.8 values: no layer fits
    assert set(sent) == {"a.weight", "a.bias"}


def test_the_server_refuses_a_selective_payload_that_does_not_say_or_cuts_a_layer():
    reference = _model()
    payload = {name: t.numpy() for name, t in reference.items() if name.startswith("a.")}
    with pytest.raises(ValueError, match="must say which tensors"):
        sent_reference(dict(payload), reference)
    with pytest.raises(ValueError, match="uint8 flags"):
        sent_reference({**payload, SENT_KEY: np.ones(2, np.uint8)}, reference)
    with pytest.raises(ValueError, match="at least one layer"):
        sent_reference({SENT_KEY: np.zeros(5, np.uint8)}, reference)
    cut = sent_flags({"a.weight": reference["a.weight"]}, list(reference))
    with pytest.raises(ValueError, match="cut layer 'a'"):
        sent_reference({**payload, SENT_KEY: cut}, reference)
    rest, part = sent_reference({**payload, SENT_KEY: sent_flags(payload, list(reference))}, reference)
    assert set(rest) == set(part) == {"a.weight", "a.bias"}


def test_each_layer_is_averaged_over_its_senders_and_an_unsent_layer_stays_as_it_was():
    names = list(_model())
    first = {"a.weight": torch.ones(4, 4), "a.bias": torch.ones(4)}
    second = {"a.weight": 3 * torch.ones(4, 4), "a.bias": 3 * torch.ones(4), "b.weight": torch.ones(4, 4),
              "b.bias": torch.ones(4)}
    aggregate, metrics = layerwise_aggregate([first, second], [1.0, 1.0], Defense(), names)
    assert torch.equal(aggregate["a.weight"], 2 * torch.ones(4, 4))  # both sent a
    assert torch.equal(aggregate["b.weight"], torch.ones(4, 4))  # only the second sent b
    assert "c.weight" not in aggregate and metrics["layers-unsent"] == 1.0
    median, _ = layerwise_aggregate([first, second, second], [1.0] * 3, Defense.parse("median"), names)
    assert torch.equal(median["a.weight"], 3 * torch.ones(4, 4))
    params = _model()
    for optimizer in (OuterSGD(1.0, momentum=0.5), OuterAdam(0.1)):
        stepped = optimizer.step(params, aggregate)
        assert torch.equal(stepped["c.weight"], params["c.weight"])
        assert not torch.equal(stepped["a.weight"], params["a.weight"])
        state = optimizer.state_dict()
        assert "c.weight" not in state.get("velocity", state.get("first_moment"))


@pytest.mark.parametrize("compress", ["none", "q8"])
def test_selective_devices_send_less_and_the_server_applies_what_they_sent(compress):
    def round_bytes(config):
        training, _ = split_clients(config)
        contexts = device_contexts(config.to_run_config(), training[:4])
        grid = MeteredGrid(InProcessGrid(client_module.app, contexts))
        strategy = make_strategy(config, initial_params(config))
        strategy.training_nodes = sorted(contexts)
        replies = list(grid.send_and_receive(strategy.configure_train(1, to_array_record(strategy.params),
                                                                       ConfigRecord(), grid)))
        before = {name: t.clone() for name, t in strategy.params.items()}
        strategy.aggregate_train(1, replies)
        assert strategy.last_round.accepted == 4, strategy.rejections
        changed = {name for name in before if not torch.equal(before[name], strategy.params[name])}
        kept = [client_module.UNSENT_LAYERS_RECORD in c.state.array_records for c in contexts.values()]
        return grid.take_bytes()[0], changed, strategy, all(kept)

    plain_up, plain_changed, _, _ = round_bytes(RunConfig.resolve(**SINUSOID, compress=compress))
    up, changed, strategy, kept = round_bytes(RunConfig.resolve(**SINUSOID, compress=compress, selective_layers=0.3))
    assert kept and up < 0.6 * plain_up, (up, plain_up)
    assert changed and changed <= plain_changed
    unsent = set(layers(list(strategy.params))) - {name.rpartition(".")[0] for name in changed}
    assert strategy.last_round.metrics["layers-unsent"] == len(unsent)


def test_a_selective_reply_without_its_flags_is_refused_with_its_reason():
    config = RunConfig.resolve(**SINUSOID, selective_layers=0.5)
    strategy = make_strategy(config, initial_params(config))
    arrays = ArrayRecord({name: torch.zeros(t.shape) for name, t in strategy.params.items()})
    reply = Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 10})}), 7,
                    MessageType.TRAIN)
    with pytest.raises(ValueError, match="must say which tensors it holds"):
        strategy._validated(reply)


@pytest.mark.parametrize("extra, problem", [
    (dict(selective_layers=1.0), "share of the model's parameters"),
    (dict(selective_layers=0.5, secure_aggregation=True), "saves nothing under secure aggregation"),
    (dict(selective_layers=0.5, dp_noise_multiplier=1.0), "differential privacy"),
    (dict(selective_layers=0.5, compress="topk:0.1"), "top-k already chooses"),
])
def test_selective_layers_refuses_what_it_cannot_combine_with(extra, problem):
    with pytest.raises(ConfigError, match=problem):
        RunConfig.resolve(**SINUSOID, **extra)


def test_simulate_takes_selective_layers_bare_or_with_a_share_and_runs(tmp_path):
    from metafleet.common.cli_options import config_from_arguments
    from metafleet.simulations.cli import simulate, simulate_parser

    bare = config_from_arguments(simulate_parser().parse_args(["--dataset", "sinusoid", "--selective-layers"]))
    share = config_from_arguments(simulate_parser().parse_args(["--dataset", "sinusoid", "--selective-layers", "0.3"]))
    assert (bare.selective_layers, share.selective_layers) == (SELECTIVE_DEFAULT, 0.3)
    config = RunConfig.resolve(**SINUSOID, rounds=3, eval_every=3, selective_layers=0.5, compress="q8")
    summary = simulate(config, tmp_path / "run", backend="inprocess")
    assert summary["rounds_completed"] == 3 and summary["bytes_up"] > 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("layer-senders-mean" in row for row in rows if row["phase"] == "train")
