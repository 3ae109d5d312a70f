"""--defense rsa: Cedar's representational-similarity weighting of updates on a public stimulus set."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metafleet.common.config import RunConfig
from metafleet.common.errors import ConfigError
from metafleet.common.tasks import fashion_mnist
from metafleet.server.app import initial_params
from metafleet.server.defenses import _low_minority
from metafleet.server.strategy import rsa_judge


def _round(config: RunConfig, honest: int = 8, attackers: int = 2):
    """θ₀ and a round of honest updates around one direction plus sign-flipped (−10×) copies."""
    theta = initial_params(config)
    generator = torch.Generator().manual_seed(0)
    direction = {name: 0.1 * (t.abs().mean() + 1e-3) * torch.randn(t.shape, generator=generator)
                 for name, t in theta.items()}
    updates = [{name: d + 0.3 * d.abs().mean() * torch.randn(d.shape, generator=generator)
                for name, d in direction.items()} for _ in range(honest)]
    return theta, updates, updates + [{name: -10 * u[name] for name in u} for u in updates[:attackers]]


def _distance(a, b) -> float:
    return float(torch.sqrt(sum(((a[n] - b[n]) ** 2).sum() for n in a)))


def test_rsa_scores_sign_flipped_updates_low_and_its_cluster_filter_drops_them():
    config = RunConfig.resolve(dataset="fashion-mnist", algorithm="reptile", defense="rsa:cluster")
    theta, honest, updates = _round(config)
    judge = rsa_judge(config)
    scores = judge.scores(theta, updates)
    assert scores[:8].min() > 0.5 and scores[8:].max() < 0.3, scores
    honest_mean = {name: sum(u[name] for u in honest) / len(honest) for name in honest[0]}
    aggregate, metrics = judge.aggregate(theta, updates, [1.0] * len(updates))
    assert metrics["defense-dropped"] == 2
    # Without the attackers, weighting by similarity moves the honest mean by at most 10 % of its norm.
    assert _distance(aggregate, honest_mean) < 0.1 * _distance(honest_mean, {n: 0 * t for n, t in theta.items()})
    plain_mean = {name: sum(u[name] for u in updates) / len(updates) for name in updates[0]}
    weighted, _ = rsa_judge(config.replace(defense="rsa")).aggregate(theta, updates, [1.0] * len(updates))
    # Weighting alone keeps a share of the attackers' pull, but far less than the plain mean does.
    assert _distance(weighted, honest_mean) < 0.5 * _distance(plain_mean, honest_mean)


def test_the_outlier_filter_drops_only_a_low_minority():
    assert _low_minority(np.array([0.9, 0.8, 0.85, 0.1, 0.05])).tolist() == [False, False, False, True, True]
    assert not _low_minority(np.array([0.1, 0.12, 0.11, 0.9, 0.95])).any()  # the low group is the majority
    assert not _low_minority(np.array([0.5, 0.5, 0.5])).any()


def test_the_built_in_stimuli_are_no_device_s_data():
    stimuli = fashion_mnist.stimuli()
    assert stimuli.shape == (2 * fashion_mnist.NUM_CLASSES, 1, 28, 28)
    test_images, _ = fashion_mnist.load_split("test")
    train_images, _ = fashion_mnist.load_split("train")
    raw = np.round((stimuli[:, 0] * fashion_mnist.PIXEL_STD + fashion_mnist.PIXEL_MEAN) * 255).astype(np.uint8)
    assert any(np.array_equal(raw[0], image) for image in test_images[:50])
    train = {image.tobytes() for image in train_images}
    assert not any(image.tobytes() in train for image in raw)


def test_rsa_needs_stimuli_plaintext_and_whole_models(tmp_path):
    with pytest.raises(ConfigError, match="no stimuli"):
        RunConfig.resolve(dataset="watch", defense="rsa")
    with pytest.raises(ConfigError, match="secure aggregation hides"):
        RunConfig.resolve(dataset="sinusoid", defense="rsa", secure_aggregation=True)
    with pytest.raises(ConfigError, match="whole adapted model"):
        RunConfig.resolve(dataset="sinusoid", defense="rsa", selective_layers=0.5)
    with pytest.raises(ConfigError, match="consensus-cluster"):
        RunConfig.resolve(dataset="sinusoid", defense="rsa:drop")
    bad = tmp_path / "stimuli.npz"
    np.savez(bad, x=np.zeros((4, 3, 3), np.float32))  # not the watch model's input shape
    config = RunConfig.resolve(dataset="watch", defense="rsa", rsa_stimuli=str(bad))
    with pytest.raises(ConfigError, match="rsa_stimuli.*could not be used"):
        rsa_judge(config)


def test_a_user_s_stimulus_file_serves_a_task_without_stimuli(tmp_path):
    shape = RunConfig.resolve(dataset="watch").task_definition.input_shape
    good = tmp_path / "stimuli.npz"
    np.savez(good, x=np.random.default_rng(0).normal(size=(6, *shape)).astype(np.float32))
    judge = rsa_judge(RunConfig.resolve(dataset="watch", defense="rsa", rsa_stimuli=str(good)))
    assert judge.stimuli.shape[0] == 6 and judge.dissimilarities(judge.fmodel.init_params()).shape == (15,)


def test_a_simulated_run_under_rsa_reports_its_scores(tmp_path):
    import json

    from metafleet.simulations.cli import simulate

    config = RunConfig.resolve(dataset="sinusoid", algorithm="reptile", clients=24, held_out_clients=4,
                               clients_per_round=10, rounds=3, eval_every=3, defense="rsa:cluster",
                               attack="sign-flip", attackers=0.2)
    assert simulate(config, tmp_path / "run", backend="inprocess")["rounds_completed"] == 3
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if row["phase"] == "train"]
    assert all("defense-rsa-score-median" in row and "defense-dropped" in row for row in train)


def test_the_consensus_variant_compares_with_the_round_s_median_and_drops_the_attackers():
    config = RunConfig.resolve(dataset="fashion-mnist", algorithm="reptile", defense="rsa:consensus-cluster")
    theta, _, updates = _round(config)
    judge = rsa_judge(config)
    assert judge.consensus and judge.drop_outliers
    scores = judge.scores(theta, updates)
    assert scores[:8].min() > scores[8:].max(), scores
    _, metrics = judge.aggregate(theta, updates, [1.0] * len(updates))
    assert metrics["defense-dropped"] == 2
