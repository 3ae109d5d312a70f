"""Client footprint: memory and round latency of one deployed device, and the size of a device install.

    python -m metafleet.simulations.bench_client --out bench-out/client [--variants warm,fresh] [--rounds 8]
    python -m metafleet.simulations.bench_client --out bench-out/client --install-size

Runs a real fleet on 127.0.0.1 with TLS and device keys: ``metafleet server`` and three ``metafleet client``
devices on the smartwatch data (clients 0 and 1 train, client 2 is held out; both training devices train
every round). The measured device (client 0) is pinned to CPU 1 with ``taskset``, a stand-in for a
single-core edge device; the server and the two other devices share CPU 0. Reported for the measured device:

- memory of its whole client side: the ``metafleet client`` process and every descendant (flower-supernode,
  flower-superexec and each flwr-clientapp, or the app server and its forked workers), RSS and PSS summed
  from /proc/PID/smaps_rollup every ``--interval`` s; the peak over the training rounds, with each kind of
  process's share at that moment, and the peak while idle (only the long-lived processes). PSS counts a page
  shared by several processes once, so its sum is what the device really occupies;
- per training round (rounds 1..R-1; round R also evaluates the held-out device): the server's round time,
  the handler's own time ("client K: train took X s", logged by the ClientApp: computing) and the rest
  (waiting), split into: before the SuperNode pulls the message (its poll of the SuperLink), on the device
  around the handler (hand-over to the app process, its start and imports where it is a fresh one, the
  reply's hand-back to the SuperNode), and after the reply is sent (the server's poll, the other device).
  "reply" is the time from the round's start to this device's reply reaching the SuperLink. The round's start
  is the moment its metrics row appeared less its "seconds", sampled every ``--interval`` s;
- CPU seconds of the device's processes over the run, by kind.

Variants change only the measured device: ``warm`` is ``metafleet client`` as shipped (its app server forks
a worker per message from a process that imported the ClientApp once); ``fresh`` is Flower's own way
(``--app-process fresh``: flower-superexec starts a new flwr-clientapp per message); ``fresh-poll`` that with
Flower's ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` at 0.2 s instead of 1 s; ``fresh-torch-parent`` that with the
``metafleet client`` process holding torch, as it did before issue 6 (it checked the data itself);
``warm-supernode-poll`` the default with the SuperNode's hard-coded 3 s wait between pulls replaced by 0.3 s
(a patch of Flower's module, for diagnosis only: it is not a setting, and it multiplies the polls a
SuperLink serves). ``--install-size`` builds a throwaway virtual environment with ``flwr==1.42.*``, numpy
and metafleet (no torch) and measures its site-packages.

Every process is started in its own session and killed with its descendants at the end or at ``--timeout``.
Prints a table and writes ``client.json`` (``install.json`` for ``--install-size``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from metafleet.simulations.bench_overhead import kill_tree, load_average, median, process_tree

MEASURED_CPU, OTHER_CPU = 1, 0
QUIET = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
         "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONUNBUFFERED": "1"}
FRESH = ["--app-process", "fresh"]
VARIANTS: dict[str, dict[str, Any]] = {
    "fresh-torch-parent": {"args": FRESH, "env": {}, "parent_imports_torch": True},
    "fresh": {"args": FRESH, "env": {}},
    "fresh-poll": {"args": FRESH, "env": {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2"}},
    "warm": {"args": [], "env": {}},
    "warm-supernode-poll": {"args": [], "env": {}, "supernode_poll": 0.3},
}
# The kinds of process on a device, by what their command line runs (a forked app worker has its app
# server's command line, and that server for a parent).
ROLES = (("flwr-clientapp", "clientapp"), ("flower-superexec", "superexec"), ("flower-supernode", "supernode"),
         ("--supernode-poll", "supernode"), ("--app-server", "app server"), ("--check-data", "data check"))
TRAIN_TOOK = re.compile(r"client (\d+): train took ([0-9.]+) s")


# -- /proc sampling ----------------------------------------------------------------------------------------
def smaps_rollup(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in KiB."""
    rss = pss = 0
    with open(f"/proc/{pid}/smaps_rollup") as handle:
        for line in handle:
            if line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith("Pss:"):
                pss = int(line.split()[1])
    return rss, pss


