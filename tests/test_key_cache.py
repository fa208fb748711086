"""CachedKeyStore: bounded TTL cache of key lookups; writes through it are seen by it at once."""

from __future__ import annotations

import dataclasses

import anyio
import pytest

from ozwell_asgi.protocols import KeyStore
from ozwell_asgi.stores.cache import CachedKeyStore
from ozwell_asgi.stores.memory import MemoryKeyStore
from ozwell_asgi.types import APIKey

pytestmark = pytest.mark.anyio

TTL = 5.0


class Clock:
    """A monotonic clock the test moves by hand: the cache's TTL is measured on it, never waited for."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class CountingStore(MemoryKeyStore):
    """A memory store counting lookups by hash, to tell cache hits from trips to the inner store."""

    def __init__(self) -> None:
        super().__init__()
        self.lookups = 0

    async def get_by_hash(self, key_hash: str) -> APIKey | None:
        self.lookups += 1
        return await super().get_by_hash(key_hash)


def make_key(n: int) -> APIKey:
    return APIKey(id=f"key_{n}", key_hash=f"hash_{n}", owner="alice", name=f"key {n}", hint=f"ozw_{n}")


async def test_is_a_key_store() -> None:
    assert isinstance(CachedKeyStore(MemoryKeyStore()), KeyStore)


async def test_hits_and_misses_are_cached_until_the_ttl() -> None:
    inner = CountingStore()
    await inner.create(make_key(1))
    clock = Clock()
    cache = CachedKeyStore(inner, ttl=TTL, clock=clock)
    for _ in range(5):
        assert await cache.get_by_hash("hash_1") == make_key(1)
        assert await cache.get_by_hash("missing") is None
        clock.advance(TTL / 10)
    assert inner.lookups == 2
    clock.advance(TTL / 2 - 0.001)  # just under the TTL since the first lookup: still cached
    assert await cache.get_by_hash("hash_1") == make_key(1)
    assert inner.lookups == 2
    clock.advance(0.001)  # the TTL is reached: both entries are stale
    assert await cache.get_by_hash("hash_1") == make_key(1)
    assert await cache.get_by_hash("missing") is None
    assert inner.lookups == 4


async def test_a_miss_is_cached_so_a_key_created_elsewhere_appears_within_the_ttl() -> None:
    inner = CountingStore()
    clock = Clock()
    cache = CachedKeyStore(inner, ttl=TTL, clock=clock)
    assert await cache.get_by_hash("hash_1") is None
    await inner.create(make_key(1))  # another process
    clock.advance(TTL - 0.001)
    assert await cache.get_by_hash("hash_1") is None
    clock.advance(0.001)
    assert await cache.get_by_hash("hash_1") == make_key(1)


async def test_writes_through_the_cache_are_seen_at_once() -> None:
    inner = CountingStore()
    cache = CachedKeyStore(inner, ttl=60)
    assert await cache.get_by_hash("hash_1") is None  # cached miss
    await cache.create(make_key(1))
    assert await cache.get_by_hash("hash_1") == make_key(1)

    revoked = await cache.revoke("key_1", 100)
    cached = await cache.get_by_hash("hash_1")
    assert cached == revoked
    assert cached is not None
    assert cached.revoked_at == 100

    await cache.create(make_key(2))
    assert await cache.get_by_hash("hash_2") == make_key(2)
    rotated = await cache.rotate("key_2", "hash_2b", "ozw_2b")
    assert await cache.get_by_hash("hash_2") is None
    assert await cache.get_by_hash("hash_2b") == rotated


async def test_a_revoke_on_the_inner_store_is_seen_only_after_the_ttl() -> None:
    inner = MemoryKeyStore()
    await inner.create(make_key(1))
    clock = Clock()
    cache = CachedKeyStore(inner, ttl=TTL, clock=clock)
    assert await cache.get_by_hash("hash_1") == make_key(1)
    await inner.revoke("key_1", 100)  # e.g. another worker
    clock.advance(TTL - 0.001)
    stale = await cache.get_by_hash("hash_1")
    assert stale is not None
    assert stale.revoked_at is None
    clock.advance(0.001)
    fresh = await cache.get_by_hash("hash_1")
    assert fresh is not None
    assert fresh.revoked_at == 100


async def test_ttl_zero_passes_every_lookup_through() -> None:
    inner = CountingStore()
    await inner.create(make_key(1))
    cache = CachedKeyStore(inner, ttl=0)
    for _ in range(3):
        assert await cache.get_by_hash("hash_1") == make_key(1)
    assert inner.lookups == 3
    assert len(cache) == 0
    await inner.revoke("key_1", 5)
    got = await cache.get_by_hash("hash_1")
    assert got is not None
    assert got.revoked_at == 5


async def test_size_is_bounded_least_recently_used_evicted() -> None:
    inner = CountingStore()
    for n in range(20):
        await inner.create(make_key(n))
    cache = CachedKeyStore(inner, ttl=60, max_entries=5)
    for n in range(20):
        await cache.get_by_hash(f"hash_{n}")
        assert len(cache) <= 5
    assert len(cache) == 5
    inner.lookups = 0
    await cache.get_by_hash("hash_19")  # most recent: a hit
    assert inner.lookups == 0
    await cache.get_by_hash("hash_0")  # evicted long ago
    assert inner.lookups == 1
    assert len(cache) == 5


async def test_a_lookup_in_flight_across_a_revoke_does_not_cache_the_old_key() -> None:
    gate = anyio.Event()
    looked_up = anyio.Event()

    class SlowStore(MemoryKeyStore):
        async def get_by_hash(self, key_hash: str) -> APIKey | None:
            found = await super().get_by_hash(key_hash)  # read before the revoke...
            looked_up.set()
            await gate.wait()  # ...answered after it
            return found

    inner = SlowStore()
    await inner.create(make_key(1))
    cache = CachedKeyStore(inner, ttl=60)
    async with anyio.create_task_group() as tg:
        tg.start_soon(cache.get_by_hash, "hash_1")
        await looked_up.wait()
        await cache.revoke("key_1", 7)
        gate.set()
    gate.set()
    got = await cache.get_by_hash("hash_1")
    assert got is not None
    assert got.revoked_at == 7


async def test_failed_create_does_not_cache_anything_wrong() -> None:
    inner = MemoryKeyStore()
    await inner.create(make_key(1))
    cache = CachedKeyStore(inner, ttl=60)
    with pytest.raises(ValueError, match="already exists"):
        await cache.create(dataclasses.replace(make_key(2), id="key_1"))
    assert await cache.get_by_hash("hash_2") is None
    assert await cache.get_by_hash("hash_1") == make_key(1)


async def test_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="ttl"):
        CachedKeyStore(MemoryKeyStore(), ttl=-1)
    with pytest.raises(ValueError, match="max_entries"):
        CachedKeyStore(MemoryKeyStore(), max_entries=0)


async def test_aclose_closes_the_inner_store() -> None:
    closed: list[bool] = []

    class Closable(MemoryKeyStore):
        async def aclose(self) -> None:
            closed.append(True)

    await CachedKeyStore(Closable()).aclose()
    assert closed == [True]
