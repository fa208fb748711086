"""API keys: their format, keyed hashing, issuing and rotating them, and turning a bearer header into a Principal.

A key is ``ozw_`` followed by 43 url-safe random characters (32 random bytes). Only
``HMAC-SHA256(server_secret, key)`` is stored, so a leaked database does not leak usable keys, and the lookup is
by that digest (the final comparison is constant-time as well). The server secret is given to
:class:`KeyHasher`; ``ozwell-asgi serve`` reads it from ``OZWELL_SECRET`` or a secret file (docs/keys.md).
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import re
import secrets
import time
import uuid
from collections.abc import Iterable, Mapping

from .errors import AuthenticationError, InvalidRequestError, PermissionDeniedError
from .protocols import KeyStore
from .ratelimit import DEFAULT_PLANS, Plan, quota_for
from .types import DEFAULT_SCOPES, SCOPE_ADMIN, SCOPE_ADMIN_GLOBAL, SCOPE_API, APIKey, Principal

__all__ = ["Authenticator", "KeyHasher", "KeyManager", "generate_key", "model_allowed"]

KEY_PREFIX = "ozw_"
KNOWN_SCOPES = frozenset({SCOPE_API, SCOPE_ADMIN, SCOPE_ADMIN_GLOBAL})
_KEY_RE = re.compile(r"ozw_[A-Za-z0-9_\-]{32,256}")
_HINT_LEN = 8


def generate_key() -> str:
    """A new secret: ``ozw_`` + 43 url-safe characters carrying 256 bits from :mod:`secrets`."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


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


def model_allowed(patterns: tuple[str, ...] | None, model: str) -> bool:
    """Whether a key restricted to ``patterns`` (exact ids or fnmatch globs; None = all) may use ``model``."""
    if patterns is None:
        return True
    for pattern in patterns:
        if pattern == model or (
            ("*" in pattern or "?" in pattern or "[" in pattern) and fnmatch.fnmatchcase(model, pattern)
        ):
            return True
    return False


def _parse_bearer(authorization: str) -> str | None:
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip()


class Authenticator:
    """Resolves ``Authorization: Bearer ozw_…`` to a :class:`Principal`, or raises the contract's 401.

    One digest and one (normally cached) store lookup per request; principals are memoised per stored key.
    """

    def __init__(self, store: KeyStore, hasher: KeyHasher, plans: Mapping[str, Plan] = DEFAULT_PLANS) -> None:
        self.store = store
        self.hasher = hasher
        self.plans = plans
        self._principals: dict[str, tuple[APIKey, Principal]] = {}

    def principal_for(self, key: APIKey) -> Principal:
        """The principal of ``key``, memoised per stored key (a changed record gets a new one)."""
        memo = self._principals.get(key.id)
        if memo is not None and (memo[0] is key or memo[0] == key):
            return memo[1]
        if len(self._principals) > 10_000:
            self._principals.clear()
        principal = Principal(
            key_id=key.id,
            owner=key.owner,
            plan=key.plan,
            quota=quota_for(key.plan, key.rpm, key.tpm, self.plans),
            models=key.models,
            scopes=frozenset(key.scopes),
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
        if key is None or not hmac.compare_digest(key.key_hash, digest) or not key.is_active(time.time()):
            raise _invalid_key(token)
        return self.principal_for(key)


def _invalid_key(token: str) -> AuthenticationError:
    shown = token[:4] + "*" * 8 + token[-4:] if len(token) > 12 else "****"
    return AuthenticationError(f"Incorrect API key provided: {shown}.", code="invalid_api_key")


def require_scope(principal: Principal, scope: str, *alternatives: str) -> None:
    """403 unless the principal holds ``scope`` or one of ``alternatives`` (named in the message: ``scope``)."""
    if scope not in principal.scopes and principal.scopes.isdisjoint(alternatives):
        raise PermissionDeniedError(f"This API key does not have the '{scope}' scope this endpoint requires.")


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION_RE = re.compile(r"(\d+)([smhdw])")


def parse_duration(text: str) -> int:
    """``30d``, ``12h``, ``90m``, ``1w2d`` or plain seconds → seconds. ``ValueError`` on anything else."""
    text = text.strip()
    if text.isdigit():
        seconds = int(text)
    else:
        pos, seconds = 0, 0
        for match in _DURATION_RE.finditer(text):
            if match.start() != pos:
                break
            seconds += int(match.group(1)) * DURATION_UNITS[match.group(2)]
            pos = match.end()
        if pos != len(text) or not text:
            raise ValueError(f"invalid duration {text!r}: use e.g. 3600, 90m, 12h, 30d or 1w")
    if seconds <= 0:
        raise ValueError(f"invalid duration {text!r}: it must be positive")
    return seconds


class KeyManager:
    """Issues, lists, revokes and rotates keys: the one implementation behind the CLI and the key API.

    Secrets are returned once, by :meth:`create` and :meth:`rotate`, and never stored.
    """

    def __init__(self, store: KeyStore, hasher: KeyHasher, plans: Mapping[str, Plan] = DEFAULT_PLANS) -> None:
        self.store = store
        self.hasher = hasher
        self.plans = plans

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
    ) -> tuple[APIKey, str]:
        if not name or len(name) > 200:
            raise InvalidRequestError("'name' must be 1 to 200 characters.", param="name")
        if not owner or len(owner) > 200:
            raise InvalidRequestError("'owner' must be 1 to 200 characters.", param="owner")
        if plan not in self.plans:
            raise InvalidRequestError(
                f"Unknown plan {plan!r}; expected one of: {', '.join(sorted(self.plans))}.", param="plan"
            )
        for field, value in (("rpm", rpm), ("tpm", tpm)):
            if value is not None and value < 1:
                raise InvalidRequestError(f"'{field}' must be a positive integer.", param=field)
        if expires_in is not None and expires_in < 1:
            raise InvalidRequestError("'expires_in' must be a positive number of seconds.", param="expires_in")
        scope_tuple = tuple(dict.fromkeys(scopes))
        unknown = [s for s in scope_tuple if s not in KNOWN_SCOPES]
        if unknown:
            raise InvalidRequestError(
                f"Unknown scope {unknown[0]!r}; expected some of: {', '.join(sorted(KNOWN_SCOPES))}.", param="scopes"
            )
        model_tuple = None if models is None else tuple(dict.fromkeys(m for m in models if m))
        now = int(time.time())
        secret = generate_key()
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
            expires_at=now + expires_in if expires_in else None,
            hint=secret[:_HINT_LEN],
        )
        await self.store.create(key)
        return key, secret

    async def list(self, owner: str | None = None) -> list[APIKey]:
        return await self.store.list(owner)

    async def get(self, key_id: str) -> APIKey | None:
        return await self.store.get(key_id)

    async def revoke(self, key_id: str) -> APIKey | None:
        return await self.store.revoke(key_id, int(time.time()))

    async def rotate(self, key_id: str) -> tuple[APIKey, str] | None:
        secret = generate_key()
        key = await self.store.rotate(key_id, self.hasher.hash(secret), secret[:_HINT_LEN])
        return None if key is None else (key, secret)
