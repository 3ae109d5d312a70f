"""``metafleet client``: a device joins the fleet, running Flower's SuperNode with the metafleet ClientApp.

    metafleet client --superlink server.example.org:9092 --data /var/lib/metafleet/data \\
        --root-cert /etc/metafleet/ca.pem --key /etc/metafleet/device.key [--client-id 7] [--role train]

The device's data folder (``data.npz``, format in ``metafleet.common.device_data``) is checked before
connecting, so a missing or corrupt file fails here, with its name, not later inside a round. The SuperNode
keeps retrying while the server is away (a restart, a network outage). Telemetry and runtime dependency
installation are off.

``metafleet export-device-data --dataset watch --client 3 --out DIR`` writes a built-in data set's client in
the device format, to try a deployment on real data.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from metafleet.common.device_data import load_device_data, save_device_data
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
    parser.add_argument("--data", type=Path, required=True, metavar="DIR", help="folder holding this device's data.npz")
    parser.add_argument("--root-cert", type=Path, metavar="CA.PEM", help="the fleet's CA certificate")
    parser.add_argument("--key", type=Path, metavar="DEVICE.KEY", help="this device's private key")
    parser.add_argument("--client-id", type=int, default=0, help="this device's number in reports (default 0)")
    parser.add_argument("--role", choices=["train", "held-out"], default="train",
                        help="train: contributes updates; held-out: only evaluates personalization")
    parser.add_argument("--secure-aggregation", choices=["true", "false"],
                        help="insist on secure aggregation (true) or refuse it (false); default: follow the server")
    parser.add_argument("--local-port", type=int, default=9094,
                        help="port of the SuperNode's local API for its app processes (one per device on a host)")
    parser.add_argument("--insecure", action="store_true", help="no TLS and no key: local trials only")
    return parser


def supernode_command(args: argparse.Namespace) -> list[str]:
    executable = shutil.which("flower-supernode", path=_venv_path())
    if executable is None:
        raise MetafleetError("flower-supernode is not installed: pip install 'metafleet[client]'")
    node_config = f"data-dir='{args.data.resolve()}' client-id={args.client_id} role='{args.role}'"
    if args.secure_aggregation:
        node_config += f" secure-aggregation={args.secure_aggregation}"
    command = [executable, "--superlink", args.superlink, "--node-config", node_config,
               "--host", "127.0.0.1", "--port", str(args.local_port)]
    if args.insecure:
        return [*command, "--insecure"]
    return [*command, "--root-certificates", str(args.root_cert), "--auth-supernode-private-key", str(args.key)]


def client_command(argv: list[str]) -> int:
    args = client_parser().parse_args(argv)
    if "'" in str(args.data.resolve()):
        raise MetafleetError("the data folder's path must not contain a quote (')")
    dataset, data = load_device_data(args.data, args.client_id)
    examples = sum(len(split.support[0]) + len(split.query[0]) for split in data.splits)
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
    process = subprocess.Popen(supernode_command(args), env=env,
                               start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def stop(signum: int, _frame: object) -> None:
        os.killpg(process.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    flower_exit, tls_failed = None, False
    try:
        assert process.stdout is not None
        for line in process.stdout:
            sys.stderr.write(line)
            # flower-supernode prints Flower's exit code but exits with 1.
            tls_failed = tls_failed or "SSL/TLS handshake error" in line
            match = re.search(r"Exit Code: (\d+)", line)
            if match:
                flower_exit = int(match.group(1))
                if flower_exit in SUPERNODE_EXITS:
                    # Its SuperExec child would go on retrying a connection that can never succeed.
                    os.killpg(process.pid, signal.SIGTERM)
                    break
        code = process.wait(timeout=60)
    except KeyboardInterrupt:
        os.killpg(process.pid, signal.SIGTERM)
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
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--client", type=int, required=True, help="client id within the data set")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR")
    return parser


def export_device_data_command(argv: list[str]) -> int:
    from metafleet.common.config import RunConfig
    from metafleet.common.fleets import fleet_class

    args = export_parser().parse_args(argv)
    config = RunConfig.resolve(dataset=args.dataset)
    fleet = fleet_class(config.dataset).build(config, held_out=[])
    fleet.check_client_id(args.client)
    path = save_device_data(args.out, config.dataset, fleet.client(args.client))
    print(f"wrote {path}")
    return 0


def _venv_path() -> str:
    # The console scripts of this interpreter's environment first, then PATH: a device may run
    # .venv/bin/metafleet without activating the environment.
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
