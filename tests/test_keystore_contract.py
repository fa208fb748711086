"""The KeyStore contract (ozwell_asgi.testing.contracts.KeyStoreContract), run over every bundled adapter on real
storage: memory, SQLite (a file), PostgreSQL and Redis (the machine's real servers, isolated per test by conftest),
each standalone (``from_url``) and through ``open_storage`` (one engine or client shared with the file store), and
the cache in front of memory. Then what is particular to the SQL store and to storage URLs.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest
from sqlalchemy.engine import make_url

from ozwell_asgi import OzwellAPI
from ozwell_asgi.protocols import KeyStore
from ozwell_asgi.stores.cache import CachedKeyStore
from ozwell_asgi.stores.memory import MemoryFileStore, MemoryKeyStore, MemoryStorage
from ozwell_asgi.stores.sql import SQLDatabase, SQLFileStore, SQLKeyStore, normalize_sql_url
from ozwell_asgi.stores.urls import (
    Storage,
    StorageOptions,
    Storages,
    key_store_from_url,
    open_storage,
    register_storage,
)
from ozwell_asgi.testing.contracts import KeyStoreContract, make_key

pytestmark = pytest.mark.anyio


@dataclass
class Backend:
    """Opens stores on one storage; every store (and storage) it opens is closed after the test."""

    name: str
    factory: Callable[[], KeyStore]
    persistent: bool
    opened: list[object] = field(default_factory=list)

    def open(self) -> KeyStore:
        store = self.factory()
        self.opened.append(store)
        return store

    def via_storage(self, url: str, options: StorageOptions | None = None) -> Backend:
        """Each store on a storage of its own from ``open_storage`` (closed with it)."""

        def factory() -> KeyStore:
            storage = open_storage(url, options)
            self.opened.append(storage)
            return storage.key_store()

        self.factory = factory
        return self

    async def aclose(self) -> None:
        for opened in reversed(self.opened):
            aclose = getattr(opened, "aclose", None)
            if aclose is not None:
                await aclose()


SERVICES = pytest.mark.services


@pytest.fixture
async def postgres_icu_url(postgres_url: str) -> AsyncIterator[str]:
    """A PostgreSQL database whose collation sorts text as people read it (ICU en-US: ``key__ < key_a < key_A <
    key_b``), not byte by byte as Python does: the stores' order must not depend on it. Dropped afterwards."""
    import asyncpg

    url = make_url(postgres_url)
    name = f"{url.database}_icu"
    admin = await asyncpg.connect(host=url.host, port=url.port, user=url.username, database=url.database)
    try:
        await admin.execute(
            f"CREATE DATABASE \"{name}\" TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'"
        )
        order = await admin.fetch("SELECT x FROM (VALUES ('a'), ('B')) t(x) ORDER BY x COLLATE \"en-US-x-icu\"")
        assert [r[0] for r in order] == ["a", "B"]
    finally:
        await admin.close()
    yield url.set(database=name).render_as_string(hide_password=False)
    admin = await asyncpg.connect(host=url.host, port=url.port, user=url.username, database=url.database)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


BACKENDS = [
    pytest.param("memory"),
    pytest.param("cached-memory"),
    pytest.param("sqlite"),
    pytest.param("sqlite-storage"),
    pytest.param("postgres", marks=SERVICES),
    pytest.param("postgres-storage", marks=SERVICES),
    pytest.param("redis", marks=SERVICES),
    pytest.param("redis-storage", marks=SERVICES),
]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    name: str = request.param
    if name == "memory":
        opened = Backend(name, MemoryKeyStore, persistent=False)
    elif name == "cached-memory":
        opened = Backend(name, lambda: CachedKeyStore(MemoryKeyStore(), ttl=5.0), persistent=False)
    elif name.startswith("sqlite"):
        url = f"sqlite:///{tmp_path / 'keys.db'}"
        opened = Backend(name, lambda: SQLKeyStore.from_url(url), persistent=True)
        if name.endswith("storage"):
            opened.via_storage(url)
    elif name.startswith("postgres"):
        pg_url: str = request.getfixturevalue("postgres_url")
        opened = Backend(name, lambda: SQLKeyStore.from_url(pg_url), persistent=True)
        if name.endswith("storage"):
            opened.via_storage(pg_url)
    else:
        redis_url: str = request.getfixturevalue("redis_url")
        prefix: str = request.getfixturevalue("redis_prefix")
        opened = Backend(name, lambda: key_store_from_url(redis_url, redis_prefix=prefix), persistent=True)
        if name.endswith("storage"):  # a binary client (decode_responses=False), as the file store needs
            opened.via_storage(redis_url, StorageOptions(redis_prefix=prefix))
    return opened


