"""The run directory: config.json, metrics.jsonl, checkpoints/, summary.json and plots.

Checkpoints are written to a temporary file, flushed to disk, then renamed over the final name, so a crash
at any instant leaves the previous checkpoint intact. The two newest are kept.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from metafleet.common.config import RunConfig
from metafleet.common.errors import MetafleetError

log = logging.getLogger("metafleet.server")
KEEP_CHECKPOINTS = 2


def _atomic_write_bytes(path: Path, payload: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(payload)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def atomic_write_json(path: Path, data: Any) -> None:
    _atomic_write_bytes(path, (json.dumps(data, indent=2) + "\n").encode())


class RunDirectory:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.checkpoints = self.path / "checkpoints"
        self.metrics_file = self.path / "metrics.jsonl"
        self._lock: Any = None

    # -- lifecycle -------------------------------------------------------------------------------------
    def claim(self) -> None:
        """Hold the directory's lock for as long as this process lives (or until ``release``): a second
        run or resume of it would interleave its rows and checkpoints with this one's."""
        import fcntl

        self.path.mkdir(parents=True, exist_ok=True)
        handle = open(self.path / ".lock", "a")  # noqa: SIM115 - held open on purpose: the lock lives with it
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise MetafleetError(f"{self.path} is in use by another metafleet process; wait for it or stop it "
                                 "first") from None
        self._lock = handle

    def release(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def create(self, config: RunConfig) -> None:
        if self.latest_checkpoint() is not None:
            raise MetafleetError(f"{self.path} already holds a run; resume it with --resume {self.path}")
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.path / "config.json", config.to_dict())
        self.metrics_file.write_text("")

    def load_config(self) -> RunConfig:
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise MetafleetError(f"{self.path} is not a run directory (no config.json)")
        return RunConfig.from_dict(json.loads(config_file.read_text()))

    # -- metrics ---------------------------------------------------------------------------------------
    def append_metrics(self, row: dict[str, Any]) -> None:
        with open(self.metrics_file, "a") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_file.is_file():
            return []
        rows = []
        for line in self.metrics_file.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("ignoring a torn line at the end of %s", self.metrics_file)
        return rows

    def truncate_metrics_after(self, last_round: int) -> None:
        """On resume, forget rows of rounds that the checkpoint does not contain (they will be redone)."""
        kept = [row for row in self.read_metrics() if row.get("round", 0) <= last_round]
        _atomic_write_bytes(self.metrics_file, "".join(json.dumps(row) + "\n" for row in kept).encode())

    # -- checkpoints -----------------------------------------------------------------------------------
    def save_checkpoint(self, server_round: int, state: dict[str, Any]) -> Path:
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        path = self.checkpoints / f"round-{server_round:06d}.pt"
        temporary = path.with_name(f".{path.name}.tmp")
        with open(temporary, "wb") as handle:
            torch.save({"round": server_round, **state}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        for old in sorted(self.checkpoints.glob("round-*.pt"))[:-KEEP_CHECKPOINTS]:
            old.unlink()
        return path

    def latest_checkpoint(self) -> Path | None:
        found = sorted(self.checkpoints.glob("round-*.pt")) if self.checkpoints.is_dir() else []
        return found[-1] if found else None

    def load_latest_checkpoint(self) -> dict[str, Any]:
        """The newest checkpoint that loads; an unreadable one is reported and the previous one used."""
        candidates = sorted(self.checkpoints.glob("round-*.pt"), reverse=True) if self.checkpoints.is_dir() else []
        for path in candidates:
            try:
                return torch.load(path, weights_only=True)
            except Exception as error:  # a damaged file must not hide the older good one
                log.warning("checkpoint %s is unreadable (%s); trying the previous one", path, error)
        raise MetafleetError(f"{self.path} holds no readable checkpoint to resume from")


def start_or_resume(
    resume: Path | None, out: Path | None, new_config: Callable[[], RunConfig]
) -> tuple[RunConfig, Path]:
    """(config, run directory) for a command that starts a run or resumes one: a resumed run keeps its own
    config; a new one refuses a directory that already holds a run."""
    if resume:
        run_dir = RunDirectory(resume)
        config = run_dir.load_config()
        if run_dir.latest_checkpoint() is None:
            raise MetafleetError(f"{resume} has no checkpoint yet; start it again without --resume")
        return config, Path(resume)
    config = new_config()
    out = Path(out) if out else Path("runs") / f"{config.dataset}-{config.algorithm}-{datetime.now():%Y%m%d-%H%M%S}"
    if RunDirectory(out).latest_checkpoint() is not None:
        raise MetafleetError(f"{out} already holds a run; resume it with --resume {out} or pick another --out")
    return config, out
