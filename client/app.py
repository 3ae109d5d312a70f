"""The metafleet ClientApp: the same code on a simulated device and on a real one (Flower SuperNode).

Handlers:
- ``query``: who this device is (client id, training or held-out, example count, the fingerprint of its
  model), asked once at start;
- ``train``: the configured algorithm's local update from the received θ; the pseudo-gradient travels in
  the ArrayRecord (the payload secure aggregation masks), never in metrics. Under secure aggregation,
  Flower's ``secaggplus_mod`` masks it and the handler speaks the legacy record keys the mod expects
  (``fitins.*`` in, ``fitres.*`` out);
- ``evaluate``: personalization on a held-out device: the query metric after each number of adaptation
  steps. Nothing of the device's data leaves it, only these numbers;
- ``query.keep_model``: the run's final meta-model; a deployed device writes it and its personalized model
  (adapted on its support set, kept only if the on-device guard says so) into its data folder, where
  ``metafleet predict`` finds them.
"""

from __future__ import annotations

import importlib
import logging
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import flwr.compat.common.recorddict_compat as compat
import numpy as np
import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from metafleet.common.compression import encode
from metafleet.common.config import RunConfig
from metafleet.common.data import ClientData, Fleet
from metafleet.common.device_data import load_device_data
from metafleet.common.errors import DataError, MetafleetError
from metafleet.common.finetune import FINETUNES_KEY, METRIC_PREFIXES
from metafleet.common.fleets import functional_model, make_fleet, split_clients
from metafleet.common.meta import FunctionalModel, LocalUpdate, Params, check_update, global_norm, meta_parameters
from metafleet.common.privacy import clip_to_norm, clip_values, distributed_dp_share
from metafleet.common.records import KEEP_MODEL_ACTION, from_array_record, to_array_record
from metafleet.common.secure_masks import FLOWER_GENERATOR, MASK_GENERATOR, MASK_GENERATOR_KEY, bind
from metafleet.common.selective import SENT_KEY, select_layers, sent_flags
from metafleet.common.task import fingerprint
from metafleet.common.training import client_finetuning, client_train, training_rng

log = logging.getLogger("metafleet.client")
CPU = torch.device("cpu")
TORCH_DEVICE_KEY = "torch-device"
TORCH_DEVICE_ENV = "METAFLEET_TORCH_DEVICE"
# The record keys of Flower's legacy FitIns, which SecAgg+'s workflow sends.
LEGACY_PARAMS, LEGACY_CONFIG = "fitins.parameters", "fitins.config"
# A device may insist on one aggregation mode: node config "secure-aggregation=true" (its update never
# leaves unmasked) or "=false"; without the key it follows the server.
NODE_SECURE_AGGREGATION = "secure-aggregation"
# A deployed device's own task (its copy of the task file, or a module), in place of the server's path.
NODE_TASK = "task"
# Where a device keeps what top-k compression left out of its last update (error feedback).
RESIDUAL_RECORD = "metafleet-topk-residual"
# Where a device keeps each layer's change since it last sent that layer (--selective-layers).
UNSENT_LAYERS_RECORD = "metafleet-unsent-layers"


# The device's SecAgg+ masks come from metafleet's generator (metafleet.common.secure_masks), not Flower's.
# Its masked vector travels as 32-bit words where the modulus allows (half of Flower's int64 upload), and its
# pairwise secret key is Shamir-shared as a raw scalar (a fifth of Flower's PEM's chunks).
bind(importlib.import_module("flwr.client.mod.secure_aggregation.secaggplus_mod"),
     ("pseudo_rand_gen", "ndarray_to_bytes", "create_shares", "bytes_to_private_key", "private_key_to_bytes"))


class AggregationModeError(MetafleetError):
    """The server and this device disagree on secure aggregation."""


