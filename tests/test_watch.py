"""The watch fleet's wrist mirroring and its training-time rotation and scaling, on the real recordings."""

import numpy as np
import pytest
import torch

from metafleet.common.config import RunConfig
from metafleet.common.errors import DataError
from metafleet.common.tasks.watch import (
    LEFT,
    RIGHT,
    SensorAugmentation,
    WatchFleet,
    load_recordings,
    random_rotations,
    to_left_wrist,
    windows,
)
from metafleet.common.tasks.watch import make_fleet as make_watch_fleet


@pytest.fixture(scope="module")
def recordings():
    return load_recordings()


def test_right_wrist_windows_are_mirrored_into_the_left_wrist_frame(recordings):
    # Gravity puts the accelerometer's x mean on opposite sides for the two wrists; mirrored, they agree.
    def mean_x(side, mirror):
        cut = [windows(x) for x, s in zip(recordings["X"], recordings["side"], strict=True) if s == side]
        stacked = np.concatenate([to_left_wrist(c, side) if mirror else c for c in cut])
        return stacked[:, 0].mean()

    assert mean_x(LEFT, False) > 0.3 and mean_x(RIGHT, False) < -0.3
    assert mean_x(RIGHT, True) > 0.3
    window = np.arange(12, dtype=np.float32).reshape(1, 6, 2)
    mirrored = to_left_wrist(window, RIGHT)
    np.testing.assert_array_equal(mirrored[0, :, 0], [0, 2, 4, 6, -8, -10])  # acc x, gyro y, gyro z flip
    np.testing.assert_array_equal(to_left_wrist(window, LEFT), window)
    with pytest.raises(DataError, match="side is 2"):
        to_left_wrist(window, 2)


def test_random_rotations_are_proper_rotations_within_the_angle():
    rotations = random_rotations(500, 30.0, torch.Generator().manual_seed(0)).double()
    torch.testing.assert_close(rotations @ rotations.transpose(1, 2), torch.eye(3).expand(500, 3, 3).double(),
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.linalg.det(rotations), torch.ones(500).double(), atol=1e-5, rtol=0)
    angles = torch.rad2deg(torch.arccos(((rotations.diagonal(dim1=1, dim2=2).sum(1) - 1) / 2).clamp(-1, 1)))
    assert angles.max() <= 30.0 + 1e-3 and angles.max() > 25.0  # bounded, and the bound is used


def test_augmentation_turns_both_sensors_together_in_sensor_units(recordings):
    fleet = WatchFleet(held_out=[0, 1], recordings=recordings, augment_training=True)
    x = fleet.client(5).splits[0].support[0][:64]
    mean, std = torch.as_tensor(fleet.mean), torch.as_tensor(fleet.std)
    rotate_only = SensorAugmentation(fleet.mean, fleet.std, max_scale_change=0.0)
    turned = rotate_only(x, np.random.default_rng(0))
    raw, raw_turned = x * std + mean, turned * std + mean
    assert not torch.allclose(raw, raw_turned, atol=1e-3)
    for sensor in (slice(0, 3), slice(3, 6)):  # a rotation keeps every sample's vector length
        torch.testing.assert_close(raw_turned[:, sensor].norm(dim=1), raw[:, sensor].norm(dim=1), atol=1e-4, rtol=1e-4)
    identity = SensorAugmentation(fleet.mean, fleet.std, max_degrees=0.0, max_scale_change=0.0)
    torch.testing.assert_close(identity(x, np.random.default_rng(0)), x, atol=1e-4, rtol=1e-4)


def test_only_training_clients_training_episodes_are_augmented(recordings):
    fleet = make_watch_fleet(RunConfig.resolve(dataset="watch"), held_out=[0, 1])
    assert fleet.client(0).augment is None and fleet.client(1).augment is None
    training = fleet.client(4)
    assert training.augment is not None
    plain = WatchFleet(held_out=[0, 1], recordings=recordings).client(4)
    augmented = training.sample_episode(np.random.default_rng(3), shots=5, query_shots=3)
    original = plain.sample_episode(np.random.default_rng(3), shots=5, query_shots=3)
    assert torch.equal(augmented.support[1], original.support[1])  # the same windows and labels were drawn
    assert not torch.allclose(augmented.support[0], original.support[0], atol=1e-3)
    assert not torch.allclose(augmented.query[0], original.query[0], atol=1e-3)
    # Evaluation measures what the device recorded.
    for a, b in zip(training.evaluation_episodes(5, seed=0), plain.evaluation_episodes(5, seed=0), strict=True):
        assert torch.equal(a.support[0], b.support[0]) and torch.equal(a.query[0], b.query[0])
