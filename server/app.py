"""The metafleet ServerApp: discovers the fleet, runs the meta-training rounds, checkpoints, evaluates.

The round loop is ours rather than ``Strategy.start`` because a run must checkpoint after every round and
resume from the last checkpoint, which ``start`` cannot; the strategy's configure/aggregate methods do the
per-round work exactly as in Flower's own loop.

Server-only options ride in the run config beside the learning config (``SERVER_OPTION_DEFAULTS``).
"""

from __future__ import annotations

import logging
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from metafleet.common.config import SERVER_OPTION_DEFAULTS, RunConfig
from metafleet.common.errors import MetafleetError
from metafleet.common.fleets import make_model, split_clients
from metafleet.common.meta import meta_parameters
from metafleet.common.records import KEEP_MODEL_ACTION, to_array_record
from metafleet.common.secure_masks import FLOWER_GENERATOR, MASK_GENERATOR
from metafleet.common.task import fingerprint
from metafleet.server.grid import MeteredGrid, PollingGrid
from metafleet.server.report import metric_name, write_report
from metafleet.server.rundir import RunDirectory
from metafleet.server.secure import SecureAggregation
from metafleet.server.strategy import MetaStrategy, Rejection, make_strategy, short_reason

log = logging.getLogger("metafleet.server")
# Nodes asked at once who they are. Flower's in-memory LinkState (the Simulation Engine's) scans every stored
# message for every node each 0.1 s, so a send costs nodes x pending messages: asking 10,000 nodes at once
# got 1,907 answers in 120 s, and the unanswered questions stalled the rounds after it. In batches, at most
# one batch is pending and each batch has the whole timeout.
DISCOVERY_BATCH = 250

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    poll_seconds = float(server_options(dict(context.run_config))["reply-poll-seconds"])
    if poll_seconds > 0:
        grid = PollingGrid(grid, poll_seconds)
    try:
        summary = run_meta_training(grid, dict(context.run_config))
    except Exception as error:
        # Flower reports only "An unhandled exception occurred in the ServerApp"; say what it was.
        _ensure_console_logging()
        log.error("the run failed: %s: %s", type(error).__name__, error)
        raise
    context.state["summary"] = ConfigRecord({"run-dir": summary["run_dir"]})


def server_options(run_config: dict[str, Any]) -> dict[str, Any]:
    return {key: run_config.get(key, default) for key, default in SERVER_OPTION_DEFAULTS.items()}


def evaluate_round(
    grid: Grid, strategy: MetaStrategy, server_round: int, timeout: float, force: bool = False
) -> MetricRecord | None:
    """Personalization on the held-out devices, when the schedule (or ``force``) asks for it."""
    messages = list(
        strategy.configure_evaluate(server_round, to_array_record(strategy.params), ConfigRecord(), grid, force=force)
    )
    if not messages:
        return None
    return strategy.aggregate_evaluate(server_round, grid.send_and_receive(messages, timeout=timeout))


def initial_params(config: RunConfig) -> dict[str, torch.Tensor]:
    """The run's shared state at round 0: θ, and for meta-sgd its learned rates beside it."""
    torch.manual_seed(config.seed)
    theta = {name: p.detach().clone() for name, p in make_model(config).named_parameters()}
    return meta_parameters(config.algorithm, theta, config.inner_lr)


def run_meta_training(grid: Grid, run_config: dict[str, Any]) -> dict[str, Any]:
    _ensure_console_logging()
    options = server_options(run_config)
    if options["resume"]:
        run_dir = RunDirectory(Path(options["out-dir"]))
        config = run_dir.load_config()
        run_dir.claim()
    else:
        config = RunConfig.from_run_config(run_config)
        out = options["out-dir"] or f"runs/{config.dataset}-{config.algorithm}-{datetime.now():%Y%m%d-%H%M%S}"
        run_dir = RunDirectory(Path(out))
        run_dir.claim()
        run_dir.create(config)
    try:
        return _train(grid, config, run_dir, options)
    finally:
        run_dir.release()


