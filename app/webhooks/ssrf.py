"""Which webhook URLs may be called: the server-side request forgery guard.

A URL is checked at registration and again at every delivery (a name may resolve
elsewhere by then). Its host is resolved once, every address it resolves to must be
public, and the delivery connects to the address checked (dispatcher.py pins it), so a
name cannot resolve to a public address for the check and a private one for the call.
An operator lets private targets through with TRAINJOB_WEBHOOK_ALLOWED_NETWORKS.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from app.errors import InvalidRequest

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

NAT64 = ipaddress.ip_network("64:ff9b::/96")  # an IPv4 address in its last 32 bits


class UnsafeWebhookUrl(InvalidRequest):
    type = "webhook_url_refused"


@dataclass(frozen=True)
class Target:
    """Where a delivery goes: the URL's parts and the address checked."""

    scheme: str
    host: str  # as in the URL, without brackets: the Host header's and the SNI's name
    port: int
    address: IPAddress

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


def parse_networks(cidrs: Sequence[str]) -> list[IPNetwork]:
    return [ipaddress.ip_network(cidr, strict=False) for cidr in cidrs]


def blocked_reason(address: IPAddress) -> str | None:
    """Why a delivery may not go to `address` (None: it is a public address)."""
    if isinstance(address, ipaddress.IPv6Address):
        # An IPv4 address in IPv6 clothing is judged as the IPv4 address it is.
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return blocked_reason(embedded)
    checks = (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("reserved", address.is_reserved),
        ("private", address.is_private),
        # What is left and still not global: shared (100.64.0.0/10), documentation, ...
        ("not global", not address.is_global),
    )
    return next((name for name, hit in checks if hit), None)


def allowed(address: IPAddress, networks: Sequence[IPNetwork]) -> bool:
    mapped = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) else None
    return any(a in network for a in (address, mapped) if a for network in networks)


def check_url(url: str) -> tuple[str, str, int]:
    """The URL's scheme, host and port, or UnsafeWebhookUrl for a URL we never call."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as error:
        raise UnsafeWebhookUrl(f"the webhook URL is malformed: {error}") from None
    if parts.scheme not in ("http", "https"):
        raise UnsafeWebhookUrl("a webhook URL must be http:// or https://")
    if parts.username is not None or parts.password is not None:
        raise UnsafeWebhookUrl("a webhook URL may not carry credentials (user:password@)")
    if not parts.hostname:
        raise UnsafeWebhookUrl("the webhook URL has no host")
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80)


def resolve(url: str, *, allowed_networks: Sequence[IPNetwork]) -> Target:
    """The URL's target, resolved and checked: UnsafeWebhookUrl when its host does not
    resolve, or resolves to an address that is not public and not allowed."""
    scheme, host, port = check_url(url)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as error:
        raise UnsafeWebhookUrl(f"the webhook host {host!r} does not resolve: {error}") from None
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    for address in addresses:
        reason = blocked_reason(address)
        if reason is not None and not allowed(address, allowed_networks):
            raise UnsafeWebhookUrl(
                f"the webhook host {host!r} resolves to {address}, a {reason} address: "
                "refused (an operator may allow it with TRAINJOB_WEBHOOK_ALLOWED_NETWORKS)",
                address=str(address),
            )
    return Target(scheme, host, port, addresses[0])
