"""Fleet size: rounds per minute and memory of ``metafleet simulate`` with thousands of simulated clients.

    python -m metafleet.simulations.bench_fleet --out bench-out/fleet.json \
        [--backends ray-stock,ray,inprocess,vectorized] [--clients 1000,10000,100000] [--dataset sinusoid|watch]

For each backend and fleet size N, runs ``metafleet simulate --dataset sinusoid --algorithm reptile
--clients N --clients-per-round 100 --backend B`` in its own process tree and reports:

- start-up: process start until the ServerApp runs (imports; Ray starts meanwhile);
- discovery: the server's one ``query`` message to every node (who are you, training or held out), sent in
  batches of ``server.app.DISCOVERY_BATCH``, with the replies it got back;
- the round-0 evaluation (held-out clients personalize the untrained model) and the final one, timed apart;
- seconds from the process's start to its first training round;
- steady-state rounds per minute: from the interval between the starts of consecutive training rounds,
  rounds 2..R-1 (round 1 carries the Ray workers' first calls, round R the final evaluation);
- peak memory of the whole process tree (Ray's GCS, raylet and workers included), sampled every 0.5 s from
  /proc: the sum of RSS, and the sum of PSS, which counts a page shared by several processes once.

Backend ``ray-stock`` is ``--backend ray`` on Flower's Simulation Engine exactly as Flower ships it
(``METAFLEET_STOCK_ENGINE=1``: Flower's LinkState, one discovery query per node); ``ray`` is the same engine
with metafleet's two changes for large fleets (simulations/engine.py).

The run is killed, with every descendant, at ``--timeout``; whatever it reached is still reported. Each
backend's rounds per minute is also given as a ratio to Flower's Simulation Engine as shipped (ray-stock,
else ray) at the same fleet size, measured in the same invocation. ``--dataset watch`` runs the watch fleet (its 10
subjects) instead, 8 a round.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from metafleet.simulations.bench_overhead import (
    EventLog,
    TimedGrid,
    load_average,
    median,
    read_events,
    round_periods,
    run_child,
    time_method,
    tree_memory,
)
from metafleet.simulations.engine import STOCK_ENGINE_VARIABLE


def child_simulate(events_file: str, discovery_batch: str, simulate_args: list[str]) -> int:
    """``metafleet simulate`` itself, with its grid and a few server steps timed."""
    from metafleet.common.cli import main as metafleet_main
    from metafleet.server import app as server_module
    from metafleet.server.rundir import RunDirectory

    log = EventLog(events_file)
    log.emit(kind="mark", name="imported", t=time.time())
    original = server_module.run_meta_training

    def run_meta_training(grid, run_config):
        log.emit(kind="mark", name="server-start", t=time.time())
        return original(TimedGrid(grid, log), run_config)

    server_module.run_meta_training = run_meta_training
    if discovery_batch != "default":
        server_module.DISCOVERY_BATCH = int(discovery_batch)
    time_method(server_module, "discover_fleet", log)
    time_method(RunDirectory, "save_checkpoint", log)
    return metafleet_main(["simulate", *simulate_args])


def measure(clients: int, clients_per_round: int, rounds: int, timeout: float,
            discovery_batch: int | None = None, backend: str = "ray", dataset: str = "sinusoid",
            held_out_clients: int | None = None) -> dict[str, Any]:
    samples: list[list[float]] = []

    def sample(pid: int) -> None:
        rss, pss, count = tree_memory(pid)
        samples.append([round(time.time(), 2), round(rss, 1), round(pss, 1), count])

    with tempfile.TemporaryDirectory(prefix="metafleet-bench-fleet-") as work:
        events_file, run_dir = Path(work, "events.jsonl"), Path(work, "run")
        args = ["--dataset", dataset, "--algorithm", "reptile", "--clients", str(clients),
                "--clients-per-round", str(clients_per_round), "--rounds", str(rounds),
                "--eval-every", str(rounds + 1), "--out", str(run_dir),
                "--backend", "ray" if backend == "ray-stock" else backend]
        if held_out_clients:
            args += ["--held-out-clients", str(held_out_clients)]
        load_before = load_average()
        child = run_child(["-m", "metafleet.simulations.bench_fleet", "--child", str(events_file),
                           str(discovery_batch or "default"), *args],
                          timeout, on_sample=sample,
                          env={STOCK_ENGINE_VARIABLE: "1" if backend == "ray-stock" else "0"})
        load_after = load_average()
        events = read_events(events_file)
        summary_file = run_dir / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.is_file() else None

    def first(kind: str, **match: Any) -> dict[str, Any] | None:
        return next((e for e in events if e["kind"] == kind and all(e.get(k) == v for k, v in match.items())), None)

    started = child["started"]
    server_start = first("mark", name="server-start")
    queries = [e for e in events if e["kind"] == "send" and e["type"] == "query"]
    discovery = first("call", name="discover_fleet")
    trains = [e for e in events if e["kind"] == "send" and e["type"] == "train"]
    evaluations = [e for e in events if e["kind"] == "send" and e["type"] == "evaluate"]
    # Round 0 evaluates the untrained model before the first training round; the last round evaluates again.
    initial = next((e for e in evaluations if not trains or e["t0"] < trains[0]["t0"]), None)
    final = next((e for e in reversed(evaluations) if trains and e["t0"] > trains[-1]["t0"]), None)
    periods = round_periods(events, first=2)
    checkpoints = [e["t1"] - e["t0"] for e in events if e["kind"] == "call" and e["name"] == "save_checkpoint"]
    rounds_started = trains[0]["t0"] if trains else None

    def peak(column: int, since: float | None = None, until: float | None = None) -> float | None:
        values = [s[column] for s in samples if (since is None or s[0] >= since) and (until is None or s[0] <= until)]
        return max(values) if values else None

    median_period = median(periods)
    return {
        "backend": backend,
        "dataset": dataset,
        "clients": clients,
        "first_round_start_s": rounds_started - started if rounds_started else None,
        "clients_per_round": clients_per_round,
        "rounds": rounds,
        "ok": child["returncode"] == 0 and not child["timed_out"],
        "returncode": child["returncode"],
        "timed_out": child["timed_out"],
        "output_tail": child["output_tail"],
        "process_seconds": child["seconds"],
        "load_before": load_before,
        "load_after": load_after,
        "startup_s": server_start["t"] - started if server_start else None,
        "discovery_s": discovery["t1"] - discovery["t0"] if discovery else None,
        "query_batches": len(queries),
        "query_send_receive_s": queries[-1]["t1"] - queries[0]["t0"] if queries else None,
        "query_sent": sum(q["sent"] for q in queries) if queries else None,
        "query_replies": sum(q["replies"] - q["errors"] for q in queries) if queries else None,
        "query_errors": sum(q["errors"] for q in queries) if queries else None,
        "rounds_done": len(trains),
        "first_round_s": trains[1]["t0"] - trains[0]["t0"] if len(trains) > 1 else None,
        "round_seconds": periods,
        "median_round_s": median_period,
        "rounds_per_minute": 60.0 / median_period if median_period else None,
        "median_train_send_receive_s": median([t["t1"] - t["t0"] for t in trains[1:-1]]),
        "median_checkpoint_ms": 1000 * median(checkpoints) if checkpoints else None,
        "initial_evaluation_s": initial["t1"] - initial["t0"] if initial else None,
        "final_evaluation_s": final["t1"] - final["t0"] if final else None,
        "final_evaluation_replies": final["replies"] - final["errors"] if final else None,
        "peak_rss_mb": peak(1),
        "peak_pss_mb": peak(2),
        "peak_pss_mb_until_rounds": peak(2, until=rounds_started),
        "peak_pss_mb_in_rounds": peak(2, since=rounds_started) if rounds_started else None,
        "max_processes": peak(3),
        "summary_rounds_completed": summary["rounds_completed"] if summary else None,
        # The held-out devices' metric after the last adaptation step: backends must agree on it.
        "final_metric": summary["personalization"]["mean"][-1] if summary and summary.get("personalization") else None,
        "memory_samples": samples,  # [unix time, RSS sum MiB, PSS sum MiB, processes]
    }


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:  # internal: EVENTS_FILE DISCOVERY_BATCH, then the arguments of `metafleet simulate`
        return child_simulate(argv[1], argv[2], argv[3:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out/fleet.json"))
    parser.add_argument("--clients", default="1000,10000", help="comma-separated fleet sizes")
    parser.add_argument("--clients-per-round", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per fleet size, then the tree is killed")
    parser.add_argument("--discovery-batch", type=int, help="override the server's DISCOVERY_BATCH (experiments)")
    parser.add_argument("--backends", default="ray",
                        help="comma-separated: ray-stock (Flower's engine as shipped), ray, inprocess, vectorized")
    parser.add_argument("--dataset", choices=["sinusoid", "watch"], default="sinusoid")
    parser.add_argument("--held-out-clients", type=int, help="held-out clients (default: the data set's)")
    args = parser.parse_args(argv)
    if args.dataset == "watch":
        args.clients, args.clients_per_round = "10", min(args.clients_per_round, 8)
    if args.rounds < 3:
        parser.error("--rounds must be >= 3: round 1 and round R are left out of the steady state")

    rows = []
    print(f"{'backend':>10} {'clients':>7} {'startup s':>9} {'discovery s':>11} {'replies':>11} {'eval0 s':>7} "
          f"{'1st round s':>11} {'round s':>7} "
          f"{'rounds/min':>10} {'final eval s':>12} {'peak RSS MB':>11} {'peak PSS MB':>11} {'procs':>5} "
          f"{'load before->after':>20}")
    for clients in [int(n) for n in args.clients.split(",")]:
        for backend in args.backends.split(","):
            row = measure(clients, args.clients_per_round, args.rounds, args.timeout, args.discovery_batch,
                          backend, args.dataset, args.held_out_clients)
            rows.append(row)
            _print_row(row)
    for row in rows:
        same_fleet = {r["backend"]: r for r in rows if r["clients"] == row["clients"]}
        flower = same_fleet.get("ray-stock") or same_fleet.get("ray")
        if flower and flower["rounds_per_minute"] and row["rounds_per_minute"]:
            row["rounds_per_minute_vs_ray"] = row["rounds_per_minute"] / flower["rounds_per_minute"]
            row["vs_backend"] = flower["backend"]
            print(f"{row['backend']} at {row['clients']} clients: {row['rounds_per_minute_vs_ray']:.1f}x the "
                  f"{flower['backend']} backend's rounds per minute")
    from metafleet.server.app import DISCOVERY_BATCH

    result = {"benchmark": "fleet", "cpus": os.cpu_count(), "dataset": args.dataset, "algorithm": "reptile",
              "discovery_batch": args.discovery_batch or DISCOVERY_BATCH, "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0 if all(row["ok"] for row in rows) else 1


def _print_row(row: dict[str, Any]) -> None:
    replies = "-" if row["query_sent"] is None else f"{row['query_replies']}/{row['query_sent']}"
    print(f"{row['backend']:>10} {row['clients']:>7} {_fmt(row['startup_s']):>9} {_fmt(row['discovery_s']):>11} "
          f"{replies:>11} {_fmt(row['initial_evaluation_s']):>7} {_fmt(row['first_round_start_s']):>11} "
          f"{_fmt(row['median_round_s'], 2):>7} {_fmt(row['rounds_per_minute']):>10} "
          f"{_fmt(row['final_evaluation_s']):>12} {_fmt(row['peak_rss_mb'], 0):>11} {_fmt(row['peak_pss_mb'], 0):>11} "
          f"{_fmt(row['max_processes'], 0):>5} {str(row['load_before']) + '->' + str(row['load_after']):>20}"
          + ("" if row["ok"] else ("  TIMED OUT" if row["timed_out"] else "  FAILED")), flush=True)
    if not row["ok"]:
        print(row["output_tail"], file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
