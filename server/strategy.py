"""Meta-strategies: Flower strategies that apply an outer optimizer to the fleet's mean pseudo-gradient.

All five algorithms share one server mechanism (FedJAX's FedAvg shape): the weighted mean of the clients'
pseudo-gradients is stepped by the outer optimizer. The algorithms differ in what a client computes
(``metafleet.common.meta``), so the subclasses below only name the paper and the defaults.

Every reply is validated at the boundary: an error, a missing or extra key, a wrong shape or dtype, a NaN
or Inf, an absurd norm or a bad example count drops that reply, logged with the node id and the reason;
the round goes on with the rest, and is skipped when fewer than ``min_replies`` remain.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from metafleet.common.compression import decode
from metafleet.common.config import RunConfig
from metafleet.common.data import mean_and_ci95
from metafleet.common.finetune import FINETUNES_KEY, METRIC_PREFIXES
from metafleet.common.fleets import functional_model
from metafleet.common.meta import Params, check_update, learned_rate_summary, project_learned_rates
from metafleet.common.optim import OuterOptimizer, make_outer_optimizer
from metafleet.common.records import TrainingReply, numpy_arrays, to_array_record
from metafleet.common.selective import sent_reference
from metafleet.server.defenses import (
    RepresentationalSimilarity,
    layerwise_aggregate,
    load_stimuli,
    robust_aggregate,
)
from metafleet.server.privacy import PrivacyLedger

log = logging.getLogger("metafleet.server")


@dataclass
class Rejection:
    round: int
    node_id: int
    reason: str


@dataclass
class RoundStats:
    """What the last round did, for the progress display and metrics.jsonl."""

    sampled: int = 0
    sampled_nodes: list[int] = field(default_factory=list)
    accepted: int = 0
    skipped: bool = False
    metrics: dict[str, float] = field(default_factory=dict)


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def short_reason(reason: str) -> str:
    """The client's own error message out of Flower's wrapped traceback."""
    marker = "Message: "
    if marker in reason:
        reason = reason[reason.rindex(marker) + len(marker):]
    return reason.strip().strip("'>").strip()[-300:]


def training_reply(reply: Message) -> TrainingReply:
    """A plain training reply's content, checked for form (``ValueError`` naming what is wrong)."""
    if reply.has_error():
        raise ValueError(f"the client failed: {short_reason(reply.error.reason)}")
    content = reply.content
    if set(content.array_records) != {"arrays"} or set(content.metric_records) != {"metrics"}:
        raise ValueError(
            f"reply must hold one ArrayRecord 'arrays' and one MetricRecord 'metrics', got "
            f"{sorted(content.array_records)} and {sorted(content.metric_records)}"
        )
    return TrainingReply(reply.metadata.src_node_id, numpy_arrays(content["arrays"]), dict(content["metrics"]))


def sender(reply: Message | TrainingReply) -> int:
    return reply.node if isinstance(reply, TrainingReply) else reply.metadata.src_node_id


