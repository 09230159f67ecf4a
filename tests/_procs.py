"""Processes of a Ray that a test started itself, found by a marker in their environment (Linux /proc).

Never `ray stop`: that would stop every Ray on the machine, the test session's included."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def processes_with_env(marker: str) -> list[int]:
    """PIDs whose environment holds ``marker`` ("NAME=value"): every process of a Ray started under it."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if marker.encode() in (d / "environ").read_bytes().split(b"\0"):
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


def kill_processes_with_env(marker: str, timeout: float = 30.0) -> None:
    """SIGKILL every process holding ``marker`` until none is left; fails if some outlive ``timeout``."""
    deadline = time.time() + timeout
    while (pids := processes_with_env(marker)) and time.time() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
    assert not processes_with_env(marker), f"processes with {marker} are still alive"
