"""Keeps vLLM's process titles (VLLM::EngineCore, VLLM::Worker) working under Ray.

vLLM titles its processes with setproctitle, which finds the process's argv by walking back from
the first environment string (environ[0]). If that variable was set again before the title is set,
its string is no longer next to argv. The walk then fails, silently, and the process stays
`python`: invisible to operators reading `ps`/`top`, and to our fault tests. Importing vLLM sets
such variables: cv2 prepends to LD_LIBRARY_PATH. Ray starts each worker with its environment in
hash-map order, so which variable comes first changes from replica to replica. One replica in a
few had LD_LIBRARY_PATH first, and then neither its engine core nor that core's worker had a title.

So the engine replica puts a variable that nothing sets again first in its environment. The
processes it starts (the fork server, the engine core, the workers) inherit that order.
"""

from __future__ import annotations

import os

# Set once here and never again, by anyone: its string stays next to argv in every child.
ANCHOR = "PROCESS_TITLE_ANCHOR"


def anchor_environment_first() -> None:
    """Rebuilds this process's environment (the C `environ` that children inherit) with ANCHOR
    first and everything else after it, in its current order and with the same values."""
    current = dict(os.environ)
    # os.unsetenv/os.putenv change the C environment only; os.environ keeps the same values
    # throughout, and gets ANCHOR at the end.
    for name in current:
        os.unsetenv(name)
    os.putenv(ANCHOR, "1")
    for name, value in current.items():
        if name != ANCHOR:
            os.putenv(name, value)
    os.environ[ANCHOR] = "1"
