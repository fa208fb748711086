"""Process-local stores: everything lives in this process's memory and is gone when it exits.

For tests, demos and single-process hosts. Every method runs without an ``await`` in between its reads and
writes, so each is atomic with respect to the other tasks of the event loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterable, AsyncIterator

from ..errors import PayloadTooLargeError
from ..pages import paginate
from ..types import APIKey, Page, PageQuery, StoredFile

__all__ = ["MemoryFileStore", "MemoryKeyStore"]


class MemoryKeyStore:
    """A :class:`~ozwell_asgi.protocols.KeyStore` in two dicts (by id, by hash); nothing persists.

    Every method is atomic (no suspension point inside), ``id`` and ``key_hash`` are unique, ``list`` is ordered
    by ``created_at`` then ``id``.
    """

    def __init__(self) -> None:
        self._by_id: dict[str, APIKey] = {}
        self._id_by_hash: dict[str, str] = {}

    async def create(self, key: APIKey) -> None:
        """Store ``key``; ``ValueError`` if its id or hash is taken (and nothing is stored)."""
        if key.id in self._by_id:
            raise ValueError(f"an API key with id {key.id!r} already exists")
        if key.key_hash in self._id_by_hash:
            raise ValueError("an API key with this hash already exists")
        self._by_id[key.id] = key
        self._id_by_hash[key.key_hash] = key.id

    async def get_by_hash(self, key_hash: str) -> APIKey | None:
        """The key whose current hash is ``key_hash``, or ``None``."""
        key_id = self._id_by_hash.get(key_hash)
        return None if key_id is None else self._by_id.get(key_id)

    async def get(self, key_id: str) -> APIKey | None:
        """The key with id ``key_id``, or ``None``."""
        return self._by_id.get(key_id)

    async def list(self, owner: str | None = None) -> list[APIKey]:
        """Every key (of ``owner``, if given), revoked and expired ones included, by ``created_at`` then ``id``."""
        keys = self._by_id.values() if owner is None else (k for k in self._by_id.values() if k.owner == owner)
        return sorted(keys, key=lambda k: (k.created_at, k.id))

    async def revoke(self, key_id: str, at: int) -> APIKey | None:
        """Mark the key revoked at ``at`` unless it already is (the first time is kept); ``None`` if unknown."""
        key = self._by_id.get(key_id)
        if key is None or key.revoked_at is not None:
            return key
        key = dataclasses.replace(key, revoked_at=at)
        self._by_id[key_id] = key
        return key

    async def rotate(self, key_id: str, key_hash: str, hint: str) -> APIKey | None:
        """Replace the hash and hint of an active key (the old hash stops resolving at once).

        ``None`` if the key is unknown or revoked; ``ValueError`` if ``key_hash`` belongs to another key.
        """
        key = self._by_id.get(key_id)
        if key is None or key.revoked_at is not None:
            return None
        holder = self._id_by_hash.get(key_hash)
        if holder is not None and holder != key_id:
            raise ValueError("an API key with this hash already exists")
        del self._id_by_hash[key.key_hash]
        key = dataclasses.replace(key, key_hash=key_hash, hint=hint)
        self._by_id[key_id] = key
        self._id_by_hash[key_hash] = key_id
        return key


class MemoryFileStore:
    """A :class:`~ozwell_asgi.protocols.FileStore` in this process's memory: metadata in a dict, content as the
    list of chunks it arrived in (never joined into one bytes object).

    ``create`` stores nothing until the whole content has arrived, so a failed upload leaves nothing; other
    methods are atomic (no suspension point). ``max_total_bytes`` (default 1 GiB) bounds what the store holds: an
    upload that would pass it fails with :class:`~ozwell_asgi.errors.PayloadTooLargeError` and stores nothing.
    """

    def __init__(self, *, max_total_bytes: int = 1 << 30) -> None:
        self.max_total_bytes = max_total_bytes
        self._files: dict[str, StoredFile] = {}
        self._content: dict[str, tuple[bytes, ...]] = {}
        self._total = 0

    async def create(self, file: StoredFile, content: AsyncIterable[bytes]) -> StoredFile:
        if file.id in self._files:
            raise ValueError(f"a file with id {file.id!r} already exists")
        chunks: list[bytes] = []
        size = 0
        async for chunk in content:
            if chunk:
                size += len(chunk)
                if self._total + size > self.max_total_bytes:
                    raise PayloadTooLargeError("The file store is full.", code="file_store_full")
                chunks.append(bytes(chunk))
        if file.id in self._files:  # created concurrently while this content arrived
            raise ValueError(f"a file with id {file.id!r} already exists")
        stored = dataclasses.replace(file, bytes=size)
        self._files[file.id] = stored
        self._content[file.id] = tuple(chunks)
        self._total += size
        return stored

    async def get(self, owner: str, file_id: str) -> StoredFile | None:
        file = self._files.get(file_id)
        return file if file is not None and file.owner == owner else None

    async def list(self, owner: str, query: PageQuery, purpose: str | None = None) -> Page[StoredFile]:
        mine = sorted(
            (f for f in self._files.values() if f.owner == owner and (purpose is None or f.purpose == purpose)),
            key=lambda f: (f.created_at, f.id),
        )
        return paginate(mine, query, lambda f: f.id)

    async def open(
        self, owner: str, file_id: str, start: int = 0, end: int | None = None
    ) -> AsyncIterator[bytes] | None:
        if await self.get(owner, file_id) is None:
            return None
        return _slice(self._content[file_id], start, end)

    async def delete(self, owner: str, file_id: str) -> bool:
        if await self.get(owner, file_id) is None:
            return False
        self._total -= self._files.pop(file_id).bytes
        del self._content[file_id]
        return True


async def _slice(chunks: tuple[bytes, ...], start: int, end: int | None) -> AsyncIterator[bytes]:
    """The bytes ``[start, end)`` of content held as ``chunks``, chunk by chunk (views, no copy of the whole)."""
    position = 0
    for chunk in chunks:
        size = len(chunk)
        lo, hi = max(start - position, 0), size if end is None else min(end - position, size)
        if lo < hi:
            yield chunk if lo == 0 and hi == size else chunk[lo:hi]
        position += size
        if end is not None and position >= end:
            return
