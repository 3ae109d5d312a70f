"""Two runs on the same held-out devices, compared device by device (``metafleet simulate --against``).

A paired difference is the honest comparison here: held-out devices differ far more from one another than
two methods differ on one device, so two means with overlapping CIs can still hide a method that is better
on almost every device. The CI is over devices (Student t), from each device's final-round value.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from metafleet.common.config import RunConfig
from metafleet.common.data import mean_and_ci95
from metafleet.common.errors import MetafleetError
from metafleet.server.rundir import atomic_write_json


def _final_evaluation(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evaluations = [row for row in rows if row["phase"] == "evaluate"]
    if not evaluations:
        raise MetafleetError(f"{run_dir} has no evaluation of its held-out devices to compare")
    return summary, evaluations[-1]


def _label(summary: dict[str, Any]) -> str:
    # FedAvg's model is measured after the same fine-tuning steps on each device as the meta methods'.
    return "fedavg+ft" if summary["algorithm"] == "fedavg" else summary["algorithm"]


def compare_runs(method_dir: Path, baseline_dir: Path, out_file: Path | None = None) -> dict[str, Any]:
    """Per adaptation step: both methods' means and the paired difference (method − baseline) over the
    devices both runs evaluated, with its 95% CI and how many devices each side wins."""
    (method, method_eval), (baseline, baseline_eval) = _final_evaluation(method_dir), _final_evaluation(baseline_dir)
    metric = method["personalization"]["metric"]
    if baseline["personalization"]["metric"] != metric:
        raise MetafleetError(f"{method_dir} measures {metric} and {baseline_dir} "
                             f"{baseline['personalization']['metric']}: not comparable")
    steps = [s for s in method["personalization"]["steps"] if s in baseline["personalization"]["steps"]]
    method_clients = {int(c): i for i, c in enumerate(method_eval["client-ids"])}
    baseline_clients = {int(c): i for i, c in enumerate(baseline_eval["client-ids"])}
    shared = sorted(method_clients.keys() & baseline_clients.keys())
    if len(shared) < 2:
        raise MetafleetError(f"the two runs share {len(shared)} held-out devices; a paired comparison needs 2 or more "
                             "(same fleet, seed and fold?)")
    config = RunConfig.from_dict(json.loads((method_dir / "config.json").read_text()))
    lower_is_better = not config.task_definition.objective.higher_is_better
    rows = []
    for step in steps:
        ours = [float(method_eval[f"clients-step-{step}"][method_clients[c]]) for c in shared]
        theirs = [float(baseline_eval[f"clients-step-{step}"][baseline_clients[c]]) for c in shared]
        differences = [a - b for a, b in zip(ours, theirs, strict=True)]
        difference, ci = mean_and_ci95(differences)
        wins = sum((d < 0) if lower_is_better else (d > 0) for d in differences)
        losses = sum((d > 0) if lower_is_better else (d < 0) for d in differences)
        rows.append({"steps": step, "method": mean_and_ci95(ours)[0], "method_ci95": mean_and_ci95(ours)[1],
                     "baseline": mean_and_ci95(theirs)[0], "baseline_ci95": mean_and_ci95(theirs)[1],
                     "difference": difference, "difference_ci95": ci, "method_better_on": wins,
                     "baseline_better_on": losses})
    result = {"metric": metric, "lower_is_better": lower_is_better, "method": _label(method),
              "baseline": _label(baseline), "devices": len(shared), "round": method_eval["round"],
              "method_run": str(method_dir), "baseline_run": str(baseline_dir), "rows": rows}
    if out_file is not None:
        atomic_write_json(out_file, result)
    return result


def print_comparison(result: dict[str, Any]) -> None:
    method, baseline, metric = result["method"], result["baseline"], result["metric"]
    print(f"\n{method} against {baseline} on the same {result['devices']} held-out devices ({metric}, "
          f"{'lower' if result['lower_is_better'] else 'higher'} is better; mean ± 95% CI over devices):")
    header = f"{'steps':>5}  {method:>16}  {baseline:>16}  {method + ' − ' + baseline:>26}  {'devices better':>14}"
    print(header)
    for row in result["rows"]:
        difference = f"{row['difference']:+.3f} ± {row['difference_ci95']:.3f}"
        print(f"{row['steps']:>5}  {row['method']:>8.3f} ± {row['method_ci95']:<5.3f}  "
              f"{row['baseline']:>8.3f} ± {row['baseline_ci95']:<5.3f}  {difference:>26}  "
              f"{row['method_better_on']:>5} of {result['devices']}")
    verdicts = []
    for row in result["rows"][1:] or result["rows"]:
        low, high = row["difference"] - row["difference_ci95"], row["difference"] + row["difference_ci95"]
        better = (high < 0) if result["lower_is_better"] else (low > 0)
        worse = (low > 0) if result["lower_is_better"] else (high < 0)
        verdict = f"{method} ahead" if better else f"{baseline} ahead" if worse else "no difference the CI can tell"
        verdicts.append(f"after {row['steps']} steps {verdict} (paired CI [{low:+.3f}, {high:+.3f}])")
    print("\n".join(verdicts))
