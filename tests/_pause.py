"""Arm and release the pipeline's pause points (pipelines.common.pause_point) from a test."""

from __future__ import annotations

import time
from pathlib import Path


class Pauses:
    """A folder named by $XAI_PAUSE_DIR in the processes under test: a file there holds the process that
    reaches the point of that name until the test removes it."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def arm(self, name: str) -> None:
        (self.folder / name).touch()

    def release(self, name: str) -> None:
        (self.folder / name).unlink(missing_ok=True)

    def reached(self, name: str) -> int | None:
        try:
            return int((self.folder / f"{name}.reached").read_text())
        except (OSError, ValueError):
            return None

    def wait(self, name: str, alive: object = None, timeout_s: float = 600.0) -> int:
        """The PID of the process paused at ``name``. The deadline only bounds a hang; ``alive()`` (if
        given) returning False ends the wait early: the run under test died or finished first."""
        deadline = time.monotonic() + timeout_s
        while (pid := self.reached(name)) is None:
            assert time.monotonic() < deadline, f"nothing reached the pause point {name} in {timeout_s:.0f} s"
            assert alive is None or alive(), f"the run ended before reaching the pause point {name}"
            time.sleep(0.1)
        return pid

    def clear(self) -> None:
        for p in self.folder.iterdir():
            p.unlink()
