"""Runs a ServerApp and a ClientApp on Flower's Simulation Engine (Ray) inside this process.

Flower 1.42 offers two ways: the ``flwr run`` CLI with a local SuperLink (it exits 0 even when the run
failed, leaves a detached SuperLink behind and returns no results), and ``run_simulation``, deprecated,
whose ServerApp and ClientApps see an empty run config. So this module calls ``_run_simulation``, the
function Flower's own ``flwr-simulation`` process calls. It is private API: it lives here alone, so a
Flower upgrade breaks one module (tests/test_simulation.py runs it for real).
"""

from __future__ import annotations

import os
import tempfile
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
from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES  # noqa: E402
from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes  # noqa: E402
from flwr.serverapp import ServerApp  # noqa: E402
from flwr.simulation.run_simulation import _run_simulation  # noqa: E402
from flwr.supercore.constant import NOOP_FEDERATION_ID  # noqa: E402
from flwr.supercore.run import Run  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402
from flwr.supercore.telemetry import EventType  # noqa: E402

from metafleet.server.appdir import write_app_dir  # noqa: E402


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
        result = _run_simulation(
            num_supernodes=num_supernodes,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app=client_app,
            server_app=server_app,
            backend_name="ray",
            backend_config={"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0}, "init_args": init_args},
            server_app_context=context,
            app_dir=app_dir,
            is_app=True,
            run=run,
            verbose_logging=verbose,
        )
        return result.context
