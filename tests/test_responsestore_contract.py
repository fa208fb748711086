"""The ResponseStore contract (ozwell_asgi.testing.contracts.ResponseStoreContract), run over every bundled adapter on
real storage, each made by its storage (``open_storage(url).response_store()``): memory, SQLite (a file), PostgreSQL
and Redis (the machine's real servers, isolated per test by conftest). ``forget`` evicts (memory) or expires
(Redis) one record as the adapter's bound would. Then what is particular to each: the memory store's caps, Redis's
TTL and key layout, the SQL table, index and collation, and the Storage protocol.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from ozwell_asgi.errors import ServiceUnavailableError
from ozwell_asgi.protocols import ResponseStore
from ozwell_asgi.stores.memory import MemoryResponseStore, MemoryStorage
from ozwell_asgi.stores.redis import DEFAULT_RESPONSE_TTL, RedisResponseStore, RedisStorage
from ozwell_asgi.stores.response_codec import dump_parts
from ozwell_asgi.stores.sql import SQLDatabase, SQLResponseStore, responses_table
from ozwell_asgi.stores.urls import Storage, StorageOptions, Storages, open_storage
from ozwell_asgi.testing.contracts import ResponseStoreContract, make_response
from ozwell_asgi.types import StoredResponse
from tests.test_keystore_contract import postgres_icu_url

__all__ = ["postgres_icu_url"]  # a fixture, used by name

pytestmark = pytest.mark.anyio

SERVICES = pytest.mark.services
ADAPTERS = [
    pytest.param("memory"),
    pytest.param("sqlite"),
    pytest.param("postgres", marks=SERVICES),
    pytest.param("redis", marks=SERVICES),
]


@pytest.fixture(params=ADAPTERS)
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of an empty storage private to the test."""
    name: str = request.param
    if name == "memory":
        return "memory://"
    if name == "sqlite":
        return f"sqlite:///{tmp_path / 'responses.db'}"
    url: str = request.getfixturevalue("postgres_url" if name == "postgres" else "redis_url")
    return url


@pytest.fixture
async def storages(redis_prefix: str) -> AsyncIterator[Storages]:
    """Storages under the test's Redis prefix; each call of ``fresh`` opens one more, all closed afterwards."""
    opened = Storages(StorageOptions(redis_prefix=redis_prefix))
    yield opened
    await opened.aclose()


class TestBundledResponseStores(ResponseStoreContract):
    @pytest.fixture
    async def response_store(self, storage_url: str, storages: Storages) -> ResponseStore:
        return storages.response_store(storage_url)

    @pytest.fixture
    async def response_store_reopen(
        self, storage_url: str, redis_prefix: str
    ) -> AsyncIterator[Callable[[], ResponseStore] | None]:
        if storage_url == "memory://":
            yield None
            return
        opened: list[Storage] = []

        def reopen() -> ResponseStore:
            storage = open_storage(storage_url, StorageOptions(redis_prefix=redis_prefix))
            opened.append(storage)
            return storage.response_store()

        yield reopen
        for storage in opened:
            await storage.aclose()

    async def forget(self, store: Any, record: StoredResponse) -> bool:
        if isinstance(store, MemoryResponseStore):  # what eviction does
            store._remove(store._records[record.id])
            return True
        if isinstance(store, RedisResponseStore):  # what expiry does: the record's key is gone
            return bool(await store.client.delete(store._record(record.id)))
        return False  # SQL keeps records until they are deleted


@pytest.mark.services
async def test_conversation_order_on_a_database_that_does_not_sort_bytewise(postgres_icu_url: str) -> None:
    """The contract's ordering test on a PostgreSQL database collated by ICU (``resp__ < resp_a < resp_A``)."""
    storage = open_storage(postgres_icu_url)
    try:
        suite = TestBundledResponseStores()
        await suite.test_last_in_conversation_is_the_newest_by_created_at_then_id(storage.response_store())
    finally:
        await storage.aclose()


# --- every adapter ------------------------------------------------------------------------------------------------


async def test_a_record_that_is_not_json_ready_is_refused_and_nothing_stored(
    storage_url: str, storages: Storages
) -> None:
    store = storages.response_store(storage_url)
    for response in ({"x": {1, 2}}, {"x": math.nan}, {"x": math.inf}, {"x": object()}):
        with pytest.raises(ValueError, match="JSON-ready"):
            await store.put(make_response(1, response=response, conversation_id="conv"))
        assert await store.get("alice", "resp_1") is None
        assert await store.last_in_conversation("alice", "conv") is None
    with pytest.raises(ValueError, match="JSON-ready"):
        await store.put(make_response(1, conversation=({"role": "user", "content": b"bytes"},)))
    assert await store.get("alice", "resp_1") is None


