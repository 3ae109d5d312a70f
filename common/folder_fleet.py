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
import torch
from torch import nn

from metafleet.common.data import ClientData, Fleet
from metafleet.common.device_data import read_device_folder, to_client_data
from metafleet.common.errors import DataError, MetafleetError
from metafleet.common.meta import REGRESSION
from metafleet.common.task import DeviceArrays, Task, TaskError, check_buffers_unchanged

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


def output_size(model: nn.Module, input_shape: tuple[int, ...], integer_inputs: bool, task_name: str) -> int:
    """A classifier's class count, read off its output for two dummy examples."""
    dummy = torch.zeros((2, *input_shape), dtype=torch.long if integer_inputs else torch.float32)
    try:
        with torch.no_grad():
            output = model(dummy)
    except Exception as error:  # noqa: BLE001 - the user's model: one line
        raise TaskError(f"task {task_name}: the model does not accept inputs of shape {input_shape}: "
                        f"{type(error).__name__}: {error}") from None
    if not isinstance(output, torch.Tensor) or output.dim() < 2:
        raise TaskError(f"task {task_name}: a classifier must output (N, classes) scores, it outputs "
                        f"{tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__}")
    return int(output.shape[-1])


def check_model_fits(task: Task, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], where: str) -> None:
    """Refuse a model that cannot take the data, or whose output does not fit the objective."""
    x, y = batch[0][:4], batch[1][:4]
    model.train()
    try:
        output = model(x)
    except Exception as error:  # noqa: BLE001
        raise TaskError(f"task {task.name}: the model does not accept {where}'s inputs of shape "
                        f"{tuple(x.shape[1:])}: {type(error).__name__}: {error}") from None
    if not isinstance(output, torch.Tensor):
        raise TaskError(f"task {task.name}: the model returns {type(output).__name__}, not a tensor")
    if task.objective.class_targets:
        if output.dim() < 2 or tuple(output.shape[:-1]) != tuple(y.shape):
            raise TaskError(f"task {task.name}: for classification the model must output scores of shape "
                            f"{(*y.shape, 'classes')} for labels of shape {tuple(y.shape)}; it outputs "
                            f"{tuple(output.shape)}")
    elif task.objective is REGRESSION and tuple(output.shape) != tuple(y.shape):
        raise TaskError(f"task {task.name}: for regression the model's output {tuple(output.shape)} must have the "
                        f"targets' shape {tuple(y.shape)} (reshape the targets in the data or the output in the model)")
    try:
        loss = task.objective.loss(output, y)
    except Exception as error:  # noqa: BLE001
        raise TaskError(f"task {task.name}: the loss cannot compare the model's output {tuple(output.shape)} with "
                        f"{where}'s targets {tuple(y.shape)}: {type(error).__name__}: {error}") from None
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0 or not torch.isfinite(loss):
        raise TaskError(f"task {task.name}: the loss on {where}'s data is not a finite scalar ({loss})")
    check_buffers_unchanged(model, x, task.name)


def device_problems(task: Task, arrays: DeviceArrays, where: str, input_shape: tuple[int, ...] | None,
                    num_classes: int | None) -> list[str]:
    """Every problem of one device's arrays, one line each naming ``where``."""
    problems = []
    for role in ("support", "query"):
        x, y = np.asarray(getattr(arrays, f"{role}_x")), np.asarray(getattr(arrays, f"{role}_y"))
        if len(x) == 0:
            problems.append(f"{where}: {role} is empty")
            continue
        if len(y) != len(x):
            problems.append(f"{where}: {role}_x has {len(x)} examples but {role}_y {len(y)}")
        if x.dtype.kind == "f" and not np.isfinite(x).all():
            problems.append(f"{where}: {role}_x holds NaN or Inf values ({int((~np.isfinite(x)).sum())} of them)")
        if y.dtype.kind == "f" and not np.isfinite(y).all():
            problems.append(f"{where}: {role}_y holds NaN or Inf values")
        if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
            problems.append(f"{where}: {role}_x has examples of shape {tuple(x.shape[1:])}, the model takes "
                            f"{tuple(input_shape)}")
        if task.objective.class_targets and y.dtype.kind in "iu" and num_classes is not None and len(y):
            if y.min() < 0 or y.max() >= num_classes:
                problems.append(f"{where}: {role}_y has labels outside [0, {num_classes}) (min {y.min()}, max "
                                f"{y.max()}): the model has {num_classes} outputs")
    if not problems:
        shared = _shared_rows(np.asarray(arrays.support_x), np.asarray(arrays.query_x))
        if shared:
            problems.append(f"{where}: support and query share {shared} identical examples (a recording in both "
                            "would leak into the measurement)")
    return problems


def _shared_rows(support: np.ndarray, query: np.ndarray) -> int:
    def keys(array: np.ndarray) -> set[bytes]:
        flat = np.ascontiguousarray(array.reshape(len(array), -1))
        return {row.tobytes() for row in flat}

    return len(keys(support) & keys(query))


def check_device(task: Task, arrays: DeviceArrays, where: str, client_id: int,
                 input_shape: tuple[int, ...] | None = None, num_classes: int | None = None,
                 augment=None, model: nn.Module | None = None) -> ClientData:  # noqa: ANN001
    """The device's ClientData, or the first of its problems as a ``DataError`` (a ``TaskError`` where the
    model does not fit it)."""
    input_shape = input_shape or task.input_shape or tuple(np.asarray(arrays.support_x).shape[1:])
    model = model if model is not None else task.make_model()
    if task.objective.class_targets and num_classes is None:
        num_classes = task.num_classes or output_size(model, input_shape,
                                                      np.asarray(arrays.support_x).dtype.kind in "iub", task.name)
    problems = device_problems(task, arrays, where, input_shape, num_classes)
    if problems:
        raise DataError(problems[0])
    data = to_client_data(arrays, task, client_id, where, num_classes, augment)
    check_model_fits(task, model, data.splits[0].support, where)
    data.validate(input_shape)
    return data


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
        x = np.asarray(self._first_readable().support_x)
        self.input_shape = task.input_shape or tuple(x.shape[1:])
        self.integer_inputs = x.dtype.kind in "iub"
        self.num_classes = None
        if task.objective.class_targets:
            self.num_classes = task.num_classes or output_size(self.model, self.input_shape, self.integer_inputs,
                                                               task.name)

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

    def _first_readable(self) -> DeviceArrays:
        """The first device that reads: where the task does not declare them, its data tells the input shape."""
        first_error = None
        for client_id in range(self.num_clients):
            try:
                arrays = self._arrays(client_id)
            except DataError as error:
                first_error = first_error or error
                continue
            if len(arrays.support_x):
                return arrays
        raise first_error or DataError(f"fleet {self.root}: every device is empty")

    def client(self, client_id: int) -> ClientData:
        if client_id not in self._cache:
            if len(self._cache) >= CACHED_DEVICES:
                self._cache.pop(next(iter(self._cache)))
            augment = self.task.augment if client_id not in self.held_out else None
            self._cache[client_id] = check_device(
                self.task, self._arrays(client_id), self._where(client_id), client_id, self.input_shape,
                self.num_classes, augment, self.model)
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
