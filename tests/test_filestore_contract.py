"""The FileStore contract (ozwell_asgi.testing.contracts.FileStoreContract), run over every bundled adapter on real
storage, each with its content kept by the store itself and in a content store:

- memory; SQLite (a file: the staged writes), also in 1000-byte chunks (every range crosses rows);
- PostgreSQL (one transaction per upload); its ordering test also on a database collated by ICU (not bytewise);
- Redis (content in Redis, under a 64 MiB cap);
- each metadata store with a MemoryContentStore (claim, put, publish; delete hides, then removes).

``leftovers`` looks into the tables and keys themselves. Then what is particular to each adapter: the sweep of
what a crash leaves, Redis's size cap and upload expiry, chunk rows, and the memory content store.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from ozwell_asgi.errors import PayloadTooLargeError, ServiceUnavailableError
from ozwell_asgi.protocols import ContentStore, FileStore
from ozwell_asgi.stores.memory import MemoryContentStore, MemoryFileStore
from ozwell_asgi.stores.redis import RedisFileStore
from ozwell_asgi.stores.sql import SQLFileStore, file_chunks_table, files_table
from ozwell_asgi.stores.urls import StorageOptions, open_storage
from ozwell_asgi.testing.contracts import (
    ContentFailed,
    FileStoreContract,
    KiB,
    failing,
    make_file,
    pattern,
    pieces,
    read,
)
from ozwell_asgi.types import Page, PageQuery
from tests.test_keystore_contract import postgres_icu_url

__all__ = ["postgres_icu_url"]  # a fixture, used by name

pytestmark = pytest.mark.anyio

SERVICES = pytest.mark.services
ADAPTERS = [
    pytest.param("memory"),
    pytest.param("memory+content"),
    pytest.param("sqlite"),
    pytest.param("sqlite+content"),
    pytest.param("postgres", marks=SERVICES),
    pytest.param("postgres+content", marks=SERVICES),
    pytest.param("redis", marks=SERVICES),
    pytest.param("redis+content", marks=SERVICES),
]


async def sql_leftovers(store: SQLFileStore, file_id: str) -> list[str]:
    found = []
    await store.db.ensure_tables()
    async with store.db.engine.connect() as conn:
        for table, column in ((files_table, files_table.c.id), (file_chunks_table, file_chunks_table.c.file_id)):
            count = (await conn.execute(sa.select(sa.func.count()).where(column == file_id))).scalar_one()
            if count:
                found.append(f"{count} row(s) in {table.name}")
    return found


async def redis_leftovers(store: RedisFileStore, file_id: str) -> list[str]:
    found = []
    async for raw in store.client.scan_iter(match=f"{store.prefix}*", count=1000):
        key = raw.decode()
        if file_id in key:
            found.append(key)
        elif await store.client.type(key) == b"zset" and await store.client.zscore(key, file_id) is not None:
            found.append(f"{key} holds it")
    return found


def content_leftovers(content: ContentStore | None, file_id: str) -> list[str]:
    return [f"content under {file_id}"] if isinstance(content, MemoryContentStore) and file_id in content else []


@pytest.fixture(params=ADAPTERS)
def adapter(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    """An adapter's name and the URL of its (empty, private) storage."""
    name: str = request.param
    if name.startswith("memory"):
        return name, "memory://"
    if name.startswith("sqlite"):
        return name, f"sqlite:///{tmp_path / 'files.db'}"
    if name.startswith("postgres"):
        return name, request.getfixturevalue("postgres_url")
    return name, request.getfixturevalue("redis_url")


class TestBundledFileStores(FileStoreContract):
    @pytest.fixture
    async def file_store(self, adapter: tuple[str, str], redis_prefix: str) -> AsyncIterator[FileStore]:
        name, url = adapter
        content = MemoryContentStore() if name.endswith("+content") else None
        storage = open_storage(url, StorageOptions(redis_prefix=redis_prefix))
        store = storage.file_store(content)
        self.content_held_in_process = isinstance(store, MemoryFileStore) or content is not None
        yield store
        await storage.aclose()

    async def leftovers(self, store: Any, file_id: str) -> list[str]:
        found = content_leftovers(store.content, file_id)
        if isinstance(store, SQLFileStore):
            found += await sql_leftovers(store, file_id)
        elif isinstance(store, RedisFileStore):
            found += await redis_leftovers(store, file_id)
        else:
            assert isinstance(store, MemoryFileStore)
            found += [f"memory: {file_id}"] if file_id in store._files or file_id in store._content else []
        return found


