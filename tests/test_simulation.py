"""Real runs on Flower's Simulation Engine (Ray): bad replies, a crash, and resuming."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from flwr.clientapp import ClientApp

from metafleet.client import app as client_module
from metafleet.common.config import RunConfig
from metafleet.common.records import from_array_record, to_array_record
from metafleet.server.app import app as server_app
from metafleet.simulations.engine import run_in_simulation

pytestmark = pytest.mark.slow
CORRUPTED = {1: "nan", 2: "shape"}  # partition id -> what its train replies carry


def corrupting_mod(msg, context, call_next):
    """Turns two devices into faulty ones after the real handler ran: NaN, and a wrong shape."""
    reply = call_next(msg, context)
    fault = CORRUPTED.get(int(context.node_config["partition-id"]))
    if fault is None or msg.metadata.message_type != "train" or reply.has_error():
        return reply
    update = from_array_record(reply.content["arrays"])
    name = next(iter(update))
    update[name] = torch.full_like(update[name], math.nan) if fault == "nan" else torch.zeros(3)
    reply.content["arrays"] = to_array_record(update)
    return reply


def _faulty_fleet_app() -> ClientApp:
    app = ClientApp(mods=[corrupting_mod])
    app.query()(client_module.query)
    app.train()(client_module.train)
    app.evaluate()(client_module.evaluate)
    return app


def test_simulated_fleet_completes_with_bad_replies_logged_and_excluded(tmp_path):
    config = RunConfig.resolve(dataset="sinusoid", algorithm="reptile", clients=8, held_out_clients=2,
                               clients_per_round=6, rounds=3, eval_every=3, fold=1)
    run_config = {**config.to_run_config(), "out-dir": str(tmp_path / "run")}
    run_in_simulation(server_app, _faulty_fleet_app(), run_config, num_supernodes=config.clients, total_cpus=2)

    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds_completed"] == 3 and summary["rounds_skipped"] == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [row for row in rows if row["phase"] == "train"]
    # Partitions 1 and 2 are training clients in fold 1 (4 and 6 held out) and 6 of 6 are sampled: both are
    # dropped each round.
    assert all(row["sampled"] == 6 and row["accepted"] == 4 for row in train_rows)
    assert summary["rejected_replies"] == 6
    state = torch.load(sorted((run / "checkpoints").glob("*.pt"))[-1], weights_only=True)
    reasons = [r["reason"] for r in state["rejections"]]
    assert sum("NaN" in r for r in reasons) == 3 and sum("shape" in r for r in reasons) == 3
    assert all(math.isfinite(v) for v in summary["personalization"]["mean"])
    assert summary["personalization"]["clients_reporting"] == 2
    assert [row["round"] for row in rows if row["phase"] == "evaluate"] == [0, 3]  # 0: the untrained model
    assert all(math.isfinite(v) for v in summary["personalization"]["guarded_mean"])
    assert (run / "training.png").stat().st_size > 0 and (run / "personalization.png").stat().st_size > 0


def _metafleet(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "metafleet.common.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def test_sigkill_mid_run_then_resume_finishes_every_round(tmp_path):
    run = tmp_path / "run"
    args = ["simulate", "--dataset", "sinusoid", "--algorithm", "fomaml", "--clients", "10", "--rounds", "40",
            "--clients-per-round", "4", "--eval-every", "20", "--out", str(run)]
    process = _metafleet(*args, start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            checkpoints = list((run / "checkpoints").glob("round-*.pt")) if (run / "checkpoints").is_dir() else []
            if any(int(p.stem.split("-")[1]) >= 3 for p in checkpoints):
                break
            assert process.poll() is None, process.stdout.read()
            time.sleep(0.05)
        else:
            pytest.fail("the run did not reach round 3 in 240 s")
    finally:
        os.killpg(process.pid, signal.SIGKILL)  # the whole command dies at once, Ray's helpers included
        process.wait(timeout=30)
    killed_at = max(int(p.stem.split("-")[1]) for p in (run / "checkpoints").glob("round-*.pt"))
    assert killed_at < 40, "the run finished before it could be killed; the test proves nothing"

    resumed = _metafleet("simulate", "--resume", str(run))
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    assert f"resuming {run} from round {killed_at + 1} of 40" in output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["rounds_completed"] == 40
    train_rounds = [json.loads(line)["round"] for line in (run / "metrics.jsonl").read_text().splitlines()
                    if json.loads(line)["phase"] == "train"]
    assert train_rounds == list(range(1, 41))


def test_simulate_refuses_bad_input_with_exit_code_2(tmp_path):
    for args, message in [
        (["--inner-lr", "-1"], "config field 'inner_lr'"),
        (["--clients-per-round", "500", "--clients", "20"], "config field 'clients_per_round'"),
        (["--resume", str(tmp_path)], "not a run directory"),
        (["--torch-device", "gpu0", "--out", str(tmp_path / "gpu0")], "not a device name torch knows"),
    ]:
        process = _metafleet("simulate", *args)
        output, _ = process.communicate(timeout=60)
        assert process.returncode == 2 and message in output, output
        assert len(output.strip().splitlines()) == 1, output


def test_inprocess_backend_gives_the_ray_backends_results(tmp_path):
    """The in-process backend runs the same ServerApp and ClientApp; only the transport differs."""
    from metafleet.simulations.cli import simulate

    config = RunConfig.resolve(dataset="sinusoid", algorithm="maml", clients=10, held_out_clients=2,
                               clients_per_round=4, rounds=3, eval_every=3, seed=5)
    results = {}
    for backend in ("ray", "inprocess"):
        summary = simulate(config, tmp_path / backend, backend=backend, torch_device="cpu")
        assert "METAFLEET_TORCH_DEVICE" not in os.environ  # a later run in this process must not inherit it
        rows = [json.loads(line) for line in (tmp_path / backend / "metrics.jsonl").read_text().splitlines()]
        final = [row for row in rows if row["phase"] == "evaluate"][-1]
        by_client = dict(zip(final["client-ids"], final["clients-step-5"], strict=True))
        state = torch.load(tmp_path / backend / "checkpoints" / "round-000003.pt", weights_only=True)
        results[backend] = (summary["rounds_completed"], by_client, state)
    (ray_rounds, ray_clients, ray_state), (rounds, clients, state) = results["ray"], results["inprocess"]
    # Ray's workers compute with one thread and this process with several: sums differ in the last bits.
    assert rounds == ray_rounds == 3 and clients.keys() == ray_clients.keys()
    assert clients == pytest.approx(ray_clients, rel=1e-4)
    for name, value in ray_state["params"].items():
        torch.testing.assert_close(state["params"][name], value, rtol=1e-4, atol=1e-6)
