import re

import numpy as np
import pytest
import torch

from metafleet.common.config import RunConfig
from metafleet.common.data import ClientData, Split, held_out_client_ids, mean_and_ci95, validate_batch
from metafleet.common.errors import DataError
from metafleet.common.fleets import make_fleet, split_clients
from metafleet.common.tasks import models
from metafleet.common.tasks.sinusoid import SinusoidFleet
from metafleet.common.tasks.watch import WatchFleet, load_recordings, locate_watch_file


@pytest.mark.parametrize(
    ("model", "docstring_owner"),
    [
        (models.SinusoidMLP(), models.SinusoidMLP),
        (models.SensorCNN(7), models.SensorCNN),
        (models.ConvNet4(5), models.ConvNet4),
        (models.CharLSTM(80), models.CharLSTM),
    ],
)
def test_parameter_count_in_docstring_is_true(model, docstring_owner):
    stated = re.search(r"([\d,]+) parameters", docstring_owner.__doc__).group(1)
    assert models.count_parameters(model) == int(stated.replace(",", ""))


def test_sinusoid_clients_follow_the_maml_setting_and_are_reproducible():
    fleet = SinusoidFleet(100, seed=3)
    amplitudes, phases = zip(*(fleet.task_parameters(i) for i in range(100)), strict=True)
    assert 0.1 <= min(amplitudes) and max(amplitudes) <= 5.0
    assert 0.0 <= min(phases) and max(phases) <= np.pi
    first, again = fleet.client(7), SinusoidFleet(100, seed=3).client(7)
    torch.testing.assert_close(first.splits[0].support[0], again.splits[0].support[0])
    x, y = first.splits[0].query
    assert x.abs().max() <= 5.0
    amplitude, phase = fleet.task_parameters(7)
    torch.testing.assert_close(y, amplitude * torch.sin(x - phase))


def test_held_out_clients_are_disjoint_from_training_and_dealt_by_the_fold():
    config = RunConfig.resolve(dataset="sinusoid", clients=200)
    training, held_out = split_clients(config)
    assert len(held_out) == 20 and not set(training) & set(held_out)
    assert sorted(training + held_out) == list(range(200))
    assert held_out_client_ids(200, 20) == held_out
    assert held_out_client_ids(200, 20, fold=1) != held_out
    assert held_out != list(range(20))  # dealt, not the first ids


@pytest.mark.parametrize("dataset, clients", [("sinusoid", 200), ("watch", 10), ("fashion-mnist", 100)])
def test_the_same_devices_are_held_out_in_a_fold_whatever_the_seed(dataset, clients):
    for fold in (0, 1):
        by_seed = {seed: split_clients(RunConfig.resolve(dataset=dataset, clients=clients, fold=fold, seed=seed))
                   for seed in (0, 1, 7, 2**31)}
        assert len({(tuple(train), tuple(held)) for train, held in by_seed.values()}) == 1, (dataset, fold)


def test_folds_hold_out_every_client_exactly_once():
    folds = [split_clients(RunConfig.resolve(dataset="watch", fold=f))[1] for f in range(5)]
    assert sorted(c for held_out in folds for c in held_out) == list(range(10))
    assert folds[0] == split_clients(RunConfig.resolve(dataset="watch"))[1]
    with pytest.raises(DataError, match="fold 5"):
        held_out_client_ids(10, 2, fold=5)


def _client(x_support, y_support, num_classes=3):
    query = (torch.zeros(4, 2), torch.tensor([0, 1, 2, 0]))
    return ClientData(0, (Split((x_support, y_support), query),), num_classes)


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), "support is empty"),
        (torch.zeros(4, 3), torch.tensor([0, 1, 2, 0]), "shape \\(3,\\), expected \\(2,\\)"),
        (torch.tensor([[0.0, float("nan")]] * 4), torch.tensor([0, 1, 2, 0]), "NaN or Inf"),
        (torch.zeros(4, 2), torch.tensor([0, 1, 2]), "4 examples but 3 labels"),
        (torch.zeros(4, 2), torch.tensor([0, 1, 5, 0]), "labels outside \\[0, 3\\)"),
    ],
)
def test_bad_client_data_is_rejected_with_the_problem_named(x, y, message):
    with pytest.raises(DataError, match=message):
        _client(x, y).validate((2,))


def test_a_client_without_data_is_rejected():
    with pytest.raises(DataError, match="client 4 has no data"):
        ClientData(4, (), 3).validate((2,))
    with pytest.raises(DataError, match="target"):
        validate_batch((torch.zeros(2, 1), torch.tensor([[1.0], [float("inf")]])), (1,), None, "batch")