class TestSQLiteInSmallChunks(TestBundledFileStores):
    """SQLite with 1000-byte chunks, so that every range and read batch crosses rows."""

    @pytest.fixture
    async def file_store(self, tmp_path: Path) -> AsyncIterator[FileStore]:
        store = SQLFileStore.from_url(f"sqlite:///{tmp_path / 'files.db'}", chunk_size=1000)
        yield store
        await store.aclose()

    async def test_large_content_is_streamed_in_bounded_memory(self, file_store: FileStore) -> None:
        pytest.skip("20 MiB in 1000-byte rows is 21,000 transactions; the 256 KiB rows of the sqlite case suffice")


@pytest.mark.services
async def test_pages_on_a_database_that_does_not_sort_bytewise(postgres_icu_url: str) -> None:
    """The contract's ordering test on a PostgreSQL database collated by ICU (``file-_ < file-a < file-A``)."""
    storage = open_storage(postgres_icu_url)
    try:
        await TestBundledFileStores().test_list_cuts_exactly_as_paginate(storage.file_store())
    finally:
        await storage.aclose()


# --- SQL specifics -------------------------------------------------------------------------------------------


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=[pytest.param("sqlite"), pytest.param("postgres", marks=SERVICES)])
def sql_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'files.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


async def test_sql_content_is_stored_in_rows_of_chunk_size(sql_url: str) -> None:
    store = SQLFileStore.from_url(sql_url, chunk_size=64 * KiB)
    try:
        data = pattern(3 * 64 * KiB + 1)
        await store.create(make_file(1), pieces(data, [1000, 100 * KiB]))
        async with store.db.engine.connect() as conn:
            c = file_chunks_table.c
            rows = (await conn.execute(sa.select(c.seq, sa.func.length(c.data)).order_by(c.seq))).all()
        assert [tuple(r) for r in rows] == [(0, 65536), (1, 65536), (2, 65536), (3, 1)]
        assert await read(await store.open("alice", "file-1", 65535, 65537)) == data[65535:65537]
    finally:
        await store.aclose()


async def test_sql_sweep_removes_what_a_crash_left_and_nothing_alive(sql_url: str) -> None:
    """A crash between claim and publish leaves a pending row, chunks and content-store bytes: after ``stale_after``
    seconds without progress the sweep removes them; an upload making progress is never swept."""
    clock = Clock()
    content = MemoryContentStore()
    chunked = SQLFileStore.from_url(sql_url, stale_after=600, clock=clock, chunk_size=1000)
    elsewhere = SQLFileStore(chunked.db, content=content, stale_after=600, clock=clock)
    try:
        await chunked.create(make_file("kept"), pieces(b"kept"))
        async with chunked.db.engine.begin() as conn:  # what a crashed upload leaves behind
            for n, chunk_size in (("crashed", 1000), ("crashed-elsewhere", 0), ("alive", 1000)):
                row = {"id": f"file-{n}", "owner": "alice", "filename": "x", "purpose": "batch", "bytes": 0}
                row |= {"created_at": 1, "content_type": "x", "chunk_size": chunk_size, "state": "pending"}
                await conn.execute(sa.insert(files_table).values(**row, touched_at=int(clock.now)))
                await conn.execute(sa.insert(file_chunks_table).values(file_id=f"file-{n}", seq=0, data=b"x"))
        await content.put("file-crashed-elsewhere", pieces(b"orphan"))
        assert await elsewhere.sweep() == 0  # nothing is stale yet
        clock.now += 500
        async with chunked.db.engine.begin() as conn:  # "alive" made progress
            alive = sa.update(files_table).where(files_table.c.id == "file-alive")
            await conn.execute(alive.values(touched_at=int(clock.now)))
        clock.now += 200
        assert await elsewhere.sweep() == 2
        for n in ("crashed", "crashed-elsewhere"):
            assert await sql_leftovers(chunked, f"file-{n}") == []
        assert "file-crashed-elsewhere" not in content
        assert await sql_leftovers(chunked, "file-alive") != []
        assert await chunked.get("alice", "file-kept") is not None
        assert await read(await chunked.open("alice", "file-kept")) == b"kept"
    finally:
        await chunked.aclose()


