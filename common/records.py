"""Conversion between parameter dicts and Flower records: the only module of common that imports flwr."""

from __future__ import annotations

from collections import OrderedDict

from flwr.app import ArrayRecord

from metafleet.common.meta import Params


def to_array_record(params: Params) -> ArrayRecord:
    return ArrayRecord(OrderedDict((name, tensor.detach().contiguous()) for name, tensor in params.items()))


def from_array_record(record: ArrayRecord) -> Params:
    return dict(record.to_torch_state_dict())


def record_nbytes(record: ArrayRecord) -> int:
    """Bytes of array payload a record carries on the wire (what bytes_up / bytes_down count)."""
    return sum(len(array.data) for array in record.values())
