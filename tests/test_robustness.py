"""Poisoned devices (simulation only), defences against them, and update compression (issue 18)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict

from metafleet.client import app as client_module
from metafleet.common.compression import Compression, decode, encode
from metafleet.common.config import RunConfig
from metafleet.common.errors import ConfigError
from metafleet.common.fleets import split_clients
from metafleet.common.records import from_array_record, to_array_record
from metafleet.common.robust import Defense
from metafleet.server.app import initial_params
from metafleet.server.defenses import robust_aggregate
from metafleet.server.grid import MeteredGrid
from metafleet.server.strategy import make_strategy
from metafleet.simulations.attacks import AttackingClientApp, attackers, with_trigger
from metafleet.simulations.inprocess import InProcessGrid, device_contexts

SINUSOID = dict(dataset="sinusoid", algorithm="reptile", clients=24, held_out_clients=4, clients_per_round=10)


def _train_replies(config: RunConfig, app, client_ids, server_round: int = 1) -> dict[int, dict]:
    """Each device's plaintext reply (the decoded update) to one training message of θ₀."""
    contexts = device_contexts(config.to_run_config(), client_ids)
    grid = InProcessGrid(app, contexts)
    theta = to_array_record(initial_params(config))
    messages = [Message(RecordDict({"arrays": theta, "config": ConfigRecord({"server-round": server_round})}), node,
                        MessageType.TRAIN) for node in contexts]
    replies = {}
    for node, reply in zip(contexts, grid.send_and_receive(messages), strict=True):
        assert not reply.has_error(), reply.error.reason
        replies[contexts[node].node_config["partition-id"]] = from_array_record(reply.content["arrays"])
    return replies


def _flat(update: dict) -> torch.Tensor:
    return torch.cat([t.flatten().double() for t in update.values()])


@pytest.mark.parametrize("attack", ["sign-flip", "sign-flip:3", "scale", "noise", "label-flip"])
def test_each_attack_changes_what_its_attackers_send_and_only_theirs(attack):
    config = RunConfig.resolve(**SINUSOID, attack=attack, attackers=0.3)
    training, held_out = split_clients(config)
    bad = attackers(config)
    assert len(bad) == round(0.3 * len(training)) and bad <= set(training) and not bad & set(held_out)
    clients = training[:10]
    honest = _train_replies(config, client_module.app, clients)
    poisoned = _train_replies(config, AttackingClientApp(), clients)
    assert any(c in bad for c in clients) and any(c not in bad for c in clients)
    for client in clients:
        same = torch.equal(_flat(honest[client]), _flat(poisoned[client]))
        assert same == (client not in bad), (attack, client)
    for client in bad & set(clients):
        sent, own = _flat(poisoned[client]), _flat(honest[client])
        if attack.startswith("sign-flip"):
            factor = float(attack.partition(":")[2] or 10)
            assert torch.allclose(sent, -factor * own, atol=1e-7)
        elif attack == "noise":
            assert 8 < sent.norm() / own.norm() < 12 and abs(torch.nn.functional.cosine_similarity(sent, own, 0)) < 0.3
        elif attack == "scale":
            assert sent.norm() > 5 * own.norm()


def test_a_real_device_has_no_switch_that_makes_it_attack():
    config = RunConfig.resolve(**SINUSOID, attack="sign-flip", attackers=0.5)
    clients = sorted(attackers(config))[:3]
    plain = RunConfig.resolve(**SINUSOID)
    # metafleet's own ClientApp ignores the run's attack: its replies are those of a run without one.
    assert all(torch.equal(_flat(a), _flat(b)) for a, b in zip(
        _train_replies(config, client_module.app, clients).values(),
        _train_replies(plain, client_module.app, clients).values(), strict=True))


def _synthetic(honest: int = 14, outliers: int = 6, seed: int = 0):
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=40)
    good = [centre + 0.05 * rng.normal(size=40) for _ in range(honest)]
    bad = [-10 * centre + rng.normal(size=40) for _ in range(outliers)]
    updates = [{"w": torch.tensor(v[:30].reshape(5, 6)), "b": torch.tensor(v[30:])} for v in good + bad]
    return updates, np.mean(good, axis=0)