def _train(grid: Grid, config: RunConfig, run_dir: RunDirectory, options: dict[str, Any]) -> dict[str, Any]:
    strategy = make_strategy(config, initial_params(config))
    start_round, wall_before = 1, 0.0
    if options["resume"]:
        state = run_dir.load_latest_checkpoint()
        strategy.load_state_dict(state)
        start_round, wall_before = int(state["round"]) + 1, float(state["wall_seconds"])
        run_dir.truncate_metrics_after(int(state["round"]))
        log.info("resuming %s from round %d of %d", run_dir.path, start_round, config.rounds)

    grid = MeteredGrid(grid)
    secure = None
    if config.secure_aggregation:
        secure = SecureAggregation(strategy, grid.run.run_id, options["round-timeout"])
    discover_fleet(grid, strategy, expected=config.clients, wait_seconds=float(options["node-wait-seconds"]),
                   model_fingerprint=fingerprint(make_model(config)))
    started = time.monotonic()
    if start_round == 1:
        # Round 0 personalizes the untrained initialization: the local-only baseline (training on the
        # device's support set from scratch), and the starting point of every learning curve.
        initial = evaluate_round(grid, strategy, 0, options["round-timeout"], force=True)
        if initial is not None:
            run_dir.append_metrics({"round": 0, "phase": "evaluate", **dict(initial)})
    _add_traffic(grid, strategy)  # discovery and round 0: in the run's totals, not in round 1's
    round_seconds: list[float] = []
    progress_shown = [0.0]
    for server_round in range(start_round, config.rounds + 1):
        round_start = time.monotonic()
        if secure is not None:
            secure.train_round(grid, server_round)
        else:
            arrays = to_array_record(strategy.params)
            replies = grid.send_and_receive(
                strategy.configure_train(server_round, arrays, ConfigRecord(), grid), timeout=options["round-timeout"]
            )
            strategy.aggregate_train(server_round, replies)
        stats = strategy.last_round
        train_row = {
            "round": server_round, "phase": "train", "sampled": stats.sampled, "accepted": stats.accepted,
            "skipped": stats.skipped, **stats.metrics,
        }
        evaluation = evaluate_round(grid, strategy, server_round, options["round-timeout"])
        round_seconds.append(time.monotonic() - round_start)
        train_row["seconds"] = round_seconds[-1]
        train_row["bytes-up"], train_row["bytes-down"] = _add_traffic(grid, strategy)
        run_dir.append_metrics(train_row)
        if evaluation is not None:
            run_dir.append_metrics({"round": server_round, "phase": "evaluate", **dict(evaluation)})
        wall = wall_before + time.monotonic() - started
        run_dir.save_checkpoint(server_round, {**strategy.state_dict(), "wall_seconds": wall})
        _show_progress(config, server_round, train_row, evaluation, round_seconds, progress_shown)

    delivered = None
    if options["deliver-models"]:
        delivered = deliver_final_model(grid, strategy, options["round-timeout"])
        _add_traffic(grid, strategy)
    extra = {
        "privacy": _privacy_summary(config, strategy),
        "devices_keeping_models": delivered,
        "bytes_up": strategy.bytes_up,
        "bytes_down": strategy.bytes_down,
        "wall_seconds": wall_before + time.monotonic() - started,
        "rejected_replies": len(strategy.rejections),
        "run_dir": str(run_dir.path),
    }
    summary = write_report(run_dir, config, extra)
    log.info("run finished: %s", run_dir.path)
    return summary


def _add_traffic(grid: MeteredGrid, strategy: MetaStrategy) -> tuple[int, int]:
    """Moves the bytes the grid counted since the last call into the run's totals (kept in checkpoints)."""
    up, down = grid.take_bytes()
    strategy.bytes_up += up
    strategy.bytes_down += down
    return up, down


