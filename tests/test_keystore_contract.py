"""The KeyStore contract (protocols.py), run against every bundled adapter on real storage.

memory, SQLite (a file), PostgreSQL and Redis (the machine's real servers, isolated per test by conftest) and the
cache in front of memory. A second instance on the same storage must see the first one's writes.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import pytest
from sqlalchemy.engine import make_url

from ozwell_asgi.protocols import KeyStore
from ozwell_asgi.stores.cache import CachedKeyStore
from ozwell_asgi.stores.memory import MemoryKeyStore
from ozwell_asgi.stores.sql import SQLKeyStore, normalize_sql_url
from ozwell_asgi.stores.urls import key_store_from_url
from ozwell_asgi.types import APIKey

pytestmark = pytest.mark.anyio


@dataclass
class Backend:
    """Opens stores on one storage; every store it opens is closed after the test."""

    name: str
    factory: Callable[[], KeyStore]
    persistent: bool
    opened: list[KeyStore] = field(default_factory=list)

    def open(self) -> KeyStore:
        store = self.factory()
        self.opened.append(store)
        return store


@pytest.fixture(params=["memory", "sqlite", "postgres", "redis", "cached-memory"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    name: str = request.param
    if name == "memory":
        return Backend(name, MemoryKeyStore, persistent=False)
    if name == "cached-memory":
        return Backend(name, lambda: CachedKeyStore(MemoryKeyStore(), ttl=5.0), persistent=False)
    if name == "sqlite":
        url = f"sqlite:///{tmp_path / 'keys.db'}"
        return Backend(name, lambda: SQLKeyStore.from_url(url), persistent=True)
    if name == "postgres":
        pg_url: str = request.getfixturevalue("postgres_url")
        return Backend(name, lambda: SQLKeyStore.from_url(pg_url), persistent=True)
    redis_url: str = request.getfixturevalue("redis_url")
    prefix: str = request.getfixturevalue("redis_prefix")
    return Backend(name, lambda: key_store_from_url(redis_url, redis_prefix=prefix), persistent=True)


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[KeyStore]:
    yield backend.open()
    for opened in backend.opened:
        aclose = getattr(opened, "aclose", None)
        if aclose is not None:
            await aclose()


def make_key(n: int | str, **changes: object) -> APIKey:
    key = APIKey(id=f"key_{n}", key_hash=f"hash_{n}", owner="alice", name=f"key {n}", hint=f"ozw_{n}")
    return dataclasses.replace(key, **changes)  # type: ignore[arg-type]


FULL = make_key(
    "full",
    owner="org-1",
    name="Production — ünïcode",
    plan="enterprise",
    rpm=1000,
    tpm=2_000_000,
    models=("gpt-4o", "llama-*"),
    scopes=("api", "admin"),
    created_at=1_700_000_000,
    expires_at=4_102_444_800,  # past 2038: needs 64-bit storage
    hint="ozw_AbCd",
)
MINIMAL = make_key("min", name="", hint="")  # defaults: models None, rpm/tpm None, no expiry
VARIANTS = [
    FULL,
    MINIMAL,
    make_key("empty-models", models=(), scopes=()),
    make_key("born-revoked", revoked_at=1_700_000_100, created_at=1_700_000_000),
]


async def test_create_get_roundtrip_every_field(store: KeyStore) -> None:
    for key in VARIANTS:
        await store.create(key)
    for key in VARIANTS:
        assert await store.get(key.id) == key
        assert await store.get_by_hash(key.key_hash) == key
    got = await store.get(MINIMAL.id)
    assert got is not None
    assert got.models is None
    assert got.rpm is None
    assert got.tpm is None
    assert got.expires_at is None
    empty = await store.get("key_empty-models")
    assert empty is not None
    assert empty.models == ()
    assert empty.scopes == ()


async def test_unknown_id_and_hash(store: KeyStore) -> None:
    assert await store.get("nope") is None
    assert await store.get_by_hash("nope") is None
    assert await store.list() == []
    assert await store.list("nobody") == []


async def test_lookups_by_text_no_key_can_hold_find_nothing(store: KeyStore) -> None:
    """A NUL character (PostgreSQL cannot store one) in an id, hash or owner: not found, never an error."""
    await store.create(make_key(1))
    for bad in ("\x00", "key_1\x00", "k\x00ey"):
        assert await store.get(bad) is None
        assert await store.get_by_hash(bad) is None
        assert await store.list(bad) == []
        assert await store.revoke(bad, 100) is None
        assert await store.rotate(bad, "hash_nul", "ozw_nul") is None
    assert await store.list() == [make_key(1)]


async def test_duplicate_id_or_hash_is_rejected_and_writes_nothing(store: KeyStore) -> None:
    original = make_key(1)
    await store.create(original)
    with pytest.raises(ValueError, match="already exists"):
        await store.create(make_key(2, id=original.id))
    with pytest.raises(ValueError, match="already exists"):
        await store.create(make_key(3, key_hash=original.key_hash))
    assert await store.get_by_hash("hash_2") is None
    assert await store.get("key_3") is None
    assert await store.get(original.id) == original
    assert await store.get_by_hash(original.key_hash) == original
    assert await store.list() == [original]


async def test_list_all_and_by_owner_ordered_by_created_at_then_id(store: KeyStore) -> None:
    keys = [
        make_key("b", created_at=20, owner="alice"),
        make_key("a", created_at=20, owner="bob"),
        make_key("c", created_at=10, owner="alice"),
        make_key("d", created_at=30, owner="bob"),
        make_key("e", created_at=20, owner="alice", revoked_at=25),
        make_key("f", created_at=5, owner="alice", expires_at=6),
    ]
    for key in random.sample(keys, len(keys)):
        await store.create(key)
    expected = sorted(keys, key=lambda k: (k.created_at, k.id))
    assert [k.id for k in expected] == ["key_f", "key_c", "key_a", "key_b", "key_e", "key_d"]
    assert await store.list() == expected
    assert await store.list(None) == expected
    assert await store.list("alice") == [k for k in expected if k.owner == "alice"]
    assert await store.list("bob") == [k for k in expected if k.owner == "bob"]
    assert await store.list("carol") == []


async def test_revoke_is_idempotent_and_keeps_the_first_time(store: KeyStore) -> None:
    key = make_key(1, created_at=1)
    await store.create(key)
    first = await store.revoke(key.id, 100)
    assert first == dataclasses.replace(key, revoked_at=100)
    again = await store.revoke(key.id, 200)
    assert again is not None
    assert again.revoked_at == 100
    assert (await store.get(key.id)) == first
    by_hash = await store.get_by_hash(key.key_hash)  # still resolves: callers check is_active
    assert by_hash is not None
    assert by_hash.revoked_at == 100
    assert not by_hash.is_active(now=50)
    assert await store.revoke("unknown", 100) is None
    assert await store.get("unknown") is None


async def test_rotate_replaces_the_hash_and_keeps_the_rest(store: KeyStore) -> None:
    key = FULL
    await store.create(key)
    rotated = await store.rotate(key.id, "hash_new", "ozw_New1")
    assert rotated == dataclasses.replace(key, key_hash="hash_new", hint="ozw_New1")
    assert await store.get_by_hash(key.key_hash) is None
    assert await store.get_by_hash("hash_new") == rotated
    assert await store.get(key.id) == rotated
    assert await store.list() == [rotated]
    # Rotating again works, and the intermediate hash dies too.
    twice = await store.rotate(key.id, "hash_newer", "ozw_New2")
    assert twice is not None
    assert twice.key_hash == "hash_newer"
    assert await store.get_by_hash("hash_new") is None


async def test_rotate_fails_on_unknown_or_revoked_keys(store: KeyStore) -> None:
    assert await store.rotate("unknown", "hash_x", "ozw_x") is None
    assert await store.get_by_hash("hash_x") is None
    key = make_key(1)
    await store.create(key)
    await store.revoke(key.id, 10)
    assert await store.rotate(key.id, "hash_x", "ozw_x") is None
    assert await store.get_by_hash("hash_x") is None
    after = await store.get_by_hash(key.key_hash)
    assert after is not None
    assert after.key_hash == key.key_hash
    assert after.revoked_at == 10


async def test_rotate_to_a_hash_of_another_key_is_rejected(store: KeyStore) -> None:
    one, two = make_key(1), make_key(2)
    await store.create(one)
    await store.create(two)
    with pytest.raises(ValueError, match="already exists"):
        await store.rotate(one.id, two.key_hash, "ozw_x")
    assert await store.get_by_hash(one.key_hash) == one
    assert await store.get_by_hash(two.key_hash) == two


async def test_concurrent_creates_are_all_stored(store: KeyStore) -> None:
    keys = [make_key(i, created_at=i % 7, owner=f"owner-{i % 3}") for i in range(50)]
    async with anyio.create_task_group() as tg:
        for key in keys:
            tg.start_soon(store.create, key)
    assert await store.list() == sorted(keys, key=lambda k: (k.created_at, k.id))
    for key in keys:
        assert await store.get_by_hash(key.key_hash) == key
    assert len(await store.list("owner-1")) == len([k for k in keys if k.owner == "owner-1"])


async def test_concurrent_creates_of_one_id_store_exactly_one(store: KeyStore) -> None:
    outcomes: list[bool] = []

    async def attempt(n: int) -> None:
        try:
            await store.create(make_key(n, id="key_same"))
            outcomes.append(True)
        except ValueError:
            outcomes.append(False)

    async with anyio.create_task_group() as tg:
        for n in range(20):
            tg.start_soon(attempt, n)
    assert sorted(outcomes) == [False] * 19 + [True]
    [winner] = await store.list()
    resolvable = [n for n in range(20) if await store.get_by_hash(f"hash_{n}") is not None]
    assert [f"hash_{n}" for n in resolvable] == [winner.key_hash]


async def test_concurrent_revokes_agree_on_one_time(store: KeyStore) -> None:
    await store.create(make_key(1))
    results: list[APIKey | None] = []

    async def revoke(at: int) -> None:
        results.append(await store.revoke("key_1", at))

    async with anyio.create_task_group() as tg:
        for at in range(100, 120):
            tg.start_soon(revoke, at)
    times = {r.revoked_at for r in results if r is not None}
    assert len(results) == 20
    assert len(times) == 1
    stored = await store.get("key_1")
    assert stored is not None
    assert {stored.revoked_at} == times


async def test_concurrent_rotations_leave_exactly_one_live_hash(store: KeyStore) -> None:
    await store.create(make_key(1))
    async with anyio.create_task_group() as tg:
        for n in range(10):
            tg.start_soon(store.rotate, "key_1", f"rot_{n}", f"ozw_{n}")
    final = await store.get("key_1")
    assert final is not None
    live = [n for n in range(10) if await store.get_by_hash(f"rot_{n}") is not None]
    assert [f"rot_{n}" for n in live] == [final.key_hash]
    assert await store.get_by_hash("hash_1") is None


async def test_a_second_instance_sees_every_write(backend: Backend, store: KeyStore) -> None:
    if not backend.persistent:
        pytest.skip(f"{backend.name} is process-local by design")
    await store.create(FULL)
    await store.create(MINIMAL)
    other = backend.open()
    assert await other.get_by_hash(FULL.key_hash) == FULL
    assert await other.list() == sorted([FULL, MINIMAL], key=lambda k: (k.created_at, k.id))
    revoked = await other.revoke(MINIMAL.id, 42)
    rotated = await other.rotate(FULL.id, "hash_rotated", "ozw_R")
    third = backend.open()
    assert await third.get(MINIMAL.id) == revoked
    assert await third.get_by_hash("hash_rotated") == rotated
    assert await store.get_by_hash(FULL.key_hash) is None
    assert await store.get(MINIMAL.id) == revoked


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
