"""Finding and stopping the processes a test started, by a unique string in their command line (a port)."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def processes_with(text: str) -> list[int]:
    """Live processes whose command line contains ``text`` (zombies excluded)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if text.encode() in cmdline and not _is_zombie(entry):
            pids.append(int(entry.name))
    return pids


def _is_zombie(proc_entry: Path) -> bool:
    try:
        # the state follows the parenthesised command name, which may itself contain spaces
        return (proc_entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def kill_groups(pids: list[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.killpg(os.getpgid(pid), sig)
        except (ProcessLookupError, PermissionError):
            pass


def left_after(text: str, seconds: float) -> list[int]:
    """SIGKILL takes effect asynchronously: a killed process stays in /proc until it has exited."""
    deadline = time.monotonic() + seconds
    while (pids := processes_with(text)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return pids
