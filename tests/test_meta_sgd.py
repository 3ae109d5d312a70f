"""Meta-SGD (--algorithm meta-sgd): its meta-gradient against hand-unrolled autograd, the learned rates' bounds,
their use on held-out devices, and whole runs (in-process, resumed, SecAgg+)."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metafleet.client.personalize import keep_final_models, personalize
from metafleet.common.cli import main as metafleet_main
from metafleet.common.config import RunConfig
from metafleet.common.device_data import save_device_data
from metafleet.common.errors import ConfigError
from metafleet.common.fleets import functional_model, make_fleet, split_clients
from metafleet.common.meta import (
    LEARNED_LR_PREFIX,
    LOG_LR_BOUNDS,
    REGRESSION,
    FunctionalModel,
    local_update,
    meta_parameters,
    split_learned_rates,
    step_sizes,
    with_learned_rates,
)
from metafleet.common.training import client_personalization, meta_train_centralized
from metafleet.server.app import initial_params
from metafleet.server.strategy import make_strategy
from metafleet.simulations.cli import simulate
from tests.test_meta import _episode, _explicit_forward, _small_mlp

SMALL = dict(dataset="sinusoid", algorithm="meta-sgd", clients=10, held_out_clients=2, clients_per_round=4,
             rounds=3, eval_every=3, seed=3)


def _uneven_rates(model: nn.Module, lr: float) -> dict[str, torch.Tensor]:
    """θ with rates that differ per coordinate (around ``lr``): a uniform α would not show elementwise bugs."""
    params = with_learned_rates({name: p.detach().clone() for name, p in model.named_parameters()}, lr)
    generator = torch.Generator().manual_seed(2)
    return {name: t + 0.5 * torch.randn(t.shape, generator=generator, dtype=t.dtype) if name.startswith(
        LEARNED_LR_PREFIX) else t for name, t in params.items()}


@pytest.mark.usefixtures("double_precision")
@pytest.mark.parametrize("steps", [1, 3])
def test_meta_sgd_meta_gradient_for_theta_and_rates_equals_unrolled_second_order_autograd(steps):
    model, episode = _small_mlp(), _episode()
    fmodel = FunctionalModel(model, REGRESSION)
    params = _uneven_rates(model, 0.3)
    update = local_update("meta-sgd", fmodel, params, episode, steps, 123.0)  # the scalar lr must not be used

    # Unrolled by hand with torch.autograd: θ' = θ − exp(log α) ⊙ ∇L_support(θ), k times.
    names = [name for name, _ in model.named_parameters()]
    theta = [params[name].clone().requires_grad_(True) for name in names]
    log_rates = [params[LEARNED_LR_PREFIX + name].clone().requires_grad_(True) for name in names]
    adapted = theta
    for _ in range(steps):
        loss = F.mse_loss(_explicit_forward(adapted, episode.support[0]), episode.support[1])
        grads = torch.autograd.grad(loss, adapted, create_graph=True)
        adapted = [p - torch.exp(r) * g for p, r, g in zip(adapted, log_rates, grads, strict=True)]
    query_loss = F.mse_loss(_explicit_forward(adapted, episode.query[0]), episode.query[1])
    expected = torch.autograd.grad(query_loss, theta + log_rates)

    assert list(update.pseudo_grad) == list(params)  # SecAgg+ names an update's arrays by position
    for name, want in zip(names + [LEARNED_LR_PREFIX + n for n in names], expected, strict=True):
        torch.testing.assert_close(update.pseudo_grad[name], want, atol=1e-10, rtol=1e-8)
    assert update.metrics["loss-after"] == pytest.approx(float(query_loss.detach()))
    assert all(float(update.pseudo_grad[LEARNED_LR_PREFIX + n].abs().max()) > 1e-6 for n in names)


@pytest.mark.usefixtures("double_precision")
def test_with_every_rate_at_the_inner_lr_meta_sgd_s_theta_gradient_is_maml_s():
    model, episode, lr = _small_mlp(), _episode(), 0.3
    fmodel = FunctionalModel(model, REGRESSION)
    theta = fmodel.init_params()
    maml = local_update("maml", fmodel, theta, episode, 3, lr)
    meta_sgd = local_update("meta-sgd", fmodel, with_learned_rates(theta, lr), episode, 3, lr)
    for name in theta:
        torch.testing.assert_close(meta_sgd.pseudo_grad[name], maml.pseudo_grad[name], atol=1e-10, rtol=1e-8)


def test_held_out_devices_adapt_with_the_learned_rates_not_the_inner_lr():
    config = RunConfig.resolve(**SMALL)
    fmodel = functional_model(config)
    client = make_fleet(config).client(split_clients(config)[1][0])
    theta = fmodel.init_params()
    doubled = {name: t + math.log(2) if name.startswith(LEARNED_LR_PREFIX) else t
               for name, t in meta_parameters("meta-sgd", theta, config.inner_lr).items()}
    learned = client_personalization(fmodel, doubled, client, config)
    # The same θ adapted with one scalar rate of twice the inner lr (maml's evaluation, adapt_lr) agrees...
    scalar = RunConfig.resolve(**{**SMALL, "algorithm": "maml"}, adapt_lr=2 * config.inner_lr)
    for ours, theirs in zip(learned, client_personalization(fmodel, theta, client, scalar), strict=True):
        assert ours == pytest.approx(theirs, rel=1e-5)
    # ...and differs from adapting with the configured inner lr, which the device must not fall back to.
    plain = client_personalization(fmodel, meta_parameters("meta-sgd", theta, config.inner_lr), client, config)
    assert learned[0][0] == plain[0][0] and learned[0][-1] != pytest.approx(plain[0][-1], rel=1e-3)


def test_learned_rates_move_and_stay_positive_and_finite_in_a_short_training_run():
    config = RunConfig.resolve(**{**SMALL, "rounds": 4})
    training, _ = split_clients(config)
    result = meta_train_centralized(make_fleet(config), config, training)
    theta, log_rates = split_learned_rates(result.params)
    assert set(log_rates) == set(theta)
    for name, log_rate in log_rates.items():
        rates = log_rate.exp()
        assert log_rate.shape == theta[name].shape
        assert bool(torch.isfinite(rates).all()) and bool((rates > 0).all()), name
    flat = torch.cat([t.flatten() for t in log_rates.values()])
    assert float((flat - math.log(config.inner_lr)).abs().max()) > 1e-3  # the rates were learned, not kept
    assert all(math.isfinite(loss) for loss in result.losses)


def test_the_server_s_outer_step_keeps_rates_inside_their_bounds_whatever_the_aggregate():
    config = RunConfig.resolve(**SMALL, outer_optimizer="sgd", outer_lr=1.0)
    strategy = make_strategy(config, initial_params(config))
    low, high = LOG_LR_BOUNDS
    for push in (-1e6, 1e6):  # SGD with step 1 would move log α by 1e6: far out of float32's exp range
        strategy.apply_aggregate({name: torch.full_like(t, push) for name, t in strategy.params.items()}, 4)
        _, log_rates = split_learned_rates(strategy.params)
        for log_rate in log_rates.values():
            rates = log_rate.exp()
            assert bool(torch.isfinite(rates).all()) and bool((rates > 0).all())
            assert float(log_rate.min()) >= low - 1e-6 and float(log_rate.max()) <= high + 1e-6
        summary = strategy.last_round.metrics
        assert 0 < summary["learned-lr-min"] <= summary["learned-lr-geomean"] <= summary["learned-lr-max"] < 11


def test_meta_sgd_refuses_a_scalar_adaptation_lr_in_one_line(capsys, tmp_path):
    with pytest.raises(ConfigError, match="adapt_lr.*does not apply to meta-sgd"):
        RunConfig.resolve(**SMALL, adapt_lr=0.1)
    code = metafleet_main(["simulate", "--dataset", "sinusoid", "--algorithm", "meta-sgd", "--adapt-lr", "0.1",
                           "--out", str(tmp_path / "run")])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "does not apply to meta-sgd" in error and len(error.splitlines()) == 1, error


def test_a_device_keeps_the_learned_rates_with_its_meta_model_and_predicts_with_theta_alone(tmp_path, capsys):
    config = RunConfig.resolve(**SMALL)
    fmodel = functional_model(config)
    client = make_fleet(config).client(split_clients(config)[1][0])
    save_device_data(tmp_path / "device", "sinusoid", client)
    doubled = {name: t + math.log(2) if name.startswith(LEARNED_LR_PREFIX) else t
               for name, t in initial_params(config).items()}
    keep_final_models(config, fmodel, doubled, client, tmp_path / "device")

    meta = torch.load(tmp_path / "device" / "meta-model.pt", weights_only=True)
    assert set(meta["params"]) == set(doubled)  # the rates stay with the meta-model, for later personalization
    personal = torch.load(tmp_path / "device" / "personal-model.pt", weights_only=True)
    assert personal["inner_lr"] == "learned" and set(personal["params"]) == set(fmodel.init_params())
    if personal["adapted"]:
        theta, rates = step_sizes(doubled, config.inner_lr)
        expected = personalize(fmodel, theta, client, config.eval_steps[-1], rates)["params"]
        for name, value in personal["params"].items():
            torch.testing.assert_close(value, expected[name])

    np.save(tmp_path / "inputs.npy", np.linspace(-5, 5, 7, dtype=np.float32)[:, None])
    assert metafleet_main(["predict", "--model", str(tmp_path / "device"), "--input", str(tmp_path / "inputs.npy"),
                           "--out", str(tmp_path / "predictions.npy")]) == 0
    assert np.load(tmp_path / "predictions.npy").shape == (7,)
    # Later, on new data: personalizing from the kept meta-model adapts with its learned rates.
    assert metafleet_main(["personalize", "--checkpoint", str(tmp_path / "device" / "meta-model.pt"), "--data",
                           str(tmp_path / "device"), "--steps", "2", "--no-guard", "--out",
                           str(tmp_path / "again.pt")]) == 0
    again = torch.load(tmp_path / "again.pt", weights_only=True)
    assert again["inner_lr"] == "learned" and set(again["params"]) == set(fmodel.init_params())
    capsys.readouterr()


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _final_params(run_dir):
    return torch.load(sorted((run_dir / "checkpoints").glob("*.pt"))[-1], weights_only=False)["params"]


def test_a_meta_sgd_simulation_runs_end_to_end_and_resumes_to_the_same_rates(tmp_path):
    config = RunConfig.resolve(**SMALL)
    summary = simulate(config, tmp_path / "run", backend="inprocess")
    assert summary["algorithm"] == "meta-sgd" and summary["rounds_completed"] == 3
    assert summary["personalization"]["steps"][0] == 0 and summary["personalization"]["held_out_clients"] == 2
    trained = [row for row in _rows(tmp_path / "run") if row["phase"] == "train"]
    assert all(row["accepted"] == 4 and row["learned-lr-min"] > 0 for row in trained)
    final = _final_params(tmp_path / "run")
    theta, log_rates = split_learned_rates(final)
    assert set(final) == set(initial_params(config)) and set(log_rates) == set(theta)
    assert any(float((t - math.log(config.inner_lr)).abs().max()) > 1e-4 for t in log_rates.values())

    # Interrupted after round 2 (its last checkpoint and report lost): a resume redoes round 3 alike.
    shutil.copytree(tmp_path / "run", tmp_path / "interrupted")
    (tmp_path / "interrupted" / "checkpoints" / "round-000003.pt").unlink()
    (tmp_path / "interrupted" / "summary.json").unlink()
    resumed = simulate(config, tmp_path / "interrupted", resume=True, backend="inprocess")
    assert resumed["rounds_completed"] == 3
    for name, value in _final_params(tmp_path / "interrupted").items():
        torch.testing.assert_close(value, final[name])


@pytest.mark.slow
def test_secure_and_plain_meta_sgd_runs_reach_the_same_rates_and_personalization(tmp_path):
    # Outer SGD: its step is linear in the mean, so the runs differ by SecAgg+'s quantization error alone. (Adam
    # would turn a coordinate whose plain mean is exactly 0, a dead unit's, and whose secure mean is quantization
    # noise into a step of ±lr: Adam's runs differ by up to lr a coordinate a round, for θ as for the rates.)
    config = RunConfig.resolve(**{**SMALL, "clients_per_round": 5}, min_replies=2, outer_optimizer="sgd",
                               outer_lr=0.05)
    plain = simulate(config, tmp_path / "plain", backend="inprocess")
    secure = simulate(config.replace(secure_aggregation=True), tmp_path / "secure", backend="inprocess")
    assert secure["secure_aggregation"] and secure["rounds_skipped"] == plain["rounds_skipped"] == 0
    for a, b in zip(plain["personalization"]["mean"], secure["personalization"]["mean"], strict=True):
        assert abs(a - b) <= 1e-3 * abs(a), (plain["personalization"], secure["personalization"])
    # The rates went through SecAgg+'s masking and quantization with θ: the masked mean moved them alike.
    plain_rates = split_learned_rates(_final_params(tmp_path / "plain"))[1]
    secure_rates = split_learned_rates(_final_params(tmp_path / "secure"))[1]
    moved = max(float((value - math.log(config.inner_lr)).abs().max()) for value in plain_rates.values())
    assert moved > 1e-3
    for name, value in plain_rates.items():
        torch.testing.assert_close(secure_rates[name], value, rtol=0, atol=1e-4)
