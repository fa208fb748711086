"""Process-local stores: everything lives in this process's memory and is gone when it exits.

For tests, demos and single-process hosts. Every method runs without an ``await`` in between its reads and
writes, so each is atomic with respect to the other tasks of the event loop.
"""

from __future__ import annotations

import dataclasses

from ..types import APIKey

__all__ = ["MemoryKeyStore"]


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
