"""Runs a ServerApp and a ClientApp on Flower's Simulation Engine (Ray) inside this process.

Flower 1.42 offers two ways: the ``flwr run`` CLI with a local SuperLink (it exits 0 even when the run
failed, leaves a detached SuperLink behind and returns no results), and ``run_simulation``, deprecated,
whose ServerApp and ClientApps see an empty run config. So this module calls ``_run_simulation``, the
function Flower's own ``flwr-simulation`` process calls. It is private API: it lives here alone, so a
Flower upgrade breaks one module (tests/test_simulation.py runs it for real).

Two more places where the Simulation Engine's internals are changed for large fleets, both here and both
pinned by tests/test_engine_internals.py (it fails when the Flower code they stand in for changes):

- ``IndexedLinkState``: Flower's in-memory LinkState finds a node's messages by scanning every stored
  message, and the engine asks for every node every 0.1 s, so a pass costs nodes x messages (at 10,000
  nodes, tens of seconds per pass). This subclass keeps each node's undelivered message ids, in the order
  they were stored, and answers the same messages from them.
- ``_register_nodes`` is wrapped so the ServerApp learns which node simulates which partition (the node
  configs the engine gives its ClientApps): discovery needs no query message per node.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

# Before Flower or Ray are imported: no telemetry, no usage stats, no runtime installs of dependencies.
for _name, _value in {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
}.items():
    os.environ.setdefault(_name, _value)

from flwr.app import Context, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.common import now  # noqa: E402
from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES  # noqa: E402
from flwr.server.superlink.fleet.vce import vce_api  # noqa: E402
from flwr.server.superlink.linkstate import linkstate_factory  # noqa: E402
from flwr.server.superlink.linkstate.in_memory_linkstate import InMemoryLinkState  # noqa: E402
from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.simulation.run_simulation import _run_simulation  # noqa: E402
from flwr.supercore.constant import NOOP_FEDERATION_ID  # noqa: E402
from flwr.supercore.run import Run  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402
from flwr.supercore.telemetry import EventType  # noqa: E402

from metafleet.server.appdir import write_app_dir  # noqa: E402
from metafleet.server.grid import _DelegatingGrid  # noqa: E402

# METAFLEET_STOCK_ENGINE=1 runs Flower's Simulation Engine as shipped (no index, one query per node):
# benchmarks compare against it.
STOCK_ENGINE_VARIABLE = "METAFLEET_STOCK_ENGINE"
NODE_MAPPING_WAIT_SECONDS = 600.0


class IndexedLinkState(InMemoryLinkState):
    """Flower's in-memory LinkState, answering a node's pull from that node's own pending messages.

    Same messages in the same order as ``InMemoryLinkState.get_message_ins``: that method walks every
    stored message (checking each for expiry) and keeps the node's undelivered ones; here each node's
    undelivered ids are kept as they are stored, and only those are checked. Messages deleted meanwhile
    (expired, replied to, run stopped) drop out when the node next pulls."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._undelivered: dict[int, dict[str, None]] = {}

    def store_message_ins(self, message):  # noqa: ANN001, ANN201 - Flower's types
        message_id = super().store_message_ins(message)
        if message_id is not None:
            with self.lock:
                self._undelivered.setdefault(message.metadata.dst_node_id, {})[message_id] = None
        return message_id

    def get_message_ins(self, node_id: int, limit: int | None, *, run_id: int | None = None) -> list:
        if limit is not None and limit < 1:
            raise AssertionError("`limit` must be >= 1")
        found = []
        with self.lock:
            pending = self._undelivered.get(node_id)
            for message_id in list(pending or ()):
                self._check_stored_messages({message_id})
                message = self.message_ins_store.get(message_id)
                if message is None or message.metadata.delivered_at != "":
                    del pending[message_id]
                    continue
                if run_id is None or message.metadata.run_id == run_id:
                    found.append(message)
                    del pending[message_id]
                if limit and len(found) == limit:
                    break
        delivered_at = now().isoformat()
        for message in found:
            message.metadata.delivered_at = delivered_at
        return found


