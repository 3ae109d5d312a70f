"""One device's own data: a folder, read by the task's reader, checked before anything trains on it.

The default reader takes ``FOLDER/data.npz`` or, failing that, ``FOLDER/data.csv``.

``data.npz`` holds four arrays (and, optionally, ``task``: the name of the task the data is for; files
written before tasks existed say ``dataset``):
- ``support_x``, ``support_y``: what the device adapts on (its recent, labelled data);
- ``query_x``, ``query_y``: what it measures on. Support and query must come from different recordings
  (overlapping sensor windows would leak), so the device's owner makes the split.

``x`` arrays are float (measurements) or integer (token ids), N × the model's input shape (watch: N × 6 × 100,
six accelerometer and gyroscope channels of 100 samples in the left-wrist frame: a watch on the right wrist
mirrors its raw windows with ``metafleet.common.tasks.watch.to_left_wrist`` before standardizing them); ``y``
arrays are integer labels 0..classes-1 (classification) or float targets of the model's output shape
(regression).

``data.csv`` is the form for tabular or windowed data. It has a header row and these columns:
- ``group``: the recording, session or source an example comes from. Support and query never share a group,
  so overlapping windows of one recording cannot leak from one into the other;
- ``label`` (classification) or ``target`` (regression): the example's y;
- ``split`` (optional): ``support`` or ``query`` for each row; without it, each class's groups are dealt in
  turn to support and query, in the order they first appear (regression: all groups in turn);
- every other column is a feature, in the order given. A row is one example (reshaped to the task's
  ``input_shape`` if it declares one), unless the task sets ``window = (length, stride)``: then rows are time
  steps, cut within each group into windows of shape (features, length); a classification window must not
  span two labels (such windows are skipped), and a regression window's target is its last row's.

``metafleet export-device-data`` writes such a folder from a built-in task's client, to try a deployment with
real data; ``metafleet fleet check`` checks a whole fleet of them.
"""

from __future__ import annotations

import csv
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from metafleet.common.data import ClientData, Split
from metafleet.common.errors import DataError, MetafleetError
from metafleet.common.meta import REGRESSION
from metafleet.common.task import DeviceArrays, Task, TaskError, check_buffers_unchanged, load_task

DATA_FILE, CSV_FILE = "data.npz", "data.csv"
ARRAYS = ("support_x", "support_y", "query_x", "query_y")
CSV_TARGETS = ("label", "target")


def read_device_folder(folder: Path, task: Task | None = None) -> DeviceArrays:
    """The device's four arrays, by the task's reader if it has one, else from data.npz or data.csv."""
    folder = Path(folder)
    if task is not None and task.read_device is not None:
        try:
            arrays = task.read_device(folder)
        except MetafleetError:
            raise
        except Exception as error:  # noqa: BLE001 - the user's reader: one line naming the folder
            raise DataError(f"{folder}: task {task.name}'s read_device failed: {type(error).__name__}: "
                            f"{error}") from None
        if isinstance(arrays, dict):
            missing = [name for name in ARRAYS if name not in arrays]
            if missing:
                raise DataError(f"{folder}: task {task.name}'s read_device returned no {missing}")
            arrays = DeviceArrays(*(np.asarray(arrays[name]) for name in ARRAYS))
        if not isinstance(arrays, DeviceArrays):
            raise DataError(f"{folder}: task {task.name}'s read_device must return a DeviceArrays or a dict of "
                            f"{list(ARRAYS)}, got {type(arrays).__name__}")
        return arrays
    if (folder / DATA_FILE).is_file():
        return read_npz(folder / DATA_FILE)
    if (folder / CSV_FILE).is_file():
        return read_csv(folder / CSV_FILE, task)
    raise DataError(f"device data {folder / DATA_FILE} does not exist (nor {CSV_FILE}); write it with metafleet "
                    "export-device-data, or see metafleet.common.device_data for the format")


