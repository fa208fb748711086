"""API keys: their format, keyed hashing, issuing and rotating them, and turning a bearer header into a Principal.

A key is ``ozw_`` followed by 43 url-safe random characters (32 random bytes); a scoped key (one restricted to
browser origins or endpoints, :attr:`~ozwell_asgi.types.APIKey.scoped`) is ``ozw_scoped_`` and the same. Only
``HMAC-SHA256(server_secret, key)`` is stored, so a leaked database does not leak usable keys, and the lookup is
by that digest (the final comparison is constant-time as well). The server secret is given to
:class:`KeyHasher`; ``ozwell-asgi serve`` reads it from ``OZWELL_SECRET`` or a secret file (docs/keys.md).
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import itertools
import math
import re
import secrets
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from .errors import AuthenticationError, InvalidRequestError, PermissionDeniedError
from .origins import OriginSet, normalize_origin, origins_within
from .protocols import KeyStore
from .ratelimit import DEFAULT_PLANS, Plan, quota_for
from .types import DEFAULT_SCOPES, SCOPE_ADMIN, SCOPE_ADMIN_GLOBAL, SCOPE_API, APIKey, Page, PageQuery, Principal, Quota

__all__ = [
    "ENDPOINTS",
    "Authenticator",
    "Grant",
    "KeyHasher",
    "KeyManager",
    "ModelPatterns",
    "at_most",
    "endpoint_of",
    "exceeds",
    "generate_key",
    "model_allowed",
    "models_within",
    "require_reach",
]

KEY_PREFIX = "ozw_"
SCOPED_KEY_PREFIX = "ozw_scoped_"
#: The endpoint groups a scoped key may be limited to (its ``endpoints``).
ENDPOINTS = ("chat.completions", "responses", "embeddings", "files", "models")
# The endpoint group of a path under the app, by its first segment; any other segment is its own group, which no
# key can list (so a principal restricted to endpoints reaches no route added later unless it says so).
_ENDPOINT_OF_SEGMENT = {
    "chat": "chat.completions",
    "responses": "responses",
    "conversations": "responses",
    "embeddings": "embeddings",
    "files": "files",
    "models": "models",
}
#: Default cap on a key's ``origins`` (``Settings.max_key_origins``).
DEFAULT_MAX_KEY_ORIGINS = 64
KNOWN_SCOPES = frozenset({SCOPE_API, SCOPE_ADMIN, SCOPE_ADMIN_GLOBAL})
_KEY_RE = re.compile(r"ozw_[A-Za-z0-9_\-]{32,256}")
_LIST_SCAN_BATCH = 100  # keys read per store page when a listing skips keys its caller may not see

#: Default caps on a key's ``models`` (``Settings.max_model_patterns`` / ``Settings.max_model_pattern_length``).
DEFAULT_MAX_MODEL_PATTERNS = 256
DEFAULT_MAX_MODEL_PATTERN_LENGTH = 256
#: Longest model id a glob is matched against; a longer one is allowed only by an identical exact entry. Bounds
#: the regex work per request (a 32 MiB ``model`` against ``*-mini`` globs would otherwise take seconds).
MAX_GLOB_MATCHED_MODEL_LENGTH = 256

# What holding a scope lets a key grant and manage: the scope itself and everything below it.
IMPLIED_SCOPES: Mapping[str, frozenset[str]] = {
    SCOPE_API: frozenset({SCOPE_API}),
    SCOPE_ADMIN: frozenset({SCOPE_ADMIN, SCOPE_API}),
    SCOPE_ADMIN_GLOBAL: frozenset({SCOPE_ADMIN_GLOBAL, SCOPE_ADMIN, SCOPE_API}),
}


def generate_key(*, scoped: bool = False) -> str:
    """A new secret: ``ozw_`` (``ozw_scoped_`` for a scoped key) + 43 url-safe characters carrying 256 bits from
    :mod:`secrets`."""
    return (SCOPED_KEY_PREFIX if scoped else KEY_PREFIX) + secrets.token_urlsafe(32)


def _hint(secret: str) -> str:
    """What listings show of a secret: its prefix and 4 more characters (``ozw_AbCd``, ``ozw_scoped_AbCd``)."""
    prefix = SCOPED_KEY_PREFIX if secret.startswith(SCOPED_KEY_PREFIX) else KEY_PREFIX
    return secret[: len(prefix) + 4]


def looks_like_key(candidate: str) -> bool:
    return _KEY_RE.fullmatch(candidate) is not None


class KeyHasher:
    """HMAC-SHA256 (RFC 2104) of keys under the server secret, which must be at least 16 bytes.

    The padded inner and outer hash states are computed once, so a key costs two SHA-256 state copies.
    """

    __slots__ = ("_inner", "_outer")

    def __init__(self, secret: str | bytes) -> None:
        raw = secret.encode() if isinstance(secret, str) else bytes(secret)
        if len(raw) < 16:
            raise ValueError("the key-hashing secret must be at least 16 bytes long")
        if len(raw) > 64:  # longer than SHA-256's block: RFC 2104 hashes it first
            raw = hashlib.sha256(raw).digest()
        raw = raw.ljust(64, b"\x00")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in raw))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in raw))

    def hash(self, key: str) -> str:
        inner = self._inner.copy()
        inner.update(key.encode())
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.hexdigest()


def has_glob(pattern: str) -> bool:
    """Whether ``pattern`` is an fnmatch glob (has ``*``, ``?`` or ``[``) rather than an exact model id."""
    return "*" in pattern or "?" in pattern or "[" in pattern


class ModelPatterns(tuple[str, ...]):
    """A key's model patterns (exact ids or fnmatch globs), compiled once into a set and one regex.

    It is the tuple of the patterns, so it compares, prints and serialises as one. :meth:`allows` is a set lookup
    and, when the key has globs, one match of a single compiled alternation: the cost does not grow with the
    number of exact ids, and no pattern is re-translated per call.
    """

    _exact: frozenset[str]
    _globs: re.Pattern[str] | None

    def __new__(cls, patterns: Iterable[str]) -> ModelPatterns:
        self = super().__new__(cls, patterns)
        self._exact = frozenset(self)  # a glob also matches itself literally, as fnmatch's callers expect
        globs = [fnmatch.translate(p) for p in dict.fromkeys(self) if has_glob(p)]
        self._globs = re.compile("|".join(globs)) if globs else None
        return self

    def allows(self, model: str) -> bool:
        """Whether ``model`` equals one of the patterns or matches one of the globs (case-sensitive); globs are
        tried only on ids of at most :data:`MAX_GLOB_MATCHED_MODEL_LENGTH` characters."""
        if model in self._exact:
            return True
        globs = self._globs
        return globs is not None and len(model) <= MAX_GLOB_MATCHED_MODEL_LENGTH and globs.match(model) is not None

    def covers(self, pattern: str) -> bool:
        """Whether every model ``pattern`` names is allowed here, decided conservatively: ``pattern`` is one of
        these patterns, or an exact id (no glob character) that they allow."""
        return pattern in self._exact or (not has_glob(pattern) and self.allows(pattern))


def model_allowed(patterns: tuple[str, ...] | None, model: str) -> bool:
    """Whether a key restricted to ``patterns`` (exact ids or fnmatch globs; None = all) may use ``model``.

    Cheap for a :class:`ModelPatterns` (what :class:`Authenticator` puts in a principal); a plain tuple is compiled
    on every call.
    """
    if patterns is None:
        return True
    if not isinstance(patterns, ModelPatterns):
        patterns = ModelPatterns(patterns)
    return patterns.allows(model)


def models_within(requested: tuple[str, ...] | None, held: tuple[str, ...] | None) -> bool:
    """Whether every model ``requested`` could name is one ``held`` allows; conservative for globs.

    ``held`` ``None`` (every model) contains anything; ``requested`` ``None`` is contained only by ``None``. A
    requested pattern is contained if it equals a held pattern, or is an exact id (no glob character) that the held
    patterns allow. A glob is never compared with a different glob: ``gpt-4o-*`` is not within ``gpt-*``.
    """
    if held is None:
        return True
    if requested is None:
        return False
    compiled = held if isinstance(held, ModelPatterns) else ModelPatterns(held)
    return all(compiled.covers(p) for p in requested)


@dataclass(frozen=True, slots=True)
class Grant:
    """What a key may do: its scopes, models (``None``: every model), effective requests and tokens per minute
    (``None``: unlimited, the largest), expiry (epoch seconds; ``None``: never, the latest), browser origins
    (``None``: no origin restriction, the largest) and endpoint groups (``None``: every endpoint, the largest).

    A plain key (no ``origins``, no ``endpoints``) holds every endpoint from anywhere, so it may grant any origins
    and endpoints; a grant restricted in either can only grant within that restriction.
    """

    scopes: frozenset[str]
    models: tuple[str, ...] | None
    rpm: int | None
    tpm: int | None
    expires_at: int | None
    origins: tuple[str, ...] | None = None
    endpoints: frozenset[str] | None = None

    @classmethod
    def of_principal(cls, principal: Principal) -> Grant:
        quota = principal.quota
        return cls(
            principal.scopes,
            principal.models,
            quota.rpm,
            quota.tpm,
            principal.expires_at,
            principal.origins,
            principal.endpoints,
        )

    @classmethod
    def of_key(cls, key: APIKey, plans: Mapping[str, Plan] = DEFAULT_PLANS) -> Grant:
        """The grant of a stored key; a plan missing from ``plans`` counts as unlimited (the strongest)."""
        try:
            quota = quota_for(key.plan, key.rpm, key.tpm, plans)
        except ValueError:
            quota = Quota(rpm=None, tpm=None)
        endpoints = None if key.endpoints is None else frozenset(key.endpoints)
        return cls(frozenset(key.scopes), key.models, quota.rpm, quota.tpm, key.expires_at, key.origins, endpoints)


def at_most(value: int | None, bound: int | None) -> bool:
    """``value <= bound`` where ``None`` is the largest value (unlimited, never): how limits and expiries compare."""
    return bound is None or (value is not None and value <= bound)


def grantable_scopes(scopes: Iterable[str]) -> frozenset[str]:
    """The scopes a holder of ``scopes`` may grant and manage (see :data:`IMPLIED_SCOPES`)."""
    granted: set[str] = set()
    for scope in scopes:
        granted |= IMPLIED_SCOPES.get(scope, frozenset({scope}))
    return frozenset(granted)


def exceeds(grant: Grant, holder: Grant) -> str | None:
    """The first dimension in which ``grant`` reaches beyond ``holder``, or ``None`` if it lies within it.

    One of ``"scopes"`` (a scope the holder neither has nor implies), ``"models"`` (see :func:`models_within`),
    ``"endpoints"`` (an endpoint group the holder is not limited to, or every one from a limited holder),
    ``"origins"`` (an origin no holder origin covers, or no restriction from a restricted holder; see
    :func:`~ozwell_asgi.origins.origins_within`), ``"rpm"``, ``"tpm"`` (a larger effective limit) or
    ``"expires_at"`` (a later expiry). The one rule behind which keys an admin key sees and manages and what a key
    it creates may get.
    """
    if not grant.scopes <= grantable_scopes(holder.scopes):
        return "scopes"
    if not models_within(grant.models, holder.models):
        return "models"
    if holder.endpoints is not None and (grant.endpoints is None or not grant.endpoints <= holder.endpoints):
        return "endpoints"
    if not origins_within(grant.origins, holder.origins):
        return "origins"
    if not at_most(grant.rpm, holder.rpm):
        return "rpm"
    if not at_most(grant.tpm, holder.tpm):
        return "tpm"
    if not at_most(grant.expires_at, holder.expires_at):
        return "expires_at"
    return None


def _parse_bearer(authorization: str) -> str | None:
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip()


class Authenticator:
    """Resolves ``Authorization: Bearer ozw_…`` to a :class:`Principal`, or raises the contract's 401.

    One digest and one (normally cached) store lookup per request; principals are memoised per stored key.
    """

    def __init__(
        self,
        store: KeyStore,
        hasher: KeyHasher,
        plans: Mapping[str, Plan] = DEFAULT_PLANS,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.hasher = hasher
        self.plans = plans
        self.clock = clock
        self._principals: dict[str, tuple[APIKey, Principal]] = {}

    def principal_for(self, key: APIKey) -> Principal:
        """The principal of ``key``, memoised per stored key (a changed record gets a new one); its model patterns
        are compiled here, once per principal."""
        memo = self._principals.get(key.id)
        if memo is not None:
            if memo[0] is key:
                return memo[1]
            if memo[0] == key:  # the same record fetched again (the key cache expired): compare by identity next
                self._principals[key.id] = (key, memo[1])
                return memo[1]
        if len(self._principals) > 10_000:
            self._principals.clear()
        principal = Principal(
            key_id=key.id,
            owner=key.owner,
            plan=key.plan,
            quota=quota_for(key.plan, key.rpm, key.tpm, self.plans),
            models=None if key.models is None else ModelPatterns(key.models),
            scopes=frozenset(key.scopes),
            expires_at=key.expires_at,
            origins=None if key.origins is None else OriginSet(key.origins),
            endpoints=None if key.endpoints is None else frozenset(key.endpoints),
        )
        self._principals[key.id] = (key, principal)
        return principal

    async def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise AuthenticationError(
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                code="missing_api_key",
            )
        token = _parse_bearer(authorization)
        if not token:
            raise AuthenticationError(
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                code="missing_api_key",
            )
        if not looks_like_key(token):
            raise _invalid_key(token)
        digest = self.hasher.hash(token)
        key = await self.store.get_by_hash(digest)
        if key is None or not hmac.compare_digest(key.key_hash, digest) or not key.is_active(self.clock()):
            raise _invalid_key(token)
        return self.principal_for(key)


def _invalid_key(token: str) -> AuthenticationError:
    shown = token[:4] + "*" * 8 + token[-4:] if len(token) > 12 else "****"
    return AuthenticationError(f"Incorrect API key provided: {shown}.", code="invalid_api_key")


def require_scope(principal: Principal, scope: str, *alternatives: str) -> None:
    """403 unless the principal holds ``scope`` or one of ``alternatives`` (named in the message: ``scope``)."""
    if scope not in principal.scopes and principal.scopes.isdisjoint(alternatives):
        raise PermissionDeniedError(f"This API key does not have the '{scope}' scope this endpoint requires.")


def endpoint_of(path: str) -> str:
    """The endpoint group of ``path`` (relative to the app: ``/chat/completions`` → ``chat.completions``,
    ``/files/f1/content`` → ``files``); a path of no known group is its own first segment."""
    segment = path.lstrip("/").partition("/")[0]
    return _ENDPOINT_OF_SEGMENT.get(segment, segment)


def _shown_origin(origin: str) -> str:
    shown = origin[:100]
    if not shown.isprintable():
        shown = shown.encode("unicode_escape").decode()
    return shown if len(origin) <= 100 else shown + "..."


def require_reach(principal: Principal, origin: str | None, path: str) -> None:
    """403 ``insufficient_permissions`` (``param`` null) unless a restricted principal may call ``path`` from
    ``origin`` (the request's ``Origin`` header).

    With ``origins``, the request must come from a browser page of one of them: an ``Origin`` header that none
    allows, or none at all, is refused. With ``endpoints``, the path's group (:func:`endpoint_of`) must be one.
    Call it only for a principal with either restriction (plain keys skip it).
    """
    origins = principal.origins
    if origins is not None:
        if origin is None:
            raise PermissionDeniedError(
                "This API key may only be used from the browser origins it allows, and the request has no Origin "
                "header."
            )
        allowed = origins.allows(origin) if isinstance(origins, OriginSet) else OriginSet(origins).allows(origin)
        if not allowed:
            raise PermissionDeniedError(f"This API key may not be used from the origin '{_shown_origin(origin)}'.")
    endpoints = principal.endpoints
    if endpoints is not None:
        endpoint = endpoint_of(path)
        if endpoint not in endpoints:
            shown = endpoint if len(endpoint) <= 100 else endpoint[:100] + "..."
            raise PermissionDeniedError(f"This API key may not call the '{shown}' endpoints.")


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
#: The longest duration text accepted (far beyond 100 years in any unit), so no huge number is ever parsed.
MAX_DURATION_CHARS = 32
_DURATION_RE = re.compile(r"([0-9]+)([smhdw])")
_SECONDS_RE = re.compile(r"[0-9]+")
_DURATION_HINT = "use a number of seconds or a duration such as 90m, 12h, 30d, 1w or 1w2d"


def parse_duration(text: str) -> int:
    """``30d``, ``12h``, ``90m``, ``1w2d`` or plain seconds → seconds (ASCII digits, at most 32 characters).

    ``ValueError`` on anything else, with a message fit for a client.
    """
    text = text.strip()
    if len(text) > MAX_DURATION_CHARS:
        raise ValueError(f"invalid duration: longer than {MAX_DURATION_CHARS} characters; {_DURATION_HINT}")
    if _SECONDS_RE.fullmatch(text):
        seconds = int(text)
    else:
        pos, seconds = 0, 0
        for match in _DURATION_RE.finditer(text):
            if match.start() != pos:
                break
            seconds += int(match.group(1)) * DURATION_UNITS[match.group(2)]
            pos = match.end()
        if pos != len(text) or not text:
            raise ValueError(f"invalid duration {text!r}: {_DURATION_HINT}")
    if seconds <= 0:
        raise ValueError(f"invalid duration {text!r}: it must be positive")
    return seconds


def _endpoints(endpoints: Iterable[str] | None) -> tuple[str, ...] | None:
    if endpoints is None:
        return None
    cap = 4 * len(ENDPOINTS)  # a bound on what is read: no more names than that can be meant
    given = list(itertools.islice(endpoints, cap + 1))
    if len(given) > cap:
        raise InvalidRequestError(f"'endpoints' may list at most {cap} names.", param="endpoints")
    unknown = [e for e in given if e not in ENDPOINTS]
    if unknown:
        raise InvalidRequestError(
            f"Unknown endpoint {unknown[0][:100]!r}; expected some of: {', '.join(ENDPOINTS)}.", param="endpoints"
        )
    if not given:
        raise InvalidRequestError(
            "'endpoints' must list at least one endpoint; leave it out for every endpoint.", param="endpoints"
        )
    return tuple(dict.fromkeys(given))


def _check_text(value: str, param: str) -> None:
    if not value or len(value) > 200:
        raise InvalidRequestError(f"'{param}' must be 1 to 200 characters.", param=param)
    if "\x00" in value:
        raise InvalidRequestError(f"'{param}' must not contain NUL characters.", param=param)


class KeyManager:
    """Issues, lists, revokes and rotates keys: the one implementation behind the CLI and the key API.

    Secrets are returned once, by :meth:`create` and :meth:`rotate`, and never stored. A key's ``models`` are
    bounded when it is made: at most ``max_model_patterns`` patterns of at most ``max_model_pattern_length``
    characters each (400 ``param: "models"`` otherwise); its ``origins`` at most ``max_key_origins``.
    """

    def __init__(
        self,
        store: KeyStore,
        hasher: KeyHasher,
        plans: Mapping[str, Plan] = DEFAULT_PLANS,
        *,
        max_model_patterns: int = DEFAULT_MAX_MODEL_PATTERNS,
        max_model_pattern_length: int = DEFAULT_MAX_MODEL_PATTERN_LENGTH,
        max_key_origins: int = DEFAULT_MAX_KEY_ORIGINS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if max_model_patterns < 1 or max_model_pattern_length < 1 or max_key_origins < 1:
            raise ValueError("max_model_patterns, max_model_pattern_length and max_key_origins must be >= 1")
        self.store = store
        self.hasher = hasher
        self.plans = plans
        self.max_model_patterns = max_model_patterns
        self.max_model_pattern_length = max_model_pattern_length
        self.max_key_origins = max_key_origins
        self.clock = clock

    async def create(
        self,
        *,
        name: str,
        owner: str,
        plan: str = "free",
        rpm: int | None = None,
        tpm: int | None = None,
        models: Iterable[str] | None = None,
        scopes: Iterable[str] = DEFAULT_SCOPES,
        expires_in: int | None = None,
        expires_at: int | None = None,
        within: Grant | None = None,
        origins: Iterable[str] | None = None,
        endpoints: Iterable[str] | None = None,
    ) -> tuple[APIKey, str]:
        """A new key and its secret; 400 (``InvalidRequestError`` with ``param``) for a bad value.

        ``origins`` (browser origins or ``https://*.domain`` wildcards, normalised) and ``endpoints`` (names from
        :data:`ENDPOINTS`) make a scoped key, whose secret starts ``ozw_scoped_``: each, when given, must list at
        least one entry, and a scoped key holds no scope but ``api`` (scoped keys are for browsers).

        The key expires ``expires_in`` seconds from now, or at the epoch second ``expires_at`` (give at most one),
        or never. ``created_at`` is the current second rounded up and ``expires_at = created_at + expires_in``, so
        a key never expires before ``expires_in`` seconds have passed. With ``within`` (the creator's grant), a key
        reaching beyond it is refused with 403 ``insufficient_permissions`` naming the field (``scopes``,
        ``models``, ``plan``, ``rpm``, ``tpm`` or ``expires_in``) and nothing is stored.
        """
        _check_text(name, "name")
        _check_text(owner, "owner")
        if plan not in self.plans:
            raise InvalidRequestError(
                f"Unknown plan {plan!r}; expected one of: {', '.join(sorted(self.plans))}.", param="plan"
            )
        for field, value in (("rpm", rpm), ("tpm", tpm)):
            if value is not None and value < 1:
                raise InvalidRequestError(f"'{field}' must be a positive integer.", param=field)
        if expires_in is not None and expires_at is not None:
            raise ValueError("give expires_in or expires_at, not both")
        if expires_in is not None and expires_in < 1:
            raise InvalidRequestError("'expires_in' must be a positive number of seconds.", param="expires_in")
        if expires_at is not None and expires_at < 1:
            raise InvalidRequestError("'expires_at' must be a positive epoch second.", param="expires_at")
        scope_tuple = tuple(dict.fromkeys(scopes))
        unknown = [s for s in scope_tuple if s not in KNOWN_SCOPES]
        if unknown:
            raise InvalidRequestError(
                f"Unknown scope {unknown[0]!r}; expected some of: {', '.join(sorted(KNOWN_SCOPES))}.", param="scopes"
            )
        model_tuple = self._model_patterns(models)
        origin_tuple = self._origins(origins)
        endpoint_tuple = _endpoints(endpoints)
        if (origin_tuple is not None or endpoint_tuple is not None) and any(s != SCOPE_API for s in scope_tuple):
            raise InvalidRequestError(
                "A scoped key (one with 'origins' or 'endpoints') is for browsers and holds no scope but "
                f"'{SCOPE_API}'.",
                param="scopes",
            )
        now = math.ceil(self.clock())
        secret = generate_key(scoped=origin_tuple is not None or endpoint_tuple is not None)
        key = APIKey(
            id="key_" + uuid.uuid4().hex[:24],
            key_hash=self.hasher.hash(secret),
            owner=owner,
            name=name,
            plan=plan,
            rpm=rpm,
            tpm=tpm,
            models=model_tuple,
            scopes=scope_tuple,
            created_at=now,
            expires_at=now + expires_in if expires_in is not None else expires_at,
            hint=_hint(secret),
            origins=origin_tuple,
            endpoints=endpoint_tuple,
        )
        if within is not None:
            self._refuse_beyond(key, within)
        await self.store.create(key)
        return key, secret

    def _model_patterns(self, models: Iterable[str] | None) -> tuple[str, ...] | None:
        if models is None:
            return None
        cap, longest = self.max_model_patterns, self.max_model_pattern_length
        patterns = list(itertools.islice(models, cap + 1))
        if len(patterns) > cap:
            raise InvalidRequestError(f"'models' may list at most {cap} model ids or patterns.", param="models")
        if any(len(p) > longest for p in patterns):
            raise InvalidRequestError(
                f"Each model id or pattern in 'models' must be at most {longest} characters.", param="models"
            )
        return tuple(dict.fromkeys(p for p in patterns if p))

    def _origins(self, origins: Iterable[str] | None) -> tuple[str, ...] | None:
        if origins is None:
            return None
        cap = self.max_key_origins
        given = list(itertools.islice(origins, cap + 1))
        if len(given) > cap:
            raise InvalidRequestError(f"'origins' may list at most {cap} origins.", param="origins")
        if not given:
            raise InvalidRequestError(
                "'origins' must list at least one origin; leave it out for a key usable from anywhere.", param="origins"
            )
        try:
            return tuple(dict.fromkeys(normalize_origin(o) for o in given))
        except ValueError as exc:
            raise InvalidRequestError(f"Invalid entry in 'origins': {exc}.", param="origins") from None

    def _refuse_beyond(self, key: APIKey, holder: Grant) -> None:
        """403 naming the field in which ``key`` reaches beyond ``holder``; nothing if it lies within."""
        dimension = exceeds(Grant.of_key(key, self.plans), holder)
        if dimension is None:
            return
        if dimension == "scopes":
            scope = next(s for s in key.scopes if s not in grantable_scopes(holder.scopes))
            message = f"This API key cannot grant the '{scope}' scope, which it does not hold itself."
            raise PermissionDeniedError(message, param="scopes")
        if dimension == "models":
            if key.models is None:
                message = "This API key is limited to some models and cannot grant every model; list them in 'models'."
            else:
                held = holder.models if isinstance(holder.models, ModelPatterns) else ModelPatterns(holder.models or ())
                pattern = next(p for p in key.models if not held.covers(p))
                message = f"This API key cannot grant the model '{pattern}', which its own models do not cover."
            raise PermissionDeniedError(message, param="models")
        if dimension == "endpoints":
            listed = ", ".join(sorted(holder.endpoints or ()))
            message = f"This API key may only grant the endpoints it holds itself ({listed}); list them in 'endpoints'."
            raise PermissionDeniedError(message, param="endpoints")
        if dimension == "origins":
            listed = ", ".join(holder.origins or ())
            message = (
                f"This API key may only grant the origins it is limited to itself ({listed}); list them in 'origins'."
            )
            raise PermissionDeniedError(message, param="origins")
        if dimension in ("rpm", "tpm"):
            unit = "requests" if dimension == "rpm" else "tokens"
            own = holder.rpm if dimension == "rpm" else holder.tpm
            if (key.rpm if dimension == "rpm" else key.tpm) is not None:
                message = f"This API key cannot grant more than {own} {unit} per minute, its own limit."
                raise PermissionDeniedError(message, param=dimension)
            message = (
                f"The plan '{key.plan}' allows more {unit} per minute than this API key's own {own}; choose a "
                f"smaller plan or set '{dimension}' within that limit."
            )
            raise PermissionDeniedError(message, param="plan")
        message = f"This API key expires at {holder.expires_at} (epoch seconds); a key it creates cannot expire later."
        raise PermissionDeniedError(message, param="expires_in")

    def manages(self, principal: Principal, key: APIKey) -> bool:
        """Whether ``principal`` may see and manage ``key``: a key of its owner (of any owner with
        ``admin:global``) whose grant lies within the principal's own (:func:`exceeds`)."""
        if key.owner != principal.owner and SCOPE_ADMIN_GLOBAL not in principal.scopes:
            return False
        return exceeds(Grant.of_key(key, self.plans), Grant.of_principal(principal)) is None

    async def list(self, owner: str | None = None) -> list[APIKey]:
        """Every key (of ``owner``); 400 ``param: "owner"`` for an owner no key can have (a NUL character)."""
        if owner is not None and "\x00" in owner:
            raise InvalidRequestError("'owner' must not contain NUL characters.", param="owner")
        return await self.store.list(owner)

    async def list_page(
        self, query: PageQuery, owner: str | None = None, visible: Callable[[APIKey], bool] | None = None
    ) -> Page[APIKey]:
        """One page of the keys of ``owner`` (every owner's for ``None``) that ``visible`` accepts (all for
        ``None``), cut exactly as :func:`~ozwell_asgi.pages.paginate` cuts that list; 400 ``param: "owner"`` as
        :meth:`list`. A cursor naming a key outside that list gives an empty page, as an unknown id does.

        With ``visible``, store pages of ``max(limit + 1, 100)`` keys are read until ``limit + 1`` visible keys
        are found or the scope ends: one store page when most keys are visible, and never more reads than the
        keys in scope take.
        """
        if owner is not None and "\x00" in owner:
            raise InvalidRequestError("'owner' must not contain NUL characters.", param="owner")
        if visible is None:
            return await self.store.list_page(query, owner)
        cursor = query.after if query.after is not None else query.before
        if cursor is not None:
            at = await self.store.get(cursor)
            if at is None or (owner is not None and at.owner != owner) or not visible(at):
                return Page((), False)
        forwards = query.before is None  # the page follows its start in the listing's order
        batch = max(query.limit + 1, _LIST_SCAN_BATCH)
        step = PageQuery(limit=batch, after=query.after, before=query.before, order=query.order)
        found: list[APIKey] = []  # visible keys, nearest to the page's start first
        while True:
            page = await self.store.list_page(step, owner)
            for key in page.data if forwards else reversed(page.data):
                if visible(key):
                    found.append(key)
                    if len(found) > query.limit:
                        del found[query.limit :]
                        return Page(tuple(found if forwards else reversed(found)), True)
            if not page.has_more or not page.data:
                return Page(tuple(found if forwards else reversed(found)), False)
            if forwards:
                step = PageQuery(limit=batch, after=page.data[-1].id, order=query.order)
            else:
                step = PageQuery(limit=batch, before=page.data[0].id, order=query.order)

    async def get(self, key_id: str) -> APIKey | None:
        return await self.store.get(key_id)

    async def revoke(self, key_id: str) -> APIKey | None:
        return await self.store.revoke(key_id, int(self.clock()))

    async def rotate(self, key_id: str) -> tuple[APIKey, str] | None:
        """A new secret for the key (``ozw_scoped_…`` again for a scoped key); ``None`` if unknown or revoked."""
        current = await self.store.get(key_id)
        if current is None or current.revoked_at is not None:
            return None
        secret = generate_key(scoped=current.scoped)
        key = await self.store.rotate(key_id, self.hasher.hash(secret), _hint(secret))
        return None if key is None else (key, secret)
