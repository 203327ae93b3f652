"""deployments.ingress.cluster_metrics: two nodes' expositions merged into one Prometheus accepts."""

from __future__ import annotations

from deployments.ingress.cluster_metrics import merge_expositions

NODE_A = """# HELP ray_llm_router_requests_total Requests.
# TYPE ray_llm_router_requests_total counter
ray_llm_router_requests_total{NodeAddress="10.0.0.1",route="/v1/completions",status="200"} 3.0
# HELP ray_llm_router_ttft_seconds Time to first token.
# TYPE ray_llm_router_ttft_seconds histogram
ray_llm_router_ttft_seconds_bucket{NodeAddress="10.0.0.1",le="0.1"} 1.0
ray_llm_router_ttft_seconds_sum{NodeAddress="10.0.0.1"} 0.05
ray_llm_router_ttft_seconds_count{NodeAddress="10.0.0.1"} 1.0
"""
NODE_B = """# HELP ray_llm_router_requests_total Requests.
# TYPE ray_llm_router_requests_total counter
ray_llm_router_requests_total{NodeAddress="10.0.0.2",route="/v1/completions",status="200"} 5.0

# HELP ray_vllm:num_requests_running Running requests.
# TYPE ray_vllm:num_requests_running gauge
ray_vllm:num_requests_running{NodeAddress="10.0.0.2"} 2.0
"""


def test_each_family_appears_once_with_every_nodes_samples_under_it():
    merged = merge_expositions([NODE_A, NODE_B]).splitlines()
    types = [line for line in merged if line.startswith("# TYPE ")]
    assert types == ["# TYPE ray_llm_router_requests_total counter", "# TYPE ray_llm_router_ttft_seconds histogram",
                     "# TYPE ray_vllm:num_requests_running gauge"]
    requests_at = merged.index("# TYPE ray_llm_router_requests_total counter")
    assert merged[requests_at + 1].endswith(" 3.0") and merged[requests_at + 2].endswith(" 5.0")
    histogram_at = merged.index("# TYPE ray_llm_router_ttft_seconds histogram")
    assert [line.split("{")[0] for line in merged[histogram_at + 1:histogram_at + 4]] == [
        "ray_llm_router_ttft_seconds_bucket", "ray_llm_router_ttft_seconds_sum", "ray_llm_router_ttft_seconds_count"]
    assert sum(line.startswith("# HELP ") for line in merged) == 3 and "" not in merged


def test_one_node_passes_through_unchanged():
    assert merge_expositions([NODE_A]) == NODE_A
