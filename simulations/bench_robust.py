"""Benchmark: personalization under poisoned devices against each defence, and bytes up under compression.

    python -m metafleet.simulations.bench_robust --dataset fashion-mnist --out bench-out/robust \\
        [--attacks sign-flip,scale] [--fractions 0.2] [--defenses none,median,trimmed-mean,krum,multi-krum,norm-bound]
        [--more-attacks label-flip,noise,backdoor --more-fractions 0.2 --more-defenses none,median,multi-krum]
        [--compress q8,topk:0.1,layers:0.5,q8+layers:0.5] [--seeds 0] [--rounds R] [--algorithm reptile]
        [--folds 0] [--jobs 2] [--set FIELD=VALUE]

Every run is ``metafleet simulate`` on the in-process backend with the data set's defaults: a clean run,
each defence without attack (what it costs by itself), each attack at each fraction of attacking training
devices against each defence, and each compression setting without attack. Reported per case, after the
last round: the held-out devices' personalization metric after each number of adaptation steps (mean and
95 % CI over the held-out devices of all seeds, pooled: a data set whose seed deals its devices gives
other devices per seed), the backdoor's success rate where the attack is one, and bytes up per round.
Finished runs are kept and reused when the benchmark is run again with the same ``--out``. Prints a table
and writes ``robust.json`` and ``results.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

from metafleet.common.config import RunConfig
from metafleet.common.data import mean_and_ci95
from metafleet.common.fleets import split_clients
from metafleet.common.selective import SELECTIVE_DEFAULT
from metafleet.simulations.attacks import attackers


def _run(config: RunConfig, run_dir: Path) -> None:
    import torch

    from metafleet.simulations.cli import simulate

    torch.set_num_threads(1)
    simulate(config, run_dir, backend="inprocess")


def plan(args: argparse.Namespace) -> list[tuple[str, dict]]:
    """(name, config overrides) of every run, per seed."""
    cases: list[tuple[str, dict]] = [("clean", {})]
    defenses = list(filter(None, args.defenses.split(",")))
    # What each defence costs without an attack (robust rules discard honest information too).
    cases += [(f"clean/{defense}", dict(defense=defense)) for defense in defenses if defense != "none"]
    grids = [(args.attacks, args.fractions, defenses),
             (args.more_attacks, args.more_fractions, list(filter(None, args.more_defenses.split(","))))]
    for attacks, fractions, chosen in grids:
        for attack in filter(None, attacks.split(",")):
            for fraction in [float(f) for f in fractions.split(",") if f]:
                for defense in chosen:
                    cases.append((f"{attack}@{fraction:g}/{defense}",
                                  dict(attack=attack, attackers=fraction, defense=defense)))
    for compress in filter(None, args.compress.split(",")):
        cases.append((f"compress {compress}", _upload_overrides(compress)))
    return cases


def _upload_overrides(text: str) -> dict:
    """``q8``, ``topk:F``, ``layers[:SHARE]`` (--selective-layers) or two joined by ``+``, as ``q8+layers:0.5``."""
    overrides: dict = {}
    for part in text.split("+"):
        kind, _, argument = part.partition(":")
        if kind == "layers":
            overrides["selective_layers"] = float(argument) if argument else SELECTIVE_DEFAULT
        else:
            overrides["compress"] = part
    return overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--algorithm", default="reptile")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--attacks", default="sign-flip,scale")
    parser.add_argument("--fractions", default="0.2")
    parser.add_argument("--defenses", default="none,median,trimmed-mean,krum,multi-krum,norm-bound")
    parser.add_argument("--more-attacks", default="", help="a second grid: these attacks ...")
    parser.add_argument("--more-fractions", default="0.2", help="... at these fractions ...")
    parser.add_argument("--more-defenses", default="none,median,multi-krum,norm-bound", help="... against these")
    parser.add_argument("--compress", default="q8,topk:0.1",
                        help="uplink settings, each run without attack: q8, topk:F, layers[:SHARE] "
                        "(--selective-layers) or two joined by +, as q8+layers:0.5")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--folds", default="0",
                        help="held-out folds run per seed, pooled (watch holds out 2 of 10 devices a fold)")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="a config field for every run, as outer_optimizer=sgd (repeatable)")
    args = parser.parse_args(argv)
    fields = {f.name: f.type for f in dataclasses.fields(RunConfig)}
    common = {}
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in fields or not value:
            parser.error(f"--set wants FIELD=VALUE with a RunConfig field, got {item!r}")
        common[name] = {"int": int, "float": float}.get(str(fields[name]), str)(value)
    seeds = [int(s) for s in args.seeds.split(",")]
    folds = [int(f) for f in args.folds.split(",")]
    cases = plan(args)
    runs = []
    for name, overrides in cases:
        for seed in seeds:
            for fold in folds:
                config = RunConfig.resolve(dataset=args.dataset, algorithm=args.algorithm, seed=seed, fold=fold,
                                           **({"rounds": args.rounds} if args.rounds else {}), **common, **overrides)
                slug = name.replace("/", "-").replace("@", "-").replace(" ", "-").replace(":", "").replace("+", "-")
                suffix = f"-fold{fold}" if fold else ""
                runs.append((name, seed, config, args.out / "runs" / f"{slug}-seed{seed}{suffix}"))
    pending = [(config, run_dir) for _, _, config, run_dir in runs if not (run_dir / "summary.json").is_file()]
    print(f"bench_robust: {len(runs)} runs, {len(pending)} to do, {args.jobs} at a time", file=sys.stderr)
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_run, config, run_dir): run_dir for config, run_dir in pending}
        for done, future in enumerate(as_completed(futures), start=1):
            future.result()
            print(f"bench_robust: {done}/{len(pending)} done ({futures[future].name})", file=sys.stderr, flush=True)
    table = []
    for name, _ in cases:
        chosen = [(config, run_dir) for case, _, config, run_dir in runs if case == name]
        steps = chosen[0][0].eval_steps
        pooled = {step: [] for step in steps}
        backdoor = {step: [] for step in steps}
        bytes_up = []
        for _, run_dir in chosen:
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
            final = [row for row in rows if row["phase"] == "evaluate"][-1]
            for step in steps:
                pooled[step] += final[f"clients-step-{step}"]
                backdoor[step] += final.get(f"clients-backdoor-step-{step}", [])
            summary = json.loads((run_dir / "summary.json").read_text())
            bytes_up.append(summary["bytes_up"] / max(1, summary["rounds_completed"]))
        counts = sorted({(len(attackers(config)), len(split_clients(config)[0])) for config, _ in chosen})
        row = {"case": name, "seeds": seeds, "folds": folds, "devices": len(pooled[steps[0]]),
               "attacking_devices": [f"{count} of {total}" for count, total in counts],
               "bytes_up_per_round": sum(bytes_up) / len(bytes_up),
               "mean": {step: mean_and_ci95(pooled[step])[0] for step in steps},
               "ci95": {step: mean_and_ci95(pooled[step])[1] for step in steps}}
        if backdoor[steps[-1]]:
            row["backdoor_success"] = {step: mean_and_ci95(backdoor[step])[0] for step in steps}
        table.append(row)
    scale = 1 if chosen[0][0].task_definition.regression else 100  # accuracy in points, MSE as it is
    last = steps[-1]
    clean = table[0]
    lines = [f"# {args.dataset}, {args.algorithm}: held-out personalization after {last} steps "
             f"(mean ± 95 % CI over {clean['devices']} held-out devices, seeds {args.seeds}, folds {args.folds})", "",
             f"| case | attackers | after 0 steps | after {last} steps | vs clean | bytes up / round "
             "| backdoor success |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in table:
        success = row.get("backdoor_success", {}).get(last)
        lines.append(f"| {row['case']} | {', '.join(row['attacking_devices'])} | "
                     f"{scale * row['mean'][0]:.1f} ± {scale * row['ci95'][0]:.1f} | "
                     f"{scale * row['mean'][last]:.1f} ± {scale * row['ci95'][last]:.1f} | "
                     f"{scale * (row['mean'][last] - clean['mean'][last]):+.1f} | {row['bytes_up_per_round']:,.0f} | "
                     f"{'' if success is None else f'{100 * success:.1f}'} |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text)
    (args.out / "robust.json").write_text(json.dumps({"dataset": args.dataset, "algorithm": args.algorithm,
                                                      "rows": table}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