def secure_aggregation_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Routes SecAgg+ training messages through Flower's ``secaggplus_mod`` and refuses a mode mismatch
    loudly: without this, a secure client facing a plain server (or the reverse) fails with a KeyError deep
    in the mod, or the run "finishes" having trained nothing."""
    if msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    server_secure = RECORD_KEY_CONFIGS in msg.content.config_records
    required = _device_secure_aggregation(context)
    if required is True and not server_secure:
        raise AggregationModeError(
            "this device is set up for secure aggregation (node config secure-aggregation=true) but the server "
            "sent a plain training request; its update would reach the server unmasked, so it stays on the "
            "device. Run the server with --secure-aggregation."
        )
    if required is False and server_secure:
        raise AggregationModeError(
            "the server runs secure aggregation (SecAgg+) but this device is set up without it (node config "
            "secure-aggregation=false); restart the device without that setting to take part."
        )
    if not server_secure:
        return call_next(msg, context)
    configs = msg.content.config_records[RECORD_KEY_CONFIGS]
    setup = configs.get(Key.STAGE) == Stage.SETUP
    if setup and configs.get(MASK_GENERATOR_KEY) != MASK_GENERATOR:
        raise AggregationModeError(
            f"the server's SecAgg+ masks come from {configs.get(MASK_GENERATOR_KEY) or FLOWER_GENERATOR}, this "
            f"device's from {MASK_GENERATOR}: they would not cancel, so this device takes no part; run the same "
            "metafleet on the server and the devices")
    return secaggplus_mod(msg, context, call_next)


def _device_secure_aggregation(context: Context) -> bool | None:
    value = context.node_config.get(NODE_SECURE_AGGREGATION)
    if value is None or isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text not in ("true", "false"):
        raise AggregationModeError(f"node config secure-aggregation must be true or false, got {value!r}")
    return text == "true"


app = ClientApp(mods=[secure_aggregation_mod])


@lru_cache(maxsize=4)
def _fleet(config: RunConfig) -> Fleet:
    # A simulated device builds its partition of the fleet once per process, not once per message.
    return make_fleet(config)


@lru_cache(maxsize=4)
def _functional_model(config: RunConfig, device: torch.device = CPU) -> FunctionalModel:
    return functional_model(config, device)  # built from the class alone: a deployed device has no data set


@lru_cache(maxsize=4)
def _reference_params(config: RunConfig) -> dict[str, torch.Tensor]:
    # Only names, shapes and dtypes matter: what a received θ (with meta-sgd's rates) is checked against, on the host.
    return meta_parameters(config.algorithm, _functional_model(config).init_params(), config.inner_lr)


@lru_cache(maxsize=4)
def _fingerprint(config: RunConfig) -> str:
    return fingerprint(_functional_model(config).module)


@lru_cache(maxsize=16)
def _config(run_config: tuple, task: str | None) -> RunConfig:
    # Resolved once per process and run: every message of a run carries the same run config.
    return RunConfig.from_run_config(dict(run_config), task=task)


def torch_device(context: Context) -> torch.device:
    """Where this device computes: node config ``torch-device``, else $METAFLEET_TORCH_DEVICE, else the CPU.

    A Jetson runs its adaptation on its GPU with ``cuda``; messages and checks stay on the host either way.
    """
    return resolve_torch_device(str(context.node_config.get(TORCH_DEVICE_KEY, os.environ.get(TORCH_DEVICE_ENV, "cpu"))))


def resolve_torch_device(name: str) -> torch.device:
    """The torch device ``name`` names, if this machine has it; else a ``MetafleetError`` saying why not."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise MetafleetError(f"torch device {name!r} (node config {TORCH_DEVICE_KEY} or ${TORCH_DEVICE_ENV}) is not "
                             "a device name torch knows; use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MetafleetError(f"torch device {name!r} was asked for, but this torch ({torch.__version__}) sees no "
                             "CUDA device; install the platform's CUDA build of torch or use cpu")
    return device


@lru_cache(maxsize=4)
def _head_names(config: RunConfig) -> frozenset[str]:
    # Asked only where an evaluation names head-only fine-tuning: a task whose head cannot be told fails
    # there, with the task's error, not in every run.
    return config.task_definition.head_names(_functional_model(config).module)


@lru_cache(maxsize=4)
def _held_out(config: RunConfig) -> frozenset[int]:
    # Once per process, not per message: split_clients walks the whole fleet (10,000 clients in simulation).
    return frozenset(split_clients(config)[1])


