"""Redis stores on redis-py's asyncio client (the ``redis`` extra: ``pip install ozwell-asgi[redis]``).

Layout of the key store, under a configurable prefix (default ``"ozwell:"``):

- ``{prefix}key:{id}``: a hash of the key's fields (a ``None`` field is absent; ``models``/``scopes``/``origins``/
  ``endpoints`` are JSON);
- ``{prefix}keyhash:{key_hash}``: a string, the id of the key whose current hash it is;
- ``{prefix}keys`` and ``{prefix}owner:{owner}``: sorted sets of ids scored by ``created_at``.

Layout of the file store, under the same prefix:

- ``{prefix}file:{id}``: a hash of the file's metadata (with its ``owner``);
- ``{prefix}filedata:{id}``: its content, one string (when the content is kept in Redis);
- ``{prefix}fileupload:{id}:{token}``: content being uploaded, expiring unless the upload makes progress;
- ``{prefix}fileowner:{owner}`` and ``{prefix}filepurpose:{len(purpose)}:{purpose}:{owner}``: sorted sets of ids
  scored by ``created_at`` (the length prefix keeps two (purpose, owner) pairs from ever naming one key);
- ``{prefix}filepending``: ids whose content is being written to (or removed from) a content store, scored by
  the time of their last progress.

Layout of the response store (:class:`RedisResponseStore`), under the same prefix:

- ``{prefix}response:{id}``: a hash of the record (its JSON parts in ``data``), expiring ``ttl`` after its last put;
- ``{prefix}responseconv:{len(owner)}:{owner}:{conversation_id}``: a sorted set of the conversation's ids scored
  by ``created_at``, expiring with the last of them.

Every write is one Lua script, so it is atomic for every process sharing the server; a page is read by one
script too (a rank and a range of a sorted set), so it is a consistent cut. One instance, not a cluster: scripts
touch several keys.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping, Sequence
from functools import partial
from typing import Any

import anyio

try:
    import redis.asyncio as aioredis
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "ozwell_asgi.stores.redis needs redis-py; install it with: pip install ozwell-asgi[redis]"
    ) from exc

from ..errors import PayloadTooLargeError, ServiceUnavailableError
from ..protocols import ContentStore
from ..types import APIKey, Page, PageQuery, StoredFile, StoredResponse
from .outage import unavailable_on
from .response_codec import dump_parts, load_parts

__all__ = [
    "DEFAULT_MAX_FILE_BYTES",
    "DEFAULT_PREFIX",
    "DEFAULT_RESPONSE_TTL",
    "RedisFileStore",
    "RedisKeyStore",
    "RedisResponseStore",
    "RedisStorage",
]

log = logging.getLogger("ozwell_asgi.stores.redis")

DEFAULT_PREFIX = "ozwell:"
DEFAULT_MAX_FILE_BYTES = 64 * 1024 * 1024
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


# KEYS: a sorted set. ARGV: '1' to read towards higher ranks, limit, then the cursor id if there is one.
# The ids of one page plus one (to tell whether more follow), in ascending order, or false for an unknown cursor:
# no cursor -> the first (or, reading down, last) limit+1; a cursor -> the limit+1 nearest beyond it.
_PAGE = """
local upwards, limit = ARGV[1], tonumber(ARGV[2])
if #ARGV < 3 then
  if upwards == '1' then return redis.call('ZRANGE', KEYS[1], 0, limit) end
  return redis.call('ZRANGE', KEYS[1], -limit - 1, -1)
