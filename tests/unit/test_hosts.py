"""The Host check's rules (pipeline/hosts.py), spelling by spelling, without a server."""

from __future__ import annotations

import pytest

from meterstream.errors import ConfigError
from meterstream.hosts import HostPolicy, is_loopback, parse_allowed, parse_authority
from meterstream.settings import load_settings

LOOPBACK = HostPolicy.for_server("127.0.0.1")
NETWORK = HostPolicy.for_server("0.0.0.0", ["metering.example.com", ".svc.cluster.local"])

SERVED_ON_LOOPBACK = [
    "127.0.0.1:6066",
    "127.0.0.1",
    "localhost:6066",
    "localhost",
    "LOCALHOST:6066",
    "LocalHost",
    "localhost.:6066",  # the same name, absolute
    "[::1]:6066",
    "[::1]",
    "[0:0:0:0:0:0:0:1]:6066",  # the same address
    "localhost:1",  # the port is not checked (tunnels, port forwards)
]
REFUSED_NAMES = [
    "attacker.example",
    "attacker.example:6066",
    "ATTACKER.EXAMPLE:6066",
    "attacker.example.:6066",
    "localhost.attacker.example",
    "localhost.attacker.example:6066",
    "127.0.0.1.nip.io:6066",
    "127.0.0.1.attacker.example",
    "localhostattacker.example",
    "xn--localhost-xyz.example",
]
MALFORMED = [
    "",
    " ",
    "127.0.0.1:6066@attacker.example",
    "attacker.example@127.0.0.1",
    "127.0.0.1 attacker.example",
    "127.0.0.1,attacker.example",
    "127.0.0.1:6066/x",
    "localhost:http",
    "localhost:99999",
    "127.1",  # shorthand IPv4: not an address a client sends
    "2130706433",  # 127.0.0.1 as one number
    "[::1",
    "::1",  # IPv6 without brackets
    "[attacker.example]",
    "local\x00host",
    "localhost..",
    "a" * 300,
]


@pytest.mark.parametrize("host", SERVED_ON_LOOPBACK)
def test_loopback_names_are_served(host: str) -> None:
    assert LOOPBACK.refusal([host]) is None


@pytest.mark.parametrize("host", REFUSED_NAMES)
def test_other_names_are_misdirected(host: str) -> None:
    refused = LOOPBACK.refusal([host])
    assert refused is not None and refused.status == 421
    assert "METERSTREAM_WEB_ALLOWED_HOSTS" in refused.error


@pytest.mark.parametrize("host", MALFORMED)
def test_malformed_host_is_400(host: str) -> None:
    refused = LOOPBACK.refusal([host])
    assert refused is not None and refused.status == 400


def test_ip_literals_other_than_loopback_are_refused_on_loopback() -> None:
    for host in ("0.0.0.0:6066", "10.0.0.5:6066", "127.0.0.2:6066", "[::ffff:127.0.0.1]:6066"):
        refused = LOOPBACK.refusal([host])
        assert refused is not None and refused.status == 421, host


def test_absent_or_repeated_host_is_400() -> None:
    assert LOOPBACK.refusal([]) == LOOPBACK.refusal([""])
    refused = LOOPBACK.refusal([])
    assert refused is not None and refused.status == 400 and "required" in refused.error
    both = LOOPBACK.refusal(["127.0.0.1:6066", "attacker.example"])
    assert both is not None and both.status == 400
    same = LOOPBACK.refusal(["127.0.0.1:6066", "127.0.0.1:6066"])
    assert same is not None and same.status == 400


def test_every_claimed_name_must_be_served() -> None:
    # absolute-form target: its authority counts, whatever the Host header says
    refused = LOOPBACK.refusal(["127.0.0.1:6066"], target_authority="attacker.example:6066")
    assert refused is not None and refused.status == 421
    assert LOOPBACK.refusal(["127.0.0.1:6066"], target_authority="localhost:6066") is None
    # a forwarded name cannot widen the check, nor smuggle another name in
    for forwarded in (["attacker.example"], ["localhost", "attacker.example"], ["evil:80"]):
        refused = LOOPBACK.refusal(["127.0.0.1:6066"], forwarded_hosts=forwarded)
        assert refused is not None and refused.status == 421, forwarded
    refused = LOOPBACK.refusal(["attacker.example"], forwarded_hosts=["127.0.0.1"])
    assert refused is not None and refused.status == 421
    assert LOOPBACK.refusal(["127.0.0.1:6066"], forwarded_hosts=["localhost"]) is None


def test_network_server_serves_ip_literals_and_configured_names_only() -> None:
    for host in (
        "10.1.2.3:6066",  # a Kubernetes probe: the pod IP
        "[fd00::5]:6066",
        "localhost:6066",
        "metering.example.com",
        "METERING.EXAMPLE.COM.:443",
        "meterstream.metering.svc.cluster.local:6066",
        "svc.cluster.local",
    ):
        assert NETWORK.refusal([host]) is None, host
    for host in (
        "attacker.example",
        "metering.example.com.attacker.example",
        "evilsvc.cluster.local",
        "xmetering.example.com",
    ):
        refused = NETWORK.refusal([host])
        assert refused is not None and refused.status == 421, host


def test_a_named_bind_host_is_served_and_star_turns_the_check_off() -> None:
    named = HostPolicy.for_server("worker.internal")
    assert named.refusal(["worker.internal:6066"]) is None
    assert named.refusal(["10.0.0.1:6066"]) is None  # beyond loopback: IP literals
    anything = HostPolicy.for_server("0.0.0.0", ["*"])
    assert anything.refusal(["attacker.example"]) is None


def test_allowed_hosts_entries_are_checked_at_start() -> None:
    good, problems = parse_allowed(["a.example", "[::1]", "10.0.0.1", ".corp.example", "*"])
    assert good == ["a.example", "::1", "10.0.0.1", ".corp.example", "*"] and not problems
    _, problems = parse_allowed(["a.example:443", "http://x", ".com", "bad name"])
    assert len(problems) == 4
    with pytest.raises(ConfigError) as info:
        load_settings(web_allowed_hosts="ok.example, a.example:443")
    assert "METERSTREAM_WEB_ALLOWED_HOSTS" in str(info.value)
    assert load_settings(web_allowed_hosts="a.example, b.example").allowed_hosts == [
        "a.example",
        "b.example",
    ]


def test_parse_authority_normalizes() -> None:
    assert parse_authority("LOCALHOST.:80") == parse_authority("localhost:80")
    parsed = parse_authority("[0::1]:6066")
    assert parsed is not None and parsed.host == "::1" and parsed.port == 6066 and parsed.is_ip


def test_is_loopback() -> None:
    assert all(is_loopback(h) for h in ("127.0.0.1", "::1", "localhost", "127.0.0.2", "[::1]"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "example.com"))
