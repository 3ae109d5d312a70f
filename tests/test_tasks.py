"""A user's own task and fleet, from outside the package: loading, checking, simulating, deploying."""

import json
import logging
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from metafleet.common.cli import main
from metafleet.common.config import RunConfig
from metafleet.common.device_data import load_device_data, read_csv
from metafleet.common.errors import MetafleetError
from metafleet.common.fleets import make_fleet, split_clients
from metafleet.common.task import load_task

GESTURES = """
    import torch
    from torch import nn

    name = "gestures"
    objective = "classification"


    class Net(nn.Module):
        # A model metafleet has never seen: conv, LayerNorm over (channels, time), mean over time, a head.
        def __init__(self, width={width}):
            super().__init__()
            self.conv = nn.Conv1d(3, width, 5, padding=2)
            self.norm = nn.LayerNorm([width, 20])
            self.head = nn.Linear(width, 4)

        def forward(self, x):
            return self.head(torch.relu(self.norm(self.conv(x))).mean(-1))


    def make_model():
        return Net()
"""


def write_task(folder: Path, text: str, name: str = "task.py", **values) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(textwrap.dedent(text.format(**values) if values else text))
    return path


def gesture_arrays(device: int, per_class: int = 6) -> dict[str, np.ndarray]:
    """Four gestures as 3-axis, 20-sample windows; each device wears its sensor with its own offset."""
    rng = np.random.default_rng(device)
    offset = rng.normal(0, 1.0, size=(3, 1))

    def pool() -> tuple[np.ndarray, np.ndarray]:
        labels = np.repeat(np.arange(4), per_class)
        t = np.linspace(0, 1, 20)
        waves = np.stack([np.sin(2 * np.pi * (label + 1) * t + np.arange(3)[:, None]) for label in labels])
        return (waves + offset + rng.normal(0, 0.3, waves.shape)).astype(np.float32), labels

    (sx, sy), (qx, qy) = pool(), pool()
    return {"support_x": sx, "support_y": sy, "query_x": qx, "query_y": qy}


def write_fleet(root: Path, devices: dict[str, dict[str, np.ndarray]]) -> Path:
    for name, arrays in devices.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        np.savez(root / name / "data.npz", **arrays)
    return root


def gesture_fleet(root: Path, count: int = 6) -> Path:
    return write_fleet(root, {f"dev-{i:02d}": gesture_arrays(i) for i in range(count)})


@pytest.fixture
def gestures(tmp_path):
    return write_task(tmp_path / "project", GESTURES, width=8), gesture_fleet(tmp_path / "fleet")


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("metafleet ")]
    assert len(lines) == 1, err
    return lines[0]


