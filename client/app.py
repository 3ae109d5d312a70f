"""The metafleet ClientApp: the same code on a simulated device and on a real one (Flower SuperNode).

Handlers:
- ``query``: who this device is (client id, training or held-out, example count), asked once at start;
- ``train``: the configured algorithm's local update from the received θ; the pseudo-gradient travels in
  the ArrayRecord (the payload secure aggregation masks), never in metrics;
- ``evaluate``: personalization on a held-out device: the query metric after each number of adaptation
  steps. Nothing of the device's data leaves it, only these numbers.
"""

from __future__ import annotations

import logging
from functools import lru_cache

import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from metafleet.common.config import RunConfig
from metafleet.common.data import ClientData, Fleet
from metafleet.common.errors import DataError
from metafleet.common.fleets import make_fleet, split_clients
from metafleet.common.meta import FunctionalModel, check_update
from metafleet.common.records import from_array_record, to_array_record
from metafleet.common.training import client_personalization, client_train

log = logging.getLogger("metafleet.client")
app = ClientApp()


@lru_cache(maxsize=4)
def _fleet(config: RunConfig) -> Fleet:
    # A simulated device builds its partition of the fleet once per process, not once per message.
    return make_fleet(config)


@lru_cache(maxsize=4)
def _functional_model(config: RunConfig) -> FunctionalModel:
    fleet = _fleet(config)
    return FunctionalModel(fleet.make_model(config.ways), fleet.objective)


@lru_cache(maxsize=4)
def _reference_params(config: RunConfig) -> dict[str, torch.Tensor]:
    # Only names, shapes and dtypes matter: what a received θ is checked against.
    return _functional_model(config).init_params()


@lru_cache(maxsize=4)
def _held_out(config: RunConfig) -> frozenset[int]:
    # Once per process, not per message: split_clients walks the whole fleet (10,000 clients in simulation).
    return frozenset(split_clients(config)[1])


@lru_cache(maxsize=4)
def _client_data(config: RunConfig, client_id: int) -> ClientData:
    # Built and validated once per process: a device answers many messages of one run.
    return _fleet(config).client(client_id)


class Device:
    """What one device knows: the run's config, its own data, and whether it is held out."""

    def __init__(self, context: Context):
        self.config = RunConfig.from_run_config(dict(context.run_config))
        if "partition-id" not in context.node_config:
            raise DataError("this node has no 'partition-id' in its node config (--node-config \"partition-id=N\")")
        self.client_id = int(context.node_config["partition-id"])
        self.fleet = _fleet(self.config)
        self.fleet.check_client_id(self.client_id)
        self.held_out = self.client_id in _held_out(self.config)
        self.fmodel = _functional_model(self.config)

    @property
    def data(self) -> ClientData:
        return _client_data(self.config, self.client_id)

    def received_params(self, msg: Message) -> dict[str, torch.Tensor]:
        params = from_array_record(msg.content["arrays"])
        try:
            check_update(params, _reference_params(self.config))
        except ValueError as error:
            raise ValueError(f"client {self.client_id} received unusable parameters: {error}") from None
        return params


@app.query()
def query(msg: Message, context: Context) -> Message:
    device = Device(context)
    info = ConfigRecord(
        {
            "client-id": device.client_id,
            "role": "held-out" if device.held_out else "train",
            "num-examples": sum(len(s.support[0]) + len(s.query[0]) for s in device.data.splits),
        }
    )
    return Message(RecordDict({"info": info}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    device = Device(context)
    if device.held_out:
        raise RuntimeError(f"client {device.client_id} is held out for evaluation and never trains")
    params = device.received_params(msg)
    server_round = int(msg.content["config"]["server-round"])
    rng = np.random.default_rng([device.config.seed, server_round, device.client_id])
    update = client_train(device.fmodel, params, device.data, device.config, rng)
    # Never send a broken update: the server would drop it, and under SecAgg+ a NaN would poison the sum.
    check_update(update.pseudo_grad, params)
    metrics = MetricRecord({"num-examples": update.num_examples, **update.metrics})
    return Message(RecordDict({"arrays": to_array_record(update.pseudo_grad), "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    device = Device(context)
    params = device.received_params(msg)
    curve, guarded = client_personalization(device.fmodel, params, device.data, device.config)
    metrics = {"num-examples": 1, "client-id": device.client_id}
    for step, plain_value, guarded_value in zip(device.config.eval_steps, curve, guarded, strict=True):
        metrics[f"step-{step}"] = plain_value
        metrics[f"guarded-step-{step}"] = guarded_value
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