def role_of(pid: int, root: int) -> str:
    if pid == root:
        return "metafleet client"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            cmdline = handle.read().replace(b"\0", b" ").decode(errors="replace")
        with open(f"/proc/{pid}/stat") as handle:
            ppid = int(handle.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return "other"
    role = next((role for text, role in ROLES if text in cmdline), "other")
    if role == "app server" and ppid != root and role_of(ppid, root) == "app server":
        return "app worker"
    return role


def device_memory(root: int) -> dict[str, Any]:
    """RSS and PSS of ``root`` and its descendants in MiB: in all and by kind of process ([rss, pss, count])."""
    by_role: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0])
    for pid in process_tree(root):
        try:
            rss, pss = smaps_rollup(pid)
        except (OSError, ValueError):  # it ended between listing and reading, or is a zombie
            continue
        if rss == 0:  # a zombie's rollup is empty
            continue
        entry = by_role[role_of(pid, root)]
        entry[0] += rss / 1024
        entry[1] += pss / 1024
        entry[2] += 1
    return {"rss": sum(e[0] for e in by_role.values()), "pss": sum(e[1] for e in by_role.values()),
            "processes": int(sum(e[2] for e in by_role.values())),
            "by_role": {role: [round(e[0], 1), round(e[1], 1), int(e[2])] for role, e in by_role.items()}}


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


# -- the fleet -----------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare(work: Path) -> None:
    """Certificates for the server and three devices, and the devices' data folders."""
    from metafleet.common.config import RunConfig
    from metafleet.common.device_data import save_device_data
    from metafleet.common.task import load_task
    from metafleet.server.certs import make_certificates

    make_certificates(work / "certs", [], ["dev0", "dev1", "dev2"])
    config = RunConfig.resolve(dataset="watch")
    fleet = load_task("watch").make_fleet(config, [])
    for client in range(3):
        save_device_data(work / f"data{client}", "watch", fleet.client(client))


def _start(command: list[str], cpu: int, env: dict[str, str], output) -> subprocess.Popen:
    return subprocess.Popen(["taskset", "-c", str(cpu), *command], env=env, stdout=output,
                            stderr=subprocess.STDOUT, start_new_session=True)


class LineReader(threading.Thread):
    """Each line of a process's output with the time it arrived, also copied to a log file."""

    def __init__(self, process: subprocess.Popen, log_file: Path):
        super().__init__(daemon=True)
        self.process, self.log_file, self.lines = process, log_file, []

    def run(self) -> None:
        with self.log_file.open("w") as log:
            for raw in self.process.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                self.lines.append((time.time(), line))
                log.write(f"{self.lines[-1][0]:.3f} {line}\n")
                log.flush()


