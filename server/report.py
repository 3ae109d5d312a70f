"""summary.json and the PNG plots of a run, built from metrics.jsonl so that a resumed run reports whole."""

from __future__ import annotations

import itertools
import logging
from typing import Any

from metafleet.common.config import RunConfig
from metafleet.server.rundir import RunDirectory, atomic_write_json

log = logging.getLogger("metafleet.server")


def metric_name(config: RunConfig) -> str:
    return config.task_definition.objective.metric_name


def device_names(config: RunConfig, client_ids: list[int]) -> list[str]:
    """A folder fleet's device names for client ids (its devices are its sorted folder names)."""
    from metafleet.common.folder_fleet import fleet_devices

    devices = fleet_devices(config.data)
    return [devices[int(i)] for i in client_ids]


def build_summary(config: RunConfig, rows: list[dict[str, Any]], extra: dict[str, Any]) -> dict[str, Any]:
    evaluations = [row for row in rows if row["phase"] == "evaluate"]
    trained = [row for row in rows if row["phase"] == "train"]
    personalization: dict[str, Any] = {
        "metric": metric_name(config),
        "held_out_clients": config.held_out_clients,
        "steps": list(config.eval_steps),
        "mean": None,
        "ci95": None,
    }
    if evaluations:
        last = evaluations[-1]
        personalization.update(
            round=last["round"],
            clients_reporting=last["clients"],
            **({"devices": device_names(config, last["client-ids"])} if config.data else {}),
            mean=[last[f"mean-step-{s}"] for s in config.eval_steps],
            ci95=[last[f"ci95-step-{s}"] for s in config.eval_steps],
            # The same devices when each keeps the adapted model only if its support set says it helps.
            guarded_mean=[last[f"mean-guarded-step-{s}"] for s in config.eval_steps],
            guarded_ci95=[last[f"ci95-guarded-step-{s}"] for s in config.eval_steps],
        )
    return {
        "dataset": config.dataset,
        "algorithm": config.algorithm,
        "rounds": config.rounds,
        "rounds_completed": len(trained),
        "rounds_skipped": sum(1 for row in trained if row.get("skipped")),
        "clients": config.clients,
        "clients_per_round": config.clients_per_round,
        "secure_aggregation": config.secure_aggregation,
        "seed": config.seed,
        "personalization": personalization,
        **extra,
    }


def write_report(run_dir: RunDirectory, config: RunConfig, extra: dict[str, Any]) -> dict[str, Any]:
    rows = run_dir.read_metrics()
    summary = build_summary(config, rows, extra)
    atomic_write_json(run_dir.path / "summary.json", summary)
    try:
        _plot(run_dir, config, rows, summary)
    except ImportError:
        log.warning("matplotlib is not installed: no plots (pip install 'metafleet[server]')")
    return summary


def _plot(run_dir: RunDirectory, config: RunConfig, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [row for row in rows if row["phase"] == "train" and "loss-after" in row]
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot([r["round"] for r in trained], [r["loss-after"] for r in trained], label="query loss after adaptation")
    axis.plot([r["round"] for r in trained], [r["loss-before"] for r in trained], label="query loss before", alpha=0.6)
    axis.set(xlabel="round", ylabel="loss", title=f"{config.algorithm} on {config.dataset}: training")
    axis.legend()
    figure.tight_layout()
    figure.savefig(run_dir.path / "training.png", dpi=120)
    plt.close(figure)

    personalization = summary["personalization"]
    if personalization["mean"] is None:
        return
    steps, mean, ci = personalization["steps"], personalization["mean"], personalization["ci95"]
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(steps, mean, marker="o", label=config.algorithm)
    lower = [m - c for m, c in zip(mean, ci, strict=True)]
    upper = [m + c for m, c in zip(mean, ci, strict=True)]
    axis.fill_between(steps, lower, upper, alpha=0.25)
    axis.set(
        xlabel="adaptation steps on the device's support set",
        ylabel=personalization["metric"],
        title=f"personalization on {config.held_out_clients} held-out clients (95% CI)",
    )
    axis.legend()
    figure.tight_layout()
    figure.savefig(run_dir.path / "personalization.png", dpi=120)
    plt.close(figure)


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