# Norm bounding only limits each update's weight: 30 % outliers clipped to the honest norm still pull the mean
# to (1 - 2·0.3) of the honest one (relative error 0.6), where undefended they reverse it (error > 1).
@pytest.mark.parametrize("defense, tolerance", [
    ("median", 0.1), ("trimmed-mean:0.3", 0.1), ("krum", 0.15), ("multi-krum", 0.05), ("norm-bound", 0.65),
])
def test_each_defense_returns_the_honest_mean_despite_outliers(defense, tolerance):
    updates, honest_mean = _synthetic()
    aggregate, _ = robust_aggregate(updates, [1.0] * len(updates), Defense.parse(defense))
    got = np.concatenate([aggregate["w"].numpy().ravel(), aggregate["b"].numpy()])
    relative = np.linalg.norm(got - honest_mean) / np.linalg.norm(honest_mean)
    assert relative < tolerance, (defense, relative)
    undefended, _ = robust_aggregate(updates, [1.0] * len(updates), Defense.parse("none"))
    plain = np.concatenate([undefended["w"].numpy().ravel(), undefended["b"].numpy()])
    assert np.linalg.norm(plain - honest_mean) / np.linalg.norm(honest_mean) > 1  # the attack reverses the mean


def test_norm_bound_clips_to_its_bound():
    updates, _ = _synthetic()
    aggregate, metrics = robust_aggregate(updates, [1.0] * len(updates), Defense.parse("norm-bound:0.5"))
    assert metrics["defense-bound"] == 0.5 and metrics["defense-clipped"] == len(updates)
    assert _flat(aggregate).norm() <= 0.5 + 1e-9


def test_defenses_that_read_updates_refuse_secure_aggregation_and_norm_bound_works_with_it():
    for defense in ("median", "trimmed-mean", "krum", "multi-krum"):
        with pytest.raises(ConfigError, match="secure aggregation hides"):
            RunConfig.resolve(**SINUSOID, defense=defense, secure_aggregation=True)
    with pytest.raises(ConfigError, match="norm-bound:C"):
        RunConfig.resolve(**SINUSOID, defense="norm-bound", secure_aggregation=True)
    with pytest.raises(ConfigError, match="32-bit"):
        RunConfig.resolve(**SINUSOID, compress="q8", secure_aggregation=True)

    from metafleet.server.secure import SecureAggregation
    from metafleet.simulations.inprocess import RUN_ID

    bound = 0.01
    config = RunConfig.resolve(**{**SINUSOID, "clients_per_round": 5}, defense=f"norm-bound:{bound}",
                               secure_aggregation=True, outer_optimizer="sgd", outer_lr=1.0)
    training, _ = split_clients(config)
    contexts = device_contexts(config.to_run_config(), training[:5])
    grid = MeteredGrid(InProcessGrid(client_module.app, contexts))
    strategy = make_strategy(config, initial_params(config))
    strategy.training_nodes = sorted(contexts)
    before = {name: t.clone() for name, t in strategy.params.items()}
    SecureAggregation(strategy, RUN_ID, timeout=None).train_round(grid, 1)
    assert strategy.last_round.accepted == 5 and not strategy.last_round.skipped
    moved = {name: before[name] - strategy.params[name] for name in before}
    assert 0 < _flat(moved).norm() <= bound * (1 + 1e-3)  # the mean of updates clipped to the bound
    unclipped = _train_replies(RunConfig.resolve(**SINUSOID), client_module.app, training[:5])
    assert min(_flat(u).norm() for u in unclipped.values()) > 2 * bound  # so the bound did clip


@pytest.mark.slow
def test_undefended_averaging_suffers_from_sign_flip_attackers_and_median_does_not(tmp_path):
    from metafleet.simulations.cli import simulate

    base = dict(dataset="sinusoid", algorithm="fedavg", clients=40, held_out_clients=8, clients_per_round=16,
                rounds=30, eval_every=30, seed=3)
    results = {}
    for name, extra in {"clean": {}, "attacked": dict(attack="sign-flip", attackers=0.3),
                        "median": dict(attack="sign-flip", attackers=0.3, defense="median")}.items():
        summary = simulate(RunConfig.resolve(**base, **extra), tmp_path / name, backend="inprocess")
        rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        results[name] = [row for row in rows if row["phase"] == "evaluate"][-1]["mean-step-0"]
        assert summary["rounds_completed"] == 30
    # MSE before adaptation (the global model itself): the attack ruins it, median keeps it near the clean one.
    assert results["attacked"] > 3 * results["clean"], results
    assert results["median"] < 1.5 * results["clean"], results


