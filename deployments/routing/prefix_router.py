"""ROUTING=prefix: a Serve request router (Serve's custom request router API) that sends a request
to the engine replica that served the longest start of its prompt, where vLLM's prefix cache
still holds it, unless that replica is busier than the others by more than ROUTING_IMBALANCE.

It runs in the ingress replica, inside its handle to the engine deployment (configs.placement sets
it as the engine deployment's `request_router_config`). The ingress passes each call's prefix key
(deployments.routing.prefix_key) as the `route_key` argument, so the router never reads a body.
Unlike Ray Serve LLM's PrefixCacheAffinityRouter, which asks one detached prefix-tree actor
(`ray.get`, blocking) twice per request, the memory of who served what lives in the router
itself. A conversation it has never seen goes to the least loaded replica, ties broken by
rendezvous hashing of the conversation's anchor (so on an idle deployment several ingress replicas
agree without sharing state), and its later turns follow it there."""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

from ray.serve.request_router import (
    LocalityMixin,
    MultiplexMixin,
    PendingRequest,
    ReplicaID,
    RequestRouter,
    RunningReplica,
)

from deployments.routing.prefix_key import RouteKey, rendezvous_order

# Ongoing requests by which the preferred replica may exceed the least loaded one before a request
# goes to the less loaded of two instead (ROUTING_IMBALANCE sets it): past this the queue costs
# more than a cache hit saves.
IMBALANCE_THRESHOLD = 4
# Prefix hashes remembered (each maps to a replica id): ~100 bytes apiece.
MAX_REMEMBERED = 200_000
ROUTE_KEY_ARG = "route_key"


class PrefixOwners:
    """Which replica last served each prefix hash, least recently used forgotten first."""

    def __init__(self, capacity: int = MAX_REMEMBERED) -> None:
        self._owners: OrderedDict[int, str] = OrderedDict()
        self._capacity = capacity

    def get(self, prefix_hash: int) -> str | None:
        return self._owners.get(prefix_hash)

    def record(self, key: RouteKey, replica_id: str) -> None:
        """The replica that served `key`: its anchor and its blocks past the anchor's span."""
        owners = self._owners
        for prefix_hash in (key.anchor, *key.blocks[key.anchor_blocks:]):
            owners[prefix_hash] = replica_id
            owners.move_to_end(prefix_hash)
        while len(owners) > self._capacity:
            owners.popitem(last=False)

    def __len__(self) -> int:
        return len(self._owners)


def known_owner(key: RouteKey, owners: PrefixOwners, replica_ids: Sequence[str]) -> str | None:
    """Among `replica_ids`: the one that served the longest start of `key` past its anchor; else the
    anchor's (a conversation's earlier turn); None for a conversation never seen here."""
    present = set(replica_ids)
    for prefix_hash in (*reversed(key.blocks[key.anchor_blocks:]), key.anchor):  # the deepest first
        owner = owners.get(prefix_hash)
        if owner in present:
            return owner
    return None


def overloaded(preferred: str, queue_lengths: Mapping[str, int | None], threshold: int) -> bool:
    """Whether the preferred replica has `threshold` more ongoing requests than the least loaded
    (only replicas whose length is known count)."""
    mine = queue_lengths.get(preferred)
    known = [length for length in queue_lengths.values() if length is not None]
    return mine is not None and bool(known) and mine - min(known) > threshold


def _two_at_random(replicas: list[RunningReplica]) -> list[RunningReplica]:
    return random.sample(replicas, min(2, len(replicas)))


class PrefixAffinityRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    """Serve's router for the engine deployment with ROUTING=prefix (see the module docstring)."""

    def initialize_state(self, imbalance_threshold: int = IMBALANCE_THRESHOLD,
                         max_remembered: int = MAX_REMEMBERED, **_: Any) -> None:
        self._owners = PrefixOwners(max_remembered)
        self._imbalance_threshold = imbalance_threshold

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        candidates = candidate_replicas
        if pending_request is not None and pending_request.metadata.multiplexed_model_id:
            # A LoRA adapter: among the replicas that have it loaded (Serve's model multiplexing).
            holding = self.apply_multiplex_routing(pending_request=pending_request)
            candidates = [r for r in candidate_replicas if r.replica_id in holding] or candidate_replicas
        key = _route_key(pending_request)
        if key is None or len(candidates) < 2:
            return [_two_at_random(candidates)]
        by_id = {replica.replica_id.unique_id: replica for replica in candidates}
        chosen = known_owner(key, self._owners, list(by_id))
        if chosen is None:
            # A new conversation: the least loaded replica (Serve takes the lowest queue length in a
            # group, the first on a tie), in rendezvous order. By hashing alone, 4 concurrent new
            # conversations split 3:1 or 4:0 over 2 replicas with probability 5/8, and their turns queued.
            return [[by_id[rid] for rid in rendezvous_order(key.anchor, list(by_id))]]
        cache = self.replica_queue_len_cache
        if overloaded(chosen, {rid: cache.get(r.replica_id) for rid, r in by_id.items()}, self._imbalance_threshold):
            return [_two_at_random(candidates)]
        # The preferred replica first; when it is full (max_ongoing_requests), the less loaded of two others.
        return [[by_id[chosen]], _two_at_random([r for rid, r in by_id.items() if rid != chosen])]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        key = _route_key(pending_request)
        if key is not None:
            self._owners.record(key, replica_id.unique_id)


def _route_key(pending_request: PendingRequest | None) -> RouteKey | None:
    if pending_request is None:
        return None
    key = pending_request.kwargs.get(ROUTE_KEY_ARG)
    return key if key else None
