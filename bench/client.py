"""The load client: one long-lived process (under `chrt -f 5` when possible, so the busy engines
cannot starve it) that runs one measurement per command.

Commands arrive as JSON lines on stdin; each answer is one JSON line on the original stdout (the
process's own prints, vLLM's benchmark output included, go to stderr). Modes:
  stream     vLLM's own benchmark (vllm.benchmarks.serve.benchmark), openai-chat backend
  nonstream  a small aiohttp client of ours: the same chat requests with stream=false
  native     RunPod worker-vllm native streaming jobs through our app's Serve handle
             (serve.get_app_handle(app).options(stream=True).native), as handler/worker.py sends them
All three use the same prompts: vLLM's random dataset, INPUT_LEN in / OUTPUT_LEN out, ignore_eos.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
import time
import traceback
import uuid
from dataclasses import replace
from typing import Any

from bench.common import INPUT_LEN, OUTPUT_LEN, SERVED_MODEL

REQUEST_TIMEOUT_S = 600


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def _summary(*, duration: float, completed: int, failed: int, output_tokens: int, ttfts: list[float],
             latencies: list[float], itls: list[float] | None = None, errors: list[str] | None = None) -> dict:
    ms = 1000.0
    return {
        "duration_s": duration,
        "completed": completed,
        "failed": failed,
        "output_tokens": output_tokens,
        "output_tok_s": output_tokens / duration if duration > 0 else 0.0,
        "request_s": completed / duration if duration > 0 else 0.0,
        "ttft_p50_ms": (percentile(ttfts, 50) or 0.0) * ms if ttfts else None,
        "ttft_p99_ms": (percentile(ttfts, 99) or 0.0) * ms if ttfts else None,
        "itl_p50_ms": (percentile(itls, 50) or 0.0) * ms if itls else None,
        "latency_p50_ms": (percentile(latencies, 50) or 0.0) * ms if latencies else None,
        "errors": sorted(set(e for e in (errors or []) if e))[:3],
    }


class LoadClient:
    def __init__(self, model_path: str, seed: int = 0) -> None:
        from vllm.tokenizers import get_tokenizer

        self.model_path = model_path
        self.seed = seed
        self.tokenizer = get_tokenizer(model_path)
        self._samples: dict[int, list[Any]] = {}
        self._handles: dict[tuple[str, str], Any] = {}
        self._ray_address: str | None = None

    # --- the prompts ------------------------------------------------------------------------------
    def samples(self, n: int) -> list[Any]:
        """vLLM's random dataset, as `vllm bench serve --dataset-name random` builds it; a fresh
        request id prefix per run (our router passes the caller's x-request-id to vLLM)."""
        if n not in self._samples:
            from vllm.benchmarks.datasets import get_samples
            from vllm.benchmarks.serve import add_cli_args
            from vllm.utils.argparse_utils import FlexibleArgumentParser

            parser = FlexibleArgumentParser()
            add_cli_args(parser)
            args = parser.parse_args([
                "--backend", "openai-chat", "--endpoint", "/v1/chat/completions",
                "--model", self.model_path, "--served-model-name", SERVED_MODEL,
                "--dataset-name", "random", "--random-input-len", str(INPUT_LEN),
                "--random-output-len", str(OUTPUT_LEN), "--num-prompts", str(n),
                "--seed", str(self.seed), "--ignore-eos",
            ])
            self._samples[n] = get_samples(args, self.tokenizer)
        prefix = f"bench-{uuid.uuid4().hex[:8]}-"
        return [replace(r, request_id=f"{prefix}{i}") for i, r in enumerate(self._samples[n])]

    # --- modes ------------------------------------------------------------------------------------
    async def stream(self, base_url: str, concurrency: int, requests: int) -> dict:
        from vllm.benchmarks.serve import TaskType, benchmark

        result = await benchmark(
            task_type=TaskType.GENERATION,
            endpoint_type="openai-chat",
            api_url=f"{base_url}/v1/chat/completions",
            base_url=base_url,
            model_id=self.model_path,
            model_name=SERVED_MODEL,
            tokenizer=self.tokenizer,
            input_requests=self.samples(requests),
            logprobs=None,
            request_rate=float("inf"),
            burstiness=1.0,
            disable_tqdm=True,
            num_warmups=0,
            profile=False,
            selected_percentile_metrics=["ttft", "tpot", "itl", "e2el"],
            selected_percentiles=[50.0, 99.0],
            ignore_eos=True,
            goodput_config_dict={},
            max_concurrency=concurrency,
            lora_modules=None,
            extra_headers=None,
            extra_body=None,
            ready_check_timeout_sec=0,
        )
        errors = [e for e in result.get("errors", []) if e]
        return {
            "duration_s": result["duration"],
            "completed": result["completed"],
            "failed": result.get("failed", 0),
            "output_tokens": result["total_output_tokens"],
            "output_tok_s": result["output_throughput"],
            "request_s": result["request_throughput"],
            "ttft_p50_ms": result.get("median_ttft_ms"),
            "ttft_p99_ms": result.get("p99_ttft_ms"),
            "itl_p50_ms": result.get("median_itl_ms"),
            "latency_p50_ms": result.get("median_e2el_ms"),
            "errors": sorted(set(errors))[:3],
        }

    async def nonstream(self, base_url: str, concurrency: int, requests: int) -> dict:
        import aiohttp

        samples = self.samples(requests)
        url = f"{base_url}/v1/chat/completions"
        semaphore = asyncio.Semaphore(concurrency)
        latencies: list[float] = []
        errors: list[str] = []
        tokens = 0

        async def one(session: aiohttp.ClientSession, sample: Any) -> None:
            nonlocal tokens
            body = {
                "model": SERVED_MODEL,
                "messages": [{"role": "user", "content": sample.prompt}],
                "max_completion_tokens": sample.expected_output_len,
                "ignore_eos": True,
                "stream": False,
            }
            async with semaphore:
                started = time.perf_counter()
                try:
                    async with session.post(url, json=body, headers={"x-request-id": sample.request_id}) as r:
                        payload = await r.read()
                        if r.status != 200:
                            errors.append(f"HTTP {r.status}: {payload[:200]!r}")
                            return
                        data = json.loads(payload)
                except Exception as exc:  # noqa: BLE001 - recorded, not raised
                    errors.append(f"{type(exc).__name__}: {exc}")
                    return
                latencies.append(time.perf_counter() - started)
                tokens += int((data.get("usage") or {}).get("completion_tokens") or 0)

        connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency, keepalive_timeout=60)
        timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            started = time.perf_counter()
            await asyncio.gather(*(one(session, s) for s in samples))
            duration = time.perf_counter() - started
        # Non-streaming: the first token arrives with the whole answer, so TTFT = latency.
        return _summary(duration=duration, completed=len(latencies), failed=len(errors), output_tokens=tokens,
                        ttfts=latencies, latencies=latencies, errors=errors)

    def _native_handle(self, ray_address: str, app: str) -> Any:
        # As handler/worker.py does: Serve's switches before Serve is imported (handle transport).
        from configs.ray_env import HANDLE_SERIALIZATION, apply_serve_performance_env

        apply_serve_performance_env()
        import ray
        from ray import serve

        if self._ray_address not in (None, ray_address):
            raise RuntimeError("one Ray cluster per load client")
        if not ray.is_initialized():
            ray.init(address=ray_address, log_to_driver=False)
            self._ray_address = ray_address
        key = (ray_address, app)
        if key not in self._handles:
            self._handles[key] = serve.get_app_handle(app).options(stream=True, **HANDLE_SERIALIZATION).native
        return self._handles[key]

    async def native(self, ray_address: str, app: str, concurrency: int, requests: int) -> dict:
        native = self._native_handle(ray_address, app)
        samples = self.samples(requests)
        semaphore = asyncio.Semaphore(concurrency)
        ttfts: list[float] = []
        latencies: list[float] = []
        gaps: list[float] = []
        errors: list[str] = []
        tokens = 0

        async def one(sample: Any) -> None:
            nonlocal tokens
            job_input = {
                "messages": [{"role": "user", "content": sample.prompt}],
                "sampling_params": {"max_tokens": sample.expected_output_len, "ignore_eos": True},
                "stream": True,
            }
            async with semaphore:
                started = time.perf_counter()
                first = last = None
                output = 0
                responses = native.remote(job_input, sample.request_id)
                try:
                    async for item in responses:
                        now = time.perf_counter()
                        if isinstance(item, dict) and "error" in item:
                            errors.append(str(item["error"])[:200])
                            return
                        if first is None:
                            first = now
                        else:
                            gaps.append(now - last)
                        last = now
                        output = int((item.get("usage") or {}).get("output") or output)
                except Exception as exc:  # noqa: BLE001 - recorded, not raised
                    errors.append(f"{type(exc).__name__}: {exc}")
                    return
                finally:
                    responses.cancel()
                if first is None:
                    errors.append("no output")
                    return
                ttfts.append(first - started)
                latencies.append(last - started)
                tokens += output

        started = time.perf_counter()
        await asyncio.gather(*(one(s) for s in samples))
        duration = time.perf_counter() - started
        # Gaps are between worker-vllm's growing batches (1, 3, 9, 27, 50 tokens), not per token.
        result = _summary(duration=duration, completed=len(ttfts), failed=len(errors), output_tokens=tokens,
                          ttfts=ttfts, latencies=latencies, errors=errors)
        result["batch_gap_p50_ms"] = (percentile(gaps, 50) or 0.0) * 1000 if gaps else None
        return result

    async def run(self, command: dict) -> dict:
        mode = command["mode"]
        c, n = int(command["concurrency"]), int(command["requests"])
        # What the measurement needs is built first (prompts, the Ray connection), then the heap is
        # settled: this process holds vLLM's import (~670k objects), and a full collection of that
        # stopped the client for 260-370 ms, in the middle of measurements.
        self.samples(n)
        if mode == "native":
            self._native_handle(command["ray_address"], command["app"])
        gc.collect()
        gc.freeze()
        if mode == "stream":
            return await self.stream(command["base_url"], c, n)
        if mode == "nonstream":
            return await self.nonstream(command["base_url"], c, n)
        if mode == "native":
            return await self.native(command["ray_address"], command["app"], c, n)
        raise ValueError(f"unknown mode {mode!r}")