def test_q8_round_trips_within_a_level_unbiased_and_a_quarter_of_the_bytes():
    rng = np.random.default_rng(0)
    update = {"conv.weight": torch.randn(16, 3, 25), "conv.bias": torch.randn(16) * 0.01, "zero": torch.zeros(4)}
    compression = Compression.parse("q8")
    payload, residual = encode(update, compression, rng)
    assert residual is None and payload["q8-codes"].dtype == np.uint8
    decoded = decode(payload, compression, update)
    for name, tensor in update.items():
        level = float(tensor.max() - tensor.min()) / 255
        assert (decoded[name] - tensor).abs().max() <= level + 1e-6
    assert torch.equal(decoded["zero"], update["zero"])
    mean = sum(decode(encode(update, compression, rng)[0], compression, update)["conv.weight"]
               for _ in range(400)) / 400
    level = float(update["conv.weight"].max() - update["conv.weight"].min()) / 255
    assert (mean - update["conv.weight"]).abs().max() < 0.25 * level  # unbiased: the rounding averages out
    # One byte a value, and 8 bytes a tensor for its grid, in two arrays for the whole update.
    assert len(payload) == 2 and sum(a.nbytes for a in payload.values()) == sum(t.numel() + 8 for t in update.values())


def test_topk_keeps_the_largest_coordinates_and_feeds_the_rest_back():
    compression = Compression.parse("topk:0.1")
    update = {"w": torch.arange(1.0, 101.0).reshape(10, 10) * torch.tensor([1.0, -1.0]).repeat(50).reshape(10, 10)}
    payload, residual = encode(update, compression, np.random.default_rng(0))
    sent = decode(payload, compression, update)
    assert (sent["w"] != 0).sum() == 10 and set(sent["w"].abs()[sent["w"] != 0].tolist()) == set(range(91, 101))
    assert torch.equal(sent["w"] + residual["w"], update["w"])  # nothing lost: sent + kept = the update
    # Next round the residual joins the new update: what was left out is sent once it is large enough.
    small = {"w": torch.zeros(10, 10)}
    payload, residual2 = encode(small, compression, np.random.default_rng(0), residual)
    resent = decode(payload, compression, small)
    assert set(resent["w"].abs()[resent["w"] != 0].tolist()) == set(range(81, 91))
    assert torch.equal(resent["w"] + residual2["w"], residual["w"])


@pytest.mark.parametrize("compress", ["q8", "topk:0.1"])
def test_a_compressing_device_s_reply_decodes_on_the_server_and_keeps_its_residual(compress):
    config = RunConfig.resolve(**SINUSOID, compress=compress)
    training, _ = split_clients(config)
    contexts = device_contexts(config.to_run_config(), training[:3])
    grid = MeteredGrid(InProcessGrid(client_module.app, contexts))
    strategy = make_strategy(config, initial_params(config))
    strategy.training_nodes = sorted(contexts)
    messages = strategy.configure_train(1, to_array_record(strategy.params), ConfigRecord(), grid)
    replies = list(grid.send_and_receive(messages))
    up, _ = grid.take_bytes()
    strategy.aggregate_train(1, replies)
    assert strategy.last_round.accepted == 3, strategy.rejections
    plain = RunConfig.resolve(**SINUSOID)
    plain_grid = MeteredGrid(InProcessGrid(client_module.app, device_contexts(plain.to_run_config(), training[:3])))
    plain_strategy = make_strategy(plain, initial_params(plain))
    plain_strategy.training_nodes = sorted(contexts)
    list(plain_grid.send_and_receive(plain_strategy.configure_train(1, to_array_record(plain_strategy.params),
                                                                      ConfigRecord(), plain_grid)))
    plain_up, _ = plain_grid.take_bytes()
    assert up < (0.28 if compress == "q8" else 0.25) * plain_up, (up, plain_up)  # the message's bytes, all told
    kept = [client_module.RESIDUAL_RECORD in context.state.array_records for context in contexts.values()]
    assert all(kept) == (compress.startswith("topk")) and any(kept) == all(kept)


def test_a_malformed_compressed_reply_is_refused_with_its_reason():
    config = RunConfig.resolve(**SINUSOID, compress="q8")
    strategy = make_strategy(config, initial_params(config))
    arrays = ArrayRecord({name: torch.zeros(t.shape) for name, t in strategy.params.items()})  # not q8
    reply = Message(RecordDict({"arrays": arrays, "metrics": _metrics()}), 7, MessageType.TRAIN)
    with pytest.raises(ValueError, match="q8 update must hold the arrays"):
        strategy._validated(reply)