end
local rank = redis.call('ZRANK', KEYS[1], ARGV[3])
if not rank then return false end
if upwards == '1' then return redis.call('ZRANGE', KEYS[1], rank + 1, rank + 1 + limit) end
if rank == 0 then return {} end
return redis.call('ZRANGE', KEYS[1], math.max(0, rank - limit - 1), rank - 1)
"""

_unavailable = partial(unavailable_on, RedisConnectionError, RedisTimeoutError, OSError)
_file_unavailable = partial(unavailable_on, RedisConnectionError, RedisTimeoutError, OSError, what="file store")
_response_unavailable = partial(unavailable_on, RedisConnectionError, RedisTimeoutError, OSError, what="response store")


async def _page_ids(script: Any, index: str, query: PageQuery) -> tuple[list[str], bool] | None:
    """The ids of one page of the sorted set ``index`` in the query's order, and whether more follow
    (:func:`~ozwell_asgi.pages.paginate`'s cut); ``None`` for a cursor that is not in it."""
    cursor = query.after if query.after is not None else query.before
    limit = query.limit
    # Upwards (towards newer ids) unless the page lies below the cursor, or is the newest of a descending list.
    upwards = query.order == "asc" if cursor is None else (query.after is not None) == (query.order == "asc")
    args: list[str | int] = ["1" if upwards else "0", limit]
    if cursor is not None:
        args.append(cursor)
    raw = await script(keys=[index], args=args)
    if raw is None:
        return None
    ids = [_text(i) for i in raw]
    more = len(ids) > limit
    ids = ids[:limit] if upwards else ids[len(ids) - limit :] if more else ids
    if query.order == "desc":  # the script answers in ascending order
        ids.reverse()
    return ids, more


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
    for name, values in (("models", key.models), ("origins", key.origins), ("endpoints", key.endpoints)):
        if values is not None:
            fields[name] = json.dumps(list(values))
    return fields


def _key_from_fields(raw: Mapping[Any, Any]) -> APIKey:
    f = {_text(k): _text(v) for k, v in raw.items()}

    def opt_int(name: str) -> int | None:
        value = f.get(name)
        return None if value is None else int(value)

    def opt_list(name: str) -> tuple[str, ...] | None:
        value = f.get(name)
        return None if value is None else tuple(json.loads(value))

    return APIKey(
        id=f["id"],
        key_hash=f["key_hash"],
        owner=f["owner"],
        name=f["name"],
        plan=f["plan"],
        rpm=opt_int("rpm"),
        tpm=opt_int("tpm"),
        models=opt_list("models"),
        scopes=tuple(json.loads(f["scopes"])),
        created_at=int(f["created_at"]),
        expires_at=opt_int("expires_at"),
        revoked_at=opt_int("revoked_at"),
        hint=f["hint"],
        origins=opt_list("origins"),
        endpoints=opt_list("endpoints"),
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
        self._page = client.register_script(_PAGE)

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

    async def list_page(self, query: PageQuery, owner: str | None = None) -> Page[APIKey]:
        """One page of :meth:`list` (:func:`~ozwell_asgi.pages.paginate`'s answer): one script reads the page's
        ids from the sorted set, one pipeline their keys."""
        index = self._all if owner is None else self._owner(owner)
        with _unavailable():
            found = await _page_ids(self._page, index, query)
            if not found:
                return Page((), False)
            ids, more = found
            async with self.client.pipeline(transaction=False) as pipe:
                for key_id in ids:
                    pipe.hgetall(self._key(key_id))
                results = await pipe.execute()
        return Page(tuple(_key_from_fields(raw) for raw in results if raw), more)

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

    async def ping(self) -> None:
        """Raise unless Redis answers a ``PING``: for ``/health``."""
        await self.client.ping()


# --- files ------------------------------------------------------------------------------------------------------

_APPEND_BYTES = 256 * 1024  # content sent to Redis per APPEND while uploading
_READ_BYTES = 1024 * 1024  # content read per GETRANGE
_CLEANUP_TIMEOUT = 10.0
_SWEEP_EVERY = 60.0
_SWEEP_BATCH = 100

# KEYS: file hash, content key, upload key, owner index, purpose index. ARGV: id, score, has content ('1'/'0'),
# field, value, ... Returns 0 (published), 1 (the id is taken), 2 (the upload expired before it was published).
_PUBLISH = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 1 end
if ARGV[3] == '1' then
  if redis.call('EXISTS', KEYS[3]) == 0 then return 2 end
  redis.call('RENAME', KEYS[3], KEYS[2])
  redis.call('PERSIST', KEYS[2])
end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[5], ARGV[2], ARGV[1])
return 0
"""

# KEYS: file hash, pending set, owner index, purpose index. ARGV: id, score, field, value, ...
# Publishes a file whose content is in a content store. 0 published, 1 id taken, 2 no longer pending (swept).
_PUBLISH_ELSEWHERE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 1 end
if redis.call('ZREM', KEYS[2], ARGV[1]) == 0 then return 2 end
redis.call('HSET', KEYS[1], unpack(ARGV, 3))
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[1])
return 0
"""

# KEYS: file hash, pending set. ARGV: id, now. Claims an id for an upload to a content store: 0 claimed, 1 taken.
_CLAIM = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 1 end
if redis.call('ZADD', KEYS[2], 'NX', ARGV[2], ARGV[1]) == 0 then return 1 end
return 0
"""

# KEYS: file hash, content key, owner index, purpose index, pending set. ARGV: id, owner, purpose, '1' to leave
# the id in the pending set (score 0: sweepable at once) while a content store's bytes are removed.
# 1 if the file of this owner was removed, else 0.
_DELETE = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[2] then return 0 end
if redis.call('HGET', KEYS[1], 'purpose') ~= ARGV[3] then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[4], ARGV[1])
if ARGV[4] == '1' then redis.call('ZADD', KEYS[5], 0, ARGV[1]) end
return 1
"""

# KEYS: pending set. ARGV: id, threshold. Removes the id if its last progress is older than the threshold.
_CLAIM_STALE = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
return 1
"""


def _file_fields(file: StoredFile, size: int) -> dict[str, str]:
    fields = {
        "id": file.id,
        "owner": file.owner,
        "filename": file.filename,
        "purpose": file.purpose,
        "bytes": str(size),
        "created_at": str(file.created_at),
        "content_type": file.content_type,
    }
    if file.expires_at is not None:
        fields["expires_at"] = str(file.expires_at)
    return fields


def _file_from_fields(raw: Mapping[Any, Any]) -> StoredFile:
    f = {_text(k): _text(v) for k, v in raw.items()}
    expires_at = f.get("expires_at")
    return StoredFile(
        id=f["id"],
        owner=f["owner"],
        filename=f["filename"],
        purpose=f["purpose"],
        bytes=int(f["bytes"]),
        created_at=int(f["created_at"]),
        expires_at=None if expires_at is None else int(expires_at),
        content_type=f["content_type"],
    )


def _abandoned() -> ServiceUnavailableError:
    return ServiceUnavailableError(
        "The upload made no progress for too long and was abandoned. Please retry.", code="upload_abandoned"
    )


async def _quietly(close: Callable[[], Any], what: str) -> None:
    """Await ``close()`` even in a cancelled task (shielded, bounded); a failure is logged, never raised."""
    with anyio.move_on_after(_CLEANUP_TIMEOUT, shield=True):
        try:
            await close()
        except Exception as exc:
            log.warning("%s failed: %s", what, type(exc).__name__)


class RedisFileStore:
    """A :class:`~ozwell_asgi.protocols.FileStore` in Redis: metadata, and content up to ``max_file_bytes`` per file
    (64 MiB by default; Redis holds it in memory), or with the content in a ``content`` store (no size cap here).

    Guarantees: owner-scoped (another owner's id is an unknown id); ``create`` is all or nothing: content is
    appended to an upload key (at most 256 KiB held at once) that expires ``stale_after`` seconds after the
    upload's last progress, and one script publishes metadata, content and index entries together; a failure or
    cancellation deletes the upload key at once. Past ``max_file_bytes`` it raises
    :class:`~ozwell_asgi.errors.PayloadTooLargeError` (413) and stores nothing. With a ``content`` store, the id is
    claimed in a pending set first, the bytes put, then the metadata published; what a crash leaves is removed by
    :meth:`sweep`. ``list`` reads one consistent page (one script over a sorted set of ids scored by
    ``created_at``: Redis orders equal scores by id, bytewise), stable under concurrent creates. Reads fetch 1 MiB
    at a time; a file deleted while it is read makes the read raise ``FileNotFoundError``.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        content: ContentStore | None = None,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
        stale_after: float = 3600.0,
        clock: Callable[[], float] = time.time,
        owns_client: bool = False,
    ) -> None:
        if not 0 < max_file_bytes <= 512 * 1024 * 1024:
            raise ValueError("max_file_bytes must be between 1 byte and 512 MiB (Redis's largest string)")
        if stale_after <= 0:
            raise ValueError("stale_after must be > 0")
        if client.connection_pool.connection_kwargs.get("decode_responses"):
            raise ValueError("a RedisFileStore needs a client made with decode_responses=False (content is bytes)")
        self.client = client
        self.prefix = prefix
        self.content = content
        self.max_file_bytes = max_file_bytes
        self.stale_after = stale_after
        self.clock = clock
        self._owns_client = owns_client
        self._publish = client.register_script(_PUBLISH)
        self._publish_elsewhere = client.register_script(_PUBLISH_ELSEWHERE)
        self._claim = client.register_script(_CLAIM)
        self._delete = client.register_script(_DELETE)
        self._claim_stale = client.register_script(_CLAIM_STALE)
        self._page = client.register_script(_PAGE)
        self._next_sweep = 0.0

    @classmethod
    def from_url(cls, url: str, *, prefix: str = DEFAULT_PREFIX, **options: Any) -> RedisFileStore:
        """A store owning a new client for ``redis://host:port/db`` or ``rediss://...``; ``aclose`` closes it."""
        return cls(_binary_client(url), prefix=prefix, owns_client=True, **options)

    def _meta(self, file_id: str) -> str:
        return f"{self.prefix}file:{file_id}"

    def _data(self, file_id: str) -> str:
        return f"{self.prefix}filedata:{file_id}"

    def _owner_index(self, owner: str) -> str:
        return f"{self.prefix}fileowner:{owner}"

    def _purpose_index(self, owner: str, purpose: str) -> str:
        return f"{self.prefix}filepurpose:{len(purpose)}:{purpose}:{owner}"

    @property
    def _pending(self) -> str:
        return f"{self.prefix}filepending"

    # -- create ---------------------------------------------------------------------------------------------------

    async def create(self, file: StoredFile, content: AsyncIterable[bytes]) -> StoredFile:
        """Store ``file`` and its ``content``, all or nothing; ``ValueError`` if the id is taken (nothing is written
        then). What ``content`` raises is raised as it is."""
        await self._sweep_if_due()
        if self.content is not None:
            return await self._create_elsewhere(self.content, file, content)
        with _file_unavailable():
            if await self.client.exists(self._meta(file.id)):
                raise ValueError(f"a file with id {file.id!r} already exists")
        upload = f"{self.prefix}fileupload:{file.id}:{secrets.token_hex(8)}"
        ttl = max(1, int(self.stale_after))
        try:
            size = 0
            pending = bytearray()
            async for piece in content:
                if not piece:
                    continue
                size += len(piece)
                if size > self.max_file_bytes:
                    raise PayloadTooLargeError(
                        f"A file in this store may be at most {self.max_file_bytes} bytes.", code="file_too_large"
                    )
                pending += piece
                if len(pending) >= _APPEND_BYTES:
                    await self._append(upload, pending, ttl)
                    pending.clear()
            if pending:
                await self._append(upload, pending, ttl)
            keys = [self._meta(file.id), self._data(file.id), upload]
            keys += [self._owner_index(file.owner), self._purpose_index(file.owner, file.purpose)]
            args: list[str | float] = [file.id, float(file.created_at), "1" if size else "0"]
            for name, value in _file_fields(file, size).items():
                args += [name, value]
            with _file_unavailable():
                result = int(await self._publish(keys=keys, args=args))
        except BaseException:
            await _quietly(lambda: self.client.delete(upload), "removing a failed upload")
            raise
        if result == 1:
            await _quietly(lambda: self.client.delete(upload), "removing a failed upload")
            raise ValueError(f"a file with id {file.id!r} already exists")
        if result == 2:
            raise _abandoned()
        return dataclasses.replace(file, bytes=size)

    async def _append(self, upload: str, data: bytearray, ttl: int) -> None:
        with _file_unavailable():
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.append(upload, bytes(data))
                pipe.expire(upload, ttl)
                await pipe.execute()

    async def _create_elsewhere(
        self, store: ContentStore, file: StoredFile, content: AsyncIterable[bytes]
    ) -> StoredFile:
        with _file_unavailable():
            taken = int(await self._claim(keys=[self._meta(file.id), self._pending], args=[file.id, self.clock()]))
        if taken:
            raise ValueError(f"a file with id {file.id!r} already exists")
        result = -1
        try:
            size = await store.put(file.id, self._renewing(file.id, content))
            keys = [self._meta(file.id), self._pending]
            keys += [self._owner_index(file.owner), self._purpose_index(file.owner, file.purpose)]
            args: list[str | float] = [file.id, float(file.created_at)]
            for name, value in _file_fields(file, size).items():
                args += [name, value]
            with _file_unavailable():
                result = int(await self._publish_elsewhere(keys=keys, args=args))
        except BaseException:

            async def discard() -> None:
                # The pending entry decides: publishing removes it atomically, so if it is still ours to remove,
                # nothing was published and the bytes are ours to delete (a reply lost to a cancellation
                # included); otherwise they belong to the published file, or to the sweep.
                if await self.client.zrem(self._pending, file.id):
                    await store.delete(file.id)

            await _quietly(discard, "removing a failed upload")
            raise
        if result == 1:  # another writer published this id without claiming it: its bytes are under the same key
            await _quietly(lambda: self.client.zrem(self._pending, file.id), "releasing a claim")
            raise ValueError(f"a file with id {file.id!r} already exists")
        if result == 2:
            raise _abandoned()  # swept meanwhile: the sweep removes the bytes
        return dataclasses.replace(file, bytes=size)

    async def _renewing(self, file_id: str, content: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
        """``content``, marking the claim of ``file_id`` alive at most every ``stale_after / 4`` seconds."""
        due = self.clock() + self.stale_after / 4
        async for piece in content:
            if self.clock() >= due:
                due = self.clock() + self.stale_after / 4
                with _file_unavailable():
                    renewed = await self.client.zadd(self._pending, {file_id: self.clock()}, xx=True, ch=True)
                    if not renewed and await self.client.zscore(self._pending, file_id) is None:
                        raise _abandoned()
            yield piece

    # -- sweeping what a crash left -----------------------------------------------------------------------------

    async def _sweep_if_due(self) -> None:
        if self.content is None:
            return  # upload keys expire by themselves
        now = self.clock()
        if now < self._next_sweep:
            return
        self._next_sweep = now + _SWEEP_EVERY
        try:
            await self.sweep()
        except Exception as exc:
            log.warning("sweeping abandoned uploads failed: %s", type(exc).__name__)

    async def sweep(self) -> int:
        """Remove the content store's bytes of uploads and deletions a crash left: ids in the pending set untouched
        for ``stale_after`` seconds (at most 100 per call); how many were removed. Content kept in Redis needs no
        sweep (upload keys expire). ``create`` calls it at most once a minute."""
        if self.content is None:
            return 0
        threshold = self.clock() - self.stale_after
        with _file_unavailable():
            stale = await self.client.zrangebyscore(self._pending, "-inf", f"({threshold}", start=0, num=_SWEEP_BATCH)
        removed = 0
        for raw in stale:
            file_id = _text(raw)
            with _file_unavailable():
                claimed = int(await self._claim_stale(keys=[self._pending], args=[file_id, threshold]))
            if claimed:
                await self.content.delete(file_id)
                removed += 1
        return removed

    # -- reads ----------------------------------------------------------------------------------------------------

    async def _fields(self, owner: str, file_id: str) -> StoredFile | None:
        with _file_unavailable():
            raw = await self.client.hgetall(self._meta(file_id))
        if not raw:
            return None
        file = _file_from_fields(raw)
        return file if file.owner == owner else None

    async def get(self, owner: str, file_id: str) -> StoredFile | None:
        """The file ``file_id`` of ``owner``, or ``None``."""
        return await self._fields(owner, file_id)

    async def list(self, owner: str, query: PageQuery, purpose: str | None = None) -> Page[StoredFile]:
        """One page of ``owner``'s files (of ``purpose``, if given): :func:`~ozwell_asgi.pages.paginate`'s answer."""
        index = self._owner_index(owner) if purpose is None else self._purpose_index(owner, purpose)
        with _file_unavailable():
            found = await _page_ids(self._page, index, query)
            if not found:
                return Page((), False)
            ids, more = found
            async with self.client.pipeline(transaction=False) as pipe:
                for file_id in ids:
                    pipe.hgetall(self._meta(file_id))
                results = await pipe.execute()
        files = (_file_from_fields(raw) for raw in results if raw)
        return Page(tuple(f for f in files if f.owner == owner), more)

    async def open(
        self, owner: str, file_id: str, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes] | None:
        """The bytes ``[start, end)`` of ``owner``'s file, read 1 MiB at a time as they are sent, or ``None``."""
        file = await self._fields(owner, file_id)
        if file is None:
            return None
        start = min(max(start, 0), file.bytes)
        end = file.bytes if end is None else min(max(end, start), file.bytes)
        if self.content is not None:
            return self.content.get(file_id, start, end)
        return self._read(file_id, start, end)

    async def _read(self, file_id: str, start: int, end: int) -> AsyncIterator[bytes]:
        key = self._data(file_id)
        position = start
        while position < end:
            stop = min(position + _READ_BYTES, end)
            with _file_unavailable():
                data = await self.client.getrange(key, position, stop - 1)
            if not isinstance(data, bytes) or len(data) != stop - position:
                raise FileNotFoundError(f"the file {file_id!r} was deleted while it was read")
            yield data
            position = stop

    # -- delete ---------------------------------------------------------------------------------------------------

    async def delete(self, owner: str, file_id: str) -> bool:
        """Remove ``owner``'s file and its content (one script; with a content store, the bytes right after, the id
        left pending until they are gone); ``False`` if there was no such file."""
        file = await self._fields(owner, file_id)
        if file is None:
            return False
        keys = [self._meta(file_id), self._data(file_id), self._owner_index(owner)]
        keys += [self._purpose_index(owner, file.purpose), self._pending]
        elsewhere = "1" if self.content is not None else "0"
        with _file_unavailable():
            removed = int(await self._delete(keys=keys, args=[file_id, owner, file.purpose, elsewhere]))
        if not removed:
            return False
        if self.content is not None:
            await self.content.delete(file_id)
            with _file_unavailable():
                await self.client.zrem(self._pending, file_id)
        return True

    async def aclose(self) -> None:
        """Close the client if this store created it (``from_url``); a client passed in is left open."""
        if self._owns_client:
            await self.client.aclose()

    async def ping(self) -> None:
        """Raise unless Redis answers a ``PING``, and the content store, if it has ``ping``: for ``/health``."""
        await self.client.ping()
        ping = getattr(self.content, "ping", None)
        if ping is not None:
            await ping()


# --- responses ------------------------------------------------------------------------------------------------

DEFAULT_RESPONSE_TTL = 30 * 24 * 3600.0  # seconds: OpenAI keeps a stored response 30 days
_LAST_BATCH = 16  # index entries read per round by last_in_conversation
_RETRIES = 10

# KEYS: record hash, the sorted set of its new conversation ('' for none), the sorted set it is in now, as read
# ('' for none). ARGV: id, owner, conversation id as read ('' for none), ttl in ms, score, field, value, ...
# 0 stored, 1 another owner holds the id, 2 the record moved since it was read (read again).
_PUT_RESPONSE = """
local owner = redis.call('HGET', KEYS[1], 'owner')
if owner and owner ~= ARGV[2] then return 1 end
if (redis.call('HGET', KEYS[1], 'conversation_id') or '') ~= ARGV[3] then return 2 end
if KEYS[3] ~= '' and KEYS[3] ~= KEYS[2] then redis.call('ZREM', KEYS[3], ARGV[1]) end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], unpack(ARGV, 6))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
if KEYS[2] ~= '' then
  redis.call('ZADD', KEYS[2], ARGV[5], ARGV[1])
  if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[4]) then redis.call('PEXPIRE', KEYS[2], ARGV[4]) end
end
return 0
"""

# KEYS: record hash, the sorted set it is in, as read ('' for none). ARGV: id, owner, conversation id as read.
# 1 deleted, 0 no such record of this owner, 2 the record moved since it was read (read again).
_DELETE_RESPONSE = """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[2] then return 0 end
if (redis.call('HGET', KEYS[1], 'conversation_id') or '') ~= ARGV[3] then return 2 end
redis.call('DEL', KEYS[1])
if KEYS[2] ~= '' then redis.call('ZREM', KEYS[2], ARGV[1]) end
return 1
"""

# KEYS: a conversation's sorted set, a record hash. ARGV: id, owner, conversation id. Removes the id from the set
# unless the record is there and still belongs to that owner's conversation (it expired, or was replaced
# elsewhere by another owner after expiring); 1 if removed.
_PRUNE_RESPONSE = """
local fields = redis.call('HMGET', KEYS[2], 'owner', 'conversation_id')
if fields[1] == ARGV[2] and fields[2] == ARGV[3] then return 0 end
return redis.call('ZREM', KEYS[1], ARGV[1])
"""


def _response_fields(record: StoredResponse) -> dict[str, str]:
    fields = {
        "id": record.id,
        "owner": record.owner,
        "created_at": str(record.created_at),
        "status": record.status,
        "key_id": record.key_id,
        "data": dump_parts(record),
    }
    if record.conversation_id is not None:
        fields["conversation_id"] = record.conversation_id
    return fields


def _response_from_fields(raw: Mapping[Any, Any]) -> StoredResponse:
    f = {_text(k): v for k, v in raw.items()}
    head = StoredResponse(
        id=_text(f["id"]),
        owner=_text(f["owner"]),
        created_at=int(f["created_at"]),
        status=_text(f["status"]),
        response={},
        conversation_id=None if f.get("conversation_id") is None else _text(f["conversation_id"]),
        key_id=_text(f["key_id"]),
    )
    return load_parts(head, f["data"])


class RedisResponseStore:
    """A :class:`~ozwell_asgi.protocols.ResponseStore` in Redis, shared by every process using the same prefix.

    Layout (under ``prefix``): ``response:{id}``, a hash of the record (its JSON parts in ``data``); and
    ``responseconv:{len(owner)}:{owner}:{conversation_id}``, a sorted set of the conversation's ids scored by
    ``created_at`` (Redis orders equal scores by id, bytewise: the order of ``(created_at, id)``).

    Bounded by time: each record expires ``ttl`` seconds (default 30 days, as OpenAI keeps responses) after its
    last ``put``; a conversation's set expires with the last of its records (each ``put`` extends it to at least
    ``ttl``), and ``last_in_conversation`` removes the entries of records that expired before it, so it answers
    the newest record still there. ``put`` and ``delete`` are Lua scripts, atomic for every process: a ``put``
    replaces the record of the same id and owner whole (moving it between conversations if it changed) or, for
    an id another owner holds, raises ``ValueError`` and changes nothing. Lost connections raise
    ``ServiceUnavailableError`` (503). One server, not a cluster (a script touches several keys).
    """

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        ttl: float = DEFAULT_RESPONSE_TTL,
        owns_client: bool = False,
    ) -> None:
        if not 0.001 <= ttl <= 10 * 365 * 24 * 3600:
            raise ValueError("ttl must be between 1 ms and 10 years (in seconds)")
        self.client = client
        self.prefix = prefix
        self.ttl = ttl
        self._owns_client = owns_client
        self._put = client.register_script(_PUT_RESPONSE)
        self._delete = client.register_script(_DELETE_RESPONSE)
        self._prune = client.register_script(_PRUNE_RESPONSE)

    @classmethod
    def from_url(cls, url: str, *, prefix: str = DEFAULT_PREFIX, **options: Any) -> RedisResponseStore:
        """A store owning a new client for ``redis://host:port/db`` or ``rediss://...``; ``aclose`` closes it."""
        return cls(_binary_client(url), prefix=prefix, owns_client=True, **options)

    def _record(self, response_id: str) -> str:
        return f"{self.prefix}response:{response_id}"

    def _conversation(self, owner: str, conversation_id: str | None) -> str:
        if conversation_id is None:
            return ""
        return f"{self.prefix}responseconv:{len(owner)}:{owner}:{conversation_id}"

    async def _placed(self, response_id: str) -> tuple[str | None, str | None]:
        """The owner and conversation id of the record ``response_id`` as stored now (``None`` for none)."""
        owner, conversation_id = await self.client.hmget(self._record(response_id), ["owner", "conversation_id"])
        return (
            None if owner is None else _text(owner),
            None if conversation_id is None else _text(conversation_id),
        )

    async def put(self, record: StoredResponse) -> None:
        """Store ``record`` (its TTL starts again) or replace the record of the same id and owner, atomically;
        ``ValueError`` (nothing written) if another owner holds the id or the parts are not JSON-ready."""
        ttl_ms = max(1, round(self.ttl * 1000))
        args: list[str | int | float] = [record.id, record.owner, "", ttl_ms, float(record.created_at)]
        for name, value in _response_fields(record).items():
            args += [name, value]
        key, index = self._record(record.id), self._conversation(record.owner, record.conversation_id)
        with _response_unavailable():
            for _ in range(_RETRIES):
                owner, conversation_id = await self._placed(record.id)
                if owner is not None and owner != record.owner:
                    break
                args[2] = conversation_id or ""
                current = self._conversation(record.owner, conversation_id)
                result = int(await self._put(keys=[key, index, current], args=args))
                if result == 0:
                    return
                if result == 1:
                    break
            else:
                raise ServiceUnavailableError("The response is being written concurrently. Please retry.")
        raise ValueError(f"a response with id {record.id!r} belongs to another owner")

    async def get(self, owner: str, response_id: str) -> StoredResponse | None:
        """``owner``'s record ``response_id``, or ``None`` (one HGETALL)."""
        with _response_unavailable():
            raw = await self.client.hgetall(self._record(response_id))
        if not raw:
            return None
        record = _response_from_fields(raw)
        return record if record.owner == owner else None

    async def delete(self, owner: str, response_id: str) -> bool:
        """Remove ``owner``'s record and its index entry, atomically; ``False`` if there was none."""
        with _response_unavailable():
            for _ in range(_RETRIES):
                found, conversation_id = await self._placed(response_id)
                if found != owner:
                    return False
                keys = [self._record(response_id), self._conversation(owner, conversation_id)]
                result = int(await self._delete(keys=keys, args=[response_id, owner, conversation_id or ""]))
                if result != 2:
                    return result == 1
        raise ServiceUnavailableError("The response is being written concurrently. Please retry.")

    async def last_in_conversation(self, owner: str, conversation_id: str) -> StoredResponse | None:
        """The newest record (by ``created_at``, then ``id``) of ``owner``'s conversation still stored, or ``None``.

        Reads the conversation's set from the top, 16 entries a round; the entries of expired records it meets are
        removed (each once), so a round costs more only when records expired since the last call."""
        index = self._conversation(owner, conversation_id)
        start = 0
        with _response_unavailable():
            while True:
                ids = [_text(i) for i in await self.client.zrevrange(index, start, start + _LAST_BATCH - 1)]
                if not ids:
                    return None
                async with self.client.pipeline(transaction=False) as pipe:
                    for response_id in ids:
                        pipe.hgetall(self._record(response_id))
                    found = await pipe.execute()
                pruned = 0
                for response_id, raw in zip(ids, found, strict=True):
                    if raw:
                        record = _response_from_fields(raw)
                        if record.owner == owner and record.conversation_id == conversation_id:
                            return record
                    keys = [index, self._record(response_id)]
                    pruned += int(await self._prune(keys=keys, args=[response_id, owner, conversation_id]))
                start += len(ids) - pruned

    async def aclose(self) -> None:
        """Close the client if this store created it (``from_url``); a client passed in is left open."""
        if self._owns_client:
            await self.client.aclose()


def _binary_client(url: str, **client_kwargs: Any) -> aioredis.Redis:
    scheme, sep, _ = url.partition("://")
    scheme = scheme.lower() if sep else ""
    if scheme not in ("redis", "rediss", "unix"):
        raise ValueError(f"not a Redis URL (scheme {scheme!r}); use redis://host:port/db or rediss://host:port/db")
    client_kwargs["decode_responses"] = False  # file content is bytes; the key store reads either form
    return aioredis.Redis.from_url(url, **client_kwargs)


class RedisStorage:
    """One Redis client for every store on one URL (``open_storage("redis://...")``): keys, files and responses
    share its connection pool under one ``prefix``; :meth:`aclose` closes it once."""

    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str = DEFAULT_PREFIX,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
        response_ttl: float = DEFAULT_RESPONSE_TTL,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.max_file_bytes = max_file_bytes
        self.response_ttl = response_ttl

    @classmethod
    def from_url(cls, url: str, *, prefix: str = DEFAULT_PREFIX, **options: Any) -> RedisStorage:
        return cls(_binary_client(url), prefix=prefix, **options)

    def key_store(self) -> RedisKeyStore:
        return RedisKeyStore(self.client, prefix=self.prefix)

    def file_store(self, content: ContentStore | None = None, **options: Any) -> RedisFileStore:
        options.setdefault("max_file_bytes", self.max_file_bytes)
        return RedisFileStore(self.client, prefix=self.prefix, content=content, **options)

    def response_store(self, **options: Any) -> RedisResponseStore:
        """A response store on this client; ``options`` are :class:`RedisResponseStore`'s (``ttl`` defaults to
        the storage's ``response_ttl``)."""
        options.setdefault("ttl", self.response_ttl)
        return RedisResponseStore(self.client, prefix=self.prefix, **options)

    async def aclose(self) -> None:
        await self.client.aclose()

    async def ping(self) -> None:
        """Raise unless Redis answers a ``PING``."""
        await self.client.ping()
