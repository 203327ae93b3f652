"""The benchmark's pure parts: the order of runs at a point and the summary's pairing. The RunPod
path's target is a ratio to our own HTTP path, so that ratio must come from back-to-back runs, as
every ratio to bare vLLM does."""

from __future__ import annotations

import itertools
import random

import pytest

from bench.common import BARE, NATIVE, OURS, OURS_SERVE, RAYLLM, RAYLLM_TUNED, STREAM, SYSTEMS
from bench.report import markdown, summarize
from bench.run import median_start, point_sequence


def test_the_runpod_point_runs_our_http_path_and_bare_vllm_on_either_side():
    assert point_sequence(NATIVE, [OURS, BARE], 0) == [(OURS, STREAM), (OURS, NATIVE), (BARE, STREAM)]
    assert point_sequence(NATIVE, [OURS, BARE], 1) == [(BARE, STREAM), (OURS, NATIVE), (OURS, STREAM)]


def test_every_system_is_measured_beside_a_bare_run_and_the_bare_pair_is_the_noise_floor():
    for systems in ([BARE, OURS], [BARE, OURS, RAYLLM], list(SYSTEMS), [BARE, OURS, OURS_SERVE, RAYLLM]):
        for repeat in (0, 1):
            sequence = [system for system, _ in point_sequence(STREAM, systems, repeat)]
            assert sorted(s for s in sequence if s != BARE) == sorted(s for s in systems if s != BARE)
            assert any(a == b == BARE for a, b in itertools.pairwise(sequence))
            for i, system in enumerate(sequence):
                if system != BARE:
                    assert BARE in sequence[max(0, i - 1):i] + sequence[i + 1:i + 2], (sequence, system)
    assert [s for s, _ in point_sequence(STREAM, list(SYSTEMS), 0)] == [
        OURS, BARE, BARE, OURS_SERVE, RAYLLM, BARE, RAYLLM_TUNED]


def _run(repeat: int, position: int, system: str, load_mode: str, tok_s: float, ttft: float) -> dict:
    return {"repeat": repeat, "concurrency": 4, "point_mode": NATIVE, "position": position, "system": system,
            "load_mode": load_mode, "output_tok_s": tok_s, "ttft_p50_ms": ttft, "failed": 0, "completed": 32}


def _native_point_runs() -> list[dict]:
    runs = []
    for repeat, (http, native, bare) in enumerate(((1000.0, 900.0, 1200.0), (800.0, 760.0, 1000.0),
                                                   (1100.0, 1100.0, 1100.0))):
        sequence = point_sequence(NATIVE, [OURS, BARE], repeat)
        tok = {(OURS, STREAM): http, (OURS, NATIVE): native, (BARE, STREAM): bare}
        runs += [_run(repeat, i, s, m, tok[(s, m)], 10.0 + i) for i, (s, m) in enumerate(sequence)]
    return runs


def test_the_runpod_row_pairs_each_job_run_with_the_http_run_beside_it():
    rows = summarize({"runs": _native_point_runs()})
    ours = next(r for r in rows if r["system"] == OURS)
    # Pairs: 900/1000, 760/800, 1100/1100 -> 0.9, 0.95, 1.0.
    assert ours["ratio_to_our_http"] == 0.95
    assert ours["ratio_to_our_http_range"] == [0.9, 1.0]
    assert ours["our_http_pairs"] == 3
    # The row itself is the RunPod path's: our HTTP runs are its reference, not its measurements.
    assert ours["load"] == NATIVE and ours["measurements"] == 3
    assert ours["tok_s"] == 900.0
    # Its ratio to bare vLLM still comes from the bare run on its other side: 0.75, 0.76, 1.0.
    assert ours["ratio_tok_s"] == 0.76
    bare = next(r for r in rows if r["system"] == BARE)
    assert "ratio_to_our_http" not in bare and bare["measurements"] == 3


