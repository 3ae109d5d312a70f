"""The smartwatch exercise fleet: 10 subjects, 7 shoulder exercises, both arms (Burns et al., 2018).

The recordings ship inside the PyPI wheel ``seglearn==1.2.5`` as ``seglearn/data/watch_dataset.npy``:
140 recordings = 10 subjects x 7 exercises x 2 arms, 6 channels (accelerometer, gyroscope) at 50 Hz.
Only that file is read; seglearn itself is never imported.

Each subject is one client. Recordings are cut into windows of 100 samples with stride 50; windows of one
recording overlap, so support and query always come from different recordings: support from one arm,
query from the other, every class of an episode from the same arm.

The same exercise done with the other arm is its mirror image, and the watch on the other wrist measures
it in mirrored axes: the accelerometer's x axis changes sign (its mean is +0.6 g on the left wrist and
-0.65 g on the right) and, as angular velocity is an axial vector, the gyroscope's y and z axes do. So
right-wrist recordings are mirrored into the left-wrist frame (``to_left_wrist``), as a watch that knows
which wrist it is worn on can do itself. Training clients also see each training window at a random
rotation (up to 30 degrees about a random axis, accelerometer and gyroscope turned together) and a random
scale (0.8-1.2): how a watch sits differs between wearers.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from metafleet.common.config import RunConfig
from metafleet.common.data import ClientData, Fleet, Split, file_problem, locate_data
from metafleet.common.errors import ConfigError, DataError
from metafleet.common.task import BenchmarkPlan, BenchmarkSetting, TaskDefaults
from metafleet.common.tasks.models import SensorCNN

WATCH_SHA256 = "eb122f23cdf06ef6bd6c6c5312958ec5cf9d038e2e6d457b8081662c75a42537"
INSTALL_HINT = (
    "install it with `pip install --no-deps seglearn==1.2.5` (only its data file is read), "
    "or point METAFLEET_WATCH_FILE at a copy of seglearn/data/watch_dataset.npy"
)
WINDOW, STRIDE, CHANNELS, NUM_CLASSES, NUM_SUBJECTS = 100, 50, 6, 7, 10
LEFT, RIGHT = 0, 1  # the data set's "side" values
# Channel signs that mirror a right-wrist window into the left-wrist frame (accelerometer x, y, z,
# gyroscope x, y, z): a reflection flips a polar vector's normal component and an axial vector's other two.
# On validation subjects (below) a left-wrist model read mirrored right-wrist windows at 84 %, against
# 58-73 % for the other seven gyroscope sign patterns.
RIGHT_TO_LEFT_SIGNS = np.array([-1, 1, 1, 1, -1, -1], dtype=np.float32)
MAX_ROTATION_DEGREES, MAX_SCALE_CHANGE = 30.0, 0.2

name = "watch"
objective = "classification"
input_shape = (CHANNELS, WINDOW)
num_classes = NUM_CLASSES
prototype_heads = True
sampling = "per-class"
# Chosen on training clients only (see docs/benchmarks.md); never tuned on held-out clients.
# head_finetune_lr: chosen as finetune_lr was (scripts/watch-validation ... finetune=head; docs/benchmarks.md).
defaults = TaskDefaults(shots=5, query_shots=10, inner_lr=0.05, eval_steps=(0, 1, 5), clients=NUM_SUBJECTS,
                        held_out_clients=2, finetune_lr=0.002, head_finetune_lr=0.02)
benchmark = BenchmarkPlan(
    (BenchmarkSetting("7-way 5-shot", {"shots": 5}), BenchmarkSetting("7-way 1-shot", {"shots": 1})),
    rounds=100, folds=tuple(range(5)), seeds=(0, 1), common={"eval_every": 20, "clients_per_round": 8})


def make_model(ways: int = 0) -> SensorCNN:
    return SensorCNN(ways or NUM_CLASSES, CHANNELS)


def make_fleet(config: RunConfig, held_out: Sequence[int]) -> WatchFleet:
    if config.clients != NUM_SUBJECTS:
        raise ConfigError("clients", config.clients, f"must be {NUM_SUBJECTS} for watch (one per subject)")
    return WatchFleet(held_out, augment_training=True)


def locate_watch_file() -> Path:
    """The data file: METAFLEET_WATCH_FILE if set, else the one inside an installed seglearn wheel."""
    spec = importlib.util.find_spec("seglearn")  # locates the package without running its code
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    candidates = [Path(folder) / "data" / "watch_dataset.npy" for folder in folders]
    return locate_data("METAFLEET_WATCH_FILE", candidates, file_problem, "smartwatch data (watch_dataset.npy)",
                       INSTALL_HINT)


def load_recordings(path: Path | None = None) -> dict:
    """The raw recordings dict, after checking the file's SHA-256 (it is a pickle, so only a known file loads)."""
    path = path or locate_watch_file()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != WATCH_SHA256:
        raise DataError(f"{path} is not the expected seglearn 1.2.5 watch data (SHA-256 {digest}); {INSTALL_HINT}")
    try:
        data = np.load(path, allow_pickle=True).item()
        recordings = [np.asarray(x, dtype=np.float32) for x in data["X"]]
        labels, subjects, sides = (np.asarray(data[k]) for k in ("y", "subject", "side"))
    except Exception as error:  # a truncated or altered file: say which file, not a numpy traceback
        raise DataError(f"{path} could not be read as the watch data set: {error}") from error
    return {"X": recordings, "y": labels.astype(int), "subject": subjects.astype(int), "side": sides.astype(int)}