def test_a_user_task_from_a_file_simulates_in_process_and_its_config_round_trips(gestures, tmp_path, capsys):
    task_file, fleet = gestures
    out = tmp_path / "run"
    code = main(["simulate", "--task", str(task_file), "--data", str(fleet), "--algorithm", "reptile",
                 "--rounds", "3", "--clients-per-round", "3", "--backend", "inprocess", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == "gestures" and summary["clients"] == 6 and summary["rounds_completed"] == 3
    assert summary["personalization"]["metric"] == "accuracy"
    assert summary["personalization"]["clients_reporting"] == 1 and summary["rejected_replies"] == 0
    config = RunConfig.from_dict(json.loads((out / "config.json").read_text()))
    assert config.task == str(task_file.resolve()) and config.data == str(fleet.resolve())
    assert RunConfig.from_dict(config.to_dict()) == config


def test_the_contract_task_of_two_lines_runs_a_regression_fleet(tmp_path, capsys):
    task_file = write_task(tmp_path, """
        from torch import nn
        objective = "regression"
        def make_model():
            return nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1))
    """, name="line_fit.py")
    devices = {}
    for i in range(5):
        rng = np.random.default_rng(i)
        slope = rng.normal(size=(2, 1)).astype(np.float32)
        x = rng.normal(size=(24, 2)).astype(np.float32)
        devices[f"d{i}"] = {"support_x": x[:12], "support_y": x[:12] @ slope, "query_x": x[12:],
                            "query_y": x[12:] @ slope}
    fleet = write_fleet(tmp_path / "fleet", devices)
    out = tmp_path / "run"
    assert main(["simulate", "--task", str(task_file), "--data", str(fleet), "--rounds", "2",
                 "--backend", "inprocess", "--out", str(out)]) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == "line_fit" and summary["personalization"]["metric"] == "mse"
    assert summary["clients"] == 5  # the fleet's own size; --clients was not given


@pytest.mark.parametrize(("body", "message"), [
    ("objective = 'classification'\n", "has no make_model()"),
    ("def make_model():\n    return 3\nobjective = 'classification'\n", "not a torch.nn.Module"),
    ("from torch import nn\ndef make_model():\n    return nn.Linear(3, 4)\n", "has no objective"),
    ("from torch import nn\ndef make_model():\n    return nn.Linear(60, 4)\nobjective = 'ranking'\n",
     "objective must be"),
    ("from torch import nn\ndef make_model():\n    return nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4))\n"
     "objective = 'classification'\n", "BatchNorm1d tracking running statistics.*GroupNorm"),
    ("from torch import nn\ndef make_model():\n    return nn.Linear(7, 4)\nobjective = 'classification'\n",
     "does not accept.*inputs of shape \\(3, 20\\)"),
    ("from torch import nn\ndef make_model():\n"
     "    return nn.Sequential(nn.Flatten(), nn.Linear(60, 1), nn.Flatten(0))\nobjective = 'classification'\n",
     "classifier must output \\(N, classes\\) scores, it outputs \\(2,\\)"),
    ("def make_model(:\n", "syntax error"),
    ("import not_a_module_anywhere\n", "cannot import 'not_a_module_anywhere'"),
])
def test_a_bad_task_exits_2_with_one_line(tmp_path, capsys, body, message):
    import re

    task_file = tmp_path / "bad_task.py"
    task_file.write_text(body)
    fleet = gesture_fleet(tmp_path / "fleet", 4)
    code = main(["simulate", "--task", str(task_file), "--data", str(fleet), "--rounds", "1",
                 "--backend", "inprocess", "--out", str(tmp_path / "run")])
    assert code == 2
    assert re.search(message, _one_line_error(capsys))


def test_a_model_that_updates_a_buffer_in_forward_is_refused(tmp_path, capsys):
    task_file = write_task(tmp_path, """
        import torch
        from torch import nn
        objective = "classification"
        class Counting(nn.Module):
            def __init__(self):
                super().__init__()
                self.head = nn.Linear(60, 4)
                self.register_buffer("calls", torch.zeros(()))
            def forward(self, x):
                self.calls += 1
                return self.head(x.flatten(1))
        def make_model():
            return Counting()
    """, name="counting.py")
    fleet = gesture_fleet(tmp_path / "fleet", 4)
    assert main(["fleet", "check", "--task", str(task_file), "--data", str(fleet)]) == 2
    assert "updates buffer 'calls' in place" in capsys.readouterr().err


def test_fleet_check_summarizes_a_good_fleet_and_names_every_bad_device(gestures, tmp_path, capsys):
    task_file, fleet = gestures
    assert main(["fleet", "check", "--task", str(task_file), "--data", str(fleet)]) == 0
    out = capsys.readouterr().out
    assert "6 devices; task gestures (classification)" in out and "input shape (3, 20); 4 classes" in out
    assert "dev-03" in out and "fleet ok" in out

    bad = gesture_arrays(10)
    nan = {**bad, "support_x": bad["support_x"].copy()}
    nan["support_x"][0, 0, 0] = np.nan
    label = {**bad, "query_y": bad["query_y"] + 3}
    empty = {**bad, "query_x": bad["query_x"][:0], "query_y": bad["query_y"][:0]}
    shared = {**bad, "query_x": bad["support_x"], "query_y": bad["support_y"]}
    shape = {**bad, "support_x": bad["support_x"][:, :2]}
    write_fleet(fleet, {"nan": nan, "label": label, "empty": empty, "shared": shared, "shape": shape})
    (fleet / "corrupt").mkdir()
    (fleet / "corrupt" / "data.npz").write_bytes(b"no zip")
    (fleet / "nothing").mkdir()
    assert main(["fleet", "check", "--task", str(task_file), "--data", str(fleet)]) == 2
    err = capsys.readouterr().err
    for device, problem in [("nan", "support_x holds NaN or Inf"), ("label", "labels outside [0, 4)"),
                            ("empty", "query is empty"), ("shared", "share 24 identical examples"),
                            ("shape", "examples of shape (2, 20), the model takes (3, 20)"),
                            ("corrupt", "is not an .npz archive"), ("nothing", "does not exist")]:
        assert any(f"{device}" in line and problem in line for line in err.splitlines()), (device, err)
    assert "7 problem(s) in 7 of 13 devices" in err and "Traceback" not in err

    # simulate refuses what is not a fleet at all, in one line
    (tmp_path / "empty-fleet").mkdir()
    assert main(["simulate", "--task", str(task_file), "--data", str(tmp_path / "empty-fleet"),
                 "--backend", "inprocess", "--out", str(tmp_path / "run")]) == 2
    assert "holds no device folders" in _one_line_error(capsys)


def test_csv_devices_split_support_and_query_by_group_and_cut_windows_within_groups(tmp_path):
    task = load_task(str(write_task(tmp_path, """
        from torch import nn
        objective = "classification"
        window = (4, 2)
        def make_model():
            return nn.Sequential(nn.Flatten(), nn.Linear(8, 2))
    """, name="windows.py")))
    rows = ["group,label,acc,gyro"]
    for index, (group, label) in enumerate([("rec-a", 0), ("rec-b", 1), ("rec-c", 0), ("rec-d", 1)]):
        rows += [f"{group},{label},{i + 10 * index}.5,{-i}" for i in range(8)]
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "data.csv").write_text("\n".join(rows) + "\n")
    name, data = load_device_data(tmp_path / "dev", task=task)
    (sx, sy), (qx, qy) = data.splits[0].support, data.splits[0].query
    # Each label's first recording is support, its second query; 8 rows give 3 windows of 4 at stride 2.
    assert name == "windows" and sx.shape == (6, 2, 4) and qx.shape == (6, 2, 4)
    assert sorted(sy.tolist()) == [0, 0, 0, 1, 1, 1] and sorted(qy.tolist()) == [0, 0, 0, 1, 1, 1]
    torch.testing.assert_close(sx[0], torch.tensor([[0.5, 1.5, 2.5, 3.5], [0.0, -1.0, -2.0, -3.0]]))

    # An explicit split column is obeyed, and a recording in both halves is refused.
    def with_split(roles: list[str]) -> Path:
        lines = ["group,label,split,acc,gyro"] + [f"r{i // 8},{i // 8},{roles[i // 4]},{i},{i}" for i in range(16)]
        (tmp_path / "split.csv").write_text("\n".join(lines))
        return tmp_path / "split.csv"

    arrays = read_csv(with_split(["query", "query", "support", "support"]), task)
    assert arrays.support_y.tolist() == [1] * 3 and arrays.query_y.tolist() == [0] * 3
    with pytest.raises(MetafleetError, match="group 'r0' is in both support and query"):
        read_csv(with_split(["support", "query", "query", "query"]), task)
    (tmp_path / "one.csv").write_text("group,label,acc,gyro\n" + "\n".join(f"only,0,{i},{i}" for i in range(8)))
    with pytest.raises(MetafleetError, match="no group falls in query"):
        read_csv(tmp_path / "one.csv", task)


def test_named_held_out_devices_replace_the_fold(gestures):
    task_file, fleet = gestures
    config = RunConfig.resolve(task=str(task_file), data=str(fleet), held_out_devices="dev-04,dev-01")
    assert config.held_out_clients == 2 and split_clients(config)[1] == [1, 4]
    with pytest.raises(MetafleetError, match="names devices \\['dev-99'\\]"):
        RunConfig.resolve(task=str(task_file), data=str(fleet), held_out_devices="dev-99")
    with pytest.raises(MetafleetError, match="must be 6, the devices in"):
        RunConfig.resolve(task=str(task_file), data=str(fleet), clients=7)
    fleet_object = make_fleet(config)
    assert fleet_object.device_name(4) == "dev-04" and fleet_object.client(4).augment is None


def test_built_in_tasks_are_loaded_through_the_same_api():
    from metafleet.common.tasks import BUILTIN_TASKS

    for name in BUILTIN_TASKS:
        task = load_task(name)
        assert task.name == name and task.make_fleet is not None and task.benchmark is not None
        config = RunConfig.resolve(task=name)
        assert config.dataset == name and config.task == name
    with pytest.raises(MetafleetError, match="must be one of"):
        RunConfig.resolve(dataset="mnist")


def test_built_in_names_are_not_special_cased_in_server_client_or_simulation_code():
    """The five built-ins are data: only metafleet.common.tasks names them (benchmarks choose one as their
    workload through the same lookup, which is a value, not a branch)."""
    import ast

    root = Path(__file__).resolve().parents[1]
    names = {"sinusoid", "watch", "omniglot", "fashion-mnist", "shakespeare"}
    for path in [*(root / "server").glob("*.py"), *(root / "client").glob("*.py"),
                 *(root / "simulations").glob("*.py")]:
        if path.name.startswith("bench_") and path.name != "bench_personalization.py":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
                      and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and id(node) not in docstrings and node.value in names:
                raise AssertionError(f"{path.name}:{node.lineno} names the built-in {node.value!r}")


def _device_contexts(run_config: dict, devices: list[dict]) -> dict:
    from flwr.app import Context, RecordDict

    from metafleet.simulations.inprocess import RUN_ID

    return {1000 + i: Context(run_id=RUN_ID, node_id=1000 + i, node_config=node, state=RecordDict(),
                              run_config=dict(run_config)) for i, node in enumerate(devices)}


def test_deployed_devices_refuse_another_model_and_keep_the_final_models_that_predict_uses(tmp_path, capsys):
    """The deployed path (devices reading their own folder and their own copy of the task) on in-process
    devices: the real SuperLink version of this is tests/test_deployment.py."""
    from metafleet.client.app import app as client_app
    from metafleet.server.app import run_meta_training
    from metafleet.simulations.inprocess import InProcessGrid

    server_task = write_task(tmp_path / "server", GESTURES, width=8)
    device_task = write_task(tmp_path / "device-copy", GESTURES, width=8)  # the same file, elsewhere
    other_task = write_task(tmp_path / "other", GESTURES, width=12)
    fleet = gesture_fleet(tmp_path / "devices", 4)
    config = RunConfig.resolve(task=str(server_task), algorithm="reptile", clients=4, held_out_clients=1,
                               clients_per_round=2, rounds=2, eval_every=2)
    roles = ["train", "train", "held-out", "train"]
    tasks = [device_task, device_task, device_task, other_task]
    nodes = [{"data-dir": str(fleet / f"dev-{i:02d}"), "client-id": i, "role": roles[i], "task": str(tasks[i])}
             for i in range(4)]
    run_config = {**config.to_run_config(), "out-dir": str(tmp_path / "run"), "deliver-models": True,
                  "node-wait-seconds": 1.0}
    logged = []
    handler = logging.Handler()
    handler.emit = lambda record: logged.append(record.getMessage())
    logging.getLogger("metafleet.server").addHandler(handler)
    try:
        summary = run_meta_training(InProcessGrid(client_app, _device_contexts(config.to_run_config(), nodes)),
                                    run_config)
    finally:
        logging.getLogger("metafleet.server").removeHandler(handler)
    assert summary["rounds_completed"] == 2 and summary["devices_keeping_models"] == 3
    assert any("(client 3) refused: its model (task 'gestures', fingerprint" in line for line in logged), logged
    for index in range(3):
        folder = fleet / f"dev-{index:02d}"
        assert (folder / "meta-model.pt").is_file() and (folder / "personal-model.pt").is_file()
        np.save(tmp_path / "inputs.npy", np.load(folder / "data.npz")["query_x"][:5])
        assert main(["predict", "--model", str(folder), "--input", str(tmp_path / "inputs.npy"),
                     "--out", str(tmp_path / "predictions.npy")]) == 0
        assert set(np.load(tmp_path / "predictions.npy").tolist()) <= {0, 1, 2, 3}
    assert not (fleet / "dev-03" / "meta-model.pt").exists()  # the refused device took no part
    personal = torch.load(fleet / "dev-02" / "personal-model.pt", weights_only=True)
    assert personal["task"] == str(device_task.resolve()) and personal["steps"] == config.eval_steps[-1]
    # Later, on new data: personalize again from the device's own meta-model.
    assert main(["personalize", "--checkpoint", str(fleet / "dev-02" / "meta-model.pt"), "--data",
                 str(fleet / "dev-02"), "--steps", "2", "--out", str(tmp_path / "again.pt")]) == 0
    # A model file and a task that differ: refused by fingerprint, in one line.
    assert main(["predict", "--model", str(fleet / "dev-02"), "--input", str(tmp_path / "inputs.npy"),
                 "--task", str(other_task)]) == 2
    assert "is not the one" in _one_line_error(capsys)


def test_metafleet_new_writes_a_project_whose_fleet_checks_and_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["new", "vibration"]) == 0
    assert {p.name for p in (tmp_path / "vibration").iterdir()} == {"task.py", "fleet", "test_task.py", "README.md"}
    assert main(["new", "vibration"]) == 2 and "already exists" in _one_line_error(capsys)
    assert main(["fleet", "check", "--task", "vibration/task.py", "--data", "vibration/fleet"]) == 0
    assert main(["simulate", "--task", "vibration/task.py", "--data", "vibration/fleet", "--rounds", "2",
                 "--backend", "inprocess", "--out", "run"]) == 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["dataset"] == "vibration"
    assert "metafleet simulate --task vibration/task.py --data vibration/fleet" in (
        tmp_path / "vibration" / "README.md").read_text()


