"""The ingress's media-URL guard (SSRF): which URLs an engine may be asked to fetch. Pure; the
resolver is a table (the real app's test uses the system's)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from deployments.ingress.errors import ClientError
from deployments.ingress.media_guard import MediaPolicy, check_media, is_public, media_urls

OPEN = MediaPolicy(frozenset(), allow_files=False)
NAMES = {"localhost": ["127.0.0.1", "::1"], "images.example.com": ["93.184.216.34"],
         "sneaky.example.com": ["93.184.216.34", "10.1.2.3"], "metadata.internal": ["169.254.169.254"]}


async def resolve(host: str) -> list[str]:
    if host not in NAMES:
        raise OSError("no such host")
    return NAMES[host]


def chat(*urls: str, kind: str = "image_url") -> dict[str, Any]:
    parts: list[Any] = [{"type": "text", "text": "what is this?"}]
    parts += [{"type": kind, kind: {"url": url}} for url in urls]
    return {"messages": [{"role": "user", "content": parts}]}


def refusal(payload: dict[str, Any], policy: MediaPolicy = OPEN) -> ClientError:
    with pytest.raises(ClientError) as info:
        asyncio.run(check_media(payload, policy, resolve))
    return info.value


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/cat.png", "http://127.0.0.2:8080/cat.png", "http://localhost/cat.png",
    "http://169.254.169.254/latest/meta-data/", "http://metadata.internal/", "http://10.0.0.5/x.png",
    "http://192.168.1.1/x.png", "http://172.16.0.1/x.png", "http://[::1]/x.png", "http://[fd00::1]/x.png",
    "http://[::ffff:127.0.0.1]/x.png", "http://0.0.0.0/x.png", "http://sneaky.example.com/x.png",
    "file:///etc/passwd", "ftp://images.example.com/x.png", "gopher://127.0.0.1:25/",
])
def test_non_public_hosts_files_and_other_schemes_are_refused(url: str):
    error = refusal(chat(url))
    assert error.param == "messages[0].content[1].image_url.url"


@pytest.mark.parametrize("url", [
    "https://images.example.com/cat.png", "http://93.184.216.34/cat.png",
    "data:image/png;base64,iVBORw0KGgo=", "https://unresolvable.example/cat.png",
])
def test_public_and_inline_media_pass(url: str):
    asyncio.run(check_media(chat(url), OPEN, resolve))


def test_every_kind_of_media_part_is_checked():
    for kind in ("image_url", "audio_url", "video_url"):
        assert refusal(chat("http://127.0.0.1/a", kind=kind)).param == f"messages[0].content[1].{kind}.url"
    responses = {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://10.0.0.1/a"}]}]}
    assert refusal(responses).param == "input[0].content[0].image_url"
    anthropic = {"messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": "http://169.254.169.254/"}}]}]}
    assert refusal(anthropic).param == "messages[0].content[0].source.url"


def test_the_allow_list_opens_exactly_its_hosts():
    policy = MediaPolicy(frozenset({"127.0.0.2", "images.example.com"}), allow_files=False)
    asyncio.run(check_media(chat("http://127.0.0.2:8080/cat.png", "https://images.example.com/x"), policy, resolve))
    assert "ALLOWED_MEDIA_DOMAINS" in str(refusal(chat("https://other.example.com/x"), policy))
    assert refusal(chat("http://127.0.0.1/x"), policy).param.endswith("image_url.url")


def test_files_pass_only_where_vllm_confines_them():
    asyncio.run(check_media(chat("file:///models/media/cat.png"), MediaPolicy(frozenset(), allow_files=True), resolve))


def test_text_only_requests_have_no_media():
    assert list(media_urls({"messages": [{"role": "user", "content": "hi"}], "prompt": "http://127.0.0.1"})) == []


@pytest.mark.parametrize(("address", "public"), [
    ("8.8.8.8", True), ("127.0.0.1", False), ("169.254.169.254", False), ("10.0.0.1", False),
    ("100.64.0.1", False), ("::1", False), ("2606:4700::1111", True), ("::ffff:10.0.0.1", False), ("224.0.0.1", False),
])
def test_is_public(address: str, public: bool):
    assert is_public(address) is public
