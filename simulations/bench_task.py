"""Benchmark of the task API's generic path: a 1,000-device folder fleet's start-up, and the built-in watch
task's round time through the task API against the code before it.

    python -m metafleet.simulations.bench_task [--devices 1000] [--backends inprocess,ray] [--rounds 20]
        [--repeats 3] [--baseline-ref 01b53f4] [--out bench-task.json]

1. **Start-up**: writes a folder fleet of ``--devices`` devices (``FLEET/<device>/data.npz``, 3-axis
   windows of 20 samples, 4 classes, 48 examples a device), then times ``metafleet simulate --task FILE.py
   --data FLEET`` from the process's start to the first training round's row in metrics.jsonl (fleet
   discovery and round 0's evaluation of the held-out tenth included), per backend.
2. **Round time**: ``metafleet simulate --dataset watch --algorithm reptile`` on the in-process backend, once
   with this checkout and once with ``--baseline-ref`` (the commit before the task API, checked out with
   ``git worktree``), alternating, ``--repeats`` times each; the median of the rounds' seconds (the first
   and the last, which evaluates, left out). Both run the same way: ``python -S`` with only the interpreter's
   site-packages and a folder whose ``metafleet/`` links to the tree measured, so the editable install of
   this checkout cannot leak into the baseline.

Prints a table and writes JSON. Figures in docs/benchmarks.md ("Task API").
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "client", "server", "simulations")
TASK = """
    import torch
    from torch import nn

    name = "bench-gestures"
    objective = "classification"
    input_shape = (3, 20)
    num_classes = 4


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(3, 8, 5, padding=2)
            self.norm = nn.GroupNorm(2, 8)
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            return self.head(torch.relu(self.norm(self.conv(x))).mean(-1))


    def make_model():
        return Net()
"""
QUIET = {"FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def write_fleet(folder: Path, devices: int) -> None:
    rng = np.random.default_rng(0)
    t = np.linspace(0, 1, 20)
    for device in range(devices):
        offset = rng.normal(0, 1.0, size=(3, 1))
        pools = []
        for _ in range(2):
            labels = np.repeat(np.arange(4), 6)
            waves = np.stack([np.sin(2 * np.pi * (label + 1) * t + np.arange(3)[:, None]) for label in labels])
            pools.append(((waves + offset + rng.normal(0, 0.3, waves.shape)).astype(np.float32), labels))
        (folder / f"device-{device:05d}").mkdir(parents=True)
        np.savez(folder / f"device-{device:05d}" / "data.npz", support_x=pools[0][0], support_y=pools[0][1],
                 query_x=pools[1][0], query_y=pools[1][1])


def shim(folder: Path, tree: Path) -> Path:
    """A folder whose metafleet/ links to ``tree``'s subpackages: what ``python -S`` imports."""
    (folder / "metafleet").mkdir(parents=True)
    for package in PACKAGES:
        (folder / "metafleet" / package).symlink_to(tree / package)
    return folder


