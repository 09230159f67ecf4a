"""Processes left over from the local Ray session the driver started are found by their log files and killed."""

import subprocess
import sys

import pytest

from pipelines.full import reap_session_processes

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux-only")


def test_reaps_only_processes_writing_into_the_session_logs(tmp_path):
    session = tmp_path / "session_2026-11-26_07-13-56"
    (session / "logs").mkdir(parents=True)
    with open(session / "logs" / "worker-01000000-4242.out", "w") as out, \
            open(tmp_path / "elsewhere.out", "w") as other:
        leftover = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], stdout=out, stderr=out)
        bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], stdout=other,
                                     stderr=other)
    try:
        killed = reap_session_processes(str(session))
        assert killed == [leftover.pid]
        assert leftover.wait(timeout=10) == -9  # SIGKILL
        assert bystander.poll() is None  # still running: its output goes elsewhere
        assert reap_session_processes(str(session)) == []  # nothing left
    finally:
        for p in (leftover, bystander):
            p.kill()
            p.wait()
