"""The app under Flower's own CLI: `flwr run . local --stream`, as the README shows it.

`flwr run` exits 0 even when the run fails and leaves its local SuperLink running detached, so the test
judges the run by its run directory and stops the SuperLink (found by its unique control port) itself.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.processes import free_port, kill_groups, left_after, processes_with

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def test_flwr_run_trains_and_writes_the_run_directory(tmp_path):
    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    control_address = f"127.0.0.1:{free_port()}"
    env = {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": control_address.rsplit(":", 1)[1],
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    run_dir = tmp_path / "run"
    command = [
        str(Path(sys.executable).parent / "flwr"), "run", str(REPO), "local", "--stream",
        "--run-config", f'rounds=3 clients=6 clients-per-round=3 eval-every=3 out-dir="{run_dir}"',
        "--federation-config", "num-supernodes=6 client-resources-num-cpus=1",
    ]
    started = time.monotonic()
    try:
        result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=420)
    finally:
        kill_groups(processes_with(control_address))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    elapsed = time.monotonic() - started
    assert (run_dir / "summary.json").is_file(), f"no summary.json after {elapsed:.0f} s:\n{output[-3000:]}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["clients"] == 6
    train_rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in train_rounds if r["phase"] == "train"] == [1, 2, 3]
    assert summary["personalization"]["steps"][0] == 0
    assert not left_after(control_address, 20), "the local SuperLink is still running"
