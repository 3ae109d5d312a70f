"""``metafleet bench personalization``: meta-learning against FedAvg, fine-tuning and local training.

Every number comes from real federated runs on Flower's Simulation Engine, through ``simulate`` exactly as
``metafleet simulate`` runs them: one run per (setting, algorithm, fold, seed), in ``DIR/runs/``. The
methods compared, all with the same client compute (``inner_steps`` local steps on ``shots`` examples):

- ``fedavg``: the FedAvg model, used as it is (0 adaptation steps);
- ``fedavg+ft``: the FedAvg model fine-tuned on the device's support set (the same steps, at the dataset's
  fine-tuning lr ``finetune_lr``, chosen on validation clients; the inner lr where it has none);
- ``fedavg+head-ft``: the same model with only its head fine-tuned, the body kept (FedPer / FedRep style), at
  the task's ``head_finetune_lr`` (``finetune_lr`` where it has none);
- ``fedavg+prox-ft``: the same model fine-tuned with a pull towards it, ``(λ/2)·‖w − θ‖²`` (Ditto style), at
  ``finetune_lr`` with the task's ``finetune_prox_lambda``. Both are chosen on validation clients as
  ``finetune_lr`` is (``scripts/tune-adapt-lr``), and all three fine-tunings evaluate the one FedAvg run
  (``eval_finetunes``), on the same devices and episodes;
- ``local-only``: the untrained initialization trained on the support set alone with the inner lr (round 0
  of the fedavg runs);
- ``reptile``, ``fomaml``, ``maml``, ``per-fedavg``: the meta-learned initialization, adapted;
- ``+guard`` rows: the same devices, each keeping its adapted model only when cross-validation on its own
  support set says adaptation helps (``metafleet.common.meta.keeps_adaptation``).

Folds hold out disjoint client sets, so every client is evaluated once per seed; each client's value is
averaged over seeds and the 95% CI is over clients (not over episodes of one client). Where the seed deals
the data (fashion-mnist's partition, sinusoid's tasks) a client of one seed is another device than its
namesake of another seed, so each counts on its own. A finished run is
never redone: rerunning the command after a crash continues where it stopped. A finished run made with
another configuration than the plan's (an older version's defaults) is an error naming the change, not
silently pooled or deleted.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from metafleet.common.cli_options import add_attack_arguments
from metafleet.common.config import RunConfig
from metafleet.common.data import mean_and_ci95
from metafleet.common.errors import MetafleetError
from metafleet.common.folder_fleet import fleet_devices
from metafleet.common.task import BenchmarkPlan, BenchmarkSetting, load_task
from metafleet.common.tasks import BUILTIN_TASKS
from metafleet.simulations.cli import BACKENDS

ALGORITHMS = ("fedavg", "reptile", "fomaml", "maml", "per-fedavg")
# Run only when --algorithms names them: the default table, and the figures in docs/benchmarks.md, stay as they were.
OPTIONAL_ALGORITHMS = ("meta-sgd",)
# What every method is paired with in results.md: the fine-tunings of FedAvg's model a user would pick
# instead of meta-learning. Each is (method, metric-key prefix of the FedAvg run's evaluations).
BASELINES = (("fedavg+ft", ""), ("fedavg+head-ft", "head-ft-"), ("fedavg+prox-ft", "prox-ft-"))
# FedAvg runs evaluate all three fine-tunings of their one model.
FEDAVG_FINETUNES = "full,head,prox"
# One colour per method in every plot; the FedAvg run's curves share fedavg+ft's.
COLORS = {"local-only": "C0", "fedavg+ft": "C1", "fedavg": "C1", "reptile": "C2", "fomaml": "C3", "maml": "C4",
          "fedavg+head-ft": "C5", "fedavg+prox-ft": "C6", "per-fedavg": "C7", "meta-sgd": "C8"}


Setting = BenchmarkSetting


@dataclass(frozen=True)
class Plan:
    """The runs of one benchmark: a task (``dataset``: its name or spec) on its own data or a folder fleet."""

    dataset: str
    settings: tuple[Setting, ...]
    rounds: int
    folds: tuple[int, ...]
    seeds: tuple[int, ...]
    common: dict[str, Any] = field(default_factory=dict)
    data: str = ""


def plan_for(task_spec: str, quick: bool, data: str = "") -> Plan:
    """The runs behind a task's table: the task's ``benchmark`` plan, or one setting of its defaults for 50
    rounds, fold 0, seeds 0 and 1. ``--quick`` keeps one setting, one fold and one seed, few rounds."""
    task = load_task(task_spec)
    declared = task.benchmark or BenchmarkPlan()
    full = Plan(task.spec, declared.settings, declared.rounds, declared.folds, declared.seeds, dict(declared.common),
                data)
    if not quick:
        return full
    return dataclasses.replace(full, settings=full.settings[:1], rounds=max(5, full.rounds // 10),
                               folds=full.folds[:1], seeds=full.seeds[:1],
                               common={**full.common, "eval_every": max(5, full.rounds // 10)})


def run_name(setting: Setting, algorithm: str, fold: int, seed: int) -> str:
    slug = setting.label.replace(" ", "").replace("(", "").replace(")", "").replace("-", "")
    return f"{slug}-{algorithm}-fold{fold}-seed{seed}"


@dataclass(frozen=True)
class Execution:
    """How the runs execute; none of it changes what a run computes."""

    backend: str = "ray"
    cpus_per_client: float = 1.0
    torch_device: str | None = None
    jobs: int = 1


def _simulate(config: RunConfig, run_dir: Path, execution: Execution) -> None:
    from metafleet.simulations.cli import simulate

    simulate(config, run_dir, cpus_per_client=execution.cpus_per_client, backend=execution.backend,
             torch_device=execution.torch_device)


def _start_worker(threads: int) -> None:
    """A worker shares the cores with the other jobs: torch's default (a thread per core in every process)
    oversubscribes them, which made the watch benchmark's rounds 3 to 4 times slower with two jobs on 2 cores.

    It also ends when the benchmark process does: killed, it would leave runs going on without it (which a
    rerun, starting those runs afresh, would then share their directories with)."""
    import torch

    torch.set_num_threads(threads)
    if sys.platform == "linux":
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def _check_finished_run(run_dir: Path, planned: RunConfig) -> None:
    """A finished run counts only if the plan would make the same run today.

    Defaults change between versions (a dataset's training shots, say); pooling an old run with new ones
    would report a table no command produces, and deleting it would lose a finished result."""
    from metafleet.server.rundir import RunDirectory

    finished = RunDirectory(run_dir).load_config()
    if finished == planned:
        return
    old, new = finished.to_dict(), planned.to_dict()
    changes = ", ".join(f"{key} {old[key]!r} -> {new[key]!r}" for key in new if old.get(key) != new[key])
    raise MetafleetError(f"{run_dir} finished with another config than this benchmark plans ({changes}); "
                         f"move that run away (or use a new --out) to run it again")


def run_all(plan: Plan, out: Path, algorithms: Sequence[str], execution: Execution) -> dict[str, Path]:
    """Runs (or finds already finished) every run of the plan; returns run name -> run directory.

    With ``execution.jobs > 1`` that many runs go at once, each in its own process."""
    runs: dict[str, Path] = {}
    jobs = [(s, a, f, seed) for s in plan.settings for f in plan.folds for seed in plan.seeds for a in algorithms]
    pending = []
    for setting, algorithm, fold, seed in jobs:
        name = run_name(setting, algorithm, fold, seed)
        run_dir = out / "runs" / name
        runs[name] = run_dir
        finetunes = {"eval_finetunes": FEDAVG_FINETUNES} if algorithm == "fedavg" else {}
        config = RunConfig.resolve(task=plan.dataset, data=plan.data or None, algorithm=algorithm,
                                   rounds=plan.rounds, fold=fold, seed=seed, **plan.common, **setting.overrides,
                                   **finetunes)
        if (run_dir / "summary.json").is_file():
            _check_finished_run(run_dir, config)
            continue
        if run_dir.exists():  # an interrupted run: its partial rows would mix with a fresh one
            shutil.rmtree(run_dir)
        pending.append((name, config, run_dir))
    started = time.monotonic()
    if execution.jobs <= 1:
        for index, (name, config, run_dir) in enumerate(pending, start=1):
            elapsed = time.monotonic() - started
            print(f"[bench {index}/{len(pending)}] {name} ({elapsed:.0f} s so far)", file=sys.stderr, flush=True)
            _simulate(config, run_dir, execution)
        return runs
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # Spawned, not forked: a forked child would inherit this process's torch threads (and CUDA, if used).
    threads = max(1, (os.cpu_count() or 1) // execution.jobs)
    with ProcessPoolExecutor(execution.jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_start_worker, initargs=(threads,)) as pool:
        futures = {pool.submit(_simulate, config, run_dir, execution): name for name, config, run_dir in pending}
        for done, future in enumerate(as_completed(futures), start=1):
            future.result()  # a failed run fails the benchmark, naming its error
            elapsed = time.monotonic() - started
            print(f"[bench {done}/{len(pending)} done] {futures[future]} ({elapsed:.0f} s so far)", file=sys.stderr,
                  flush=True)
    return runs


def _evaluations(run_dir: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [row for row in rows if row["phase"] == "evaluate"]


def _per_client(row: dict[str, Any], steps: Sequence[int], guarded: bool = False,
                finetune: str = "") -> dict[int, list[float]]:
    prefix = finetune + ("guarded-" if guarded else "")
    columns = [row[f"clients-{prefix}step-{s}"] for s in steps]
    return {int(c): [float(col[i]) for col in columns] for i, c in enumerate(row["client-ids"])}


def collect(plan: Plan, runs: dict[str, Path], algorithms: Sequence[str]) -> tuple[list[dict], dict]:
    """Result rows (one per setting, method and step count) and the curves over rounds for the plots."""
    # A client is a device: the same subject, alphabet or role under every seed, but a new draw of data
    # under each seed where the seed deals it (then it is never averaged with its namesake of another seed).
    per_seed_clients = load_task(plan.dataset).clients_depend_on_seed and not plan.data
    names = fleet_devices(plan.data) if plan.data else None  # a folder fleet's devices go by their names
    rows, over_rounds = [], {}
    for setting in plan.settings:
        per_method: dict[str, dict[tuple[str, int], list[float]]] = {}
        walls: dict[str, float] = {}
        steps: list[int] = []
        metric = "accuracy"
        for algorithm in algorithms:
            for fold in plan.folds:
                for seed in plan.seeds:
                    run_dir = runs[run_name(setting, algorithm, fold, seed)]
                    summary = json.loads((run_dir / "summary.json").read_text())
                    config = RunConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
                    steps, metric = list(config.eval_steps), summary["personalization"]["metric"]
                    higher_is_better = config.task_definition.objective.higher_is_better
                    evaluations = _evaluations(run_dir)
                    initial, final = evaluations[0], evaluations[-1]
                    if initial["round"] != 0 or final["round"] != config.rounds:
                        raise MetafleetError(
                            f"{run_dir} lacks the round-0 or the final evaluation (no held-out client's reply was "
                            "accepted: a step size that makes adaptation diverge gives non-finite metrics, which "
                            "the server rejects; its log names the reason)")
                    sources = {algorithm: _per_client(final, steps),
                               f"{algorithm}+guard": _per_client(final, steps, guarded=True)}
                    if algorithm == "fedavg":
                        sources = {"local-only": _per_client(initial, steps)}
                        for method, prefix in BASELINES:
                            sources[method] = _per_client(final, steps, finetune=prefix)
                            sources[f"{method}+guard"] = _per_client(final, steps, guarded=True, finetune=prefix)
                    for method, clients in sources.items():
                        walls[method] = walls.get(method, 0.0) + float(summary["wall_seconds"])
                        table = per_method.setdefault(method, {})
                        for client, curve in clients.items():
                            device = names[client] if names else str(client)
                            device = f"{device}/seed{seed}" if per_seed_clients else device
                            table.setdefault((device, seed), curve)
                    curves_over_rounds = BASELINES if algorithm == "fedavg" else ((algorithm, ""),)
                    for method, prefix in curves_over_rounds:
                        by_round = over_rounds.setdefault((setting.label, method), {})
                        for row in evaluations:
                            # A run made before eval_finetunes existed has only the plain keys.
                            key = f"mean-{prefix}step-{steps[-1]}"
                            if key in row:
                                by_round.setdefault(row["round"], []).append(row[key])
        for method, table in per_method.items():
            clients = sorted({device for device, _ in table})
            curves = np.array([np.mean([table[(c, s)] for s in plan.seeds if (c, s) in table], axis=0)
                               for c in clients])
            for index, step in enumerate(steps):
                mean, ci = mean_and_ci95(curves[:, index])
                rows.append({"dataset": load_task(plan.dataset).name, "setting": setting.label, "algorithm": method,
                             "shots": setting.overrides.get("shots"), "steps": step, "metric": metric,
                             "higher_is_better": higher_is_better, "mean": mean, "ci95": ci,
                             "clients": len(clients), "seeds": len(plan.seeds),
                             "rounds": plan.rounds, "wall_seconds": walls[method],
                             "per_client": {c: float(v) for c, v in zip(clients, curves[:, index], strict=True)}})
        # FedAvg without adaptation is the fine-tuned model's step 0.
        for row in [r for r in rows if r["setting"] == setting.label and r["algorithm"] == "fedavg+ft"
                    and r["steps"] == 0]:
            rows.append({**row, "algorithm": "fedavg"})
    return rows, over_rounds


def write_results(plan: Plan, out: Path, rows: list[dict], over_rounds: dict, elapsed: float) -> None:
    name = load_task(plan.dataset).name
    results = {"dataset": name, "data": plan.data, "rounds": plan.rounds, "folds": list(plan.folds),
               "seeds": list(plan.seeds),
               "bench_wall_seconds": elapsed, "rows": rows}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    pooling = ("each seed deals new clients, so a client of one seed counts on its own"
               if load_task(plan.dataset).clients_depend_on_seed and not plan.data
               else "each client's value averaged over seeds")
    fleet = f" on the fleet in {plan.data}" if plan.data else ""
    lines = [f"# Personalization benchmark: {name}{fleet}", "",
             f"{plan.rounds} rounds, folds {list(plan.folds)}, seeds {list(plan.seeds)}; mean ± 95% CI over the "
             "held-out clients pooled across folds (" + pooling + ").", ""]
    for setting in plan.settings:
        chosen = [r for r in rows if r["setting"] == setting.label]
        if not chosen:
            continue
        steps = sorted({r["steps"] for r in chosen})
        lines += [f"## {setting.label} ({chosen[0]['metric']}, {chosen[0]['clients']} held-out clients)", "",
                  "| method | " + " | ".join(f"{s} steps" for s in steps) + " |",
                  "|---" * (len(steps) + 1) + "|"]
        for method in dict.fromkeys(r["algorithm"] for r in chosen):
            cells = []
            for step in steps:
                match = [r for r in chosen if r["algorithm"] == method and r["steps"] == step]
                cells.append(f"{match[0]['mean']:.4f} ± {match[0]['ci95']:.4f}" if match else "")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
        lines += _paired_lines(chosen, steps[-1])
    lines.append(f"Benchmark wall time: {elapsed:.0f} s.")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    _plot(plan, out, rows, over_rounds)


def paired_difference(method: dict[str, Any], baseline: dict[str, Any]) -> tuple[float, float, int, int, int]:
    """Mean ± 95% CI of method − baseline over the clients both rows hold; clients where the method is
    ahead (better: higher accuracy, lower MSE), behind, in all.

    Clients differ a lot from one another; the difference on the same clients removes that spread, which
    the two rows' own CIs include."""
    shared = sorted(set(method["per_client"]) & set(baseline["per_client"]))
    if not shared:
        raise MetafleetError(f"{method['algorithm']} and {baseline['algorithm']} share no clients")
    differences = [method["per_client"][c] - baseline["per_client"][c] for c in shared]
    mean, ci = mean_and_ci95(differences)
    sign = 1 if method.get("higher_is_better", True) else -1
    return mean, ci, sum(sign * d > 0 for d in differences), sum(sign * d < 0 for d in differences), len(shared)


def _paired_lines(rows: list[dict], step: int) -> list[str]:
    """results.md's paired comparison of every method with each baseline (``BASELINES``) after ``step``
    steps: one column a baseline, so a meta method's gain is read against the strongest fine-tuning, not
    only against plain fine-tuning."""
    at_step = {r["algorithm"]: r for r in rows if r["steps"] == step}
    baselines = [name for name, _ in BASELINES if name in at_step]
    if not baselines:
        return []
    lines = [f"Paired with each baseline after {step} steps (method − baseline over the same clients; clients "
             "ahead / behind):", "",
             "| method | " + " | ".join(f"− {name}" for name in baselines) + " |",
             "|---" * (len(baselines) + 1) + "|"]
    for name, row in at_step.items():
        if name == "fedavg":
            continue
        cells = []
        for baseline in baselines:
            if name == baseline:
                cells.append("")
                continue
            mean, ci, ahead, behind, clients = paired_difference(row, at_step[baseline])
            cells.append(f"{mean:+.4f} ± {ci:.4f} ({ahead} / {behind} of {clients})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines + [""]


def _plot(plan: Plan, out: Path, rows: list[dict], over_rounds: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for index, setting in enumerate(plan.settings):
        chosen = [r for r in rows if r["setting"] == setting.label and not r["algorithm"].endswith("+guard")
                  and r["algorithm"] != "fedavg"]
        if not chosen:
            continue
        figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        for method in dict.fromkeys(r["algorithm"] for r in chosen):
            points = sorted((r["steps"], r["mean"], r["ci95"]) for r in chosen if r["algorithm"] == method)
            steps, mean, ci = (np.array(v) for v in zip(*points, strict=True))
            left.plot(steps, mean, marker="o", label=method, color=COLORS.get(method))
            left.fill_between(steps, mean - ci, mean + ci, alpha=0.2, color=COLORS.get(method))
        left.set(xlabel="adaptation steps on the support set", ylabel=chosen[0]["metric"],
                 title=f"{load_task(plan.dataset).name} {setting.label}: held-out clients (95% CI)")
        left.legend()
        for (label, algorithm), by_round in over_rounds.items():
            if label != setting.label:
                continue
            rounds = sorted(by_round)
            right.plot(rounds, [np.mean(by_round[r]) for r in rounds], marker=".", label=algorithm,
                       color=COLORS.get(algorithm))
        right.set(xlabel="round", ylabel=f"{chosen[0]['metric']} after adaptation", title="during training")
        right.legend()
        figure.tight_layout()
        figure.savefig(out / f"personalization-{index}.png", dpi=110)
        plt.close(figure)


def parse_seeds(text: str, option: str = "--seeds") -> tuple[int, ...]:
    """``--seeds 0,1,2`` (or ``--folds``) as distinct non-negative integers, in the order given."""
    try:
        seeds = tuple(int(part) for part in text.split(","))
    except ValueError:
        seeds = ()
    if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
        raise MetafleetError(f"{option} must be distinct integers >= 0, comma-separated, got {text!r}")
    return seeds


def personalization_command(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="metafleet bench personalization",
        description="Compare fedavg, its fine-tunings (full, head-only, proximal), local-only training, "
        "reptile, fomaml, maml and per-fedavg on held-out clients, through real federated runs. Writes "
        "results.json, results.md and plots.",
    )
    parser.add_argument("--dataset", choices=list(BUILTIN_TASKS), help="a built-in task (the same as --task NAME)")
    parser.add_argument("--task", help="the task: a built-in's name, FILE.py or package.module[:attr]")
    parser.add_argument("--data", metavar="FLEET_DIR", help="a folder fleet for the task (FLEET_DIR/<device>/data.npz)")
    parser.add_argument("--folds", help="comma-separated folds to hold out in turn (default: the plan's)")
    parser.add_argument("--quick", action="store_true", help="one setting, one fold, one seed, few rounds")
    parser.add_argument("--out", type=Path, required=True, help="benchmark directory (reruns continue in it)")
    parser.add_argument("--algorithms", default=",".join(ALGORITHMS),
                        help=f"comma-separated (fedavg is required; default {','.join(ALGORITHMS)}; also "
                        f"{', '.join(OPTIONAL_ALGORITHMS)})")
    parser.add_argument("--settings", help="comma-separated indexes of the plan's settings to run (default: all)")
    parser.add_argument("--rounds", type=int, help="training rounds of every run (default: the plan's)")
    parser.add_argument("--seeds", help="comma-separated seeds (default: the plan's); rerun a finished benchmark's "
                        "--out with more seeds and only the new seeds' runs execute")
    parser.add_argument("--eval-every", type=int,
                        help="rounds between held-out evaluations (default: the plan's, or a tenth of --rounds)")
    parser.add_argument("--backend", choices=BACKENDS, default="ray",
                        help="ray: Flower's Simulation Engine (default); inprocess: the same apps without Ray")
    parser.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process")
    parser.add_argument("--torch-device", metavar="DEVICE", help="where simulated devices compute: cpu or cuda")
    parser.add_argument("--cpus-per-client", type=float, default=1.0)
    parser.add_argument("--defense", help="every run's --defense (see metafleet simulate --help)")
    parser.add_argument("--compress", help="every run's --compress")
    add_attack_arguments(parser)
    args = parser.parse_args(argv)
    if args.jobs < 1:
        raise MetafleetError(f"--jobs must be >= 1, got {args.jobs}")
    if args.rounds is not None and args.rounds < 1:
        raise MetafleetError(f"--rounds must be >= 1, got {args.rounds}")
    algorithms = [a for a in args.algorithms.split(",") if a]
    known = ALGORITHMS + OPTIONAL_ALGORITHMS
    unknown = sorted(set(algorithms) - set(known))
    if unknown or "fedavg" not in algorithms:
        raise MetafleetError(f"--algorithms must list fedavg and only {list(known)}, got {args.algorithms!r}")
    if not (args.task or args.dataset):
        raise MetafleetError("give the task: --task TASK (or --dataset NAME for a built-in)")
    if args.task and args.dataset and load_task(args.task).name != args.dataset:
        raise MetafleetError(f"--dataset {args.dataset} and --task {args.task} name different tasks; give one")
    data = str(Path(args.data).resolve()) if args.data else ""
    plan = plan_for(args.task or args.dataset, args.quick, data)
    if args.folds is not None:
        plan = dataclasses.replace(plan, folds=parse_seeds(args.folds, "--folds"))
    if args.settings:
        try:
            chosen = [plan.settings[int(i)] for i in args.settings.split(",")]
        except (ValueError, IndexError):
            limit = len(plan.settings)
            raise MetafleetError(f"--settings must be indexes in [0, {limit}), got {args.settings!r}") from None
        plan = dataclasses.replace(plan, settings=tuple(chosen))
    if args.seeds is not None:
        plan = dataclasses.replace(plan, seeds=parse_seeds(args.seeds))
    if args.rounds is not None:
        # Ten points on the curve over rounds, whatever the length.
        plan = dataclasses.replace(plan, rounds=args.rounds,
                                   common={**plan.common, "eval_every": max(1, args.rounds // 10)})
    if args.eval_every is not None:
        if args.eval_every < 1:
            raise MetafleetError(f"--eval-every must be >= 1, got {args.eval_every}")
        plan = dataclasses.replace(plan, common={**plan.common, "eval_every": args.eval_every})
    robustness = {key: getattr(args, key) for key in ("attack", "attackers", "defense", "compress")
                  if getattr(args, key) is not None}
    if robustness:
        plan = dataclasses.replace(plan, common={**plan.common, **robustness})
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    execution = Execution(args.backend, args.cpus_per_client, args.torch_device, args.jobs)
    runs = run_all(plan, args.out, algorithms, execution)
    rows, over_rounds = collect(plan, runs, algorithms)
    write_results(plan, args.out, rows, over_rounds, time.monotonic() - started)
    print((args.out / "results.md").read_text())
    return 0


def bench_command(argv: list[str]) -> int:
    """``metafleet bench NAME ...``; benchmarks with their own module are run with ``python -m``."""
    benches = {"personalization": personalization_command}
    if argv[:1] in (["-h"], ["--help"]):
        print(f"usage: metafleet bench {{{','.join(benches)}}} [options]   (--help after the name for its options)")
        return 0
    if not argv or argv[0] not in benches:
        raise MetafleetError(f"usage: metafleet bench {{{','.join(benches)}}} ... (got {argv[:1] or 'nothing'})")
    return benches[argv[0]](argv[1:])
