"""Deployment with real processes on loopback: `metafleet server` (flower-superlink, TLS, device keys) and
`metafleet client` (flower-supernode) devices holding the smartwatch data, plus certificates and the
device data format."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from metafleet.common.config import RunConfig
from metafleet.common.device_data import load_device_data, save_device_data
from metafleet.common.errors import DataError, MetafleetError
from metafleet.common.task import load_task
from metafleet.server.certs import make_certificates
from tests.processes import free_port, kill_groups, left_after, processes_with


def _metafleet(*args: str, log: Path | None = None, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    output = log.open("w") if log is not None else subprocess.PIPE
    return subprocess.Popen([sys.executable, "-m", "metafleet.common.cli", *args], env=env, stdout=output,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True, **kwargs)


def test_certs_make_a_ca_a_server_certificate_with_sans_and_device_keys_and_never_overwrite(tmp_path):
    make_certificates(tmp_path, ["fleet.example.org", "10.0.0.5"], ["pi-1", "pi-2"])
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.pem").read_bytes())
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(names.get_values_for_type(x509.DNSName)) == {"fleet.example.org", "localhost"}
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {"10.0.0.5", "127.0.0.1"}
    public = serialization.load_ssh_public_key((tmp_path / "devices" / "pi-1.pub").read_bytes())
    assert public.curve.name == "secp384r1"
    for private in ("ca.key", "server.key", "devices/pi-1.key"):
        assert stat.S_IMODE((tmp_path / private).stat().st_mode) == 0o600

    before = {path: path.read_bytes() for path in tmp_path.rglob("*") if path.is_file()}
    report = make_certificates(tmp_path, ["other.example.org"], ["pi-1", "pi-3"])
    assert all(path.read_bytes() == data for path, data in before.items()), "an existing file was rewritten"
    assert (tmp_path / "devices" / "pi-3.key").is_file()
    assert sum(line.startswith("kept") for line in report) == 3


def test_device_data_round_trips_and_bad_files_are_named(tmp_path):
    config = RunConfig.resolve(dataset="watch")
    fleet = load_task("watch").make_fleet(config, [])
    save_device_data(tmp_path / "good", "watch", fleet.client(4))
    dataset, data = load_device_data(tmp_path / "good", client_id=4)
    assert dataset == "watch" and data.splits[0].support[0].shape[1:] == (6, 100)
    with pytest.raises(DataError, match="exists"):
        save_device_data(tmp_path / "good", "watch", fleet.client(4))

    with pytest.raises(DataError, match="does not exist"):
        load_device_data(tmp_path / "missing")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "data.npz").write_bytes((tmp_path / "good" / "data.npz").read_bytes()[:300])
    with pytest.raises(DataError, match="corrupt.*data.npz|data.npz.*not an .npz"):
        load_device_data(tmp_path / "corrupt")
    arrays = dict(np.load(tmp_path / "good" / "data.npz"))
    (tmp_path / "shape").mkdir()
    np.savez(tmp_path / "shape" / "data.npz", **{**arrays, "support_x": arrays["support_x"][:, :3]})
    with pytest.raises(DataError, match="shape"):
        load_device_data(tmp_path / "shape")
    (tmp_path / "lacking").mkdir()
    np.savez(tmp_path / "lacking" / "data.npz", **{k: v for k, v in arrays.items() if k != "query_y"})
    with pytest.raises(DataError, match="query_y"):
        load_device_data(tmp_path / "lacking")


def test_a_client_told_to_compute_where_it_cannot_stops_before_joining(tmp_path, monkeypatch):
    from metafleet.client.cli import check_data_in_child

    config = RunConfig.resolve(dataset="watch")
    save_device_data(tmp_path / "device", "watch", load_task("watch").make_fleet(config, []).client(4))
    _, data = load_device_data(tmp_path / "device", client_id=4)
    examples = sum(len(split.support[0]) + len(split.query[0]) for split in data.splits)
    assert check_data_in_child(tmp_path / "device", 4, "cpu") == ("watch", examples)
    with pytest.raises(MetafleetError, match="'gpu0'.*not a device name torch knows"):
        check_data_in_child(tmp_path / "device", 4, "gpu0")
    monkeypatch.setenv("METAFLEET_TORCH_DEVICE", "gpu0")  # the service's way: client.env
    with pytest.raises(MetafleetError, match="'gpu0'.*not a device name torch knows"):
        check_data_in_child(tmp_path / "device", 4)


@pytest.mark.slow
def test_tls_fleet_trains_refuses_strangers_and_survives_a_lost_and_a_broken_device(tmp_path):
    """Server plus five devices on 127.0.0.1: three train, one is held out, one has a key the server never
    registered; a sixth trusts another CA; a seventh has a corrupt data file. One training device loses
    power after round 1."""
    certs, stranger_certs = tmp_path / "certs", tmp_path / "stranger"
    make_certificates(certs, [], ["dev0", "dev1", "dev2", "dev3"])
    make_certificates(stranger_certs, [], ["dev9"])
    config = RunConfig.resolve(dataset="watch")
    fleet = load_task("watch").make_fleet(config, [])
    for client in range(4):
        save_device_data(tmp_path / f"data{client}", "watch", fleet.client(client))
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "data.npz").write_bytes(b"not a zip archive")

    port = free_port()
    run_dir = tmp_path / "run"
    server = _metafleet(
        "server", "--certs", str(certs), "--host", "127.0.0.1", "--port", str(port), "--out", str(run_dir),
        "--dataset", "watch", "--algorithm", "reptile", "--clients", "4", "--held-out-clients", "1",
        "--clients-per-round", "3", "--rounds", "3", "--eval-every", "3", "--node-wait-seconds", "90",
        "--round-timeout", "45", log=tmp_path / "server.log",
    )
    address = f"127.0.0.1:{port}"
    local_ports = [free_port() for _ in range(7)]

    def device(index: int, data: Path, key: Path, root: Path, role: str = "train") -> subprocess.Popen:
        return _metafleet(
            "client", "--superlink", address, "--data", str(data), "--root-cert", str(root), "--key", str(key),
            "--client-id", str(index), "--role", role, "--local-port", str(local_ports[index]),
            log=tmp_path / f"device{index}.log",
        )

    devices = []
    try:
        assert _wait_for(lambda: "listening on" in _read(tmp_path / "server.log"), 90), _read(tmp_path / "server.log")
        for index in range(4):
            role = "held-out" if index == 3 else "train"
            devices.append(device(index, tmp_path / f"data{index}", certs / "devices" / f"dev{index}.key",
                                  certs / "ca.pem", role))
        unregistered = device(4, tmp_path / "data0", stranger_certs / "devices" / "dev9.key", certs / "ca.pem")
        wrong_ca = device(5, tmp_path / "data1", certs / "devices" / "dev1.key", stranger_certs / "ca.pem")
        corrupt = device(6, tmp_path / "corrupt", certs / "devices" / "dev2.key", certs / "ca.pem")
        devices += [unregistered, wrong_ca, corrupt]

        assert corrupt.wait(timeout=60) == 2
        assert "data.npz is not an .npz archive" in _read(tmp_path / "device6.log")
        assert unregistered.wait(timeout=120) == 2
        assert "the server refused this device's key" in _read(tmp_path / "device4.log")
        assert wrong_ca.wait(timeout=120) == 2

        # Power loss on device 0 once round 1 is written: its SuperNode and app processes die at once.
        assert _wait_for(lambda: _train_rounds(run_dir) >= 1, 240), _read(tmp_path / "server.log")[-3000:]
        kill_groups(processes_with(f"--port {local_ports[0]}"))
        assert server.wait(timeout=420) == 0, _read(tmp_path / "server.log")[-3000:]
    finally:
        _stop([server, *devices])

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds_completed"] == 3 and summary["personalization"]["clients_reporting"] == 1
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if row["phase"] == "train"]
    assert train[0]["accepted"] == 3, "all three training devices took part in round 1"
    assert all(row["accepted"] == 2 and not row["skipped"] for row in train[1:]), train
    server_log = _read(tmp_path / "server.log")
    assert "fleet: 3 training nodes, 1 held-out nodes" in server_log, "a stranger joined the fleet"
    assert wrong_ca.returncode == 2
    assert "the TLS handshake with" in _read(tmp_path / "device5.log"), _read(tmp_path / "device5.log")[-2000:]
    assert not left_after(f"127.0.0.1:{port}", 30), "a process of the fleet is still running"


def _stop(processes: list[subprocess.Popen]) -> None:
    """SIGTERM to every process group still running, SIGKILL to those that do not end within 30 s."""
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


def _train_rounds(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return 0
    return sum('"phase": "train"' in line for line in metrics.read_text().splitlines())


def _wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.5)
    return False


def _read(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def test_personalize_keeps_a_model_that_predict_uses_offline(tmp_path, capsys):
    from metafleet.common.cli import main
    from metafleet.server.app import initial_params
    from metafleet.server.rundir import RunDirectory

    config = RunConfig.resolve(dataset="watch", clients=10, held_out_clients=2)
    run = RunDirectory(tmp_path / "run")
    run.create(config)
    run.save_checkpoint(1, {"params": initial_params(config)})
    fleet = load_task("watch").make_fleet(config, [])
    save_device_data(tmp_path / "device", "watch", fleet.client(5))

    assert main(["personalize", "--checkpoint", str(tmp_path / "run"), "--data", str(tmp_path / "device"),
                 "--steps", "3", "--no-guard", "--out", str(tmp_path / "personal.pt")]) == 0
    assert "query accuracy" in capsys.readouterr().err
    windows = np.load(tmp_path / "device" / "data.npz")["query_x"][:7]
    np.save(tmp_path / "windows.npy", windows)
    assert main(["predict", "--model", str(tmp_path / "personal.pt"), "--input", str(tmp_path / "windows.npy"),
                 "--out", str(tmp_path / "predictions.npy")]) == 0
    predictions = np.load(tmp_path / "predictions.npy")
    assert predictions.shape == (7,) and set(predictions.tolist()) <= set(range(7))

    # Bad input: a clear message and exit code 2, not a traceback.
    np.save(tmp_path / "wrong.npy", windows[:, :3])
    assert main(["predict", "--model", str(tmp_path / "personal.pt"), "--input", str(tmp_path / "wrong.npy")]) == 2
    assert "the model takes N × (6, 100)" in capsys.readouterr().err
    assert main(["personalize", "--checkpoint", str(tmp_path / "nothing"), "--data", str(tmp_path / "device"),
                 "--out", str(tmp_path / "x.pt")]) == 2


@pytest.mark.slow
def test_secure_aggregation_runs_over_real_superlink_and_supernodes(tmp_path):
    """SecAgg+'s four exchanges a round between real processes over TLS: three devices train, one is held out."""
    certs = tmp_path / "certs"
    make_certificates(certs, [], [f"dev{i}" for i in range(4)])
    fleet = load_task("watch").make_fleet(RunConfig.resolve(dataset="watch"), [])
    for client in range(4):
        save_device_data(tmp_path / f"data{client}", "watch", fleet.client(client))
    port, run_dir = free_port(), tmp_path / "run"
    processes = [_metafleet(
        "server", "--certs", str(certs), "--host", "127.0.0.1", "--port", str(port), "--out", str(run_dir),
        "--dataset", "watch", "--algorithm", "reptile", "--clients", "4", "--held-out-clients", "1",
        "--clients-per-round", "3", "--rounds", "2", "--eval-every", "2", "--node-wait-seconds", "90",
        "--round-timeout", "120", "--secure-aggregation", log=tmp_path / "server.log",
    )]
    server = processes[0]
    try:
        assert _wait_for(lambda: "listening on" in _read(tmp_path / "server.log"), 90), _read(tmp_path / "server.log")
        for index in range(4):
            processes.append(_metafleet(
                "client", "--superlink", f"127.0.0.1:{port}", "--data", str(tmp_path / f"data{index}"),
                "--root-cert", str(certs / "ca.pem"), "--key", str(certs / "devices" / f"dev{index}.key"),
                "--client-id", str(index), "--role", "held-out" if index == 3 else "train",
                "--local-port", str(free_port()), log=tmp_path / f"device{index}.log",
            ))
        assert server.wait(timeout=420) == 0, _read(tmp_path / "server.log")[-3000:]
    finally:
        _stop(processes)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["secure_aggregation"] and summary["rounds_completed"] == 2 and summary["rounds_skipped"] == 0
    train = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [row["accepted"] for row in train if row["phase"] == "train"] == [3, 3]
    assert summary["personalization"]["clients_reporting"] == 1
    assert not left_after(f"127.0.0.1:{port}", 30), "a process of the fleet is still running"


