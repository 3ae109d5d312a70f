"""A deployed device's own data: one file, ``DIR/data.npz``, checked before the device connects.

The file holds five arrays:
- ``dataset``: the name of the built-in data set whose model the device trains (e.g. ``"watch"``): it fixes
  the input shape and the classes;
- ``support_x``, ``support_y``: what the device adapts on (its recent, labelled data);
- ``query_x``, ``query_y``: what it measures on. Support and query must come from different recordings
  (overlapping sensor windows would leak), so the device's owner makes the split.

``x`` arrays are float32 of the model's input shape (watch: N × 6 × 100, six accelerometer and gyroscope
channels of 100 samples, in the left-wrist frame: a watch on the right wrist mirrors its raw windows with
``metafleet.common.watch.to_left_wrist`` before standardizing them); ``y`` arrays are integer labels
(classification) or float32 targets (regression).
``metafleet export-device-data`` writes such a folder from a built-in data set's client, to try a
deployment with real data.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import torch

from metafleet.common.data import ClientData, Split
from metafleet.common.errors import ConfigError, DataError

DATA_FILE = "data.npz"
ARRAYS = ("dataset", "support_x", "support_y", "query_x", "query_y")


def load_device_data(folder: Path, client_id: int = 0) -> tuple[str, ClientData]:
    """(data set name, the device's validated ClientData); ``DataError`` naming the file and the problem."""
    from metafleet.common.fleets import fleet_class

    path = Path(folder) / DATA_FILE
    if not path.is_file():
        raise DataError(f"device data {path} does not exist (write it with metafleet export-device-data, or see "
                        "metafleet.common.device_data for the format)")
    if not zipfile.is_zipfile(path):
        raise DataError(f"device data {path} is not an .npz archive (corrupt, truncated, or another format)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [name for name in ARRAYS if name not in archive.files]
            if missing:
                raise DataError(f"device data {path} lacks the arrays {missing} (it has {sorted(archive.files)})")
            arrays = {name: archive[name] for name in ARRAYS}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise DataError(f"device data {path} is not a readable .npz file: {error}") from None
    dataset = str(arrays["dataset"])
    try:
        fleet = fleet_class(dataset)
    except ConfigError:
        raise DataError(f"device data {path} names data set {dataset!r}, which metafleet does not know") from None
    regression = fleet.objective.metric_name == "mse"

    def batch(role: str) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = arrays[f"{role}_x"], arrays[f"{role}_y"]
        if x.dtype.kind != "f" or (y.dtype.kind != "f" if regression else y.dtype.kind not in "iu"):
            raise DataError(f"device data {path}: {role}_x must be float and {role}_y "
                            f"{'float' if regression else 'integer'}, got {x.dtype} and {y.dtype}")
        labels = y.astype(np.float32 if regression else np.int64)
        return torch.from_numpy(x.astype(np.float32)), torch.from_numpy(labels)

    num_classes = fleet.num_classes
    if num_classes is None and not regression:
        labels = np.concatenate([arrays["support_y"], arrays["query_y"]])
        num_classes = int(labels.max()) + 1 if labels.size else 0
    data = ClientData(client_id, (Split(batch("support"), batch("query")),), num_classes, sampling=fleet.sampling)
    try:
        data.validate(fleet.input_shape)
    except DataError as error:
        raise DataError(f"device data {path}: {error}") from None
    return dataset, data


def save_device_data(folder: Path, dataset: str, data: ClientData, split: int = 0) -> Path:
    """Write one split of a client's data in the device format; refuses to overwrite."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / DATA_FILE
    if path.exists():
        raise DataError(f"{path} exists; remove it first")
    chosen = data.splits[split]
    np.savez(
        path, dataset=np.array(dataset),
        support_x=chosen.support[0].numpy(), support_y=chosen.support[1].numpy(),
        query_x=chosen.query[0].numpy(), query_y=chosen.query[1].numpy(),
    )
    return path
