"""The systems under test, each in its own process (group), as its users would run it; start-up is
measured from launch to the first token of a streaming chat request."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.common import (
    BARE,
    MAX_MODEL_LEN,
    MAX_NUM_SEQS,
    OURS,
    PYTHON,
    RAYLLM,
    RAYLLM_TUNED,
    RAYLLM_TUNED_ENV,
    REPO_ROOT,
    SERVED_MODEL,
    SYSTEMS,
    child_env,
)
from configs.ray_env import SERVE_PERFORMANCE_ENV, STARTUP_GATE_ENV_NAMES, private_haproxy_ports

POLL_INTERVAL_S = 0.5


def vllm_cache_root() -> Path:
    root = os.environ.get("VLLM_CACHE_ROOT")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vllm"


def compile_cache_entries(root: Path) -> set[tuple[str, int]]:
    """(file, mtime) of vLLM's compile cache: a start that writes there compiled (cold)."""
    cache = root / "torch_compile_cache"
    if not cache.exists():
        return set()
    out = set()
    for p in cache.rglob("*"):
        try:
            out.add((str(p.relative_to(cache)), p.stat().st_mtime_ns))
        except OSError:
            pass
    return out


COMPILE_AGAIN = "Compiling model again due to a load failure"


def gpu_visible() -> bool:
    if not shutil.which("nvidia-smi"):
        return False
    return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


def bare_vllm_args(model: str) -> list[str]:
    """Bare vLLM gets the same engine arguments as our app's engine (configs.engine_args), so the
    comparison measures the serving layers, not two engine configurations."""
    from configs.engine_args import vllm_cli_args
    from configs.settings import Accelerator, Settings

    settings = Settings(
        MODEL_NAME=model, OPENAI_SERVED_MODEL_NAME_OVERRIDE=SERVED_MODEL,
        MAX_MODEL_LEN=MAX_MODEL_LEN, MAX_NUM_SEQS=MAX_NUM_SEQS,
    )
    accelerator = Accelerator.GPU if gpu_visible() else Accelerator.CPU
    args = vllm_cli_args(settings, accelerator, model)
    if accelerator is Accelerator.GPU:
        # Our GPU engine runs its workers on Ray inside its placement group; bare vLLM on one
        # GPU runs them in-process (its default).
        i = args.index("--distributed-executor-backend")
        del args[i:i + 2]
    return args


