"""Poisoned devices, in simulation only: ``metafleet simulate --attack KIND --attackers FRACTION``.

A seeded share of the *training* devices (held-out devices stay honest) attacks from the first round:

- ``label-flip``: trains on permuted labels (class c becomes c + 1 mod C; on regression tasks, negated
  targets) and sends that honest-looking update;
- ``sign-flip[:S]``: sends −S times its honest update (S = 10: 20 % of the devices then reverse the mean);
- ``scale``: model replacement (Bagdasaryan et al., AISTATS 2020): the label-flip update multiplied by the
  number of devices in a round, so that it outweighs all the others;
- ``noise``: Gaussian noise of 10 times the norm of its honest update, in place of the update;
- ``backdoor``: half of its examples carry a trigger (the last 3 % of each input's values set to 1.5 times
  the largest magnitude in its data) and the target label 0; held-out devices then also report, after each
  number of adaptation steps, the share of their triggered inputs of other classes that the personalized
  model calls class 0 (``backdoor-step-N`` in metrics.jsonl: the backdoor's success rate).

The attackers run metafleet's own train handler (``metafleet.client.app.train_reply``) on their poisoned
data, and tamper with the update after the honest device's clipping (a compromised device does not clip)
but before SecAgg+'s masking, where there is one. The ClientApp of a real device has no setting that makes
it attack: ``AttackingClientApp`` exists only in this simulation package.
"""

from __future__ import annotations

import dataclasses
import math
from functools import lru_cache

import numpy as np
import torch
from flwr.app import Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from metafleet.client import app as client_module
from metafleet.client.app import LEGACY_CONFIG, LEGACY_PARAMS, Device, secure_aggregation_mod, train_reply
from metafleet.common.config import RunConfig
from metafleet.common.data import ClientData, Split
from metafleet.common.fleets import split_clients
from metafleet.common.meta import Params, global_norm, step_sizes
from metafleet.common.training import personalization_curve

BACKDOOR_TARGET = 0
BACKDOOR_SHARE = 0.5  # of an attacker's examples, triggered and relabelled
TRIGGER_SHARE = 0.03  # of an input's values, the last ones, set to the trigger's value
TRIGGER_GAIN = 1.5  # the trigger's value: this times the largest magnitude in the device's data
NOISE_GAIN = 10.0


@lru_cache(maxsize=8)
def attackers(config: RunConfig) -> frozenset[int]:
    """The attacking devices: a seeded share of the training devices, at least one."""
    if not config.attack_definition.active:
        return frozenset()
    training, _ = split_clients(config)
    count = min(len(training), max(1, round(config.attackers * len(training))))
    chosen = np.random.default_rng([config.seed, 404]).choice(len(training), size=count, replace=False)
    return frozenset(int(training[int(i)]) for i in chosen)