def stop(processes: list[subprocess.Popen], grace: float = 20.0) -> None:
    """SIGTERM each process's group, then SIGKILL whatever of its tree is left."""
    trees = {p.pid: process_tree(p.pid) for p in processes if p.poll() is None}
    for process in processes:
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for root, tree in trees.items():
        kill_tree(root)
        for pid in tree:  # descendants in a session of their own (the SuperNode's) outlive their group's kill
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def processes_with(text: str) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as handle:
                cmdline = handle.read().replace(b"\0", b" ")
            with open(f"/proc/{entry.name}/stat") as handle:
                state = handle.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if text.encode() in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def run_fleet(work: Path, variant: str, rounds: int, timeout: float, interval: float) -> dict[str, Any]:
    settings = VARIANTS[variant]
    folder = work / variant
    folder.mkdir()
    port = free_port()
    local_ports = [free_port() for _ in range(3)]
    base_env = {**os.environ, **QUIET}
    metafleet = [sys.executable, "-m", "metafleet.common.cli"]
    server = _start([*metafleet, "server", "--certs", str(work / "certs"), "--host", "127.0.0.1", "--port", str(port),
                     "--out", str(folder / "run"), "--dataset", "watch", "--algorithm", "reptile", "--clients", "3",
                     "--held-out-clients", "1", "--clients-per-round", "2", "--rounds", str(rounds),
                     "--eval-every", str(rounds), "--node-wait-seconds", "90", "--round-timeout", "120"],
                    OTHER_CPU, base_env, (folder / "server.log").open("wb"))
    processes = [server]
    samples: list[dict[str, Any]] = []
    rows_seen: list[tuple[float, dict[str, Any]]] = []
    cpu_by_pid: dict[int, tuple[str, float]] = {}
    started = time.time()
    timed_out = False
    load_before = load_average()
    reader = None
    try:
        if not _wait(lambda: "listening on" in _read(folder / "server.log") or server.poll() is not None, 90):
            raise RuntimeError("the server did not start within 90 s")

        def device(index: int, cpu: int, env: dict[str, str], output) -> subprocess.Popen:
            role = "held-out" if index == 2 else "train"
            args = ["--superlink", f"127.0.0.1:{port}", "--data", str(work / f"data{index}"),
                    "--root-cert", str(work / "certs" / "ca.pem"), "--key", str(work / "certs" / "devices" /
                                                                                 f"dev{index}.key"),
                    "--client-id", str(index), "--role", role, "--local-port", str(local_ports[index])]
            if index != 0:
                return _start([*metafleet, "client", *args], cpu, env, output)
            args += settings["args"]
            if settings.get("supernode_poll") or settings.get("parent_imports_torch"):
                options = {"supernode_poll": settings.get("supernode_poll"),
                           "parent_imports_torch": settings.get("parent_imports_torch", False)}
                command = [sys.executable, "-m", "metafleet.simulations.bench_client", "--device",
                           json.dumps(options), *args]
            else:
                command = [*metafleet, "client", *args]
            return _start(command, cpu, env, output)

        for index in (1, 2):
            processes.append(device(index, OTHER_CPU, base_env, (folder / f"device{index}.log").open("wb")))
        measured = device(0, MEASURED_CPU, {**base_env, **settings["env"]}, subprocess.PIPE)
        processes.append(measured)
        reader = LineReader(measured, folder / "device0.log")
        reader.start()
        metrics_file = folder / "run" / "metrics.jsonl"
        while server.poll() is None:
            now = time.time()
            if now - started > timeout:
                timed_out = True
                break
            memory = device_memory(measured.pid)
            samples.append({"t": round(now, 3), **memory})
            for pid in process_tree(measured.pid):
                try:
                    seconds = cpu_seconds(pid)
                except (OSError, ValueError, IndexError):
                    continue
                # A process that is exiting has no command line left ("other"): keep the role it had.
                role = role_of(pid, measured.pid)
                if role == "other" and pid in cpu_by_pid:
                    role = cpu_by_pid[pid][0]
                cpu_by_pid[pid] = (role, seconds)
            if metrics_file.is_file():
                lines = metrics_file.read_text().splitlines()
                for line in lines[len(rows_seen):]:
                    try:
                        rows_seen.append((now, json.loads(line)))
                    except json.JSONDecodeError:  # a row being written; read it next time
                        break
            time.sleep(interval)
        server_code = server.wait(timeout=60) if not timed_out else None
    finally:
        stop(list(reversed(processes)))
        if reader is not None:
            reader.join(timeout=10)
    load_after = load_average()
    left = processes_with(f"127.0.0.1:{port}") + [pid for p in local_ports for pid in processes_with(f"--port {p}")]
    lines = reader.lines if reader is not None else []
    result = analyse(lines, rows_seen, samples, rounds)
    cpu: dict[str, float] = defaultdict(float)
    for role, seconds in cpu_by_pid.values():
        cpu[role] += seconds
    summary_file = folder / "run" / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else None
    ok = server_code == 0 and summary is not None and summary["rounds_completed"] == rounds
    return {
        "variant": variant, "client_args": settings["args"], "env": settings["env"],
        "supernode_poll": settings.get("supernode_poll"),
        "parent_imports_torch": settings.get("parent_imports_torch", False),
        "ok": ok and not timed_out, "server_returncode": server_code, "timed_out": timed_out,
        "rounds": rounds, "seconds": round(time.time() - started, 1), "load_before": load_before,
        "load_after": load_after, "left_running": left,
        "cpu_seconds_by_role": {role: round(seconds, 2) for role, seconds in cpu.items()},
        "server_log_tail": "" if ok else _read(folder / "server.log")[-3000:],
        "device_log_tail": "" if ok else "\n".join(line for _, line in lines[-40:]),
        **result,
        "memory_samples": [[s["t"], round(s["rss"], 1), round(s["pss"], 1), s["processes"]] for s in samples],
    }


