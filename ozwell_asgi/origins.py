"""Browser origins: how a scoped key's ``origins`` and the app's ``cors_origins`` are written, checked and matched.

An origin is ``scheme://host[:port]`` as browsers send it in the ``Origin`` header: lower-case, no path, no
default port (``https://app.example.com``, ``http://localhost:5173``). A pattern may also be a subdomain wildcard,
``https://*.example.com``, which matches every origin of that scheme and port whose host ends in ``.example.com``
(any depth, never ``example.com`` itself). ``*`` (any origin) is accepted only where a caller allows it
(``cors_origins``), never on a key: a key without ``origins`` is the unrestricted one.

Matching costs a set lookup, plus for each wildcard a prefix/suffix test and one small regex match on the part
between them; an ``Origin`` longer than :data:`MAX_ORIGIN_LENGTH` never matches.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["ANY_ORIGIN", "MAX_ORIGIN_LENGTH", "OriginSet", "normalize_origin"]

ANY_ORIGIN = "*"
#: Longest origin (pattern or ``Origin`` header) considered: a 253-character host, a scheme and a port fit.
MAX_ORIGIN_LENGTH = 300

_SCHEME = re.compile(r"[a-z][a-z0-9+.\-]{0,31}")
_LABEL = r"[a-z0-9](?:[a-z0-9\-]{0,61}[a-z0-9])?"
_HOSTNAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_IPV6 = re.compile(r"\[[0-9a-f:.]{2,45}\]")
_SUBDOMAINS = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_DEFAULT_PORTS = {"http": "80", "https": "443", "ws": "80", "wss": "443"}


def normalize_origin(text: str, *, allow_any: bool = False) -> str:
    """``text`` as the canonical origin or wildcard pattern it names; ``ValueError`` with a reason fit for a client.

    Scheme and host are lower-cased, a trailing ``/`` and a default port (80 for http, 443 for https) dropped.
    Refused: ``null`` (sandboxed documents and ``file:`` pages, which any site can produce), user info, paths,
    queries, fragments, non-ASCII hosts (give the punycode form), bad ports, and ``*`` unless ``allow_any``.
    """
    raw = text.strip()
    if raw == ANY_ORIGIN:
        if allow_any:
            return ANY_ORIGIN
        raise ValueError("'*' is not an origin; leave the origins out for no origin restriction")
    if not raw or len(raw) > MAX_ORIGIN_LENGTH:
        raise ValueError(f"an origin must be 1 to {MAX_ORIGIN_LENGTH} characters")
    if not raw.isascii() or not raw.isprintable():
        raise ValueError(f"{raw!r} is not an origin: use ASCII (the punycode form of an international domain)")
    if raw.lower() == "null":
        raise ValueError("the 'null' origin cannot be allowed: any page can send it")
    scheme, sep, rest = raw.partition("://")
    scheme = scheme.lower()
    if not sep or not _SCHEME.fullmatch(scheme):
        raise ValueError(f"{raw!r} is not an origin: expected scheme://host[:port], such as https://app.example.com")
    if rest.endswith("/"):
        rest = rest[:-1]
    if any(c in rest for c in "/?#@\\") or not rest:
        raise ValueError(f"{raw!r} is not an origin: only scheme://host[:port], no path, query or user")
    host, port = rest.lower(), ""
    if host.startswith("["):
        end = host.find("]")
        host, tail = host[: end + 1], host[end + 1 :]
        if end < 0 or not _IPV6.fullmatch(host) or (tail and not tail.startswith(":")):
            raise ValueError(f"{raw!r} is not an origin: a bad IPv6 address")
        port = tail[1:] if tail else ""
    elif ":" in host:
        host, _, port = host.rpartition(":")
    if port:
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ValueError(f"{raw!r} is not an origin: the port must be 1 to 65535")
        port = str(int(port))
        if _DEFAULT_PORTS.get(scheme) == port:
            port = ""
    name = host[2:] if host.startswith("*.") else host
    if not host.startswith("[") and not _HOSTNAME.fullmatch(name):
        raise ValueError(f"{raw!r} is not an origin: a bad host name (a wildcard is only a leading '*.')")
    if host.startswith("*.") and "." not in name:
        raise ValueError(f"{raw!r}: a wildcard needs a domain of at least two labels, such as *.example.com")
    return f"{scheme}://{host}" + (f":{port}" if port else "")


class OriginSet(tuple[str, ...]):
    """Canonical origin patterns (see :func:`normalize_origin`), compiled once for :meth:`allows`.

    It is the tuple of the patterns, so it compares, prints and serialises as one. Build it from patterns that
    went through :func:`normalize_origin` (a key's stored ``origins``, the app's ``cors_origins``).
    """

    _exact: frozenset[str]
    _wild: tuple[tuple[str, str], ...]  # (prefix "https://", suffix ".example.com[:port]")
    any: bool

    def __new__(cls, patterns: Iterable[str]) -> OriginSet:
        self = super().__new__(cls, dict.fromkeys(patterns))
        self.any = ANY_ORIGIN in self
        self._exact = frozenset(p for p in self if "://*." not in p)
        wild = []
        for p in self:
            scheme, sep, rest = p.partition("://*.")
            if sep:
                wild.append((scheme + "://", "." + rest))
        self._wild = tuple(wild)
        return self

    def allows(self, origin: str) -> bool:
        """Whether the ``Origin`` header value ``origin`` is one of these origins (compared lower-cased)."""
        if self.any:
            return True
        if len(origin) > MAX_ORIGIN_LENGTH:
            return False
        origin = origin.lower()
        return origin in self._exact or self._wild_allows(origin)

    def _wild_allows(self, origin: str) -> bool:
        for prefix, suffix in self._wild:
            if origin.startswith(prefix) and origin.endswith(suffix):
                middle = origin[len(prefix) : len(origin) - len(suffix)]
                if _SUBDOMAINS.fullmatch(middle):
                    return True
        return False

    def covers(self, pattern: str) -> bool:
        """Whether every origin the canonical ``pattern`` matches is allowed here: it is one of these patterns, an
        origin they allow, or a wildcard under one of these wildcards (``https://*.a.example.com`` under
        ``https://*.example.com``)."""
        if self.any or pattern in self:
            return True
        if "://*." in pattern:
            return self._wild_allows(pattern.replace("://*.", "://", 1))
        return self.allows(pattern)


def origins_within(requested: tuple[str, ...] | None, held: tuple[str, ...] | None) -> bool:
    """Whether a grant restricted to ``requested`` origins lies within one restricted to ``held`` (``None``: no
    restriction, the largest)."""
    if held is None:
        return True
    if requested is None:
        return False
    compiled = held if isinstance(held, OriginSet) else OriginSet(held)
    return all(compiled.covers(p) for p in requested)
