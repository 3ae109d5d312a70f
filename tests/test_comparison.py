"""``metafleet simulate --against``: two real runs on the same held-out devices, compared device by device."""

import json

import numpy as np
import pytest

from metafleet.common.config import RunConfig
from metafleet.common.errors import MetafleetError
from metafleet.simulations.cli import simulate_command


def _final_evaluation(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [row for row in rows if row["phase"] == "evaluate"][-1]


def test_against_trains_the_baseline_on_the_same_devices_and_pairs_them(tmp_path, capsys):
    out = tmp_path / "maml"
    assert simulate_command(["--dataset", "sinusoid", "--algorithm", "maml", "--clients", "30", "--rounds", "3",
                             "--inner-steps", "1", "--inner-lr", "0.01", "--outer-lr", "0.003", "--shots", "5",
                             "--backend", "vectorized", "--out", str(out), "--against", "fedavg"]) == 0
    comparison = json.loads((out / "comparison.json").read_text())
    ours, theirs = _final_evaluation(out), _final_evaluation(out / "against-fedavg")
    # The devices and data are shared; FedAvg learns with its own defaults, not maml's meta settings.
    baseline = json.loads((out / "against-fedavg" / "config.json").read_text())
    defaults = RunConfig.resolve(dataset="sinusoid", algorithm="fedavg")
    assert baseline["algorithm"] == "fedavg" and baseline["shots"] == 5 and baseline["clients"] == 30
    assert (baseline["outer_lr"], baseline["inner_lr"], baseline["inner_steps"]) == (
        defaults.outer_lr, defaults.inner_lr, defaults.inner_steps)
    assert ours["client-ids"] == theirs["client-ids"] and comparison["devices"] == len(ours["client-ids"]) == 3
    assert comparison["method"] == "maml" and comparison["baseline"] == "fedavg+ft" and comparison["lower_is_better"]
    for row in comparison["rows"]:
        differences = np.subtract(ours[f"clients-step-{row['steps']}"], theirs[f"clients-step-{row['steps']}"])
        assert row["difference"] == pytest.approx(differences.mean())
        assert row["method_better_on"] == int((differences < 0).sum())
    assert "maml against fedavg+ft on the same 3 held-out devices" in capsys.readouterr().out
    # The baseline trained in a process of its own beside the method; its console went to its log.
    assert "run finished" in (out / "against-fedavg" / "log.txt").read_text()


def test_against_itself_or_with_resume_is_refused_in_one_line(tmp_path):
    with pytest.raises(MetafleetError, match="compare maml with itself"):
        simulate_command(["--dataset", "sinusoid", "--algorithm", "maml", "--against", "maml",
                          "--out", str(tmp_path / "x")])
    with pytest.raises(MetafleetError, match="cannot be combined with --resume"):
        simulate_command(["--resume", str(tmp_path), "--against", "fedavg"])
    assert not (tmp_path / "x").exists()


def test_torch_threads_below_one_is_refused_in_one_line(tmp_path):
    with pytest.raises(MetafleetError, match="--torch-threads must be >= 1"):
        simulate_command(["--dataset", "sinusoid", "--torch-threads", "0", "--out", str(tmp_path / "x")])