@pytest.mark.slow
def test_a_user_task_runs_on_ray_and_with_secure_aggregation(gestures, tmp_path):
    from metafleet.simulations.cli import simulate

    task_file, fleet = gestures
    config = RunConfig.resolve(task=str(task_file), data=str(fleet), algorithm="fomaml", rounds=2,
                               clients_per_round=3, eval_every=2)
    summary = simulate(config, tmp_path / "ray", backend="ray")
    assert summary["rounds_completed"] == 2 and summary["personalization"]["clients_reporting"] == 1
    secure = simulate(config.replace(secure_aggregation=True, min_replies=2), tmp_path / "secure",
                      backend="inprocess")
    assert secure["secure_aggregation"] and secure["rounds_completed"] == 2 and secure["rounds_skipped"] == 0


def test_device_files_written_before_tasks_existed_still_name_their_built_in(tmp_path):
    x = np.linspace(-1, 1, 10, dtype=np.float32)[:, None]
    (tmp_path / "old").mkdir()
    np.savez(tmp_path / "old" / "data.npz", dataset=np.array("sinusoid"), support_x=x[:5], support_y=np.sin(x[:5]),
             query_x=x[5:], query_y=np.sin(x[5:]))
    name, data = load_device_data(tmp_path / "old")
    assert name == "sinusoid" and len(data.splits[0].query[0]) == 5
    with pytest.raises(MetafleetError, match="is for task 'sinusoid'; this device runs 'watch'"):
        load_device_data(tmp_path / "old", task="watch")


