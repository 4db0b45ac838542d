"""Which receiver URLs we may call.

A receiver may be on the public internet, a private network or this host (a self-hosted
gateway often talks to the vendor's own services). It may never be link-local or a cloud
metadata service, whose answers hold credentials, unless `CREDITGATE_WEBHOOKS_ALLOW_PRIVATE=1`.
The rule is checked on the URL as written, on what its host resolves to when an endpoint is
saved, and again on every new connection (app/webhooks/net.py), so a DNS record changed later
cannot point a delivery at a forbidden address.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Iterable

import httpx

MAX_URL_LENGTH = 2048
RESOLVE_TIMEOUT_S = 2.0
METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata.goog"})
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254",  # AWS, GCP, Azure, OpenStack, ...
    "fd00:ec2::254",  # AWS over IPv6
    "100.100.100.200",  # Alibaba Cloud
))
LINK_LOCAL = (ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10"))
NAT64 = ipaddress.ip_network("64:ff9b::/96")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class ForbiddenAddress(ValueError):
    pass


def parse_url(raw: str) -> httpx.URL:
    """The URL if its shape is acceptable (http or https with a host), else ValueError."""
    if len(raw) > MAX_URL_LENGTH:
        raise ValueError(f"is longer than {MAX_URL_LENGTH} characters")
    if raw != raw.strip() or any(c.isspace() for c in raw):
        raise ValueError("may not contain whitespace")
    try:
        url = httpx.URL(raw)
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise ValueError(f"is not a valid URL: {exc}") from exc
    if url.scheme not in ("http", "https"):
        raise ValueError("must be an http:// or https:// URL")
    if not url.host:
        raise ValueError("has no host")
    if url.port is not None and not 0 < url.port < 65536:
        raise ValueError("has a port outside 1-65535")
    return url


def _embedded_v4(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip in NAT64:
            return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip


def address_problem(raw_ip: str) -> str | None:
    """Why we may not connect to this address, or None when we may."""
    try:
        ip: IPAddress = _embedded_v4(ipaddress.ip_address(raw_ip.split("%", 1)[0]))
    except ValueError:
        return f"{raw_ip!r} is not an IP address"
    if ip in METADATA_ADDRESSES:
        return f"{ip} is a cloud metadata address"
    if any(ip in net for net in LINK_LOCAL):
        return f"{ip} is a link-local address"
    return None


def host_problem(host: str) -> str | None:
    """Why the host as written is refused (a metadata name or a forbidden IP literal)."""
    name = host.lower().rstrip(".")
    if name in METADATA_HOSTS:
        return f"{name} is a cloud metadata host"
    try:
        ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        return None
    return address_problem(name)


async def resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def first_problem(addresses: Iterable[str]) -> str | None:
    return next(filter(None, map(address_problem, addresses)), None)


async def url_problem(url: httpx.URL) -> str | None:
    """Why deliveries to this URL would be refused, judged now; an unresolvable host passes
    (its DNS may not exist yet; each connection is checked again)."""
    host = url.raw_host.decode("ascii")
    found = host_problem(host)
    if found:
        return found
    try:
        async with asyncio.timeout(RESOLVE_TIMEOUT_S):
            addresses = await resolve(host, url.port or (443 if url.scheme == "https" else 80))
    except (OSError, TimeoutError, UnicodeError):
        return None
    problem = first_problem(addresses)
    return f"{host} resolves to {problem}" if problem else None