class _ClientDataCache:
    """Simulated devices' data, built and validated once per process while it fits: a simulation's process
    answers for many devices (every one in-process, many per Ray worker), and rebuilding a device's data each
    time it was sampled was a fifth of a vectorized sinusoid round. Bounded by tensor bytes and by devices
    (a sinusoid device's objects weigh more than its 800 bytes of tensors), least recently used out first."""

    def __init__(self, max_bytes: int, max_devices: int):
        self.max_bytes, self.max_devices = max_bytes, max_devices
        self._entries: OrderedDict[tuple[RunConfig, int], tuple[ClientData, int]] = OrderedDict()
        self._bytes = 0

    def get(self, config: RunConfig, client_id: int) -> ClientData:
        key = (config, client_id)
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            return entry[0]
        data = _fleet(config).client(client_id)
        size = sum(t.nbytes for split in data.splits for batch in (split.support, split.query) for t in batch)
        self._entries[key] = (data, size)
        self._bytes += size
        while len(self._entries) > 1 and (self._bytes > self.max_bytes or len(self._entries) > self.max_devices):
            _, (_, freed) = self._entries.popitem(last=False)
            self._bytes -= freed
        return data


_CLIENT_DATA = _ClientDataCache(max_bytes=128 * 2**20, max_devices=20_000)


def _client_data(config: RunConfig, client_id: int) -> ClientData:
    return _CLIENT_DATA.get(config, client_id)


class Device:
    """What one device knows: the run's config, its own data, and whether it is held out.

    A simulated device is a member of the run's fleet (node config ``partition-id``); a deployed one reads
    its own folder (node config ``data-dir``, ``client-id``, ``role`` = train or held-out, and ``task``, its
    own copy of a user task), written by ``metafleet client``.
    """

    def __init__(self, context: Context):
        node = context.node_config
        own_task = str(node[NODE_TASK]) if node.get(NODE_TASK) else None
        self.config = _config(tuple(sorted(context.run_config.items())), own_task)
        self.data_dir = Path(str(node["data-dir"])) if "data-dir" in node else None
        self.torch_device = torch_device(context)
        self.fmodel = _functional_model(self.config, self.torch_device)
        if "data-dir" in node:
            self.client_id = int(node.get("client-id", 0))
            role = str(node.get("role", "train"))
            if role not in ("train", "held-out"):
                raise DataError(f"node config role must be 'train' or 'held-out', got {role!r}")
            self.held_out = role == "held-out"
            _, self._data = load_device_data(self.data_dir, self.client_id, self.config.task_definition,
                                             self.config.head_ways)
            return
        if "partition-id" not in node:
            raise DataError("this node has neither 'data-dir' (a device) nor 'partition-id' (a simulated device) "
                            "in its node config")
        self.client_id = int(node["partition-id"])
        fleet = _fleet(self.config)
        fleet.check_client_id(self.client_id)
        self.held_out = self.client_id in _held_out(self.config)
        self._data = None

    @property
    def data(self) -> ClientData:
        return self._data if self._data is not None else _client_data(self.config, self.client_id)

    def on_device(self, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: t.to(self.torch_device) for name, t in params.items()}

    def received_params(self, msg: Message) -> dict[str, torch.Tensor]:
        """θ from the server, checked against the model (on the host)."""
        if LEGACY_PARAMS in msg.content.array_records:
            # The legacy record numbers the arrays; their order is the model's.
            arrays = list(from_array_record(msg.content[LEGACY_PARAMS]).values())
            names = list(_reference_params(self.config))
            if len(arrays) != len(names):
                raise ValueError(f"client {self.client_id} received {len(arrays)} arrays, the model has {len(names)}")
            params = dict(zip(names, arrays, strict=True))
        else:
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
            "fingerprint": _fingerprint(device.config),
            "task": device.config.dataset,
            "mask-generator": MASK_GENERATOR,
        }
    )
    return Message(RecordDict({"info": info}), reply_to=msg)


