"""Folder fleets: a user's own fleet as ``FLEET/<device-name>/`` folders, one device each.

Each device folder holds what the task's reader reads (by default ``data.npz`` or ``data.csv``, see
``metafleet.common.device_data``). Devices are numbered 0..N-1 in the sorted order of their folder names, so
the server and every simulated device agree on them. A device's files are read when it is first asked for,
so a fleet of thousands starts without reading them all.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from metafleet.common.data import ClientData, Fleet
from metafleet.common.device_data import check_device, device_problems, output_size, read_device_folder
from metafleet.common.errors import DataError, MetafleetError
from metafleet.common.task import DeviceArrays, Task

# A device's data is read once per process; this many stay in memory (a simulated fleet's devices take turns).
CACHED_DEVICES = 4096


def fleet_devices(folder: str) -> tuple[str, ...]:
    """The device names (sub-folders, sorted) of a folder fleet; ``DataError`` if it has none."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"fleet {folder} is not a folder (a fleet is FLEET/<device>/data.npz, one folder a device)")
    # Listed once per process while the folder is unchanged: a simulated device resolves the run's config often.
    return _listed_devices(str(root), root.stat().st_mtime_ns)


@lru_cache(maxsize=16)
def _listed_devices(folder: str, _mtime_ns: int) -> tuple[str, ...]:
    root = Path(folder)
    devices = tuple(sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith(".")))
    if not devices:
        raise DataError(f"fleet {folder} holds no device folders (expected FLEET/<device>/data.npz or data.csv)")
    return devices


class FolderFleet(Fleet):
    """The devices of ``FLEET/<device>/`` as clients 0..N-1 (sorted names); the task's augmentation applies
    to training devices' episodes."""

    def __init__(self, task: Task, folder: str | Path, held_out: Sequence[int] = (), head_ways: int = 0):
        self.task = task
        self.root = Path(folder)
        self.devices = fleet_devices(str(self.root.resolve()))
        self.name = task.name
        self.sampling = task.sampling
        self.held_out = frozenset(held_out)
        self.model = task.make_model(head_ways)
        self._cache: dict[int, ClientData] = {}
        first_id, first = self._first_readable()
        x = np.asarray(first.support_x)
        self.input_shape = task.input_shape or tuple(x.shape[1:])
        self.integer_inputs = x.dtype.kind in "iub"
        self.num_classes = None
        if task.objective.class_targets:
            self.num_classes = task.num_classes or output_size(self.model, self.input_shape, self.integer_inputs,
                                                               task.name)
        # The model meets the data once, on the first usable device; the others need only fit its input shape
        # and class count (checking the model on each of a thousand devices cost a forward pass apiece).
        self._check_model_on_first_usable(first_id)

    @property
    def num_clients(self) -> int:
        return len(self.devices)

    def device_name(self, client_id: int) -> str:
        self.check_client_id(client_id)
        return self.devices[client_id]

    def device_folder(self, client_id: int) -> Path:
        return self.root / self.device_name(client_id)

    def _where(self, client_id: int) -> str:
        return f"device {self.device_name(client_id)} ({self.device_folder(client_id)})"

    def _arrays(self, client_id: int) -> DeviceArrays:
        return read_device_folder(self.device_folder(client_id), self.task)

    def _first_readable(self) -> tuple[int, DeviceArrays]:
        """The first device that reads: where the task does not declare them, its data tells the input shape."""
        first_error = None
        for client_id in range(self.num_clients):
            try:
                arrays = self._arrays(client_id)
            except DataError as error:
                first_error = first_error or error
                continue
            if len(arrays.support_x):
                return client_id, arrays
        raise first_error or DataError(f"fleet {self.root}: every device is empty")

    def _check_model_on_first_usable(self, start: int) -> None:
        first_problem = None
        for client_id in range(start, self.num_clients):
            try:
                arrays = self._arrays(client_id)
            except DataError as error:
                first_problem = first_problem or error
                continue
            problems = device_problems(self.task, arrays, self._where(client_id), self.input_shape, self.num_classes)
            if not problems:
                check_device(self.task, arrays, self._where(client_id), client_id, self.input_shape,
                             self.num_classes, model=self.model)
                return
            first_problem = first_problem or DataError(problems[0])
        raise first_problem or DataError(f"fleet {self.root}: no device is usable")

    def client(self, client_id: int) -> ClientData:
        if client_id not in self._cache:
            if len(self._cache) >= CACHED_DEVICES:
                self._cache.pop(next(iter(self._cache)))
            augment = self.task.augment if client_id not in self.held_out else None
            self._cache[client_id] = check_device(
                self.task, self._arrays(client_id), self._where(client_id), client_id, self.input_shape,
                self.num_classes, augment)
        return self._cache[client_id]

    def problems(self) -> dict[str, list[str]]:
        """Every device's problems (for ``metafleet fleet check``), one line each naming device and file."""
        found = {}
        for client_id in range(self.num_clients):
            where = self._where(client_id)
            try:
                arrays = self._arrays(client_id)
                problems = device_problems(self.task, arrays, where, self.input_shape, self.num_classes)
                if not problems:
                    self.client(client_id)
            except MetafleetError as error:
                problems = [str(error) if str(error).startswith(("device ", "task ")) else f"{where}: {error}"]
            if problems:
                found[self.device_name(client_id)] = problems
        return found
