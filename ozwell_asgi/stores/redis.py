"""Redis stores on redis-py's asyncio client (the ``redis`` extra: ``pip install ozwell-asgi[redis]``).

Layout of the key store, under a configurable prefix (default ``"ozwell:"``):

- ``{prefix}key:{id}``: a hash of the key's fields (a ``None`` field is absent; ``models``/``scopes`` are JSON);
- ``{prefix}keyhash:{key_hash}``: a string, the id of the key whose current hash it is;
- ``{prefix}keys`` and ``{prefix}owner:{owner}``: sorted sets of ids scored by ``created_at``.

Every write is one Lua script, so it is atomic for every process sharing the server.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

try:
    import redis.asyncio as aioredis
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "ozwell_asgi.stores.redis needs redis-py; install it with: pip install ozwell-asgi[redis]"
    ) from exc

from ..errors import ServiceUnavailableError
from ..types import APIKey
from .outage import unavailable_on

__all__ = ["DEFAULT_PREFIX", "RedisKeyStore"]

DEFAULT_PREFIX = "ozwell:"
_LIST_CHUNK = 500

# KEYS: key hash, hash->id mapping, all-keys zset, owner zset. ARGV: id, score, field, value, field, value...
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 1 end
if redis.call('EXISTS', KEYS[2]) == 1 then return 2 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('SET', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
return 0
"""

# KEYS: key hash. ARGV: revocation time. HSETNX keeps the first revocation.
_REVOKE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
redis.call('HSETNX', KEYS[1], 'revoked_at', ARGV[1])
return redis.call('HGETALL', KEYS[1])
"""

# KEYS: key hash, old hash->id mapping, new hash->id mapping. ARGV: old hash (as read), new hash, id, hint.
# Returns {0} unknown/revoked, {1} the hash changed since it was read (retry), {2} new hash taken, {3, fields}.
_ROTATE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0} end
if redis.call('HEXISTS', KEYS[1], 'revoked_at') == 1 then return {0} end
local current = redis.call('HGET', KEYS[1], 'key_hash')
if current ~= ARGV[1] then return {1} end
if ARGV[2] ~= current and redis.call('EXISTS', KEYS[3]) == 1 then return {2} end
redis.call('DEL', KEYS[2])
redis.call('SET', KEYS[3], ARGV[3])
redis.call('HSET', KEYS[1], 'key_hash', ARGV[2], 'hint', ARGV[4])
return {3, redis.call('HGETALL', KEYS[1])}
"""


_unavailable = partial(unavailable_on, RedisConnectionError, RedisTimeoutError, OSError)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _pairs(flat: Sequence[Any]) -> dict[str, str]:
    return {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}


def _fields(key: APIKey) -> dict[str, str]:
    fields = {
        "id": key.id,
        "key_hash": key.key_hash,
        "owner": key.owner,
        "name": key.name,
        "plan": key.plan,
        "scopes": json.dumps(list(key.scopes)),
        "created_at": str(key.created_at),
        "hint": key.hint,
    }
    optional: dict[str, int | None] = {
        "rpm": key.rpm,
        "tpm": key.tpm,
        "expires_at": key.expires_at,
        "revoked_at": key.revoked_at,
    }
    fields.update({name: str(value) for name, value in optional.items() if value is not None})
    if key.models is not None:
        fields["models"] = json.dumps(list(key.models))
    return fields


def _key_from_fields(raw: Mapping[Any, Any]) -> APIKey:
    f = {_text(k): _text(v) for k, v in raw.items()}

    def opt_int(name: str) -> int | None:
        value = f.get(name)
        return None if value is None else int(value)

    models = f.get("models")
    return APIKey(
        id=f["id"],
        key_hash=f["key_hash"],
        owner=f["owner"],
        name=f["name"],
        plan=f["plan"],
        rpm=opt_int("rpm"),
        tpm=opt_int("tpm"),
        models=None if models is None else tuple(json.loads(models)),
        scopes=tuple(json.loads(f["scopes"])),
        created_at=int(f["created_at"]),
        expires_at=opt_int("expires_at"),
        revoked_at=opt_int("revoked_at"),
        hint=f["hint"],
    )