async def test_a_returned_record_is_a_copy_nothing_else_shares(storage_url: str, storages: Storages) -> None:
    store = storages.response_store(storage_url)
    record = make_response(1)
    await store.put(record)
    got = await store.get("alice", record.id)
    assert got is not None
    got.response["output"].clear()  # type: ignore[index]
    record.response["usage"]["total_tokens"] = 0  # type: ignore[index]
    again = await store.get("alice", record.id)
    assert again is not None
    assert again.response["output"] and again.response["usage"]["total_tokens"] == 5


async def test_storage_protocol_includes_response_store(tmp_path: Path) -> None:
    for url, kind in (
        ("memory://", MemoryResponseStore),
        (f"sqlite:///{tmp_path / 'r.db'}", SQLResponseStore),
        ("redis://127.0.0.1:6379/0", RedisResponseStore),
    ):
        storage = open_storage(url)  # nothing connects yet
        assert isinstance(storage, Storage)
        assert isinstance(storage.response_store(), kind)
        assert isinstance(storage.response_store(), ResponseStore)
        await storage.aclose()


async def test_storages_give_the_response_store_of_each_storage(tmp_path: Path) -> None:
    storages = Storages(StorageOptions(redis_prefix="p:", redis_response_ttl=60))
    try:
        memory = storages.response_store("memory://")
        assert memory is storages.response_store(" memory://")  # the data lives in it
        url = f"sqlite:///{tmp_path / 'r.db'}"
        sql = storages.response_store(url)
        assert isinstance(sql, SQLResponseStore)
        assert sql.db is storages.open(url)  # one engine with keys and files
        redis = storages.response_store("redis://127.0.0.1:6379/0")
        assert isinstance(redis, RedisResponseStore)
        storage = storages.open("redis://127.0.0.1:6379/0")
        assert isinstance(storage, RedisStorage)
        assert (redis.client, redis.prefix, redis.ttl) == (storage.client, "p:", 60)
    finally:
        await storages.aclose()


# --- memory: bounded ------------------------------------------------------------------------------------------------


def _size(record: StoredResponse) -> int:
    parts = dump_parts(record).encode()
    ids = (record.id, record.owner, record.status, record.key_id, record.conversation_id or "")
    return len(parts) + sum(len(text) for text in ids)


async def test_memory_record_cap_forgets_the_least_recently_used() -> None:
    store = MemoryResponseStore(max_records=3)
    records = [make_response(n, conversation_id="conv", created_at=n) for n in range(3)]
    for record in records:
        await store.put(record)
    assert await store.get("alice", "resp_0") == records[0]  # used: resp_1 is now the least recently used
    await store.put(make_response(3, conversation_id="other"))
    assert len(store) == 3
    assert await store.get("alice", "resp_1") is None
    assert await store.get("alice", "resp_0") == records[0]
    assert await store.last_in_conversation("alice", "conv") == records[2]  # used too
    await store.put(make_response(4))  # evicts resp_3 (resp_0 and resp_2 were used since)
    assert await store.get("alice", "resp_3") is None
    assert await store.last_in_conversation("alice", "other") is None
    await store.put(make_response(5))
    await store.put(make_response(6))  # evicts resp_0 then resp_2: the conversation is forgotten whole
    assert await store.last_in_conversation("alice", "conv") is None
    assert store._conversations == {}
    assert [r.id for r in [await store.get("alice", f"resp_{n}") for n in (4, 5, 6)] if r] == [
        "resp_4",
        "resp_5",
        "resp_6",
    ]