def _scheduling() -> str:
    try:
        policy = os.sched_getscheduler(0)
        prio = os.sched_getparam(0).sched_priority
    except (AttributeError, OSError):
        return "unknown"
    names = {getattr(os, "SCHED_OTHER", 0): "SCHED_OTHER", getattr(os, "SCHED_FIFO", 1): "SCHED_FIFO",
             getattr(os, "SCHED_RR", 2): "SCHED_RR"}
    policy &= ~getattr(os, "SCHED_RESET_ON_FORK", 0x40000000)
    return f"{names.get(policy, policy)} priority {prio}, nice {os.nice(0)}"


def main() -> int:
    # The answers own the real stdout; everything printed (vLLM's benchmark too) goes to stderr.
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    model_path = sys.argv[1]
    client = LoadClient(model_path)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    answers.write(json.dumps({"ready": True, "scheduling": _scheduling()}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        command = json.loads(line)
        if command.get("mode") == "quit":
            break
        started = time.time()
        try:
            result = loop.run_until_complete(client.run(command))
            answer = {"ok": True, "result": result}
        except Exception as exc:  # noqa: BLE001 - reported to the orchestrator
            traceback.print_exc()
            answer = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        answer["started_at"] = started
        answers.write(json.dumps(answer) + "\n")
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # noqa: BLE001
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