@pytest.mark.slow
def test_a_user_task_deploys_over_tls_and_every_device_keeps_its_models(tmp_path):
    """A task file outside the package on a real SuperLink and two SuperNodes over TLS: one device trains,
    one is held out; when the run ends both hold a meta-model and a personal model that predict uses."""
    from tests.test_tasks import GESTURES, gesture_arrays, write_fleet, write_task

    certs = tmp_path / "certs"
    make_certificates(certs, [], ["dev0", "dev1"])
    server_task = write_task(tmp_path / "server", GESTURES, width=8)
    fleet = write_fleet(tmp_path / "devices", {f"dev{i}": gesture_arrays(i) for i in range(2)})
    port, run_dir = free_port(), tmp_path / "run"
    processes = [_metafleet(
        "server", "--certs", str(certs), "--host", "127.0.0.1", "--port", str(port), "--out", str(run_dir),
        "--task", str(server_task), "--algorithm", "reptile", "--clients", "2", "--held-out-clients", "1",
        "--clients-per-round", "1", "--rounds", "2", "--eval-every", "2", "--node-wait-seconds", "90",
        "--round-timeout", "120", log=tmp_path / "server.log",
    )]
    server = processes[0]
    try:
        assert _wait_for(lambda: "listening on" in _read(tmp_path / "server.log"), 90), _read(tmp_path / "server.log")
        for index in range(2):
            own_task = write_task(fleet / f"dev{index}" / "app", GESTURES, width=8)  # each device's own copy
            processes.append(_metafleet(
                "client", "--superlink", f"127.0.0.1:{port}", "--data", str(fleet / f"dev{index}"),
                "--task", str(own_task), "--root-cert", str(certs / "ca.pem"),
                "--key", str(certs / "devices" / f"dev{index}.key"), "--client-id", str(index),
                "--role", "held-out" if index == 1 else "train", "--local-port", str(free_port()),
                log=tmp_path / f"device{index}.log",
            ))
        assert server.wait(timeout=420) == 0, _read(tmp_path / "server.log")[-3000:]
    finally:
        _stop(processes)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["dataset"] == "gestures" and summary["rounds_completed"] == 2
    assert summary["devices_keeping_models"] == 2 and summary["personalization"]["clients_reporting"] == 1
    for index in range(2):
        folder = fleet / f"dev{index}"
        assert (folder / "meta-model.pt").is_file() and (folder / "personal-model.pt").is_file()
        np.save(tmp_path / "inputs.npy", np.load(folder / "data.npz")["query_x"][:4])
        predicted = subprocess.run([sys.executable, "-m", "metafleet.common.cli", "predict", "--model", str(folder),
                                    "--input", str(tmp_path / "inputs.npy")], capture_output=True, text=True,
                                   timeout=120)
        assert predicted.returncode == 0, predicted.stderr
        assert len(predicted.stdout.split()) == 4 and set(predicted.stdout.split()) <= {"0", "1", "2", "3"}
    assert not left_after(f"127.0.0.1:{port}", 30), "a process of the fleet is still running"
