"""`make bench`'s routing comparison: multi-turn chat workloads on our app with two engine
replicas, ROUTING=prefix against ROUTING=pow2 (Serve's default router), measured in the same run,
back to back.

    python -m bench.prefix [--workloads shared-system,own-context] [--conversations 8] [--turns 3]
                           [--concurrency 4] [--repeats 2] [--out DIR]

The model is the demo model (SmolLM2-135M-Instruct, deployments.engine.demo_model), so prefill
costs what it costs a real model on this CPU. Each run holds `--conversations` conversations, at
most `--concurrency` at once; a conversation's turns go one after the other, each turn's prompt
the whole conversation so far: a long system prompt, then per turn a user message and the answer.
Two workloads:

- `shared-system`: every conversation of a run shares one ~700-token system prompt (an agent's
  instructions). Every replica soon caches it, whichever router; what routing can save is the
  conversation's own tail.
- `own-context`: each conversation has its own ~700-token system prompt (a document, a user's
  history), and its user reads each answer for 0.5-1.5 s before the next turn, as people do: a
  turn sent to the other replica prefills all of it again. Without that pause Serve's default
  router keeps a conversation in place by accident (the replica its last turn just left is the
  less loaded one) and the comparison would not show routing at all.

Every run has its own prompts, so no run finds its prompts cached by an earlier one. Order per
repeat: prefix, pow2, pow2, prefix (each system first and last as often); each prefix run is paired
with the pow2 run beside it, and the pow2/pow2 pair is the noise floor. TTFT is of the turns after
the first (streamed), p50 and p90; tok/s is output tokens over the run's wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import httpx

from bench.client import percentile
from bench.common import REPO_ROOT, adopt_child_env, machine_info, package_versions, pick_port
from bench.servers import Server

PREFIX, POW2 = "ours-prefix", "ours-pow2"
LABELS = {PREFIX: "ours, 2 replicas, ROUTING=prefix", POW2: "ours, 2 replicas, ROUTING=pow2 (Serve's default)"}
DEFAULT_OUT = REPO_ROOT / "bench" / "results" / "prefix"
STARTUP_TIMEOUT_S = 900
MAX_MODEL_LEN = 4096
ANSWER_TOKENS = 16
WORKLOADS = ("shared-system", "own-context")
WORKLOAD_TEXT = {
    "shared-system": "a shared ~700-token system prompt",
    "own-context": "a ~700-token system prompt of each conversation's own, 0.5-1.5 s between turns",
}
THINK_S = {"shared-system": (0.0, 0.0), "own-context": (0.5, 1.5)}  # a user's pause between turns
WORDS = ("river", "engine", "copper", "lantern", "orbit", "meadow", "signal", "harbor", "violet", "granite",
         "thunder", "pepper", "mosaic", "falcon", "quartz", "willow", "ember", "canyon", "silver", "tundra")


def system_prompt(run_id: str, rng: random.Random, words: int = 600) -> str:
    """~700 tokens every conversation of a run shares (a long instruction block, as agents send)."""
    return f"Run {run_id}. Follow these notes. " + " ".join(rng.choice(WORDS) for _ in range(words))


def user_turn(rng: random.Random, words: int = 40) -> str:
    return "Consider: " + " ".join(rng.choice(WORDS) for _ in range(words)) + ". Summarise briefly."


async def _turn(http: httpx.AsyncClient, messages: list[dict[str, str]]) -> tuple[float, int, str]:
    """One streamed chat turn: (TTFT s, output tokens, the answer)."""
    body = {"model": "smol", "messages": messages, "max_tokens": ANSWER_TOKENS, "ignore_eos": True,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    started = time.perf_counter()
    ttft, tokens, text = None, 0, []
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            for choice in event.get("choices") or []:
                if choice.get("delta", {}).get("content"):
                    ttft = ttft if ttft is not None else time.perf_counter() - started
                    text.append(choice["delta"]["content"])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    if ttft is None:
        raise RuntimeError("no content streamed")
    return ttft, tokens, "".join(text)


def system_prompts(workload: str, run_id: str, rng: random.Random, conversations: int) -> list[str]:
    """Each conversation's system prompt: one for all (shared-system), or one each (own-context)."""
    if workload == "shared-system":
        return [system_prompt(run_id, rng)] * conversations
    if workload == "own-context":
        return [system_prompt(f"{run_id}-c{i}", rng) for i in range(conversations)]
    raise ValueError(f"unknown workload {workload!r}; one of {', '.join(WORKLOADS)}")