def simulate_process(shim_folder: Path, args: list[str], log: Path) -> subprocess.Popen:
    site = sysconfig.get_paths()["purelib"]
    code = (f"import sys; sys.path[:0] = [{str(shim_folder)!r}, {site!r}]; "
            "from metafleet.simulations.cli import simulate_command; sys.exit(simulate_command(sys.argv[1:]))")
    return subprocess.Popen([sys.executable, "-S", "-c", code, *args], env={**os.environ, **QUIET},
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _train_rows(run_dir: Path) -> list[dict]:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return []
    rows = []
    for line in metrics.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written
    return [row for row in rows if row.get("phase") == "train"]


def startup(work: Path, shim_folder: Path, fleet: Path, task: Path, backend: str, timeout: float) -> dict:
    run_dir = work / f"startup-{backend}"
    log = work / f"startup-{backend}.log"
    started = time.monotonic()
    process = simulate_process(shim_folder, ["--task", str(task), "--data", str(fleet), "--algorithm", "reptile",
                                             "--rounds", "3", "--backend", backend, "--out", str(run_dir)], log)
    first_round = None
    try:
        while time.monotonic() - started < timeout and process.poll() is None:
            if _train_rows(run_dir):
                first_round = time.monotonic() - started
                break
            time.sleep(0.05)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
    if first_round is None:
        raise RuntimeError(f"no training round within {timeout:.0f} s on {backend}; see {log}:\n"
                           f"{log.read_text()[-2000:]}")
    return {"backend": backend, "seconds_to_first_round": first_round}


def round_time(work: Path, shim_folder: Path, label: str, repeat: int, rounds: int) -> dict:
    run_dir = work / f"watch-{label}-{repeat}"
    log = work / f"watch-{label}-{repeat}.log"
    process = simulate_process(shim_folder, ["--dataset", "watch", "--algorithm", "reptile", "--rounds", str(rounds),
                                             "--clients-per-round", "8", "--eval-every", str(10 * rounds),
                                             "--backend", "inprocess", "--out", str(run_dir)], log)
    if process.wait(timeout=1800) != 0:
        raise RuntimeError(f"the {label} watch run failed; see {log}:\n{log.read_text()[-2000:]}")
    seconds = [row["seconds"] for row in _train_rows(run_dir)][1:-1]
    return {"tree": label, "repeat": repeat, "median_round_seconds": statistics.median(seconds),
            "rounds_timed": len(seconds)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--backends", default="inprocess,ray")
    parser.add_argument("--rounds", type=int, default=20, help="rounds of each watch run")
    parser.add_argument("--repeats", type=int, default=3, help="watch runs of each tree")
    parser.add_argument("--baseline-ref", default="01b53f4", help="the commit before the task API")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds a start-up may take")
    parser.add_argument("--out", type=Path, default=Path("bench-task.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="metafleet-bench-task-") as temporary:
        work = Path(temporary)
        current = shim(work / "current", ROOT)
        baseline_tree = work / "baseline-tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(baseline_tree), args.baseline_ref],
                       check=True, capture_output=True)
        try:
            baseline = shim(work / "baseline", baseline_tree)
            fleet, task = work / "fleet", work / "bench_gestures.py"
            task.write_text(textwrap.dedent(TASK))
            made = time.monotonic()
            write_fleet(fleet, args.devices)
            print(f"wrote a fleet of {args.devices} devices in {time.monotonic() - made:.1f} s", file=sys.stderr)
            starts = [startup(work, current, fleet, task, backend, args.timeout)
                      for backend in args.backends.split(",") if backend]
            rounds = []
            for repeat in range(args.repeats):
                for label, folder in (("task-api", current), ("baseline", baseline)):
                    rounds.append(round_time(work, folder, label, repeat, args.rounds))
                    print(f"watch {label} run {repeat}: {rounds[-1]['median_round_seconds']:.3f} s/round",
                          file=sys.stderr)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(baseline_tree)],
                           capture_output=True)
    medians = {label: statistics.median(r["median_round_seconds"] for r in rounds if r["tree"] == label)
               for label in ("task-api", "baseline")}
    ratio = medians["task-api"] / medians["baseline"]
    result = {"benchmark": "task", "cpus": os.cpu_count(), "devices": args.devices, "startup": starts,
              "watch_rounds": rounds, "watch_median_round_seconds": medians, "watch_ratio": ratio,
              "baseline_ref": args.baseline_ref}
    print(f"\nfolder fleet of {args.devices} devices: seconds from start to the first round")
    for row in starts:
        print(f"  {row['backend']:<10} {row['seconds_to_first_round']:7.1f}")
    print(f"\nwatch, reptile, 8 clients a round, in-process: median seconds a round over {args.repeats} runs each")
    print(f"  task API  {medians['task-api']:.4f}\n  baseline  {medians['baseline']:.4f} ({args.baseline_ref})")
    print(f"  ratio     {ratio:.3f} (target <= 1.05)")
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