@dataclass
class Server:
    system: str
    port: int
    model: str
    log_dir: Path
    fresh_compile_cache: bool = False
    ray_worker_niceness: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # our app's, beyond the benchmark's own
    proc: subprocess.Popen | None = None
    info: dict[str, Any] = field(default_factory=dict)
    startup: dict[str, Any] = field(default_factory=dict)
    _log: Any = None
    _cache_dir: Path | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def info_file(self) -> Path:
        return self.log_dir / f"{self.system}.info.json"

    def command(self) -> list[str]:
        if self.system == BARE:
            return [PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1",
                    "--port", str(self.port), *bare_vllm_args(self.model)]
        return [PYTHON, "-m", "bench.serve_app", self.system, "--port", str(self.port),
                "--model", self.model, "--info", str(self.info_file), "--settings", json.dumps(self.settings)]

    def start_and_wait(self, timeout_s: float) -> dict[str, Any]:
        """Launch, then poll until a chat request streams its first token. Returns the start-up
        record: seconds to first token, to the first 200 of /v1/models, and the compile cache state."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.info_file.unlink(missing_ok=True)
        extra = {}
        if self.fresh_compile_cache:
            self._cache_dir = self.log_dir / f"vllm-cache-{self.system}"
            shutil.rmtree(self._cache_dir, ignore_errors=True)
            extra["VLLM_CACHE_ROOT"] = str(self._cache_dir)
        if self.ray_worker_niceness is not None and self.system != BARE:
            extra["RAY_worker_niceness"] = str(self.ray_worker_niceness)
        drop: tuple[str, ...] = ()
        if self.system.startswith(OURS):  # ours, ours-serve, and bench.prefix's
            # HAProxy's metrics and stats listeners: ports of this cluster's own (a `make serve`
            # or a test cluster may hold the defaults).
            extra.update(private_haproxy_ports())
        elif self.system == RAYLLM:
            # Ray Serve LLM as its users run it: Ray's defaults, none of our switches.
            drop = (*SERVE_PERFORMANCE_ENV, *STARTUP_GATE_ENV_NAMES)
        elif self.system == RAYLLM_TUNED:
            # Its documented fastest mode, on Ray's own HAProxy (not our start-up gate).
            drop = (*SERVE_PERFORMANCE_ENV, *STARTUP_GATE_ENV_NAMES)
            extra.update({**RAYLLM_TUNED_ENV, **private_haproxy_ports()})
        cache_root = self._cache_dir or vllm_cache_root()
        before = compile_cache_entries(cache_root)
        # Appended: a server restarted for the load keeps its measured start's log above.
        self._log = open(self.log_dir / f"{self.system}.log", "a")
        log_start = self._log.tell()  # this start's part of the log begins here
        command = self.command()
        self._log.write("$ " + " ".join(command) + "\n")
        self._log.flush()
        launched = time.monotonic()
        self.proc = subprocess.Popen(
            command, cwd=REPO_ROOT, env=child_env(extra, drop), stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        models_s = None
        with httpx.Client(timeout=httpx.Timeout(30.0, connect=2.0)) as client:
            while True:
                elapsed = time.monotonic() - launched
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.system} exited with {self.proc.returncode} during start-up "
                                       f"(see {self.log_dir / (self.system + '.log')})")
                if elapsed > timeout_s:
                    raise TimeoutError(f"{self.system} not serving after {timeout_s:.0f} s")
                if models_s is None and _models_ok(client, self.base_url):
                    models_s = time.monotonic() - launched
                if _first_token(client, self.base_url, self.settings.get("OPENAI_SERVED_MODEL_NAME_OVERRIDE",
                                                                         SERVED_MODEL)):
                    first_token_s = time.monotonic() - launched
                    if models_s is None and _models_ok(client, self.base_url):
                        models_s = time.monotonic() - launched  # not before the first token
                    break
                time.sleep(POLL_INTERVAL_S)
        if self.info_file.exists():
            self.info = json.loads(self.info_file.read_text())
        after = compile_cache_entries(cache_root)
        self._log.flush()
        with open(self.log_dir / f"{self.system}.log", "rb") as log:
            log.seek(log_start)
            log_text = log.read().decode(errors="replace")
        self.startup = {
            "first_token_s": round(first_token_s, 1),
            "models_ok_s": round(models_s, 1) if models_s is not None else None,
            "compile_cache": "cold" if after - before else "warm",
            "compile_cache_written": len(after - before),
            # vLLM 0.32's CPU build can fail to load its own cached graph and compile again.
            "compile_cache_load_failed": COMPILE_AGAIN in log_text,
            "compile_cache_root": str(cache_root),
            "fresh_compile_cache": self.fresh_compile_cache,
        }
        return self.startup

    def descendants(self) -> list[int]:
        """PIDs of every process this server started (walks /proc), for a complete clean-up."""
        if self.proc is None:
            return []
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
        out, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            for child in children.get(pid, []):
                out.append(child)
                todo.append(child)
        return out

    def stop(self, grace_s: float = 60.0) -> None:
        if self.proc is None:
            return
        tree = self.descendants()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                pass
        # Whatever is left of this server's own process group and descendants (never anything else).
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        if self._log is not None:
            self._log.close()
            self._log = None
        self.proc = None


def _models_ok(client: httpx.Client, base_url: str) -> bool:
    try:
        return client.get(f"{base_url}/v1/models", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _first_token(client: httpx.Client, base_url: str, model: str = SERVED_MODEL) -> bool:
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 2, "stream": True}
    try:
        with client.stream("POST", f"{base_url}/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                return False
            for line in response.iter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return False
                try:
                    event = json.loads(data)
                except ValueError:
                    continue
                if event.get("choices"):
                    return True
    except httpx.HTTPError:
        return False
    return False


SYSTEM_ORDER = SYSTEMS
