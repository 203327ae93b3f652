"""vLLM's engine-core process, forked from a fork server that imported vLLM beside the replica.

vLLM starts its engine core with `spawn` inside a Ray actor (and on CPU always): a fresh interpreter
that imports vLLM again, after the replica has imported it, one after the other (~6 s each on this
2-core machine; seconds on any machine). A fork server started at the top of the replica's __init__
imports vLLM while the replica does, so the engine core is forked from an interpreter that already
has it. What `spawn` gives the child is kept: the environment at the moment vLLM starts it (vLLM
sets variables for its children just before) and the same pickled process object.

Only the engine core. The workers it starts stay `spawn`: vLLM gives each rank its own OpenMP
binding and LD_PRELOAD (tcmalloc, libgomp), which native libraries read when they load, so a fork of
a preloaded interpreter would silently ignore them.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
import select
import signal
import threading
import time
from multiprocessing.context import BaseContext, ForkServerContext, ForkServerProcess
from typing import Any

REPLICA_EXIT_GRACE_S = 5.0

# What the engine core imports before it runs: its entry point (vllm.v1.engine.core) and what
# unpickling its arguments pulls in; `__main__` too, which the child re-imports (Ray's worker
# script) as a `spawn` child does.
ENGINE_CORE_PRELOAD = ["__main__", "vllm.v1.engine.core", "vllm.v1.executor.multiproc_executor"]


def supported() -> bool:
    """Linux only: the engine core follows its replica's exit through a pidfd."""
    return hasattr(os, "pidfd_open")


def start_forkserver() -> bool:
    """Starts this process's fork server, which imports ENGINE_CORE_PRELOAD in the background.
    Call it before importing vLLM here, so the two imports overlap."""
    if not supported():
        return False
    multiprocessing.forkserver.set_forkserver_preload(ENGINE_CORE_PRELOAD)
    multiprocessing.forkserver.ensure_running()
    return True


class EngineCoreProcess(ForkServerProcess):
    """A fork-server process that behaves as vLLM's `spawn` child did: it runs with its parent's
    environment as of start(), and it ends when the replica that started it ends (Ray ends a dead
    replica's child processes, and the engine core is now a grandchild)."""

    def start(self) -> None:
        self._parent_environment = dict(os.environ)
        self._replica_pid = os.getpid()
        super().start()

    def run(self) -> None:
        end_with_process(self.__dict__.pop("_replica_pid"))
        # setproctitle finds argv through the original environ block: vLLM titles this process
        # (VLLM::EngineCore) only if that lookup happens before the environment is replaced.
        try:
            import setproctitle

            setproctitle.getproctitle()
        except ImportError:
            pass
        environment = self.__dict__.pop("_parent_environment")
        for name in set(os.environ) - set(environment):
            del os.environ[name]
        os.environ.update(environment)
        super().run()


def end_with_process(pid: int, grace_s: float = REPLICA_EXIT_GRACE_S) -> None:
    """SIGTERM this process when process `pid` exits (vLLM's engine core shuts its workers down on
    SIGTERM); SIGKILL if it is still alive `grace_s` later."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        os._exit(1)  # the replica is already gone: nobody would read this engine's output

    def watch() -> None:
        select.select([pidfd], [], [])
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="end-with-replica", daemon=True).start()


class EngineCoreContext(ForkServerContext):
    Process = EngineCoreProcess


def install(vllm_config: Any) -> bool:
    """Makes vLLM start this replica's engine core from the fork server. Returns False (and vLLM
    keeps its own start method) where a fork would not be what vLLM asked for."""
    if not supported():
        return False
    if getattr(vllm_config.parallel_config, "numa_bind", False):
        # NUMA binding swaps the interpreter spawn starts for a numactl wrapper.
        return False
    import vllm.v1.engine.utils as engine_utils

    vllm_get_mp_context = getattr(engine_utils, "get_mp_context", None)
    if vllm_get_mp_context is None or getattr(vllm_get_mp_context, "_engine_core_context", False):
        return vllm_get_mp_context is not None

    def get_mp_context() -> BaseContext:
        # vLLM's own choice first (it also sets what its children need, e.g. RAY_ADDRESS).
        context = vllm_get_mp_context()
        return EngineCoreContext() if context.get_start_method() == "spawn" else context

    get_mp_context._engine_core_context = True  # type: ignore[attr-defined]
    engine_utils.get_mp_context = get_mp_context
    return True