class TestBundledKeyStores(KeyStoreContract):
    @pytest.fixture
    async def key_store(self, backend: Backend) -> AsyncIterator[KeyStore]:
        yield backend.open()
        await backend.aclose()

    @pytest.fixture
    def key_store_reopen(self, backend: Backend, key_store: KeyStore) -> Callable[[], KeyStore] | None:
        return backend.open if backend.persistent else None


# --- SQL specifics: URL forms, lazy tables, the in-memory database ---------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:///keys.db", "sqlite+aiosqlite:///keys.db"),
        ("sqlite:////abs/keys.db", "sqlite+aiosqlite:////abs/keys.db"),
        ("sqlite+aiosqlite:///keys.db", "sqlite+aiosqlite:///keys.db"),
        ("sqlite:///:memory:", "sqlite+aiosqlite:///:memory:"),
        ("postgresql://u@h:5432/db", "postgresql+asyncpg://u@h:5432/db"),
        ("postgres://u@h:5432/db", "postgresql+asyncpg://u@h:5432/db"),
        ("postgresql+asyncpg://u@h/db", "postgresql+asyncpg://u@h/db"),
    ],
)
def test_sql_url_forms(url: str, expected: str) -> None:
    got, want = normalize_sql_url(url), make_url(expected)
    assert (got.drivername, got.host, got.port, got.username, got.database) == (
        want.drivername,
        want.host,
        want.port,
        want.username,
        want.database,
    )


def test_sql_url_rejects_other_databases() -> None:
    with pytest.raises(ValueError, match="sqlite"):
        normalize_sql_url("mysql://u@h/db")


async def test_key_store_from_url_picks_the_adapter(tmp_path: Path) -> None:
    assert isinstance(key_store_from_url("memory://"), MemoryKeyStore)
    for url in (f"sqlite:///{tmp_path / 'a.db'}", "sqlite:///:memory:", "postgres://u@127.0.0.1:1/db"):
        sql_store = key_store_from_url(url)
        assert isinstance(sql_store, SQLKeyStore)
        await sql_store.aclose()
    from ozwell_asgi.stores.redis import RedisKeyStore

    redis_store = key_store_from_url("rediss://127.0.0.1:1/0", redis_prefix="p:")
    assert isinstance(redis_store, RedisKeyStore)
    assert redis_store.prefix == "p:"
    await redis_store.aclose()


@pytest.mark.parametrize("url", ["mysql://u:secret@h/db", "http://x", "keys.db", ""])
def test_key_store_from_url_rejects_unknown_forms_without_echoing_secrets(url: str) -> None:
    with pytest.raises(ValueError, match="accepted forms") as info:
        key_store_from_url(url)
    assert "secret" not in str(info.value)
    assert "redis://" in str(info.value)
    assert "sqlite:///" in str(info.value)


async def test_sqlite_memory_url_shares_one_database() -> None:
    store = SQLKeyStore.from_url("sqlite:///:memory:")
    try:
        keys = [make_key(i) for i in range(10)]
        async with anyio.create_task_group() as tg:
            for key in keys:
                tg.start_soon(store.create, key)
        assert len(await store.list()) == 10
    finally:
        await store.aclose()