def test_episodes_have_k_shots_per_class_and_n_ways_relabelled():
    x = torch.arange(30, dtype=torch.float32).reshape(15, 2)
    y = torch.arange(15) % 5
    client = ClientData(0, (Split((x, y), (x, y)),), 5)
    episode = client.sample_episode(np.random.default_rng(0), shots=2, query_shots=1, ways=3)
    assert sorted(episode.support[1].tolist()) == [0, 0, 1, 1, 2, 2]
    assert sorted(episode.query[1].tolist()) == [0, 1, 2]


def test_several_evaluation_episodes_per_split_draw_different_classes():
    x = torch.arange(80, dtype=torch.float32).reshape(40, 2)
    y = torch.arange(40) % 20
    client = ClientData(0, (Split((x, y), (x, y)),), 20)
    episodes = client.evaluation_episodes(shots=1, seed=0, ways=5, per_split=4)
    assert len(episodes) == 4 and all(len(e.support[1]) == 5 and len(e.query[1]) == 10 for e in episodes)
    assert len({tuple(e.support[0][:, 0].tolist()) for e in episodes}) == 4
    assert [e.support[0].tolist() for e in episodes] == [
        e.support[0].tolist() for e in client.evaluation_episodes(shots=1, seed=0, ways=5, per_split=4)
    ]


def test_uniform_sampling_draws_k_examples_in_all_and_keeps_labels():
    x = torch.arange(40, dtype=torch.float32).reshape(20, 2)
    y = torch.tensor([0] * 18 + [3] * 2)  # a skewed client: most examples of one class, some classes absent
    client = ClientData(0, (Split((x, y), (x, y)),), 5, sampling="uniform")
    episode = client.sample_episode(np.random.default_rng(0), shots=6, query_shots=4)
    assert len(episode.support[1]) == 6 and len(episode.query[1]) == 4
    assert set(episode.support[1].tolist()) <= {0, 3}
    (evaluation,) = client.evaluation_episodes(shots=6, seed=0)
    assert len(evaluation.support[1]) == 6 and len(evaluation.query[1]) == 20
    with pytest.raises(ValueError, match="sampling"):
        ClientData(0, (Split((x, y), (x, y)),), 5, sampling="balanced")


def test_watch_fleet_support_and_query_never_share_a_recording():
    raw = load_recordings()
    assert len(raw["X"]) == 140
    fleet = WatchFleet(held_out=[3, 8], recordings=raw)
    for subject in range(10):
        left, right = fleet._arm(subject, 0), fleet._arm(subject, 1)
        client = fleet.client(subject)
        assert len(client.splits) == 2
        for split in client.splits:
            # each split's support is one arm and its query the other: identical tensors, never mixed
            sides = [torch.equal(split.support[0], arm[0]) for arm in (left, right)]
            assert sorted(sides) == [False, True]
            assert not torch.equal(split.support[0], split.query[0])
            assert set(split.support[1].tolist()) == set(range(7)) == set(split.query[1].tolist())
        episode = client.sample_episode(np.random.default_rng(subject), shots=5, query_shots=3)
        assert episode.support[0].shape == (35, 6, 100) and episode.query[0].shape == (21, 6, 100)


def test_watch_standardization_uses_training_subjects_only():
    raw = load_recordings()
    fleet = WatchFleet(held_out=[0, 1], recordings=raw)
    training = torch.cat([fleet._arm(s, side)[0] for s in range(2, 10) for side in (0, 1)])
    torch.testing.assert_close(training.mean(dim=(0, 2)), torch.zeros(6), atol=1e-4, rtol=0)
    torch.testing.assert_close(training.std(dim=(0, 2)), torch.ones(6), atol=1e-3, rtol=0)
    held_out = torch.cat([fleet._arm(s, side)[0] for s in (0, 1) for side in (0, 1)])
    assert held_out.mean(dim=(0, 2)).abs().max() > 1e-3  # not re-centred on the held-out subjects


def test_watch_loader_refuses_a_corrupt_file_and_names_the_fix(tmp_path, monkeypatch):
    corrupt = tmp_path / "watch_dataset.npy"
    corrupt.write_bytes(locate_watch_file().read_bytes()[:1000])
    monkeypatch.setenv("METAFLEET_WATCH_FILE", str(corrupt))
    with pytest.raises(DataError, match="not the expected seglearn 1.2.5 watch data.*pip install --no-deps seglearn"):
        make_fleet(RunConfig.resolve(dataset="watch"))
    monkeypatch.setenv("METAFLEET_WATCH_FILE", str(tmp_path / "missing.npy"))
    with pytest.raises(DataError, match="does not exist"):
        load_recordings()


def test_confidence_interval_matches_student_t():
    mean, half_width = mean_and_ci95([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert half_width == pytest.approx(3.182 * np.std([1, 2, 3, 4], ddof=1) / 2, rel=1e-6)
    assert mean_and_ci95([5.0]) == (5.0, 0.0)
