"""Parameter dicts to Flower records and back: exact, for every dtype, and through the slow path too."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from metafleet.common.records import from_array_record, reply_content_bytes, to_array, to_array_record


def test_round_trip_is_exact_for_every_dtype_and_shape():
    params = {
        "w": torch.randn(7, 5), "b": torch.randn(5), "scalar": torch.tensor(2.5), "steps": torch.arange(4),
        "double": torch.randn(2, 3, dtype=torch.float64), "half": torch.randn(3).half(), "empty": torch.zeros(0, 4),
    }
    back = from_array_record(to_array_record(params))
    assert list(back) == list(params)
    for name, tensor in params.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name


def test_arrays_the_fast_reader_does_not_take_are_read_by_numpy():
    fortran = np.asfortranarray(np.arange(12, dtype=np.float32).reshape(3, 4))
    big_endian = np.arange(6, dtype=">i4").reshape(2, 3)
    record = ArrayRecord({"fortran": Array(fortran), "big-endian": Array(big_endian)})
    back = from_array_record(record)
    assert np.array_equal(back["fortran"].numpy(), fortran)
    assert np.array_equal(back["big-endian"].numpy(), big_endian.astype("<i4"))


def test_arrays_of_legacy_parameters_without_a_declared_dtype_are_read():
    import flwr.compat.common.recorddict_compat as compat
    from flwr.common import ndarrays_to_parameters

    values = [np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1.5, -2.0], dtype=np.float64)]
    record = compat.parameters_to_arrayrecord(ndarrays_to_parameters(values), keep_input=True)
    back = list(from_array_record(record).values())
    assert all(np.array_equal(b.numpy(), v) and b.numpy().dtype == v.dtype for b, v in zip(back, values, strict=True))


@pytest.mark.parametrize("tensor", [
    torch.randn(40, 1), torch.zeros(()), torch.arange(5), torch.ones(0, 3), torch.rand(3, 4).double(),
    torch.tensor([True, False]), torch.randn(4, 5).t(), torch.randn(2, 3).half(),
])
def test_to_array_writes_flowers_own_bytes(tensor):
    # Pins records.to_array to Flower's serialization: fails if Array.from_numpy_ndarray changes its format.
    ours = to_array(tensor)
    flowers = Array.from_numpy_ndarray(tensor.detach().contiguous().numpy())
    fields = ("dtype", "shape", "stype", "data")
    assert [getattr(ours, f) for f in fields] == [getattr(flowers, f) for f in fields]
    assert torch.equal(from_array_record(ArrayRecord(array_dict={"x": ours}))["x"], tensor.contiguous())


@pytest.mark.parametrize("arrays, metrics", [
    ({"w": np.zeros((40, 40), np.float32), "b": np.ones(40, np.float32)},
     {"num-examples": 15, "loss-before": 2.5, "loss-after": 0.0}),
    ({"w": np.zeros((3,), np.float64)}, {"num-examples": 1}),
    ({"w": np.zeros((3,), np.float64)}, {"num-examples": 10**12, "negative": -300}),
    ({"q8-codes": np.arange(100, dtype=np.uint8), "q8-range": np.zeros((2, 2), np.float32),
      "sent": np.array([1, 0, 1], np.uint8)}, {"num-examples": 300, "loss-after": float("nan")}),
    ({"scalar": np.float32(1.5) * np.ones((), np.float32), "empty": np.zeros((0, 4), np.int64)}, {}),
    ({"w": np.zeros((2,), np.float32)}, {"num-examples": 7, "curve": [0.5, 1e300], "counts": [1, -2, 2**40]}),
])
def test_reply_content_bytes_is_the_size_of_the_reply_flower_would_serialize(arrays, metrics):
    from flwr.app import MetricRecord, RecordDict

    from metafleet.server.grid import content_bytes
    from tests.flower_messages import reply_from

    for _ in range(2):  # computed, then from the caches
        message = reply_from(3, RecordDict({"arrays": to_array_record(arrays), "metrics": MetricRecord(metrics)}))
        assert reply_content_bytes(arrays, metrics) == content_bytes(message)