def read_npz(path: Path) -> DeviceArrays:
    if not zipfile.is_zipfile(path):
        raise DataError(f"device data {path} is not an .npz archive (corrupt, truncated, or another format)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [name for name in ARRAYS if name not in archive.files]
            if missing:
                raise DataError(f"device data {path} lacks the arrays {missing} (it has {sorted(archive.files)})")
            arrays = {name: archive[name] for name in ARRAYS}
            named = next((str(archive[key]) for key in ("task", "dataset") if key in archive.files), None)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise DataError(f"device data {path} is not a readable .npz file: {error}") from None
    return DeviceArrays(**arrays, task_name=named)


def read_csv(path: Path, task: Task | None) -> DeviceArrays:
    """data.csv as the module docstring describes it."""
    try:
        with open(path, newline="") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"device data {path} is not a readable CSV file: {error}") from None
    if len(rows) < 2:
        raise DataError(f"device data {path} has no data rows")
    header = [name.strip() for name in rows[0]]
    targets = [name for name in CSV_TARGETS if name in header]
    if "group" not in header or len(targets) != 1:
        raise DataError(f"device data {path} needs a 'group' column and one of {list(CSV_TARGETS)}; its header is "
                        f"{header}")
    special = {"group", targets[0], "split"}
    feature_columns = [i for i, name in enumerate(header) if name not in special]
    if not feature_columns:
        raise DataError(f"device data {path} has no feature columns beside {sorted(special & set(header))}")
    groups, labels, splits, features = [], [], [], []
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(header):
            raise DataError(f"device data {path} line {line} has {len(row)} fields, the header {len(header)}")
        record = dict(zip(header, row, strict=True))
        try:
            labels.append(float(record[targets[0]]))
            features.append([float(row[i]) for i in feature_columns])
        except ValueError as error:
            raise DataError(f"device data {path} line {line}: {error}") from None
        groups.append(record["group"])
        splits.append(record.get("split", "").strip().lower())
    label_array = np.asarray(labels)
    regression = task.regression if task is not None else targets[0] == "target"
    if not regression:
        if not np.all(label_array == np.round(label_array)):
            raise DataError(f"device data {path}: column {targets[0]!r} must hold integer class labels")
        label_array = label_array.astype(np.int64)
    else:
        label_array = label_array.astype(np.float32)
    examples = _csv_examples(path, np.asarray(features, dtype=np.float32), label_array, groups, regression,
                             task.window if task is not None else None)
    return _split_by_group(path, examples, splits if any(splits) else None, regression)


def _csv_examples(path, features, labels, groups, regression, window):  # noqa: ANN001, ANN202
    """(x, y, group, row) for every example: a row, or a window of rows within one group."""
    if window is None:
        return [(features[i], labels[i], groups[i], i) for i in range(len(groups))]
    length, stride = window
    examples, order = [], {}
    for i, group in enumerate(groups):
        order.setdefault(group, []).append(i)
    for group, members in order.items():
        for start in range(0, len(members) - length + 1, stride):
            rows = members[start:start + length]
            window_labels = labels[rows]
            if not regression and not np.all(window_labels == window_labels[0]):
                continue
            y = window_labels[-1] if regression else window_labels[0]
            examples.append((features[rows].T.copy(), y, group, rows[0]))
    if not examples:
        raise DataError(f"device data {path}: no group has {length} rows of one label, the task's window length")
    return examples


def _split_by_group(path, examples, splits, regression) -> DeviceArrays:  # noqa: ANN001
    if splits is not None:
        role_of_group: dict[str, str] = {}
        for _, _, group, row in examples:
            role = splits[row]
            if role not in ("support", "query"):
                raise DataError(f"device data {path} line {row + 2}: split must be 'support' or 'query', got {role!r}")
            if role_of_group.setdefault(group, role) != role:
                raise DataError(f"device data {path}: group {group!r} is in both support and query (its windows "
                                "would leak)")
    else:
        first_label: dict[str, float] = {}
        for _, y, group, _ in examples:
            first_label.setdefault(group, 0.0 if regression else float(y))
        dealt: dict[float, int] = {}
        role_of_group = {}
        for group, label in first_label.items():
            turn = dealt.get(label, 0)
            role_of_group[group] = "support" if turn % 2 == 0 else "query"
            dealt[label] = turn + 1
    arrays = {}
    for role in ("support", "query"):
        chosen = [(x, y) for x, y, group, _ in examples if role_of_group[group] == role]
        if not chosen:
            raise DataError(f"device data {path}: no group falls in {role}; a device needs two or more groups (or a "
                            "split column)")
        arrays[f"{role}_x"] = np.stack([x for x, _ in chosen])
        arrays[f"{role}_y"] = np.asarray([y for _, y in chosen])
    return DeviceArrays(**arrays)


