"""``metafleet server``: the fleet's server process on Flower's own SuperLink, TLS and device keys by default.

    metafleet server --certs certs --host 0.0.0.0 --port 9092 --out runs/watch \\
        --dataset watch --algorithm reptile --clients 10 --rounds 100
    metafleet server --certs certs --task my_task.py --clients 20 --rounds 100 --out runs/mine

Starts ``flower-superlink`` with TLS (``CERTS/ca.pem``, ``server.pem``, ``server.key``) and SuperNode
authentication, registers every device key in ``CERTS/devices/*.pub``, submits the meta-learning run, follows
it, and leaves the run directory as ``metafleet simulate`` does. ``--clients`` is the number of devices
expected (held-out ones included); training starts when they are connected or after ``--node-wait-seconds``.
A device whose model's fingerprint differs from the server's task is refused (the others go on). When the
run ends, every device receives the final meta-model and keeps it with its personal model.
Stopping it (Ctrl-C, SIGTERM) stops the SuperLink and the run it started; ``--resume DIR`` continues a
stopped run from its last checkpoint. ``--insecure`` (no TLS, no device keys) is for local trials.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from metafleet.common.cli_options import add_learning_arguments, config_from_arguments
from metafleet.common.config import RunConfig
from metafleet.common.errors import MetafleetError
from metafleet.server.appdir import write_app_dir
from metafleet.server.report import print_summary
from metafleet.server.rundir import RunDirectory, start_or_resume

CONNECTION = "metafleet"
QUIET_ENVIRONMENT = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
START_SECONDS = 60.0


def server_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metafleet server", description=__doc__.split("\n\n")[0])
    add_learning_arguments(parser)
    parser.add_argument("--certs", type=Path, default=Path("certs"), help="what metafleet certs wrote (default certs/)")
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on (default all interfaces)")
    parser.add_argument("--port", type=int, default=9092, help="the one port devices and tools connect to")
    parser.add_argument("--out", type=Path, help="run directory (default runs/DATASET-ALGORITHM-TIME)")
    parser.add_argument("--resume", type=Path, metavar="DIR", help="continue the run in DIR from its checkpoint")
    parser.add_argument("--continue", dest="continue_run", action="store_true",
                        help="resume the run in --out if it has a checkpoint, else start it (for a service manager "
                        "that restarts the server after a failure)")
    parser.add_argument("--node-wait-seconds", type=float, default=300.0,
                        help="how long to wait for the expected devices before training with those present")
    parser.add_argument("--round-timeout", type=float, default=600.0, help="seconds a round waits for replies")
    parser.add_argument("--reply-poll-seconds", type=float, default=0.2,
                        help="how often the server asks the SuperLink for replies (default 0.2; Flower's own wait "
                        "is 3 s, which a secure round, four exchanges, pays four times)")
    parser.add_argument("--insecure", action="store_true", help="no TLS, no device keys: local trials only")
    return parser


def server_command(argv: list[str]) -> int:
    args = server_parser().parse_args(argv)
    if not 0 <= args.reply_poll_seconds <= 60:
        raise MetafleetError(f"--reply-poll-seconds must be between 0 (Flower's own 3 s wait) and 60, got "
                             f"{args.reply_poll_seconds}")
    if args.continue_run:
        if not args.out:
            raise MetafleetError("--continue needs --out DIR")
        if RunDirectory(args.out).latest_checkpoint() is not None:
            args.resume = args.out
    config, out = start_or_resume(args.resume, args.out, lambda: config_from_arguments(args))
    files = _check_certificates(args.certs) if not args.insecure else None
    if args.insecure:
        print("metafleet server: WARNING: --insecure: no TLS and no device authentication; any machine that can "
              "reach the port can join the fleet and read the model. For local trials only.", file=sys.stderr)
    summary = run_server(config, Path(out), files, args.host, args.port, resume=bool(args.resume),
                         node_wait_seconds=args.node_wait_seconds, round_timeout=args.round_timeout,
                         reply_poll_seconds=args.reply_poll_seconds)
    print_summary(summary)
    return 0


def _check_certificates(folder: Path) -> dict[str, Path | list[Path]]:
    files: dict[str, Path | list[Path]] = {name: folder / f"{name}" for name in ("ca.pem", "server.pem", "server.key")}
    missing = [str(path) for path in files.values() if not Path(str(path)).is_file()]
    if missing:
        raise MetafleetError(f"missing {', '.join(missing)}: create them with metafleet certs --out {folder} "
                             "--hosts YOUR.SERVER.NAME --devices NAME,... (or --insecure for a local trial)")
    keys = sorted((folder / "devices").glob("*.pub"))
    if not keys:
        raise MetafleetError(f"no device keys in {folder / 'devices'}: add devices with metafleet certs --out {folder} "
                             "--devices NAME,...")
    files["device-keys"] = keys
    return files


def run_server(
    config: RunConfig, out: Path, files: dict | None, host: str, port: int, resume: bool = False,
    node_wait_seconds: float = 300.0, round_timeout: float = 600.0, reply_poll_seconds: float = 0.2,
) -> dict:
    """Start the SuperLink, register the devices, run to the end; returns summary.json's content."""
    out.mkdir(parents=True, exist_ok=True)
    connect_host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    address = f"{connect_host}:{port}"
    with tempfile.TemporaryDirectory(prefix="metafleet-server-") as work:
        flwr_home = Path(work) / "flwr-home"
        flwr_home.mkdir()
        connection = [f"[superlink]\ndefault = \"{CONNECTION}\"\n\n[superlink.{CONNECTION}]\naddress = \"{address}\""]
        connection.append("insecure = true" if files is None else f"root-certificates = \"{files['ca.pem']}\"")
        (flwr_home / "config.toml").write_text("\n".join(connection) + "\n")
        env = {**os.environ, **QUIET_ENVIRONMENT, "FLWR_HOME": str(flwr_home), "PATH": _venv_path()}
        superlink_log = out / "superlink.log"
        superlink = subprocess.Popen(
            _superlink_command(files, host, port), env=env, start_new_session=True,
            stdout=superlink_log.open("ab"), stderr=subprocess.STDOUT,
        )
        run = None
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

        def stop(signum: int, _frame: object) -> None:
            raise KeyboardInterrupt

        for sig in previous:
            signal.signal(sig, stop)
        try:
            _wait_until_listening(connect_host, port, superlink, superlink_log)
            for key in (files or {}).get("device-keys", []):
                _register(key, env)
            run_config = {
                **config.to_run_config(), "out-dir": str(out.resolve()), "resume": resume,
                "node-wait-seconds": node_wait_seconds, "round-timeout": round_timeout,
                "reply-poll-seconds": reply_poll_seconds,
                # Every device keeps the final meta-model and its personal model in its own folder.
                "deliver-models": True,
            }
            app_dir = write_app_dir(Path(work) / "app", run_config)
            print(f"metafleet server: listening on {host}:{port} ({'insecure' if files is None else 'TLS, device keys'}"
                  f"); waiting for {config.clients} devices, {config.rounds} rounds of {config.algorithm} -> {out}",
                  file=sys.stderr)
            run = subprocess.Popen([_tool("flwr"), "run", str(app_dir), CONNECTION, "--stream"], env=env,
                                   start_new_session=True)
            run.wait()
        except KeyboardInterrupt:
            print("metafleet server: stopping", file=sys.stderr)
            raise
        finally:
            for process in (run, superlink):
                if process is not None and process.poll() is None:
                    os.killpg(process.pid, signal.SIGTERM)
            for process in (run, superlink):
                if process is not None:
                    try:
                        process.wait(timeout=20)
                    except subprocess.TimeoutExpired:
                        os.killpg(process.pid, signal.SIGKILL)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    summary_file = out / "summary.json"
    if not summary_file.is_file():
        raise MetafleetError(f"the run ended without writing {summary_file}; see {superlink_log}")
    return json.loads(summary_file.read_text())


