"""The smartwatch exercise fleet: 10 subjects, 7 shoulder exercises, both arms (Burns et al., 2018).

The recordings ship inside the PyPI wheel ``seglearn==1.2.5`` as ``seglearn/data/watch_dataset.npy``:
140 recordings = 10 subjects x 7 exercises x 2 arms, 6 channels (accelerometer, gyroscope) at 50 Hz.
Only that file is read; seglearn itself is never imported.

Each subject is one client. Recordings are cut into windows of 100 samples with stride 50; windows of one
recording overlap, so support and query always come from different recordings: support from one arm,
query from the other, every class of an episode from the same arm (the arm shifts the accelerometer mean).
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
from metafleet.common.meta import CLASSIFICATION
from metafleet.common.models import SensorCNN

WATCH_SHA256 = "eb122f23cdf06ef6bd6c6c5312958ec5cf9d038e2e6d457b8081662c75a42537"
INSTALL_HINT = (
    "install it with `pip install --no-deps seglearn==1.2.5` (only its data file is read), "
    "or point METAFLEET_WATCH_FILE at a copy of seglearn/data/watch_dataset.npy"
)
WINDOW, STRIDE, CHANNELS, NUM_CLASSES, NUM_SUBJECTS = 100, 50, 6, 7, 10


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


class WatchFleet(Fleet):
    """Subjects 1..10 as clients 0..9, standardized with statistics of the training subjects only.

    The statistics are the per-channel mean and standard deviation over the training subjects' windows,
    which is what one federated sum / sum-of-squares aggregation would give the server.
    """

    name = "watch"
    objective = CLASSIFICATION
    input_shape = (CHANNELS, WINDOW)
    num_classes = NUM_CLASSES

    def __init__(self, held_out: Sequence[int], recordings: dict | None = None):
        raw = recordings if recordings is not None else load_recordings()
        self._windows: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
        for recording, label, subject, side in zip(raw["X"], raw["y"], raw["subject"], raw["side"], strict=True):
            cut = windows(recording)
            key = (int(subject) - 1, int(side))
            xs, ys = self._windows.get(key, (np.empty((0, CHANNELS, WINDOW), np.float32), np.empty(0, int)))
            self._windows[key] = (np.concatenate([xs, cut]), np.concatenate([ys, np.full(len(cut), label)]))
        self.held_out = sorted(held_out)
        training = [s for s in range(NUM_SUBJECTS) if s not in self.held_out]
        stacked = np.concatenate([self._windows[(s, side)][0] for s in training for side in (0, 1)])
        self.mean = stacked.mean(axis=(0, 2), keepdims=True)[0]
        self.std = stacked.std(axis=(0, 2), keepdims=True)[0] + 1e-6

    @classmethod
    def build(cls, config: RunConfig, held_out: Sequence[int]) -> WatchFleet:
        if config.clients != NUM_SUBJECTS:
            raise ConfigError("clients", config.clients, f"must be {NUM_SUBJECTS} for watch (one per subject)")
        return cls(held_out)

    @property
    def num_clients(self) -> int:
        return NUM_SUBJECTS

    def _arm(self, client_id: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self._windows.get((client_id, side), (np.empty((0, CHANNELS, WINDOW)), np.empty(0)))
        standardized = (x - self.mean) / self.std
        return torch.as_tensor(standardized, dtype=torch.float32), torch.as_tensor(y, dtype=torch.long)

    def client(self, client_id: int) -> ClientData:
        self.check_client_id(client_id)
        left, right = self._arm(client_id, 0), self._arm(client_id, 1)
        data = ClientData(client_id, (Split(left, right), Split(right, left)), NUM_CLASSES)
        data.validate(self.input_shape)
        return data

    @classmethod
    def make_model(cls, ways: int = 0) -> SensorCNN:
        return SensorCNN(ways or NUM_CLASSES, CHANNELS)