class MetaStrategy(FedAvg):
    """Shared server side of every metafleet algorithm; use one of the subclasses."""

    algorithm = ""

    def __init__(self, config: RunConfig, params: Params, optimizer: OuterOptimizer | None = None):
        if config.algorithm != self.algorithm:
            raise ValueError(f"{type(self).__name__} runs '{self.algorithm}', the config asks for '{config.algorithm}'")
        super().__init__(min_train_nodes=config.min_replies, min_available_nodes=1, min_evaluate_nodes=1)
        self.config = config
        self.params = {name: t.detach().clone() for name, t in params.items()}
        self.reference = {name: t.detach().clone() for name, t in params.items()}
        self.optimizer = optimizer or make_outer_optimizer(config.outer_optimizer, config.outer_lr)
        self.sampling_rng = np.random.default_rng([config.seed, 99])
        self.training_nodes: list[int] = []
        self.held_out_nodes: list[int] = []
        self.rejections: list[Rejection] = []
        self.last_round = RoundStats()
        self.bytes_up = 0
        self.bytes_down = 0
        self.privacy = PrivacyLedger(config) if config.differential_privacy else None
        self.defense = config.defense_definition
        self.rsa = rsa_judge(config) if self.defense.kind == "rsa" else None
        self.compression = config.compression

    # -- train -------------------------------------------------------------------------------------------
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        sampled = self.sample_train_nodes()
        train_config = ConfigRecord({**dict(config), "server-round": server_round})
        return [
            Message(RecordDict({"arrays": arrays, "config": train_config}), node, MessageType.TRAIN)
            for node in sampled
        ]

    def sample_train_nodes(self) -> list[int]:
        """This round's clients (the plain and the secure path sample alike); resets ``last_round``."""
        if not self.training_nodes:
            raise RuntimeError("no training nodes are known; discover the fleet before training")
        size = min(self.config.clients_per_round, len(self.training_nodes))
        # Sample positions, not ids: numpy would turn 64-bit node ids into floats and lose digits.
        positions = self.sampling_rng.choice(len(self.training_nodes), size=size, replace=False)
        sampled = [self.training_nodes[int(i)] for i in positions]
        self.last_round = RoundStats(sampled=size, sampled_nodes=sampled)
        return sampled

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message | TrainingReply]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The round's meta-update from the replies: Flower Messages, or, from the vectorized simulation,
        ``TrainingReply`` rows that no Message carried (validated alike from their arrays on)."""
        updates, weights, metrics = [], [], []
        # In the order sampled, not of arrival: float sums depend on their order, and Ray's replies arrive in
        # another order each run (Adam made that visible in the 3rd digit of a 40-round run's metric). The
        # sampled order is the same on every backend; node ids are not.
        position = {node: index for index, node in enumerate(self.last_round.sampled_nodes)}
        replies = sorted(replies, key=lambda reply: position.get(sender(reply), len(position)))
        answered = {sender(reply) for reply in replies}
        for node in self.last_round.sampled_nodes:
            if node not in answered:
                self._reject(server_round, node, "no reply before the round's timeout")
        for reply in replies:
            node = sender(reply)
            try:
                update, weight, reply_metrics = self._validated(reply)
            except ValueError as error:
                self._reject(server_round, node, str(error))
                continue
            updates.append(update)
            weights.append(weight)
            metrics.append(reply_metrics)
        self.last_round.accepted = len(updates)
        if len(updates) < self.config.min_replies:
            log.warning(
                "round %d skipped: %d valid replies of %d sampled, at least %d needed",
                server_round, len(updates), self.last_round.sampled, self.config.min_replies,
            )
            self.last_round.skipped = True
            return None, None
        if self.rsa is not None:
            aggregate, defense_metrics = self.rsa.aggregate(self.params, updates, weights)
        elif self.config.selective_layers:
            aggregate, defense_metrics = layerwise_aggregate(updates, weights, self.defense, list(self.reference))
        else:
            aggregate, defense_metrics = robust_aggregate(updates, weights, self.defense)
        self.last_round.metrics.update(defense_metrics)
        self.apply_aggregate(aggregate, len(updates))
        keys = set.intersection(*(set(m) for m in metrics))
        summary = {key: float(np.average([m[key] for m in metrics], weights=weights)) for key in sorted(keys)}
        self.last_round.metrics.update(summary)
        return to_array_record(self.params), MetricRecord({"num-examples": int(sum(weights)), **summary})

    def apply_aggregate(self, mean_pseudo_grad: Params, contributors: int) -> None:
        """The meta-update: the one place θ changes, whichever path (plain or secure) aggregated. A tensor that
        ``mean_pseudo_grad`` lacks (a layer no device sent, --selective-layers) keeps its value.

        With differential privacy, the mean of ``contributors`` clipped updates gets its noise here first.
        """
        if self.privacy is not None:
            if self.config.distributed_dp:
                self.privacy.count_noised_round()  # the devices' shares are in the mean already
            else:
                mean_pseudo_grad = self.privacy.noised_mean(mean_pseudo_grad, contributors)
            self.last_round.metrics["epsilon"] = self.privacy.epsilon
        # Meta-SGD's rates (log α) are projected into their bounds: the rates stay positive and finite.
        self.params = project_learned_rates(self.optimizer.step(self.params, mean_pseudo_grad))
        self.last_round.metrics.update(learned_rate_summary(self.params))

    def _validated(self, reply: Message | TrainingReply) -> tuple[Params, float, dict[str, float]]:
        if isinstance(reply, Message):
            reply = training_reply(reply)
        metrics = dict(reply.metrics)
        weight = metrics.pop("num-examples", None)
        if not isinstance(weight, (int, float)) or not (0 < weight < 1e9) or not math.isfinite(weight):
            raise ValueError(f"'num-examples' must be a positive number, got {weight!r}")
        if self.privacy is not None:
            weight = 1  # one client's influence on the mean is then at most clip_norm / clients
        payload = reply.arrays
        reference = self.reference
        if self.config.selective_layers:
            payload, reference = sent_reference(payload, reference)
        update = decode(payload, self.compression, reference)
        norm = check_update(update, reference)
        if self.privacy is not None and norm > self.config.dp_clip_norm * (1 + 1e-4):
            raise ValueError(f"update norm {norm:.3g} exceeds dp_clip_norm {self.config.dp_clip_norm:.3g}: "
                             "the client did not clip, and its update would void the privacy guarantee")
        if norm > self.config.max_update_norm:
            raise ValueError(f"update norm {norm:.3g} exceeds max_update_norm {self.config.max_update_norm:.3g}")
        scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        return update, float(weight), scalars

    def _reject(self, server_round: int, node: int, reason: str) -> None:
        log.warning("round %d: dropped the reply of node %d: %s", server_round, node, reason)
        self.rejections.append(Rejection(server_round, node, reason))

    # -- evaluate (personalization on held-out devices) ------------------------------------------------------
    def is_evaluation_round(self, server_round: int) -> bool:
        return server_round % self.config.eval_every == 0 or server_round == self.config.rounds

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid, force: bool = False
    ) -> Iterable[Message]:
        if not (force or self.is_evaluation_round(server_round)) or not self.held_out_nodes:
            return []
        # The devices evaluate every fine-tuning the run names on the one model they receive.
        eval_config = ConfigRecord({**dict(config), "server-round": server_round,
                                    FINETUNES_KEY: self.config.eval_finetunes})
        return [
            Message(RecordDict({"arrays": arrays, "config": eval_config}), node, MessageType.EVALUATE)
            for node in self.held_out_nodes
        ]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Mean and 95% CI over held-out clients at each step count, with and without the device's guard,
        plus every client's own values (``client-ids``, ``clients-step-N``) for pooling across folds. Each
        fine-tuning besides "full" has its keys under its prefix (``clients-head-ft-step-N``...)."""
        steps = self.config.eval_steps
        prefixes = [METRIC_PREFIXES[mode] for mode in self.config.finetune_modes]
        client_ids, curves, guarded_curves, backdoor_curves = [], [], [], []
        extra_curves: dict[str, list[list[float]]] = {p + kind: [] for p in prefixes if p for kind in ("", "guarded-")}
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                self._reject(server_round, node, f"evaluation failed: {short_reason(reply.error.reason)}")
                continue
            values = dict(reply.content["metrics"]) if "metrics" in reply.content else {}
            curve = [values.get(f"step-{step}") for step in steps]
            guarded = [values.get(f"guarded-step-{step}") for step in steps]
            extra = {key: [values.get(f"{key}step-{step}") for step in steps] for key in extra_curves}
            every = curve + guarded + [v for row in extra.values() for v in row]
            if not all(_finite_number(v) for v in every) or not _finite_number(values.get("client-id")):
                wanted = ", ".join(f"{p}step-N, {p}guarded-step-N" for p in prefixes)
                problem = f"evaluation reply lacks client-id or finite {wanted}: {sorted(values)}"
                self._reject(server_round, node, problem)
                continue
            client_ids.append(int(values["client-id"]))
            curves.append(curve)
            guarded_curves.append(guarded)
            for key, row in extra.items():
                extra_curves[key].append(row)
            # A simulated backdoor's success on this device (metafleet.simulations.attacks), where measured.
            backdoor_curves.append([values.get(f"backdoor-step-{step}") for step in steps])
        if not curves:
            return None
        result: dict[str, Any] = {"clients": len(curves), "client-ids": client_ids}
        groups = [("", curves), ("guarded-", guarded_curves), *extra_curves.items()]
        backdoor_rows = [row for row in backdoor_curves if all(_finite_number(v) for v in row)]
        if backdoor_rows:
            groups.append(("backdoor-", backdoor_rows))
        for prefix, rows in groups:
            for index, step in enumerate(steps):
                values = [float(row[index]) for row in rows]
                mean, half_width = mean_and_ci95(values)
                result[f"mean-{prefix}step-{step}"] = mean
                result[f"ci95-{prefix}step-{step}"] = half_width
                result[f"clients-{prefix}step-{step}"] = values
        return MetricRecord(result)

    # -- checkpointing -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "params": self.params,
            "optimizer": self.optimizer.state_dict(),
            "sampling_rng": self.sampling_rng.bit_generator.state,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "rejections": [vars(r) for r in self.rejections],
            "privacy": self.privacy.state_dict() if self.privacy is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_update(state["params"], self.reference)
        self.params = dict(state["params"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.sampling_rng.bit_generator.state = state["sampling_rng"]
        self.bytes_up, self.bytes_down = int(state["bytes_up"]), int(state["bytes_down"])
        self.rejections = [Rejection(**r) for r in state["rejections"]]
        if self.privacy is not None:
            self.privacy.load_state_dict(state["privacy"])


class FedAvgStrategy(MetaStrategy):
    """FedAvg (McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
    AISTATS 2017): clients train on all their data; the server averages (outer SGD, step 1)."""

    algorithm = "fedavg"


class ReptileStrategy(MetaStrategy):
    """Reptile (Nichol, Achiam & Schulman, "On First-Order Meta-Learning Algorithms", arXiv:1803.02999):
    clients adapt on support; the server moves θ toward the mean adapted model."""

    algorithm = "reptile"


class FOMAMLStrategy(MetaStrategy):
    """First-order MAML (Finn, Abbeel & Levine, "Model-Agnostic Meta-Learning for Fast Adaptation of Deep
    Networks", ICML 2017, sec. 5.2): clients send the query gradient at their adapted parameters."""

    algorithm = "fomaml"


class MAMLStrategy(MetaStrategy):
    """MAML (Finn, Abbeel & Levine, ICML 2017): clients send the exact second-order meta-gradient."""

    algorithm = "maml"


class PerFedAvgStrategy(MetaStrategy):
    """Per-FedAvg (Fallah, Mokhtari & Ozdaglar, "Personalized Federated Learning with Theoretical Guarantees: A
    Model-Agnostic Meta-Learning Approach", NeurIPS 2020), first-order: clients take MAML-style local steps and
    send θ − θ'; the server averages the local models (outer SGD, step 1)."""

    algorithm = "per-fedavg"


class MetaSGDStrategy(MetaStrategy):
    """Meta-SGD (Li, Zhou, Chen & Li, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning",
    arXiv:1707.09835), federated as in FedMeta (Chen et al., arXiv:1802.07876): θ and one inner learning rate per
    parameter (stored as log α beside θ) are meta-learned together; clients send the second-order
    meta-gradient for both, which is aggregated and stepped as one."""

    algorithm = "meta-sgd"


STRATEGIES: dict[str, type[MetaStrategy]] = {
    cls.algorithm: cls
    for cls in (FedAvgStrategy, ReptileStrategy, FOMAMLStrategy, MAMLStrategy, MetaSGDStrategy, PerFedAvgStrategy)
}


def rsa_judge(config: RunConfig) -> RepresentationalSimilarity:
    """--defense rsa's judge: the model as a function, the stimuli, and how far an update moves θ."""
    fmodel = functional_model(config)
    step = 1.0 if config.algorithm in ("fedavg", "reptile", "per-fedavg") else config.inner_lr
    defense = config.defense_definition
    return RepresentationalSimilarity(fmodel, load_stimuli(config, fmodel), step, defense.rsa_drops_outliers,
                                      defense.rsa_consensus)


def make_strategy(config: RunConfig, params: Params) -> MetaStrategy:
    return STRATEGIES[config.algorithm](config, params)