async def test_sqlite_file_uses_wal_and_tables_appear_lazily(tmp_path: Path) -> None:
    path = tmp_path / "fresh.db"
    store = SQLKeyStore.from_url(f"sqlite:///{path}")
    try:
        assert await store.get("x") is None  # first use creates the table
        async with store.db.engine.connect() as conn:
            mode = (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar()
            timeout = (await conn.exec_driver_sql("PRAGMA busy_timeout")).scalar()
        assert mode == "wal"
        assert timeout is not None
        assert timeout > 0
    finally:
        await store.aclose()
    assert path.exists()


async def test_postgres_stores_starting_at_once_both_create_tables(postgres_url: str) -> None:
    stores = [SQLKeyStore.from_url(postgres_url) for _ in range(4)]
    try:
        async with anyio.create_task_group() as tg:
            for n, s in enumerate(stores):
                tg.start_soon(s.create, make_key(n))
        assert len(await stores[0].list()) == 4
    finally:
        for s in stores:
            await s.aclose()


async def test_an_icu_database_really_sorts_text_otherwise(postgres_icu_url: str) -> None:
    """What the postgres-icu cases stand on: the database's own order of ids is not Python's."""
    store = SQLKeyStore.from_url(postgres_icu_url)
    try:
        assert await store.get("x") is None  # creates the tables
        async with store.db.engine.connect() as conn:
            rows = await conn.exec_driver_sql("SELECT x FROM (VALUES ('key_B'), ('key_a'), ('key__')) t(x) ORDER BY x")
            assert [r[0] for r in rows] == ["key__", "key_a", "key_B"] != sorted(["key_B", "key_a", "key__"])
    finally:
        await store.aclose()


async def test_key_pages_on_a_database_that_does_not_sort_bytewise(postgres_icu_url: str) -> None:
    """The contract's ordering test on a PostgreSQL database collated by ICU (``key__ < key_a < key_A``)."""
    store = SQLKeyStore.from_url(postgres_icu_url)
    try:
        await TestBundledKeyStores().test_list_page_cuts_exactly_as_paginate(store)
    finally:
        await store.aclose()


# --- storage URLs: one storage per URL, shared by every store on it ---------------------------------------------


async def test_open_storage_picks_the_storage(tmp_path: Path, redis_url: str) -> None:
    from ozwell_asgi.stores.redis import RedisFileStore, RedisKeyStore, RedisStorage

    memory = open_storage("memory://")
    assert isinstance(memory, MemoryStorage)
    assert memory.key_store() is memory.key_store()  # one store per storage: the data lives in it
    for url in (f"sqlite:///{tmp_path / 'a.db'}", "sqlite:///:memory:", "postgres://u@127.0.0.1:1/db"):
        sql = open_storage(url)
        assert isinstance(sql, SQLDatabase)
        keys, files = sql.key_store(), sql.file_store()
        assert isinstance(keys, SQLKeyStore)
        assert isinstance(files, SQLFileStore)
        assert keys.db is files.db is sql  # one engine
        await sql.aclose()
    redis = open_storage(" " + redis_url + " ", StorageOptions(redis_prefix="p:", redis_max_file_bytes=1000))
    assert isinstance(redis, RedisStorage)
    keys_r, files_r = redis.key_store(), redis.file_store()
    assert isinstance(keys_r, RedisKeyStore)
    assert isinstance(files_r, RedisFileStore)
    assert keys_r.client is files_r.client is redis.client  # one client, one pool
    assert (keys_r.prefix, files_r.prefix, files_r.max_file_bytes) == ("p:", "p:", 1000)
    await redis.aclose()
    for storage in (memory, sql, redis):
        assert isinstance(storage, Storage)


@pytest.mark.parametrize("url", ["mysql://u:secret@h/db", "http://x", "keys.db", "", "file:///tmp/x"])
def test_open_storage_rejects_unknown_forms_without_echoing_secrets(url: str) -> None:
    with pytest.raises(ValueError, match="accepted forms") as info:
        open_storage(url)
    assert "secret" not in str(info.value)
    assert "postgresql://" in str(info.value)


async def test_storages_open_one_storage_per_url_and_close_each_once(tmp_path: Path) -> None:
    closed: list[str] = []

    class Counting(MemoryStorage):
        def __init__(self, url: str) -> None:
            super().__init__()
            self.url = url

        async def aclose(self) -> None:
            closed.append(self.url)

    register_storage("counting", lambda url, options: Counting(url))
    storages = Storages()
    a = storages.open("counting://a")
    assert storages.open(" counting://a") is a
    assert storages.key_store("counting://a") is a.key_store()
    assert storages.file_store("counting://a") is a.file_store()
    b = storages.open("counting://b")
    assert b is not a
    assert len(storages) == 2
    await storages.aclose()
    await storages.aclose()
    assert closed == ["counting://b", "counting://a"]


async def test_the_app_shares_one_engine_between_keys_and_files_on_one_url(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ozwell.db'}"
    api = OzwellAPI(key_store=url, file_store=url, secret="s" * 32, key_cache_ttl=0)
    other = OzwellAPI(key_store=url, file_store=f"sqlite:///{tmp_path / 'files.db'}", secret="s" * 32, key_cache_ttl=0)
    try:
        keys, files = api.key_store, api.file_store
        assert isinstance(keys, SQLKeyStore)
        assert isinstance(files, SQLFileStore)
        assert files is api.services.files
        assert keys.db is files.db  # one engine for both
        assert isinstance(other.key_store, SQLKeyStore)
        assert isinstance(other.file_store, SQLFileStore)
        assert other.file_store.db is not other.key_store.db
        key, _ = await api.keys.create(name="k", owner="o")
        assert await other.keys.get(key.id) == key
    finally:
        await api.aclose()
        await other.aclose()
    assert isinstance(OzwellAPI().file_store, MemoryFileStore)  # files work out of the box, in memory
    assert OzwellAPI(file_store=None).services.files is None


async def test_sqlite_memory_url_shares_one_database_between_keys_and_files() -> None:
    from ozwell_asgi.testing.contracts import make_file, pieces
    from ozwell_asgi.types import PageQuery

    storage = open_storage("sqlite:///:memory:")
    try:
        keys, files = storage.key_store(), storage.file_store()
        await keys.create(make_key(1))
        await files.create(make_file(1), pieces(b"content"))
        assert [k.id for k in await keys.list()] == ["key_1"]
        assert [f.id for f in (await files.list("alice", PageQuery())).data] == ["file-1"]
    finally:
        await storage.aclose()
