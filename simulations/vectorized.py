"""``metafleet simulate --backend vectorized``: the in-process grid, with a round's training computed for all
its devices at once.

The server is the ServerApp's own code on this grid (``run_meta_training``): sampling, reply validation,
aggregation, defences, the outer optimizer, checkpoints, resume and the run directory are not
reimplemented. Only the devices' side of a training round changes: instead of one ClientApp call per
message, every sampled device's episode is drawn exactly as its ClientApp would draw it
(``training_rng``, ``training_episode``), the local updates of same-shaped episodes are computed together
(``metafleet.common.vectorized``, ``torch.func.vmap``), and each device's reply content is made by the
ClientApp's own ``plain_training_content`` (its checks, clipping and compression). That content reaches the
server as a ``TrainingReply`` row, not a Message: packing every small update into Flower records and parsing
it back was most of a round's cost, and the strategy validates a row from its arrays on with the same code.
Held-out devices' evaluation is batched likewise (``metafleet.common.vectorized_eval``: the curve and the
on-device guard under vmap) and packed by the ClientApp's own ``evaluation_reply``; head-only and proximal
fine-tuning, discovery's one query and attacking devices go through the real ClientApp, as in-process.
SecAgg+ needs the message exchange of its four stages: it stays on the ray and inprocess backends.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import Error, Message, MessageType

from metafleet.client.app import (
    FINETUNES_KEY,
    Device,
    evaluation_reply,
    evaluation_request,
    plain_training_content,
)
from metafleet.common.config import RunConfig
from metafleet.common.errors import MetafleetError
from metafleet.common.meta import step_sizes
from metafleet.common.records import TrainingReply
from metafleet.common.training import training_episode, training_rng
from metafleet.common.vectorized import batched_updates
from metafleet.common.vectorized_eval import batched_personalization
from metafleet.simulations.inprocess import InProcessGrid, stage_of


def check_vectorizable(config: RunConfig) -> None:
    """One line for what this backend cannot run."""
    if config.secure_aggregation:
        raise MetafleetError("--backend vectorized computes devices without messages, and SecAgg+ is a message "
                             "protocol: run secure aggregation with --backend inprocess or ray")


@dataclass
class VectorizedGrid(InProcessGrid):
    # Node id -> its Device: what a simulated device is (config, model, client id, role) comes from its
    # context, fixed for the run, so it is worked out once per device here, not once per message.
    devices: dict[int, Device] = field(default_factory=dict, init=False, repr=False)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message | TrainingReply]:
        messages = list(messages)
        training, evaluation, others = [], [], []
        for message in messages:
            kind = message.metadata.message_type
            if stage_of(message) is not None or self._attacks(message):
                others.append(message)
            elif kind == MessageType.TRAIN:
                training.append(message)
            elif kind == MessageType.EVALUATE and self._plain_evaluation(message):
                evaluation.append(message)
            else:
                others.append(message)
        replies = list(super().send_and_receive(others, timeout=timeout)) if others else []
        return replies + self._train(training) + self._evaluate(evaluation)

    def _plain_evaluation(self, message: Message) -> bool:
        # Only the full fine-tuning is batched; head-only and proximal fine-tuning go through the ClientApp.
        sent = message.content["config"] if "config" in message.content else {}
        return str(sent.get(FINETUNES_KEY, "full")) == "full"

    def simulated_identities(self) -> dict[int, int]:
        """Every node's client id, from the node configs this grid gives its devices (the server then asks
        one device, not every one)."""
        if hasattr(self.contexts, "client_ids"):
            return self.contexts.client_ids()
        return {node: int(context.node_config["partition-id"]) for node, context in self.contexts.items()}

    def _device(self, node: int) -> Device:
        device = self.devices.get(node)
        if device is None:
            device = self.devices[node] = Device(self.contexts[node])
        return device

    def _attacks(self, message: Message) -> bool:
        # A simulated attacker's work is its own (poisoned data, tampering): the attacking ClientApp does it.
        attacking = getattr(self.client_app, "is_attacker", None)
        return attacking is not None and attacking(self.contexts[message.metadata.dst_node_id])

    def _train(self, messages: list[Message]) -> list[Message | TrainingReply]:
        if not messages:
            return []
        devices, episodes, failed = [], [], []
        for message in messages:
            context = self.contexts[message.metadata.dst_node_id]
            try:
                device = self._device(message.metadata.dst_node_id)
                if device.held_out:
                    raise RuntimeError(f"client {device.client_id} is held out for evaluation and never trains")
                server_round = int(message.content["config"]["server-round"])
                rng = training_rng(device.config, server_round, device.client_id)
                episodes.append(training_episode(device.data, device.config, rng).to(device.torch_device))
                devices.append((message, context, device))
            except Exception as error:  # noqa: BLE001 - as Flower's runtime: an error reply, the round goes on
                failed.append(_error_reply(message, error))
        # configure_train sends one θ record to every device of a round: computed together per record.
        by_theta: dict[int, list[int]] = {}
        for index, (message, _, _) in enumerate(devices):
            by_theta.setdefault(id(message.content["arrays"]), []).append(index)
        replies = []
        for members in by_theta.values():
            first = devices[members[0]]
            config, fmodel = first[2].config, first[2].fmodel
            try:
                received = first[2].received_params(first[0])  # checked once for all who received it
            except Exception as error:  # noqa: BLE001
                replies += [_error_reply(devices[i][0], error) for i in members]
                continue
            params = {name: t.to(first[2].torch_device) for name, t in received.items()}
            try:
                updates = batched_updates(config.algorithm, fmodel, params, [episodes[i] for i in members],
                                          config.inner_steps, config.inner_lr)
            except Exception as error:  # noqa: BLE001 - as one device's failure would be: error replies
                replies += [_error_reply(devices[i][0], error) for i in members]
                continue
            for index, update in zip(members, updates, strict=True):
                message, context, device = devices[index]
                try:
                    arrays, metrics = plain_training_content(message, context, device, update=update, params=received)
                    replies.append(TrainingReply(message.metadata.dst_node_id, arrays, metrics))
                except Exception as error:  # noqa: BLE001
                    replies.append(_error_reply(message, error))
        return replies + failed


    def _evaluate(self, messages: list[Message]) -> list[Message]:
        """Held-out devices' personalization curves, each round's together (the evaluate handler's values)."""
        if not messages:
            return []
        devices, failed = [], []
        for message in messages:
            try:
                device = self._device(message.metadata.dst_node_id)
                config, _ = evaluation_request(message, device)
                episodes = [episode.to(device.torch_device) for episode in device.data.evaluation_episodes(
                    config.shots, config.seed, config.ways or None, config.eval_episodes)]
                devices.append((message, device, config, episodes))
            except Exception as error:  # noqa: BLE001 - as Flower's runtime: an error reply, the others go on
                failed.append(_error_reply(message, error))
        by_theta: dict[tuple[int, float], list[int]] = {}
        for index, (message, _, config, _) in enumerate(devices):
            by_theta.setdefault((id(message.content["arrays"]), config.adaptation_lr), []).append(index)
        replies = []
        for members in by_theta.values():
            message, device, config, _ = devices[members[0]]
            try:
                received = device.received_params(message)  # checked once for all who received it
            except Exception as error:  # noqa: BLE001
                replies += [_error_reply(devices[i][0], error) for i in members]
                continue
            theta, lr = step_sizes(device.on_device(received), config.adaptation_lr)
            episodes = [episode for i in members for episode in devices[i][3]]
            try:
                curves = iter(batched_personalization(device.fmodel, theta, episodes, config.eval_steps, lr))
            except Exception as error:  # noqa: BLE001 - as one device's failure would be: error replies
                replies += [_error_reply(devices[i][0], error) for i in members]
                continue
            for index in members:
                message, member, _, own = devices[index]
                plain, guarded = zip(*[next(curves) for _ in own], strict=True)
                curve = ([float(v) for v in np.mean(plain, axis=0)], [float(v) for v in np.mean(guarded, axis=0)])
                replies.append(evaluation_reply(message, member, {"full": curve}))
        return replies + failed


def _error_reply(message: Message, error: Exception) -> Message:
    return Message(Error(code=0, reason=f"{type(error).__name__}: {error}"), reply_to=message)