def _privacy_summary(config: RunConfig, strategy: MetaStrategy) -> dict[str, Any] | None:
    if strategy.privacy is None:
        return None
    return {
        "epsilon": strategy.privacy.epsilon, "delta": config.dp_delta, "noise_multiplier": config.dp_noise_multiplier,
        "clip_norm": config.dp_clip_norm, "noised_rounds": strategy.privacy.rounds,
        "sample_rate": strategy.privacy.sample_rate, "accountant": "opacus RDP", "mode": config.dp_mode,
        # Distributed: the devices' shares that make up the whole noise (a round needs at least this many).
        **({"noise_shares": config.min_replies} if config.distributed_dp else {}),
    }


def deliver_final_model(grid: Grid, strategy: MetaStrategy, timeout: float) -> int:
    """Every device, training and held-out, gets the final meta-model and keeps it with its personal model
    (``query.keep_model``); returns how many wrote both."""
    arrays = to_array_record(strategy.params)
    nodes = strategy.training_nodes + strategy.held_out_nodes
    action = f"{MessageType.QUERY}.{KEEP_MODEL_ACTION}"
    messages = [Message(RecordDict({"arrays": arrays}), node, action) for node in nodes]
    kept = 0
    for reply in grid.send_and_receive(messages, timeout=timeout):
        node = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("node %d could not keep the final model: %s", node, short_reason(reply.error.reason))
        elif reply.content["info"].get("kept"):
            kept += 1
    log.info("final meta-model and personal models kept on %d of %d devices", kept, len(nodes))
    return kept


def discover_fleet(grid: Grid, strategy: MetaStrategy, expected: int, wait_seconds: float,
                   model_fingerprint: str | None = None) -> None:
    """Ask every node who it is; training and held-out nodes are ordered by client id for reproducibility.

    A node whose model's fingerprint (parameter names, shapes, dtypes) differs from the server's runs another
    model: it is refused, and the run goes on with the others."""
    known = getattr(grid, "simulated_identities", lambda: None)()
    question = RecordDict({"config": ConfigRecord({"question": "who-are-you"})})
    if known:
        # A simulation that builds every device from the run's own config and code knows each node's client
        # id from its node config: 10,000 query messages would tell nothing more. One device is still asked,
        # so a fleet that cannot load, or runs another model, fails here in one line as discovery would.
        held_out = set(split_clients(strategy.config)[1])
        ordered = sorted((client_id, node) for node, client_id in known.items())
        first_client, first_node = ordered[0]
        timeout = max(wait_seconds, 30.0)
        replies = list(grid.send_and_receive([Message(question, first_node, MessageType.QUERY)], timeout=timeout))
        if not replies:
            raise MetafleetError(f"simulated device {first_client} did not say who it is within {timeout:.0f} s")
        if replies[0].has_error():
            reason = short_reason(replies[0].error.reason)
            raise MetafleetError(f"simulated device {first_client} cannot start: {reason}")
        reason = _refusal(strategy, replies[0].content["info"], model_fingerprint)
        if reason is not None:
            raise MetafleetError(f"simulated device {first_client}: {reason}")
        strategy.training_nodes = [node for client_id, node in ordered if client_id not in held_out]
        strategy.held_out_nodes = [node for client_id, node in ordered if client_id in held_out]
        if not strategy.training_nodes:
            raise MetafleetError("no training client in the simulated fleet; nothing to train on")
        log.info("fleet: %d training nodes, %d held-out nodes (from the simulation's node configs)",
                 len(strategy.training_nodes), len(strategy.held_out_nodes))
        return
    deadline = time.monotonic() + wait_seconds
    node_ids = list(grid.get_node_ids())
    while len(node_ids) < expected and time.monotonic() < deadline:
        time.sleep(0.2)
        node_ids = list(grid.get_node_ids())
    if len(node_ids) < expected:
        log.warning("only %d of %d expected nodes connected within %.0f s; going on", len(node_ids), expected,
                    wait_seconds)
    timeout = max(wait_seconds, 30.0)
    replies: list[Message] = []
    last_report = time.monotonic()
    for start in range(0, len(node_ids), DISCOVERY_BATCH):
        batch = node_ids[start : start + DISCOVERY_BATCH]
        questions = [Message(question, node, MessageType.QUERY) for node in batch]
        replies += grid.send_and_receive(questions, timeout=timeout)
        if time.monotonic() - last_report > 10 and start + len(batch) < len(node_ids):
            log.info("discovery: %d of %d nodes asked", start + len(batch), len(node_ids))
            last_report = time.monotonic()
    if len(replies) < len(node_ids):
        log.warning("%d of %d nodes did not say who they are within %.0f s and take no part",
                    len(node_ids) - len(replies), len(node_ids), timeout)
    training, held_out = [], []
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            log.warning("node %d could not say who it is and takes no part: %s", node, short_reason(reply.error.reason))
            continue
        info = reply.content["info"]
        reason = _refusal(strategy, info, model_fingerprint)
        if reason is not None:
            log.warning("node %d (client %s) refused: %s", node, info.get("client-id"), reason)
            strategy.rejections.append(Rejection(0, node, reason))
            continue
        (held_out if info["role"] == "held-out" else training).append((int(info["client-id"]), node))
    strategy.training_nodes = [node for _, node in sorted(training)]
    strategy.held_out_nodes = [node for _, node in sorted(held_out)]
    if not strategy.training_nodes:
        raise MetafleetError("no training client answered; nothing to train on")
    log.info("fleet: %d training nodes, %d held-out nodes", len(training), len(held_out))


