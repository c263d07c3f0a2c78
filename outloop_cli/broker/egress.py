"""Where a proxied connection may go: intercepted for a credential's host, tunnelled for an `egress` host, or refused.

Pure: the profile's lists are parsed once into an `EgressPolicy`, and each CONNECT target is judged by `decide`.
No I/O: `profiles.py` uses it to validate `[run] egress` too.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_TLS_PORT = 443
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_PORT = re.compile(r"[0-9]{1,5}")


class EgressError(ValueError):
    """An `egress` entry or a CONNECT target that is not a plain host[:port]."""


@dataclass(frozen=True)
class Authority:
    """A connection target as the proxy judges it: lower-case host (no brackets), port, and whether it is an IP."""

    host: str
    port: int
    is_ip: bool

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_host(host: str) -> tuple[str, bool]:
    """(canonical host, is an IP literal). Names are ASCII (IDNA already applied by the client), lower-cased;
    anything else (a trailing dot, `_`, `%`, an empty label) is refused rather than guessed at."""
    if host.startswith("[") and host.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(host[1:-1])), True
        except ValueError:
            raise EgressError(f"{host!r} is not an IPv6 address") from None
    try:
        return str(ipaddress.IPv4Address(host)), True
    except ValueError:
        pass
    lowered = host.lower()
    if len(lowered) > 253 or not _HOSTNAME.fullmatch(lowered):
        raise EgressError(f"{host!r} is not a host name")
    return lowered, False


def parse_port(text: str) -> int:
    if not _PORT.fullmatch(text) or not 0 < int(text) < 65536:
        raise EgressError(f"{text!r} is not a port number")
    return int(text)


def parse_authority(text: str) -> Authority:
    """The target of `CONNECT host:port` (RFC 9110 authority-form: the port is required)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise EgressError(f"{text!r}: expected host:port")
    if ":" in host and not host.startswith("["):
        raise EgressError(f"{text!r}: an IPv6 address goes in brackets")
    name, is_ip = parse_host(host)
    return Authority(name, parse_port(port), is_ip)


def parse_absolute_http(raw: str) -> tuple[str, int | None, str, str] | None:
    """(host, port or None, raw path, "?query" or "") of an absolute-form `http://` request target, or None.

    User info is refused: `http://allowed@other/` reads as two different hosts to two different parsers.
    """
    if raw[:7].lower() != "http://":
        return None
    authority, slash, rest = raw[7:].partition("/")
    path, mark, query = ("/" + rest if slash else "/").partition("?")
    if "@" in authority or "#" in path:
        return None
    port: int | None = None
    host = authority
    if not authority.endswith("]") and ":" in authority.rpartition("]")[2]:
        host, _, port_text = authority.rpartition(":")
        try:
            port = parse_port(port_text)
        except EgressError:
            return None
    try:
        name, _ = parse_host(host)
    except EgressError:
        return None
    return name, port, path, mark + query


@dataclass(frozen=True)
class EgressRule:
    """One `[run] egress` entry: `host`, `host:port` or `*.domain[:port]`; no port means 443."""

    text: str
    host: str  # for a wildcard, the domain after "*."
    port: int
    wildcard: bool

    def matches(self, target: Authority) -> bool:
        if target.port != self.port:
            return False
        if self.wildcard:
            return not target.is_ip and target.host.endswith("." + self.host)
        return target.host == self.host


def parse_egress_rule(text: str) -> EgressRule:
    wildcard = text.startswith("*.")
    rest = text[2:] if wildcard else text
    if rest.startswith("["):
        host, _, tail = rest.partition("]")
        host += "]"
        port_text = tail[1:] if tail.startswith(":") else None
        if tail and port_text is None:
            raise EgressError(f"{text!r}: expected [IPv6]:port")
    elif rest.count(":") == 1:
        host, _, port_text = rest.partition(":")
    else:
        host, port_text = rest, None
    name, is_ip = parse_host(host)
    if wildcard and is_ip:
        raise EgressError(f"{text!r}: a wildcard goes with a domain name, not an address")
    port = parse_port(port_text) if port_text is not None else DEFAULT_TLS_PORT
    return EgressRule(text=text, host=name, port=port, wildcard=wildcard)


