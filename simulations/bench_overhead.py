"""Framework overhead: per-round time of ``metafleet simulate --algorithm fedavg`` against Flower's own FedAvg.

    python -m metafleet.simulations.bench_overhead --out bench-out/overhead.json

Both systems run on the same Simulation Engine entry (``engine.run_in_simulation``, same backend settings
and number of SuperNodes), the same model, the same fleet's client data and the same local computation:
``inner_steps`` SGD steps of ``metafleet.common.meta.adapt`` on one episode's support and query examples.
The baseline is what a Flower user would write: ``flwr.serverapp.strategy.FedAvg`` driven by
``strategy.start`` and a ClientApp whose ``@app.train()`` loads the arrays, trains and returns the model.

Each run happens in a fresh process (Ray, caches and allocators start cold for both), alternating the two
systems (A B B A ...) so that drift in the load of this shared machine falls on both. The per-round time is
the interval between the starts of consecutive training rounds, over rounds W+1..R-1: the first W (warm-up)
rounds carry each Ray worker's imports and first calls (metafleet's discovery query takes part of that
before round 1, the baseline's round 2 still pays some), and round R metafleet's final personalization
evaluation, which the baseline lacks.
The same ``TimedGrid`` and client timing mod instrument both systems.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

TARGET_RATIO = 1.10
FIXED_CLIENTS = {"watch": 10}  # datasets whose fleet size is fixed by the data


# -- measurement helpers, shared with bench_fleet (no Flower or torch needed) -------------------------------
class EventLog:
    """JSON lines appended and flushed one by one, so that a run killed at its timeout still leaves its events."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def emit(self, **fields: Any) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(fields) + "\n")


def read_events(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    events = []
    for line in path.read_text().splitlines():
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:  # the last line of a killed run may be torn
            pass
    return events


class TimedGrid:
    """A Grid that records every ``send_and_receive``: message type, counts, start and end; and at the starts of
    the training rounds in ``cpu_at_rounds`` the CPU time used so far by this process and its descendants."""

    def __init__(self, grid: Any, log: EventLog, cpu_at_rounds: frozenset[int] = frozenset()):
        self._grid = grid
        self._log = log
        self._cpu_at_rounds = cpu_at_rounds
        self._train_sends = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages, *, timeout=None):
        from metafleet.common.records import TrainingReply  # (a row, from the vectorized backend, is no error)

        messages = list(messages)
        kind = messages[0].metadata.message_type if messages else "none"
        if kind == "train":
            self._train_sends += 1
            if self._train_sends in self._cpu_at_rounds:
                by_process = tree_cpu_seconds(os.getpid())
                self._log.emit(kind="cpu", round=self._train_sends, seconds=sum(by_process.values()),
                               by_process=by_process)
        start = time.time()
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self._log.emit(kind="send", type=kind, sent=len(messages), replies=len(replies),
                       errors=sum(1 for r in replies if not isinstance(r, TrainingReply) and r.has_error()),
                       t0=start, t1=time.time())
        return replies


def time_method(owner: Any, name: str, log: EventLog) -> None:
    """Record each call's start and end of ``owner.name`` (a class or module attribute)."""
    original = getattr(owner, name)

    def timed(*args, **kwargs):
        start = time.time()
        try:
            return original(*args, **kwargs)
        finally:
            log.emit(kind="call", name=name, t0=start, t1=time.time())

    setattr(owner, name, timed)


def timing_mod(directory: str):
    """A ClientApp mod writing each handler's duration to DIRECTORY/client-PID.jsonl (one file per Ray worker)."""

    def mod(msg, context, call_next):
        start = time.perf_counter()
        reply = call_next(msg, context)
        seconds = time.perf_counter() - start
        with open(os.path.join(directory, f"client-{os.getpid()}.jsonl"), "a") as handle:
            handle.write(json.dumps({"type": msg.metadata.message_type, "seconds": seconds}) + "\n")
        return reply

    return mod


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants, from /proc (Ray's raylet, GCS and workers descend from the driver)."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses; the fields after the last ')' are fixed.
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children[ppid].append(int(entry.name))
    tree, stack = [], [root]
    while stack:
        pid = stack.pop()
        tree.append(pid)
        stack.extend(children.get(pid, []))
    return tree


