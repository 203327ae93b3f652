"""`make bench` / `python -m bench`: bare vLLM vs our Serve app vs Ray Serve LLM, same tiny model,
same engine settings, one run.

Method (the one that held on a 2-core box, see bench/README.md): start every system (one after
the other, each start-up measured launch -> first streamed token), keep them all up, then
alternate the load between them point by point, so that every ratio comes from two measurements
taken back to back; bare vLLM is measured twice in a row at every point, and that self-ratio is
the noise floor printed beside each ratio. The load client runs under `chrt -f 5` when it can.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import select
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.common import (
    BARE,
    INPUT_LEN,
    LABELS,
    MAX_MODEL_LEN,
    MAX_NUM_SEQS,
    NATIVE,
    NONSTREAM,
    OURS,
    OUTPUT_LEN,
    PYTHON,
    RAYLLM_SYSTEMS,
    REPO_ROOT,
    STREAM,
    SYSTEMS,
    adopt_child_env,
    child_env,
    default_cache_root,
    machine_info,
    package_versions,
    pick_port,
)
from bench.report import summarize, write_reports
from bench.servers import Server

DEFAULT_OUT = REPO_ROOT / "bench" / "results"
STARTUP_TIMEOUT_S = 900
RUN_TIMEOUT_S = 1200
# Modules Ray Serve LLM needs beyond ray[serve] (its `llm` extra, minus vLLM and nixl).
RAYLLM_IMPORTS = ("ray.serve.llm", "ray.llm._internal.serve.engines.vllm.vllm_engine", "pandas", "pyarrow",
                  "smart_open", "jsonref", "hf_transfer", "opentelemetry.sdk", "mmh3", "typer")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", default=None, help="comma-separated concurrencies (default 1,4,16,64)")
    p.add_argument("--requests", type=int, default=None,
                   help="requests per measurement (default: max(64, 8 x concurrency); quick: max(24, 4 x c))")
    p.add_argument("--repeats", type=int, default=None, help="repeats of every point (default 3; medians)")
    p.add_argument("--modes", default=None, help=f"comma-separated of {STREAM},{NONSTREAM},{NATIVE} (default all)")
    p.add_argument("--systems", default=None, help=f"comma-separated of {','.join(SYSTEMS)} (default all)")
    p.add_argument("--quick", action="store_true", help="concurrency 1,16, 2 repeats, fewer requests")
    p.add_argument("--smoke", action="store_true",
                   help="bare vLLM and our app only, one concurrency (4), 16 requests, 1 repeat")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT,
                   help="output folder (latest.json/.md/.png; raw/: server and client logs)")
    p.add_argument("--cache-root", type=Path, default=None,
                   help="where the tiny model is built (default ~/.cache/ray-vllm-serve/bench)")
    p.add_argument("--port-base", type=int, default=8310, help="first port tried for the servers (loopback)")
    p.add_argument("--fresh-compile-cache", action="store_true",
                   help="give every system an empty vLLM compile cache (cold start-up); default: the shared "
                        "~/.cache/vllm, and the results say whether each start compiled (cold) or not (warm)")
    p.add_argument("--ray-worker-niceness", type=int, default=None,
                   help="RAY_worker_niceness for the Ray-based systems (default: Ray's own, 15, as users run "
                        "it; bare vLLM runs at nice 0)")
    p.add_argument("--settle", type=float, default=None,
                   help="seconds of quiet before every measurement (default 2; smoke 1): an engine busy-spins "
                        "up to ~1 s after its last request, which would land on the next system's run")
    p.add_argument("--no-chrt", action="store_true", help="run the load client at normal priority")
    p.add_argument("--startup-repeats", type=int, default=None,
                   help="rounds of start-ups, each system once per round, the order reversed every other "
                        "round (default 3; quick 2; smoke 1; medians)")
    args = p.parse_args(argv)

    if args.smoke:
        defaults = {"concurrency": "4", "repeats": 1, "systems": f"{BARE},{OURS}", "requests": 16,
                    "startup_repeats": 1}
    elif args.quick:
        defaults = {"concurrency": "1,16", "repeats": 2, "systems": ",".join(SYSTEMS), "requests": None,
                    "startup_repeats": 2}
    else:
        defaults = {"concurrency": "1,4,16,64", "repeats": 3, "systems": ",".join(SYSTEMS),
                    "requests": None, "startup_repeats": 3}
    args.startup_repeats = args.startup_repeats or defaults["startup_repeats"]
    args.concurrency = [int(c) for c in (args.concurrency or defaults["concurrency"]).split(",") if c.strip()]
    args.repeats = args.repeats or defaults["repeats"]
    args.systems = [s.strip() for s in (args.systems or defaults["systems"]).split(",") if s.strip()]
    args.modes = [m.strip() for m in (args.modes or f"{STREAM},{NONSTREAM},{NATIVE}").split(",") if m.strip()]
    if args.requests is None:
        args.requests = defaults["requests"]
    if args.settle is None:
        args.settle = 1.0 if args.smoke else 2.0
    for s in args.systems:
        if s not in SYSTEMS:
            p.error(f"unknown system {s!r}")
    for m in args.modes:
        if m not in (STREAM, NONSTREAM, NATIVE):
            p.error(f"unknown mode {m!r}")
    if BARE not in args.systems:
        p.error("bare vLLM is the reference: --systems must include bare")
    if any(c < 1 for c in args.concurrency) or args.repeats < 1 or args.startup_repeats < 1:
        p.error("concurrency, repeats and startup repeats must be >= 1")
    return args


def requests_for(args: argparse.Namespace, concurrency: int) -> int:
    if args.requests:
        return args.requests
    if args.quick:
        return max(24, 4 * concurrency)
    return max(64, 8 * concurrency)


def rayllm_missing() -> str | None:
    """Why Ray Serve LLM can't run here (None: it can). Imported in a child, as its replica will."""
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    result = subprocess.run([PYTHON, "-c", code, *RAYLLM_IMPORTS], cwd=REPO_ROOT, env=child_env(),
                            capture_output=True, text=True, timeout=300)
    if result.returncode == 0:
        return None
    last = (result.stderr.strip().splitlines() or ["unknown error"])[-1]
    return f"its requirements are not importable ({last}); `make bench-install` installs them"