class RedisKeyStore:
    """A :class:`~ozwell_asgi.protocols.KeyStore` in Redis, shared by every process using the same prefix.

    ``create``, ``revoke`` and ``rotate`` are atomic Lua scripts; ``id`` and ``key_hash`` are unique; ``list`` is
    ordered by ``created_at`` then ``id``. Lost connections raise ``ServiceUnavailableError`` (503).
    """

    def __init__(self, client: aioredis.Redis, *, prefix: str = DEFAULT_PREFIX, owns_client: bool = False) -> None:
        self.client = client
        self.prefix = prefix
        self._owns_client = owns_client
        self._create = client.register_script(_CREATE)
        self._revoke = client.register_script(_REVOKE)
        self._rotate = client.register_script(_ROTATE)

    @classmethod
    def from_url(cls, url: str, *, prefix: str = DEFAULT_PREFIX, **client_kwargs: Any) -> RedisKeyStore:
        """A store owning a new client for ``redis://host:port/db`` or ``rediss://...``; ``aclose`` closes it."""
        scheme, sep, _ = url.partition("://")
        scheme = scheme.lower() if sep else ""
        if scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"not a Redis URL (scheme {scheme!r}); use redis://host:port/db or rediss://host:port/db")
        client_kwargs.setdefault("decode_responses", True)
        return cls(aioredis.Redis.from_url(url, **client_kwargs), prefix=prefix, owns_client=True)

    def _key(self, key_id: str) -> str:
        return f"{self.prefix}key:{key_id}"

    def _hash(self, key_hash: str) -> str:
        return f"{self.prefix}keyhash:{key_hash}"

    def _owner(self, owner: str) -> str:
        return f"{self.prefix}owner:{owner}"

    @property
    def _all(self) -> str:
        return f"{self.prefix}keys"

    async def create(self, key: APIKey) -> None:
        """Store ``key`` atomically; ``ValueError`` if its id or hash is taken (nothing is written then)."""
        args: list[str | float] = [key.id, float(key.created_at)]
        for name, value in _fields(key).items():
            args += [name, value]
        with _unavailable():
            result = await self._create(
                keys=[self._key(key.id), self._hash(key.key_hash), self._all, self._owner(key.owner)], args=args
            )
        if int(result) == 1:
            raise ValueError(f"an API key with id {key.id!r} already exists")
        if int(result) == 2:
            raise ValueError("an API key with this hash already exists")

    async def get_by_hash(self, key_hash: str) -> APIKey | None:
        """The key whose current hash is ``key_hash``, or ``None`` (checked against the key's own hash field)."""
        with _unavailable():
            key_id = await self.client.get(self._hash(key_hash))
            if key_id is None:
                return None
            raw = await self.client.hgetall(self._key(_text(key_id)))
        if not raw:
            return None
        key = _key_from_fields(raw)
        return key if key.key_hash == key_hash else None  # rotated between the two reads

    async def get(self, key_id: str) -> APIKey | None:
        """The key with id ``key_id``, or ``None``."""
        with _unavailable():
            raw = await self.client.hgetall(self._key(key_id))
        return _key_from_fields(raw) if raw else None

    async def list(self, owner: str | None = None) -> list[APIKey]:
        """Every key (of ``owner``, if given), revoked and expired ones included, by ``created_at`` then ``id``."""
        index = self._all if owner is None else self._owner(owner)
        keys: list[APIKey] = []
        with _unavailable():
            ids = [_text(i) for i in await self.client.zrange(index, 0, -1)]
            for start in range(0, len(ids), _LIST_CHUNK):
                async with self.client.pipeline(transaction=False) as pipe:
                    for key_id in ids[start : start + _LIST_CHUNK]:
                        pipe.hgetall(self._key(key_id))
                    results = await pipe.execute()
                keys += [_key_from_fields(raw) for raw in results if raw]
        keys.sort(key=lambda k: (k.created_at, k.id))
        return keys

    async def revoke(self, key_id: str, at: int) -> APIKey | None:
        """Set ``revoked_at`` to ``at`` unless already set (atomic; the first time is kept).

        The key as stored afterwards, or ``None`` if there is no such key.
        """
        with _unavailable():
            flat = await self._revoke(keys=[self._key(key_id)], args=[str(at)])
        return None if flat is None else _key_from_fields(_pairs(flat))

    async def rotate(self, key_id: str, key_hash: str, hint: str) -> APIKey | None:
        """Replace the hash and hint of the key if it is not revoked, atomically; the old hash stops resolving.

        The updated key, ``None`` if the key is unknown or revoked; ``ValueError`` if ``key_hash`` is taken.
        """
        with _unavailable():
            for _ in range(10):
                current = await self.client.hget(self._key(key_id), "key_hash")
                if current is None:
                    return None
                old = _text(current)
                result = await self._rotate(
                    keys=[self._key(key_id), self._hash(old), self._hash(key_hash)],
                    args=[old, key_hash, key_id, hint],
                )
                code = int(result[0])
                if code == 0:
                    return None
                if code == 2:
                    raise ValueError("an API key with this hash already exists")
                if code == 3:
                    return _key_from_fields(_pairs(result[1]))
                # code 1: rotated concurrently since we read it; read again.
        raise ServiceUnavailableError("The API key is being rotated concurrently. Please retry.")

    async def aclose(self) -> None:
        """Close the client if this store created it (``from_url``); a client passed in is left open."""
        if self._owns_client:
            await self.client.aclose()
