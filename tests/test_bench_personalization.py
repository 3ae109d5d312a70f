"""The personalization benchmark on a tiny plan: real federated runs, pooled folds, resumable."""

import json

import pytest

from metafleet.common.errors import MetafleetError
from metafleet.simulations.bench_personalization import (
    Execution,
    Plan,
    Setting,
    bench_command,
    collect,
    paired_difference,
    parse_seeds,
    run_all,
    write_results,
)

pytestmark = pytest.mark.slow


def test_tiny_benchmark_in_parallel_pools_folds_per_client_and_does_not_redo_finished_runs(tmp_path):
    plan = Plan("sinusoid", (Setting("4-shot", {"shots": 4}),), rounds=2, folds=(0, 1), seeds=(0, 1),
                common={"clients": 6, "held_out_clients": 2, "clients_per_round": 2, "eval_every": 2})
    # Two runs at once, each in its own process, without Ray (the Ray path: tests/test_simulation.py).
    runs = run_all(plan, tmp_path, ["fedavg", "reptile"], Execution(backend="inprocess", jobs=2))
    assert len(runs) == 8 and all((run / "summary.json").is_file() for run in runs.values())
    rows, over_rounds = collect(plan, runs, ["fedavg", "reptile"])
    write_results(plan, tmp_path, rows, over_rounds, elapsed=1.0)

    methods = {row["algorithm"] for row in rows}
    assert methods == {"fedavg", "fedavg+ft", "fedavg+ft+guard", "fedavg+head-ft", "fedavg+head-ft+guard",
                       "fedavg+prox-ft", "fedavg+prox-ft+guard", "local-only", "reptile", "reptile+guard"}
    # Two folds of two held-out clients, pooled; each seed draws new sinusoids, so 8 devices, not 4 twice.
    assert all(row["clients"] == 8 for row in rows)
    assert {row["steps"] for row in rows if row["algorithm"] == "fedavg"} == {0}
    local_only = {row["steps"]: row["mean"] for row in rows if row["algorithm"] == "local-only"}
    reptile = {row["steps"]: row["mean"] for row in rows if row["algorithm"] == "reptile"}
    assert local_only[0] != reptile[0]  # round 0 (untrained) is not the trained model
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows))
    assert "| reptile |" in (tmp_path / "results.md").read_text()
    last_step = max(row["steps"] for row in rows)
    assert all(len(row["per_client"]) == 8 and any(c.endswith("/seed1") for c in row["per_client"]) for row in rows)
    markdown = (tmp_path / "results.md").read_text()
    assert f"Paired with each baseline after {last_step} steps" in markdown
    assert "| method | − fedavg+ft | − fedavg+head-ft | − fedavg+prox-ft |" in markdown
    # Every method against each baseline; a baseline's own cell is empty.
    paired = markdown.split("Paired with each baseline")[1].splitlines()
    assert next(line for line in paired if line.startswith("| reptile |")).count(" of 8)") == 3
    assert next(line for line in paired if line.startswith("| fedavg+head-ft |")).count(" of 8)") == 2
    # The three fine-tunings of the one FedAvg model start from it (0 steps) and then differ.
    at = {(r["algorithm"], r["steps"]): r["per_client"] for r in rows}
    assert at[("fedavg+head-ft", 0)] == at[("fedavg+prox-ft", 0)] == at[("fedavg+ft", 0)]
    assert at[("fedavg+head-ft", last_step)] != at[("fedavg+ft", last_step)]
    assert at[("fedavg+prox-ft", last_step)] != at[("fedavg+ft", last_step)]
    assert (tmp_path / "personalization-0.png").stat().st_size > 0

    stamps = {name: (run / "summary.json").stat().st_mtime_ns for name, run in runs.items()}
    run_all(plan, tmp_path, ["fedavg", "reptile"], Execution())
    assert stamps == {name: (run / "summary.json").stat().st_mtime_ns for name, run in runs.items()}

    # The same directory under a plan that would now train differently: refused, naming the change, and
    # the finished runs are kept.
    changed = Plan(plan.dataset, (Setting("4-shot", {"shots": 4, "train_shots": 8}),), rounds=2, folds=(0, 1),
                   seeds=plan.seeds, common=plan.common)
    with pytest.raises(MetafleetError, match="another config.*train_shots 0 -> 8"):
        run_all(changed, tmp_path, ["fedavg", "reptile"], Execution())
    assert stamps == {name: (run / "summary.json").stat().st_mtime_ns for name, run in runs.items()}

    # FedAvg fine-tuned with a step size of its own (adapt_lr): the trained model adapts with it, while
    # round 0 (the untrained model: local-only) still trains from scratch with the inner lr.
    tuned = Plan(plan.dataset, (Setting("4-shot", {"shots": 4, "adapt_lr": 0.005}),), rounds=2, folds=(0, 1),
                 seeds=(0,), common=plan.common)
    tuned_runs = run_all(tuned, tmp_path / "tuned", ["fedavg"], Execution(backend="inprocess"))
    tuned_rows, _ = collect(tuned, tuned_runs, ["fedavg"])

    def per_client(table, method, step):
        return next(r["per_client"] for r in table if r["algorithm"] == method and r["steps"] == step)

    base = per_client(rows, "local-only", last_step)
    assert per_client(tuned_rows, "local-only", last_step) == {c: base[c] for c in base if c.endswith("/seed0")}
    base = per_client(rows, "fedavg+ft", last_step)
    tuned_ft = per_client(tuned_rows, "fedavg+ft", last_step)
    assert all(tuned_ft[c] != pytest.approx(base[c]) for c in tuned_ft)


