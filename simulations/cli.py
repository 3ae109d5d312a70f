"""``metafleet simulate``: a whole fleet on Flower's Simulation Engine, written to a run directory."""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
from dataclasses import fields
from datetime import datetime
from pathlib import Path

from metafleet.common.config import DATASETS, RunConfig
from metafleet.common.errors import MetafleetError
from metafleet.common.meta import ALGORITHMS
from metafleet.server.rundir import RunDirectory


def simulate_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metafleet simulate",
        description="Meta-train a simulated fleet with Flower's Simulation Engine and evaluate personalization "
        "on held-out clients. Writes config.json, metrics.jsonl, checkpoints/, summary.json and plots.",
    )
    parser.add_argument("--dataset", choices=DATASETS, default="sinusoid")
    parser.add_argument("--algorithm", choices=sorted(ALGORITHMS), default="reptile")
    parser.add_argument("--clients", type=int, help="fleet size, held-out clients included")
    parser.add_argument("--held-out-clients", type=int, help="clients never trained on (default: a tenth, min 1)")
    parser.add_argument("--clients-per-round", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--inner-steps", type=int, help="local adaptation steps k")
    parser.add_argument("--inner-lr", type=float)
    parser.add_argument("--outer-optimizer", choices=["sgd", "adam"])
    parser.add_argument("--outer-lr", type=float, help="meta learning rate")
    parser.add_argument("--shots", type=int, help="support examples per class (points, for regression)")
    parser.add_argument("--query-shots", type=int)
    parser.add_argument("--ways", type=int, help="classes per episode (0: all of the client's classes)")
    parser.add_argument("--fold", type=int, help="which block of clients is held out (folds cover every client)")
    parser.add_argument("--eval-every", type=int, help="personalization evaluation every E rounds")
    parser.add_argument("--eval-steps", help="comma-separated adaptation steps to report, from 0")
    parser.add_argument("--eval-episodes", type=int, help="evaluation episodes per support/query split of a device")
    parser.add_argument("--secure-aggregation", action="store_true", default=None,
                        help="aggregate updates with Flower's SecAgg+: the server sees only their mean")
    parser.add_argument("--secagg-clipping-range", type=float,
                        help="SecAgg+ value range: update values beyond ± this are clamped (default 8)")
    parser.add_argument("--secagg-shares", type=int, help="key shares per client (default: all sampled, at most 11)")
    parser.add_argument("--secagg-threshold", type=int, help="shares needed to unmask (default: a majority)")
    parser.add_argument("--dp-noise-multiplier", type=float,
                        help="client-level differential privacy: Gaussian noise σ (0: off)")
    parser.add_argument("--dp-clip-norm", type=float, help="differential privacy: L2 bound C of every update")
    parser.add_argument("--dp-delta", type=float, help="differential privacy: the δ epsilon is reported at")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--out", type=Path, help="run directory (default runs/DATASET-ALGORITHM-TIME)")
    parser.add_argument("--resume", type=Path, metavar="DIR", help="continue the run in DIR from its last checkpoint")
    parser.add_argument("--cpus-per-client", type=float, default=1.0)
    parser.add_argument("--verbose", action="store_true", help="show Flower's and Ray's own logs")
    return parser


def simulate_command(argv: list[str]) -> int:
    args = simulate_parser().parse_args(argv)
    if args.resume:
        run_dir = RunDirectory(args.resume)
        config = run_dir.load_config()
        if run_dir.latest_checkpoint() is None:
            raise MetafleetError(f"{args.resume} has no checkpoint yet; start it again without --resume")
        out = args.resume
    else:
        # Every RunConfig field with a flag of the same name; flags left out fall back to the defaults.
        given = {f.name: getattr(args, f.name) for f in fields(RunConfig) if hasattr(args, f.name)}
        config = RunConfig.resolve(**given)
        out = args.out or Path("runs") / f"{config.dataset}-{config.algorithm}-{datetime.now():%Y%m%d-%H%M%S}"
        if RunDirectory(out).latest_checkpoint() is not None:
            raise MetafleetError(f"{out} already holds a run; resume it with --resume {out} or pick another --out")
    summary = simulate(config, Path(out), resume=bool(args.resume), cpus_per_client=args.cpus_per_client,
                       verbose=args.verbose)
    print_summary(summary)
    return 0


def simulate(config: RunConfig, out: Path, resume: bool = False, cpus_per_client: float = 1.0,
             verbose: bool = False) -> dict:
    """Run the fleet in this process; returns summary.json's content."""
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    from metafleet.client.app import app as client_app
    from metafleet.server.app import app as server_app
    from metafleet.simulations.engine import run_in_simulation

    run_config = {**config.to_run_config(), "out-dir": str(out.resolve()), "resume": resume}
    print(f"metafleet: simulating {config.clients} clients ({config.held_out_clients} held out), "
          f"{config.algorithm} on {config.dataset}, {config.rounds} rounds -> {out}", file=sys.stderr)
    run_in_simulation(server_app, client_app, run_config, num_supernodes=config.clients,
                      cpus_per_client=cpus_per_client, verbose=verbose)
    summary_file = out / "summary.json"
    if not summary_file.is_file():
        raise MetafleetError(f"the simulation ended without writing {summary_file}; rerun with --verbose")
    return json.loads(summary_file.read_text())


def print_summary(summary: dict) -> None:
    personalization = summary["personalization"]
    print(f"\n{summary['algorithm']} on {summary['dataset']}: {summary['rounds_completed']} rounds "
          f"({summary['rounds_skipped']} skipped), {summary['wall_seconds']:.1f} s, "
          f"{summary['rejected_replies']} replies rejected")
    if personalization["mean"] is None:
        print("no personalization evaluation was run")
        return
    print(f"personalization on {personalization['held_out_clients']} held-out clients "
          f"({personalization['metric']}, mean ± 95% CI):")
    guarded = zip(personalization.get("guarded_mean") or [], personalization.get("guarded_ci95") or [], strict=True)
    rows = zip(personalization["steps"], personalization["mean"], personalization["ci95"], strict=True)
    for (step, mean, ci), guarded_values in itertools.zip_longest(rows, guarded):
        line = f"  after {step:>3} steps: {mean:.4f} ± {ci:.4f}"
        if guarded_values is not None:
            line += f"   with the device's guard: {guarded_values[0]:.4f} ± {guarded_values[1]:.4f}"
        print(line)
    privacy = summary.get("privacy")
    if privacy:
        print(f"differential privacy: epsilon {privacy['epsilon']:.3g} at delta {privacy['delta']:g} "
              f"(noise multiplier {privacy['noise_multiplier']:g}, clip norm {privacy['clip_norm']:g}, "
              f"{privacy['noised_rounds']} rounds, Opacus RDP accountant)")
    print(f"run directory: {summary['run_dir']}")


