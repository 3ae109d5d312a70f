"""Conversion between parameter dicts and Flower records: the only module of common that imports flwr."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from io import BytesIO

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

from metafleet.common.meta import Params

# The query action that hands a device the run's final meta-model (message type "query.keep_model").
KEEP_MODEL_ACTION = "keep_model"

# Array.stype of arrays held as .npy bytes (Flower's SType.NUMPY).
NUMPY_STYPE = "numpy.ndarray"


def to_array_record(params: Mapping[str, torch.Tensor | np.ndarray]) -> ArrayRecord:
    return ArrayRecord(array_dict=OrderedDict((name, to_array(tensor)) for name, tensor in params.items()))


def to_array(tensor: torch.Tensor | np.ndarray) -> Array:
    """The Array ``Array.from_numpy_ndarray`` makes, byte for byte (tests/test_records.py pins it), without its
    ``np.save`` per array: the .npy header depends only on dtype and shape, so it is written once per pair.
    ``np.save`` was 0.14 ms an array, about a quarter of a profiled vectorized round."""
    if isinstance(tensor, torch.Tensor):
        tensor = tensor.detach().cpu().numpy()
    # Only when needed: np.ascontiguousarray would make a 0-d array 1-d.
    value = tensor if tensor.flags.c_contiguous else np.ascontiguousarray(tensor)
    header = _npy_header(value.dtype.str, value.shape)
    return Array(dtype=str(value.dtype), shape=tuple(value.shape), stype=NUMPY_STYPE, data=header + value.tobytes())


@lru_cache(maxsize=1024)
def _npy_header(dtype: str, shape: tuple[int, ...]) -> bytes:
    buffer = BytesIO()
    like = np.zeros(shape, dtype=np.dtype(dtype))
    np.save(buffer, like, allow_pickle=False)
    data = buffer.getvalue()
    return data[:len(data) - like.nbytes]


def from_array_record(record: ArrayRecord) -> Params:
    return {name: torch.from_numpy(_numpy(array)) for name, array in record.items()}


def numpy_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The record's arrays as numpy arrays (each its own copy)."""
    return {name: _numpy(array) for name, array in record.items()}


@dataclass(frozen=True)
class TrainingReply:
    """A device's plain training reply in the server's terms: the node that sent it, the arrays it sends (its
    update, or the update's compressed form: ``client.app.plain_training_content``) and its metrics,
    ``num-examples`` among them.

    A reply Message becomes one at the strategy's boundary. The vectorized simulation hands the server these
    directly: its devices' replies are then neither packed into Flower records nor parsed back, which was
    most of what a round of small updates cost (pfl-research's "simulation without message passing"); the
    server's checks from the arrays on are the same code, and the grid counts the bytes its Message would have
    had (``reply_content_bytes``)."""

    node: int
    arrays: dict[str, np.ndarray]
    metrics: dict[str, int | float]


def reply_content_bytes(arrays: Mapping[str, np.ndarray], metrics: Mapping[str, int | float]) -> int:
    """``recorddict_to_proto(RecordDict({"arrays": ..., "metrics": ...})).ByteSize()`` of a plain training reply,
    without building it (tests/test_records.py compares the two). A RecordDict is a repeated field of
    records, so its size is the sum of its records'; an array record's size depends only on its arrays'
    names, dtypes and shapes, a metric record's only on its keys and its integers' values (varints): a float
    is a fixed 8-byte double, so every float counts as 0.0. Each is computed once per such signature."""
    array_key = tuple((name, value.dtype.str, value.shape) for name, value in arrays.items())
    metric_key = tuple((name, tuple(map(_size_alike, value)) if isinstance(value, list) else _size_alike(value))
                       for name, value in metrics.items())
    return _array_record_bytes(array_key) + _metric_record_bytes(metric_key)


def _size_alike(value: int | float) -> int | float:
    """An integer as it is (a varint's size depends on it), a float as 0.0 (a double is 8 bytes whatever it holds)."""
    return value if isinstance(value, int) else 0.0


@lru_cache(maxsize=4096)
def _array_record_bytes(signature: tuple[tuple[str, str, tuple[int, ...]], ...]) -> int:
    like = {name: np.zeros(shape, dtype=np.dtype(dtype)) for name, dtype, shape in signature}
    return recorddict_to_proto(RecordDict({"arrays": to_array_record(like)})).ByteSize()


@lru_cache(maxsize=4096)
def _metric_record_bytes(signature: tuple[tuple[str, int | float | tuple], ...]) -> int:
    like = MetricRecord({name: list(value) if isinstance(value, tuple) else value for name, value in signature})
    return recorddict_to_proto(RecordDict({"metrics": like})).ByteSize()


def _numpy(array: Array) -> np.ndarray:
    """The array, read straight from its .npy bytes when they hold a plain C-order array of the dtype and
    shape the record declares. ``Array.numpy()`` parses each .npy header with ``ast`` (0.15 ms an array),
    which was half of the server's time to validate a round of small replies."""
    data = array.data
    # Arrays converted from Flower's legacy Parameters (SecAgg+'s path) declare no dtype: numpy reads those.
    declared = bool(array.dtype) and array.stype == NUMPY_STYPE
    if declared and data[:6] == b"\x93NUMPY" and data[6:7] in (b"\x01", b"\x02", b"\x03"):
        start = 10 + int.from_bytes(data[8:10], "little") if data[6] == 1 else 12 + int.from_bytes(data[8:12], "little")
        header = data[:start]
        dtype = np.dtype(array.dtype)
        count = int(np.prod(array.shape, dtype=np.int64))
        if b"'fortran_order': False" in header and len(data) - start == count * dtype.itemsize:
            descr = dtype.newbyteorder("<") if dtype.byteorder not in ("|", "=") else dtype
            if repr(descr.str).encode() in header:
                return np.frombuffer(data, dtype=descr, count=count, offset=start).reshape(array.shape).copy()
    value = array.numpy()
    return value if value.dtype.isnative else value.astype(value.dtype.newbyteorder("="))