def analyse(lines: list[tuple[float, str]], rows: list[tuple[float, dict[str, Any]]], samples: list[dict[str, Any]],
            rounds: int) -> dict[str, Any]:
    """The device's train messages (pulled, handler time, reply sent) matched in order to the server's rounds."""
    messages: list[dict[str, Any]] = []
    current = None
    for t, line in lines:
        if "Receiving: " in line:
            kind = line.split("Receiving: ", 1)[1].split()[0]
            current = {"type": kind, "received": t}
            messages.append(current)
        elif current is not None and (match := TRAIN_TOOK.search(line)):
            current["compute"] = float(match.group(2))
        elif current is not None and "Sent successfully" in line and "sent" not in current:
            current["sent"] = t
    trains = [m for m in messages if m["type"] == "train"]
    train_rows = [(t, row) for t, row in rows if row.get("phase") == "train"]
    per_round = []
    for (seen, row), message in zip(train_rows, trains, strict=False):
        end, seconds = seen, float(row["seconds"])
        begin = end - seconds
        entry = {"round": row["round"], "round_s": round(seconds, 3), "evaluates": row["round"] == rounds}
        if "compute" in message and "sent" in message:
            span = message["sent"] - message["received"]
            entry.update(compute_s=message["compute"], waiting_s=round(seconds - message["compute"], 3),
                         before_pull_s=round(message["received"] - begin, 3),
                         on_device_s=round(span - message["compute"], 3), after_send_s=round(end - message["sent"], 3),
                         device_span_s=round(span, 3), reply_s=round(message["sent"] - begin, 3))
        per_round.append(entry)
    clean = [r for r in per_round if not r["evaluates"] and "compute_s" in r]

    def med(key: str) -> float | None:
        value = median([r[key] for r in clean])
        return None if value is None else round(value, 3)

    # Memory "during rounds": from the first train message's arrival to the last reply, on the device's clock.
    done = [m for m in trains if "sent" in m]
    window = [s for s in samples if done and done[0]["received"] - 1 <= s["t"] <= done[-1]["sent"] + 0.5]
    peak_pss = max(window or samples, key=lambda s: s["pss"], default=None)
    peak_rss = max(window or samples, key=lambda s: s["rss"], default=None)
    # Idle: connected, and nothing but the long-lived processes alive (an exiting one shows as "other").
    idle = [s for s in samples if "supernode" in s["by_role"]
            and set(s["by_role"]) <= {"metafleet client", "supernode", "superexec", "app server"}]
    return {
        "messages": {kind: sum(m["type"] == kind for m in messages) for kind in {m["type"] for m in messages}},
        "per_round": per_round,
        "median_round_s": med("round_s"), "median_compute_s": med("compute_s"), "median_waiting_s": med("waiting_s"),
        "median_before_pull_s": med("before_pull_s"), "median_on_device_s": med("on_device_s"),
        "median_after_send_s": med("after_send_s"), "median_device_span_s": med("device_span_s"),
        "median_reply_s": med("reply_s"),
        "peak_pss_mb": round(peak_pss["pss"], 1) if peak_pss else None,
        "peak_rss_mb": round(peak_rss["rss"], 1) if peak_rss else None,
        "peak_pss_by_role": peak_pss["by_role"] if peak_pss else None,
        "peak_rss_by_role": peak_rss["by_role"] if peak_rss else None,
        "max_processes": max((s["processes"] for s in window or samples), default=None),
        "idle_pss_mb": round(max(s["pss"] for s in idle), 1) if idle else None,
        "idle_pss_by_role": max(idle, key=lambda s: s["pss"])["by_role"] if idle else None,
    }


def _wait(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.3)
    return False


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


# -- modified devices: as metafleet client was before issue 6, or with a shorter SuperNode poll ----------------
def modified_device(options_json: str, client_args: list[str]) -> int:
    """``metafleet client``, its process holding torch as it did when it checked the data itself, or its
    flower-supernode waiting ``supernode_poll`` s instead of 3 s when the SuperLink had nothing."""
    from metafleet.client import cli

    options = json.loads(options_json)
    if options["parent_imports_torch"]:
        from metafleet.common.device_data import load_device_data

        folder = client_args[client_args.index("--data") + 1]
        load_device_data(Path(folder), int(client_args[client_args.index("--client-id") + 1]))
    if options["supernode_poll"]:
        original = cli.supernode_command

        def patched(args: argparse.Namespace) -> list[str]:
            return [sys.executable, "-m", "metafleet.simulations.bench_client", "--supernode-poll",
                    str(options["supernode_poll"]), *original(args)[1:]]

        cli.supernode_command = patched
    from metafleet.common.cli import main as metafleet_main

    return metafleet_main(["client", *client_args])


