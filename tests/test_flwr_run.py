"""The app under Flower's own CLI: `flwr run . local --stream`, as the README shows it.

`flwr run` exits 0 even when the run fails and leaves its local SuperLink running detached, so the test
judges the run by its run directory and stops the SuperLink (found by its unique control port) itself.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _processes_with_argument(argument: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argument.encode() in cmdline and not _is_zombie(entry):
            pids.append(int(entry.name))
    return pids


def _is_zombie(proc_entry: Path) -> bool:
    try:
        # the state follows the parenthesised command name, which may itself contain spaces
        return (proc_entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _processes_left_after(argument: str, seconds: float) -> list[int]:
    """SIGKILL takes effect asynchronously: a killed process stays in /proc until it has exited."""
    deadline = time.monotonic() + seconds
    while (pids := _processes_with_argument(argument)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return pids


def _stop_process_groups(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.killpg(os.getpgid(pid), signal.SIGKILL)  # the SuperLink runs detached in its own session
        except ProcessLookupError:
            pass


def test_flwr_run_trains_and_writes_the_run_directory(tmp_path):
    flwr_home = tmp_path / "flwr-home"
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    control_address = f"127.0.0.1:{_free_port()}"
    env = {
        **os.environ,
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(_free_port()),
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
        _stop_process_groups(_processes_with_argument(control_address))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    elapsed = time.monotonic() - started
    assert (run_dir / "summary.json").is_file(), f"no summary.json after {elapsed:.0f} s:\n{output[-3000:]}"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["clients"] == 6
    train_rounds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in train_rounds if r["phase"] == "train"] == [1, 2, 3]
    assert summary["personalization"]["steps"][0] == 0
    assert not _processes_left_after(control_address, 20), "the local SuperLink is still running"