def to_client_data(arrays: DeviceArrays, task: Task, client_id: int, where: str,
                   num_classes: int | None = None, augment=None) -> ClientData:  # noqa: ANN001
    """The device's ClientData, with dtypes checked: class labels integer, regression targets float."""
    def batch(role: str) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = np.asarray(getattr(arrays, f"{role}_x")), np.asarray(getattr(arrays, f"{role}_y"))
        if x.dtype.kind not in "fiub" or y.dtype.kind not in "fiub":
            raise DataError(f"{where}: {role}_x and {role}_y must be numeric arrays, got {x.dtype} and {y.dtype}")
        if task.objective.class_targets and y.dtype.kind not in "iub":
            raise DataError(f"{where}: {role}_y must hold integer class labels for task {task.name}, got {y.dtype}")
        if not task.objective.class_targets and y.dtype.kind != "f":
            raise DataError(f"{where}: {role}_y must hold float targets for regression task {task.name}, got "
                            f"{y.dtype}")
        inputs = x.astype(np.int64) if x.dtype.kind in "iub" else x.astype(np.float32)
        targets = y.astype(np.int64) if task.objective.class_targets else y.astype(np.float32)
        return torch.from_numpy(np.ascontiguousarray(inputs)), torch.from_numpy(np.ascontiguousarray(targets))

    return ClientData(client_id, (Split(batch("support"), batch("query")),), num_classes,
                      sampling=task.sampling, augment=augment)


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
    """The device's ClientData, or the first of its problems as a ``DataError``. With ``model``, also checks
    that the model takes the data and fits the objective (a ``TaskError`` where not); without, the caller has
    checked the model against this input shape and class count already (a fleet does, once)."""
    input_shape = input_shape or task.input_shape or tuple(np.asarray(arrays.support_x).shape[1:])
    if task.objective.class_targets and num_classes is None:
        if model is None:
            raise ValueError("check_device needs num_classes or the model")
        num_classes = task.num_classes or output_size(model, input_shape,
                                                      np.asarray(arrays.support_x).dtype.kind in "iub", task.name)
    problems = device_problems(task, arrays, where, input_shape, num_classes)
    if problems:
        raise DataError(problems[0])
    data = to_client_data(arrays, task, client_id, where, num_classes, augment)
    if model is not None:
        check_model_fits(task, model, data.splits[0].support, where)
    data.validate(input_shape)
    return data


def load_device_data(folder: Path, client_id: int = 0, task: Task | str | None = None,
                     head_ways: int = 0) -> tuple[str, ClientData]:
    """(task name, the device's validated ClientData) of a deployed device; ``DataError`` naming the file and
    the problem. Without ``task``, the file must name a built-in task. ``head_ways``: the run's head size."""
    folder = Path(folder)
    if isinstance(task, str):
        task = load_task(task)
    arrays = read_device_folder(folder, task)
    if task is None:
        if arrays.task_name is None:
            raise DataError(f"device data in {folder} names no task; give the task (--task TASK)")
        try:
            task = load_task(arrays.task_name)
        except TaskError:
            raise DataError(f"device data in {folder} names task {arrays.task_name!r}, which is not a built-in task; "
                            "give the task (--task TASK)") from None
    elif arrays.task_name is not None and arrays.task_name != task.name:
        raise DataError(f"device data in {folder} is for task {arrays.task_name!r}; this device runs {task.name!r}")
    data = check_device(task, arrays, str(folder), client_id, model=task.make_model(head_ways))
    return task.name, data


def save_device_data(folder: Path, task_name: str, data: ClientData, split: int = 0) -> Path:
    """Write one split of a client's data in the device format; refuses to overwrite."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / DATA_FILE
    if path.exists():
        raise DataError(f"{path} exists; remove it first")
    chosen = data.splits[split]
    np.savez(
        path, task=np.array(task_name),
        support_x=chosen.support[0].numpy(), support_y=chosen.support[1].numpy(),
        query_x=chosen.query[0].numpy(), query_y=chosen.query[1].numpy(),
    )
    return path