def supernode_with_poll(poll: float, supernode_args: list[str]) -> None:
    import types

    import flwr.supernode.start_client_internal as loop
    from flwr.supernode.cli import flower_supernode

    real_time = loop.time
    # The loop sleeps 3 s after an empty pull and 0.5 s while the ClientApp works: shorten only the first.
    loop.time = types.SimpleNamespace(**{name: getattr(real_time, name) for name in dir(real_time)
                                         if not name.startswith("__")})
    loop.time.sleep = lambda seconds: real_time.sleep(poll if seconds >= 3 else seconds)
    sys.argv = ["flower-supernode", *supernode_args]
    flower_supernode()


# -- install size ----------------------------------------------------------------------------------------------
def directory_mb(path: Path) -> float:
    output = subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=True).stdout
    return int(output.split()[0]) / 1024


def install_size(timeout: float) -> dict[str, Any]:
    """site-packages of a fresh environment with metafleet[client] less torch: flwr 1.42, numpy, metafleet."""
    repo = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory(prefix="metafleet-install-") as work:
        venv, source = Path(work) / "venv", Path(work) / "metafleet"
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "-q"]
        empty = directory_mb(_site_packages(venv))
        started = time.time()
        fetched = subprocess.run([*pip, "install", "flwr==1.42.*", "numpy>=1.24"], capture_output=True, text=True,
                                 timeout=timeout)
        if fetched.returncode != 0:
            return {"ok": False, "reason": "pip could not install flwr and numpy (registry unreachable?)",
                    "pip_output": (fetched.stdout + fetched.stderr)[-2000:]}
        # A copy of the distribution's sources: building in the checkout would write into it.
        source.mkdir()
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(repo / name, source / name)
        for package in ("common", "client", "server", "simulations"):
            shutil.copytree(repo / package, source / package, ignore=shutil.ignore_patterns("__pycache__"))
        built = subprocess.run([*pip, "install", "--no-deps", str(source)], capture_output=True, text=True,
                               timeout=timeout)
        if built.returncode != 0:
            return {"ok": False, "reason": "pip could not install metafleet", "pip_output": built.stderr[-2000:]}
        seconds = time.time() - started
        site = _site_packages(venv)
        packages = {entry.name: directory_mb(entry) for entry in site.iterdir()
                    if entry.is_dir() and not entry.name.endswith((".dist-info", "__pycache__"))}
        listing = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check", "list",
                                  "--format", "json"], capture_output=True, text=True, timeout=60)
        scripts = subprocess.run([str(venv / "bin" / "python"), "-c",
                                  "import metafleet.client.cli, flwr.supernode.cli; print('ok')"],
                                 capture_output=True, text=True, timeout=120)
        result = {
            "ok": True, "install_seconds": round(seconds, 1), "site_packages_mb": round(directory_mb(site), 1),
            "venv_mb": round(directory_mb(venv), 1), "empty_venv_site_packages_mb": round(empty, 1),
            "distributions": len(json.loads(listing.stdout or "[]")) if listing.returncode == 0 else None,
            "largest_mb": dict(sorted(((k, round(v, 1)) for k, v in packages.items()), key=lambda kv: -kv[1])[:8]),
            "metafleet_mb": round(sum(v for k, v in packages.items() if k == "metafleet"), 2),
            "imports_without_torch": scripts.stdout.strip() == "ok",
        }
    here = Path(sys.prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "site-packages"
    result["torch_installed_mb"] = round(directory_mb(here / "torch"), 1) if (here / "torch").is_dir() else None
    wheels = sorted(Path("/opt/wheels").glob("torch-*+cpu-*.whl")) if Path("/opt/wheels").is_dir() else []
    result["torch_cpu_wheel"] = {"file": wheels[-1].name, "mb": round(wheels[-1].stat().st_size / 2**20, 1)} \
        if wheels else None
    return result


def _site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python*/site-packages"))


# -- report ------------------------------------------------------------------------------------------------------
def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--device"]:  # internal: OPTIONS (JSON), then the arguments of `metafleet client`
        return modified_device(argv[1], argv[2:])
    if argv[:1] == ["--supernode-poll"]:  # internal: POLL, then the arguments of flower-supernode
        supernode_with_poll(float(argv[1]), argv[2:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out/client"), help="folder for client.json")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--rounds", type=int, default=8, help="training rounds (the last also evaluates)")
    parser.add_argument("--interval", type=float, default=0.15, help="seconds between memory samples")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per fleet run, then it is killed")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="run in DIR and keep its logs (server, devices, run directories); default a temporary one")
    parser.add_argument("--install-size", action="store_true",
                        help="only measure the size of a device install (needs the package registry)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.install_size:
        size = install_size(timeout=args.timeout)
        (args.out / "install.json").write_text(json.dumps(size, indent=2))
        if not size["ok"]:
            print(f"install size: skipped: {size['reason']}\n{size.get('pip_output', '')}", file=sys.stderr)
            return 1
        print(f"metafleet[client] without torch: site-packages {size['site_packages_mb']:.0f} MB "
              f"({size['distributions']} distributions); largest: "
              + ", ".join(f"{k} {v:.0f}" for k, v in size["largest_mb"].items()))
        print(f"torch installed here: {_fmt(size['torch_installed_mb'], 0)} MB; CPU wheel: "
              f"{size['torch_cpu_wheel']['mb'] if size['torch_cpu_wheel'] else '-'} MB")
        print(f"wrote {args.out / 'install.json'}")
        return 0
    if args.rounds < 2:
        parser.error("--rounds must be >= 2: the last round also evaluates and is left out of the medians")
    variants = [v for v in args.variants.split(",") if v]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    if shutil.which("taskset") is None or (os.cpu_count() or 1) < 2:
        parser.error("needs taskset and at least 2 CPUs (the device on one, the server on the other)")

    rows = []
    print(f"{'variant':>19} {'round s':>7} {'compute s':>9} {'waiting s':>9} {'reply s':>7} {'pull s':>6} "
          f"{'device s':>8} {'after s':>7} {'peak PSS MB':>11} {'peak RSS MB':>11} {'idle PSS MB':>11} "
          f"{'load before->after':>20}")
    with tempfile.TemporaryDirectory(prefix="metafleet-bench-client-") as temporary:
        work = args.keep or Path(temporary)
        work.mkdir(parents=True, exist_ok=True)
        prepare(Path(work))
        for variant in variants:
            row = run_fleet(Path(work), variant, args.rounds, args.timeout, args.interval)
            rows.append(row)
            print(f"{variant:>19} {_fmt(row['median_round_s']):>7} {_fmt(row['median_compute_s']):>9} "
                  f"{_fmt(row['median_waiting_s']):>9} {_fmt(row['median_reply_s']):>7} "
                  f"{_fmt(row['median_before_pull_s']):>6} {_fmt(row['median_on_device_s']):>8} "
                  f"{_fmt(row['median_after_send_s']):>7} {_fmt(row['peak_pss_mb'], 0):>11} "
                  f"{_fmt(row['peak_rss_mb'], 0):>11} {_fmt(row['idle_pss_mb'], 0):>11} "
                  f"{str(row['load_before']) + '->' + str(row['load_after']):>20}"
                  + ("" if row["ok"] else ("  TIMED OUT" if row["timed_out"] else "  FAILED")), flush=True)
            if row["peak_pss_by_role"]:
                print(f"{'':>19} at the PSS peak, [RSS, PSS, processes] by kind: {row['peak_pss_by_role']}")
                print(f"{'':>19} CPU seconds over the run by kind: {row['cpu_seconds_by_role']}")
            if not row["ok"]:
                print(row["server_log_tail"], row["device_log_tail"], sep="\n", file=sys.stderr)
            if row["left_running"]:
                print(f"{'':>19} WARNING: processes left running: {row['left_running']}", file=sys.stderr)
    result = {"benchmark": "client", "cpus": os.cpu_count(), "machine": os.uname().machine, "dataset": "watch",
              "algorithm": "reptile", "measured_cpu": MEASURED_CPU, "results": rows}
    (args.out / "client.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out / 'client.json'}")
    return 0 if all(row["ok"] and not row["left_running"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