@app.query(KEEP_MODEL_ACTION)
def keep_model(msg: Message, context: Context) -> Message:
    """The run's final meta-model: a deployed device keeps it and its personal model; a simulated one has no
    folder of its own and only acknowledges."""
    from metafleet.client.personalize import keep_final_models

    device = Device(context)
    params = device.received_params(msg)
    written: dict[str, object] = {"kept": False}
    if device.data_dir is not None:
        written = keep_final_models(device.config, device.fmodel, device.on_device(params), device.data,
                                    device.data_dir)
    return Message(RecordDict({"info": ConfigRecord(written)}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    return train_reply(msg, context, Device(context))


# What a simulated attacker changes (metafleet.simulations.attacks): the data it trains on, and what it does
# to its update before sending. Only Python code in the simulation's process reaches these; no node config,
# run config or flag of a device does.
Tamper = Callable[[Params], Params]


def train_reply(msg: Message, context: Context, device: Device, data: ClientData | None = None,
                tamper: Tamper | None = None, update: LocalUpdate | None = None,
                params: Params | None = None) -> Message:
    """The train handler's work: the local update from the received θ, checked, clipped where the run says
    so, compressed where it says so (plain path), and packed for the plain or the secure (SecAgg+) path.
    ``update`` and ``params``: the local update and the received θ (checked), where the caller has them
    already (the vectorized simulation computes a round's updates at once, from one θ)."""
    if LEGACY_PARAMS not in msg.content.array_records:
        arrays, metrics = plain_training_content(msg, context, device, data, tamper, update, params)
        return Message(RecordDict({"arrays": to_array_record(arrays), "metrics": MetricRecord(metrics)}),
                       reply_to=msg)
    pseudo_grad, weight, _, _ = _device_update(msg, device, data, tamper, update, params, secure=True)
    if device.config.distributed_dp:
        # The device's share of the noise, from the OS's random source (never the run's seed, which the server
        # knows), on SecAgg+'s lattice so that masking and unmasking add no rounding of their own.
        pseudo_grad, _ = distributed_dp_share(
            pseudo_grad, device.config.dp_clip_norm, device.config.dp_noise_multiplier, device.config.min_replies,
            device.config.secagg_step, np.random.default_rng(secrets.randbits(128)))
    norm = global_norm(pseudo_grad)
    if norm > device.config.max_update_norm:
        # The plain server drops such a reply; the secure one cannot see it, so the device checks.
        raise ValueError(f"update norm {norm:.3g} exceeds max_update_norm {device.config.max_update_norm:.3g}")
    pseudo_grad, clamped = clip_values(pseudo_grad, device.config.secagg_range)
    if clamped:
        log.warning("client %d clamped %d update values to ±%g for SecAgg+", device.client_id, clamped,
                    device.config.secagg_range)
    # Only the masked update and the example count leave: per-client losses would say more than the mean.
    fitres = FitRes(
        Status(Code.OK, ""), ndarrays_to_parameters([t.detach().numpy() for t in pseudo_grad.values()]),
        int(weight), {"secagg-clamped": clamped},
    )
    return Message(compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)


def plain_training_content(msg: Message, context: Context, device: Device, data: ClientData | None = None,
                           tamper: Tamper | None = None, update: LocalUpdate | None = None,
                           params: Params | None = None) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """What a plain training reply carries: its arrays (the update, or its compressed form) and its metrics
    (``num-examples`` among them). ``train_reply`` packs them into the reply's records; the vectorized
    simulation hands them to the server as they are (``metafleet.common.records.TrainingReply``)."""
    pseudo_grad, weight, metrics, params = _device_update(msg, device, data, tamper, update, params, secure=False)
    server_round = int(msg.content["config"]["server-round"])
    arrays = _compressed(pseudo_grad, params, device.config, context, server_round, device.client_id)
    return arrays, {"num-examples": weight, **metrics}


def _device_update(msg: Message, device: Device, data: ClientData | None, tamper: Tamper | None,
                   update: LocalUpdate | None, params: Params | None,
                   secure: bool) -> tuple[Params, float, dict[str, float], Params]:
    """The local update as it may leave the device: (pseudo-gradient, weight, metrics, received θ)."""
    start = time.perf_counter()
    if device.held_out:
        raise RuntimeError(f"client {device.client_id} is held out for evaluation and never trains")
    if device.config.secure_aggregation and not secure:
        raise AggregationModeError(
            "the run asks for secure aggregation but the server sent a plain training request: the server app "
            "does not run SecAgg+, so this device keeps its update"
        )
    params = device.received_params(msg) if params is None else params
    if update is None:
        server_round = int(msg.content[LEGACY_CONFIG if secure else "config"]["server-round"])
        rng = training_rng(device.config, server_round, device.client_id)
        update = client_train(device.fmodel, device.on_device(params), data or device.data, device.config, rng)
    # A warning: flwr-clientapp configures no logging for metafleet, so an info line would never show.
    log.warning("client %d: train took %.2f s", device.client_id, time.perf_counter() - start)
    # Never send a broken update: the server would drop it, and under SecAgg+ a NaN would poison the sum
    # (the server cannot see which client sent it), so the device refuses and drops out of the round.
    pseudo_grad, weight = {name: t.cpu() for name, t in update.pseudo_grad.items()}, update.num_examples
    check_update(pseudo_grad, params)
    if device.config.differential_privacy:
        pseudo_grad, _ = clip_to_norm(pseudo_grad, device.config.dp_clip_norm)
        weight = 1
    bound = device.config.defense_definition.device_bound
    if bound is not None:
        pseudo_grad, _ = clip_to_norm(pseudo_grad, bound)
    if tamper is not None:
        pseudo_grad = tamper(pseudo_grad)
    return pseudo_grad, weight, update.metrics, params


def _compressed(update: Params, params: Params, config: RunConfig, context: Context, server_round: int,
                client_id: int) -> dict[str, np.ndarray]:
    """The reply's arrays: the update itself, or the layers of it that changed most (--selective-layers), each
    either as they are or compressed. What top-k or the layer selection left out stays in the device's
    context and joins the next round's update (error feedback)."""
    compression = config.compression
    flags = None
    if config.selective_layers:
        pending = _kept(context, UNSENT_LAYERS_RECORD, update)
        update, unsent = select_layers(update, pending, params, config.selective_layers)
        context.state.array_records[UNSENT_LAYERS_RECORD] = to_array_record(unsent)
        flags = sent_flags(update, list(params))
    if not compression.active and flags is None:
        return {name: t.detach().numpy() for name, t in update.items()}
    residual = _kept(context, RESIDUAL_RECORD, update) if compression.kind == "topk" else None
    payload, residual = encode(update, compression, np.random.default_rng([config.seed, server_round, client_id, 8]),
                               residual)
    if residual is not None:
        context.state.array_records[RESIDUAL_RECORD] = to_array_record(residual)
    if flags is not None:
        payload[SENT_KEY] = flags
    return payload


def _kept(context: Context, record: str, like: Params) -> Params | None:
    """What the device kept under ``record`` in an earlier round, if it still fits the model."""
    if record not in context.state.array_records:
        return None
    kept = from_array_record(context.state.array_records[record])
    fits = set(kept) == set(like) and all(kept[name].shape == like[name].shape for name in like)
    return kept if fits else None


def evaluation_request(msg: Message, device: Device) -> tuple[RunConfig, list[str]]:
    """The config a held-out device evaluates with for this message, and the fine-tunings it is asked for."""
    config = device.config
    sent = dict(msg.content["config"]) if "config" in msg.content else {}
    if int(sent.get("server-round", 1)) == 0:
        # Round 0's model is the untrained initialization: adapting it is training from scratch (the
        # benchmark's local-only), with the inner lr; adapt_lr is the step size for a trained model.
        config = config.replace(adapt_lr=0.0)
    # The server names the fine-tunings (one FedAvg model, evaluated as fedavg+ft, +head-ft and +prox-ft).
    modes = [mode for mode in str(sent.get(FINETUNES_KEY, "full")).split(",") if mode]
    unknown = sorted(set(modes) - set(METRIC_PREFIXES))
    if unknown or not modes:
        raise MetafleetError(f"the evaluation asks for fine-tunings {unknown or modes}; this device knows "
                             f"{list(METRIC_PREFIXES)}")
    return config, modes


def evaluation_reply(msg: Message, device: Device, curves: dict[str, tuple[list[float], list[float]]]) -> Message:
    """The evaluate handler's reply: each fine-tuning's (plain, guarded) curve over the eval steps."""
    metrics = {"num-examples": 1, "client-id": device.client_id}
    for mode, (curve, guarded) in curves.items():
        prefix = METRIC_PREFIXES[mode]
        for step, plain_value, guarded_value in zip(device.config.eval_steps, curve, guarded, strict=True):
            metrics[f"{prefix}step-{step}"] = plain_value
            metrics[f"{prefix}guarded-step-{step}"] = guarded_value
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    device = Device(context)
    params = device.received_params(msg)
    config, modes = evaluation_request(msg, device)
    on_device = device.on_device(params)
    curves = {}
    for mode in modes:
        head = _head_names(device.config) if mode == "head" else frozenset()
        curves[mode] = client_finetuning(device.fmodel, on_device, device.data, config, mode, head)
    return evaluation_reply(msg, device, curves)
