"""Devices that compute on a GPU (a Jetson's, or a simulation's): the same replies as on the CPU.

Runs where torch sees a CUDA device; CI has none, and tests/test_client_app.py checks there that asking for
one gives a clear error.
"""

import pytest
import torch
from flwr.app import ConfigRecord, MessageType, RecordDict

from metafleet.client import app as client_app
from metafleet.common.config import RunConfig
from metafleet.common.fleets import split_clients
from metafleet.common.records import from_array_record, to_array_record
from metafleet.server.app import initial_params
from tests.flower_messages import device_context, instruction

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (none on this machine)")


# Seen on an H100 (torch 2.11, cuDNN): second-order MAML through the conv net gave a meta-gradient 29% away
# (relative L2) from the CPU's, while first-order methods and MAML through the LSTM (cuDNN off) agreed. Not
# yet explained; kept visible here rather than dropped.
MAML_CONV_ON_CUDA = pytest.param(
    "omniglot", "maml", marks=pytest.mark.xfail(reason="second-order MAML through the conv net differs on CUDA"))


@pytest.mark.parametrize(("dataset", "algorithm"), [MAML_CONV_ON_CUDA, ("omniglot", "reptile"),
                                                    ("shakespeare", "maml"), ("shakespeare", "fomaml"),
                                                    ("sinusoid", "fedavg")])
def test_cuda_device_replies_match_the_cpu(dataset, algorithm):
    config = RunConfig.resolve(dataset=dataset, algorithm=algorithm, inner_steps=2, eval_steps=(0, 2))
    training, held_out = split_clients(config)
    params = initial_params(config)
    train = instruction(RecordDict({"arrays": to_array_record(params), "config": ConfigRecord({"server-round": 1})}))
    evaluate = instruction(RecordDict({"arrays": to_array_record(params), "config": ConfigRecord({})}),
                           MessageType.EVALUATE)
    replies = {}
    # TF32 would move an untrained model's near-tied logits across each other: compare in full float32.
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    for device in ("cpu", "cuda"):
        context = device_context(training[0], config.to_run_config())
        context.node_config["torch-device"] = device
        update = from_array_record(client_app.train(train, context).content["arrays"])
        context = device_context(held_out[0], config.to_run_config())
        context.node_config["torch-device"] = device
        replies[device] = (update, dict(client_app.evaluate(evaluate, context).content["metrics"]))
    (cpu_update, cpu_metrics), (gpu_update, gpu_metrics) = replies["cpu"], replies["cuda"]
    assert all(t.device.type == "cpu" for t in gpu_update.values())
    difference = sum(float(((gpu_update[n] - v) ** 2).sum()) for n, v in cpu_update.items()) ** 0.5
    size = sum(float((v**2).sum()) for v in cpu_update.values()) ** 0.5
    assert difference <= 1e-2 * size
    for key in ("step-0", "step-2"):
        assert abs(gpu_metrics[key] - cpu_metrics[key]) <= 0.05 * max(1.0, abs(cpu_metrics[key])), (key, gpu_metrics,
                                                                                                  cpu_metrics)