def test_a_task_given_as_a_module_is_found_from_the_working_folder(tmp_path, monkeypatch):
    package = tmp_path / "my_fleet_project"
    write_task(package, GESTURES, width=8)
    (package / "__init__.py").write_text("")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", str(tmp_path))])
    (package / "variants.py").write_text(textwrap.dedent("""
        from torch import nn

        class Wide:
            name = "wide"
            objective = "classification"

            @staticmethod
            def make_model():
                return nn.Sequential(nn.Flatten(), nn.Linear(60, 4))
    """))
    task = load_task("my_fleet_project.task")
    assert task.name == "gestures" and task.spec == "my_fleet_project.task"
    wide = load_task("my_fleet_project.variants:Wide")
    assert wide.name == "wide" and wide.make_model()(torch.zeros(2, 3, 20)).shape == (2, 4)
    with pytest.raises(MetafleetError, match="has no attribute 'Narrow'"):
        load_task("my_fleet_project.variants:Narrow")


def test_a_folder_fleet_run_resumes_from_its_checkpoint_after_a_crash(gestures, tmp_path, capsys):
    task_file, fleet = gestures
    out = tmp_path / "run"
    assert main(["simulate", "--task", str(task_file), "--data", str(fleet), "--rounds", "3",
                 "--clients-per-round", "3", "--backend", "inprocess", "--out", str(out)]) == 0
    # As if the process had died during round 3: its checkpoint, rows and summary never written.
    (out / "checkpoints" / "round-000003.pt").unlink()
    (out / "summary.json").unlink()
    assert main(["simulate", "--resume", str(out), "--backend", "inprocess"]) == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == "gestures" and summary["rounds_completed"] == 3
    rounds = [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rounds.count(3) == 2  # round 3's train and evaluate rows, once each


@pytest.mark.slow
def test_the_personalization_benchmark_runs_a_user_task_on_its_folder_fleet(gestures, tmp_path):
    from metafleet.simulations.bench_personalization import Execution, collect, plan_for, run_all, write_results

    task_file, fleet = gestures
    plan = plan_for(str(task_file), quick=True, data=str(fleet))
    assert plan.data == str(fleet) and plan.folds == (0,) and plan.seeds == (0,)
    runs = run_all(plan, tmp_path, ["fedavg", "reptile"], Execution(backend="inprocess"))
    rows, over_rounds = collect(plan, runs, ["fedavg", "reptile"])
    write_results(plan, tmp_path, rows, over_rounds, elapsed=1.0)
    assert {row["dataset"] for row in rows} == {"gestures"}
    assert {"local-only", "fedavg+ft", "reptile"} <= {row["algorithm"] for row in rows}
    assert "Personalization benchmark: gestures on the fleet in" in (tmp_path / "results.md").read_text()


def test_a_tasks_defaults_fill_the_config_and_its_server_lr_is_the_meta_methods(tmp_path, gestures):
    _, fleet = gestures
    task_file = write_task(tmp_path / "tuned", GESTURES + """
    defaults = {{"inner_lr": 0.2, "inner_steps": 3, "shots": 4, "outer_lr": 0.003, "eval_steps": [0, 2]}}
    """, width=8)
    reptile = RunConfig.resolve(task=str(task_file), data=str(fleet), algorithm="reptile")
    assert (reptile.inner_lr, reptile.inner_steps, reptile.shots, reptile.outer_lr) == (0.2, 3, 4, 0.003)
    assert reptile.eval_steps == (0, 2)
    assert RunConfig.resolve(task=str(task_file), data=str(fleet), algorithm="fedavg").outer_lr == 1.0
    assert RunConfig.resolve(task=str(task_file), data=str(fleet), inner_lr=0.5).inner_lr == 0.5
    with pytest.raises(MetafleetError, match="defaults has unknown fields \\['inner_rate'\\]"):
        load_task(str(write_task(tmp_path / "typo", GESTURES + "\n    defaults = {{'inner_rate': 0.1}}\n", width=8)))


def test_reports_name_a_folder_fleets_devices_and_fleet_check_lists_the_folds(gestures, tmp_path, capsys):
    task_file, fleet = gestures
    out = tmp_path / "run"
    assert main(["simulate", "--task", str(task_file), "--data", str(fleet), "--held-out-devices", "dev-02,dev-05",
                 "--rounds", "1", "--backend", "inprocess", "--out", str(out)]) == 0
    assert "held out: dev-02, dev-05" in capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text())["personalization"]["devices"] == ["dev-02", "dev-05"]
    assert main(["fleet", "check", "--task", str(task_file), "--data", str(fleet), "--held-out-clients", "2"]) == 0
    printed = capsys.readouterr().out
    config = RunConfig.resolve(task=str(task_file), data=str(fleet), held_out_clients=2, fold=1)
    expected = ", ".join(f"dev-{i:02d}" for i in split_clients(config)[1])
    assert f"fold 1: {expected}" in printed and "fold 2:" in printed and "fold 3:" not in printed


def test_a_tasks_held_out_and_per_round_defaults_apply_to_its_folder_fleet(tmp_path, gestures):
    _, fleet = gestures
    task_file = write_task(tmp_path / "planned", GESTURES + """
    defaults = {{"held_out_clients": 3, "clients_per_round": 2}}
    """, width=8)
    config = RunConfig.resolve(task=str(task_file), data=str(fleet))
    assert (config.clients, config.held_out_clients, config.clients_per_round) == (6, 3, 2)