@dataclass(frozen=True)
class CredentialHost:
    """A credential's upstream as the proxy sees it: intercepted, never tunnelled."""

    name: str  # the credential
    scheme: str
    host: str
    port: int
    base_path: str  # judged requests are relative to it, as under /v1/http/<credential>/

    @property
    def is_ip(self) -> bool:
        return _is_ip(self.host)

    @classmethod
    def from_base_url(cls, name: str, base_url: str) -> CredentialHost:
        parts = urlsplit(base_url)
        host, _ = parse_host(parts.hostname or "")
        default = DEFAULT_TLS_PORT if parts.scheme == "https" else 80
        return cls(name=name, scheme=parts.scheme, host=host, port=parts.port or default,
                   base_path=parts.path.rstrip("/"))

    def relative_path(self, raw_path: str) -> str | None:
        """The path below base_url's path, or None when the request is outside it (raw, before normalising)."""
        if not self.base_path:
            return raw_path
        if raw_path == self.base_path:
            return "/"
        if raw_path.startswith(self.base_path + "/"):
            return raw_path[len(self.base_path):]
        return None


def credential_hosts(base_urls: Mapping[str, str]) -> list[CredentialHost]:
    """Credential name -> base_url, as the proxy sees them."""
    return [CredentialHost.from_base_url(name, url) for name, url in base_urls.items()]


@dataclass(frozen=True)
class Intercept:
    credentials: tuple[CredentialHost, ...]  # those sharing this host:port; the request path picks one

    def route(self, raw_path: str) -> tuple[CredentialHost, str] | None:
        """The credential whose base path is the longest prefix of `raw_path`, and the path relative to it."""
        best: tuple[CredentialHost, str] | None = None
        for candidate in self.credentials:
            relative = candidate.relative_path(raw_path)
            if relative is not None and (best is None or len(candidate.base_path) > len(best[0].base_path)):
                best = (candidate, relative)
        return best


@dataclass(frozen=True)
class Tunnel:
    rule: EgressRule


@dataclass(frozen=True)
class Refuse:
    reason: str
    message: str


Decision = Intercept | Tunnel | Refuse


class EgressPolicy:
    """The run's credential hosts and egress rules, parsed once; `decide` judges one CONNECT target."""

    def __init__(self, credential_hosts: Iterable[CredentialHost], rules: Sequence[EgressRule]) -> None:
        self.rules = tuple(rules)
        self.credential_hosts = tuple(credential_hosts)
        self._by_authority: dict[tuple[str, int], list[CredentialHost]] = {}
        for entry in self.credential_hosts:
            self._by_authority.setdefault((entry.host, entry.port), []).append(entry)

    @property
    def intercepted_names(self) -> list[str]:
        """The DNS names the run's CA may vouch for: https credential hosts that are names, not addresses."""
        names = {entry.host for entry in self.credential_hosts if entry.scheme == "https" and not entry.is_ip}
        return sorted(names)

    def decide(self, target: Authority) -> Decision:
        """A credential's host always wins over `egress`: its requests are judged, never tunnelled blind."""
        sharing = self._by_authority.get((target.host, target.port), [])
        https = tuple(entry for entry in sharing if entry.scheme == "https")
        if https and not target.is_ip:
            return Intercept(https)
        if sharing:
            return Refuse("egress_denied", f"{target} is a credential's upstream; outloop intercepts only TLS "
                                           "to a host name it can mint a certificate for")
        for rule in self.rules:
            if rule.matches(target):
                return Tunnel(rule)
        return Refuse("egress_denied", f"{target} is neither a credential's host nor in [run] egress")

    def plain_http(self, host: str, port: int | None) -> Intercept | None:
        """An absolute-form `http://` request: judged like /v1/http/ when it names a credential's host."""
        matching = tuple(entry for entry in self.credential_hosts
                         if entry.host == host and (port is None or port == entry.port))
        return Intercept(matching) if matching else None

    def credential_authorities(self) -> set[tuple[str, int]]:
        return set(self._by_authority)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def host_header_matches(values: Sequence[str], target: Authority) -> bool:
    """Exactly one Host header naming the CONNECT target (port optional when it is the default for TLS)."""
    if len(values) != 1:
        return False
    try:
        host, is_ip = parse_host(values[0].rpartition(":")[0] if _has_port(values[0]) else values[0])
        port = parse_port(values[0].rpartition(":")[2]) if _has_port(values[0]) else DEFAULT_TLS_PORT
    except EgressError:
        return False
    return host == target.host and is_ip == target.is_ip and port == target.port


def _has_port(value: str) -> bool:
    tail = value.rpartition(":")
    return bool(tail[1]) and "]" not in tail[2] and (value.startswith("[") or value.count(":") == 1)
