"""`python -m bench --smoke` end to end: bare vLLM and our Serve app start (tiny model), take a little
load in every mode, and the results (JSON, markdown, plot) are written. No timing assertions: this
machine's numbers are the benchmark's business, not the test's."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(1800)
def test_bench_smoke_writes_results_for_both_systems(tmp_path: Path):
    out = tmp_path / "bench"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out), "--port-base", "8350"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=1700,
    )
    assert proc.returncode == 0, f"bench failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"

    results = json.loads((out / "latest.json").read_text())
    rows = results["summary"]
    for system in ("bare", "ours"):
        mine = [r for r in rows if r["system"] == system]
        assert mine, f"no summary rows for {system}"
        assert all(r["tok_s"] and r["tok_s"] > 0 for r in mine), mine
        assert all(r["failed"] == 0 for r in mine), mine
        assert results["systems"][system]["startup"]["first_token_s"] > 0
    modes = {(r["system"], r["mode"]) for r in rows}
    assert {("ours", "stream"), ("ours", "nonstream"), ("ours", "native")} <= modes
    # The RunPod path is paired with our HTTP path run next to it (its target is that ratio).
    runpod = next(r for r in rows if r["system"] == "ours" and r["mode"] == "native")
    assert runpod["load"] == "native" and runpod["our_http_pairs"] >= 1 and runpod["ratio_to_our_http"] > 0
    assert results["machine"]["nproc"] >= 1 and results["machine"]["cpu_model"]
    assert results["date"]

    md = (out / "latest.md").read_text()
    assert "bare vLLM server" in md and "ours" in md
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "latest.png").stat().st_size > 0
    else:  # `make test` does not install the benchmark's extras (`make bench-install` does)
        assert "matplotlib is not installed" in results.get("plot", "")
