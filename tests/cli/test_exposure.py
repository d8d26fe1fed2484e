"""Which addresses `trainjob serve` may answer on while authentication is off."""

from __future__ import annotations

import pytest

from cli import exposure


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost"])
def test_loopback_addresses_are_this_machine_only(host: str) -> None:
    assert exposure.is_loopback(host)


@pytest.mark.parametrize(
    "host", ["0.0.0.0", "::", "", "192.0.2.10", "2001:db8::1", "no.such.host.invalid"]
)
def test_wildcards_other_addresses_and_unknown_names_are_not(host: str) -> None:
    assert not exposure.is_loopback(host)


def test_a_public_address_is_refused_only_while_authentication_is_off_by_default() -> None:
    refused = exposure.refusal("0.0.0.0", auth="auto", auth_on=False)
    assert refused is not None
    assert exposure.FIRST_KEY in refused and "TRAINJOB_AUTH=required" in refused
    assert exposure.refusal("0.0.0.0", auth="auto", auth_on=True) is None  # a key exists
    assert exposure.refusal("0.0.0.0", auth="required", auth_on=True) is None
    assert exposure.refusal("0.0.0.0", auth="off", auth_on=False) is None  # said explicitly
    assert exposure.refusal("127.0.0.1", auth="auto", auth_on=False) is None