async def run_workload(base_url: str, run_id: str, conversations: int, turns: int, concurrency: int,
                       workload: str = "shared-system") -> dict:
    rng = random.Random(run_id)
    systems = system_prompts(workload, run_id, rng, conversations)
    scripts = [[user_turn(rng) for _ in range(turns)] for _ in range(conversations)]
    pauses = [[rng.uniform(*THINK_S[workload]) for _ in range(turns)] for _ in range(conversations)]
    ttfts: list[float] = []
    first_turn_ttfts: list[float] = []
    output_tokens = 0
    failures: list[str] = []
    gate = asyncio.Semaphore(concurrency)

    async def conversation(http: httpx.AsyncClient, system: str, script: list[str], pause: list[float]) -> None:
        nonlocal output_tokens
        async with gate:
            messages = [{"role": "system", "content": system}]
            for index, question in enumerate(script):
                if index:
                    await asyncio.sleep(pause[index])
                messages.append({"role": "user", "content": question})
                try:
                    ttft, tokens, answer = await _turn(http, messages)
                except Exception as exc:  # counted, never hidden
                    failures.append(f"{type(exc).__name__}: {exc}")
                    return
                (first_turn_ttfts if index == 0 else ttfts).append(ttft)
                output_tokens += tokens
                messages.append({"role": "assistant", "content": answer})

    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits, trust_env=False) as http:
        started = time.perf_counter()
        await asyncio.gather(*(conversation(http, *parts) for parts in zip(systems, scripts, pauses, strict=True)))
        duration = time.perf_counter() - started

    def pct(values: list[float], q: int) -> float | None:
        value = percentile(values, q)  # the load client's own definition (linear interpolation)
        return None if value is None else value * 1000

    return {
        "run_id": run_id, "duration_s": duration, "output_tok_s": output_tokens / duration,
        "later_turns": len(ttfts), "ttft_p50_ms": pct(ttfts, 50), "ttft_p90_ms": pct(ttfts, 90),
        "first_turn_ttft_p50_ms": pct(first_turn_ttfts, 50), "failed": len(failures), "errors": failures[:3],
    }


def sequence() -> list[str]:
    return [PREFIX, POW2, POW2, PREFIX]


def summarize(runs: list[dict]) -> dict[str, Any]:
    """Per repeat: each prefix run / the pow2 run beside it; the pow2/pow2 pair is the noise floor."""
    ratios: dict[str, list[float]] = {"ttft_p50": [], "ttft_p90": [], "tok_s": []}
    noise: dict[str, list[float]] = {"ttft_p50": [], "ttft_p90": [], "tok_s": []}
    fields = {"ttft_p50": "ttft_p50_ms", "ttft_p90": "ttft_p90_ms", "tok_s": "output_tok_s"}
    for repeat in sorted({r["repeat"] for r in runs}):
        seq = sorted((r for r in runs if r["repeat"] == repeat), key=lambda r: r["position"])
        for i, run in enumerate(seq):
            if run["system"] != PREFIX:
                continue
            beside = next(seq[j] for j in (i - 1, i + 1) if 0 <= j < len(seq) and seq[j]["system"] == POW2)
            for name, field in fields.items():
                ratios[name].append(run[field] / beside[field])
        pow2 = [r for r in seq if r["system"] == POW2]
        for name, field in fields.items():
            noise[name].append(pow2[0][field] / pow2[1][field])

    def med(values: list[float]) -> dict[str, Any]:
        return {"median": statistics.median(values), "range": [min(values), max(values)], "pairs": len(values)}

    medians = {system: {field: statistics.median(r[field] for r in runs if r["system"] == system)
                        for field in fields.values()} for system in (PREFIX, POW2)}
    return {"prefix_over_pow2": {k: med(v) for k, v in ratios.items()},
            "noise_pow2_over_pow2": {k: med(v) for k, v in noise.items()}, "medians": medians}