async def test_sql_an_upload_swept_as_stale_fails_and_leaves_nothing(tmp_path: Path) -> None:
    """An upload that stalls past ``stale_after`` is swept by another store; when it resumes it fails (503) and
    removes what it wrote, rather than publish a file whose chunks were taken away."""
    clock = Clock()
    url = f"sqlite:///{tmp_path / 'files.db'}"
    slow = SQLFileStore.from_url(url, stale_after=60, clock=clock, chunk_size=1000)
    sweeper = SQLFileStore(slow.db, stale_after=60, clock=clock)
    try:

        async def stalls() -> AsyncIterator[bytes]:
            yield b"a" * 1500
            clock.now += 61
            assert await sweeper.sweep() == 1
            yield b"b" * 1500

        with pytest.raises(ServiceUnavailableError) as info:
            await slow.create(make_file(1), stalls())
        assert info.value.code == "upload_abandoned"
        assert await sql_leftovers(slow, "file-1") == []
    finally:
        await slow.aclose()


async def test_sql_create_sweeps_at_most_once_a_minute(tmp_path: Path) -> None:
    clock = Clock()
    store = SQLFileStore.from_url(f"sqlite:///{tmp_path / 'files.db'}", stale_after=10, clock=clock)
    swept: list[float] = []
    sweep = store.sweep

    async def counting() -> int:
        swept.append(clock.now)
        return await sweep()

    store.sweep = counting  # type: ignore[method-assign]
    try:
        for n in range(3):
            await store.create(make_file(n), pieces(b"x"))
            clock.now += 25
        assert swept == [1_000_000.0]  # creates at +0, +25, +50 s
        clock.now += 60
        await store.create(make_file("later"), pieces(b"x"))
        assert swept == [1_000_000.0, 1_000_135.0]
    finally:
        await store.aclose()


async def test_sql_text_with_nul_is_refused_and_nothing_written(tmp_path: Path) -> None:
    store = SQLFileStore.from_url(f"sqlite:///{tmp_path / 'files.db'}")
    try:
        for changes in ({"filename": "a\x00b"}, {"purpose": "\x00"}, {"owner": "o\x00"}, {"id": "f\x00"}):
            with pytest.raises(ValueError, match="NUL"):
                await store.create(make_file(1, **changes), pieces(b"x"))
        assert await sql_leftovers(store, "file-1") == []
    finally:
        await store.aclose()


async def test_sql_outage_is_a_503_naming_the_file_store() -> None:
    store = SQLFileStore.from_url("postgresql://nobody@127.0.0.1:1/none")
    try:
        with pytest.raises(ServiceUnavailableError, match="file store is unavailable"):
            await store.get("alice", "file-1")
        with pytest.raises(ServiceUnavailableError, match="file store is unavailable"):
            await store.create(make_file(1), pieces(b"x"))
    finally:
        await store.aclose()


async def test_postgres_an_upload_in_flight_holds_nothing_visible_in_the_tables(postgres_url: str) -> None:
    """On PostgreSQL the metadata and chunks are one transaction: another connection sees no row of an upload
    in progress, not even a pending one, and a failure rolls all of it back."""
    import anyio

    store = SQLFileStore.from_url(postgres_url, chunk_size=1000)
    try:
        halfway, resume = anyio.Event(), anyio.Event()

        async def paused() -> AsyncIterator[bytes]:
            yield b"x" * 5000
            halfway.set()
            await resume.wait()
            raise ContentFailed("gone")

        async with anyio.create_task_group() as tg:

            async def upload() -> None:
                with pytest.raises(ContentFailed):
                    await store.create(make_file(1), paused())

            tg.start_soon(upload)
            await halfway.wait()
            assert await sql_leftovers(store, "file-1") == []
            resume.set()
        assert await sql_leftovers(store, "file-1") == []
    finally:
        await store.aclose()


# --- Redis specifics -----------------------------------------------------------------------------------------


@pytest.fixture
async def redis_store(redis_url: str, redis_prefix: str) -> AsyncIterator[RedisFileStore]:
    store = RedisFileStore.from_url(redis_url, prefix=redis_prefix, max_file_bytes=300 * KiB)
    yield store
    await store.aclose()


async def test_redis_content_past_the_cap_is_refused_with_413_and_leaves_nothing(redis_store: RedisFileStore) -> None:
    with pytest.raises(PayloadTooLargeError) as info:
        await redis_store.create(make_file(1), pieces(pattern(300 * KiB + 1)))
    assert (info.value.status, info.value.code) == (413, "file_too_large")
    assert "307200 bytes" in info.value.message
    assert await redis_leftovers(redis_store, "file-1") == []
    exactly = await redis_store.create(make_file(2), pieces(pattern(300 * KiB)))
    assert exactly.bytes == 300 * KiB