def _metrics():
    from flwr.app import MetricRecord

    return MetricRecord({"num-examples": 10})


def test_the_backdoor_trigger_marks_the_end_of_every_input():
    x = torch.zeros(4, 1, 10, 10)
    triggered = with_trigger(x, 9.0).reshape(4, -1)
    assert (triggered[:, -3:] == 9).all() and (triggered[:, :-3] == 0).all()


def test_held_out_devices_report_the_backdoor_s_success_and_attackers_train_on_triggered_data():
    from metafleet.simulations.attacks import BACKDOOR_TARGET, _poisoned_data

    config = RunConfig.resolve(dataset="watch", algorithm="reptile", attack="backdoor", attackers=0.3)
    training, held_out = split_clients(config)
    attacker = sorted(attackers(config))[0]
    poisoned, clean = _poisoned_data(config, attacker), client_module._client_data(config, attacker)
    labels = torch.cat([s.support[1] for s in poisoned.splits])
    original = torch.cat([s.support[1] for s in clean.splits])
    changed = labels != original
    assert changed.any() and (labels[changed] == BACKDOOR_TARGET).all()

    contexts = device_contexts(config.to_run_config(), held_out[:1])
    grid = InProcessGrid(AttackingClientApp(), contexts)
    theta = to_array_record(initial_params(config))
    message = Message(RecordDict({"arrays": theta, "config": ConfigRecord({"server-round": 1})}),
                      next(iter(contexts)), MessageType.EVALUATE)
    (reply,) = grid.send_and_receive([message])
    metrics = dict(reply.content["metrics"])
    assert all(0 <= metrics[f"backdoor-step-{step}"] <= 1 for step in config.eval_steps), metrics
    strategy = make_strategy(config, initial_params(config))
    summary = strategy.aggregate_evaluate(1, [reply])
    assert "mean-backdoor-step-0" in summary and len(summary["clients-backdoor-step-0"]) == 1


def test_simulate_takes_the_attack_flags_and_the_server_has_none():
    from metafleet.common.cli_options import config_from_arguments
    from metafleet.server.deploy import server_parser
    from metafleet.simulations.cli import simulate_parser

    args = simulate_parser().parse_args(["--dataset", "sinusoid", "--attack", "sign-flip:5", "--attackers", "0.2",
                                         "--defense", "trimmed-mean:0.3", "--compress", "topk:0.05"])
    config = config_from_arguments(args)
    assert (config.attack, config.attackers, config.defense, config.compress) == (
        "sign-flip:5", 0.2, "trimmed-mean:0.3", "topk:0.05")
    server = server_parser().parse_args(["--dataset", "watch", "--defense", "median", "--compress", "q8"])
    assert (server.defense, server.compress) == ("median", "q8")
    with pytest.raises(SystemExit):
        server_parser().parse_args(["--dataset", "watch", "--attack", "sign-flip"])


def test_the_robustness_benchmark_plans_clean_defence_only_attack_and_compression_cases():
    import argparse

    from metafleet.common.selective import SELECTIVE_DEFAULT
    from metafleet.simulations.bench_robust import plan

    args = argparse.Namespace(attacks="sign-flip", fractions="0.1,0.2", defenses="none,median",
                              more_attacks="backdoor", more_fractions="0.2", more_defenses="none",
                              compress="q8,layers,q8+layers:0.3")
    cases = dict(plan(args))
    assert list(cases) == ["clean", "clean/median", "sign-flip@0.1/none", "sign-flip@0.1/median",
                           "sign-flip@0.2/none", "sign-flip@0.2/median", "backdoor@0.2/none", "compress q8",
                           "compress layers", "compress q8+layers:0.3"]
    assert cases["sign-flip@0.1/median"] == dict(attack="sign-flip", attackers=0.1, defense="median")
    assert cases["compress layers"] == dict(selective_layers=SELECTIVE_DEFAULT)
    assert cases["compress q8+layers:0.3"] == dict(compress="q8", selective_layers=0.3)
    for overrides in cases.values():  # every case is a config the validation accepts
        RunConfig.resolve(dataset="fashion-mnist", **overrides)
