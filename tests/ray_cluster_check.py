"""Run inside a fresh network namespace (tests/test_ray_cluster.py): a two-node Ray cluster on loopback, and
``metafleet simulate --ray-address`` on it; prints one JSON line saying which Ray nodes ran devices.

In its own namespace Ray has only loopback to bind to: on the host it binds its nodes to every interface
whatever ``--node-ip-address`` says (measured with Ray 2.55), which tests must not do.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from flwr.clientapp import ClientApp

PORT = 6399


class NodeRecordingClientApp(ClientApp):
    """metafleet's ClientApp, noting the Ray node each message ran on (a file per node in $RECORD_DIR)."""

    def __init__(self, inner: ClientApp):
        super().__init__()
        self.inner = inner

    def __call__(self, message, context):  # noqa: ANN001, ANN204 - Flower's ClientApp signature
        import ray

        Path(os.environ["RECORD_DIR"], ray.get_runtime_context().get_node_id()).touch()
        return self.inner(message, context)


def start_node(ray_bin: str, temp_dir: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([ray_bin, "start", "--block", "--num-cpus", "1", *args], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})


def stop(process: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            continue


def main() -> int:
    import ray

    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    ray_bin = str(Path(sys.executable).with_name("ray"))
    work = Path(tempfile.mkdtemp(prefix="metafleet-ray-cluster-"))
    os.environ["RECORD_DIR"] = str(work / "records")
    (work / "records").mkdir()
    head = start_node(ray_bin, str(work), "--head", "--port", str(PORT), "--temp-dir", str(work / "ray"),
                      "--include-dashboard", "false", "--resources", '{"head": 1}')
    worker = None
    try:
        time.sleep(8)
        worker = start_node(ray_bin, str(work), "--address", f"127.0.0.1:{PORT}", "--resources", '{"worker": 1}')
        deadline, nodes = time.monotonic() + 90, 0
        while time.monotonic() < deadline and nodes < 2:
            time.sleep(3)
            try:
                ray.init(address=f"127.0.0.1:{PORT}", log_to_driver=False, logging_level="ERROR")
                nodes = sum(1 for node in ray.nodes() if node["Alive"])
            finally:
                ray.shutdown()
        if nodes < 2:
            print(json.dumps({"error": f"only {nodes} Ray nodes came up"}))
            return 1
        from metafleet.client import app as client_module
        from metafleet.common.config import RunConfig
        from metafleet.simulations.cli import simulate

        client_module.app = NodeRecordingClientApp(client_module.app)
        config = RunConfig.resolve(dataset="sinusoid", algorithm="reptile", clients=8, held_out_clients=2,
                                   clients_per_round=6, rounds=2, eval_every=2)
        summary = simulate(config, work / "run", backend="ray", ray_address=f"127.0.0.1:{PORT}")
        ran_on = sorted(path.name for path in (work / "records").iterdir())
        print(json.dumps({"nodes": nodes, "ran_on": ran_on, "rounds_completed": summary["rounds_completed"]}))
        return 0
    finally:
        for process in (worker, head):
            if process is not None:
                stop(process)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
