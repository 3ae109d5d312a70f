"""The two simulation benchmarks at a tiny size: they run end to end and their JSON holds what the tables show."""

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


COMMANDS = {
    "overhead": ["--datasets", "sinusoid", "--clients", "4", "--clients-per-round", "2", "--rounds", "3",
                 "--warmup-rounds", "1", "--repeats", "1", "--timeout", "150"],
    # Discovery in batches of 8: three sends that together must ask each of the 20 nodes once.
    "fleet": ["--clients", "20", "--clients-per-round", "5", "--rounds", "3", "--timeout", "150",
              "--discovery-batch", "8", "--backends", "ray-stock"],
}


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    """Both benchmarks at once: each is mostly Ray's start-up and waits, so together they take the time of one."""
    folder = tmp_path_factory.mktemp("bench")
    processes = {
        name: subprocess.Popen([sys.executable, "-m", f"metafleet.simulations.bench_{name}", "--out",
                                str(folder / f"{name}.json"), *args],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for name, args in COMMANDS.items()
    }
    outputs = {name: process.communicate(timeout=300)[0] for name, process in processes.items()}
    return {name: (process.returncode, outputs[name], folder / f"{name}.json") for name, process in processes.items()}


def _result(results: dict, name: str) -> dict:
    returncode, output, file = results[name]
    assert returncode == 0, output
    return json.loads(file.read_text())


def test_overhead_benchmark_times_both_systems_on_equal_work(results):
    result = _result(results, "overhead")
    (row,) = result["results"]
    assert row["dataset"] == "sinusoid" and row["config"]["clients_per_round"] == 2
    runs = {run["system"]: run for run in row["runs"]}
    assert set(runs) == {"metafleet", "flower"} and all(run["ok"] for run in runs.values())
    for run in runs.values():
        assert run["replies_per_round"] == [2, 2, 2]
        assert len(run["round_seconds"]) == 1 and run["round_seconds"][0] > 0  # round 2 of 3
        assert len(run["load_before"]) == 3 and len(run["load_after"]) == 3
        # Equal work: the same number of train messages reached the same kind of handler.
        assert run["client_messages"]["train"] == 6 and run["median_client_train_ms"] > 0
    # metafleet learns the simulated nodes from the engine and asks one device who it is (the check that the
    # fleet loads), and evaluates its 1 held-out client (round 0 and the last round).
    assert runs["metafleet"]["client_messages"]["query"] == 1 and runs["metafleet"]["client_messages"]["evaluate"] >= 1
    assert set(runs["metafleet"]["median_server_calls_ms"]) == {"aggregate_train", "save_checkpoint", "append_metrics"}
    medians, cpu = row["median_round_s"], row["cpu_per_round_s"]
    assert row["ratio"] == pytest.approx(medians["metafleet"] / medians["flower"])
    assert all(runs[system]["cpu_per_round_s"] >= 0 for system in runs) and set(cpu) == {"metafleet", "flower"}


def test_fleet_benchmark_reports_discovery_rounds_and_the_whole_trees_memory(results):
    result = _result(results, "fleet")
    (row,) = result["results"]
    assert row["ok"] and row["clients"] == 20 and row["summary_rounds_completed"] == 3
    # Flower's engine as shipped: discovery asks every node, in batches of 8.
    assert row["backend"] == "ray-stock"
    assert row["query_batches"] == 3 and row["query_sent"] == 20 and row["query_replies"] == 20
    assert row["query_errors"] == 0
    assert 0 < row["query_send_receive_s"] <= row["discovery_s"]
    assert row["rounds_done"] == 3 and len(row["round_seconds"]) == 1
    assert row["rounds_per_minute"] == pytest.approx(60 / row["median_round_s"])
    assert row["final_evaluation_replies"] == 2 and row["initial_evaluation_s"] > 0  # 2 of 20 clients held out
    assert row["startup_s"] > 0 and len(row["load_before"]) == 3 and len(row["load_after"]) == 3
    # Ray's GCS, raylet and workers are in the tree: more processes, and far more memory than one Python.
    assert row["max_processes"] >= 4
    assert row["peak_pss_mb"] > 500 and row["peak_rss_mb"] >= row["peak_pss_mb"]


# A root process with an app server (64 MiB, touched) that forked a worker sharing those pages, and a stand-in
# for a flwr-clientapp: what bench_client's sampler sees on a device.
_TREE_ROOT = """
import subprocess, sys, time
server = '''
import os, sys, time
block = bytearray(b"x" * (64 << 20))
if os.fork() == 0:
    time.sleep(60)
    os._exit(0)
time.sleep(60)
'''
subprocess.Popen([sys.executable, "-c", server, "--app-server"])
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "flwr-clientapp"])
time.sleep(60)
"""


def test_client_benchmark_sums_a_device_tree_by_kind_and_counts_shared_pages_once_in_pss():
    import time

    from metafleet.simulations.bench_client import device_memory
    from metafleet.simulations.bench_overhead import kill_tree

    root = subprocess.Popen([sys.executable, "-c", _TREE_ROOT])
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            memory = device_memory(root.pid)
            if memory["processes"] == 4 and memory["by_role"].get("app worker", [0])[0] >= 64:
                break
            time.sleep(0.2)
        roles = memory["by_role"]
        assert set(roles) == {"metafleet client", "app server", "app worker", "clientapp"}, roles
        assert all(count == 1 for _, _, count in roles.values())
        server, worker = roles["app server"], roles["app worker"]
        assert server[0] >= 64 and worker[0] >= 64  # RSS counts the shared block in both
        assert (server[0] + worker[0]) - (server[1] + worker[1]) >= 50  # PSS counts it once between them
        assert memory["rss"] == pytest.approx(sum(r[0] for r in roles.values()), abs=0.5)
        assert memory["pss"] < memory["rss"]
    finally:
        kill_tree(root.pid)
        root.wait(timeout=30)
