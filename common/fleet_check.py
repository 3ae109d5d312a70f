"""``metafleet fleet check --task TASK --data FLEET``: validate a folder fleet before anything runs.

Reads every device, checks the task's model against the data, and prints a summary (devices, examples and
classes per device, shapes). Every problem gets one line naming the device and its folder: NaN or Inf, a
shape that does not fit the model, a label out of range, an empty device, support and query sharing
identical examples. Exit code 0 when the fleet is usable, 2 when anything is wrong.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from metafleet.common.data import held_out_client_ids
from metafleet.common.errors import MetafleetError
from metafleet.common.folder_fleet import FolderFleet
from metafleet.common.task import fingerprint, load_task

SHOWN_DEVICES = 50


def fleet_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metafleet fleet", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="validate a folder fleet and print its summary")
    check.add_argument("--task", required=True, help="the task: FILE.py, package.module[:attr] or a built-in's name")
    check.add_argument("--data", type=Path, required=True, metavar="FLEET_DIR",
                       help="the fleet: FLEET_DIR/<device>/data.npz or data.csv")
    check.add_argument("--held-out-clients", type=int, metavar="N",
                       help="also list the devices each fold holds out with N held-out devices (as simulate's --fold)")
    # Folds once depended on the seed; they belong to the fleet now. Accepted so that older commands still run.
    check.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    return parser


def _print_folds(fleet: FolderFleet, held_out: int) -> None:
    """Which devices ``--fold F`` holds out: choose validation devices before any run reports them."""
    folds = fleet.num_clients // held_out if 1 <= held_out < fleet.num_clients else 0
    if not folds:
        raise MetafleetError(f"--held-out-clients must be in [1, {fleet.num_clients}), got {held_out}")
    print(f"folds of {held_out} held-out devices (the same for every --seed):")
    for fold in range(folds):
        names = [fleet.device_name(i) for i in held_out_client_ids(fleet.num_clients, held_out, fold)]
        print(f"  fold {fold}: {', '.join(names)}")


def fleet_command(argv: list[str]) -> int:
    args = fleet_parser().parse_args(argv)
    task = load_task(args.task)
    fleet = FolderFleet(task, args.data.resolve())
    problems = fleet.problems()
    parameters = sum(p.numel() for p in fleet.model.parameters())
    kind = "classification" if task.objective.class_targets else task.objective.metric_name
    print(f"fleet {fleet.root}: {fleet.num_clients} devices; task {task.name} ({kind}), model of {parameters:,} "
          f"parameters, fingerprint {fingerprint(fleet.model)}")
    classes = f"; {fleet.num_classes} classes" if fleet.num_classes else ""
    print(f"input shape {fleet.input_shape}{classes}; sampling {task.sampling}")
    print(f"{'device':<24} {'support':>8} {'query':>8}  {'classes (support/query)' if fleet.num_classes else ''}")
    support_total = query_total = 0
    for client_id in range(fleet.num_clients):
        name = fleet.device_name(client_id)
        if name in problems:
            line = f"{name:<24} {'(see problems below)':>17}"
        else:
            split = fleet.client(client_id).splits[0]
            support, query = len(split.support[0]), len(split.query[0])
            support_total, query_total = support_total + support, query_total + query
            labels = ""
            if fleet.num_classes:
                labels = f"  {len(np.unique(split.support[1].numpy()))}/{len(np.unique(split.query[1].numpy()))}"
            line = f"{name:<24} {support:>8} {query:>8}{labels}"
        if client_id < SHOWN_DEVICES:
            print(line)
    if fleet.num_clients > SHOWN_DEVICES:
        print(f"... and {fleet.num_clients - SHOWN_DEVICES} more devices")
    print(f"{'all usable devices':<24} {support_total:>8} {query_total:>8}")
    if args.held_out_clients is not None:
        _print_folds(fleet, args.held_out_clients)
    if problems:
        lines = [line for device in problems.values() for line in device]
        for line in lines:
            print(f"problem: {line}", file=sys.stderr)
        raise MetafleetError(f"{len(lines)} problem(s) in {len(problems)} of {fleet.num_clients} devices of "
                             f"{fleet.root}; fix or remove them")
    print("fleet ok")
    return 0
