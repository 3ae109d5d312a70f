"""--backend vectorized: a round's devices computed together, with the in-process backend's results."""

from __future__ import annotations

import json

import pytest
import torch

from metafleet.common.config import RunConfig
from metafleet.common.errors import MetafleetError
from metafleet.common.fleets import functional_model, make_fleet
from metafleet.common.meta import (
    ALGORITHMS,
    Episode,
    cross_validation_folds,
    guarded_curve,
    local_update,
    meta_parameters,
    personalization_curve,
    step_sizes,
)
from metafleet.common.training import training_episode, training_rng
from metafleet.common.vectorized import batched_updates
from metafleet.common.vectorized_eval import batched_personalization
from metafleet.simulations.cli import simulate

SMALL = dict(dataset="sinusoid", clients=30, held_out_clients=5, clients_per_round=8, rounds=3, eval_every=3)


def _episodes(config: RunConfig, count: int, dtype=None) -> list[Episode]:
    fleet = make_fleet(config)
    episodes = [training_episode(fleet.client(i), config, training_rng(config, 1, i)) for i in range(count)]
    if dtype is None:
        return episodes
    return [Episode((e.support[0].to(dtype), e.support[1]), (e.query[0].to(dtype), e.query[1])) for e in episodes]


# Every algorithm with either head, except per-fedavg with prototypes: its config refuses that pair
# (tests/test_baselines.py checks the refusal), so there is no such update to compare.
@pytest.mark.parametrize("algorithm, head_init", [
    (algorithm, head_init) for algorithm in sorted(ALGORITHMS) for head_init in ("learned", "prototypes")
    if (algorithm, head_init) != ("per-fedavg", "prototypes")])
def test_batched_updates_are_each_device_s_own_update_in_float64(algorithm, head_init):
    config = RunConfig.resolve(dataset="fashion-mnist", algorithm=algorithm, head_init=head_init, inner_steps=2,
                               shots=5, query_shots=5)
    fmodel = functional_model(config)
    fmodel.module.double()
    fmodel.buffers = {name: b.double() for name, b in fmodel.buffers.items()}
    params = {name: t.double()
              for name, t in meta_parameters(algorithm, fmodel.init_params(), config.inner_lr).items()}
    episodes = _episodes(config, 2, torch.float64)
    single = [local_update(algorithm, fmodel, params, e, config.inner_steps, config.inner_lr) for e in episodes]
    batched = batched_updates(algorithm, fmodel, params, episodes, config.inner_steps, config.inner_lr)
    for one, many in zip(single, batched, strict=True):
        assert one.num_examples == many.num_examples
        for name in one.pseudo_grad:
            torch.testing.assert_close(many.pseudo_grad[name], one.pseudo_grad[name], rtol=1e-9, atol=1e-11)
        for key in one.metrics:
            assert many.metrics[key] == pytest.approx(one.metrics[key], rel=1e-9)


def test_devices_whose_episodes_differ_in_shape_are_computed_apart():
    config = RunConfig.resolve(dataset="sinusoid", algorithm="reptile")
    fmodel = functional_model(config)
    params = fmodel.init_params()
    episodes = _episodes(config, 3)
    short = Episode((episodes[2].support[0][:4], episodes[2].support[1][:4]), episodes[2].query)
    episodes[2] = short
    batched = batched_updates("reptile", fmodel, params, episodes, config.inner_steps, config.inner_lr)
    alone = local_update("reptile", fmodel, params, short, config.inner_steps, config.inner_lr)
    torch.testing.assert_close(batched[2].pseudo_grad["net.0.weight"], alone.pseudo_grad["net.0.weight"])


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _round_bytes(rows):
    # Each round's bytes each way (discovery differs: the vectorized backend asks one device, not every one).
    # Its replies travel as rows, not Messages, and are counted as their Messages would be.
    counted = [(row["bytes-up"], row["bytes-down"]) for row in rows if row["phase"] == "train"]
    assert all(up > 0 and down > 0 for up, down in counted)
    return counted


