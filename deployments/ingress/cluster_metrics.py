"""`GET /metrics` on the ingress port, as `vllm serve` has it: the cluster's Prometheus metrics (the
router's `ray_llm_router_*`, vLLM's `ray_vllm:*`, Ray's and Serve's), read from every node's Ray
metrics agent and merged into one exposition. A scraper that can reach only the app's port (a
RunPod endpoint, a load balancer) gets everything a scrape of each node's export port would."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import httpx

from deployments.ingress.errors import MetricsUnavailable

SCRAPE_TIMEOUT_S = 5.0
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def merge_expositions(texts: Iterable[str]) -> str:
    """Several Prometheus text expositions as one: each metric family once, with its HELP and TYPE,
    followed by the samples every exposition has for it. Concatenating them instead would repeat
    `# TYPE` lines, which Prometheus rejects."""
    families: dict[str, dict[str, object]] = {}

    def family(name: str) -> dict[str, object]:
        return families.setdefault(name, {"help": None, "type": None, "samples": []})

    for text in texts:
        current: str | None = None
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                kind, name = line[2:6].lower(), line.split(maxsplit=3)[2]
                current = name
                entry = family(name)
                if entry[kind] is None:
                    entry[kind] = line
            elif line.startswith("#"):
                continue
            else:
                # A histogram's name_bucket/_sum/_count samples follow their family's TYPE line.
                name = line.split("{", 1)[0].split(" ", 1)[0]
                owner = current if current is not None and name.startswith(current) else name
                family(owner)["samples"].append(line)  # type: ignore[union-attr]
    out: list[str] = []
    for entry in families.values():
        out += [line for line in (entry["help"], entry["type"]) if line]  # type: ignore[misc]
        out += entry["samples"]  # type: ignore[arg-type]
    return "\n".join(out) + "\n"


def metrics_agent_urls() -> list[str]:
    """Every alive node's metrics agent."""
    import ray

    return [
        f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        for node in ray.nodes()
        if node.get("Alive") and node.get("MetricsExportPort")
    ]


async def scrape_cluster(client: httpx.AsyncClient) -> str:
    """The merged exposition of every node that answers; MetricsUnavailable if none does."""
    urls = await asyncio.to_thread(metrics_agent_urls)

    async def scrape(url: str) -> str | None:
        try:
            response = await client.get(url, timeout=SCRAPE_TIMEOUT_S)
        except httpx.HTTPError:
            return None
        return response.text if response.status_code == 200 else None

    texts = [text for text in await asyncio.gather(*(scrape(url) for url in urls)) if text is not None]
    if not texts:
        raise MetricsUnavailable(f"No node's Ray metrics agent answered ({len(urls)} asked); retry shortly.")
    return merge_expositions(texts)
