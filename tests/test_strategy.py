"""The meta-strategy's aggregation and reply validation, in-process."""

import logging
import math

import torch
from flwr.app import ArrayRecord, Error, MetricRecord, RecordDict

from metafleet.common.config import RunConfig
from metafleet.common.records import from_array_record, to_array_record
from metafleet.server.app import initial_params
from metafleet.server.strategy import ReptileStrategy, make_strategy
from tests.flower_messages import reply_from

CONFIG = RunConfig.resolve(
    dataset="sinusoid", algorithm="reptile", clients=20, clients_per_round=5, min_replies=2, outer_optimizer="sgd",
    outer_lr=1.0,
)


def _reply(node: int, update, num_examples=20, **extra_records):
    records = {"arrays": to_array_record(update), "metrics": MetricRecord({"num-examples": num_examples}),
               **extra_records}
    return reply_from(node, RecordDict(records))


def _constant_update(params, value):
    return {name: torch.full_like(t, value) for name, t in params.items()}


def test_bad_replies_are_dropped_with_node_and_reason_and_the_round_goes_on(caplog):
    params = initial_params(CONFIG)
    strategy = make_strategy(CONFIG, params)
    assert isinstance(strategy, ReptileStrategy)
    strategy.last_round.sampled_nodes = [1, 2, 3, 4, 5, 6, 7, 8]
    wrong_shape = {**params, "net.0.weight": torch.zeros(2, 2)}
    nan_update = _constant_update(params, math.nan)
    missing_key = {k: v for k, v in _constant_update(params, 1.0).items() if k != "net.0.bias"}
    replies = [
        _reply(1, _constant_update(params, 1.0), num_examples=10),
        _reply(2, _constant_update(params, 4.0), num_examples=30),
        _reply(3, nan_update),
        _reply(4, wrong_shape),
        _reply(5, missing_key),
        _reply(6, _constant_update(params, 1e6)),  # an absurd norm
        reply_from(7, Error(code=2, reason="Message: device ran out of memory'>")),
        _reply(8, _constant_update(params, 1.0), num_examples=-3),
    ]
    with caplog.at_level(logging.WARNING, logger="metafleet.server"):
        arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None and strategy.last_round.accepted == 2
    expected_mean = (1.0 * 10 + 4.0 * 30) / 40  # weighted by examples; SGD lr 1 moves θ by −mean
    new = from_array_record(arrays)
    for name in params:
        torch.testing.assert_close(new[name], params[name] - expected_mean)
    reasons = {r.node_id: r.reason for r in strategy.rejections}
    assert set(reasons) == {3, 4, 5, 6, 7, 8}
    assert "NaN" in reasons[3] and "shape" in reasons[4] and "missing ['net.0.bias']" in reasons[5]
    assert "norm" in reasons[6] and "out of memory" in reasons[7] and "num-examples" in reasons[8]
    assert "node 4" in caplog.text


def test_a_round_with_too_few_valid_replies_is_skipped_and_theta_kept():
    params = initial_params(CONFIG)
    strategy = make_strategy(CONFIG, params)
    strategy.last_round.sampled_nodes = [1, 2]
    arrays, _ = strategy.aggregate_train(1, [_reply(1, _constant_update(params, 1.0)),
                                             _reply(2, _constant_update(params, math.inf))])
    assert arrays is None and strategy.last_round.skipped
    for name in params:
        torch.testing.assert_close(strategy.params[name], params[name])


def test_a_reply_with_an_extra_record_is_dropped():
    params = initial_params(CONFIG)
    strategy = make_strategy(CONFIG, params)
    smuggled = ArrayRecord({"x": torch.zeros(1)})
    arrays, _ = strategy.aggregate_train(1, [_reply(1, _constant_update(params, 1.0), smuggled=smuggled)])
    assert arrays is None and "one ArrayRecord" in strategy.rejections[0].reason


def test_evaluation_aggregates_curves_with_confidence_intervals():
    strategy = make_strategy(RunConfig.resolve(dataset="sinusoid", eval_steps="0,5"), initial_params(CONFIG))

    def metrics(client_id, before, after, guarded_after):
        return MetricRecord({"num-examples": 1, "client-id": client_id, "step-0": before, "step-5": after,
                             "guarded-step-0": before, "guarded-step-5": guarded_after})

    curves = [(7, 2.0, 1.0, 1.0), (3, 4.0, 1.0, 4.0), (5, 3.0, 1.0, 1.0)]
    replies = [reply_from(n, RecordDict({"metrics": metrics(*curve)})) for n, curve in enumerate(curves, start=1)]
    incomplete = reply_from(9, RecordDict({"metrics": MetricRecord({"num-examples": 1, "step-0": 1.0, "step-5": 1.0})}))
    result = strategy.aggregate_evaluate(10, [*replies, incomplete])
    assert result["clients"] == 3 and result["mean-step-0"] == 3.0 and result["ci95-step-5"] == 0.0
    assert result["ci95-step-0"] > 0
    assert result["mean-guarded-step-5"] == 2.0
    assert list(result["client-ids"]) == [7, 3, 5] and list(result["clients-guarded-step-5"]) == [1.0, 4.0, 1.0]
    assert strategy.rejections[-1].node_id == 9


def test_state_round_trip_restores_parameters_optimizer_and_sampling():
    config = RunConfig.resolve(dataset="sinusoid", algorithm="maml", clients=20)
    params = initial_params(config)
    first = make_strategy(config, params)
    first.training_nodes = list(range(100, 118))
    first.sampling_rng.integers(100, size=7)  # as sampling a round would
    first.apply_aggregate(_constant_update(params, 0.5), 2)
    second = make_strategy(config, params)
    second.training_nodes = list(first.training_nodes)
    second.load_state_dict(first.state_dict())
    assert second.optimizer.state_dict()["steps_taken"] == 1
    for name in params:
        torch.testing.assert_close(second.params[name], first.params[name])
    assert first.sampling_rng.integers(1 << 30) == second.sampling_rng.integers(1 << 30)


def test_the_meta_update_does_not_depend_on_the_order_replies_arrive_in():
    # Float sums depend on their order; Ray's replies arrive in another order each run.
    params = initial_params(CONFIG)
    generator = torch.Generator().manual_seed(0)
    updates = {node: {name: torch.randn(t.shape, generator=generator) * 10.0 ** (node % 4)
                      for name, t in params.items()} for node in range(1, 9)}
    results = []
    for order in (list(updates), list(reversed(updates)), [3, 7, 1, 8, 2, 6, 4, 5]):
        strategy = make_strategy(CONFIG, params)
        strategy.last_round.sampled_nodes = list(updates)
        arrays, _ = strategy.aggregate_train(1, [_reply(node, updates[node], num_examples=node) for node in order])
        results.append(from_array_record(arrays))
    for other in results[1:]:
        assert all(torch.equal(other[name], results[0][name]) for name in params)