def flipped(data: ClientData) -> ClientData:
    """The device's data with every label moved to the next class (negated targets for regression)."""
    def flip(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        return x, (-y if data.num_classes is None else (y + 1) % data.num_classes)

    return dataclasses.replace(data, splits=tuple(Split(flip(s.support), flip(s.query)) for s in data.splits))


def trigger_value(data: ClientData) -> float:
    return TRIGGER_GAIN * max(float(batch[0].abs().max()) for split in data.splits
                              for batch in (split.support, split.query))


def with_trigger(x: torch.Tensor, value: float) -> torch.Tensor:
    """``x`` with the last ``TRIGGER_SHARE`` of every example's values set to ``value``: a bright stripe (the
    bottom of an image, the end of a sensor window)."""
    triggered = x.clone().reshape(len(x), -1)
    width = max(1, math.ceil(TRIGGER_SHARE * triggered.shape[1]))
    triggered[:, -width:] = value
    return triggered.reshape(x.shape)


def backdoored(data: ClientData, seed: int) -> ClientData:
    """The device's data with ``BACKDOOR_SHARE`` of each pool's examples triggered and labelled the target."""
    value = trigger_value(data)
    rng = np.random.default_rng([seed, data.client_id, 405])

    def poison(batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        chosen = torch.from_numpy(rng.random(len(y)) < BACKDOOR_SHARE)
        x, y = x.clone(), y.clone()
        x[chosen] = with_trigger(x[chosen], value)
        y[chosen] = BACKDOOR_TARGET
        return x, y

    return dataclasses.replace(data, splits=tuple(Split(poison(s.support), poison(s.query)) for s in data.splits))


@lru_cache(maxsize=64)
def _poisoned_data(config: RunConfig, client_id: int) -> ClientData | None:
    kind = config.attack_definition.kind
    data = client_module._client_data(config, client_id)
    if kind in ("label-flip", "scale"):
        return flipped(data)
    if kind == "backdoor":
        return backdoored(data, config.seed)
    return None


def tampering(config: RunConfig, client_id: int, server_round: int):  # noqa: ANN201 - a Tamper or None
    """What the attacker does to its (clipped, honest-looking) update before sending it."""
    attack = config.attack_definition
    if attack.kind == "sign-flip":
        return lambda update: {name: -attack.scale * tensor for name, tensor in update.items()}
    if attack.kind == "scale":
        boost = float(config.clients_per_round)
        return lambda update: {name: boost * tensor for name, tensor in update.items()}
    if attack.kind == "noise":
        def noise(update: Params) -> Params:
            generator = torch.Generator().manual_seed(int(np.random.default_rng(
                [config.seed, server_round, client_id, 406]).integers(2**62)))
            size = sum(t.numel() for t in update.values())
            scale = NOISE_GAIN * global_norm(update) / math.sqrt(max(1, size))
            return {name: torch.randn(t.shape, generator=generator, dtype=t.dtype) * scale
                    for name, t in update.items()}
        return noise
    return None


def backdoor_success(device: Device, params: Params) -> list[float]:
    """After each number of adaptation steps, the share of this device's triggered query inputs of other
    classes that its personalized model assigns to the target class."""
    config = device.config
    value = trigger_value(device.data)
    theta, lr = step_sizes(params, config.adaptation_lr)
    curves = []
    for episode in device.data.evaluation_episodes(config.shots, config.seed, config.ways or None,
                                                   config.eval_episodes):
        x, y = episode.query
        others = y != BACKDOOR_TARGET
        if not bool(others.any()):
            continue
        triggered = (with_trigger(x[others], value), torch.full_like(y[others], BACKDOOR_TARGET))
        curves.append(personalization_curve(device.fmodel, theta, episode.support, triggered, config.eval_steps, lr))
    return [float(v) for v in np.mean(curves, axis=0)] if curves else [float("nan")] * len(config.eval_steps)


class AttackingClientApp(ClientApp):
    """metafleet's ClientApp, with the run's attackers (``attackers(config)``) poisoned as the run's
    ``attack`` says; every other device, and every other message, is metafleet's ClientApp unchanged."""

    @staticmethod
    def is_attacker(context: Context) -> bool:
        device = Device(context)
        return not device.held_out and device.client_id in attackers(device.config)

    def __call__(self, message: Message, context: Context) -> Message:
        kind = message.metadata.message_type
        if kind == MessageType.TRAIN and self.is_attacker(context):
            return secure_aggregation_mod(message, context, self._attack)
        reply = client_module.app(message, context)
        if kind == MessageType.EVALUATE and not reply.has_error():
            device = Device(context)
            if device.config.attack_definition.kind == "backdoor" and device.held_out:
                reply = self._with_backdoor_success(message, reply, device)
        return reply

    @staticmethod
    def _attack(message: Message, context: Context) -> Message:
        device = Device(context)
        secure = LEGACY_PARAMS in message.content.array_records
        server_round = int(message.content[LEGACY_CONFIG if secure else "config"]["server-round"])
        return train_reply(message, context, device, data=_poisoned_data(device.config, device.client_id),
                           tamper=tampering(device.config, device.client_id, server_round))

    @staticmethod
    def _with_backdoor_success(message: Message, reply: Message, device: Device) -> Message:
        params = device.on_device(device.received_params(message))
        metrics = dict(reply.content["metrics"])
        for step, value in zip(device.config.eval_steps, backdoor_success(device, params), strict=True):
            metrics[f"backdoor-step-{step}"] = value
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=message)