class _NodeMapping:
    """Node id → partition id, as the engine registers its nodes (the ServerApp starts first, so it waits)."""

    def __init__(self) -> None:
        self.partitions: dict[int, int] = {}
        self.ready = threading.Event()

    def wait(self) -> dict[int, int] | None:
        return dict(self.partitions) if self.ready.wait(NODE_MAPPING_WAIT_SECONDS) else None


class _KnownNodesGrid(_DelegatingGrid):
    """Flower's in-memory grid, plus the node → client id map of a simulated fleet (a simulated device's
    client id is its partition id), so the ServerApp's discovery asks no node."""

    def __init__(self, grid: Grid, mapping: _NodeMapping):
        super().__init__(grid)
        self._mapping = mapping

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
        return self._grid.send_and_receive(messages, timeout=timeout)

    def simulated_identities(self) -> dict[int, int] | None:
        return self._mapping.wait()


@contextmanager
def _large_fleet_engine(mapping: _NodeMapping) -> Iterator[None]:
    """Flower's engine with the indexed LinkState and the node mapping captured, for one simulation."""
    original_state, original_register = linkstate_factory.InMemoryLinkState, vce_api._register_nodes

    def register_nodes(num_nodes, state_factory):  # noqa: ANN001, ANN202 - Flower's signature
        partitions = original_register(num_nodes=num_nodes, state_factory=state_factory)
        mapping.partitions.update(partitions)
        mapping.ready.set()
        return partitions

    linkstate_factory.InMemoryLinkState, vce_api._register_nodes = IndexedLinkState, register_nodes
    try:
        yield
    finally:
        linkstate_factory.InMemoryLinkState, vce_api._register_nodes = original_state, original_register


def run_in_simulation(
    server_app: ServerApp,
    client_app: ClientApp,
    run_config: dict[str, Any],
    num_supernodes: int,
    cpus_per_client: float = 1.0,
    total_cpus: int | None = None,
    verbose: bool = False,
    ray_address: str | None = None,
) -> Context:
    """Run to completion; returns the ServerApp's context. Ray is shut down before this returns (with
    ``ray_address``, an existing cluster's: this process disconnects and the cluster stays up)."""
    with tempfile.TemporaryDirectory(prefix="metafleet-sim-") as app_dir:
        # ClientApps read their run config from an app directory's pyproject; this one declares every key.
        write_app_dir(Path(app_dir), run_config, name="metafleet-simulation")

        run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
        run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
        run.federation_id = NOOP_FEDERATION_ID
        # Server-side Message(...) construction reads the task identity, as under flwr-simulation.
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = (
            run.primary_task_id, run.run_id, SUPERLINK_NODE_ID,
        )
        context = Context(
            run_id=run.run_id, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(),
            run_config=dict(run_config),
        )
        init_args: dict[str, Any] = {"log_to_driver": verbose, "logging_level": "INFO" if verbose else "ERROR"}
        if ray_address:
            init_args["address"] = ray_address  # the cluster's own nodes say what resources there are
        elif total_cpus is not None:
            init_args["num_cpus"] = total_cpus
        engine = nullcontext()
        if os.environ.get(STOCK_ENGINE_VARIABLE) != "1":
            mapping = _NodeMapping()
            engine = _large_fleet_engine(mapping)
            wrapped = server_app
            server_app = ServerApp()

            @server_app.main()
            def _with_known_nodes(grid: Grid, server_context: Context) -> None:
                wrapped(_KnownNodesGrid(grid, mapping), server_context)

        with engine:
            result = _run_simulation(
                num_supernodes=num_supernodes,
                exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                client_app=client_app,
                server_app=server_app,
                backend_name="ray",
                backend_config={"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
                                "init_args": init_args},
                server_app_context=context,
                app_dir=app_dir,
                is_app=True,
                run=run,
                verbose_logging=verbose,
            )
        return result.context
