"""Benchmark: the cost of secure aggregation (SecAgg+) against the plain path, and its error.

    python -m metafleet.simulations.bench_secagg --out bench-out/secagg [--clients 10,50,100] [--rounds 3]
        [--simulation-rounds 8] [--simulation-devices 0,50] [--deployed-rounds 6]

For each model (the smartwatch 1D-CNN, the Omniglot conv net) and each number of clients per round, runs
training rounds through Flower's real SecAgg+ workflow and the real ClientApp with its ``secaggplus_mod``,
and the same rounds on the plain path, over an in-process transport that serializes every message as the
wire does. Reported per case: the median round time (rounds after the first), the ratio secure / plain,
bytes each client sent and received per round, and the relative error of the secure aggregate against the
plaintext mean of the same updates (round 1). The rounds run one client after another in this process: the
time is the whole fleet's compute plus the protocol's, without Ray's scheduling (measured separately by
``bench_overhead``), which lets 100 devices run on a 2-core machine.

Devices beyond the data set's training clients share their data (device i uses training client i mod n):
the protocol's cost depends on the number of devices and the model, not on whose data they hold.
Prints a table and writes ``secagg.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from flwr.app import ConfigRecord

from metafleet.client import app as client_module
from metafleet.common.config import RunConfig
from metafleet.common.fleets import functional_model, make_fleet, split_clients
from metafleet.common.meta import global_norm
from metafleet.common.records import to_array_record
from metafleet.common.training import client_train, weighted_mean
from metafleet.server.app import initial_params
from metafleet.server.grid import MeteredGrid
from metafleet.server.secure import SecureAggregation
from metafleet.server.strategy import make_strategy
from metafleet.simulations.inprocess import RUN_ID, InProcessGrid, device_contexts

MODELS = {
    "watch": dict(dataset="watch", algorithm="reptile"),
    "omniglot": dict(dataset="omniglot", algorithm="reptile"),
}


def _server_config(device_config: RunConfig, clients_per_round: int) -> RunConfig:
    # The server samples more devices than the data set has training clients; the devices themselves see
    # the valid config (their own run config), so only the server's copy skips validation.
    return dataclasses.replace(device_config, clients_per_round=clients_per_round)


def run_case(model: str, clients: int, secure: bool, rounds: int) -> dict:
    device_config = RunConfig.resolve(**MODELS[model], secure_aggregation=secure, outer_optimizer="sgd", outer_lr=1.0)
    config = _server_config(device_config, clients)
    training, _ = split_clients(device_config)
    partition_of = [training[i % len(training)] for i in range(clients)]
    contexts = device_contexts(device_config.to_run_config(), partition_of)
    grid = MeteredGrid(InProcessGrid(client_module.app, contexts))
    strategy = make_strategy(config, initial_params(config))
    strategy.training_nodes = sorted(contexts)
    secure_round = SecureAggregation(strategy, RUN_ID, timeout=None) if secure else None
    seconds, up, down, relative_error = [], [], [], None
    for server_round in range(1, rounds + 1):
        theta = {name: t.clone() for name, t in strategy.params.items()}
        started = time.perf_counter()
        if secure_round is not None:
            secure_round.train_round(grid, server_round)
        else:
            messages = strategy.configure_train(server_round, to_array_record(theta), ConfigRecord(), grid)
            strategy.aggregate_train(server_round, grid.send_and_receive(messages))
        seconds.append(time.perf_counter() - started)
        bytes_up, bytes_down = grid.take_bytes()
        up.append(bytes_up / clients)
        down.append(bytes_down / clients)
        if strategy.last_round.skipped or strategy.last_round.accepted != clients:
            raise RuntimeError(f"{model} {clients} clients secure={secure}: round {server_round} did not complete")
        if server_round == 1:
            relative_error = _relative_error(device_config, theta, strategy, partition_of)
    steady = seconds[1:] or seconds
    return {
        "model": model, "clients": clients, "secure": secure, "rounds": rounds,
        "parameters": sum(t.numel() for t in strategy.params.values()),
        "round_seconds_median": statistics.median(steady), "round_seconds": seconds,
        "bytes_up_per_client": statistics.median(up), "bytes_down_per_client": statistics.median(down),
        "relative_error": relative_error,
    }


def replicated_fleet(model: str, devices: int, held_out: int, folder: Path) -> list[str]:
    """A folder fleet of ``devices`` training devices, device i holding the data of the built-in data set's
    training client i mod n (the protocol's cost depends on the number of devices and the model, not on
    whose data they hold), and ``held_out`` devices from its held-out clients; returns the held-out names."""
    from metafleet.common.device_data import save_device_data

    config = RunConfig.resolve(**MODELS[model])
    if config.ways:
        # A folder device's labels must fit the model's head; an N-way task's clients hold more classes.
        raise SystemExit(f"bench_secagg: {model} trains on {config.ways}-way episodes of clients with more classes "
                         "than its head: a replicated folder fleet cannot stand for them; use --simulation-devices 0")
    fleet = make_fleet(config)
    training, held = split_clients(config)
    if folder.exists() and len(list(folder.iterdir())) == devices + held_out:
        return [f"held-out-{i:03d}" for i in range(held_out)]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(devices):
        save_device_data(folder / f"device-{i:03d}", config.dataset, fleet.client(training[i % len(training)]))
    for i in range(held_out):
        save_device_data(folder / f"held-out-{i:03d}", config.dataset, fleet.client(held[i % len(held)]))
    return [f"held-out-{i:03d}" for i in range(held_out)]


def simulation_case(model: str, secure: bool, rounds: int, out: Path, devices: int = 0) -> dict:
    """The same comparison on Flower's Simulation Engine (Ray, the real message path with its 0.1 s
    polling): every training client of the data set in every round, or (``devices``) a replicated folder
    fleet of that many training devices."""
    from metafleet.simulations.cli import simulate

    base = RunConfig.resolve(**MODELS[model])
    if devices:
        fleet = out / f"fleet-{model}-{devices}"
        held_out = replicated_fleet(model, devices, 2, fleet)
        base = RunConfig.resolve(**MODELS[model], data=str(fleet), held_out_devices=",".join(held_out))
    config = base.replace(clients_per_round=base.training_clients, rounds=rounds, eval_every=rounds,
                          secure_aggregation=secure, min_replies=2)
    run_dir = out / f"sim-{model}-{devices or 'all'}-{'secure' if secure else 'plain'}"
    summary = simulate(config, run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if row["phase"] == "train"]
    # Round 1 pays for Ray's start-up, the last for the final evaluation: the steady rounds lie between.
    steady = [row["seconds"] for row in train[1:-1]]
    return {
        "model": model, "clients": config.clients_per_round, "secure": secure, "rounds": rounds,
        "round_seconds_median": statistics.median(steady), "round_seconds": [row["seconds"] for row in train],
        "bytes_up_per_client": statistics.median(row["bytes-up"] / config.clients_per_round for row in train[1:-1]),
        "bytes_down_per_client": statistics.median(
            row["bytes-down"] / config.clients_per_round for row in train[1:-1]),
        "rounds_skipped": summary["rounds_skipped"],
        "stage_seconds_median": {key: statistics.median(row[key] for row in train[1:-1]) for key in sorted(
            {key for row in train[1:-1] for key in row if key.startswith("secagg-") and key.endswith("-seconds")})},
    }


DEPLOYED_DEVICES = 4  # three train every round (SecAgg+ needs three), one held out


def deployed_case(secure: bool, rounds: int, work: Path, reply_poll_seconds: float, timeout: float = 900.0) -> dict:
    """A real fleet on 127.0.0.1 over TLS with device keys (``metafleet server`` and four ``metafleet
    client`` devices on the watch data, as tests/test_deployment.py), plain or secure; each training round's
    time and, for a secure round, each stage's exchange and the server's own work (from metrics.jsonl).
    ``reply_poll_seconds`` 0 is Flower's own wait for replies (3 s between pulls)."""
    from metafleet.common.device_data import save_device_data
    from metafleet.server.certs import make_certificates
    from metafleet.simulations.bench_client import QUIET, free_port, processes_with, stop

    if not (work / "certs").is_dir():
        make_certificates(work / "certs", [], [f"dev{i}" for i in range(DEPLOYED_DEVICES)])
        fleet = make_fleet(RunConfig.resolve(dataset="watch"))
        for client in range(DEPLOYED_DEVICES):
            save_device_data(work / f"data{client}", "watch", fleet.client(client))
    folder = work / f"{'secure' if secure else 'plain'}-poll-{reply_poll_seconds}"
    folder.mkdir()
    port, env = free_port(), {**os.environ, **QUIET}
    metafleet = [sys.executable, "-m", "metafleet.common.cli"]

    def start(args: list[str], log: str) -> subprocess.Popen:
        return subprocess.Popen([*metafleet, *args], env=env, stdout=(folder / log).open("wb"),
                                stderr=subprocess.STDOUT, start_new_session=True)

    server = start(["server", "--certs", str(work / "certs"), "--host", "127.0.0.1", "--port", str(port),
                    "--out", str(folder / "run"), "--dataset", "watch", "--algorithm", "reptile",
                    "--clients", str(DEPLOYED_DEVICES), "--held-out-clients", "1",
                    "--clients-per-round", str(DEPLOYED_DEVICES - 1), "--rounds", str(rounds),
                    "--eval-every", str(rounds), "--node-wait-seconds", "90", "--round-timeout", "120",
                    "--reply-poll-seconds", str(reply_poll_seconds),
                    *(["--secure-aggregation"] if secure else [])], "server.log")
    processes = [server]
    started = time.monotonic()
    try:
        while "listening on" not in (folder / "server.log").read_text(errors="replace"):
            if server.poll() is not None or time.monotonic() - started > 90:
                raise RuntimeError(f"the server did not start: {(folder / 'server.log').read_text()[-2000:]}")
            time.sleep(0.2)
        for index in range(DEPLOYED_DEVICES):
            processes.append(start([
                "client", "--superlink", f"127.0.0.1:{port}", "--data", str(work / f"data{index}"),
                "--root-cert", str(work / "certs" / "ca.pem"),
                "--key", str(work / "certs" / "devices" / f"dev{index}.key"),
                "--client-id", str(index), "--role", "held-out" if index == DEPLOYED_DEVICES - 1 else "train",
                "--local-port", str(free_port())], f"device{index}.log"))
        code = server.wait(timeout=timeout)
    finally:
        stop(list(reversed(processes)))
    if code != 0:
        raise RuntimeError(f"the server exited with {code}: {(folder / 'server.log').read_text()[-2000:]}")
    rows = [json.loads(line) for line in (folder / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if row["phase"] == "train"]
    steady = train[:-1]  # the last round also evaluates the held-out device
    stages = sorted({key for row in steady for key in row if key.startswith("secagg-") and key.endswith("-seconds")})
    return {
        "secure": secure, "reply_poll_seconds": reply_poll_seconds, "rounds": rounds,
        "devices_per_round": DEPLOYED_DEVICES - 1,
        "round_seconds_median": statistics.median(row["seconds"] for row in steady),
        "round_seconds": [row["seconds"] for row in train],
        "stage_seconds_median": {key: statistics.median(row[key] for row in steady) for key in stages},
        "bytes_up_per_client": statistics.median(row["bytes-up"] / (DEPLOYED_DEVICES - 1) for row in steady),
        "left_running": processes_with(f"127.0.0.1:{port}"),
    }


def _relative_error(config: RunConfig, theta, strategy, partition_of: list[int]) -> float:
    """‖aggregate − plaintext mean‖ / ‖plaintext mean‖ for round 1, the aggregate read back from θ (outer
    SGD with step 1 moves θ by exactly the aggregate)."""
    fleet = make_fleet(config)
    fmodel = functional_model(config)
    cache = {}
    for cid in set(partition_of):
        rng = np.random.default_rng([config.seed, 1, cid])
        cache[cid] = client_train(fmodel, theta, fleet.client(cid), config, rng).pseudo_grad
    expected = weighted_mean([cache[cid] for cid in partition_of], [1.0] * len(partition_of))
    applied = {name: theta[name] - strategy.params[name] for name in theta}
    difference = {name: applied[name].double() - expected[name].double() for name in theta}
    return global_norm(difference) / global_norm(expected)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out/secagg"))
    parser.add_argument("--models", default="watch,omniglot")
    parser.add_argument("--clients", default="10,50,100")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--simulation-rounds", type=int, default=8,
                        help="rounds of the Ray simulation comparison (0: skip it)")
    parser.add_argument("--deployed-rounds", type=int, default=0,
                        help="rounds of a deployed comparison (real SuperLink and SuperNodes over TLS; 0: skip it)")
    parser.add_argument("--deployed-reply-poll", default="0,0.2",
                        help="the server's --reply-poll-seconds for the deployed comparison, comma-separated "
                             "(0: Flower's own 3 s)")
    parser.add_argument("--simulation-devices", default="0",
                        help="devices a round in the Ray comparison, comma-separated; 0: the data set's training "
                             "clients, N: a folder fleet of N devices replicating them")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    header = f"{'model':9} {'clients':>7} {'plain s':>8} {'secure s':>9} {'ratio':>6} {'up plain':>10} " \
             f"{'up secure':>10} {'down plain':>10} {'down secure':>11} {'rel. error':>10}"
    print(header)
    for model in args.models.split(","):
        for clients in [int(c) for c in args.clients.split(",")]:
            plain = run_case(model, clients, False, args.rounds)
            secure = run_case(model, clients, True, args.rounds)
            ratio = secure["round_seconds_median"] / plain["round_seconds_median"]
            rows.append({"plain": plain, "secure": secure, "ratio": ratio})
            print(f"{model:9} {clients:>7} {plain['round_seconds_median']:>8.2f} "
                  f"{secure['round_seconds_median']:>9.2f} "
                  f"{ratio:>6.2f} {plain['bytes_up_per_client']:>10.0f} {secure['bytes_up_per_client']:>10.0f} "
                  f"{plain['bytes_down_per_client']:>10.0f} {secure['bytes_down_per_client']:>11.0f} "
                  f"{secure['relative_error']:>10.2e}", flush=True)
            (args.out / "secagg.json").write_text(json.dumps({"rows": rows}, indent=1))
    simulation_rows = []
    if args.simulation_rounds:
        print("\nFlower Simulation Engine (Ray), every training client each round:")
        print(f"{'model':9} {'clients':>7} {'plain s':>8} {'secure s':>9} {'ratio':>6} {'up plain':>10} "
              f"{'up secure':>10}")
        cases = [(model, int(devices)) for model in args.models.split(",")
                 for devices in args.simulation_devices.split(",")]
        for model, devices in cases:
            plain = simulation_case(model, False, args.simulation_rounds, args.out, devices)
            secure = simulation_case(model, True, args.simulation_rounds, args.out, devices)
            ratio = secure["round_seconds_median"] / plain["round_seconds_median"]
            simulation_rows.append({"plain": plain, "secure": secure, "ratio": ratio})
            print(f"{model:9} {plain['clients']:>7} {plain['round_seconds_median']:>8.2f} "
                  f"{secure['round_seconds_median']:>9.2f} {ratio:>6.2f} {plain['bytes_up_per_client']:>10.0f} "
                  f"{secure['bytes_up_per_client']:>10.0f}", flush=True)
            (args.out / "secagg.json").write_text(json.dumps({"rows": rows, "simulation": simulation_rows}, indent=1))
    deployed_rows = []
    if args.deployed_rounds:
        print("\nDeployed (SuperLink and four SuperNodes on 127.0.0.1 over TLS, three devices a round):")
        with tempfile.TemporaryDirectory(prefix="metafleet-secagg-deployed-") as work:
            for poll in [float(p) for p in args.deployed_reply_poll.split(",")]:
                pair = [deployed_case(secure, args.deployed_rounds, Path(work), poll) for secure in (False, True)]
                for row in pair:
                    stages = ", ".join(f"{key[7:-8]} {value:.2f}" for key, value in row["stage_seconds_median"].items())
                    print(f"{'secure' if row['secure'] else 'plain':>7}, replies pulled every "
                          f"{poll or 3.0:g} s: {row['round_seconds_median']:.2f} s a round"
                          f"{' (' + stages + ')' if stages else ''}, {row['bytes_up_per_client']:.0f} B up a device",
                          flush=True)
                deployed_rows.append({"plain": pair[0], "secure": pair[1],
                                      "ratio": pair[1]["round_seconds_median"] / pair[0]["round_seconds_median"]})
        (args.out / "secagg.json").write_text(json.dumps(
            {"rows": rows, "simulation": simulation_rows, "deployed": deployed_rows}, indent=1))
    print(f"wrote {args.out / 'secagg.json'}")


if __name__ == "__main__":
    main()