def chrt_prefix(disabled: bool) -> tuple[list[str], str]:
    if disabled:
        return [], "normal priority (--no-chrt)"
    if not shutil.which("chrt"):
        return [], "normal priority: `chrt` not found"
    probe = subprocess.run(["chrt", "-f", "-R", "5", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return [], f"normal priority: `chrt -f 5` refused ({probe.stderr.strip() or probe.returncode})"
    return ["chrt", "-f", "-R", "5"], "chrt -f 5 (SCHED_FIFO, reset on fork)"


class Client:
    """The load client process (bench.client), one command at a time."""

    def __init__(self, model: str, prefix: list[str], log: Path) -> None:
        self._log = open(log, "w")
        self.proc = subprocess.Popen(
            [*prefix, PYTHON, "-m", "bench.client", model], cwd=REPO_ROOT, env=child_env(),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1,
            start_new_session=True,
        )
        hello = self._read(300)
        self.scheduling = hello.get("scheduling", "unknown")

    def _read(self, timeout_s: float) -> dict:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout_s)
        if not ready:
            raise TimeoutError(f"load client silent for {timeout_s:.0f} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"load client exited ({self.proc.poll()}); see its log")
        return json.loads(line)

    def run(self, command: dict, timeout_s: float = RUN_TIMEOUT_S) -> dict:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()
        answer = self._read(timeout_s)
        if not answer.get("ok"):
            raise RuntimeError(f"load client failed on {command}: {answer.get('error')}")
        return answer["result"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write(json.dumps({"mode": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(30)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.proc.wait(10)
        self._log.close()


def point_sequence(mode: str, systems: list[str], repeat: int) -> list[tuple[str, str]]:
    """(system, load mode) in the order measured at one point. Every other system sits next to a
    bare run (its pair); the two bare runs sit next to each other (the noise floor). Odd repeats
    run the sequence backwards, so no system always goes first. The RunPod path's point also runs
    our HTTP streaming on its other side: the target compares those two, so they are paired too."""
    if mode == NATIVE:
        seq = [(OURS, STREAM), (OURS, NATIVE), (BARE, STREAM)]
    else:
        # o1 B B o2 | o3 B o4 | o5 B ...: every other system right beside a bare run.
        others = [s for s in systems if s != BARE]
        seq = [(s, mode) for s in others[:1]] + [(BARE, mode), (BARE, mode)] + [(s, mode) for s in others[1:2]]
        for i in range(2, len(others), 2):
            seq += [(others[i], mode), (BARE, mode)] + [(s, mode) for s in others[i + 1:i + 2]]
    return seq[::-1] if repeat % 2 else seq


def median_start(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The start with the median first-token time (the lower middle one of an even count), with the
    range over all starts."""
    ordered = sorted(records, key=lambda r: r["first_token_s"])
    middle = dict(ordered[(len(ordered) - 1) // 2])
    middle["first_token_range_s"] = [ordered[0]["first_token_s"], ordered[-1]["first_token_s"]]
    middle["starts"] = len(ordered)
    return middle


def command_for(server: Server, load_mode: str, concurrency: int, requests: int) -> dict:
    command = {"mode": load_mode, "concurrency": concurrency, "requests": requests, "base_url": server.base_url}
    if load_mode == NATIVE:
        command.update(ray_address=server.info["ray_address"], app=server.info["app"])
    return command


def fmt_run(system: str, load_mode: str, r: dict) -> str:
    ttft = r.get("ttft_p50_ms")
    ttft_s = f"{ttft:7.1f} ms" if ttft is not None else "    n/a"
    fail = f"  FAILED {r['failed']}: {r['errors']}" if r.get("failed") else ""
    return f"{system:>6} {load_mode:<9} {r['output_tok_s']:8.0f} tok/s  TTFT p50 {ttft_s}{fail}"


def record_ray_info(results: dict[str, Any], system: str, server: Server) -> None:
    """The Ray cluster a system runs on (the RunPod-path load joins it), checked to be on loopback.
    A system restarted for the load is a new cluster: recorded again."""
    if not server.info:
        return
    results["systems"][system]["ray"] = server.info
    if server.info.get("node_ip") != "127.0.0.1":
        print(f"[bench] WARNING: {system}'s Ray node IP is {server.info.get('node_ip')}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    adopt_child_env()
    out: Path = args.out
    logs = out / "raw"  # git-ignored (bench/results/raw/)
    logs.mkdir(parents=True, exist_ok=True)
    started_at = dt.datetime.now().astimezone()
    print(f"[bench] {started_at:%Y-%m-%d %H:%M:%S %Z}; results in {out}", flush=True)

    from tests.tiny_model import tiny_llama_path

    model = str(tiny_llama_path(args.cache_root or default_cache_root()))
    print(f"[bench] model: {model}", flush=True)

    systems = list(args.systems)
    skipped: dict[str, str] = {}
    if any(s in RAYLLM_SYSTEMS for s in systems):
        reason = rayllm_missing()
        if reason:
            print(f"[bench] skipping Ray Serve LLM: {reason}", flush=True)
            for system in (s for s in RAYLLM_SYSTEMS if s in systems):
                skipped[system] = reason
                systems.remove(system)
    modes = [m for m in args.modes if m != NATIVE or OURS in systems]

    results: dict[str, Any] = {
        "date": started_at.isoformat(timespec="seconds"),
        "machine": machine_info(),
        "versions": package_versions(),
        "config": {
            "model": model, "served_model_name": "tiny", "max_model_len": MAX_MODEL_LEN,
            "max_num_seqs": MAX_NUM_SEQS, "input_len": INPUT_LEN, "output_len": OUTPUT_LEN,
            "ignore_eos": True, "concurrency": args.concurrency, "repeats": args.repeats, "settle_s": args.settle,
            "startup_repeats": args.startup_repeats,
            "requests": {str(c): requests_for(args, c) for c in args.concurrency},
            "modes": modes, "systems": systems, "smoke": args.smoke, "quick": args.quick,
            "ray_worker_niceness": args.ray_worker_niceness if args.ray_worker_niceness is not None
            else "Ray default (15)",
            "env": {k: os.environ.get(k) for k in ("VLLM_CPU_KVCACHE_SPACE", "HF_HUB_OFFLINE", "VLLM_HOST_IP",
                                                    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")},
        },
        "systems": {s: {"label": LABELS[s]} for s in SYSTEMS if s in args.systems},
        "skipped": skipped,
        "runs": [],
        "warmup": [],
    }
    for system, reason in skipped.items():
        results["systems"][system]["skipped"] = reason

    servers: dict[str, Server] = {}
    client: Client | None = None
    taken: set[int] = set()

    def on_term(*_: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        # --- start-up: one system after the other, each measured alone -------------------------
        # Alone means alone: a system left up, even idle, slowed the next one's start by 8-12 s
        # here (ours: 35-36 s alone, 44-54 s beside an idle bare vLLM). So each is stopped after its
        # measured start, and all are started again (not measured) for the load. Several rounds,
        # the order reversed every other one: one start apiece swung by seconds (on a VM, memory
        # touched for the first time since boot is slow, and it lands on whichever start needs it).
        starts: dict[str, list[dict[str, Any]]] = {}
        for round_no in range(args.startup_repeats):
            order = systems if round_no % 2 == 0 else systems[::-1]
            for i, system in enumerate(order):
                last_start = round_no == args.startup_repeats - 1 and i == len(order) - 1
                server = servers.get(system) or Server(
                    system, pick_port(args.port_base + 10 * systems.index(system), taken), model, logs,
                    fresh_compile_cache=args.fresh_compile_cache, ray_worker_niceness=args.ray_worker_niceness)
                print(f"[bench] starting {LABELS[system]} on 127.0.0.1:{server.port} "
                      f"(start-up round {round_no + 1}/{args.startup_repeats}) ...", flush=True)
                try:
                    startup = server.start_and_wait(STARTUP_TIMEOUT_S)
                except Exception as exc:
                    server.stop()
                    if system in RAYLLM_SYSTEMS:
                        reason = f"did not start: {exc}"
                        print(f"[bench] skipping {LABELS[system]}: {reason}", flush=True)
                        skipped[system] = reason
                        results["systems"][system]["skipped"] = reason
                        servers.pop(system, None)
                        starts.pop(system, None)
                        systems = [s for s in systems if s != system]
                        continue
                    raise
                servers[system] = server
                starts.setdefault(system, []).append({"round": round_no, "position": i, **startup})
                results["systems"][system]["port"] = server.port
                record_ray_info(results, system, server)
                models = startup["models_ok_s"]
                print(f"[bench] {system}: first token {startup['first_token_s']:.1f} s after launch "
                      f"(/v1/models answered at {models if models is not None else 'n/a'} s; "
                      f"compile cache {startup['compile_cache']}"
                      + ("; vLLM failed to load its cached graph and compiled again"
                         if startup["compile_cache_load_failed"] else "") + ")", flush=True)
                if not last_start:
                    server.stop()
        for system, records in starts.items():
            results["systems"][system]["startup"] = median_start(records)
            results["systems"][system]["startup_runs"] = records
        systems = [s for s in systems if s in servers]
        for system in (s for s in systems if servers[s].proc is None):
            print(f"[bench] starting {LABELS[system]} again for the load ...", flush=True)
            servers[system].start_and_wait(STARTUP_TIMEOUT_S)
            record_ray_info(results, system, servers[system])
        modes = [m for m in modes if m != NATIVE or OURS in systems]
        results["config"]["systems"] = systems
        results["config"]["modes"] = modes

        # --- the load client ----------------------------------------------------------------------
        prefix, priority_note = chrt_prefix(args.no_chrt)
        if not prefix:
            print(f"[bench] NOTE: load client at {priority_note}; on 2 cores the engines can starve it "
                  "(ratios get noisier)", flush=True)
        client = Client(model, prefix, logs / "client.log")
        results["client"] = {"priority": priority_note, "scheduling": client.scheduling}
        print(f"[bench] load client: {priority_note} ({client.scheduling})", flush=True)

        # --- warm-up (not recorded in the results' runs) ------------------------------------------
        for system in systems:
            for mode in modes:
                if mode == NATIVE and system != OURS:
                    continue
                r = client.run(command_for(servers[system], mode, 4, 8))
                results["warmup"].append({"system": system, "mode": mode, **r})
        print("[bench] warm-up done", flush=True)

        # --- the measurements ---------------------------------------------------------------------
        seq_no = 0
        for repeat in range(args.repeats):
            for concurrency in args.concurrency:
                n = requests_for(args, concurrency)
                for mode in modes:
                    for position, (system, load_mode) in enumerate(point_sequence(mode, systems, repeat)):
                        time.sleep(args.settle)
                        r = client.run(command_for(servers[system], load_mode, concurrency, n))
                        results["runs"].append({
                            "seq": seq_no, "repeat": repeat, "concurrency": concurrency, "point_mode": mode,
                            "position": position, "system": system, "load_mode": load_mode, "requests": n,
                            "at": time.time(), **r,
                        })
                        seq_no += 1
                        print(f"[bench] r{repeat} c={concurrency:<3} {mode:<9} #{position} "
                              + fmt_run(system, load_mode, r), flush=True)
    except KeyboardInterrupt:
        print("[bench] interrupted; stopping the servers", flush=True)
        return 130
    finally:
        if client is not None:
            client.close()
        for server in reversed(list(servers.values())):
            server.stop()
    results["finished"] = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    results["summary"] = summarize(results)
    paths = write_reports(results, out)
    print((out / "latest.md").read_text(), flush=True)
    print(f"[bench] wrote {', '.join(str(p) for p in paths)}", flush=True)
    return 0
