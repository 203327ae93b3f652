"""A request's prefix key, for routing by prompt prefix (deployments.routing.prefix_router). Pure.

The ingress has the request's JSON parsed already; it reduces the prompt to a short tuple of
integers the engine handle's request router reads, so the router never parses a body:

- the *anchor*: the conversation's opening (its messages up to the first user message, or the
  first block of a plain prompt). Every turn of a conversation has the same anchor, so turns go
  to one replica even before the router has seen any of them; `X-Session-Id` replaces it (a
  conversation pinned by the client). A new anchor goes where rendezvous hashing puts it, which
  spreads conversations evenly.
- the *blocks*: a chain of hashes of the prompt's successive BLOCK_CHARS-character blocks, each
  hash covering everything before it (as vLLM's prefix cache chains its token blocks). Two prompts
  that share their first k blocks share their first k hashes. Only blocks past the anchor's span
  route (`anchor_blocks`): within it, the anchor decides, so a system prompt every conversation
  shares doesn't pull them all to the replica that served it last.

The text is each message as sorted JSON, so a later turn's text starts with an earlier turn's.
Hashes are blake2b (not Python's `hash`, which differs per process): every ingress replica maps a
prompt to the same key, and so to the same replica.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, NamedTuple

BLOCK_CHARS = 128
# Only the first MAX_BLOCKS blocks count (~32k characters): past that, the choice is made, and a
# huge prompt must not cost the ingress a hash per block.
MAX_BLOCKS = 256
# An anchor longer than this is cut (a first message holding a whole document).
MAX_ANCHOR_CHARS = 4096



class RouteKey(NamedTuple):
    anchor: int
    anchor_blocks: int  # blocks the anchor spans: the first block that routes is this one
    blocks: tuple[int, ...]


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=8).digest()


def _as_int(digest: bytes) -> int:
    return int.from_bytes(digest, "big")


def _canonical(item: Any) -> str:
    return item if isinstance(item, str) else json.dumps(item, sort_keys=True, ensure_ascii=False,
                                                         separators=(",", ":"))


def _prompt_parts(payload: dict[str, Any]) -> tuple[list[str], int] | None:
    """The prompt as successive texts, and how many of them make the anchor."""
    head = [_canonical(payload[name]) for name in ("system", "instructions") if payload.get(name)]
    turns = payload.get("messages")
    if turns is None and isinstance(payload.get("input"), list):
        turns = payload["input"]  # the Responses API's items, shaped like messages
    if isinstance(turns, list) and turns:
        parts = head + [_canonical(turn) for turn in turns]
        first_user = next((i for i, turn in enumerate(turns)
                           if isinstance(turn, dict) and turn.get("role") == "user"), 0)
        return parts, len(head) + first_user + 1
    prompt = payload.get("prompt", payload.get("input"))
    if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
        prompt = prompt[0]  # a batch of prompts: the first one's replica serves them all
    if isinstance(prompt, str | list) and prompt:
        return head + [_canonical(prompt)], 0
    return None


def prefix_route_key(payload: Any, session_id: str | None = None) -> RouteKey | None:
    """The key of a request body (None when it has neither a prompt nor a session: no preference,
    Serve's default choice)."""
    if not isinstance(payload, dict):
        return None
    found = _prompt_parts(payload)
    if found is None:
        return session_key(session_id) if session_id else None
    parts, anchor_parts = found
    text = "\x1e".join(parts).encode()
    anchor = "\x1e".join(parts[:anchor_parts]).encode() if anchor_parts else text[:BLOCK_CHARS]
    anchor_hash = session_key(session_id).anchor if session_id else _as_int(
        _digest(b"anchor\x00" + anchor[:MAX_ANCHOR_CHARS]))
    blocks = []
    chained = b""
    for start in range(0, min(len(text) // BLOCK_CHARS, MAX_BLOCKS) * BLOCK_CHARS, BLOCK_CHARS):
        chained = _digest(chained + text[start:start + BLOCK_CHARS])
        blocks.append(_as_int(chained))
    return RouteKey(anchor_hash, -(-len(anchor) // BLOCK_CHARS), tuple(blocks))


def session_key(session_id: str) -> RouteKey:
    """A key of the session alone: the same replica for every request that names it."""
    return RouteKey(_as_int(_digest(b"session\x00" + session_id.encode())), 0, ())


def rendezvous_order(anchor: int, replica_ids: list[str]) -> list[str]:
    """The replicas by the highest hash(anchor, id) first (rendezvous hashing): every ingress replica
    computes the same order, and a replica that leaves or joins moves only its own share of anchors."""
    prefix = anchor.to_bytes(8, "big")
    return sorted(replica_ids, key=lambda replica_id: _digest(prefix + replica_id.encode()), reverse=True)


def rendezvous_choice(anchor: int, replica_ids: list[str]) -> str:
    """The replica an anchor belongs to when nothing else says: the first of its rendezvous order."""
    return rendezvous_order(anchor, replica_ids)[0]