def _refusal(strategy: MetaStrategy, info: Any, model_fingerprint: str | None) -> str | None:
    """Why a node that said who it is cannot take part, or None."""
    masks, theirs = info.get("mask-generator"), info.get("fingerprint")
    if strategy.config.secure_aggregation and masks != MASK_GENERATOR:
        return (f"its SecAgg+ masks come from {masks or FLOWER_GENERATOR}, the server's from {MASK_GENERATOR}: "
                "they would not cancel, so it takes no part in this secure run")
    if model_fingerprint is not None and theirs != model_fingerprint:
        return (f"its model (task {info.get('task')!r}, fingerprint {theirs}) differs from the server's "
                f"(fingerprint {model_fingerprint}): it runs another task or model, and takes no part")
    return None


PROGRESS_EVERY_SECONDS = 2.0


def _show_progress(
    config: RunConfig, server_round: int, row: dict[str, Any], evaluation: Any, round_seconds: list[float],
    last_shown: list[float],
) -> None:
    # Thousands of fast rounds would scroll thousands of lines: a line every few seconds (``last_shown``
    # holds the run's last one), and every evaluated, skipped, first or last round.
    now = time.monotonic()
    quiet = evaluation is None and not row["skipped"] and server_round not in (1, config.rounds)
    if quiet and now - last_shown[0] < PROGRESS_EVERY_SECONDS:
        return
    last_shown[0] = now
    recent = round_seconds[-10:]
    eta = (config.rounds - server_round) * sum(recent) / len(recent)
    parts = [f"round {server_round}/{config.rounds}", f"clients {row['accepted']}/{row['sampled']}"]
    if row["skipped"]:
        parts.append("SKIPPED")
    if "loss-after" in row:
        parts.append(f"loss {row['loss-after']:.4f}")
    if evaluation is not None:
        last = config.eval_steps[-1]
        parts.append(
            f"{metric_name(config)}@{last} {evaluation[f'mean-step-{last}']:.3f}"
            f"±{evaluation[f'ci95-step-{last}']:.3f}"
        )
    parts.append(f"{recent[-1]:.2f} s/round, {eta:.0f} s left")
    log.info(" | ".join(parts))


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a line is logged (a test's capture, a notebook's), not to the one
    that was current when logging was set up, which may be closed by then."""

    @property
    def stream(self):  # noqa: ANN201
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:  # noqa: ANN001
        pass


def _ensure_console_logging() -> None:
    logger = logging.getLogger("metafleet")
    if not logger.handlers:
        handler = _CurrentStderr()
        handler.setFormatter(logging.Formatter("metafleet: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