def tree_cpu_seconds(root: int) -> dict[str, float]:
    """User + system CPU time of a process and its live descendants, by command name (the driver, raylet,
    ray::ClientAppActor, ...). Unlike wall time it hardly depends on what the other users of a shared machine
    run."""
    by_name: dict[str, float] = defaultdict(float)
    for pid in process_tree(root):
        try:
            with open(f"/proc/{pid}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        name = "driver" if pid == root else stat[stat.index("(") + 1 : stat.rindex(")")]
        by_name[name] += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return dict(by_name)


def _pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as handle:
        for line in handle:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def tree_memory(root: int) -> tuple[float, float, int]:
    """(RSS sum, PSS sum, processes) of the tree in MiB. PSS shares each shared page (torch's libraries in every
    Ray worker) among its users, so its sum is what the tree really occupies; the RSS sum counts them each time."""
    page = os.sysconf("SC_PAGE_SIZE")
    rss = pss = count = 0
    for pid in process_tree(root):
        try:
            with open(f"/proc/{pid}/statm") as handle:
                rss += int(handle.read().split()[1]) * page
            pss += _pss_kib(pid) * 1024
            count += 1
        except (OSError, ValueError, IndexError):  # the process ended between listing and reading
            continue
    return rss / 2**20, pss / 2**20, count


def kill_tree(root: int) -> None:
    """SIGKILL a process and every descendant, listed first so that none is orphaned into init's care."""
    for pid in reversed(process_tree(root)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_child(argv: list[str], timeout: float, on_sample=None, interval: float = 0.5,
              env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a child Python process (``env`` added to this one's); kill its whole tree at ``timeout``.
    ``on_sample(pid)`` runs every ``interval``."""
    log_file = tempfile.NamedTemporaryFile(prefix="metafleet-bench-", suffix=".log", delete=False)
    started = time.time()
    process = subprocess.Popen([sys.executable, *argv], stdout=log_file, stderr=subprocess.STDOUT,
                               env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}, start_new_session=True)
    timed_out = False
    try:
        while process.poll() is None:
            if time.time() - started > timeout:
                timed_out = True
                kill_tree(process.pid)
                break
            if on_sample is not None:
                on_sample(process.pid)
            time.sleep(interval)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            kill_tree(process.pid)
        # Ray helpers that outlived the driver (they are in its session) must not keep loading the machine.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    log_file.close()
    output = Path(log_file.name).read_text(errors="replace")
    os.unlink(log_file.name)
    return {"returncode": process.returncode, "timed_out": timed_out, "started": started,
            "seconds": time.time() - started, "output_tail": output[-3000:]}


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def round_periods(events: list[dict[str, Any]], first: int = 2) -> list[float]:
    """Intervals between the starts of consecutive training rounds, from round ``first`` on; the last training
    round has no successor and so is never included."""
    starts = [e["t0"] for e in events if e.get("kind") == "send" and e.get("type") == "train"]
    return [b - a for a, b in zip(starts[first - 1 :], starts[first:], strict=False)]


# -- the two systems (child processes) ----------------------------------------------------------------------
_baseline_cache: dict[Any, Any] = {}


def flower_baseline_main(grid, context) -> None:
    """The baseline ServerApp's main: Flower's FedAvg and its own round loop, ``strategy.start``."""
    import torch
    from flwr.app import ArrayRecord, ConfigRecord
    from flwr.serverapp.strategy import FedAvg

    from metafleet.common.config import RunConfig
    from metafleet.common.fleets import make_model

    config = RunConfig.from_run_config(dict(context.run_config))
    torch.manual_seed(config.seed)  # the same initial model as metafleet's server builds
    strategy = FedAvg(fraction_train=config.clients_per_round / config.clients, fraction_evaluate=0.0,
                      min_available_nodes=config.clients)
    strategy.start(grid=grid, initial_arrays=ArrayRecord(make_model(config).state_dict()), num_rounds=config.rounds,
                   train_config=ConfigRecord({"lr": config.inner_lr, "local-steps": config.inner_steps}))


def flower_baseline_train(msg, context):
    """The baseline ClientApp's train handler: load the arrays, run the same local SGD, return the model."""
    import numpy as np
    from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

    from metafleet.common.config import RunConfig
    from metafleet.common.fleets import functional_model, make_fleet
    from metafleet.common.meta import adapt

    key = tuple(sorted(context.run_config.items()))
    if key not in _baseline_cache:  # a Flower app loads its data once per process too
        config = RunConfig.from_run_config(dict(context.run_config))
        fleet = make_fleet(config)
        _baseline_cache[key] = (config, fleet, functional_model(config), {})
    config, fleet, fmodel, clients = _baseline_cache[key]
    partition = int(context.node_config["partition-id"])
    if partition not in clients:
        clients[partition] = fleet.client(partition)
    train_config = msg.content["config"]
    params = msg.content["arrays"].to_torch_state_dict()
    rng = np.random.default_rng([config.seed, int(train_config["server-round"]), partition])
    episode = clients[partition].sample_episode(rng, config.shots, config.query_shots, config.ways or None)
    # metafleet's fedavg_update, returning θ' instead of θ − θ': the same steps on the same examples.
    data = episode.union()
    trained = adapt(fmodel, params, data, int(train_config["local-steps"]), float(train_config["lr"]))
    metrics = MetricRecord({"num-examples": episode.num_examples, "loss-before": float(fmodel.loss(params, data)),
                            "loss-after": float(fmodel.loss(trained, data))})
    return Message(RecordDict({"arrays": ArrayRecord(trained), "metrics": metrics}), reply_to=msg)


def child_run(system: str, config_json: str, events_file: str, client_dir: str, warmup: str) -> None:
    import logging

    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    from metafleet.common.config import RunConfig
    from metafleet.simulations.engine import run_in_simulation

    log = EventLog(events_file)
    config = RunConfig.from_dict(json.loads(config_json))
    cpu_at_rounds = frozenset({int(warmup) + 1, config.rounds})
    logging.getLogger("flwr").setLevel(logging.WARNING)  # as `metafleet simulate` does without --verbose
    mod = timing_mod(client_dir)
    with tempfile.TemporaryDirectory(prefix="metafleet-bench-run-") as out:
        run_config = {**config.to_run_config(), "out-dir": out, "resume": False}
        if system == "metafleet":
            from metafleet.client import app as client_module
            from metafleet.server import app as server_module
            from metafleet.server.rundir import RunDirectory
            from metafleet.server.strategy import MetaStrategy

            for owner, name in ((MetaStrategy, "aggregate_train"), (RunDirectory, "save_checkpoint"),
                                (RunDirectory, "append_metrics")):
                time_method(owner, name, log)
            server_app = ServerApp()

            @server_app.main()
            def _main(grid, context):  # metafleet's own main, with the grid instrumented
                server_module.run_meta_training(TimedGrid(grid, log, cpu_at_rounds), dict(context.run_config))

            client_app = ClientApp(mods=[mod])
            client_app.query()(client_module.query)
            client_app.train()(client_module.train)
            client_app.evaluate()(client_module.evaluate)
        else:
            from flwr.serverapp.strategy import FedAvg

            time_method(FedAvg, "aggregate_train", log)
            server_app = ServerApp()

            @server_app.main()
            def _main(grid, context):
                flower_baseline_main(TimedGrid(grid, log, cpu_at_rounds), context)

            client_app = ClientApp(mods=[mod])
            client_app.train()(flower_baseline_train)
        log.emit(kind="mark", name="start", t=time.time())
        run_in_simulation(server_app, client_app, run_config, num_supernodes=config.clients, cpus_per_client=1.0)
        log.emit(kind="mark", name="end", t=time.time())


# -- the benchmark (parent process) --------------------------------------------------------------------------
def bench_config(dataset: str, clients: int, clients_per_round: int, rounds: int, inner_steps: int):
    from metafleet.common.config import RunConfig

    clients = FIXED_CLIENTS.get(dataset, clients)
    base = RunConfig.resolve(dataset=dataset, algorithm="fedavg", clients=clients)
    return RunConfig.resolve(dataset=dataset, algorithm="fedavg", clients=clients,
                             clients_per_round=min(clients_per_round, base.training_clients), rounds=rounds,
                             inner_steps=inner_steps, eval_every=rounds + 1)


def measure(system: str, config, timeout: float, warmup: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="metafleet-bench-") as work:
        events_file, client_dir = Path(work, "events.jsonl"), Path(work, "clients")
        client_dir.mkdir()
        load_before = load_average()
        child = run_child(["-m", "metafleet.simulations.bench_overhead", "--child", system,
                           json.dumps(config.to_dict()), str(events_file), str(client_dir), str(warmup)], timeout)
        load_after = load_average()
        events = read_events(events_file)
        client_seconds = defaultdict(list)
        for file in client_dir.glob("client-*.jsonl"):
            for row in read_events(file):
                client_seconds[row["type"]].append(row["seconds"])
    sends = [e for e in events if e["kind"] == "send" and e["type"] == "train"]
    periods = round_periods(events, first=warmup + 1)
    # Per measured round: time inside the training send_and_receive, and the server's own time around it.
    inside = [s["t1"] - s["t0"] for s in sends[warmup : warmup + len(periods)]]
    calls: dict[str, list[float]] = defaultdict(list)
    for event in events:
        if event["kind"] == "call":
            calls[event["name"]].append(event["t1"] - event["t0"])
    failed = child["returncode"] != 0 or child["timed_out"] or len(sends) < config.rounds
    cpu = {e["round"]: e for e in events if e["kind"] == "cpu"}
    first, last = warmup + 1, config.rounds
    cpu_per_round = cpu_by_process = None
    if first in cpu and last in cpu:
        cpu_per_round = (cpu[last]["seconds"] - cpu[first]["seconds"]) / (last - first)
        before, after = cpu[first]["by_process"], cpu[last]["by_process"]
        cpu_by_process = {name: round((after[name] - before.get(name, 0.0)) / (last - first), 4) for name in after}
    return {
        "system": system,
        "ok": not failed,
        "returncode": child["returncode"],
        "timed_out": child["timed_out"],
        "output_tail": child["output_tail"] if failed else "",
        "process_seconds": child["seconds"],
        "load_before": load_before,
        "load_after": load_after,
        "rounds_seen": len(sends),
        "replies_per_round": [s["replies"] - s["errors"] for s in sends],
        "round_seconds": periods,
        "median_round_s": median(periods),
        "median_send_receive_s": median(inside),
        "median_server_s": median([p - i for p, i in zip(periods, inside, strict=True)]),
        "median_server_calls_ms": {name: 1000 * median(values[warmup:-1] or values) for name, values in calls.items()},
        "median_client_train_ms": 1000 * median(client_seconds["train"]) if client_seconds["train"] else None,
        # CPU seconds of the whole process tree (driver, Ray's daemons and workers) per round, same rounds.
        "cpu_per_round_s": cpu_per_round,
        "cpu_per_round_by_process_s": cpu_by_process,
        "client_messages": {kind: len(values) for kind, values in client_seconds.items()},
    }


def _fmt(value: float | None, scale: float = 1.0, digits: int = 3) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def run_benchmark(datasets: list[str], clients: int, clients_per_round: int, rounds: int, inner_steps: int,
                  repeats: int, timeout: float, warmup: int) -> dict[str, Any]:
    results = []
    print(f"{'dataset':<9} {'system':<10} {'rep':>3} {'round s':>8} {'in s&r s':>9} {'server s':>9} "
          f"{'client ms':>9} {'cpu s/round':>11} {'load before->after':>20}")
    for dataset in datasets:
        config = bench_config(dataset, clients, clients_per_round, rounds, inner_steps)
        runs = []
        for repeat in range(repeats):
            # A B, then B A: a linear drift in the machine's load adds the same to both systems' sums.
            order = ("metafleet", "flower") if repeat % 2 == 0 else ("flower", "metafleet")
            for system in order:
                row = {**measure(system, config, timeout, warmup), "repeat": repeat}
                runs.append(row)
                print(f"{dataset:<9} {system:<10} {repeat:>3} {_fmt(row['median_round_s']):>8} "
                      f"{_fmt(row['median_send_receive_s']):>9} {_fmt(row['median_server_s']):>9} "
                      f"{_fmt(row['median_client_train_ms'], 1, 1):>9} {_fmt(row['cpu_per_round_s']):>11} "
                      f"{str(row['load_before']) + '->' + str(row['load_after']):>20}"
                      + ("" if row["ok"] else "  FAILED"), flush=True)
                if not row["ok"]:
                    print(row["output_tail"], file=sys.stderr)
        pooled = {s: [p for r in runs if r["system"] == s and r["ok"] for p in r["round_seconds"]]
                  for s in ("metafleet", "flower")}
        medians = {s: median(v) for s, v in pooled.items()}
        # The engine polls for replies every 0.1 s, so round times fall into 0.1-s steps and a median can jump
        # a whole step on a few ms; the mean moves smoothly with the time actually spent.
        means = {s: statistics.mean(v) if v else None for s, v in pooled.items()}
        ratio = medians["metafleet"] / medians["flower"] if all(medians.values()) else None
        cpus = {s: [r["cpu_per_round_s"] for r in runs if r["system"] == s and r["ok"] and r["cpu_per_round_s"]]
                for s in ("metafleet", "flower")}
        cpu = {s: statistics.mean(v) if v else None for s, v in cpus.items()}
        results.append({
            "dataset": dataset,
            "config": {"clients": config.clients, "held_out_clients": config.held_out_clients,
                       "clients_per_round": config.clients_per_round, "rounds": config.rounds,
                       "inner_steps": config.inner_steps, "shots": config.shots, "query_shots": config.query_shots,
                       "eval_every": config.eval_every},
            "runs": runs,
            "median_round_s": medians,
            "mean_round_s": means,
            "ratio": ratio,
            "ratio_of_means": means["metafleet"] / means["flower"] if all(means.values()) else None,
            "cpu_per_round_s": cpu,
            "cpu_ratio": cpu["metafleet"] / cpu["flower"] if all(cpu.values()) else None,
            "within_target": ratio is not None and ratio <= TARGET_RATIO,
        })
    print(f"\n{'dataset':<9} {'median s/round: metafleet':>25} {'flower':>7} {'ratio':>6}   "
          f"{'mean: metafleet':>15} {'flower':>7} {'ratio':>6}   {'CPU s/round: metafleet':>22} {'flower':>7} "
          f"{'ratio':>6}   (target ratio <= {TARGET_RATIO})")
    for result in results:
        m, a, c = result["median_round_s"], result["mean_round_s"], result["cpu_per_round_s"]
        print(f"{result['dataset']:<9} {_fmt(m['metafleet']):>25} {_fmt(m['flower']):>7} {_fmt(result['ratio']):>6}   "
              f"{_fmt(a['metafleet']):>15} {_fmt(a['flower']):>7} {_fmt(result['ratio_of_means']):>6}   "
              f"{_fmt(c['metafleet']):>22} {_fmt(c['flower']):>7} {_fmt(result['cpu_ratio']):>6}")
    return {"benchmark": "overhead", "target_ratio": TARGET_RATIO, "cpus": os.cpu_count(), "warmup_rounds": warmup,
            "results": results}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out/overhead.json"))
    parser.add_argument("--datasets", default="sinusoid,watch", help="comma-separated")
    parser.add_argument("--clients", type=int, default=20, help="ignored by datasets of fixed size (watch: 10)")
    parser.add_argument("--clients-per-round", type=int, default=10, help="capped at the training clients")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--warmup-rounds", type=int, default=2, help="first rounds left out of the per-round time")
    parser.add_argument("--repeats", type=int, default=4, help="runs of each system per dataset, interleaved")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per run before its tree is killed")
    parser.add_argument("--child", nargs=5, metavar=("SYSTEM", "CONFIG", "EVENTS", "CLIENT_DIR", "WARMUP"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        # From the importable module, not __main__: Ray pickles __main__'s functions by value with every message,
        # so the baseline's per-process cache would arrive empty each time (the watch data reloaded per message).
        from metafleet.simulations import bench_overhead

        bench_overhead.child_run(*args.child)
        return 0
    if args.rounds < args.warmup_rounds + 2:
        parser.error("--rounds must be >= warm-up rounds + 2: those and round R are left out of the per-round time")
    result = run_benchmark(args.datasets.split(","), args.clients, args.clients_per_round, args.rounds,
                           args.inner_steps, args.repeats, args.timeout, args.warmup_rounds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    failed = [run for r in result["results"] for run in r["runs"] if not run["ok"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