def markdown(results: dict[str, Any]) -> str:
    cfg = results["config"]
    lines = [
        f"# Routing by prompt prefix ({results['date']})", "",
        f"{cfg['conversations']} conversations x {cfg['turns']} turns, {cfg['concurrency']} at once, "
        f"{ANSWER_TOKENS} tokens per answer; SmolLM2-135M-Instruct, two engine replicas; {cfg['repeats']} "
        "repeats. TTFT of the turns after the first (streamed).",
    ]
    for workload, result in results["workloads"].items():
        s = result["summary"]
        lines += ["", f"## {workload}: {WORKLOAD_TEXT.get(workload, workload)}", "",
                  "| system | TTFT p50 (ms) | TTFT p90 (ms) | output tok/s |", "|---|---|---|---|"]
        for system in (PREFIX, POW2):
            m = s["medians"][system]
            lines.append(f"| {LABELS[system]} | {m['ttft_p50_ms']:.0f} | {m['ttft_p90_ms']:.0f} | "
                         f"{m['output_tok_s']:.1f} |")
        lines += ["", "| ratio (median of pairs, range) | TTFT p50 | TTFT p90 | tok/s |", "|---|---|---|---|"]
        for name, key in (("prefix / pow2", "prefix_over_pow2"), ("noise floor pow2 / pow2", "noise_pow2_over_pow2")):
            row = s[key]
            cells = [f"{row[k]['median']:.2f} [{row[k]['range'][0]:.2f}-{row[k]['range'][1]:.2f}]"
                     for k in ("ttft_p50", "ttft_p90", "tok_s")]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help=f"comma-separated, of: {', '.join(WORKLOADS)}")
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--port-base", type=int, default=8410)
    args = p.parse_args(argv)
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown or not workloads:
        p.error(f"--workloads: {', '.join(unknown) or 'none given'}; choose from {', '.join(WORKLOADS)}")
    adopt_child_env()
    from deployments.engine.demo_model import ensure_demo_model

    model = str(ensure_demo_model())
    logs = args.out / "raw"
    logs.mkdir(parents=True, exist_ok=True)
    date = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    print(f"[bench.prefix] {date}; model {model}; results in {args.out}", flush=True)
    settings = {"OPENAI_SERVED_MODEL_NAME_OVERRIDE": "smol", "MAX_MODEL_LEN": MAX_MODEL_LEN, "NUM_REPLICAS": 2}
    servers = {
        system: Server(system, pick_port(args.port_base + 10 * i, set()), model, logs,
                       settings={**settings, "ROUTING": "prefix" if system == PREFIX else "pow2"})
        for i, system in enumerate((PREFIX, POW2))
    }
    runs: dict[str, list[dict]] = {workload: [] for workload in workloads}
    try:
        for system, server in servers.items():
            print(f"[bench.prefix] starting {LABELS[system]} on {server.base_url} ...", flush=True)
            server.start_and_wait(STARTUP_TIMEOUT_S)
        for system, server in servers.items():  # warm-up: compile, first requests
            asyncio.run(run_workload(server.base_url, f"warm-{system}", 2, 2, 2))
        for workload in workloads:
            for repeat in range(args.repeats):
                for position, system in enumerate(sequence()):
                    time.sleep(2)
                    run_id = f"{workload}-r{repeat}p{position}"
                    r = asyncio.run(run_workload(servers[system].base_url, run_id, args.conversations, args.turns,
                                                 args.concurrency, workload))
                    runs[workload].append({"repeat": repeat, "position": position, "system": system, **r})
                    print(f"[bench.prefix] {workload} r{repeat} #{position} {system:<11} TTFT p50 "
                          f"{r['ttft_p50_ms']:.0f} ms p90 {r['ttft_p90_ms']:.0f} ms, {r['output_tok_s']:.1f} tok/s, "
                          f"failed {r['failed']}", flush=True)
    finally:
        for server in servers.values():
            server.stop()
    results = {"date": date, "machine": machine_info(), "versions": package_versions(),
               "config": {**vars(args), "out": str(args.out), "model": model, "settings": settings},
               "workloads": {workload: {"runs": rs, "summary": summarize(rs)} for workload, rs in runs.items()}}
    (args.out / "latest.json").write_text(json.dumps(results, indent=2))
    (args.out / "latest.md").write_text(markdown(results))
    print(markdown(results), flush=True)
    return 0 if not any(r["failed"] for rs in runs.values() for r in rs) else 1


if __name__ == "__main__":
    raise SystemExit(main())