def _superlink_command(files: dict | None, host: str, port: int) -> list[str]:
    command = [_tool("flower-superlink"), "--host", host, "--port", str(port),
               "--disable-runtime-dependency-installation"]
    if files is None:
        return [*command, "--insecure"]
    return [*command, "--ssl-ca-certfile", str(files["ca.pem"]), "--ssl-certfile", str(files["server.pem"]),
            "--ssl-keyfile", str(files["server.key"]), "--enable-supernode-auth"]


def _wait_until_listening(host: str, port: int, process: subprocess.Popen, log_file: Path) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log_file.read_text(errors="replace")[-1500:]
            raise MetafleetError(f"flower-superlink exited with {process.returncode}:\n{tail}")
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            time.sleep(0.3)
    raise MetafleetError(f"flower-superlink did not listen on {host}:{port} within {START_SECONDS:.0f} s")


def _register(key: Path, env: dict[str, str]) -> None:
    result = subprocess.run([_tool("flwr"), "supernode", "register", str(key), CONNECTION], env=env,
                            capture_output=True, text=True, timeout=120)
    output = result.stdout + result.stderr
    if result.returncode != 0 or "registered successfully" not in output:
        raise MetafleetError(f"could not register device key {key}: {output.strip()[-500:]}")
    print(f"metafleet server: registered {key.stem}", file=sys.stderr)


def _tool(name: str) -> str:
    path = shutil.which(name, path=_venv_path())
    if path is None:
        raise MetafleetError(f"{name} is not installed: pip install 'metafleet[server]'")
    return path


def _venv_path() -> str:
    # flwr starts flower-superlink and flwr-serverapp by name: this interpreter's scripts must be on PATH.
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
