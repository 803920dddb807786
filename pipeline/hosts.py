"""Which host names a web server answers to (pure: no aiohttp, no Faust).

DNS rebinding: a web page on ``attacker.example`` re-points its own name at
127.0.0.1, and the browser then lets that page read whatever a local server
answers, because to the browser it is still ``attacker.example``. The browser
cannot hide the name: it is in the ``Host`` header of every request. So a server
that answers only to the names it is really reached by is out of reach.

The rules (:meth:`HostPolicy.refusal`):

- Loopback names are always served: ``localhost``, ``127.0.0.1``, ``[::1]``.
- A server that listens beyond loopback also serves any IP address literal
  (Kubernetes probes and Prometheus send the pod IP as ``Host``): rebinding needs
  a name the attacker controls, and an IP address is not one. Other names must
  be configured (``METERSTREAM_WEB_ALLOWED_HOSTS``): exact names, ``.example.com``
  for a domain and its subdomains, or ``*`` to turn the check off (behind a proxy
  that checks names itself). The name the server is bound to is served too.
- Names are compared case-insensitively, with one trailing dot removed
  (``LOCALHOST.`` is ``localhost``); IP literals by address. The port is not
  checked: a rebinding attack changes the name, never needs a port of its own,
  and tunnels and port forwards legitimately change the port.
- Every name a request claims must be served: the ``Host`` header (exactly one,
  well formed), the authority of an absolute-form request target
  (``POST http://attacker.example/v1/sql``), and each ``X-Forwarded-Host`` and
  ``Forwarded: host=`` value. None of them is used for anything else.
- A missing, empty, repeated or malformed ``Host`` is 400; a name not served is
  421 (Misdirected Request: "not an authoritative server for this name").
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
_AUTHORITY = re.compile(
    r"(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<name>[A-Za-z0-9._-]+))(?::(?P<port>[0-9]{1,5}))?"
)
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_SHOWN = 80  # characters of a refused name echoed back


@dataclass(frozen=True)
class Authority:
    """A parsed ``host[:port]``: ``host`` lowercased, without a trailing dot or brackets."""

    host: str
    port: int | None
    is_ip: bool


def _ip(text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def _name(text: str) -> str | None:
    """A DNS name, lowercased, one trailing dot removed; None if it is not one."""
    name = text.lower()
    name = name.removesuffix(".")
    if not name or len(name) > 253:
        return None
    if all(_LABEL.fullmatch(label) for label in name.split(".")):
        return name
    return None


@functools.lru_cache(maxsize=256)  # a server sees few distinct Host values
def parse_authority(value: str) -> Authority | None:
    """``Host``-header syntax (RFC 9110 §7.2): a name, IPv4 or ``[IPv6]``, an optional port."""
    match = _AUTHORITY.fullmatch(value.strip(" \t"))
    if match is None:
        return None
    port_text = match["port"]
    port = int(port_text) if port_text is not None else None
    if port is not None and port > 65535:
        return None
    if match["v6"] is not None:
        address = _ip(match["v6"])
        if address is None or ":" not in address:
            return None
        return Authority(address, port, True)
    raw = match["name"]
    if re.fullmatch(r"[0-9.]+", raw):  # digits and dots: an IPv4 address or nothing
        address = _ip(raw)
        return Authority(address, port, True) if address is not None else None
    name = _name(raw)
    return Authority(name, port, False) if name is not None else None


def parse_allowed(entries: Iterable[str]) -> tuple[list[str], list[str]]:
    """Operator entries -> (normalized entries, problems). An entry is a name, an IP
    address (IPv6 with or without brackets), ``.domain`` (it and its subdomains) or ``*``."""
    good: list[str] = []
    problems: list[str] = []
    for raw in entries:
        entry = raw.strip()
        if not entry:
            continue
        if entry == "*":
            good.append("*")
            continue
        address = _ip(entry.removeprefix("[").removesuffix("]"))
        if address is not None:
            good.append(address)
            continue
        suffix = entry.startswith(".")
        name = _name(entry[1:] if suffix else entry)
        if name is None or (suffix and "." not in name):
            problems.append(
                f"{entry!r}: not a host name, IP address, .domain or * "
                "(names only: the port is not checked)"
            )
            continue
        good.append("." + name if suffix else name)
    return good, problems


def split_list(text: str) -> list[str]:
    """A comma- or whitespace-separated setting."""
    return [part for part in re.split(r"[,\s]+", text) if part]


def is_loopback(host: str) -> bool:
    """Whether a bind address or name is loopback only (127.0.0.0/8, ::1, localhost)."""
    name = host.strip().lower().removeprefix("[").removesuffix("]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Refusal:
    status: int  # 400 or 421
    error: str


@dataclass(frozen=True)
class HostPolicy:
    """The names a server answers to; see the module docstring for the rules."""

    names: frozenset[str]
    suffixes: tuple[str, ...] = ()
    any_ip: bool = False
    any_host: bool = False
    hint: str = "METERSTREAM_WEB_ALLOWED_HOSTS"

    @classmethod
    def for_server(
        cls,
        bind_host: str,
        allowed: Iterable[str] = (),
        hint: str = "METERSTREAM_WEB_ALLOWED_HOSTS",
    ) -> HostPolicy:
        """The policy of a server bound to ``bind_host`` (raises ValueError on a bad entry)."""
        entries, problems = parse_allowed(allowed)
        if problems:
            raise ValueError("; ".join(problems))
        names = set(LOOPBACK_HOSTS)
        names.update(e for e in entries if not e.startswith(".") and e != "*")
        bound = parse_authority(bind_host) or parse_authority(f"[{bind_host}]")
        if bound is not None and bound.host not in ("0.0.0.0", "::"):
            names.add(bound.host)
        return cls(
            names=frozenset(names),
            suffixes=tuple(e for e in entries if e.startswith(".")),
            any_ip=not is_loopback(bind_host),
            any_host="*" in entries,
            hint=hint,
        )

    def serves(self, authority: Authority) -> bool:
        if self.any_host or authority.host in self.names:
            return True
        if authority.is_ip:
            return self.any_ip
        return any(authority.host == s[1:] or authority.host.endswith(s) for s in self.suffixes)

    def _claim(self, value: str, what: str) -> Refusal | None:
        authority = parse_authority(value)
        shown = value[:_SHOWN]
        if authority is None:
            return Refusal(400, f"malformed {what}: {shown!r}")
        if not self.serves(authority):
            return Refusal(
                421,
                f"this server does not answer to {authority.host[:_SHOWN]!r} ({what}); "
                f"names it answers to besides loopback are set by {self.hint}",
            )
        return None

    def refusal(
        self,
        host_headers: Sequence[str],
        target_authority: str | None = None,
        forwarded_hosts: Sequence[str] = (),
    ) -> Refusal | None:
        """None when every name the request claims is served, else why not."""
        if self.any_host:
            return None
        if not host_headers or not host_headers[0].strip():
            return Refusal(400, "a Host header is required")
        if len(host_headers) > 1:
            return Refusal(400, "more than one Host header")
        claims = [(host_headers[0], "Host header")]
        if target_authority is not None:
            claims.append((target_authority, "request target"))
        claims.extend((value, "forwarded host") for value in forwarded_hosts)
        for value, what in claims:
            refused = self._claim(value, what)
            if refused is not None:
                return refused
        return None
