"""Media URLs in requests (images, audio, video a multimodal model fetches) must not make the engine
a proxy into the cluster's own network (SSRF): by default a URL whose host is, or resolves to, a
loopback, link-local (169.254.169.254, cloud metadata), private or otherwise non-public address is
refused, and so is `file://` (unless vLLM's ALLOWED_LOCAL_MEDIA_PATH opens a folder). With
ALLOWED_MEDIA_DOMAINS set, exactly those host names are allowed, as vLLM checks them itself."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from deployments.ingress.errors import ClientError

# Keys whose string values are media URLs in vLLM's chat parts (image_url, audio_url, video_url, and
# their `url` objects), Responses input parts (input_image's image_url, input_file's file_url) and
# Anthropic's image sources (`source.url`).
URL_KEYS = frozenset({"url", "image_url", "audio_url", "video_url", "file_url"})
# Where a request carries its conversation.
CONVERSATION_FIELDS = ("messages", "input")

Resolver = Callable[[str], Awaitable[list[str]]]


@dataclass(frozen=True)
class MediaPolicy:
    allowed_domains: frozenset[str]  # empty: any public host
    allow_files: bool  # vLLM's ALLOWED_LOCAL_MEDIA_PATH is set


def media_urls(payload: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(param, url) for every media URL in a request's conversation."""

    def walk(value: Any, path: str) -> Iterator[tuple[str, str]]:
        if isinstance(value, dict):
            for key, item in value.items():
                where = f"{path}.{key}"
                if key in URL_KEYS and isinstance(item, str):
                    yield where, item
                elif isinstance(item, (dict, list)):
                    yield from walk(item, where)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, (dict, list)):
                    yield from walk(item, f"{path}[{i}]")

    for field in CONVERSATION_FIELDS:
        value = payload.get(field)
        if isinstance(value, list):
            yield from walk(value, field)


def is_public(address: str) -> bool:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


async def system_resolver(host: str) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return [info[4][0] for info in infos]


async def check_media_url(param: str, url: str, policy: MediaPolicy, resolve: Resolver = system_resolver) -> None:
    """Raises a 400 naming `param` for a URL the engine must not fetch."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme == "data" or (scheme == "" and not parts.netloc):
        return  # inline data (or not a URL at all: vLLM's own validation answers that)
    if scheme == "file":
        if policy.allow_files:
            return  # vLLM confines it to ALLOWED_LOCAL_MEDIA_PATH
        raise ClientError("file:// media URLs are not allowed (set vLLM's ALLOWED_LOCAL_MEDIA_PATH to allow a folder)",
                          param)
    if scheme not in ("http", "https"):
        raise ClientError(f"media URLs must be http(s) or data: URLs, got {scheme}://", param)
    host = (parts.hostname or "").rstrip(".").lower()
    if not host:
        raise ClientError("the media URL has no host", param)
    if policy.allowed_domains:
        if host not in policy.allowed_domains:
            raise ClientError(f"the media URL's host {host} is not in ALLOWED_MEDIA_DOMAINS", param)
        return
    try:
        addresses = [str(ipaddress.ip_address(host))]
    except ValueError:
        try:
            addresses = await resolve(host)
        except OSError:
            return  # unresolvable here: the engine's fetch fails the same way, with vLLM's error
    private = [address for address in addresses if not is_public(address)]
    if private:
        raise ClientError(
            f"the media URL's host {host} is a non-public address ({private[0]}): refused to keep the engine out of "
            "the cluster's own network; set ALLOWED_MEDIA_DOMAINS to allow named hosts",
            param,
        )


async def check_media(payload: dict[str, Any], policy: MediaPolicy, resolve: Resolver = system_resolver) -> None:
    for param, url in media_urls(payload):
        await check_media_url(param, url, policy, resolve)
