"""Host authentication: the host's own callables, tried before API keys, so a user logged in to the host calls the
API without a key (docs/authentication.md).

A host authenticator is ``(request) -> Principal | None`` (or an awaitable of one). :class:`HostAuth` tries them in
order on every authenticated request; the first principal wins, and when all answer ``None`` the request's API key
decides as usual. What the host returns is trusted as is: its owner, plan limits, scopes, models and any origin or
endpoint restriction (:func:`user_principal` builds one from a plan name). An :class:`~ozwell_asgi.errors.OzwellError`
raised by an authenticator is sent as it is (a 401 of the host's own, say); any other exception, or a result that is
not a principal, is logged and answered as a bare 500.

A host principal usually rests on ambient credentials (a session cookie), which browsers also attach to requests
other sites make. So a state-changing request (not GET, HEAD or OPTIONS) authenticated by the host must come from
the same origin or from one of the app's explicitly listed ``cors_origins`` (``*`` does not count): browsers say so
in ``Sec-Fetch-Site``, else the ``Origin`` header is compared with ``Host``; a request with neither header is not
from a browser and passes. Anything else is 403 ``insufficient_permissions``. API keys never need this: a bearer
header is not ambient.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping

from starlette.requests import Request

from .auth import ENDPOINTS, ModelPatterns
from .bodies import header
from .errors import OzwellError, PermissionDeniedError, internal_error
from .origins import OriginSet, normalize_origin
from .ratelimit import DEFAULT_PLANS, Plan, quota_for
from .types import DEFAULT_SCOPES, Principal

__all__ = ["HostAuth", "HostAuthenticator", "user_principal"]

log = logging.getLogger("ozwell_asgi")

HostAuthenticator = Callable[[Request], Principal | Awaitable[Principal | None] | None]

#: Endpoint groups a host principal may be limited to: those of keys, and the key management API.
HOST_ENDPOINTS = (*ENDPOINTS, "api-keys")
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def user_principal(
    owner: str,
    plan: str = "free",
    *,
    plans: Mapping[str, Plan] = DEFAULT_PLANS,
    rpm: int | None = None,
    tpm: int | None = None,
    models: Iterable[str] | None = None,
    scopes: Iterable[str] = DEFAULT_SCOPES,
    origins: Iterable[str] | None = None,
    endpoints: Iterable[str] | None = None,
    expires_at: int | None = None,
    subject: str | None = None,
) -> Principal:
    """The principal of a host user ``owner`` on ``plan`` (one of ``plans``: pass the app's own when it has its
    own), with ``rpm``/``tpm`` overriding the plan's limits as on a key.

    ``subject`` is what the rate limits count against (default ``user:<owner>``: a user's session has budgets of
    its own, apart from any key of the same owner). ``models`` are ids or globs (``None``: every model); ``origins``
    and ``endpoints`` restrict the principal as they restrict a scoped key (``None``: no restriction). Files and
    keys belong to ``owner``, exactly as they do for the owner's keys. ``ValueError`` for an unknown plan, a bad
    origin or an unknown endpoint. Build it once per user and reuse it where you can: models are compiled here.
    """
    if not owner or "\x00" in owner:
        raise ValueError("a principal's owner must be non-empty text without NUL characters")
    quota = quota_for(plan, rpm, tpm, plans)
    endpoint_set = None if endpoints is None else frozenset(endpoints)
    if endpoint_set is not None and not endpoint_set <= frozenset(HOST_ENDPOINTS):
        unknown = sorted(endpoint_set - frozenset(HOST_ENDPOINTS))
        raise ValueError(f"unknown endpoints {unknown}; expected some of {', '.join(HOST_ENDPOINTS)}")
    return Principal(
        key_id=subject if subject is not None else f"user:{owner}",
        owner=owner,
        plan=plan,
        quota=quota,
        models=None if models is None else ModelPatterns(models),
        scopes=frozenset(scopes),
        expires_at=expires_at,
        origins=None if origins is None else OriginSet(normalize_origin(o) for o in origins),
        endpoints=endpoint_set,
    )


def _name(authenticator: object) -> str:
    return str(getattr(authenticator, "__qualname__", None) or type(authenticator).__qualname__)


class HostAuth:
    """The host's authenticators, in order, and the origins trusted for their cross-origin state changes."""

    __slots__ = ("authenticators", "trusted")

    def __init__(self, authenticators: Iterable[HostAuthenticator], trusted: OriginSet) -> None:
        self.authenticators = tuple(authenticators)
        for item in self.authenticators:
            if not callable(item):
                raise TypeError(f"a host authenticator must be callable, got {type(item).__name__}")
        self.trusted = trusted

    async def authenticate(self, request: Request) -> Principal | None:
        """The first principal an authenticator gives (checked for cross-origin use), or ``None``."""
        for authenticator in self.authenticators:
            try:
                result = authenticator(request)
                if inspect.isawaitable(result):
                    result = await result
            except OzwellError:
                raise
            except Exception:
                log.exception("the host authenticator %s failed", _name(authenticator))
                raise internal_error() from None
            if result is None:
                continue
            if not isinstance(result, Principal):
                log.error(
                    "the host authenticator %s returned a %s, not a Principal or None",
                    _name(authenticator),
                    type(result).__name__,
                )
                raise internal_error()
            self._refuse_cross_site(request)
            return result
        return None

    def _refuse_cross_site(self, request: Request) -> None:
        if request.scope["method"] in _SAFE_METHODS:
            return
        origin = header(request, b"origin")
        site = header(request, b"sec-fetch-site")
        if site is not None:
            if site in ("same-origin", "none"):
                return
        elif origin is None:
            return  # neither header: not a browser, so no ambient credential was sent for someone else
        else:
            host = header(request, b"host")
            if host is not None and origin.partition("://")[2].lower() == host.lower():
                return
        if origin is not None and self.trusted.allows(origin):
            return
        raise PermissionDeniedError(
            "Cross-origin requests signed in by the host are refused: call from the same origin, or list the origin "
            "in the API's cors_origins."
        )