def _results(runs: list | None = None, systems: dict | None = None) -> dict:
    """A run's results as bench.run writes them, around the given runs and systems."""
    return {
        "date": "2026-11-24T00:00:00+00:00",
        "machine": {"nproc": 2, "cpu_model": "cpu", "mem_gib": 24, "platform": "linux", "python": "3.11"},
        "versions": {},
        "config": {"max_model_len": 512, "max_num_seqs": 256, "input_len": 64, "output_len": 64,
                   "requests": {"4": 32}, "repeats": 3, "settle_s": 2, "ray_worker_niceness": 15},
        "systems": systems or {},
        "runs": runs or [],
    }


def test_the_markdown_shows_the_runpod_to_http_ratio():
    results = _results(runs=_native_point_runs())
    results["summary"] = summarize(results)
    text = markdown(results)
    assert "| c | RunPod / our HTTP | pairs |" in text
    assert "| 4 | 0.95 [0.90-1.00] | 3 |" in text


def _start(first_token_s: float, cache: str = "warm") -> dict:
    return {"first_token_s": first_token_s, "models_ok_s": first_token_s, "compile_cache": cache,
            "compile_cache_load_failed": False}


def test_start_up_is_the_median_start_with_the_range_of_all():
    median = median_start([_start(31.0, "cold"), _start(27.5), _start(29.0)])
    assert median["first_token_s"] == 29.0 and median["first_token_range_s"] == [27.5, 31.0]
    assert median["starts"] == 3
    # An even count takes the lower middle start (a real start, never an average of two).
    assert median_start([_start(30.0), _start(28.0)])["first_token_s"] == 28.0


def test_the_markdown_shows_start_ups_with_their_range_and_ratio_to_bare():
    results = _results(systems={
        BARE: {"label": "bare vLLM server", "startup": median_start([_start(25.0), _start(26.0), _start(27.0)])},
        OURS: {"label": "ours", "startup": median_start([_start(28.6), _start(29.9), _start(33.0)])},
    })
    results["config"]["startup_repeats"] = 3
    results["summary"] = []
    text = markdown(results)
    assert "| bare vLLM server | 26.0 [25.0-27.0] | 1 (reference) |" in text
    assert "| ours | 29.9 [28.6-33.0] | 1.15 |" in text
    assert "in 3 round(s)" in text


def test_the_prefix_benchmark_pairs_each_prefix_run_with_the_pow2_run_beside_it():
    from bench.prefix import POW2, PREFIX, markdown, sequence, summarize

    assert sequence() == [PREFIX, POW2, POW2, PREFIX]
    runs = []
    for repeat, values in enumerate(([100, 200, 220, 110], [90, 240, 200, 120])):  # TTFT p50 per position
        for position, (system, ttft) in enumerate(zip(sequence(), values, strict=True)):
            runs.append({"repeat": repeat, "position": position, "system": system, "ttft_p50_ms": ttft,
                         "ttft_p90_ms": 2 * ttft, "output_tok_s": 1000 / ttft})
    summary = summarize(runs)
    # Repeat 0: 100/200 and 110/220; repeat 1: 90/240 and 120/200.
    assert summary["prefix_over_pow2"]["ttft_p50"]["pairs"] == 4
    assert summary["prefix_over_pow2"]["ttft_p50"]["range"] == [0.375, 0.6]
    assert summary["noise_pow2_over_pow2"]["ttft_p50"]["range"] == [200 / 220, 240 / 200]
    table = markdown({"date": "d", "workloads": {"own-context": {"summary": summary}},
                      "config": {"conversations": 16, "turns": 4, "concurrency": 4, "repeats": 2}})
    assert "## own-context: a ~700-token system prompt of each conversation's own" in table
    assert "| prefix / pow2 | 0.50 [0.38-0.60]" in table


def test_the_prefix_benchmark_workloads_share_or_own_their_system_prompts():
    from bench.prefix import main, system_prompts

    shared = system_prompts("shared-system", "r0", random.Random(0), 4)
    own = system_prompts("own-context", "r0", random.Random(0), 4)
    assert len(set(shared)) == 1 and len(set(own)) == 4 and len(own[0].split()) > 500
    with pytest.raises(ValueError, match="unknown workload"):
        system_prompts("nope", "r0", random.Random(0), 1)
    with pytest.raises(SystemExit):
        main(["--workloads", "nope"])