async def test_memory_byte_cap_forgets_the_least_recently_used_and_counts_exactly() -> None:
    one = make_response(1, conversation_id="conv", created_at=1)
    store = MemoryResponseStore(max_bytes=_size(one) * 3 + 10)
    for n in range(1, 4):
        await store.put(make_response(n, conversation_id="conv", created_at=n))
    assert len(store) == 3
    assert store.total_bytes == sum(_size(make_response(n, conversation_id="conv", created_at=n)) for n in (1, 2, 3))
    big = make_response(4, conversation=({"role": "user", "content": "x" * (_size(one) + 20)},))
    await store.put(big)  # needs the room of two records: the two least recently used go
    assert [await store.get("alice", f"resp_{n}") is not None for n in (1, 2, 3, 4)] == [False, False, True, True]
    assert store.total_bytes == _size(make_response(3, conversation_id="conv", created_at=3)) + _size(big)
    assert store.total_bytes <= store.max_bytes
    assert await store.last_in_conversation("alice", "conv") == make_response(3, conversation_id="conv", created_at=3)
    # A replacement counts its new size, not both.
    await store.put(make_response(3, conversation_id="conv", created_at=3, status="failed"))
    assert store.total_bytes == _size(make_response(3, conversation_id="conv", created_at=3, status="failed")) + _size(
        big
    )
    for n in (3, 4):
        assert await store.delete("alice", f"resp_{n}")
    assert (len(store), store.total_bytes, store._conversations) == (0, 0, {})


async def test_memory_a_record_larger_than_the_byte_cap_is_not_kept() -> None:
    store = MemoryResponseStore(max_bytes=2000)
    kept = make_response("kept")
    queued = make_response(1, status="queued", conversation_id="conv")
    await store.put(kept)
    await store.put(queued)
    huge = make_response(1, conversation_id="conv", conversation=({"role": "user", "content": "x" * 5000},))
    await store.put(huge)  # forgotten at once, with the queued version it replaces: never a stale "queued"
    assert await store.get("alice", "resp_1") is None
    assert await store.last_in_conversation("alice", "conv") is None
    assert await store.get("alice", "resp_kept") == kept
    assert store.total_bytes == _size(kept)


def test_memory_caps_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_records"):
        MemoryResponseStore(max_records=0)
    with pytest.raises(ValueError, match="max_bytes"):
        MemoryResponseStore(max_bytes=0)
    assert MemoryStorage().response_store() is not MemoryStorage().response_store()


# --- Redis: bounded by a TTL; keys under the prefix ----------------------------------------------------------------


@pytest.fixture
async def redis_store(redis_url: str, redis_prefix: str) -> AsyncIterator[RedisResponseStore]:
    store = RedisResponseStore.from_url(redis_url, prefix=redis_prefix)
    yield store
    await store.aclose()


async def _keys(store: RedisResponseStore) -> dict[str, str]:
    """Every key under the store's prefix and its type."""
    found = {}
    async for raw in store.client.scan_iter(match=f"{store.prefix}*", count=1000):
        found[raw.decode()] = (await store.client.type(raw)).decode()
    return found


@pytest.mark.services
async def test_redis_every_key_is_under_the_prefix_and_none_is_left_after_deletes(
    redis_store: RedisResponseStore,
) -> None:
    p = redis_store.prefix
    await redis_store.put(make_response(1, conversation_id="conv"))
    await redis_store.put(make_response(2, conversation_id="conv", owner="a:b"))
    await redis_store.put(make_response(3))
    assert await _keys(redis_store) == {
        f"{p}response:resp_1": "hash",
        f"{p}response:resp_2": "hash",
        f"{p}response:resp_3": "hash",
        f"{p}responseconv:5:alice:conv": "zset",
        f"{p}responseconv:3:a:b:conv": "zset",
    }
    await redis_store.put(make_response(1, conversation_id="moved"))  # out of its old set, which goes
    assert f"{p}responseconv:5:alice:conv" not in await _keys(redis_store)
    assert f"{p}responseconv:5:alice:moved" in await _keys(redis_store)
    assert await redis_store.delete("alice", "resp_1")
    assert await redis_store.delete("a:b", "resp_2")
    assert await redis_store.delete("alice", "resp_3")
    assert await _keys(redis_store) == {}


@pytest.mark.services
async def test_redis_owner_and_conversation_never_share_an_index(redis_store: RedisResponseStore) -> None:
    one = make_response(1, owner="a:b", conversation_id="c")
    two = make_response(2, owner="a", conversation_id="b:c")
    await redis_store.put(one)
    await redis_store.put(two)
    assert await redis_store.last_in_conversation("a:b", "c") == one
    assert await redis_store.last_in_conversation("a", "b:c") == two


