"""deployments.engine.core_process without vLLM: the engine core follows its replica's exit."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from deployments.engine.core_process import supported

pytestmark = pytest.mark.skipif(not supported(), reason="pidfd: Linux only (so is the fork server path)")

FOLLOWER = """
import sys, time
from deployments.engine.core_process import end_with_process
end_with_process(int(sys.argv[1]), grace_s=float(sys.argv[2]))
{after}
print("watching", flush=True)
time.sleep(60)
"""


def start_follower(pid: int, grace_s: float = 5.0, after: str = "") -> subprocess.Popen:
    follower = subprocess.Popen([sys.executable, "-c", FOLLOWER.format(after=after), str(pid), str(grace_s)],
                                stdout=subprocess.PIPE, text=True)
    assert follower.stdout.readline().strip() == "watching"
    return follower


def test_follower_gets_sigterm_when_the_watched_process_exits():
    replica = subprocess.Popen(["sleep", "60"])
    follower = start_follower(replica.pid)
    time.sleep(0.3)
    assert follower.poll() is None  # watching does not end it
    replica.kill()
    replica.wait()
    assert follower.wait(timeout=5) == -signal.SIGTERM


def test_follower_that_ignores_sigterm_is_killed_after_the_grace_period():
    replica = subprocess.Popen(["sleep", "60"])
    follower = start_follower(replica.pid, grace_s=0.5,
                              after="import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)")
    replica.kill()
    replica.wait()
    assert follower.wait(timeout=5) == -signal.SIGKILL


def test_follower_of_a_process_already_gone_exits_at_once():
    replica = subprocess.Popen(["true"])
    replica.wait()
    follower = subprocess.Popen([sys.executable, "-c", FOLLOWER.format(after=""), str(replica.pid), "5"],
                                stdout=subprocess.PIPE, text=True)
    assert follower.wait(timeout=10) == 1
