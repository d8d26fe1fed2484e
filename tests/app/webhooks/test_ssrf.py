"""The SSRF guard: which addresses a webhook may target, and which URLs it never calls."""

from __future__ import annotations

import ipaddress

import pytest

from app.webhooks import ssrf

LOOPBACK = ssrf.parse_networks(["127.0.0.0/8"])


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("169.254.169.254", "link-local"),  # the cloud metadata service
        ("fe80::1", "link-local"),
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("fd00::1", "private"),  # unique-local
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("100.64.0.1", "not global"),  # carrier-grade NAT
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped
        ("::ffff:10.1.2.3", "private"),
        ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 of 169.254.169.254
        ("2002:0a00:0001::1", "private"),  # 6to4 of 10.0.0.1
        ("8.8.8.8", None),
        ("2001:4860:4860::8888", None),
        ("::ffff:8.8.8.8", None),
    ],
)
def test_addresses_are_classified(address: str, reason: str | None) -> None:
    assert ssrf.blocked_reason(ipaddress.ip_address(address)) == reason


def test_allowed_networks_let_an_address_through_mapped_or_not() -> None:
    assert ssrf.allowed(ipaddress.ip_address("127.0.0.5"), LOOPBACK)
    assert ssrf.allowed(ipaddress.ip_address("::ffff:127.0.0.1"), LOOPBACK)
    assert not ssrf.allowed(ipaddress.ip_address("10.0.0.1"), LOOPBACK)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://example.com/", "http:// or https://"),
        ("file:///etc/passwd", "http:// or https://"),
        ("http://user:pw@example.com/", "credentials"),
        ("http:///path", "no host"),
        ("http://example.com:99999/", "malformed"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://10.0.0.1/", "private"),
        ("http://[::1]:8080/", "loopback"),
        ("http://localhost/", "loopback"),  # a name is judged by what it resolves to
        ("http://nonexistent.invalid/", "does not resolve"),
    ],
)
def test_urls_the_guard_refuses(url: str, message: str) -> None:
    with pytest.raises(ssrf.UnsafeWebhookUrl, match=message):
        ssrf.resolve(url, allowed_networks=[])


def test_an_allowed_target_resolves_to_the_address_checked_with_its_host_header() -> None:
    target = ssrf.resolve("http://localhost:8123/hooks?x=1", allowed_networks=LOOPBACK)
    assert target.address == ipaddress.ip_address("127.0.0.1")
    assert (target.host, target.port, target.host_header) == ("localhost", 8123, "localhost:8123")
    https = ssrf.resolve("https://127.0.0.1/", allowed_networks=LOOPBACK)
    assert (https.port, https.host_header) == (443, "127.0.0.1")