@pytest.mark.services
async def test_redis_records_and_their_index_expire_after_the_ttl_refreshed_on_put(
    redis_store: RedisResponseStore,
) -> None:
    """Each record's key expires 30 days (OpenAI's retention) after its last put; the conversation's set lives at
    least as long as its newest record."""
    client, p = redis_store.client, redis_store.prefix
    ttl_ms = round(DEFAULT_RESPONSE_TTL * 1000)
    assert ttl_ms == 30 * 24 * 3600 * 1000
    await redis_store.put(make_response(1, status="queued", conversation_id="conv"))
    record, index = f"{p}response:resp_1", f"{p}responseconv:5:alice:conv"
    for key in (record, index):
        assert ttl_ms - 5000 < await client.pttl(key) <= ttl_ms
    await client.pexpire(record, 1000)  # time passes (as PEXPIRE shows it)
    await client.pexpire(index, 1000)
    await redis_store.put(make_response(1, status="completed", conversation_id="conv"))  # the run ends
    for key in (record, index):
        assert ttl_ms - 5000 < await client.pttl(key) <= ttl_ms
    # A set kept alive by a newer record is never shortened by the put of an older one.
    await client.pexpire(index, ttl_ms + 60_000)
    await redis_store.put(make_response(2, conversation_id="conv", created_at=1))
    assert await client.pttl(index) > ttl_ms


@pytest.mark.services
async def test_redis_ttl_is_configurable(redis_url: str, redis_prefix: str) -> None:
    storage = open_storage(redis_url, StorageOptions(redis_prefix=redis_prefix, redis_response_ttl=90))
    try:
        store = storage.response_store()
        assert isinstance(store, RedisResponseStore)
        await store.put(make_response(1, conversation_id="conv"))
        for key in (f"{redis_prefix}response:resp_1", f"{redis_prefix}responseconv:5:alice:conv"):
            assert 85_000 < await store.client.pttl(key) <= 90_000
    finally:
        await storage.aclose()
    with pytest.raises(ValueError, match="ttl"):
        RedisResponseStore(storage.client, ttl=0)


@pytest.mark.services
async def test_redis_last_in_conversation_skips_and_prunes_expired_records(redis_store: RedisResponseStore) -> None:
    """Records expire one by one; their set stays until the last does. ``last_in_conversation`` answers the newest
    record still stored and removes the entries of those gone, each once."""
    client = redis_store.client
    index = f"{redis_store.prefix}responseconv:5:alice:conv"
    records = [make_response(n, conversation_id="conv", created_at=n) for n in range(40)]
    for record in records:
        await redis_store.put(record)
    for record in records[5:]:  # expired: more than one round of 16 entries
        await client.delete(f"{redis_store.prefix}response:{record.id}")
    assert await client.zcard(index) == 40
    assert await redis_store.last_in_conversation("alice", "conv") == records[4]
    assert await client.zcard(index) == 5
    for record in records[:5]:
        await client.delete(f"{redis_store.prefix}response:{record.id}")
    assert await redis_store.last_in_conversation("alice", "conv") is None
    assert await client.exists(index) == 0


@pytest.mark.services
async def test_redis_an_entry_of_an_id_reused_by_another_owner_is_pruned(redis_store: RedisResponseStore) -> None:
    """Alice's record expired and Bob's record took its id: Alice's conversation no longer answers it."""
    older = make_response(0, conversation_id="conv", created_at=0)
    await redis_store.put(older)
    await redis_store.put(make_response(1, conversation_id="conv", created_at=1))
    await redis_store.client.delete(f"{redis_store.prefix}response:resp_1")
    await redis_store.put(make_response(1, owner="bob", conversation_id="conv", created_at=9))
    assert await redis_store.last_in_conversation("alice", "conv") == older
    assert await redis_store.client.zcard(f"{redis_store.prefix}responseconv:5:alice:conv") == 1


