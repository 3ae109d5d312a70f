"""The run directory's lock: one process writes a run at a time."""

import subprocess
import sys

import pytest

from metafleet.common.errors import MetafleetError
from metafleet.server.rundir import RunDirectory


def test_a_second_claim_on_a_run_directory_is_refused_until_the_first_is_released(tmp_path):
    first, second = RunDirectory(tmp_path / "run"), RunDirectory(tmp_path / "run")
    first.claim()
    with pytest.raises(MetafleetError, match="in use by another metafleet process"):
        second.claim()
    first.release()
    second.claim()
    second.release()


def test_the_lock_goes_with_a_process_that_dies_holding_it(tmp_path):
    # SIGKILL skips every finally: the kernel drops the lock with the process, so --resume can take over.
    holder = (f"import os, signal; from metafleet.server.rundir import RunDirectory; "
              f"RunDirectory({str(tmp_path / 'run')!r}).claim(); os.kill(os.getpid(), signal.SIGKILL)")
    assert subprocess.run([sys.executable, "-c", holder], timeout=60).returncode == -9
    run = RunDirectory(tmp_path / "run")
    run.claim()
    run.release()
