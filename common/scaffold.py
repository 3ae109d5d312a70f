"""``metafleet new NAME``: a project of one's own, ready to run: ``./NAME/`` with a task, a tiny fleet, a test
and a README.

    metafleet new vibration
    metafleet simulate --task vibration/task.py --data vibration/fleet --backend inprocess

The example fleet is generated: 30 machines whose vibration spectra (16 features) show one of three states
(normal, imbalance, bearing wear), each machine with its own baseline and gain, so that a model adapted to a
machine beats one model for all. Replace ``fleet/`` with your devices' data and ``make_model`` with your
model; nothing in metafleet needs to change.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np

from metafleet.common.errors import MetafleetError

DEVICES, FEATURES, CLASSES, PER_CLASS = 30, 16, 3, 10
NAME_PATTERN = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")

TASK = '''"""{name}: a metafleet task (see metafleet.common.task for everything a task may define).

Each device is a machine with a vibration sensor; an example is one spectrum of {features} band energies, the
label the machine's state: 0 normal, 1 imbalance, 2 bearing wear.
"""

from torch import nn

name = "{name}"
objective = "classification"


def make_model() -> nn.Module:
    # No BatchNorm: metafleet adapts the model functionally on a few examples; LayerNorm or GroupNorm work.
    return nn.Sequential(nn.Linear({features}, 32), nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, {classes}))


# Optional: learning defaults (each a command-line flag too), an input shape and class count (else read off
# the data and the model), augment(x, rng) for training episodes, read_device(folder) for your own files.
defaults = {{"inner_lr": 0.1, "shots": 10, "query_shots": 10, "inner_steps": 5}}
'''

TEST = '''"""Checks of the {name} task and fleet, through metafleet's command line."""

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def metafleet(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "metafleet.common.cli", *args], capture_output=True, text=True,
                          timeout=600)


def test_the_fleet_fits_the_task():
    result = metafleet("fleet", "check", "--task", str(HERE / "task.py"), "--data", str(HERE / "fleet"))
    assert result.returncode == 0, result.stderr
    assert "fleet ok" in result.stdout


def test_a_short_simulation_trains_and_evaluates(tmp_path):
    result = metafleet("simulate", "--task", str(HERE / "task.py"), "--data", str(HERE / "fleet"),
                       "--algorithm", "reptile", "--rounds", "3", "--backend", "inprocess", "--out",
                       str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["rounds_completed"] == 3 and summary["personalization"]["metric"] == "accuracy"
'''

README = '''# {name}

A metafleet project: `task.py` says what the fleet learns (the model and the objective), `fleet/` holds one
folder per device (`fleet/<device>/data.npz` with `support_x`, `support_y`, `query_x`, `query_y`; support
and query from different recordings). The example fleet is {devices} generated machines; put your own
devices' data in its place.

```bash
# check the fleet against the task: devices, examples and classes per device; every problem on one line
metafleet fleet check --task {name}/task.py --data {name}/fleet

# meta-train the simulated fleet (a tenth of the devices held out) and print the held-out devices'
# accuracy before and after personalization
metafleet simulate --task {name}/task.py --data {name}/fleet --algorithm reptile --rounds 30 --backend inprocess

# compare meta-learning with FedAvg, fine-tuned FedAvg and local training on held-out devices
metafleet bench personalization --task {name}/task.py --data {name}/fleet --quick --backend inprocess \\
    --out {name}/bench

# the project's own tests
python -m pytest {name}
```

On real devices: `metafleet server --task {name}/task.py --clients N ...` on the server, and on each device
`metafleet client --task task.py --data DIR ...` with the device's own folder; when the run ends each device
holds `DIR/meta-model.pt` and `DIR/personal-model.pt`, and `metafleet predict --model DIR --input x.npy`
predicts offline (deploy/README.md in metafleet tells the whole setup).
'''


def new_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metafleet new", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="the project's name: writes ./NAME/")
    return parser


def example_fleet(folder: Path, name: str, seed: int = 0) -> None:
    """The generated vibration fleet: every machine's spectra are the states' shared signatures seen
    through the machine's own gain and baseline."""
    rng = np.random.default_rng(seed)
    signatures = rng.normal(0.0, 1.0, size=(CLASSES, FEATURES))
    labels = np.repeat(np.arange(CLASSES), PER_CLASS)
    for device in range(DEVICES):
        gain, baseline = rng.uniform(0.5, 2.0), rng.normal(0.0, 2.5, size=FEATURES)
        support_x, query_x = (
            (gain * (signatures[labels] + rng.normal(0.0, 1.2, size=(len(labels), FEATURES))) + baseline)
            .astype(np.float32) for _ in range(2))
        support_y = query_y = labels.astype(np.int64)
        device_folder = folder / f"machine-{device:02d}"
        device_folder.mkdir(parents=True)
        np.savez(device_folder / "data.npz", task=np.array(name), support_x=support_x, support_y=support_y,
                 query_x=query_x, query_y=query_y)


def new_command(argv: list[str]) -> int:
    args = new_parser().parse_args(argv)
    if not NAME_PATTERN.match(args.name):
        raise MetafleetError(f"project name {args.name!r} must start with a letter and hold only letters, digits, "
                             "'-' and '_' (it names the folder and the task)")
    root = Path(args.name)
    if root.exists():
        raise MetafleetError(f"{root} already exists; pick another name or remove it")
    values = {"name": args.name, "features": FEATURES, "classes": CLASSES, "devices": DEVICES}
    root.mkdir()
    (root / "task.py").write_text(TASK.format(**values))
    (root / "test_task.py").write_text(TEST.format(**values))
    (root / "README.md").write_text(README.format(**values))
    example_fleet(root / "fleet", args.name)
    print(f"wrote {root}/: task.py, fleet/ ({DEVICES} devices), test_task.py, README.md")
    print(f"next: metafleet simulate --task {root}/task.py --data {root}/fleet --backend inprocess")
    return 0
