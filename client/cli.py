"""``metafleet client``: a device joins the fleet, running Flower's SuperNode with the metafleet ClientApp.

    metafleet client --superlink server.example.org:9092 --data /var/lib/metafleet/data \\
        --root-cert /etc/metafleet/ca.pem --key /etc/metafleet/device.key [--client-id 7] [--role train] \\
        [--task /etc/metafleet/task.py]

The device's data folder (``data.npz``, format in ``metafleet.common.device_data``) is checked before
connecting, so a missing or corrupt file fails here, with its name, not later inside a round. With a user
task, ``--task`` names the device's own copy of it; the server refuses a device whose model's fingerprint
differs from its own. When the run ends the device writes ``meta-model.pt`` and ``personal-model.pt`` into
its data folder (``metafleet predict --model DIR`` uses them). The SuperNode
keeps retrying while the server is away (a restart, a network outage). Telemetry and runtime dependency
installation are off.

Footprint (measured by ``metafleet.simulations.bench_client``): this process never imports torch (the data
check runs in a short-lived child), and by default the ClientApp is imported once, by a long-lived "app
server" that does flower-superexec's job and forks a worker per message (``--app-process warm``), instead of
Flower's default of a fresh ``flwr-clientapp`` process, importing torch again, per message
(``--app-process fresh``).

``metafleet export-device-data --dataset watch --client 3 --out DIR`` writes a built-in data set's client in
the device format, to try a deployment on real data.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from metafleet.common.errors import MetafleetError

QUIET_ENVIRONMENT = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
# What flower-supernode's exit codes mean for a device's owner.
SUPERNODE_EXITS = {
    305: "the server refused this device's key: register its .pub file on the server "
         "(metafleet server registers every key in CERTS/devices/)",
    303: "key authentication needs TLS: give --root-cert (or run both sides --insecure for a local trial)",
}


def client_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metafleet client", description=__doc__.split("\n\n")[0])
    parser.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the server's address")
    parser.add_argument("--data", type=Path, required=True, metavar="DIR",
                        help="this device's data folder (data.npz or data.csv); the final models are written here")
    parser.add_argument("--task", help="the task this device runs: a built-in's name, FILE.py or package.module[:attr] "
                        "(default: the server's built-in task, or the task the data file names)")
    parser.add_argument("--root-cert", type=Path, metavar="CA.PEM", help="the fleet's CA certificate")
    parser.add_argument("--key", type=Path, metavar="DEVICE.KEY", help="this device's private key")
    parser.add_argument("--client-id", type=int, default=0, help="this device's number in reports (default 0)")
    parser.add_argument("--role", choices=["train", "held-out"], default="train",
                        help="train: contributes updates; held-out: only evaluates personalization")
    parser.add_argument("--secure-aggregation", choices=["true", "false"],
                        help="insist on secure aggregation (true) or refuse it (false); default: follow the server")
    parser.add_argument("--torch-device", metavar="DEVICE",
                        help="where training and personalization compute: cpu (default) or cuda on a Jetson")
    parser.add_argument("--local-port", type=int, default=9094,
                        help="port of the SuperNode's local API for its app processes (one per device on a host)")
    parser.add_argument("--insecure", action="store_true", help="no TLS and no key: local trials only")
    parser.add_argument("--app-process", choices=["warm", "fresh"], default="warm",
                        help="warm: the ClientApp is imported once and each message runs in a fork of that process "
                             "(default); fresh: Flower's own way, a new flwr-clientapp process per message")
    return parser


def supernode_command(args: argparse.Namespace) -> list[str]:
    executable = shutil.which("flower-supernode", path=_venv_path())
    if executable is None:
        raise MetafleetError("flower-supernode is not installed: pip install 'metafleet[client]'")
    node_config = f"data-dir='{args.data.resolve()}' client-id={args.client_id} role='{args.role}'"
    if args.task:
        node_config += f" task='{args.task}'"
    if args.secure_aggregation:
        node_config += f" secure-aggregation={args.secure_aggregation}"
    if args.torch_device:
        node_config += f" torch-device='{args.torch_device}'"
    command = [executable, "--superlink", args.superlink, "--node-config", node_config,
               "--host", "127.0.0.1", "--port", str(args.local_port)]
    if args.app_process == "warm":
        command += ["--isolation", "process"]  # the app server, not a flower-superexec child, runs the app
    if args.insecure:
        return [*command, "--insecure"]
    return [*command, "--root-certificates", str(args.root_cert), "--auth-supernode-private-key", str(args.key)]


def app_server_command(args: argparse.Namespace, supernode_pid: int) -> list[str]:
    return [sys.executable, "-m", "metafleet.client.cli", "--app-server", f"127.0.0.1:{args.local_port}",
            str(supernode_pid)]


def client_command(argv: list[str]) -> int:
    args = client_parser().parse_args(argv)
    if "'" in str(args.data.resolve()):
        raise MetafleetError("the data folder's path must not contain a quote (')")
    if args.task and Path(args.task).suffix == ".py":
        args.task = str(Path(args.task).resolve())
    if args.task and "'" in args.task:
        raise MetafleetError("the task's path must not contain a quote (')")
    dataset, examples = check_data_in_child(args.data, args.client_id, args.torch_device, args.task)
    if args.insecure:
        print("metafleet client: WARNING: --insecure: no TLS and no device key; anyone on the network can read "
              "and impersonate. For local trials only.", file=sys.stderr)
    else:
        for option, path in (("--root-cert", args.root_cert), ("--key", args.key)):
            if path is None:
                raise MetafleetError(f"{option} is required (or --insecure for a local trial)")
            if not path.is_file():
                raise MetafleetError(f"{option} {path} does not exist")
    print(f"metafleet client: {dataset} data checked ({examples} examples); connecting to {args.superlink} as "
          f"client {args.client_id} ({args.role})", file=sys.stderr)
    # flower-supernode starts flower-superexec by name: this environment's scripts must be on PATH.
    env = {**os.environ, **QUIET_ENVIRONMENT, "PATH": _venv_path()}
    # Both write into one pipe, read here; the app server joins the SuperNode's process group, so that one
    # signal to the group (a stop, or a service manager's kill) ends the device's every process.
    read_end, write_end = os.pipe()
    process = subprocess.Popen(supernode_command(args), env=env, preexec_fn=os.setpgrp, stdout=write_end,
                               stderr=subprocess.STDOUT)
    if args.app_process == "warm":
        subprocess.Popen(app_server_command(args, process.pid), env=env, stdout=write_end, stderr=subprocess.STDOUT,
                         preexec_fn=lambda: os.setpgid(0, process.pid))
    os.close(write_end)

    def stop_group() -> None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass

    signal.signal(signal.SIGTERM, lambda _signum, _frame: stop_group())
    flower_exit, tls_failed = None, False
    try:
        with open(read_end, errors="replace") as output:
            for line in output:
                sys.stderr.write(line)
                # flower-supernode prints Flower's exit code but exits with 1.
                tls_failed = tls_failed or "SSL/TLS handshake error" in line
                match = re.search(r"Exit Code: (\d+)", line)
                if match:
                    flower_exit = int(match.group(1))
                    if flower_exit in SUPERNODE_EXITS:
                        # Its SuperExec would go on retrying a connection that can never succeed.
                        stop_group()
                        break
        code = process.wait(timeout=60)
    except KeyboardInterrupt:
        stop_group()
        code = process.wait(timeout=30)
    if tls_failed:
        raise MetafleetError(f"the TLS handshake with {args.superlink} failed: {args.root_cert} is not the CA that "
                             "signed the server's certificate, or that certificate does not name this address")
    if flower_exit in SUPERNODE_EXITS:
        raise MetafleetError(SUPERNODE_EXITS[flower_exit])
    return code


def export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metafleet export-device-data",
                                     description="Write a built-in data set's client as a device's data folder.")
    parser.add_argument("--dataset", required=True, help="a built-in task (or any task with data of its own)")
    parser.add_argument("--client", type=int, required=True, help="client id within the data set")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR")
    return parser


def export_device_data_command(argv: list[str]) -> int:
    from metafleet.common.config import RunConfig
    from metafleet.common.device_data import save_device_data
    from metafleet.common.fleets import make_fleet

    args = export_parser().parse_args(argv)
    config = RunConfig.resolve(task=args.dataset)
    fleet = make_fleet(config)
    fleet.check_client_id(args.client)
    path = save_device_data(args.out, config.dataset, fleet.client(args.client))
    print(f"wrote {path}")
    return 0


def _venv_path() -> str:
    # The console scripts of this interpreter's environment first, then PATH: a device may run
    # .venv/bin/metafleet without activating the environment.
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def check_data_in_child(folder: Path, client_id: int, torch_device: str | None = None,
                        task: str | None = None) -> tuple[str, int]:
    """(data set, examples) of the device's data.npz, checked in a child process: this one stays for as long
    as the device is in the fleet, and the check imports torch, which would stay resident (about 220 MB).
    The child also checks the torch device (``torch_device``, else $METAFLEET_TORCH_DEVICE), so a device
    that cannot compute where it is told to stops before it joins the fleet."""
    result = subprocess.run([sys.executable, "-m", "metafleet.client.cli", "--check-data", str(folder),
                             str(client_id), torch_device or "", task or ""], capture_output=True, text=True,
                            timeout=600)
    lines = result.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        raise MetafleetError(f"checking {folder} failed:\n{result.stderr.strip()[-2000:]}") from None
    if "error" in answer:
        raise MetafleetError(answer["error"])
    return answer["dataset"], answer["examples"]


def _check_data(folder: str, client_id: str, torch_device: str, task: str) -> int:
    from metafleet.client.app import TORCH_DEVICE_ENV, resolve_torch_device
    from metafleet.common.device_data import load_device_data

    try:
        resolve_torch_device(torch_device or os.environ.get(TORCH_DEVICE_ENV, "cpu"))
        dataset, data = load_device_data(Path(folder), int(client_id), task or None)
    except MetafleetError as error:
        print(json.dumps({"error": str(error)}))
        return 2
    examples = sum(len(split.support[0]) + len(split.query[0]) for split in data.splits)
    print(json.dumps({"dataset": dataset, "examples": examples}))
    return 0


def app_server(runtime_api_address: str, supernode_pid: int) -> None:
    """flower-superexec's loop, in a process that has imported the ClientApp (torch included) once: each task
    runs Flower's own ``run_clientapp`` in a fork of it, not in a new ``flwr-clientapp`` process that starts
    Python and imports everything again. Copy-on-write shares the imported pages between the two.

    Flower 1.42 has no setting for this (its warm executors are for Kubernetes and other task types), so the
    subprocess executor's ``launch`` is replaced; the pin flwr==1.42.* keeps that internal API in place."""
    import functools
    import gc
    import threading
    import time
    import warnings

    from flwr.supercore.constant import TaskType
    from flwr.supercore.exit.exit_handler import registered_exit_handlers
    from flwr.supercore.superexec.executor import LaunchResult, SubprocessExecutor
    from flwr.supercore.superexec.run_superexec import run_superexec
    from flwr.supernode.runtime import run_clientapp as runtime

    import metafleet.client.app  # noqa: F401  torch, Flower's ClientApp and the handlers, imported once here

    fresh_launch = SubprocessExecutor.launch

    def launch(self, spec):  # noqa: ANN001, ANN202 - Flower's ExecutionSpec and LaunchResult
        if spec.task_type != TaskType.CLIENT_APP:
            return fresh_launch(self, spec)
        if os.fork():
            return LaunchResult.accepted()
        code = 1
        try:
            registered_exit_handlers.clear()  # the app server's, not this worker's to run
            runtime.run_clientapp(runtime_api_address=spec.runtime_api_address, token=spec.token,
                                  insecure=spec.insecure, parent_pid=spec.parent_pid, runtime_dependency_install=False)
        except SystemExit as exit_:  # run_clientapp always ends in sys.exit
            code = 0 if exit_.code is None else exit_.code if isinstance(exit_.code, int) else 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)  # never return into the app server's loop

    def reap(self) -> None:  # noqa: ANN001
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass

    def watch_supernode() -> None:
        # Flower's parent monitor takes a zombie for alive, and the SuperNode stays one until `metafleet client`
        # reaps it, which it does only once this process has closed the output pipe.
        while True:
            time.sleep(0.5)
            try:
                with open(f"/proc/{supernode_pid}/stat") as handle:
                    if handle.read().rsplit(")", 1)[1].split()[0] != "Z":
                        continue
            except OSError:
                pass
            os.kill(os.getpid(), signal.SIGTERM)
            return

    SubprocessExecutor.launch = launch
    SubprocessExecutor.reconcile = reap
    # A worker starts before its SuperNode has pulled the message from the SuperLink, and Flower's first retry
    # of a missing object waits 1 s (a fresh flwr-clientapp, seconds in its imports, never finds one missing).
    runtime.pull_and_inflate_object_from_tree = functools.partial(
        runtime.pull_and_inflate_object_from_tree, initial_backoff=0.05, backoff_cap=1.0)
    # Each message waits up to one poll of the SuperNode before it starts (Flower's default 1 s); polling the
    # local SuperNode five times a second costs about 1 % of a core.
    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2")
    gc.freeze()  # the workers' garbage collections then leave the shared pages alone
    # Python 3.12+ warns on every fork beside a thread; the watcher below holds no lock a worker could need.
    warnings.filterwarnings("ignore", message=r".*multi-threaded.*fork", category=DeprecationWarning)
    threading.Thread(target=watch_supernode, daemon=True).start()
    run_superexec(runtime_api_address=runtime_api_address, insecure=True)


if __name__ == "__main__":  # the device's helper processes, started by client_command
    if sys.argv[1:2] == ["--check-data"]:
        sys.exit(_check_data(*sys.argv[2:6]))
    if sys.argv[1:2] == ["--app-server"]:
        app_server(sys.argv[2], int(sys.argv[3]))
