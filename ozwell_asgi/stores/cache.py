"""A bounded, short-lived cache of key lookups, in front of any key store (the request hot path)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from ..protocols import KeyStore
from ..types import APIKey, Page, PageQuery

__all__ = ["CachedKeyStore"]


class CachedKeyStore:
    """A :class:`~ozwell_asgi.protocols.KeyStore` caching ``inner.get_by_hash`` (hits and misses) for ``ttl`` s.

    Guarantees: at most ``max_entries`` entries (least recently used evicted first); a cached answer is at most
    ``ttl`` seconds old, so a change made through another process (a revoke, say) is seen within ``ttl``; a
    ``create``, ``revoke`` or ``rotate`` made through this instance is seen by it at once. ``ttl=0`` disables
    caching (every call goes to ``inner``). A hit is a dict lookup and a clock read: no I/O, no lock.
    Every other method passes through, with ``inner``'s atomicity. ``clock`` (seconds, monotonic; the attribute
    ``clock``) measures the TTL; tests may inject one.
    """

    def __init__(
        self,
        inner: KeyStore,
        ttl: float = 5.0,
        max_entries: int = 10_000,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl < 0:
            raise ValueError("ttl must be >= 0")
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.inner = inner
        self.ttl = ttl
        self.max_entries = max_entries
        self.clock = clock
        self._entries: OrderedDict[str, tuple[float, APIKey | None]] = OrderedDict()
        # Bumped by every write through this instance: a lookup that was in flight across a write does not
        # cache its (possibly older) answer.
        self._generation = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _put(self, key_hash: str, value: APIKey | None) -> None:
        entries = self._entries
        entries[key_hash] = (self.clock() + self.ttl, value)
        entries.move_to_end(key_hash)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)

    def _forget_id(self, key_id: str) -> None:
        stale = [h for h, (_, v) in self._entries.items() if v is not None and v.id == key_id]
        for key_hash in stale:
            del self._entries[key_hash]

    def clear(self) -> None:
        """Drop every cached answer; the next lookups go to ``inner``."""
        self._entries.clear()
        self._generation += 1

    async def get_by_hash(self, key_hash: str) -> APIKey | None:
        """``inner.get_by_hash(key_hash)``, answered from the cache when an entry younger than ``ttl`` exists."""
        if self.ttl <= 0:
            return await self.inner.get_by_hash(key_hash)
        entry = self._entries.get(key_hash)
        if entry is not None:
            if entry[0] > self.clock():
                self._entries.move_to_end(key_hash)
                return entry[1]
            del self._entries[key_hash]
        generation = self._generation
        value = await self.inner.get_by_hash(key_hash)
        if generation == self._generation:
            self._put(key_hash, value)
        return value

    async def get(self, key_id: str) -> APIKey | None:
        """``inner.get`` (not cached)."""
        return await self.inner.get(key_id)

    async def list(self, owner: str | None = None) -> list[APIKey]:
        """``inner.list`` (not cached): every key, or every key of ``owner``, by ``created_at`` then ``id``."""
        return await self.inner.list(owner)

    async def list_page(self, query: PageQuery, owner: str | None = None) -> Page[APIKey]:
        """``inner.list_page`` (not cached)."""
        return await self.inner.list_page(query, owner)

    async def create(self, key: APIKey) -> None:
        """``inner.create``; a cached miss for the new hash is replaced by the key at once."""
        try:
            await self.inner.create(key)
        finally:
            self._generation += 1
            self._entries.pop(key.key_hash, None)
        if self.ttl > 0:
            self._put(key.key_hash, key)

    async def revoke(self, key_id: str, at: int) -> APIKey | None:
        """``inner.revoke``; this instance's cache shows the revocation at once."""
        try:
            key = await self.inner.revoke(key_id, at)
        finally:
            self._generation += 1
            self._forget_id(key_id)
        if key is not None and self.ttl > 0:
            self._put(key.key_hash, key)
        return key

    async def rotate(self, key_id: str, key_hash: str, hint: str) -> APIKey | None:
        """``inner.rotate``; in this instance the old hash stops resolving and the new one resolves at once."""
        try:
            key = await self.inner.rotate(key_id, key_hash, hint)
        finally:
            self._generation += 1
            self._forget_id(key_id)
            self._entries.pop(key_hash, None)
        if key is not None and self.ttl > 0:
            self._put(key.key_hash, key)
        return key

    async def aclose(self) -> None:
        """Close ``inner`` if it has ``aclose``."""
        self._entries.clear()
        aclose = getattr(self.inner, "aclose", None)
        if aclose is not None:
            await aclose()