async def test_redis_an_upload_key_expires_unless_the_upload_progresses(redis_store: RedisFileStore) -> None:
    """What a crashed upload appended is gone ``stale_after`` seconds after its last piece: no sweep needed."""
    import anyio

    seen: list[tuple[str, int]] = []
    halfway, resume = anyio.Event(), anyio.Event()

    async def paused() -> AsyncIterator[bytes]:
        yield pattern(300 * KiB)
        halfway.set()
        await resume.wait()
        raise ContentFailed("gone")

    async with anyio.create_task_group() as tg:

        async def upload() -> None:
            with pytest.raises(ContentFailed):
                await redis_store.create(make_file(1), paused())

        tg.start_soon(upload)
        await halfway.wait()
        async for raw in redis_store.client.scan_iter(match=f"{redis_store.prefix}fileupload:*"):
            seen.append((raw.decode(), await redis_store.client.ttl(raw)))
        assert await redis_store.get("alice", "file-1") is None
        resume.set()
    [(key, ttl)] = seen
    assert key.startswith(f"{redis_store.prefix}fileupload:file-1:")
    assert 0 < ttl <= 3600
    assert await redis_leftovers(redis_store, "file-1") == []


async def test_redis_sweep_removes_content_a_crash_left_in_a_content_store(redis_url: str, redis_prefix: str) -> None:
    clock = Clock()
    content = MemoryContentStore()
    store = RedisFileStore.from_url(redis_url, prefix=redis_prefix, content=content, stale_after=60, clock=clock)
    try:
        await store.client.zadd(f"{redis_prefix}filepending", {"file-crashed": clock.now, "file-alive": clock.now})
        await content.put("file-crashed", pieces(b"orphan"))
        await content.put("file-alive", pieces(b"in progress"))
        clock.now += 50
        await store.client.zadd(f"{redis_prefix}filepending", {"file-alive": clock.now}, xx=True)
        clock.now += 20
        assert await store.sweep() == 1
        assert "file-crashed" not in content
        assert "file-alive" in content
        assert await redis_leftovers(store, "file-crashed") == []
    finally:
        await store.aclose()


async def test_redis_purpose_and_owner_never_share_an_index(redis_store: RedisFileStore) -> None:
    """Owner ``a:b`` with purpose ``c`` and owner ``b`` with purpose ``c:a``-like names map to different keys."""
    one = await redis_store.create(make_file(1, owner="x:batch", purpose="a"), pieces(b"1"))
    two = await redis_store.create(make_file(2, owner="a:x", purpose="batch"), pieces(b"2"))
    assert await redis_store.list("x:batch", PageQuery(), purpose="a") == Page((one,), False)
    assert await redis_store.list("a:x", PageQuery(), purpose="batch") == Page((two,), False)
    assert await redis_store.list("x", PageQuery(), purpose="batch:a") == Page((), False)


async def test_redis_file_store_refuses_a_text_client(redis_url: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        with pytest.raises(ValueError, match="decode_responses=False"):
            RedisFileStore(client)
    finally:
        await client.aclose()


# --- memory specifics -----------------------------------------------------------------------------------------


async def test_memory_content_store_is_all_or_nothing_and_bounded() -> None:
    content = MemoryContentStore(max_total_bytes=1000)
    with pytest.raises(ContentFailed):
        await content.put("a", failing(b"x" * 10, ContentFailed()))
    assert "a" not in content
    with pytest.raises(PayloadTooLargeError):
        await content.put("a", pieces(b"x" * 1001))
    assert len(content) == 0
    assert await content.put("a", pieces(b"x" * 600, [100])) == 600
    with pytest.raises(PayloadTooLargeError):
        await content.put("b", pieces(b"x" * 401))
    assert await read(content.get("a", 99, 201)) == b"x" * 102
    await content.delete("a")
    await content.delete("a")
    assert await content.put("b", pieces(b"x" * 1000)) == 1000
    with pytest.raises(FileNotFoundError):
        await read(content.get("a"))


async def test_memory_file_store_with_a_failing_content_store_keeps_nothing() -> None:
    class Broken(MemoryContentStore):
        async def put(self, key: str, content: Any) -> int:
            await super().put(key, content)
            raise OSError("disk full")

    content = Broken()
    store = MemoryFileStore(content=content)
    with pytest.raises(OSError, match="disk full"):
        await store.create(make_file(1), pieces(b"abc"))
    assert len(content) == 0
    assert await store.get("alice", "file-1") is None
    stored = await MemoryFileStore(content=MemoryContentStore()).create(make_file(1), pieces(b"abc"))
    assert stored == dataclasses.replace(make_file(1), bytes=3)
