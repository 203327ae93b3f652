"""deployments.engine.process_title, with real processes: a child that sets its first environment variable
again before it titles itself loses the title, unless its parent anchored the environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

# What importing vLLM does (cv2 prepends to LD_LIBRARY_PATH), then what vLLM does (set the title);
# prints the title the kernel shows and the child's first environment variable (as it started).
CHILD = """
import json, os, setproctitle
first = open("/proc/self/environ", "rb").read().split(b"=")[0].decode()
os.environ["LD_LIBRARY_PATH"] = "/prepended:" + os.environ["LD_LIBRARY_PATH"]
setproctitle.setproctitle("VLLM::Test")
print(json.dumps([open("/proc/self/cmdline").read().split(chr(0))[0], first]))
"""

# A replica: its environment as Ray may order it (LD_LIBRARY_PATH first), optionally anchored,
# then a child started the way multiprocessing and vLLM start theirs (inheriting C's environ).
PARENT = """
import json, os, subprocess, sys
before = dict(os.environ)
if sys.argv[1] == "anchor":
    from deployments.engine.process_title import ANCHOR, anchor_environment_first
    anchor_environment_first()
    after = dict(os.environ)
    assert after.pop(ANCHOR) == "1" and after == before, "values changed"
child = subprocess.run([sys.executable, "-c", sys.argv[2]], capture_output=True, text=True, check=True)
print(child.stdout.strip())
"""


def run_replica(mode: str) -> tuple[str, str]:
    environment = {
        "LD_LIBRARY_PATH": "/usr/lib",
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(REPO_ROOT),
        "HOME": os.environ.get("HOME", "/root"),
    }
    result = subprocess.run(
        [sys.executable, "-c", PARENT, mode, CHILD],
        env=environment, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    title, first = json.loads(result.stdout)
    return title, first


def test_without_the_anchor_a_child_that_resets_its_first_variable_loses_its_title():
    # The failure the anchor exists for (setproctitle 1.3 finds argv through environ[0]).
    title, first = run_replica("as-is")
    assert first == "LD_LIBRARY_PATH"
    assert title != "VLLM::Test"


def test_with_the_anchor_the_child_keeps_its_title_and_every_value():
    title, first = run_replica("anchor")
    assert first == "PROCESS_TITLE_ANCHOR"
    assert title == "VLLM::Test"