def windows(recording: np.ndarray) -> np.ndarray:
    """(n_windows, 6, 100) windows of a (samples, 6) recording, stride 50."""
    if recording.ndim != 2 or recording.shape[1] != CHANNELS:
        raise DataError(f"a watch recording has shape {recording.shape}, expected (samples, {CHANNELS})")
    count = (len(recording) - WINDOW) // STRIDE + 1
    if count < 1:
        return np.empty((0, CHANNELS, WINDOW), dtype=np.float32)
    return np.stack([recording[i * STRIDE : i * STRIDE + WINDOW].T for i in range(count)])


def to_left_wrist(windows: np.ndarray, side: int) -> np.ndarray:
    """(n, 6, samples) windows in the left-wrist frame: right-wrist ones mirrored, left-wrist ones as they are."""
    if side not in (LEFT, RIGHT):
        raise DataError(f"a watch recording's side is {side}, expected {LEFT} (left) or {RIGHT} (right)")
    return windows * RIGHT_TO_LEFT_SIGNS[:, None] if side == RIGHT else windows


def random_rotations(count: int, max_degrees: float, generator: torch.Generator) -> torch.Tensor:
    """(count, 3, 3) rotation matrices about uniformly random axes by angles uniform in ±max_degrees."""
    axes = torch.nn.functional.normalize(torch.randn(count, 3, generator=generator), dim=1)
    angles = torch.deg2rad((torch.rand(count, generator=generator) * 2 - 1) * max_degrees)
    cross = torch.zeros(count, 3, 3)
    cross[:, 0, 1], cross[:, 0, 2], cross[:, 1, 2] = -axes[:, 2], axes[:, 1], -axes[:, 0]
    cross = cross - cross.transpose(1, 2)
    sin, cos = torch.sin(angles)[:, None, None], torch.cos(angles)[:, None, None]
    return torch.eye(3) + sin * cross + (1 - cos) * cross @ cross  # Rodrigues' formula


class SensorAugmentation:
    """Turns standardized windows back into sensor units, rotates and scales them, and standardizes again."""

    def __init__(self, mean: np.ndarray, std: np.ndarray, max_degrees: float = MAX_ROTATION_DEGREES,
                 max_scale_change: float = MAX_SCALE_CHANGE):
        self.mean, self.std = torch.as_tensor(mean), torch.as_tensor(std)
        self.max_degrees, self.max_scale_change = max_degrees, max_scale_change

    def __call__(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        generator = torch.Generator().manual_seed(int(rng.integers(2**63)))
        mean, std = self.mean.to(x.device), self.std.to(x.device)
        raw = x * std + mean
        rotation = random_rotations(len(x), self.max_degrees, generator).to(x)
        turned = torch.cat([rotation @ raw[:, :3], rotation @ raw[:, 3:]], dim=1)
        scale = 1 + (torch.rand(len(x), 1, 1, generator=generator) * 2 - 1) * self.max_scale_change
        return (turned * scale.to(x) - mean) / std


class WatchFleet(Fleet):
    """Subjects 1..10 as clients 0..9, in the left-wrist frame, standardized with statistics of the training
    subjects only.

    The statistics are the per-channel mean and standard deviation over the training subjects' windows,
    which is what one federated sum / sum-of-squares aggregation would give the server. With
    ``augment_training`` (what a run uses) training clients' episodes are randomly rotated and scaled.
    """

    name = "watch"
    input_shape = (CHANNELS, WINDOW)
    num_classes = NUM_CLASSES

    def __init__(self, held_out: Sequence[int], recordings: dict | None = None, augment_training: bool = False):
        raw = recordings if recordings is not None else load_recordings()
        self._windows: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        for recording, label, subject, side in zip(raw["X"], raw["y"], raw["subject"], raw["side"], strict=True):
            cut = to_left_wrist(windows(recording), int(side))
            key = (int(subject) - 1, int(side))
            xs, ys = self._windows.get(key, (np.empty((0, CHANNELS, WINDOW), np.float32), np.empty(0, int)))
            self._windows[key] = (np.concatenate([xs, cut]), np.concatenate([ys, np.full(len(cut), label)]))
        self.held_out = sorted(held_out)
        training = [s for s in range(NUM_SUBJECTS) if s not in self.held_out]
        stacked = np.concatenate([self._windows[(s, side)][0] for s in training for side in (LEFT, RIGHT)])
        self.mean = stacked.mean(axis=(0, 2), keepdims=True)[0]
        self.std = stacked.std(axis=(0, 2), keepdims=True)[0] + 1e-6
        self.augmentation = SensorAugmentation(self.mean, self.std) if augment_training else None

    @property
    def num_clients(self) -> int:
        return NUM_SUBJECTS

    def _arm(self, client_id: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self._windows.get((client_id, side), (np.empty((0, CHANNELS, WINDOW)), np.empty(0)))
        standardized = (x - self.mean) / self.std
        return torch.as_tensor(standardized, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long)

    def client(self, client_id: int) -> ClientData:
        self.check_client_id(client_id)
        left, right = self._arm(client_id, LEFT), self._arm(client_id, RIGHT)
        augment = self.augmentation if client_id not in self.held_out else None
        data = ClientData(client_id, (Split(left, right), Split(right, left)), NUM_CLASSES, augment=augment)
        data.validate(self.input_shape)
        return data
