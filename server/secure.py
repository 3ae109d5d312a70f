"""Secure aggregation: one round of Flower's SecAgg+ (Bell et al., "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", CCS 2020) for a MetaStrategy. No cryptography here: Flower's
``SecAggPlusWorkflow`` runs the protocol with the clients' ``secaggplus_mod``.

The workflow belongs to Flower's legacy API: it asks a legacy ``Strategy`` for the round's instructions
and hands it the securely computed weighted mean. ``_LegacyAdapter`` is that strategy; it samples with
the MetaStrategy and passes the mean to ``MetaStrategy.apply_aggregate``, the same meta-update the plain
path calls. Individual updates never reach the MetaStrategy, only the mean does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common import (
    EvaluateIns,
    EvaluateRes,
    FitIns,
    FitRes,
    Parameters,
    Scalar,
    parameters_to_ndarrays,
)
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server import ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat import LegacyContext
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.secure_aggregation import secaggplus_workflow
from flwr.serverapp import Grid

from metafleet.common.config import SECAGG_QUANTIZATION_RANGE
from metafleet.common.meta import Params, check_update
from metafleet.common.records import to_array_record
from metafleet.common.secure_masks import MASK_GENERATOR, MASK_GENERATOR_KEY, bind, reconstruction_threshold
from metafleet.server.grid import MeteredGrid
from metafleet.server.strategy import MetaStrategy

log = logging.getLogger("metafleet.server")
# The server unmasks with metafleet's mask generator (metafleet.common.secure_masks), as the devices mask.
# and widens the devices' 32-bit masked words back to int64 before summing them; it reads a dropped device's
# secret key from its raw scalar and reconstructs each secret from the threshold's number of shares.
bind(secaggplus_workflow, ("pseudo_rand_gen", "bytes_to_ndarray", "combine_shares", "bytes_to_private_key"))

# What the legacy workflow reads from its context's state: the round number and θ.
_ROUND_RECORD, _ROUND_KEY, _PARAMS_RECORD = "config", "current_round", "parameters"


class SecureAggregation:
    """Runs training rounds of a MetaStrategy through SecAgg+; evaluation stays on the plain path."""

    def __init__(self, strategy: MetaStrategy, run_id: int, timeout: float):
        self.strategy = strategy
        self.config = strategy.config
        self.timeout = timeout
        self.adapter = _LegacyAdapter(strategy)
        # The workflow keeps the round number and θ in this context's state; nothing else of it is used.
        server_context = Context(run_id=run_id, node_id=0, node_config={}, state=RecordDict(), run_config={})
        self.legacy = LegacyContext(
            context=server_context, config=ServerConfig(num_rounds=self.config.rounds), strategy=self.adapter
        )
        # Every client's weight is its episode size (1 under differential privacy, where the mean is
        # unweighted); SecAgg+ scales an update by weight / max_weight before quantizing, so max_weight is
        # the largest weight and costs no precision.
        self.max_weight = 1 if self.config.differential_privacy else self.config.task_definition.episode_examples(
            self.config
        )

    def train_round(self, grid: MeteredGrid, server_round: int) -> None:
        """One secure training round; the outcome is in ``strategy.last_round`` as for a plain round."""
        available = min(self.config.clients_per_round, len(self.strategy.training_nodes))
        if available < 3:
            self.strategy.sample_train_nodes()
            self.strategy.last_round.skipped = True
            log.warning("round %d skipped: secure aggregation needs 3 or more training clients, %d known",
                        server_round, available)
            return
        shares = min(self.config.secagg_share_count, available)
        threshold = min(self.config.secagg_threshold_count, shares - 1)
        workflow = SecAggPlusWorkflow(
            num_shares=shares, reconstruction_threshold=threshold, max_weight=self.max_weight,
            clipping_range=self.config.secagg_range, quantization_range=SECAGG_QUANTIZATION_RANGE,
            timeout=self.timeout,
        )
        self.legacy.state.config_records[_ROUND_RECORD] = ConfigRecord({_ROUND_KEY: server_round})
        self.legacy.state.array_records[_PARAMS_RECORD] = to_array_record(self.strategy.params)
        self.adapter.begin(grid, server_round)
        grid.take_errors()  # earlier rounds' and evaluations' errors are not this round's
        stage_seconds: dict[str, float] = {}
        started = time.perf_counter()
        with _quiet_flower(), reconstruction_threshold(threshold):
            try:
                workflow(_AgreedMasks(grid, stage_seconds), self.legacy)
            except Exception as error:  # noqa: BLE001 - a malformed reply must cost one round, not the run
                self.adapter.outcome = f"failed ({type(error).__name__}: {error})"
        node_errors = dict(grid.take_errors())
        stats = self.strategy.last_round
        # Where the round's time went: each stage's exchange with the devices (their work and the transport's
        # waits), and the server's own work between them (unmasking, aggregation).
        stats.metrics.update(stage_seconds)
        stats.metrics["secagg-server-seconds"] = round(time.perf_counter() - started - sum(stage_seconds.values()), 4)
        for node in stats.sampled_nodes:
            if node not in self.adapter.contributors:
                reason = node_errors.get(node, "dropped out of secure aggregation (no reply before the timeout)")
                self.strategy._reject(server_round, node, reason)
        if not self.adapter.applied:
            stats.skipped = True
            log.warning(
                "round %d skipped: secure aggregation %s (%d of %d sampled clients took part, threshold %d of %d "
                "shares)", server_round, self.adapter.outcome or "halted", len(self.adapter.contributors),
                stats.sampled, threshold, shares,
            )


class _AgreedMasks(Grid):
    """The round's grid, with the server's mask generator named in every SecAgg+ setup message, so a device
    with another generator refuses loudly instead of masking with masks that would not cancel. (Devices
    announce theirs at discovery, where the server refuses a mismatch: Flower 1.42's workflow fails the whole
    round when a device drops out at the setup stage, KeyError in the unmask stage, docs/FLOWER-NOTES.md.)"""

    def __init__(self, grid: MeteredGrid, stage_seconds: dict[str, float]):
        self._grid = grid
        self._stage_seconds = stage_seconds  # each stage's exchange, for metrics.jsonl: where a round's time goes

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201 - Flower's Grid signature
        messages = list(messages)
        for message in messages:
            if _stage(message) == Stage.SETUP:
                message.content.config_records[RECORD_KEY_CONFIGS][MASK_GENERATOR_KEY] = MASK_GENERATOR
        started = time.perf_counter()
        try:
            return self._grid.send_and_receive(messages, timeout=timeout)
        finally:
            stage = _stage(messages[0]) if messages else None
            if stage is not None:
                key = f"secagg-{str(stage).replace('_', '-')}-seconds"
                self._stage_seconds[key] = round(time.perf_counter() - started, 4)

    # The rest of Grid, delegated.
    def set_run(self, run) -> None:  # noqa: ANN001
        self._grid.set_run(run)

    @property
    def run(self):  # noqa: ANN201
        return self._grid.run

    def create_message(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        return self._grid.create_message(*args, **kwargs)

    def get_node_ids(self):  # noqa: ANN201
        return self._grid.get_node_ids()

    def get_nodes(self):  # noqa: ANN201
        return self._grid.get_nodes()

    def push_messages(self, messages):  # noqa: ANN001, ANN201
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids):  # noqa: ANN001, ANN201
        return self._grid.pull_messages(message_ids)


def _stage(message: Message) -> str | None:
    if not message.has_content() or RECORD_KEY_CONFIGS not in message.content.config_records:
        return None
    return message.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE)


@contextmanager
def _quiet_flower() -> Iterator[None]:
    # The workflow logs each stage at INFO, with figures of its legacy client manager that metafleet does
    # not use ("sampled 10 clients (out of 0)"); metafleet logs the round's outcome itself.
    flower = logging.getLogger("flwr")
    level = flower.level
    flower.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        flower.setLevel(level)


class _LegacyAdapter(Strategy):
    """The legacy strategy SecAggPlusWorkflow drives: sampling and the meta-update come from the
    MetaStrategy, so the secure path has no learning logic of its own."""

    def __init__(self, strategy: MetaStrategy):
        self.strategy = strategy
        self.grid: Grid | None = None
        self.server_round = 0
        self.contributors: set[int] = set()
        self.applied = False
        self.outcome = ""

    def begin(self, grid: Grid, server_round: int) -> None:
        self.grid, self.server_round = grid, server_round
        self.contributors, self.applied, self.outcome = set(), False, ""

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        assert self.grid is not None, "begin() the round first"
        sampled = self.strategy.sample_train_nodes()
        config: dict[str, Scalar] = {"server-round": server_round, "secure-aggregation": True}
        run_id = self.grid.run.run_id
        return [(GridClientProxy(node, self.grid, run_id), FitIns(parameters, config)) for node in sampled]

    def aggregate_fit(
        self, server_round: int, results: list[tuple[ClientProxy, FitRes]], failures: list[Any]
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        # Every FitRes carries the same securely aggregated mean; only the example counts and the metrics
        # (not masked: metafleet's secure clients send nothing but the count of clamped values) are per client.
        self.contributors = {proxy.node_id for proxy, _ in results}
        stats = self.strategy.last_round
        stats.accepted = len(results)
        if len(results) < self.strategy.config.min_replies:
            self.outcome = f"completed with {len(results)} clients, fewer than min_replies"
            return None, {}
        mean = self._named(parameters_to_ndarrays(results[0][1].parameters))
        try:
            check_update(mean, self.strategy.reference)
        except ValueError as error:
            self.outcome = f"produced an unusable aggregate ({error})"
            return None, {}
        clamped = sum(int(res.metrics.get("secagg-clamped", 0)) for _, res in results)
        if clamped:
            log.warning("round %d: clients clamped %d update values to ±%g for SecAgg+; raise "
                        "secagg-clipping-range if this persists", server_round, clamped,
                        self.strategy.config.secagg_range)
        stats.metrics["secagg-clamped"] = float(clamped)
        self.strategy.apply_aggregate(mean, len(results))
        self.applied = True
        return None, {}

    def _named(self, arrays: list[Any]) -> Params:
        names = list(self.strategy.reference)
        if len(arrays) != len(names):
            return {f"array-{i}": torch.from_numpy(a) for i, a in enumerate(arrays)}  # check_update names it
        reference = self.strategy.reference
        return {name: torch.from_numpy(a).to(reference[name].dtype) for name, a in zip(names, arrays, strict=True)}

    # Evaluation runs on metafleet's plain path; the legacy hooks below are never called.
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, EvaluateIns]]:
        return []

    def aggregate_evaluate(
        self, server_round: int, results: list[tuple[ClientProxy, EvaluateRes]], failures: list[Any]
    ) -> tuple[float | None, dict[str, Scalar]]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        return None