@pytest.mark.services
async def test_redis_reads_a_record_written_by_a_text_client(redis_url: str, redis_prefix: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        text_store = RedisResponseStore(client, prefix=redis_prefix)
        record = make_response(1, conversation_id="conv", response={"text": "ünïcode 😀"})
        await text_store.put(record)
        assert await text_store.get("alice", "resp_1") == record
        binary = RedisResponseStore.from_url(redis_url, prefix=redis_prefix)
        assert await binary.last_in_conversation("alice", "conv") == record
        await binary.aclose()
    finally:
        await client.aclose()


async def test_redis_outage_is_a_503_naming_the_response_store() -> None:
    store = RedisResponseStore.from_url("redis://127.0.0.1:1/0")
    try:
        for call in (
            store.get("alice", "resp_1"),
            store.put(make_response(1)),
            store.delete("alice", "resp_1"),
            store.last_in_conversation("alice", "conv"),
        ):
            with pytest.raises(ServiceUnavailableError, match="response store is unavailable"):
                await call
    finally:
        await store.aclose()


# --- SQL: one table, one index, no expiry -------------------------------------------------------------------------


@pytest.fixture(params=[pytest.param("sqlite"), pytest.param("postgres", marks=SERVICES)])
def sql_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'responses.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


async def test_sql_keeps_one_row_per_record_with_its_parts_as_json_text(sql_url: str) -> None:
    db = SQLDatabase.from_url(sql_url)
    store = db.response_store()
    try:
        queued = make_response(1, status="queued", conversation_id="conv", key_id="key_9")
        await store.put(queued)
        done = dataclasses.replace(queued, status="completed")
        await store.put(done)
        t = responses_table
        async with db.engine.connect() as conn:
            rows = (await conn.execute(sa.select(t))).mappings().all()
            indexes = await conn.run_sync(lambda sync: sa.inspect(sync).get_indexes("ozwell_responses"))
        [row] = rows
        assert {k: row[k] for k in ("id", "owner", "conversation_id", "created_at", "status", "key_id")} == {
            "id": "resp_1",
            "owner": "alice",
            "conversation_id": "conv",
            "created_at": 1000,
            "status": "completed",
            "key_id": "key_9",
        }
        assert json.loads(row["data"]) == {
            "response": done.response,
            "input_items": list(done.input_items),
            "conversation": list(done.conversation),
        }
        assert {"name": "ix_ozwell_responses_conversation"}.items() <= indexes[0].items()
        assert indexes[0]["column_names"] == ["owner", "conversation_id", "created_at", "id"]
    finally:
        await db.aclose()


async def test_sql_text_with_nul_in_a_column_is_refused_and_nothing_written(sql_url: str) -> None:
    store = SQLResponseStore.from_url(sql_url)
    try:
        changes: list[dict[str, Any]] = [
            {"id": "resp\x00"},
            {"owner": "a\x00"},
            {"conversation_id": "c\x00"},
            {"status": "\x00"},
            {"key_id": "k\x00"},
        ]
        for change in changes:
            with pytest.raises(ValueError, match="NUL"):
                await store.put(make_response(1, **change))
        await store.put(make_response(1, response={"text": "a\x00b"}))  # inside the JSON: escaped and kept
        got = await store.get("alice", "resp_1")
        assert got is not None
        assert got.response == {"text": "a\x00b"}
        async with store.db.engine.connect() as conn:
            count = (await conn.execute(sa.select(sa.func.count()).select_from(responses_table))).scalar_one()
        assert count == 1
    finally:
        await store.aclose()


async def test_sql_outage_is_a_503_naming_the_response_store() -> None:
    store = SQLResponseStore.from_url("postgresql://nobody@127.0.0.1:1/none")
    try:
        with pytest.raises(ServiceUnavailableError, match="response store is unavailable"):
            await store.get("alice", "resp_1")
        with pytest.raises(ServiceUnavailableError, match="response store is unavailable"):
            await store.put(make_response(1))
    finally:
        await store.aclose()


@pytest.mark.services
async def test_redis_a_write_racing_a_move_reads_again(redis_store: RedisResponseStore) -> None:
    """``put`` and ``delete`` read where a record is indexed, then run their script; if another writer moved the
    record in between, the script refuses and they read again, so no index keeps a stale entry."""
    placed = redis_store._placed
    moves = iter(["race-1", "race-2"])

    async def raced(response_id: str) -> tuple[str | None, str | None]:
        found = await placed(response_id)
        move = next(moves, None)
        if move is not None:  # another process moves the record just after our read
            await redis_store.put(make_response(1, conversation_id=move, status=move))
        return found

    await redis_store.put(make_response(1, conversation_id="start"))
    redis_store._placed = raced  # type: ignore[method-assign]
    final = make_response(1, conversation_id="final")
    await redis_store.put(final)
    assert await redis_store.get("alice", "resp_1") == final
    for conversation_id in ("start", "race-1", "race-2"):
        assert await redis_store.last_in_conversation("alice", conversation_id) is None
    assert await redis_store.last_in_conversation("alice", "final") == final
    indexes = [key for key in await _keys(redis_store) if "responseconv" in key]
    assert indexes == [f"{redis_store.prefix}responseconv:5:alice:final"]

    moves = iter(["race-3"])
    assert await redis_store.delete("alice", "resp_1") is True
    assert await _keys(redis_store) == {}
