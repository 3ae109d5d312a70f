"""Benchmark of the functional core on one device: adaptation latency and MAML's memory against FOMAML.

    python -m metafleet.simulations.bench_core --out bench-out/core

Prints a table and writes ``core.json``. Latency: 5 inner steps of the sensor 1D-CNN on one 7-way 5-shot
support set of real smartwatch windows, one thread (a stand-in for one Raspberry Pi core). Memory: the
peak resident memory that one local update adds, measured in a fresh process per case so that one
case's allocations cannot hide another's.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from metafleet.common.config import RunConfig
from metafleet.common.fleets import functional_model, make_fleet
from metafleet.common.meta import adapt, local_update


def _watch_episode(shots: int = 5, query_shots: int = 10):
    fleet = make_fleet(RunConfig.resolve(dataset="watch"))
    episode = fleet.client(0).sample_episode(np.random.default_rng(0), shots, query_shots)
    return fleet, episode


def adaptation_latency(repeats: int) -> dict:
    torch.set_num_threads(1)
    fleet, episode = _watch_episode()
    fmodel = functional_model(RunConfig.resolve(dataset="watch"))
    params = fmodel.init_params()
    adapt(fmodel, params, episode.support, 5, 0.05)  # warm-up: first-call dispatch costs are not the steady state
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        adapt(fmodel, params, episode.support, 5, 0.05)
        times.append(time.perf_counter() - start)
    return {
        "case": "adapt 5 steps, SensorCNN, 7-way 5-shot, 1 thread",
        "median_ms": 1000 * statistics.median(times),
        "p90_ms": 1000 * float(np.percentile(times, 90)),
        "repeats": repeats,
    }


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def memory_case(algorithm: str, steps: int) -> dict:
    """Run in a fresh process: the peak RSS one local update adds on top of a warmed-up process."""
    torch.set_num_threads(1)
    fleet, episode = _watch_episode()
    fmodel = functional_model(RunConfig.resolve(dataset="watch"))
    params = fmodel.init_params()
    fmodel.loss(params, episode.query).item()  # forward once so that allocator pools exist already
    before = _peak_rss_mb()
    start = time.perf_counter()
    local_update(algorithm, fmodel, params, episode, steps, 0.05)
    seconds = time.perf_counter() - start
    return {"algorithm": algorithm, "steps": steps, "peak_added_mb": _peak_rss_mb() - before, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bench-out/core"))
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--memory-case", nargs=2, metavar=("ALGORITHM", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_case:
        print(json.dumps(memory_case(args.memory_case[0], int(args.memory_case[1]))))
        return 0

    latency = adaptation_latency(args.repeats)
    print(f"{latency['case']}: median {latency['median_ms']:.1f} ms, p90 {latency['p90_ms']:.1f} ms")
    memory = []
    print(f"{'algorithm':<8} {'k':>3} {'peak added (MB)':>16} {'seconds':>8}")
    for algorithm in ("fomaml", "maml"):
        for steps in (1, 5, 10):
            output = subprocess.run(
                [sys.executable, "-m", "metafleet.simulations.bench_core", "--memory-case", algorithm, str(steps)],
                check=True, capture_output=True, text=True, timeout=600,
            ).stdout
            row = json.loads(output.strip().splitlines()[-1])
            memory.append(row)
            print(f"{algorithm:<8} {steps:>3} {row['peak_added_mb']:>16.1f} {row['seconds']:>8.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"adaptation_latency": latency, "update_memory": memory, "torch": torch.__version__}
    (args.out / "core.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out / 'core.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
