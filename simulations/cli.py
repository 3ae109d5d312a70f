"""``metafleet simulate``: a whole fleet on Flower's Simulation Engine, written to a run directory."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from metafleet.common.cli_options import add_attack_arguments, add_learning_arguments, config_from_arguments
from metafleet.common.config import RunConfig
from metafleet.common.errors import MetafleetError
from metafleet.common.meta import ALGORITHMS
from metafleet.server.report import print_summary
from metafleet.server.rundir import start_or_resume

BACKENDS = ("ray", "inprocess", "vectorized")
ALGORITHM_CHOICES = sorted(ALGORITHMS)
# What --against does not copy from the method's arguments: learning settings whose meaning or good value
# differs by algorithm (an Adam meta lr is not FedAvg's SGD step; a meta inner lr is not a training lr).
BASELINE_OWN_SETTINGS = ("inner_lr", "inner_steps", "outer_optimizer", "outer_lr", "adapt_lr", "head_init",
                         "head_adapt_lr", "prox_lambda")
RAY_REPLY_POLL_SECONDS = 0.02  # the in-memory LinkState answers a pull in microseconds


def simulate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metafleet simulate",
        description="Meta-train a simulated fleet with Flower's Simulation Engine and evaluate personalization "
        "on held-out clients. Writes config.json, metrics.jsonl, checkpoints/, summary.json and plots.",
    )
    add_learning_arguments(parser)
    add_attack_arguments(parser)
    parser.add_argument("--out", type=Path, help="run directory (default runs/DATASET-ALGORITHM-TIME)")
    parser.add_argument("--resume", type=Path, metavar="DIR", help="continue the run in DIR from its last checkpoint")
    parser.add_argument("--cpus-per-client", type=float, default=1.0, help="Ray resources per simulated device")
    parser.add_argument("--ray-address", metavar="HOST:PORT",
                        help="run the devices on an existing Ray cluster (its head's address, from `ray start --head`) "
                        "instead of a Ray started here; every node needs the same metafleet, task and data "
                        "(docs/ray-cluster.md)")
    parser.add_argument("--backend", choices=BACKENDS, default="ray",
                        help="ray: Flower's Simulation Engine, devices as Ray workers (default); inprocess: the same "
                        "ServerApp and ClientApp exchanging serialized messages in this process, one device at a time "
                        "(no Ray start-up or polling: faster for small models and long runs); vectorized: the "
                        "in-process ServerApp, with each round's training computed for all its devices at once "
                        "(torch.func.vmap; no SecAgg+)")
    parser.add_argument("--torch-threads", type=int, metavar="N",
                        help="CPU threads torch uses in this process (inprocess and vectorized backends; Ray's workers "
                        "keep one each). 1 is much faster for small models on a busy or 2-core machine, where "
                        "threads wait on one another; default: torch's own")
    parser.add_argument("--torch-device", metavar="DEVICE",
                        help="where simulated devices compute: cpu (default) or cuda (sets $METAFLEET_TORCH_DEVICE)")
    parser.add_argument("--against", metavar="ALGORITHM", choices=ALGORITHM_CHOICES,
                        help="then train ALGORITHM (e.g. fedavg: FedAvg, fine-tuned on each device) on the same fleet, "
                        "seed and held-out devices, into OUT/against-ALGORITHM, and print the paired difference per "
                        "adaptation step with its 95%% CI over those devices (comparison.json)")
    parser.add_argument("--verbose", action="store_true", help="show Flower's and Ray's own logs")
    return parser


def simulate_command(argv: list[str]) -> int:
    args = simulate_parser().parse_args(argv)
    if args.against and args.resume:
        raise MetafleetError("--against starts a new pair of runs; it cannot be combined with --resume")
    if args.against and args.against == args.algorithm:
        raise MetafleetError(f"--against {args.against} would compare {args.algorithm} with itself: name another "
                             "algorithm")
    if args.torch_threads is not None:
        if args.torch_threads < 1:
            raise MetafleetError(f"--torch-threads must be >= 1, got {args.torch_threads}")
        import torch

        torch.set_num_threads(args.torch_threads)
    config, out = start_or_resume(args.resume, args.out, lambda: config_from_arguments(args))
    options = {"cpus_per_client": args.cpus_per_client, "verbose": args.verbose, "backend": args.backend,
               "torch_device": args.torch_device, "ray_address": args.ray_address}
    baseline = None
    if args.against:
        # The fleet, devices, data and evaluation are shared; how each algorithm learns is its own: the
        # baseline takes its own defaults for the settings that mean something else to it.
        own = {name: None for name in BASELINE_OWN_SETTINGS if getattr(args, name, None) is not None}
        if own:
            print(f"metafleet: {args.against} uses its own defaults for {', '.join(sorted(own))}", file=sys.stderr)
        baseline_config = config_from_arguments(argparse.Namespace(**{**vars(args), **own, "algorithm": args.against}))
        baseline_out = Path(out) / f"against-{args.against}"
        baseline_out.mkdir(parents=True, exist_ok=True)
        if args.backend != "ray":
            # On the in-process backends the baseline trains beside the method, in a process of its own (a
            # second core); Ray already spreads one run over the cores.
            import multiprocessing

            print(f"metafleet: {args.against} trains alongside, on the same fleet, seed and held-out devices -> "
                  f"{baseline_out} (its log: {baseline_out / 'log.txt'})", file=sys.stderr)
            baseline = multiprocessing.get_context("spawn").Process(
                target=_simulate_logged,
                args=(baseline_config, baseline_out, options, args.torch_threads, os.getpid()))
            baseline.start()
    try:
        summary = simulate(config, Path(out), resume=bool(args.resume), **options)
    except BaseException:
        if baseline is not None:
            baseline.terminate()
        raise
    print_summary(summary)
    if args.against:
        from metafleet.simulations.comparison import compare_runs, print_comparison

        if baseline is None:
            print(f"metafleet: now {args.against} on the same fleet, seed and held-out devices -> {baseline_out}",
                  file=sys.stderr)
            simulate(baseline_config, baseline_out, **options)
        else:
            print(f"metafleet: waiting for {args.against} ({baseline_out / 'log.txt'})", file=sys.stderr)
            baseline.join()
            if baseline.exitcode != 0:
                raise MetafleetError(f"the {args.against} run failed (exit code {baseline.exitcode}); its log: "
                                     f"{baseline_out / 'log.txt'}")
        print_comparison(compare_runs(Path(out), baseline_out, Path(out) / "comparison.json"))
    return 0


def _simulate_logged(config: RunConfig, out: Path, options: dict, torch_threads: int | None,
                     parent: int) -> None:
    """``simulate`` in a child process, its console output in OUT/log.txt (two runs' progress lines would
    interleave on one console). It ends when the process that started it ends, however that one ended."""
    import threading
    import time

    def end_with_parent() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=end_with_parent, daemon=True).start()
    if torch_threads is not None:
        import torch

        torch.set_num_threads(torch_threads)
    # Left open until the process ends, so that a traceback, printed after this function, lands in it too.
    log_file = open(out / "log.txt", "w", buffering=1)  # noqa: SIM115
    sys.stdout = sys.stderr = log_file
    try:
        simulate(config, out, **options)
    except MetafleetError as error:
        print(f"metafleet: error: {error}", file=log_file)
        raise SystemExit(2) from None


@contextlib.contextmanager
def _environment(name: str, value: str | None) -> Iterator[None]:
    """``name=value`` in this process's environment for the block (nothing when value is None), then as before:
    a later run in the same process must not inherit it."""
    if value is None:
        yield
        return
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def simulate(config: RunConfig, out: Path, resume: bool = False, cpus_per_client: float = 1.0,
             verbose: bool = False, backend: str = "ray", torch_device: str | None = None,
             ray_address: str | None = None) -> dict:
    """Run the fleet in this process (its devices on a Ray cluster's nodes with ``ray_address``); returns
    summary.json's content."""
    if backend not in BACKENDS:
        raise MetafleetError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
    if ray_address and backend != "ray":
        raise MetafleetError(f"--ray-address runs devices on a Ray cluster: it needs --backend ray, not {backend}")
    from metafleet.client.app import TORCH_DEVICE_ENV, TORCH_DEVICE_KEY, resolve_torch_device

    if torch_device:
        resolve_torch_device(torch_device)  # one clear error now, not one per device later
    if backend == "vectorized":
        from metafleet.simulations.vectorized import check_vectorizable

        check_vectorizable(config)
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    from metafleet.client.app import app as client_app

    if config.attack_definition.active:
        from metafleet.simulations.attacks import AttackingClientApp, attackers

        client_app = AttackingClientApp()
        print(f"metafleet: {len(attackers(config))} attacking devices ({config.attack}): "
              f"{', '.join(str(c) for c in sorted(attackers(config)))}", file=sys.stderr)

    if config.data:
        from metafleet.common.fleets import make_fleet, split_clients

        # A fleet or task that cannot work fails here, in one line, before any device starts.
        devices = make_fleet(config)
        held_out = ", ".join(devices.device_name(i) for i in split_clients(config)[1])
        print(f"metafleet: held out: {held_out}", file=sys.stderr)
    run_config = {**config.to_run_config(), "out-dir": str(out.resolve()), "resume": resume}
    if backend == "ray":
        # Flower's in-memory grid pulls replies every 0.1 s; a SecAgg+ round waits on four exchanges.
        run_config["reply-poll-seconds"] = RAY_REPLY_POLL_SECONDS
    source = f"the fleet in {config.data}" if config.data else "its own data"
    print(f"metafleet: simulating {config.clients} clients ({config.held_out_clients} held out), "
          f"{config.algorithm} on task {config.dataset} with {source}, {config.rounds} rounds ({backend}) -> {out}",
          file=sys.stderr)
    if backend == "ray":
        from metafleet.server.app import app as server_app
        from metafleet.simulations.engine import run_in_simulation

        # Ray builds its devices' node configs itself; its workers inherit this process's environment, and
        # find a task given as package.module where this process does (its working folder included).
        path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), os.getcwd()) if p)
        with _environment(TORCH_DEVICE_ENV, torch_device), _environment("PYTHONPATH", path):
            run_in_simulation(server_app, client_app, run_config, num_supernodes=config.clients,
                              cpus_per_client=cpus_per_client, verbose=verbose, ray_address=ray_address)
    else:
        from metafleet.server.app import run_meta_training
        from metafleet.simulations.inprocess import InProcessGrid, device_contexts
        from metafleet.simulations.vectorized import VectorizedGrid

        if not verbose:  # every device's per-message timing line would share this console
            logging.getLogger("metafleet.client").setLevel(logging.ERROR)
        # The ServerApp's own entry point on a grid whose devices are the ClientApp in this process.
        node_config = {TORCH_DEVICE_KEY: torch_device} if torch_device else None
        grid_class = VectorizedGrid if backend == "vectorized" else InProcessGrid
        grid = grid_class(client_app, device_contexts(config.to_run_config(), range(config.clients), node_config))
        run_meta_training(grid, run_config)
    summary_file = out / "summary.json"
    if not summary_file.is_file():
        raise MetafleetError(f"the simulation ended without writing {summary_file}; rerun with --verbose")
    return json.loads(summary_file.read_text())