@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_the_vectorized_backend_gives_the_in_process_backend_s_metrics(tmp_path, algorithm):
    config = RunConfig.resolve(**SMALL, algorithm=algorithm)
    simulate(config, tmp_path / "inprocess", backend="inprocess")
    summary = simulate(config, tmp_path / "vectorized", backend="vectorized")
    assert summary["rounds_completed"] == 3 and summary["bytes_up"] > 0
    reference, rows = _rows(tmp_path / "inprocess"), _rows(tmp_path / "vectorized")
    assert _round_bytes(rows) == _round_bytes(reference)
    assert [(r["round"], r["phase"]) for r in rows] == [(r["round"], r["phase"]) for r in reference]
    compared = 0
    for ours, theirs in zip(rows, reference, strict=True):
        for key, value in theirs.items():
            if key.startswith(("loss-", "mean-")) and isinstance(value, float):
                assert ours[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (ours["round"], key)
                compared += 1
    assert compared >= 10
    final = [torch.load(sorted((tmp_path / b / "checkpoints").glob("*.pt"))[-1], weights_only=False)["params"]
             for b in ("inprocess", "vectorized")]
    for name in final[0]:
        torch.testing.assert_close(final[1][name], final[0][name], rtol=1e-4, atol=1e-6)


def test_attackers_and_defences_run_on_the_vectorized_backend_as_in_process(tmp_path):
    config = RunConfig.resolve(**SMALL, algorithm="reptile", attack="sign-flip", attackers=0.2, defense="median")
    simulate(config, tmp_path / "inprocess", backend="inprocess")
    simulate(config, tmp_path / "vectorized", backend="vectorized")
    last = [[r for r in _rows(tmp_path / b) if r["phase"] == "evaluate"][-1] for b in ("inprocess", "vectorized")]
    assert last[1]["mean-step-0"] == pytest.approx(last[0]["mean-step-0"], rel=1e-4)


@pytest.mark.parametrize("uplink", [dict(compress="q8"), dict(compress="topk:0.2"), dict(selective_layers=0.5)])
def test_compressed_vectorized_replies_count_the_bytes_and_reach_the_same_model(tmp_path, uplink):
    config = RunConfig.resolve(**SMALL, algorithm="reptile", **uplink)
    for backend in ("inprocess", "vectorized"):
        simulate(config, tmp_path / backend, backend=backend)
    assert _round_bytes(_rows(tmp_path / "vectorized")) == _round_bytes(_rows(tmp_path / "inprocess"))
    final = [torch.load(sorted((tmp_path / b / "checkpoints").glob("*.pt"))[-1], weights_only=False)["params"]
             for b in ("inprocess", "vectorized")]
    # q8 rounds stochastically: an update that differs in its last float bit (vmapped arithmetic) can round a
    # value to the neighbouring code, so θ agrees to a fraction of the outer step (Adam, lr 0.01), not to 1e-6.
    for name in final[0]:
        torch.testing.assert_close(final[1][name], final[0][name], rtol=1e-2, atol=1e-4)


def test_the_vectorized_backend_refuses_secure_aggregation_in_one_line(tmp_path):
    config = RunConfig.resolve(**SMALL, algorithm="reptile", secure_aggregation=True)
    with pytest.raises(MetafleetError, match="SecAgg\\+ is a message protocol"):
        simulate(config, tmp_path / "run", backend="vectorized")


def test_a_large_simulated_fleet_makes_only_the_devices_it_reaches(tmp_path):
    from metafleet.client.app import app
    from metafleet.server.app import run_meta_training
    from metafleet.simulations.inprocess import device_contexts
    from metafleet.simulations.vectorized import VectorizedGrid

    config = RunConfig.resolve(dataset="sinusoid", algorithm="reptile", clients=50_000, held_out_clients=10,
                               clients_per_round=20, rounds=2, eval_every=2)
    contexts = device_contexts(config.to_run_config(), range(config.clients))
    grid = VectorizedGrid(app, contexts)
    run_meta_training(grid, {**config.to_run_config(), "out-dir": str(tmp_path / "run"), "resume": False})
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["personalization"]["clients_reporting"] == 10
    # Discovery asked one node: the held-out devices, two rounds' samples and that one were all it made.
    assert len(contexts._made) <= 10 + 2 * 20 + 1
    assert sum(reply.metadata.message_type == "query" for reply in grid.replies) == 1


def test_a_vectorized_fleet_that_cannot_load_fails_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("METAFLEET_FASHION_MNIST_DIR", str(tmp_path))  # holds no Fashion-MNIST files
    config = RunConfig.resolve(dataset="fashion-mnist", algorithm="reptile", clients=37, rounds=1)
    with pytest.raises(MetafleetError, match="simulated device 0 cannot start: .*fashion"):
        simulate(config, tmp_path / "run", backend="vectorized")


@pytest.mark.parametrize("dataset, head_init, algorithm", [
    ("sinusoid", "learned", "reptile"), ("fashion-mnist", "learned", "maml"), ("fashion-mnist", "prototypes", "fomaml"),
    ("sinusoid", "learned", "meta-sgd")])
def test_batched_personalization_is_each_device_s_own_curve_and_guard_in_float64(dataset, head_init, algorithm):
    config = RunConfig.resolve(dataset=dataset, algorithm=algorithm, head_init=head_init, shots=5, query_shots=5,
                               eval_steps="0,1,3")
    fmodel = functional_model(config)
    fmodel.module.double()
    fmodel.buffers = {name: b.double() for name, b in fmodel.buffers.items()}
    params = {name: t.double() for name, t in meta_parameters(algorithm, fmodel.init_params(), 0.05).items()}
    theta, lr = step_sizes(params, 0.05)
    fleet = make_fleet(config)
    episodes = [episode for i in range(4)
                for episode in fleet.client(i).evaluation_episodes(config.shots, 0, config.ways or None, 1)]
    episodes = [Episode((e.support[0].double(), e.support[1]), (e.query[0].double(), e.query[1])) for e in episodes]
    batched = batched_personalization(fmodel, theta, episodes, config.eval_steps, lr)
    for episode, (curve, guarded) in zip(episodes, batched, strict=True):
        one = personalization_curve(fmodel, theta, episode.support, episode.query, config.eval_steps, lr)
        assert curve == pytest.approx([float(v) for v in one], rel=1e-9, abs=1e-12)
        assert guarded == pytest.approx(guarded_curve(fmodel, theta, episode.support, one, config.eval_steps, lr),
                                        rel=1e-9, abs=1e-12)
    # Regression and 5-shot classification support sets split into folds: the batched guard ran.
    assert cross_validation_folds(episodes[0].support, fmodel.objective)


def test_the_vectorized_backend_batches_the_held_out_devices_evaluation(tmp_path, monkeypatch):
    from metafleet.client import app as client_module

    calls = []
    original = client_module.client_finetuning
    monkeypatch.setattr(client_module, "client_finetuning", lambda *a, **k: calls.append(1) or original(*a, **k))
    config = RunConfig.resolve(algorithm="reptile", **SMALL)
    simulate(config, tmp_path / "run", backend="vectorized")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["personalization"]["clients_reporting"] == 5 and not calls