def test_bench_command_rejects_unknown_names_and_algorithm_lists(tmp_path):
    with pytest.raises(MetafleetError, match="usage: metafleet bench"):
        bench_command(["speed"])
    with pytest.raises(MetafleetError, match="must list fedavg"):
        bench_command(["personalization", "--dataset", "sinusoid", "--out", str(tmp_path), "--algorithms", "maml"])
    with pytest.raises(MetafleetError, match="--eval-every must be >= 1"):
        bench_command(["personalization", "--dataset", "sinusoid", "--out", str(tmp_path), "--eval-every", "0"])


def test_seeds_are_parsed_in_order_and_bad_lists_are_named(tmp_path):
    assert parse_seeds("0,2,1") == (0, 2, 1)
    for bad in ("", "0,x", "1,1", "-1"):
        with pytest.raises(MetafleetError, match="--seeds must be distinct integers"):
            parse_seeds(bad)
    with pytest.raises(MetafleetError, match="--seeds"):
        bench_command(["personalization", "--dataset", "sinusoid", "--out", str(tmp_path), "--seeds", "0,0"])
    with pytest.raises(MetafleetError, match="--seeds"):  # an empty list is an error, not the plan's default
        bench_command(["personalization", "--dataset", "sinusoid", "--out", str(tmp_path), "--seeds", ""])


def test_paired_difference_uses_only_shared_clients_and_counts_both_directions():
    method = {"algorithm": "reptile", "per_client": {"1": 0.9, "2": 0.7}}
    baseline = {"algorithm": "fedavg+ft", "per_client": {"1": 0.8, "2": 0.8, "3": 0.5}}
    mean, ci, ahead, behind, clients = paired_difference(method, baseline)
    assert mean == pytest.approx(0.0) and (ahead, behind, clients) == (1, 1, 2)
    assert ci == pytest.approx(12.706 * 0.1)  # t(1) × the differences' standard error, sd 0.1414 / sqrt(2)
    with pytest.raises(MetafleetError, match="share no clients"):
        paired_difference(method, {"algorithm": "fedavg+ft", "per_client": {"3": 0.5}})
    # Where lower is better (MSE), a lower value is the method being ahead.
    mse = {"algorithm": "maml", "higher_is_better": False, "per_client": {"1": 0.5, "2": 0.6, "3": 0.9}}
    flat = {"algorithm": "fedavg+ft", "per_client": {"1": 0.8, "2": 0.8, "3": 0.8}}
    assert paired_difference(mse, flat)[2:] == (2, 1, 3)
