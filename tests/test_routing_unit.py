"""ROUTING=prefix's pure parts: the prefix key the ingress computes from a body, and the choice the
request router makes from it (the end-to-end proof, on two real engine replicas, is in
tests/test_guarded.py)."""

from __future__ import annotations

from collections import Counter

from configs.loader import load_settings
from configs.placement import PREFIX_ROUTER_CLASS, engine_deployment_options
from configs.settings import Accelerator
from deployments.routing.prefix_key import (
    BLOCK_CHARS,
    MAX_BLOCKS,
    prefix_route_key,
    rendezvous_choice,
    rendezvous_order,
    session_key,
)
from deployments.routing.prefix_router import PrefixOwners, known_owner, overloaded

SYSTEM = {"role": "system", "content": "You are a terse assistant. " * 20}


def chat(*turns: str) -> dict:
    roles = ["user", "assistant"]
    return {"model": "m", "messages": [SYSTEM, *({"role": roles[i % 2], "content": t} for i, t in enumerate(turns))]}


def chat_text(question: str) -> str:
    """The text the key hashes: each message as sorted JSON, joined."""
    import json

    return "\x1e".join(json.dumps(m, sort_keys=True, separators=(",", ":"))
                        for m in chat(question)["messages"])


def test_every_turn_of_a_conversation_keeps_its_anchor_and_extends_its_chain():
    first = prefix_route_key(chat("What is a fox?"))
    second = prefix_route_key(chat("What is a fox?", "A small canid.", "And a wolf?"))
    assert first is not None and second is not None
    assert first.anchor == second.anchor  # the system prompt and the first user message
    assert first.anchor_blocks == second.anchor_blocks == -(-len(first_text := chat_text("What is a fox?"))
                                                             // BLOCK_CHARS)
    assert second.blocks[:len(first.blocks)] == first.blocks  # the earlier turn's blocks start the later's
    assert len(second.blocks) > len(first.blocks) == len(first_text) // BLOCK_CHARS
    # Another conversation on the same system prompt: its own anchor, the shared blocks' hashes.
    other = prefix_route_key(chat("What is a bear?"))
    assert other.anchor != first.anchor
    shared_blocks = len(chat_text("")) // BLOCK_CHARS - 1
    assert other.blocks[:shared_blocks] == first.blocks[:shared_blocks]


def test_keys_are_stable_across_processes_and_field_order():
    a = prefix_route_key({"model": "m", "messages": [{"role": "user", "content": "hi", "name": "x"}]})
    b = prefix_route_key({"messages": [{"name": "x", "content": "hi", "role": "user"}], "model": "m"})
    assert a == b
    # blake2b, not Python's per-process hash: a fixed value.
    assert session_key("abc") == (10437949568892156155, 0, ())


def test_plain_prompts_responses_and_anthropic_bodies_have_keys():
    long_prompt = "lorem ipsum " * 100
    key = prefix_route_key({"model": "m", "prompt": long_prompt})
    assert key is not None and len(key.blocks) == len(long_prompt) // BLOCK_CHARS and key.anchor_blocks == 1
    assert prefix_route_key({"model": "m", "prompt": [long_prompt, "other"]}) == key  # a batch: its first
    assert prefix_route_key({"model": "m", "prompt": [1, 2, 3]}) is not None  # token ids
    assert prefix_route_key({"model": "m", "input": "hello"}) is not None  # Responses, a string
    turn = [{"role": "user", "content": "x"}]
    responses = prefix_route_key({"model": "m", "instructions": "be brief", "input": turn})
    anthropic = prefix_route_key({"model": "m", "system": "be brief", "messages": turn})
    assert responses is not None and anthropic is not None
    # Nothing to route by: no preference (Serve's default choice).
    assert prefix_route_key({"model": "m"}) is None
    assert prefix_route_key([1, 2]) is None and prefix_route_key(None) is None


def test_a_session_id_replaces_the_anchor_and_pins_different_prompts_together():
    one = prefix_route_key(chat("What is a fox?"), "session-1")
    two = prefix_route_key({"model": "m", "prompt": "unrelated"}, "session-1")
    assert one.anchor == two.anchor == session_key("session-1").anchor
    assert prefix_route_key({"model": "m"}, "session-1") == session_key("session-1")


def test_a_huge_prompt_costs_at_most_max_blocks_hashes():
    key = prefix_route_key({"model": "m", "prompt": "x" * (BLOCK_CHARS * (MAX_BLOCKS + 50))})
    assert len(key.blocks) == MAX_BLOCKS


def test_rendezvous_spreads_anchors_and_moves_only_a_leaving_replicas_share():
    replicas = ["r1", "r2", "r3"]
    anchors = [prefix_route_key({"prompt": f"conversation {i}"}).anchor for i in range(600)]
    placed = {a: rendezvous_choice(a, replicas) for a in anchors}
    counts = Counter(placed.values())
    assert set(counts) == set(replicas) and min(counts.values()) > 120  # ~200 each
    after = {a: rendezvous_choice(a, ["r1", "r3"]) for a in anchors}
    assert all(after[a] == placed[a] for a in anchors if placed[a] != "r2")


def test_the_deepest_known_block_past_the_anchor_wins_then_the_anchors_owner():
    owners = PrefixOwners()
    first = prefix_route_key(chat("What is a fox?"))
    later = prefix_route_key(chat("What is a fox?", "A small canid. " * 20, "And a wolf?"))
    owners.record(first, "r2")
    assert known_owner(later, owners, ["r1", "r2"]) == "r2"  # its anchor's replica
    # The owner gone: nothing known among the others (the least loaded takes it).
    assert known_owner(later, owners, ["r1", "r3"]) is None
    # A conversation on the same system prompt, served by r1, doesn't pull this one there.
    owners.record(prefix_route_key(chat("What is a bear?")), "r1")
    assert known_owner(later, owners, ["r1", "r2"]) == "r2"
    # A new conversation is not pulled to the system prompt's last server either.
    assert known_owner(prefix_route_key(chat("What is an owl?")), owners, ["r1", "r2"]) is None
    # Past the anchor, the deepest block's server wins (its cache holds the most of the prompt).
    owners.record(later, "r1")
    longer = prefix_route_key(chat("What is a fox?", "A small canid. " * 20, "And a wolf?", "A canid.", "Why?"))
    assert known_owner(longer, owners, ["r1", "r2"]) == "r1"


def test_rendezvous_order_is_a_stable_permutation_led_by_the_choice():
    replicas = [f"r{i}" for i in range(5)]
    for anchor in range(50):
        order = rendezvous_order(anchor, replicas)
        assert sorted(order) == replicas and order[0] == rendezvous_choice(anchor, replicas)
        assert rendezvous_order(anchor, list(reversed(replicas))) == order


def test_prefix_owners_remember_the_anchor_and_the_blocks_past_it_and_forget_the_oldest():
    from deployments.routing.prefix_key import RouteKey

    owners = PrefixOwners(capacity=4)
    owners.record(RouteKey(1, 1, (10, 11, 12)), "a")  # block 10 is within the anchor's span
    assert owners.get(10) is None and owners.get(1) == owners.get(11) == owners.get(12) == "a"
    owners.record(RouteKey(2, 0, (20,)), "b")  # 1 (the oldest) is forgotten
    assert len(owners) == 4 and owners.get(1) is None and owners.get(2) == owners.get(20) == "b"


def test_overloaded_compares_known_queue_lengths():
    assert overloaded("a", {"a": 30, "b": 2}, 16)
    assert not overloaded("a", {"a": 18, "b": 2}, 16)
    assert not overloaded("a", {"a": None, "b": 2}, 16)  # unknown: Serve probes it
    assert not overloaded("a", {"a": 30}, 16)  # alone: nothing to compare with
    assert not overloaded("a", {"a": 30, "b": None}, 16)


def _engine_options(**settings) -> dict:
    return engine_deployment_options(load_settings(environ={}, args={"MODEL_NAME": "m", **settings}),
                                     Accelerator.GPU)


def test_prefix_routing_is_the_default_with_several_replicas_and_pow2_is_serves_own():
    assert _engine_options(NUM_REPLICAS=2)["request_router_config"] == {
        "request_router_class": PREFIX_ROUTER_CLASS, "request_router_kwargs": {"imbalance_threshold": 4}}
    assert _engine_options(NUM_REPLICAS=2, ROUTING_IMBALANCE=32)["request_router_config"][
        "request_router_kwargs"] == {"imbalance_threshold": 32}
    assert _engine_options(MIN_REPLICAS=1, MAX_REPLICAS=4)["request_router_config"]["request_router_class"]
    assert "request_router_config" not in _engine_options(NUM_REPLICAS=1)
    assert "request_router_config" not in _engine_options(NUM_REPLICAS=2, ROUTING="pow2")
    module, _, name = PREFIX_ROUTER_CLASS.partition(":")
    import importlib

    assert getattr(importlib.import_module(module), name).__name__ == name
