"""--ray-address: a simulation's devices run on an existing Ray cluster's nodes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from metafleet.common.config import RunConfig
from metafleet.common.errors import MetafleetError
from metafleet.simulations.cli import simulate


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None,
                    reason="the two Ray nodes run in their own network namespace (Ray binds every interface "
                    "otherwise), and creating one needs root, unshare and ip")
def test_devices_run_on_both_nodes_of_a_two_node_ray_cluster():
    script = Path(__file__).with_name("ray_cluster_check.py")
    result = subprocess.run(["unshare", "--net", "--fork", sys.executable, str(script)], capture_output=True,
                            text=True, timeout=400, cwd=Path(__file__).parents[1])
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert result.returncode == 0 and lines, result.stdout[-2000:] + result.stderr[-3000:]
    outcome = json.loads(lines[-1])
    assert outcome["rounds_completed"] == 2
    assert outcome["nodes"] == 2 and len(outcome["ran_on"]) == 2, outcome


def test_ray_address_needs_the_ray_backend(tmp_path):
    config = RunConfig.resolve(dataset="sinusoid", clients=8, held_out_clients=2, clients_per_round=4, rounds=1)
    with pytest.raises(MetafleetError, match="needs --backend ray"):
        simulate(config, tmp_path / "run", backend="inprocess", ray_address="127.0.0.1:6379")
